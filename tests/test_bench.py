"""The benchmark harness (`sdengine bench`, sdengine/bench/).

References: the published totals of ANCHORS.md for the FLOP counter; torch's own
FlopCounterMode and the real diffusers / transformers models (`numel()`) for the walk
of every architecture; jsonschema for the records; diffusers on the same random
weights for what the runners compute.
Budget: about 60 s on 2 CPU cores, most of it the acceptance run of `sdengine bench`
(a subprocess, so that the installed console script is what is tested).

The Triton backend's fused step is counted with its networks on the eager ops (as in
tests/test_fused_step.py): a Triton UNet takes seconds a forward in the interpreter, and what
is under test is the runner's count around the step, not the UNet's kernels.
"""

import copy
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from sdengine import cli, kernels, samplers
from sdengine.bench import flops, measure, report
from sdengine.bench.harness import BenchOptions, Benchmark
from sdengine.bench.output import markdown, write_outputs
from sdengine.bench.reference import DIFFUSERS_SCHEDULERS, diffusers_unet_kwargs, diffusers_vae_kwargs, \
    reference_pipeline, transformers_text_config
from sdengine.bench.runners import BackendUnavailable, DiffusersRunner, EngineRunner, Workload, make_inputs
from sdengine.bench.schema import SCHEMA, ValidationError, _check, schema_json, validate
from sdengine.config import PRESETS, SCHEDULER_CLASS_TO_SAMPLER, tiny_config

ROOT = Path(__file__).resolve().parents[1]
SCHEMA_FILE = ROOT / "benchmarks" / "schema.json"


# ---------------------------------------------------------------------------
# FLOP and parameter counts
# ---------------------------------------------------------------------------

# ANCHORS.md, "Compute cost": (function, config, size, TFLOP per sample, M params)
ANCHORS = [
    ("SD1.5 UNet 64x64", lambda: flops.unet_cost(PRESETS["sd15"].unet, 64, 64), 0.803, 859.5),
    ("VAE decoder 512x512", lambda: flops.vae_decoder_cost(PRESETS["sd15"].vae, 512, 512), 2.515, 49.5),
    ("CLIP-L 77 tokens", lambda: flops.text_encoder_cost(PRESETS["sd15"].text_encoder), 0.013, 123.1),
    ("SD2.1 UNet 96x96", lambda: flops.unet_cost(PRESETS["sd21-v"].unet, 96, 96), 2.149, 865.9),
    ("SDXL UNet 128x128", lambda: flops.unet_cost(PRESETS["sdxl"].unet, 128, 128), 6.761, 2567.5),
]


@pytest.mark.parametrize("name,cost,tflop,mparams", ANCHORS, ids=[a[0] for a in ANCHORS])
def test_flop_counter_matches_published_totals(name, cost, tflop, mparams):
    c = cost()
    # Within 2%, or within the rounding of the published figure (0.013 T is 0.0125 to 0.0135).
    assert c.flop / 1e12 == pytest.approx(tflop, rel=0.02, abs=0.0005), name
    assert c.params / 1e6 == pytest.approx(mparams, rel=0.02), name


def test_sd15_unet_breakdown_and_layer_counts():
    """ANCHORS.md: conv 55%, linear 29%, attention 16%; 22 resnets, 16 transformer blocks,
    61 GroupNorms, 48 LayerNorms, 32 attention calls per forward."""
    c = flops.unet_cost(PRESETS["sd15"].unet, 64, 64)
    share = {k: v / c.flop for k, v in c.flop_by_kind.items()}
    assert share == pytest.approx({"conv": 0.55, "linear": 0.29, "attention": 0.16}, abs=0.01)
    assert (c.layers["resnet"], c.layers["transformer_block"], c.layers["group_norm"], c.layers["layer_norm"],
            c.layers["attention"]) == (22, 16, 61, 48, 32)


def _counted_flop(build, *inputs, **kwargs):
    """torch's own count of one forward, on the meta device (no arithmetic is done)."""
    with torch.device("meta"):
        model = build()
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(*[x() for x in inputs], **{k: v() if callable(v) else v for k, v in kwargs.items()})
    return counter.get_total_flops()


@pytest.mark.parametrize("kind", ["sd15", "sd21-v", "sdxl", "sd15-inpaint"])
def test_flop_walk_matches_torch_flop_counter_on_every_tiny_architecture(kind):
    """Same total as FlopCounterMode on diffusers' / transformers' own modules, at a
    non-square size, and the same parameter count as the modules hold."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    cfg = tiny_config(kind)
    h, w = 8, 12  # latent cells; the tiny VAE scales by 2
    added = None
    if cfg.unet.addition_embed_type:
        pooled = cfg.unet.projection_class_embeddings_input_dim - 6 * cfg.unet.addition_time_embed_dim
        added = lambda: {"text_embeds": torch.randn(1, pooled), "time_ids": torch.randn(1, 6)}  # noqa: E731
    unet = _counted_flop(lambda: UNet2DConditionModel(**diffusers_unet_kwargs(cfg.unet)),
                         lambda: torch.randn(1, cfg.unet.in_channels, h, w), lambda: torch.tensor(5),
                         encoder_hidden_states=lambda: torch.randn(1, 77, cfg.unet.cross_attention_dim),
                         added_cond_kwargs=added)
    assert flops.unet_cost(cfg.unet, h, w).flop == unet

    size = (cfg.vae.downscale * h, cfg.vae.downscale * w)

    def vae_part(part):
        class Part(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.vae = AutoencoderKL(**diffusers_vae_kwargs(cfg.vae))

            def forward(self, x):
                return getattr(self.vae, part)(x)
        return Part

    assert flops.vae_decoder_cost(cfg.vae, *size).flop == _counted_flop(
        vae_part("decode"), lambda: torch.randn(1, cfg.vae.latent_channels, h, w))
    assert flops.vae_encoder_cost(cfg.vae, *size).flop == _counted_flop(
        vae_part("encode"), lambda: torch.randn(1, 3, *size))
    text_cfg = transformers_text_config(cfg.text_encoder)
    text_cfg._attn_implementation = "sdpa"
    assert flops.text_encoder_cost(cfg.text_encoder).flop == _counted_flop(
        lambda: CLIPTextModel(text_cfg), lambda: torch.randint(1, 1000, (1, 77)))

    with torch.device("meta"):
        unet_params = sum(p.numel() for p in UNet2DConditionModel(**diffusers_unet_kwargs(cfg.unet)).parameters())
        vae = AutoencoderKL(**diffusers_vae_kwargs(cfg.vae))
    params = flops.model_params(cfg)
    assert params["unet"] == unet_params
    assert params["vae_encoder"] == sum(p.numel() for n, p in vae.named_parameters() if not n.startswith(
        ("decoder.", "post_quant_conv.")))
    assert params["vae_decoder"] == sum(p.numel() for n, p in vae.named_parameters() if n.startswith(
        ("decoder.", "post_quant_conv.")))


def test_flop_walk_matches_torch_flop_counter_on_real_sd15_unet():
    from diffusers import UNet2DConditionModel

    unet = PRESETS["sd15"].unet
    counted = _counted_flop(lambda: UNet2DConditionModel(**diffusers_unet_kwargs(unet)),
                            lambda: torch.randn(1, 4, 64, 80), lambda: torch.tensor(5),
                            encoder_hidden_states=lambda: torch.randn(1, 77, 768))
    assert flops.unet_cost(unet, 64, 80).flop == counted


def test_workload_flop_counts_cfg_batch():
    cfg = PRESETS["sd15"]
    work = flops.workload_flop(cfg, 512, 512, batch=3)
    assert work["unet_step"] == 6 * flops.unet_cost(cfg.unet, 64, 64).flop
    assert work["vae_decode"] == 3 * flops.vae_decoder_cost(cfg.vae, 512, 512).flop
    assert flops.end_to_end_flop(work, 31) == work["text_encoder"] + 31 * work["unet_step"] + work["vae_decode"]
    with pytest.raises(ValueError, match="not divisible"):
        flops.unet_cost(cfg.unet, 60, 64)


# ---------------------------------------------------------------------------
# Schema
# ---------------------------------------------------------------------------

def test_schema_file_is_the_schema_the_harness_validates_with():
    assert SCHEMA_FILE.read_text() == schema_json(), \
        "benchmarks/schema.json is stale: python -m sdengine.bench.schema > benchmarks/schema.json"
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


def _bad_records(record):
    """(mutation, record) pairs that the schema must refuse."""
    def mutated(fn):
        r = copy.deepcopy(record)
        fn(r)
        return r
    first = next(i for i, r in enumerate(record["results"]) if "skipped" not in r)
    yield "no device", mutated(lambda r: r.pop("device"))
    yield "string height", mutated(lambda r: r["workload"].__setitem__("height", "512"))
    yield "bad dtype", mutated(lambda r: r["workload"].__setitem__("dtype", "fp8"))
    yield "bad component", mutated(lambda r: r["results"][first].__setitem__("component", "unet"))
    yield "no samples", mutated(lambda r: r["results"][first].__setitem__("samples_ms", []))
    yield "no p50", mutated(lambda r: r["results"][first].pop("p50_ms"))
    yield "negative sample", mutated(lambda r: r["results"][first]["samples_ms"].__setitem__(0, -1.0))
    yield "empty skip reason", mutated(lambda r: r["results"].append({"backend": "x", "skipped": ""}))
    yield "bool as count", mutated(lambda r: r["results"][first].__setitem__("peak_mem_bytes", True))


def _check_record_refusals(record):
    validate(record)
    _check(record, SCHEMA, "record")  # the fallback checker for machines without jsonschema
    for what, bad in _bad_records(record):
        with pytest.raises(ValidationError):
            validate(bad)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, json.loads(SCHEMA_FILE.read_text()))
        with pytest.raises(ValidationError):
            _check(bad, SCHEMA, "record")


# ---------------------------------------------------------------------------
# Runners: what is timed is the same function for every backend
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_runners_time_the_same_function_on_the_same_weights(kind):
    """The diffusers anchor and the eager backend, built from one random-weight pipeline,
    give the same outputs on the same random inputs: both time the same computation. End to
    end, both run the workload's sampler (euler; the SD1.5 pipeline's own scheduler is PNDM)."""
    cfg = tiny_config(kind)
    source = reference_pipeline(cfg, seed=3)
    workload = Workload("tiny", 16, 24, steps=2, batch=1, dtype="fp32", sampler="euler")
    cpu = torch.device("cpu")
    theirs = DiffusersRunner(source, cfg, workload, cpu)
    ours = EngineRunner("eager", source, cfg, workload, cpu)
    with torch.inference_mode():
        for component in ("text_encoder", "unet_step", "vae_decode"):
            inputs = make_inputs(component, cfg, workload, cpu, torch.float32, 2, seed=11)
            assert not torch.equal(*[next(iter(i.values())) for i in inputs]), "inputs must be fresh per call"
            for args in inputs:
                a, b = getattr(theirs, component)(args), getattr(ours, component)(args)
                a = a if isinstance(a, tuple) else (a,)
                for x, y in zip(a, b if isinstance(b, tuple) else (b,)):
                    assert x.shape == y.shape, component
                    assert float((x - y).abs().max()) <= 1e-4 * float(y.abs().max()) + 1e-6, component
        args = {"prompts": ["a red cube"], "seed": 5}
        images_theirs, images_ours = theirs.end_to_end(args), ours.end_to_end(args).images
    assert theirs.unet_calls == ours.unet_calls == 2
    assert theirs.ran() == {"scheduler": "EulerDiscreteScheduler"}
    ran = ours.ran()
    assert (ran["sampler"], ran["fused_step"]) == ("euler", False)  # the eager backend has no fused step
    assert set(ran["phases_ms"]) == {"encode_text", "denoise", "decode"} and all(ran["phases_ms"].values())
    assert type(source.scheduler).__name__ == ("PNDMScheduler" if kind == "sd15" else "EulerDiscreteScheduler")
    diff = np.abs(np.asarray(images_theirs[0], dtype=np.int16) - np.asarray(images_ours[0], dtype=np.int16))
    assert diff.max() <= 2


def test_hires_rows_run_the_same_procedure_on_both_sides():
    """sdengine bench --hires: the eager backend's hires fix and A1111's procedure on diffusers'
    pipelines give the same images at the larger size, with both passes' UNet calls counted."""
    cfg = tiny_config("sd15")
    source = reference_pipeline(cfg, seed=3)
    workload = Workload("tiny", 16, 16, steps=4, batch=1, dtype="fp32", sampler="euler", hires_scale=2.0)
    cpu = torch.device("cpu")
    theirs, ours = DiffusersRunner(source, cfg, workload, cpu), EngineRunner("eager", source, cfg, workload, cpu)
    args = {"prompts": ["a red cube"], "seed": 5}
    with torch.inference_mode():
        images_theirs, images_ours = theirs.end_to_end(args), ours.end_to_end(args).images
    assert images_ours[0].size == images_theirs[0].size == (32, 32)
    assert theirs.unet_calls == ours.unet_calls == 4 + 2
    diff = np.abs(np.asarray(images_theirs[0], dtype=np.int16) - np.asarray(images_ours[0], dtype=np.int16))
    assert diff.max() <= 2


def test_ip_adapter_rows_load_the_same_adapters_on_both_sides():
    """sdengine bench --ip-adapter: the eager backend and diffusers' load_ip_adapter read the same
    random files and draw the same images; the image prompt changes the image."""
    cfg = tiny_config("sd15")
    source = reference_pipeline(cfg, seed=3)
    cpu = torch.device("cpu")
    workload = Workload("tiny", 16, 16, steps=3, batch=1, dtype="fp32", sampler="euler", ip_adapters=2)
    theirs, ours = DiffusersRunner(source, cfg, workload, cpu), EngineRunner("eager", source, cfg, workload, cpu)
    plain = EngineRunner("eager", source, cfg, dataclasses.replace(workload, ip_adapters=0), cpu)
    args = {"prompts": ["a red cube"], "seed": 5}
    with torch.inference_mode():
        images = [np.asarray(r.end_to_end(args) if r is theirs else r.end_to_end(args).images, dtype=np.int16)
                  for r in (theirs, ours, plain)]
    assert ours.pipe.ip_adapter_names == ["ip-adapter-0", "ip-adapter-1"]
    assert np.abs(images[0] - images[1]).max() <= 2
    assert np.abs(images[1] - images[2]).max() > 10
    with pytest.raises(ValueError, match="--components end_to_end"):
        BenchOptions(arch="tiny", ip_adapters=1)


@pytest.mark.skipif(not kernels.HAS_TRITON, reason="triton is not installed")
def test_unet_calls_are_counted_through_the_fused_step():
    """The Triton backend runs euler through its fused step, whose UNet calls never pass through
    `denoise`: the runner counts the step function's calls (= steps), records that the fused step
    ran, and restores the backend after. pndm has no fused kernel: counted through `denoise`
    (PLMS: steps + 1). The fused run's images match the eager backend's."""
    from sdengine.backends.triton import TritonBackend
    from sdengine.models.layers import EAGER_OPS, set_ops

    cfg = tiny_config("sd15")
    source = reference_pipeline(cfg, seed=3)
    workload = Workload("tiny", 16, 16, steps=3, batch=1, dtype="fp32", sampler="euler")
    cpu = torch.device("cpu")
    fused = EngineRunner("triton", source, cfg, workload, cpu)
    for module in (fused.backend.text_encoder, fused.backend.unet, fused.backend.vae):
        set_ops(module, EAGER_OPS)  # the step's sampler kernel still runs through Triton
    eager = EngineRunner("eager", source, cfg, workload, cpu)
    args = {"prompts": ["a red cube"], "seed": 5}
    with torch.inference_mode():
        images_fused, images_eager = fused.end_to_end(args).images, eager.end_to_end(args).images
        ran = fused.ran()
        assert (ran["sampler"], ran["fused_step"]) == ("euler", True) and fused.unet_calls == 3
        assert ran["phases_ms"]["denoise"] > 0  # the fused step's calls are timed as the UNet's
        assert not {"denoise", "fused_step", "encode_text", "decode"} & set(vars(fused.backend))  # the class's again
        assert fused.backend.fused_step.__func__ is TritonBackend.fused_step
        fused.workload = dataclasses.replace(workload, sampler="pndm")
        fused.end_to_end(args)
    assert (fused.ran()["sampler"], fused.ran()["fused_step"]) == ("pndm", False) and fused.unet_calls == 4
    diff = np.abs(np.asarray(images_fused[0], dtype=np.int16) - np.asarray(images_eager[0], dtype=np.int16))
    assert diff.max() <= 2


def test_sampler_without_diffusers_scheduler_skips_only_diffusers_end_to_end():
    """One table maps sdengine samplers to diffusers schedulers; a sampler outside it (dpmpp_3m_sde)
    leaves diffusers' components runnable and its end-to-end run unavailable, with the reason."""
    assert {cls for cls, _ in DIFFUSERS_SCHEDULERS.values()} == set(SCHEDULER_CLASS_TO_SAMPLER)
    assert set(DIFFUSERS_SCHEDULERS) == set(samplers.SAMPLERS) - {"dpmpp_3m_sde"}
    cfg = tiny_config("sd15")
    workload = Workload("tiny", 16, 16, steps=2, batch=1, dtype="fp32", sampler="dpmpp_3m_sde")
    runner = DiffusersRunner(reference_pipeline(cfg, seed=3), cfg, workload, torch.device("cpu"))
    with pytest.raises(BackendUnavailable, match="dpmpp_3m_sde"):
        runner.end_to_end({"prompts": ["a red cube"], "seed": 5})


def test_our_unet_does_less_host_work_per_forward_than_diffusers():
    """At the full SD1.5 architecture (the meta device: dispatch only, no arithmetic), our UNet
    dispatches fewer aten ops than diffusers' (633 vs 780), and its Python between them stays
    within half again of diffusers' (measured 0.65-1.06x, depending on the machine's load): the
    regression guard of the eager layer's host cost (the lent H200 pays ~29 µs an op)."""
    from sdengine.bench.host_overhead import unet_host_overhead

    host = unet_host_overhead(PRESETS["sd15"], 512, 512, batch=1, repeats=5)
    assert 500 < host["eager"]["aten_ops"] < host["diffusers"]["aten_ops"]
    assert host["eager_vs_diffusers"]["python_ms"] < 1.5, host


def test_time_calls_warmup_repeats_and_budget():
    calls = []
    timing = measure.time_calls(lambda x: calls.append(x) or time.sleep(0.002), list(range(8)), warmup=2,
                                device=torch.device("cpu"))
    assert calls == list(range(8)) and len(timing.warmup_ms) == 2 and len(timing.samples_ms) == 6
    assert min(timing.samples_ms) >= 2.0 and not timing.stopped_early
    timing = measure.time_calls(lambda x: time.sleep(0.01), list(range(50)), warmup=1, device=torch.device("cpu"),
                                budget_s=0.05)
    assert timing.stopped_early and 3 <= len(timing.samples_ms) < 49
    stats = measure.summarize([3.0, 1.0, 2.0, 4.0, 5.0])
    assert (stats["p50_ms"], stats["min_ms"], stats["p90_ms"]) == (3.0, 1.0, pytest.approx(4.6))


# ---------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------

def test_acceptance_command_tiny_cpu(tmp_path):
    """`sdengine bench --arch tiny --backends eager,diffusers --steps 2 --json x.json` on the
    CPU: under 2 minutes; the record validates; markdown and chart are written."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")  # 2 cores shared with other tests
    command = ["sdengine", "bench", "--arch", "tiny", "--backends", "eager,diffusers", "--steps", "2",
               "--json", "x.json"]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=170)
    elapsed = time.perf_counter() - started
    assert done.returncode == 0, done.stderr[-3000:]
    assert elapsed < 120, f"took {elapsed:.0f} s"

    record = json.loads((tmp_path / "x.json").read_text())
    jsonschema.validate(record, json.loads(SCHEMA_FILE.read_text()))
    assert record["complete"] and record["workload"] == dict(record["workload"], arch="tiny", height=16, width=16,
                                                             steps=2, batch=1, dtype="fp32", sampler="euler",
                                                             schedule="default")
    assert record["command"].startswith("sdengine bench --arch tiny") and "--steps 2" in record["command"]
    assert "--sampler euler" in record["command"]
    assert record["argv"] == ["sdengine", *command[1:]]
    got = {(r["backend"], r["component"]) for r in record["results"] if "skipped" not in r}
    assert got == {(b, c) for b in ("eager", "diffusers")
                   for c in ("text_encoder", "unet_step", "vae_decode", "end_to_end")}
    for r in record["results"]:
        assert len(r["samples_ms"]) == (10 if r["component"] == "end_to_end" else 20)
        assert len(r["host_samples_ms"]) == len(r["samples_ms"]) and r["first_call_ms"] > 0
        assert r["p50_ms"] == pytest.approx(float(np.median(r["samples_ms"])))
        assert r["min_ms"] <= r["p50_ms"] <= r["p90_ms"] and r["flop"] > 0 and r["tflops"] > 0
        assert r["nonfinite_output"] in (False, None)
        if r["backend"] == "diffusers":
            assert r["speedup_vs_diffusers"] == 1.0
    host = record["host_overhead"]
    assert host["eager"]["aten_ops"] > 0 and host["diffusers"]["aten_ops"] > 0
    assert set(record["backends"]) == {"eager", "diffusers"}
    for b in record["backends"].values():  # each backend ran in its own process, which ended well
        assert b["exit"] == 0 and b["load_s"] > 0 and b["prepare_s"] > 0
    work = flops.workload_flop(tiny_config("sd15"), 16, 16)
    assert record["flop"] == work
    e2e = {r["backend"]: r for r in record["results"] if r["component"] == "end_to_end"}
    assert all(r["unet_calls"] == 2 for r in e2e.values())  # the default sampler, euler: one UNet call a step
    assert e2e["eager"]["flop"] == flops.end_to_end_flop(work, 2)
    assert (e2e["eager"]["sampler"], e2e["eager"]["fused_step"]) == ("euler", False)
    assert e2e["diffusers"]["scheduler"] == "EulerDiscreteScheduler"  # not the pipeline's own PNDM

    table = (tmp_path / "x.md").read_text()
    assert "| eager |" in table and "| diffusers |" in table and "physical floor" in table
    assert "| prepare s |" in table and "Host work per UNet forward" in table
    assert table.startswith("## tiny 16×16, 2 steps of euler,") and "| fused step |" in table
    with Image.open(tmp_path / "x.png") as chart:
        assert chart.format == "PNG" and chart.width > 400
    _check_record_refusals(record)

    readme = subprocess.run([sys.executable, "-m", "sdengine.bench.report", "--all", str(tmp_path / "x.json")],
                            capture_output=True, text=True, env=env, timeout=60)
    assert readme.returncode == 0, readme.stderr
    assert "| eager |" in readme.stdout and "x.json" in readme.stdout


def test_unavailable_backends_are_skipped_with_a_reason(tmp_path, capsys):
    code = cli.main(["bench", "--arch", "tiny", "--backends", "diffusers-compile,optimum-openvino,diffusers", "--components",
                     "unet_step", "--repeats", "3", "--warmup", "1", "--steps", "2", "--device", "cpu",
                     "--sampler", "DPM++ 2M Karras", "--out-dir", str(tmp_path), "--no-progress"])
    assert code == 0
    (path,) = tmp_path.glob("*_cpu_tiny.json")
    record = json.loads(path.read_text())
    validate(record)
    skipped = {r["backend"]: r["skipped"] for r in record["results"] if "skipped" in r}
    assert set(skipped) == {"diffusers-compile", "optimum-openvino"}
    # optimum-intel is not in the test environment (it pins transformers < 5.6): the row says how to get it
    assert "CUDA" in skipped["diffusers-compile"] and "pip install 'optimum-intel[openvino]'" in skipped["optimum-openvino"]
    assert [r["backend"] for r in record["results"] if "skipped" not in r] == ["diffusers"]
    assert "- optimum-openvino: " in path.with_suffix(".md").read_text()
    # an A1111 name resolves to sdengine's (sampler, schedule), and the command spells it back
    assert (record["workload"]["sampler"], record["workload"]["schedule"]) == ("dpmpp_2m", "karras")
    assert "--sampler dpmpp_2m_karras" in record["command"]


def _bench_process(tmp_path, path, *extra):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "sdengine.cli", "bench", "--arch", "tiny", "--device", "cpu", "--json",
               str(path), "--no-progress", *extra]
    return subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _wait_for_results(path, count, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        try:
            record = json.loads(path.read_text())
            if len([r for r in record["results"] if "skipped" not in r]) >= count:
                return record
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    raise AssertionError("the benchmark wrote no results in time")


def _children_of(pid):
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _gone(pid, timeout=15):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        state = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True).stdout.strip()
        if state.startswith("Z"):  # a zombie has ended
            return True
        time.sleep(0.2)
    return False


def test_sigterm_writes_what_was_measured_and_stops_the_backend(tmp_path):
    """SIGTERM (e.g. from `timeout`) mid-run: the record says so and keeps what was measured,
    and the backend's process is stopped with the run."""
    import signal

    path = tmp_path / "cut.json"
    proc = _bench_process(tmp_path, path, "--backends", "diffusers", "--components",
                          "text_encoder,vae_decode,unet_step", "--repeats", "400", "--budget", "600")
    _wait_for_results(path, 1, proc)
    children = _children_of(proc.pid)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(120) == 130
    record = json.loads(path.read_text())
    validate(record)
    assert not record["complete"] and record["interrupted"] == "SIGTERM"
    assert [r["component"] for r in record["results"] if "skipped" not in r][0] == "text_encoder"
    assert "Incomplete run" in path.with_suffix(".md").read_text() and path.with_suffix(".png").exists()
    assert not list(tmp_path.glob(".*.tmp"))
    assert children and all(_gone(pid) for pid in children)


def test_run_killed_outright_keeps_what_it_measured(tmp_path):
    """No Python cleanup at all in the harness (SIGKILL, as the OOM killer): the JSON checkpoint
    written after each result holds what was measured, marked unfinished, and the backend's
    process ends by itself when it sees its parent gone."""
    import signal

    path = tmp_path / "killed.json"
    proc = _bench_process(tmp_path, path, "--backends", "eager", "--components", "text_encoder,unet_step,vae_decode",
                          "--repeats", "400", "--budget", "600")
    _wait_for_results(path, 2, proc)
    children = _children_of(proc.pid)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    record = json.loads(path.read_text())
    validate(record)
    assert not record["complete"] and "unfinished" in record["interrupted"]
    assert [r["component"] for r in record["results"]][:2] == ["text_encoder", "unet_step"]
    assert not list(tmp_path.glob(".*.tmp"))
    assert children and all(_gone(pid) for pid in children)
    # a run that ends writes over its checkpoint, complete, at the same path
    code = cli.main(["bench", "--arch", "tiny", "--backends", "eager", "--components", "text_encoder", "--repeats", "2",
                     "--device", "cpu", "--json", str(path), "--no-progress"])
    assert code == 0 and json.loads(path.read_text())["complete"]


@pytest.mark.slow
def test_a_backend_that_crashes_hangs_or_raises_costs_only_itself(tmp_path):
    """Each backend runs in its own process: one that dies outright mid-run (os._exit), one that
    hangs past its prepare cap, one that raises while it is built; the record keeps every other
    backend's rows, and says for each failure what happened, where, with the end of its log."""
    options = BenchOptions(arch="tiny", backends=("crashing", "hanging", "raising", "diffusers"),
                           components=("text_encoder", "unet_step"), repeats=3, warmup=1, device="cpu",
                           prepare_cap_s=30, run_cap_s=120, sys_path=(str(Path(__file__).parent),),
                           runner_factories={"crashing": "support.bench_fakes:crashing",
                                             "hanging": "support.bench_fakes:hanging",
                                             "raising": "support.bench_fakes:raising"})
    started = time.perf_counter()
    record = Benchmark(options, progress=False).run()
    assert time.perf_counter() - started < 400
    validate(record)
    assert record["complete"]
    measured = [(r["backend"], r["component"]) for r in record["results"] if "skipped" not in r]
    assert measured == [("crashing", "text_encoder"), ("diffusers", "text_encoder"), ("diffusers", "unet_step")]
    skipped = {r["backend"]: r for r in record["results"] if "skipped" in r}
    assert skipped["crashing"]["skipped"] == "crashed in run (exit code 9)" and skipped["crashing"]["phase"] == "run"
    assert skipped["hanging"]["skipped"] == "timed out: over its 30 s prepare cap"
    assert skipped["hanging"]["phase"] == "prepare" and skipped["hanging"]["error"]
    assert skipped["raising"]["skipped"].startswith("crashed in prepare (exit code 1)")
    assert "no kernel image for this device" in skipped["raising"]["log_tail"]
    assert record["backends"]["diffusers"]["exit"] == 0 and record["backends"]["crashing"]["exit"] == 9
    crashed = next(r for r in record["results"] if r["backend"] == "crashing" and "skipped" not in r)
    assert crashed["speedup_vs_diffusers"] > 0  # its row before the crash is compared like any other


def test_fidelity_against_the_fp32_reference(tmp_path):
    """Each backend's image at a fixed prompt and seed against eager sdengine in fp32 (its own
    process, no timings): the graph layer matches it, diffusers too (fp32 here; on a GPU the
    fp16 runs get their deviation recorded)."""
    options = BenchOptions(arch="tiny", backends=("graph", "diffusers"), components=("unet_step",), repeats=2,
                           warmup=1, device="cpu", fidelity=True)
    record = Benchmark(options, progress=False).run()
    validate(record)
    mae = record["fidelity"]["mae"]
    assert set(mae) == {"graph", "diffusers"} and mae["graph"] <= 1 / 255 and mae["diffusers"] <= 2 / 255
    assert record["backends"]["eager-fp32"]["exit"] == 0
    assert "| MAE vs fp32 |" in markdown(record)


def test_rows_carry_their_own_dtype_and_peak(tmp_path):
    """`name@dtype` rows in one run: each row computes in its dtype and keeps its name, its % of
    peak divides by this CPU's best matmul or convolution in that dtype, the baseline is the run's dtype's
    diffusers row, and the bf16 rows' images stay close to fp32's."""
    options = BenchOptions(arch="tiny", backends=("diffusers@fp32", "diffusers@bf16", "eager@bf16"),
                           components=("unet_step",), repeats=2, warmup=1, device="cpu", threads=1,
                           weights_dir=str(tmp_path / "weights"))
    record = Benchmark(options, progress=False).run()
    validate(record)
    rows = {r["backend"]: r for r in record["results"] if "skipped" not in r}
    assert set(rows) == {"diffusers@fp32", "diffusers@bf16", "eager@bf16"}
    assert {b: r["dtype"] for b, r in rows.items()} == {"diffusers@fp32": "fp32", "diffusers@bf16": "bf16",
                                                        "eager@bf16": "bf16"}
    peaks = record["peak_tflops_by_dtype"]
    assert set(peaks) == {"fp32", "bf16"} and record["threads"] == 1 and "on 1 threads" in peaks["bf16"]["source"]
    for r in rows.values():
        assert r["threads"] == 1
        assert r["pct_of_peak"] == pytest.approx(100 * r["tflops"] / peaks[r["dtype"]]["tflops"])
    assert record["baseline"] == "diffusers@fp32" and rows["diffusers@fp32"]["speedup_vs_diffusers"] == 1.0
    mae = record["fidelity"]["mae"]  # on by default: a row is not fp32
    assert mae["diffusers@fp32"] <= 2 / 255 and mae["diffusers@bf16"] <= 0.05 and mae["eager@bf16"] <= 0.05
    # the weights are kept for the next run (and for the exports made from them), in fp32
    assert json.loads((tmp_path / "weights" / "sdengine-bench.json").read_text())["dtype"] == "fp32"


def test_comparison_names_the_fastest_row_and_peer():
    from sdengine.bench.harness import compare

    def e2e(backend, ms):
        return {"backend": backend, "component": "end_to_end", "p50_ms": ms}

    result = compare([e2e("diffusers@fp32", 400.0), e2e("diffusers@bf16", 200.0), e2e("eager", 160.0),
                      e2e("compile@bf16", 100.0), e2e("optimum-openvino", 120.0), e2e("sdcpp@q8_0", 900.0),
                      {"backend": "compile@bf16", "component": "unet_step", "p50_ms": 1.0}])
    assert result["best"] == "compile@bf16" and result["fastest_peer"] == "optimum-openvino"
    assert result["speedup_vs"] == {"diffusers@fp32": 4.0, "diffusers@bf16": 2.0, "optimum-openvino": 1.2,
                                    "sdcpp@q8_0": 9.0}
    assert result["speedup_vs_fastest_peer"] == pytest.approx(1.2)
    assert compare([e2e("diffusers", 1.0)]) is None


def test_peer_python_runs_the_row_under_that_interpreter(tmp_path):
    """--peer-python NAME=PATH: the row's process is started by PATH (here a wrapper that leaves a
    mark, then runs this interpreter), with this checkout importable."""
    mark = tmp_path / "ran"
    wrapper = tmp_path / "python"
    wrapper.write_text(f"#!/bin/sh\ntouch {mark}\nexec {sys.executable} \"$@\"\n")
    wrapper.chmod(0o755)
    options = BenchOptions(arch="tiny", backends=("eager",), components=("text_encoder",), repeats=2, warmup=0,
                           device="cpu", threads=1, peer_python={"eager": str(wrapper)})
    record = Benchmark(options, progress=False).run()
    assert mark.exists() and [r["backend"] for r in record["results"]] == ["eager"]
    assert f"--peer-python eager={wrapper}" in record["command"]


@pytest.mark.parametrize("backends,message", [
    ("sdcpp@q9_9", "sdcpp takes @f32 / @f16 / @q8_0 / @q4_0"), ("diffusers@int4", "diffusers takes @fp32"),
    ("eager,eager", "named twice"), ("tensorrt", "unknown backend 'tensorrt'")])
def test_backend_variants_are_checked(backends, message, capsys):
    assert cli.main(["bench", "--arch", "tiny", "--device", "cpu", "--backends", backends]) == 2
    assert message in capsys.readouterr().err


def test_peer_python_must_name_a_backend_of_the_run(tmp_path, capsys):
    assert cli.main(["bench", "--arch", "tiny", "--device", "cpu", "--backends", "eager",
                     "--peer-python", f"sdcpp={sys.executable}"]) == 2
    assert "sdcpp is not in --backends" in capsys.readouterr().err
    assert cli.main(["bench", "--arch", "tiny", "--device", "cpu", "--backends", "eager",
                     "--peer-python", "sdcpp"]) == 2
    assert "NAME=PATH" in capsys.readouterr().err


def test_commit_from_environment_wins(monkeypatch):
    """The GPU machine's copied tree may hold a stale .git: SDENGINE_COMMIT, when set, is the commit."""
    monkeypatch.setenv("SDENGINE_COMMIT", "0123456789abcdef")
    assert measure.git_commit() == ("0123456789abcdef", None)
    monkeypatch.delenv("SDENGINE_COMMIT")
    commit, _ = measure.git_commit()
    assert commit != "0123456789abcdef"


def test_bad_arguments_name_the_option(capsys):
    for argv, option in [(["--backends", "eager,tensorrt"], "--backends"), (["--steps", "0"], "--steps"),
                         (["--height", "500"], "--height"), (["--components", "unet"], "--components"),
                         (["--json", "x.txt"], "--json"), (["--model", "/nonexistent/model"], "--model"),
                         (["--sampler", "nonesuch"], "--sampler"), (["--sampler", "ddim_karras"], "--sampler")]:
        assert cli.main(["bench", "--arch", "tiny", "--device", "cpu", *argv]) == 2
        assert option in capsys.readouterr().err


def test_report_groups_records_and_skips_cpu_by_default(tmp_path):
    options = BenchOptions(arch="tiny", backends=("diffusers",), components=("unet_step",), repeats=3, warmup=0,
                           device="cpu")
    record = Benchmark(options, progress=False).run()
    write_outputs(record, tmp_path / "a.json")
    assert report.main([str(tmp_path / "a.json")]) == 0  # a CPU smoke record is no performance claim
    gpu = dict(record, device="NVIDIA H100 80GB HBM3", device_type="cuda")
    (tmp_path / "b.json").write_text(json.dumps(gpu))
    text = report.render([tmp_path / "a.json", tmp_path / "b.json"])
    assert "NVIDIA H100" in text and "CPU" not in text and "b.json" in text
    assert markdown(record).count("| diffusers |") == 2


def test_lora_swap_bench_records_apply_and_remove(tmp_path, capsys):
    """`sdengine bench --lora-swap` at a tiny size: a rank-8 kohya LoRA merged and removed."""
    import json

    from sdengine.cli import main

    out = tmp_path / "swap.json"
    assert main(["bench", "--lora-swap", "--arch", "tiny-sdxl", "--lora-rank", "8", "--repeats", "2",
                 "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["kind"] == "lora-swap" and record["rank"] == 8 and record["lora"]["layers"] > 20
    assert len(record["apply_ms_all"]) == 2 and len(record["remove_ms_all"]) == 3
    assert 0 < record["apply_ms"] < 10_000 and 0 < record["remove_ms"] < 10_000
    assert "apply + remove" in capsys.readouterr().out


def test_optimum_openvino_row_runs_diffusers_end_to_end(monkeypatch):
    """The optimum-openvino row's end_to_end and image are DiffusersRunner's (OVStableDiffusionPipeline's
    __call__ is diffusers'), on the attributes its own __init__ sets (a CPU session's row once failed with
    AttributeError: 'second_pass'); hires and IP-Adapter workloads are refused by name."""
    import types

    from sdengine.bench import peers

    monkeypatch.setattr(peers, "_import", lambda name, module: types.SimpleNamespace())
    cfg = tiny_config("sd15")
    workload = Workload("tiny", 16, 16, steps=3, batch=1, dtype="fp32", sampler="euler")
    runner = peers.OptimumOpenVINORunner("unused", cfg, workload, torch.device("cpu"))
    calls = []

    class Pipe:  # the pipeline's __call__ as the runner uses it
        scheduler = types.SimpleNamespace(timesteps=[3, 2, 1])

        def __call__(self, **kwargs):
            calls.append(kwargs)
            return types.SimpleNamespace(images=np.zeros((1, 16, 16, 3), dtype=np.float32))

    runner.pipe = Pipe()
    runner.end_to_end({"prompts": ["a cat"], "seed": 5})
    assert runner.unet_calls == 3 and calls[0]["num_inference_steps"] == 3 and calls[0]["height"] == 16
    assert not {"image", "ip_adapter_image"} & set(calls[0])
    assert runner.image("a cat", 5).shape == (16, 16, 3)
    for changed, why in ((dict(hires_scale=2.0), "hires fix"), (dict(ip_adapters=1), "IP-Adapters")):
        with pytest.raises(BackendUnavailable, match=why):
            peers.OptimumOpenVINORunner("unused", cfg, dataclasses.replace(workload, **changed), torch.device("cpu"))
