"""ONNX export (export/onnx.py) and the onnxruntime backend (sdengine/backends/onnx.py).

Each tiny model is exported once per session (module-scoped fixtures; exporting is the
slow part). References are independent: diffusers' UNet and VAE and transformers' CLIP
on the same random weights, and the eager backend for whole generations.

Budget: under 3 minutes. Nearly all of it is the two exports (about 45 s of CPU each),
which run side by side, one of them in a CLI child process: about 1.5 minutes on 2 idle
cores; 5.5 minutes measured on a shared machine at load average 7.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import sdengine  # noqa: E402
import sdengine.backends.onnx  # noqa: E402
from sdengine.export import onnx as onnx_export  # noqa: E402
from sdengine.loading import detect  # noqa: E402
from support.tiny import save_tiny_pipeline, tiny_pipeline  # noqa: E402

KINDS = ("sd15", "sd21-v")
NETWORK_FILES = ("text_encoder.onnx", "unet.onnx", "vae_decoder.onnx", "vae_encoder.onnx")


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """{kind: (diffusers folder, ONNX export folder)} for the tiny SD1 and SD2-v models, fp32.

    SD2-v is exported by the CLI in a second process while SD1 is exported by the Python
    API in this one: both entry points are exercised, and two cores halve the wait.
    """
    root = tmp_path_factory.mktemp("onnx")
    folders = {kind: save_tiny_pipeline(kind, root / f"tiny-{kind}") for kind in KINDS}
    cli = _start_cli_export(folders["sd21-v"], root / "onnx-sd21-v")
    try:
        sd15 = onnx_export.export_onnx(folders["sd15"], root / "onnx-sd15", progress=False)
        stdout, stderr = cli.communicate(timeout=1200)
    finally:
        if cli.poll() is None:
            cli.kill()
    assert cli.returncode == 0, f"sdengine export onnx failed:\n{stderr[-4000:]}"
    assert stdout.strip().splitlines()[-1] == str(root / "onnx-sd21-v")  # the CLI prints the folder
    return {"sd15": (folders["sd15"], sd15), "sd21-v": (folders["sd21-v"], root / "onnx-sd21-v")}


def _start_cli_export(folder: Path, out_dir: Path) -> subprocess.Popen:
    """`sdengine export onnx folder out_dir` in a child process (one torch thread)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "sdengine.cli", "export", "onnx", str(folder), str(out_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=Path(__file__).resolve().parent.parent)


def _session(path: Path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _rel(actual, expected) -> float:
    actual, expected = torch.as_tensor(actual).double(), torch.as_tensor(expected).double()
    assert actual.shape == expected.shape
    return ((actual - expected).abs().max() / expected.abs().max()).item()


# ---------------------------------------------------------------------------
# The export itself
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_export_files_checker_and_manifest(exports, kind):
    folder, onnx_dir = exports[kind]
    for name in NETWORK_FILES:
        onnx.checker.check_model(str(onnx_dir / name), full_check=True)
    manifest = json.loads((onnx_dir / onnx_export.MANIFEST_NAME).read_text())
    assert manifest["format_version"] == onnx_export.FORMAT_VERSION
    assert manifest["config"]["scheduler"]["prediction_type"] == ("v_prediction" if kind == "sd21-v" else "epsilon")
    assert set(manifest["versions"]) >= {"torch", "onnx", "onnxruntime", "onnxscript"}
    unet = manifest["networks"]["unet"]
    assert unet["exporter"] == "dynamo" and unet["fallback_reason"] is None
    assert [i["name"] for i in unet["inputs"]] == ["sample", "timestep", "encoder_hidden_states"]
    assert unet["inputs"][0]["shape"] == ["batch", 4, "height", "width"]  # dynamic axes, named
    assert unet["outputs"][0]["shape"][0] == "batch"
    for record in manifest["networks"].values():
        assert record["validation"]["error"] <= record["validation"]["tolerance"] == 1e-4
    # The manifest's config rebuilds the model's config exactly (architecture and sampler).
    backend = sdengine.backends.onnx.OnnxBackend.from_dir(onnx_dir)
    assert backend.config == detect(folder)
    assert backend.dtype == torch.float32 and backend.device == torch.device("cpu")


@pytest.mark.parametrize("kind", KINDS)
def test_unet_and_vae_match_diffusers_at_two_resolutions(exports, kind):
    """ORT CPU vs diffusers fp32, within 1e-4 relative, at two batch sizes and resolutions."""
    _, onnx_dir = exports[kind]
    pipe = tiny_pipeline(kind)
    unet, vae = _session(onnx_dir / "unet.onnx"), _session(onnx_dir / "vae_decoder.onnx")
    encoder = _session(onnx_dir / "vae_encoder.onnx")
    scale = pipe.vae_scale_factor  # 2 for the tiny VAE (8 for SD's)
    generator = torch.Generator().manual_seed(1)
    for batch, h, w in ((1, 8, 8), (2, 12, 6)):  # two resolutions, one of them not square
        x = torch.randn(batch, 4, h, w, generator=generator)
        t = torch.tensor([917.0, 3.5][:batch])
        context = torch.randn(batch, 77, 32, generator=generator)
        (out,) = unet.run(None, {"sample": x.numpy(), "timestep": t.numpy(), "encoder_hidden_states": context.numpy()})
        with torch.no_grad():
            ref = pipe.unet(x, t, context).sample
        assert _rel(out, ref) < 1e-4, (batch, h, w)

        (image,) = vae.run(None, {"latent_sample": x.numpy()})
        with torch.no_grad():
            ref = pipe.vae.decode(x).sample
        assert image.shape == (batch, 3, scale * h, scale * w)
        assert _rel(image, ref) < 1e-4, (batch, h, w)

        pixels = torch.rand(batch, 3, scale * h, scale * w, generator=generator) * 2 - 1
        mean, logvar = encoder.run(None, {"sample": pixels.numpy()})
        with torch.no_grad():
            dist = pipe.vae.encode(pixels).latent_dist
        assert _rel(mean, dist.mean) < 1e-4 and _rel(logvar, dist.logvar) < 1e-4


@pytest.mark.parametrize("kind", KINDS)
def test_text_encoder_matches_transformers_and_clip_skip(exports, kind):
    _, onnx_dir = exports[kind]
    pipe = tiny_pipeline(kind)
    ids = pipe.tokenizer(["a photo of an astronaut", ""], padding="max_length", max_length=77,
                         return_tensors="pt").input_ids
    hidden, pooled, by_skip = _session(onnx_dir / "text_encoder.onnx").run(None, {"input_ids": ids.numpy()})
    with torch.no_grad():
        ref = pipe.text_encoder(ids, output_hidden_states=True)
    assert _rel(hidden, ref.last_hidden_state) < 1e-4
    assert _rel(pooled, ref.pooler_output) < 1e-4
    text_model = getattr(pipe.text_encoder, "text_model", pipe.text_encoder)  # transformers 5 has no text_model
    final_norm = text_model.final_layer_norm
    layers = len(ref.hidden_states) - 1
    assert by_skip.shape[0] == layers + 1
    for skip in range(layers + 1):  # diffusers' clip_skip: hidden_states[-(skip + 1)], then the final LayerNorm
        with torch.no_grad():
            expected = final_norm(ref.hidden_states[-(skip + 1)])
        assert _rel(by_skip[skip], expected) < 1e-4, skip

    backend = sdengine.backends.onnx.OnnxBackend.from_dir(onnx_dir)
    context, _ = backend.encode_text(ids, clip_skip=1)
    assert _rel(context, by_skip[1]) == 0
    with pytest.raises(ValueError, match="clip_skip"):
        backend.encode_text(ids, clip_skip=layers + 1)


@pytest.mark.parametrize("kind", KINDS)
def test_generate_matches_eager(exports, kind):
    """generate() on the onnx backend vs the eager backend, same latents: within 2/255."""
    folder, onnx_dir = exports[kind]
    scale = tiny_pipeline(kind).vae_scale_factor
    latents = torch.randn(1, 4, 8, 12, generator=torch.Generator().manual_seed(3))
    kwargs = dict(num_inference_steps=3, latents=latents, height=8 * scale, width=12 * scale, output_type="np",
                  progress=False, guidance_scale=5.0)
    onnx_pipe = sdengine.load(onnx_dir)  # an export folder picks the onnx backend
    assert onnx_pipe.backend.name == "onnx" and onnx_pipe.backend.provider == "CPUExecutionProvider"
    eager_pipe = sdengine.load(folder, device="cpu", backend="eager")
    images = onnx_pipe("a red cube", **kwargs).images
    reference = eager_pipe("a red cube", **kwargs).images
    assert images.shape == reference.shape == (1, 8 * scale, 12 * scale, 3)
    assert abs(images - reference).max() <= 2 / 255


def test_load_with_backend_onnx_uses_cached_export(exports, tmp_path, monkeypatch):
    """sdengine.load(checkpoint, backend="onnx") finds the export in the cache (no re-export)."""
    monkeypatch.setenv("SDE_CACHE_DIR", str(tmp_path))
    folder, onnx_dir = exports["sd15"]
    cached = sdengine.backends.onnx.cache_dir(Path(folder), "fp32")
    shutil.copytree(onnx_dir, cached)
    monkeypatch.setattr(onnx_export, "export_onnx", lambda *a, **k: pytest.fail("exported again"))
    pipe = sdengine.load(folder, device="cpu", backend="onnx")
    assert pipe.backend.name == "onnx" and pipe.backend.onnx_dir == cached


def test_optimizer_graph_still_matches(exports, tmp_path):
    """--optimize: ORT's transformer optimizer (model types clip/unet/vae) keeps the outputs."""
    _, onnx_dir = exports["sd15"]
    pipe = tiny_pipeline("sd15")
    work = tmp_path / "opt"
    shutil.copytree(onnx_dir, work)
    counts = onnx_export.optimize_graph(work / "unet.onnx", "unet", external=False)
    onnx.checker.check_model(str(work / "unet.onnx"))
    # The counts it returns (for the manifest) are those of the fused ops in the saved graph.
    ops = collections.Counter(node.op_type for node in onnx.load(str(work / "unet.onnx")).graph.node)
    assert counts and counts == {op: ops[op] for op in counts}
    generator = torch.Generator().manual_seed(5)
    x, t, context = torch.randn(2, 4, 8, 8, generator=generator), torch.tensor([10.0, 10.0]), \
        torch.randn(2, 77, 32, generator=generator)
    (out,) = _session(work / "unet.onnx").run(None, {"sample": x.numpy(), "timestep": t.numpy(),
                                                     "encoder_hidden_states": context.numpy()})
    with torch.no_grad():
        ref = pipe.unet(x, t, context).sample
    assert _rel(out, ref) < 1e-4


def test_external_data_above_the_size_limit(exports, tmp_path, monkeypatch):
    """Graphs over the protobuf limit keep their weights in <name>.onnx.data; checker and ORT
    read them by path. (The limit is lowered so that the tiny text encoder crosses it.)"""
    from sdengine.loading import load_model

    folder, _ = exports["sd15"]
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 0)
    loaded = load_model(folder, device="cpu", dtype=torch.float32, progress=False)
    net = next(n for n in onnx_export._networks(loaded, torch.Generator().manual_seed(0)) if n.name == "text_encoder")
    record = onnx_export._export_one(net, tmp_path, torch.float32, onnx_export.DEFAULT_OPSET, False, 1e-4)
    assert record["external_data"] == ["text_encoder.onnx.data"]
    weights = sum(p.numel() * 4 for p in loaded.text_encoder.parameters())
    graph_bytes = (tmp_path / "text_encoder.onnx").stat().st_size
    data_bytes = (tmp_path / "text_encoder.onnx.data").stat().st_size
    assert graph_bytes < weights < 1.5 * data_bytes
    assert record["validation"]["error"] <= 1e-4
    onnx.checker.check_model(str(tmp_path / "text_encoder.onnx"))


def test_legacy_fallback_states_its_reason(exports, tmp_path, monkeypatch, caplog):
    """When the dynamo exporter fails, the TorchScript exporter takes over; the reason is
    logged and kept in the record, and the graph is validated like any other. (The VAE
    decoder: the legacy tracer cannot export F.layer_norm(x, x.shape[-1:]) with dynamic
    shapes, which the UNet and text encoder use.)"""
    from sdengine.loading import load_model

    folder, _ = exports["sd15"]

    def dynamo_fails(*args, **kwargs):
        raise RuntimeError("no ONNX translation for aten::made_up_op")

    monkeypatch.setattr(onnx_export, "_export_dynamo", dynamo_fails)
    loaded = load_model(folder, device="cpu", dtype=torch.float32, progress=False)
    nets = {n.name: n for n in onnx_export._networks(loaded, torch.Generator().manual_seed(0))}
    with caplog.at_level("WARNING", logger="sdengine"):
        record = onnx_export._export_one(nets["vae_decoder"], tmp_path, torch.float32, onnx_export.DEFAULT_OPSET,
                                         False, 1e-4)
    assert record["exporter"] == "legacy" and "aten::made_up_op" in record["fallback_reason"]
    assert "aten::made_up_op" in caplog.text
    assert record["validation"]["error"] <= 1e-4  # validated at another batch and size than traced
    assert record["inputs"][0]["shape"] == ["batch", 4, "height", "width"]


# ---------------------------------------------------------------------------
# Bad input: clear errors, nothing half-written
# ---------------------------------------------------------------------------

def _leftovers(parent: Path, name: str) -> list:
    return [p.name for p in parent.iterdir() if p.name.startswith((name, f".{name}"))]


def test_unwritable_target_is_a_clear_error(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where a folder should be")
    target = blocker / "export"
    with pytest.raises(PermissionError, match="not-a-folder"):
        onnx_export.export_onnx(tmp_path / "does-not-matter", target)
    assert blocker.read_text() == "a file where a folder should be"
    # The CLI reports it as an error, with exit status 2.
    from sdengine.cli import main

    assert main(["export", "onnx", str(tmp_path), str(target)]) == 2


def test_failed_export_leaves_nothing_behind(exports, tmp_path, monkeypatch):
    folder, _ = exports["sd15"]

    def broken(net, module, args, path, opset):
        path.write_bytes(b"half a graph")
        raise RuntimeError("exporter crashed")

    monkeypatch.setattr(onnx_export, "_export_network", broken)
    with pytest.raises(RuntimeError, match="exporter crashed"):
        onnx_export.export_onnx(folder, tmp_path / "out", progress=False)
    assert _leftovers(tmp_path, "out") == []


def test_existing_target_is_kept_without_overwrite(exports, tmp_path):
    folder, _ = exports["sd15"]
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite"):
        onnx_export.export_onnx(folder, target, progress=False)
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    assert _leftovers(tmp_path, "out") == ["out"]


def test_validation_fails_loudly_beyond_tolerance(exports):
    """A graph that disagrees with torch (here: torch's outputs scaled by 1.01) is an error
    naming the file, the error and the tolerance."""
    from sdengine.loading import load_model

    folder, onnx_dir = exports["sd15"]
    loaded = load_model(folder, device="cpu", dtype=torch.float32, progress=False)
    net = next(n for n in onnx_export._networks(loaded, torch.Generator().manual_seed(0)) if n.name == "vae_decoder")
    with torch.no_grad():
        expected = net.module(*net.check)
    figures = onnx_export.validate_graph(onnx_dir / "vae_decoder.onnx", net, net.check, (expected,), torch.float32,
                                         1e-4)
    assert figures["error"] < 1e-4 and figures["tolerance"] == 1e-4
    message = r"vae_decoder\.onnx: .* differs from torch .* tolerance 0\.0001"
    with pytest.raises(onnx_export.OnnxValidationError, match=message):
        onnx_export.validate_graph(onnx_dir / "vae_decoder.onnx", net, net.check, (expected * 1.01,), torch.float32,
                                   1e-4)


@pytest.mark.parametrize("missing", ["unet.onnx", "vae_encoder.onnx", "tokenizer/merges.txt"])
def test_export_missing_a_file_is_a_clear_error(exports, tmp_path, missing):
    _, onnx_dir = exports["sd15"]
    broken = tmp_path / "broken"
    shutil.copytree(onnx_dir, broken)
    (broken / missing).unlink()
    with pytest.raises(FileNotFoundError, match=missing.split("/")[-1]):
        sdengine.load(broken)


def test_manifest_from_a_newer_version_is_refused(exports, tmp_path):
    _, onnx_dir = exports["sd15"]
    newer = tmp_path / "newer"
    shutil.copytree(onnx_dir, newer)
    path = newer / onnx_export.MANIFEST_NAME
    manifest = json.loads(path.read_text())
    manifest["format_version"] = onnx_export.FORMAT_VERSION + 1
    path.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="format_version .* newer"):
        sdengine.backends.onnx.OnnxBackend.from_dir(newer)


def test_bad_arguments_are_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="dtype"):
        onnx_export.export_onnx(tmp_path, tmp_path / "out", dtype="bf16")
    with pytest.raises(ValueError, match="opset"):
        onnx_export.export_onnx(tmp_path, tmp_path / "out", opset=7)
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        onnx_export.export_onnx(tmp_path / "no-such-model", tmp_path / "out")
    assert _leftovers(tmp_path, "out") == []
