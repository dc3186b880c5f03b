"""The native runtime (libsdengine, csrc/): AOTInductor engine, C++ tokenizer, C++ sampler loop, C API;
`backend="native"` (whole requests in the C++ loop) and `backend="aoti"` (the same compiled
networks from the Python loop).

References: the eager Python pipeline (sdengine.api.from_diffusers on the tiny diffusers
pipeline of tests/tiny.py, same weights) for images; sdengine.tokenizer for token ids;
sdengine.samplers.make_plan for schedules; sdengine/samplers/names.py for the name table.

The C programs (examples/c/generate.c, tests/c/test_capi.c) are compiled here with the
system C compiler against sdengine.h and libsdengine only, as an embedding app would.

Budget: one AOTInductor compile of the tiny SD1 engine (2-4 min on 2 cores; cached in
$SDE_CACHE_DIR, default ~/.cache/sdengine, for later runs), then about 1-2 min of tests.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import sdengine
from sdengine.config import SchedulerConfig, tiny_config
from sdengine.samplers import NAMES, make_plan, resolve
from tiny import save_tiny_pipeline, tiny_pipeline

_C = pytest.importorskip("sdengine._C")
ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIR = Path(sdengine.__file__).parent
HEADER_DIR = ROOT / "csrc" / "include"
PROMPT = "a photograph of an astronaut riding a horse"
NATIVE_SAMPLERS = [("euler", None), ("euler_a", None), ("ddim", None), ("dpmpp_2m", "karras"), ("euler", "karras"),
                   ("pndm", None)]
SIZE = 16  # pixels: the tiny model's VAE halves once and its UNet once, so 4-pixel cells


# ---------------------------------------------------------------------------
# Fixtures: one tiny model folder and one engine for the whole module
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One CPU thread per request: on a shared 2-core machine OpenMP's spinning teams make
    the tiny model 10x slower, and the tests check results, not speed."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def cache_dir():
    """The engine cache ($SDE_CACHE_DIR, default ~/.cache/sdengine): the tiny engine is built
    once and reused by later runs and by tests/c/run_asan.sh (CI's AddressSanitizer step)."""
    from sdengine.export.aoti import cache_root

    return cache_root().parent


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_pipeline("sd15", tmp_path_factory.mktemp("tiny-sd15"))


@pytest.fixture(scope="module")
def native(cache_dir, model_dir):
    """sdengine.load(..., backend="native") on the tiny folder: builds (or finds) the engine."""
    return sdengine.load(model_dir, backend="native")


@pytest.fixture(scope="module")
def eager():
    return sdengine.from_diffusers(tiny_pipeline("sd15"), backend="eager")


@pytest.fixture(scope="module")
def aoti(native, model_dir):
    """sdengine.load(..., backend="aoti"): the same engine, driven from the Python loop."""
    return sdengine.load(model_dir, backend="aoti")


@pytest.fixture(scope="module")
def engine_dir(native):
    return native.backend.engine_dir


def _eager_uint8(eager, sampler, schedule, seed, steps=3, guidance=7.5, negative=None, batch_size=1):
    result = eager(PROMPT, negative_prompt=negative, num_inference_steps=steps, guidance_scale=guidance,
                   height=SIZE, width=SIZE, seed=seed, sampler=sampler, schedule=schedule, output_type="np",
                   progress=False, batch_size=batch_size)
    return [(im * 255).round().astype(np.uint8) for im in result.images]


def _compile_c(source: Path, out: Path, extra=()):
    """Compile a C program against sdengine.h and libsdengine only (as an embedding app)."""
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        pytest.fail("no C compiler found (cc, gcc or clang)")
    cmd = [cc, "-std=c11", "-O1", "-Wall", "-Werror", str(source), "-I", str(HEADER_DIR), "-L", str(PACKAGE_DIR),
           "-lsdengine", f"-Wl,-rpath,{PACKAGE_DIR}", "-o", str(out), *extra]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return out


# ---------------------------------------------------------------------------
# Shared tables: tokenizer, sampler names, schedules
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("pad_token", ["<|endoftext|>", "!"])
def test_cpp_tokenizer_ids_equal_python_on_corpus(tmp_path, pad_token):
    from sdengine.tokenizer import CLIPTokenizer
    from test_tokenizer import CORPUS, write_tokenizer_folder

    folder = write_tokenizer_folder(tmp_path / "tok", pad_token)
    python, cpp = CLIPTokenizer.from_folder(folder), _C.Tokenizer(str(folder))
    mismatches = [(p, python.tokens(p), cpp.tokens(p)) for p in CORPUS if python.tokens(p) != cpp.tokens(p)]
    assert not mismatches, f"{len(mismatches)} of {len(CORPUS)} prompts differ, first: {mismatches[0]}"
    assert len(CORPUS) > 50


def test_cpp_tokenizer_reads_tokenizer_json(model_dir):
    """The tiny folder holds only tokenizer.json (what transformers 5 saves)."""
    from sdengine.tokenizer import CLIPTokenizer
    from test_tokenizer import CORPUS

    assert not (model_dir / "tokenizer" / "vocab.json").exists()
    python, cpp = CLIPTokenizer.from_folder(model_dir / "tokenizer"), _C.Tokenizer(str(model_dir / "tokenizer"))
    for prompt in CORPUS[:20]:
        assert cpp.tokens(prompt) == python.tokens(prompt), prompt


def test_sampler_name_table_is_python_table():
    assert _C.name_table("samplers") == list(NAMES["samplers"].items())
    assert _C.name_table("schedules") == list(NAMES["schedules"].items())
    cfg = SchedulerConfig()
    for name in list(NAMES["samplers"]) + ["DPM++ 2M Karras", "Euler a", "k_dpmpp_2m_karras", "euler_karras"]:
        try:
            expected = resolve(name, None, cfg)
        except ValueError:
            continue
        if expected[0] not in ("euler", "euler_a", "ddim", "dpmpp_2m", "pndm"):
            with pytest.raises(ValueError, match="not implemented"):
                _C.parse_sampler(name)
            continue
        sampler, schedule = _C.parse_sampler(name)
        assert (sampler, schedule or "default") == expected, name
    with pytest.raises(ValueError, match="unknown sampler"):
        _C.parse_sampler("warp drive")


SCHEDULER_CONFIGS = {
    "sd15": SchedulerConfig(),
    "sd21-v": SchedulerConfig(sampler="ddim", prediction_type="v_prediction", timestep_spacing="leading"),
    "trailing-karras": SchedulerConfig(sampler="euler", timestep_spacing="trailing", steps_offset=0,
                                       use_karras_sigmas=True, set_alpha_to_one=True),
    "linspace-linear": SchedulerConfig(sampler="dpmpp_2m", timestep_spacing="linspace", beta_schedule="linear",
                                       beta_start=0.0001, beta_end=0.02, final_sigmas_type="sigma_min"),
}


@pytest.mark.parametrize("cfg_name", sorted(SCHEDULER_CONFIGS))
def test_cpp_plans_equal_python_plans(cfg_name):
    cfg = SCHEDULER_CONFIGS[cfg_name]
    cfg_json = json.dumps({**dict(cfg.extra), **{f: getattr(cfg, f) for f in cfg.__dataclass_fields__
                                                  if f not in ("extra", "sampler")}})
    checked = 0
    for sampler in ("euler", "euler_a", "ddim", "dpmpp_2m", "pndm"):
        for schedule in ("default", "normal", "karras", "exponential", "sgm_uniform", "simple", "ddim_uniform"):
            for steps, strength in ((2, 1.0), (7, 1.0), (30, 1.0), (7, 0.6), (30, 0.35), (2, 0.3)):
                try:
                    plan = make_plan(sampler, schedule, steps, cfg, strength=strength)
                except ValueError:
                    with pytest.raises(ValueError):
                        _C.plan(sampler, schedule, steps, cfg_json, strength)
                    continue
                ours = _C.plan(sampler, schedule, steps, cfg_json, strength)
                where = f"{sampler}/{schedule}/{steps}/strength {strength}"
                assert ours["start"] == plan.start, where
                np.testing.assert_allclose(ours["timesteps"], plan.timesteps.numpy(), rtol=1e-6, atol=1e-4, err_msg=where)
                if plan.is_sigma_sampler:
                    np.testing.assert_allclose(ours["sigmas"], plan.sigmas.numpy(), rtol=1e-6, err_msg=where)
                    assert ours["init_noise_sigma"] == pytest.approx(plan.init_noise_sigma, rel=1e-6), where
                elif sampler == "ddim":
                    np.testing.assert_array_equal(ours["prev_timesteps"], plan.prev_timesteps.numpy(), err_msg=where)
                checked += 1
    assert checked > 100


# ---------------------------------------------------------------------------
# Images: native vs the eager Python pipeline
# ---------------------------------------------------------------------------

def test_one_engine_serves_other_checkpoints(engine_dir, tmp_path):
    """The packages hold no weights: a checkpoint with other weights, read from its folder by
    the C++ runtime, runs on the same engine and matches the eager pipeline on those weights."""
    other = save_tiny_pipeline("sd15", tmp_path / "other", seed=1)
    model = _C.Model(str(other), str(engine_dir))
    data, width, height, seed = model.generate(PROMPT, None, SIZE, SIZE, 3, 7.5, 5, 1, "ddim", None, 0.0, None)[0]
    ours = np.frombuffer(data, dtype=np.uint8).reshape(height, width, 3)
    ref = _eager_uint8(sdengine.from_diffusers(tiny_pipeline("sd15", seed=1)), "ddim", None, seed=5)[0]
    assert (width, height, seed) == (SIZE, SIZE, 5)
    assert np.abs(ours.astype(int) - ref.astype(int)).max() <= 2


def assert_cpp_loop_matches_eager(native, eager, sampler, schedule):
    """Two images (seeds 7 and 8) of the whole request in C++ within 2/255 of the eager pipeline."""
    ours = native.backend.generate(native.tokenizer, PROMPT, "blurry", width=SIZE, height=SIZE, steps=3, seed=7,
                                   sampler=sampler, schedule=schedule, batch_size=2)
    ref = _eager_uint8(eager, sampler, schedule, seed=7, negative="blurry", batch_size=2)
    for i in range(2):
        diff = np.abs(ours[i].astype(int) - ref[i].astype(int)).max()
        assert diff <= 2, f"image {i}: max difference {diff}/255"
    assert not np.array_equal(ours[0], ours[1]), "seed + 1 gave the same image"


@pytest.mark.parametrize("sampler,schedule", NATIVE_SAMPLERS)
def test_cpp_loop_matches_eager_pipeline(native, eager, sampler, schedule):
    """The whole request in C++ (tokenizer, noise, loop, decode) from Python-loaded weights."""
    assert_cpp_loop_matches_eager(native, eager, sampler, schedule)


def test_engine_runs_any_latent_size_in_its_steps(aoti):
    """Batch, height and width are dynamic: non-square latents of any multiple of the UNet's
    downsampling run through the compiled UNet and decoder as through the eager ones."""
    gen = torch.Generator().manual_seed(0)
    for batch, h, w in ((2, 6, 10), (1, 2, 4), (3, 4, 2)):
        x = torch.randn(batch, aoti.config.unet.in_channels, h, w, generator=gen)
        t = torch.full((batch,), 321.0)
        context = torch.randn(batch, 77, aoti.config.unet.cross_attention_dim, generator=gen)
        with torch.inference_mode():
            ref = aoti.backend.unet(x, t[0], context)
            ref_image = aoti.backend.vae.decode(x)
        torch.testing.assert_close(aoti.backend.denoise(x, t, context), ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(aoti.backend.decode(x), ref_image, rtol=1e-4, atol=1e-4)


def _init_image(seed=0):
    """A smooth random RGB image, uint8 (SIZE, SIZE, 3)."""
    gen = torch.Generator().manual_seed(seed)
    small = torch.rand(1, 3, 4, 4, generator=gen)
    image = torch.nn.functional.interpolate(small, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    return (image[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()


@pytest.mark.parametrize("sampler,strength", [("euler_a", 0.6), ("ddim", 0.5), ("dpmpp_2m", 0.75), ("pndm", 0.6)])
def test_cpp_img2img_matches_eager_pipeline(native, eager, sampler, strength):
    """img2img in C++: the compiled VAE encoder, a posterior sample per image seed drawn before
    the noise, and the schedule's tail from `strength`; same images as the eager pipeline."""
    init = _init_image()
    ours = native.backend.generate(native.tokenizer, PROMPT, "blurry", steps=4, seed=13, sampler=sampler,
                                   batch_size=2, init_image=init, strength=strength)
    ref = eager(PROMPT, negative_prompt="blurry", init_image=init, strength=strength, num_inference_steps=4,
                seed=13, sampler=sampler, batch_size=2, output_type="np", progress=False).images
    for i in range(2):
        diff = np.abs(ours[i].astype(int) - (ref[i] * 255).round().astype(int)).max()
        assert diff <= 2, f"image {i}: max difference {diff}/255"
    txt2img = native.backend.generate(native.tokenizer, PROMPT, "blurry", width=SIZE, height=SIZE, steps=4, seed=13,
                                      sampler=sampler)[0]
    assert np.abs(ours[0].astype(int) - txt2img.astype(int)).max() > 2, "init_image made no difference"
    calls = []
    native.backend.generate(native.tokenizer, PROMPT, steps=10, sampler="euler", init_image=init, strength=0.3,
                            callback=lambda step, total: calls.append(total))
    assert calls == [3, 3, 3], "strength 0.3 of 10 steps runs 3"
    with pytest.raises(ValueError, match="init_image is 16x16 but the request is 24x16"):
        native.backend.generate(native.tokenizer, PROMPT, width=24, steps=2, init_image=init)


def test_aoti_step_path_img2img_uses_compiled_encoder(aoti, eager):
    init = _init_image(1)
    images = torch.from_numpy(init).permute(2, 0, 1)[None].float() / 255 * 2 - 1
    mean, logvar = aoti.backend.encode_image(images)
    with torch.inference_mode():
        ref_mean, ref_logvar = aoti.backend.vae.encode(images)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logvar, ref_logvar, rtol=1e-4, atol=1e-4)
    ours = aoti(PROMPT, init_image=init, strength=0.7, num_inference_steps=3, seed=4, sampler="euler",
                  output_type="np", progress=False).images[0]
    ref = eager(PROMPT, init_image=init, strength=0.7, num_inference_steps=3, seed=4, sampler="euler",
                output_type="np", progress=False).images[0]
    assert np.abs((ours - ref) * 255).max() <= 2


def test_aoti_step_path_matches_eager(aoti, eager):
    """The pipeline driving the compiled packages step by step (the backend interface)."""
    assert aoti.backend.name == "aoti" and not aoti.backend.runs_whole_requests
    ours = aoti(PROMPT, num_inference_steps=3, height=SIZE, width=SIZE, seed=3, sampler="dpmpp_2m",
                  output_type="np", progress=False).images[0]
    ref = _eager_uint8(eager, "dpmpp_2m", None, seed=3)[0]
    assert np.abs((ours * 255).round().astype(int) - ref.astype(int)).max() <= 2


def test_native_loras_merge_into_the_engine_weights_and_embeddings(native, aoti, model_dir, tmp_path):
    """A LoRA merged in place reaches the C++ loop (its captured steps included) and the compiled
    packages of the Python loop with no reload; set_loras([]) restores the engine's weights bit
    for bit. A textual-inversion token runs the eager text encoders on aoti (the engine's token
    table is the checkpoint's); native, whose C++ tokenizer does not know it, refuses it."""
    import copy

    from lora_files import embedding_vectors, kohya_lora

    path = kohya_lora(tiny_pipeline("sd15"), tmp_path / "k.safetensors", rank=4, alpha=2.0, locon=True)
    reference = sdengine.from_diffusers(copy.deepcopy(tiny_pipeline("sd15")))
    reference.set_loras([(path, 0.8)])
    before = {k: v.clone() for k, v in native.backend._weights.items()}
    run = dict(num_inference_steps=3, height=SIZE, width=SIZE, seed=3, sampler="euler", output_type="np",
               progress=False)
    base = native(PROMPT, **run).images[0]
    native.set_loras([(path, 0.8)])
    try:
        ref = reference(PROMPT, **run).images[0]
        step = native(PROMPT, **run).images[0]
        assert np.abs((step - ref) * 255).max() <= 2 and np.abs((step - base) * 255).max() > 10
        cpp = native.backend.generate(native.tokenizer, PROMPT, width=SIZE, height=SIZE, steps=3, seed=3,
                                      sampler="euler")[0]
        assert np.abs(cpp.astype(int) - (ref * 255).round().astype(int)).max() <= 2
    finally:
        native.set_loras([])
    changed = [k for k in before if not torch.equal(before[k], native.backend._weights[k])]
    assert not changed, changed[:3]
    aoti.set_loras([(path, 0.8)])
    try:
        assert np.abs((aoti(PROMPT, **run).images[0] - ref) * 255).max() <= 2
    finally:
        aoti.set_loras([])

    fresh = sdengine.load(model_dir, backend="aoti")
    embedding = tmp_path / "tinycat.safetensors"
    from safetensors.torch import save_file

    save_file({"emb_params": embedding_vectors(32, 2)}, str(embedding))
    fresh.load_embedding(embedding)
    reference.set_loras([])
    reference.load_embedding(embedding)
    prompt = "a photo of tinycat"
    assert np.abs((fresh(prompt, **run).images[0] - reference(prompt, **run).images[0]) * 255).max() <= 2
    cpp = sdengine.load(model_dir, backend="native")
    cpp.load_embedding(embedding)
    with pytest.raises(ValueError, match="(?s)textual-inversion tokens.*backend='aoti'"):
        cpp(prompt, **run)
    assert np.abs((cpp(PROMPT, **run).images[0] - base) * 255).max() <= 2  # other prompts still run


def test_cpp_loop_without_guidance_and_cancel(native, eager):
    ours = native.backend.generate(native.tokenizer, PROMPT, width=SIZE, height=SIZE, steps=2, seed=11,
                                   sampler="euler", guidance_scale=1.0)[0]
    ref = _eager_uint8(eager, "euler", None, seed=11, steps=2, guidance=1.0)[0]
    assert np.abs(ours.astype(int) - ref.astype(int)).max() <= 2
    steps_seen = []
    with pytest.raises(_C.Cancelled, match="step 2"):
        native.backend.generate(native.tokenizer, PROMPT, width=SIZE, height=SIZE, steps=4, sampler="euler",
                                callback=lambda step, total: steps_seen.append(step) or step < 2)
    assert steps_seen == [1, 2]
    with pytest.raises(ValueError, match="multiple of 8"):
        native.backend.generate(native.tokenizer, PROMPT, width=12, height=SIZE, steps=2, sampler="euler")
    calls = []  # PLMS evaluates the model steps + 1 times; progress counts evaluations
    native.backend.generate(native.tokenizer, PROMPT, width=SIZE, height=SIZE, steps=3, sampler="PLMS",
                            callback=lambda step, total: calls.append((step, total)))
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]


class _AbortsWhenUnpickled:
    """A stand-in model config whose unpickling in the compiler's child process aborts it."""

    name = "crashy"

    def __reduce__(self):
        return os.abort, ()


def test_compiler_crash_is_an_error_naming_the_network(tmp_path):
    """Each network compiles in a child process: a crash there (torch 2.11 segfaulted compiling
    a CUDA engine) is a RuntimeError naming the network and the signal, with the child's output."""
    from sdengine.export import aoti

    with pytest.raises(RuntimeError, match="crashy: compiling the unet network for cpu fp32 was killed by SIGABRT"):
        aoti._compile_in_child(_AbortsWhenUnpickled(), "unet", torch.float32, torch.device("cpu"), tmp_path)
    with pytest.raises(RuntimeError, match="(?s)failed \\(exit status 1\\).*unknown network 'nonesuch'"):
        aoti._compile_in_child(tiny_config("sd15"), "nonesuch", torch.float32, torch.device("cpu"), tmp_path)
    assert not list(tmp_path.iterdir()), "the spec files are removed"


def test_failed_engine_build_leaves_nothing_behind(tmp_path, monkeypatch):
    from sdengine.export import aoti

    def fail(config, name, dtype, device, folder, settings=None, timeout=None):
        (folder / f"{name}.pt2").write_bytes(b"half")
        raise RuntimeError(f"compiling the {name} network was killed by SIGSEGV")

    monkeypatch.setattr(aoti, "_compile_in_child", fail)
    with pytest.raises(RuntimeError, match="SIGSEGV"):
        aoti.build_engine(tiny_config("sd15"), tmp_path / "engine", dtype=torch.float32, device="cpu",
                          progress=False)
    assert not list(tmp_path.iterdir()), "no engine and no temporary folder is left"


def _reuse_cached(engine_dir, names, real):
    """A _compile_in_child that copies the networks `names` from the cached engine instead of
    compiling them (the retry tests compile only the networks they crash)."""
    meta = json.loads((Path(engine_dir) / "engine.json").read_text())
    from safetensors.torch import load_file

    buffers = load_file(str(Path(engine_dir) / "buffers.safetensors")) \
        if (Path(engine_dir) / "buffers.safetensors").is_file() else {}

    def compile_or_reuse(config, name, dtype, device, folder, *args, **kwargs):
        if name not in names:
            return real(config, name, dtype, device, folder, *args, **kwargs)
        shutil.copy(Path(engine_dir) / f"{name}.pt2", folder / f"{name}.pt2")
        return {"constants": meta["networks"][name]["constants"], "compile_s": 0.0, "static_shape": None,
                "buffers": {k.split("/", 1)[1]: v for k, v in buffers.items() if k.startswith(f"{name}/")}}
    return compile_or_reuse


def test_engine_builds_through_retries_when_compiles_crash(native, eager, model_dir, engine_dir, tmp_path,
                                                           monkeypatch):
    """A network whose compile child dies (an injected os.abort, as torch 2.11's segfault) is
    compiled again with safer settings: the text encoder twice (weights in the package, then
    static shapes: batch 1, run row by row), the VAE decoder once (weights in the package).
    engine.json records every attempt, and the engine gives the eager pipeline's images from
    C++ and from the Python loop."""
    from sdengine.backends.aoti import AOTIBackend
    from sdengine.export import aoti as export

    monkeypatch.setattr(export, "_compile_in_child", _reuse_cached(engine_dir, ("unet", "vae_encoder"),
                                                                   export._compile_in_child))
    monkeypatch.setenv(export.INJECT_CRASH_ENV,
                       "text_encoder:dynamic,text_encoder:constants-in-so,vae_decoder:dynamic")
    built = export.build_engine(native.config, tmp_path / "engine", dtype=torch.float32, device="cpu",
                                progress=False)
    meta = json.loads((built / "engine.json").read_text())
    text, decoder = meta["networks"]["text_encoder"], meta["networks"]["vae_decoder"]
    assert [(a["settings"], a["outcome"]) for a in text["attempts"]] == [
        ("dynamic", "was killed by SIGABRT"), ("constants-in-so", "was killed by SIGABRT"), ("static", "ok")]
    assert text["settings"]["static"] and text["static_shape"] == [1, 77]
    assert [(a["settings"], a["outcome"]) for a in decoder["attempts"]] == [
        ("dynamic", "was killed by SIGABRT"), ("constants-in-so", "ok")]
    assert decoder["settings"]["constants_in_so"] and decoder["static_shape"] is None
    assert meta["build_s"] > 0
    # The C++ loop: the text encoder at batch 2 (prompt and negative of two images) row by row.
    ours = _C.Model(str(model_dir), str(built)).generate(PROMPT, "blurry", SIZE, SIZE, 3, 7.5, 7, 2, "euler_a",
                                                          None, 0.0, None)
    ref = _eager_uint8(eager, "euler_a", None, seed=7, negative="blurry", batch_size=2)
    for (data, w, h, _), expected in zip(ours, ref):
        image = np.frombuffer(data, dtype=np.uint8).reshape(h, w, 3)
        assert np.abs(image.astype(int) - expected.astype(int)).max() <= 2
    # The Python loop on the same engine (aoti): the static text encoder row by row there too.
    loaded = sdengine.load(model_dir, backend="eager")
    backend = AOTIBackend(loaded.config, loaded.backend.text_encoder, loaded.backend.unet, loaded.backend.vae,
                          engine_dir=built)
    ids = loaded.tokenizer([PROMPT, "blurry", ""])
    context, _ = backend.encode_text(ids)
    with torch.inference_mode():
        expected, _ = loaded.backend.text_encoder(ids)
    torch.testing.assert_close(context, expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="the text_encoder network of this engine runs inputs of shape"):
        backend.encode_text(torch.zeros(1, 70, dtype=torch.long))


def test_engine_build_that_cannot_succeed_names_network_and_attempts(native, tmp_path, monkeypatch):
    from sdengine.export import aoti as export

    monkeypatch.setenv(export.INJECT_CRASH_ENV,
                       "text_encoder:dynamic,text_encoder:constants-in-so,text_encoder:static")
    with pytest.raises(RuntimeError, match="the text_encoder network did not compile for cpu fp32 with any settings "
                                           r"\(dynamic: was killed by SIGABRT; constants-in-so: was killed by "
                                           r"SIGABRT; static: was killed by SIGABRT\)"):
        export.build_engine(native.config, tmp_path / "engine", dtype=torch.float32, device="cpu", progress=False)
    assert not list(tmp_path.iterdir()), "nothing half-built is left"


def test_export_cli_registers_aoti(tmp_path):
    from sdengine.cli import build_parser, main

    args = build_parser().parse_args(["export", "aoti", str(tmp_path / "missing"), "--out", str(tmp_path / "e")])
    assert args.func.__module__ == "sdengine.export.aoti" and args.out == str(tmp_path / "e")
    assert main(["export", "aoti", str(tmp_path / "missing")]) == 2  # a clear error, no traceback


# ---------------------------------------------------------------------------
# The C API, from C
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def capi_test(tmp_path_factory):
    return _compile_c(ROOT / "tests" / "c" / "test_capi.c", tmp_path_factory.mktemp("c") / "sde_capi_test",
                      extra=["-pthread"])


def _run(args, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout, env=env)
    return proc.returncode, proc.stdout + proc.stderr


def test_c_example_matches_eager_pipeline(tmp_path, model_dir, engine_dir, eager):
    exe = _compile_c(ROOT / "examples" / "c" / "generate.c", tmp_path / "sde_generate")
    out = tmp_path / "out.ppm"
    rc, log = _run([exe, model_dir, out, "-e", engine_dir, "-s", "Euler a", "-t", "3", "-S", "42",
                    "-W", SIZE, "-H", SIZE, "-p", PROMPT])
    assert rc == 0, log
    data = out.read_bytes()
    assert data.startswith(f"P6\n{SIZE} {SIZE}\n255\n".encode())
    image = np.frombuffer(data[-SIZE * SIZE * 3:], dtype=np.uint8).reshape(SIZE, SIZE, 3)
    ref = _eager_uint8(eager, "euler_a", None, seed=42)[0]
    assert np.abs(image.astype(int) - ref.astype(int)).max() <= 2


def test_c_example_finds_engine_in_cache(tmp_path, model_dir, engine_dir, cache_dir):
    """Without -e the runtime searches $SDE_CACHE_DIR/aoti for an engine that fits the weights."""
    exe = _compile_c(ROOT / "examples" / "c" / "generate.c", tmp_path / "sde_generate")
    rc, log = _run([exe, model_dir, tmp_path / "out.ppm", "-s", "ddim", "-t", "2", "-W", SIZE, "-H", SIZE])
    assert rc == 0, log
    rc, log = _run(["env", f"SDE_CACHE_DIR={tmp_path / 'empty'}", exe, model_dir, tmp_path / "out.ppm"])
    assert rc == 1 and "no compiled engine" in log, log


def _corrupt_copy(model_dir: Path, dest: Path) -> Path:
    shutil.copytree(model_dir, dest)
    weights = dest / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:20] = b"{not json!!!"  # the header's opening bytes
    weights.write_bytes(bytes(data))
    return dest


@pytest.fixture(scope="module")
def lora_test(tmp_path_factory):
    """tests/c/test_lora.c compiled, and its inputs: two LoRAs (kohya with LoCon, PEFT) and an embedding."""
    from safetensors.torch import save_file

    from lora_files import embedding_vectors, kohya_lora, peft_lora

    folder = tmp_path_factory.mktemp("lora-c")
    files = {"a": kohya_lora(tiny_pipeline("sd15"), folder / "a.safetensors", rank=4, alpha=2.0, locon=True),
             "b": peft_lora(tiny_pipeline("sd15"), folder / "b", rank=4, alpha=8.0),
             "emb": folder / "emb.safetensors"}
    save_file({"emb_params": embedding_vectors(32, 2)}, str(files["emb"]))
    files["exe"] = _compile_c(ROOT / "tests" / "c" / "test_lora.c", folder / "sde_lora_test", extra=("-lpthread",))
    return files


def test_capi_set_loras_and_load_embedding_match_python(lora_test, model_dir, engine_dir, tmp_path):
    """sde_model_set_loras / sde_model_load_embedding against the Python pipeline with the same
    LoRAs and embedding (within 2/255); count 0 restores the base image byte for byte; bad input
    changes nothing (the C program checks those itself)."""
    import copy

    rc, log = _run([lora_test["exe"], "images", model_dir, engine_dir, lora_test["a"], lora_test["b"],
                    lora_test["emb"], tmp_path])
    assert rc == 0, log
    assert "FAIL" not in log and log.count("ok ") >= 15, log

    def image(name):
        return np.frombuffer((tmp_path / f"{name}.rgb").read_bytes(), dtype=np.uint8).reshape(SIZE, SIZE, 3)

    python = sdengine.from_diffusers(copy.deepcopy(tiny_pipeline("sd15")))
    run = dict(num_inference_steps=3, height=SIZE, width=SIZE, seed=3, sampler="euler", output_type="np",
               progress=False)
    cases = {"base": ([], PROMPT), "a": ([(lora_test["a"], 0.8)], PROMPT),
             "ab": ([(lora_test["a"], 0.7), (lora_test["b"], 0.4)], PROMPT)}
    for name, (loras, prompt) in cases.items():
        python.set_loras(loras)
        ref = (python(prompt, **run).images[0] * 255).round().astype(int)
        assert np.abs(image(name).astype(int) - ref).max() <= 2, name
    python.set_loras([])
    python.load_embedding(lora_test["emb"], token="<tinycat>")
    ref = (python("a photo of <tinycat>", **run).images[0] * 255).round().astype(int)
    assert np.abs(image("emb").astype(int) - ref).max() <= 2
    assert np.abs(image("emb").astype(int) - image("base").astype(int)).max() > 2


def test_capi_lora_swaps_while_threads_generate(lora_test, model_dir, engine_dir):
    """4 threads generate while a fifth merges 20 sets in turn: no crash, and every image is the
    serial image of a whole set (tests/c/run_asan.sh runs the same under AddressSanitizer)."""
    rc, log = _run([lora_test["exe"], "threads", model_dir, engine_dir, lora_test["a"], lora_test["b"], 4, 20])
    assert rc == 0 and "FAIL" not in log, log


def test_capi_bad_arguments(capi_test, model_dir, engine_dir, tmp_path):
    corrupt = _corrupt_copy(model_dir, tmp_path / "corrupt")
    rc, log = _run([capi_test, "args", model_dir, engine_dir, corrupt])
    assert rc == 0 and "FAIL" not in log, log
    assert log.count("ok ") >= 30


def test_capi_threads_share_one_model(capi_test, model_dir, engine_dir):
    """8 threads x 10 generations on ONE model, identical to the same requests run serially."""
    rc, log = _run([capi_test, "threads", model_dir, engine_dir, 8, 10])
    assert rc == 0 and "ok threads_equal_serial" in log, log


def test_capi_no_memory_growth(capi_test, model_dir, engine_dir):
    """200 sequential generations: RSS within 2% of its value after warm-up."""
    rc, log = _run([capi_test, "rss", model_dir, engine_dir, 200])
    assert rc == 0 and "ok rss_stable" in log, log


# ---------------------------------------------------------------------------
# Graphs: each (batch, latent size, sampler) captured once per instance and replayed (graphs.h).
# On the CPU a capture runs its call and keeps it, a replay runs it again: the cache logic of
# the CUDA graphs, counted by sde_model_get_stats.
# ---------------------------------------------------------------------------

def _gen(model, sampler="euler", seed=1, size=(SIZE, SIZE), guidance=7.5, batch=1, prompt=PROMPT, progress=None):
    width, height = size
    out = model.generate(prompt, "blurry", width, height, 3, guidance, seed, batch, sampler, None, 0.0, progress)
    return [np.frombuffer(data, dtype=np.uint8).reshape(h, w, 3) for data, w, h, _ in out]


def test_step_graph_captured_once_per_shape(model_dir, engine_dir, eager):
    model = _C.Model(str(model_dir), str(engine_dir), max_concurrency=1)
    assert model.stats()["cuda_graphs"] is False and model.stats()["instances"] == 1
    _gen(model)
    step, text, decode = (model.stats()[k] for k in ("step", "text", "decode"))
    assert (step["captures"], step["replays"], step["cached"]) == (1, 2, 1)  # 3 steps: 1 capture + 2 replays
    assert (text["captures"], text["replays"]) == (1, 1)  # prompt and negative prompt: batch 1 twice
    assert (decode["captures"], decode["replays"]) == (1, 0)
    # Same shape, another prompt, seed and guidance scale: replays only, and the right image (what
    # changes per request goes through the graph's buffers, not into the graph).
    ours = _gen(model, seed=9, guidance=4.0, prompt="a red square")[0]
    ref = eager("a red square", negative_prompt="blurry", num_inference_steps=3, guidance_scale=4.0, height=SIZE,
                width=SIZE, seed=9, sampler="euler", output_type="np", progress=False).images[0]
    assert np.abs(ours.astype(int) - (ref * 255).round().astype(int)).max() <= 2
    step = model.stats()["step"]
    assert (step["captures"], step["replays"]) == (1, 5)
    # A new sampler, latent size or batch is a new shape: one more capture each.
    _gen(model, sampler="euler_a")
    _gen(model, size=(SIZE + 8, SIZE))
    _gen(model, batch=2)
    stats = model.stats()
    assert (stats["step"]["captures"], stats["step"]["cached"]) == (4, 4)
    assert (stats["text"]["captures"], stats["decode"]["captures"]) == (2, 3)  # batch 2; 24x16, batch 2
    assert stats["step"]["evicted"] == 0 and stats["step"]["direct"] == 0


def test_graph_cache_is_bounded(model_dir, engine_dir):
    """max_graphs=2: a third shape drops the least recently used; coming back recaptures it,
    with the same image as before."""
    model = _C.Model(str(model_dir), str(engine_dir), max_concurrency=1, max_graphs=2)
    first = _gen(model, size=(SIZE, SIZE))[0]
    _gen(model, size=(SIZE + 8, SIZE))
    _gen(model, size=(SIZE, SIZE + 8))
    step = model.stats()["step"]
    assert (step["captures"], step["cached"], step["evicted"]) == (3, 2, 1)
    again = _gen(model, size=(SIZE, SIZE))[0]
    step = model.stats()["step"]
    assert (step["captures"], step["cached"], step["evicted"]) == (4, 2, 2)
    assert np.array_equal(again, first)


def test_graphs_are_not_shared_by_concurrent_requests(model_dir, engine_dir):
    """Two requests of one shape at the same time (both wait for the other inside their first
    step's callback) run on two instances, each capturing its own graph; the images equal
    those of the same requests run one after the other."""
    model = _C.Model(str(model_dir), str(engine_dir), max_concurrency=2)
    meet = threading.Barrier(2, timeout=120)
    results, errors = {}, []

    def request(seed):
        try:
            results[seed] = _gen(model, seed=seed, progress=lambda step, total: step != 1 or meet.wait() >= 0)[0]
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=request, args=(seed,)) for seed in (3, 4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    stats = model.stats()
    assert stats["instances"] == 2 and stats["step"]["captures"] == 2, stats  # one graph per instance
    serial = _C.Model(str(model_dir), str(engine_dir), max_concurrency=1)
    for seed in (3, 4):
        assert np.array_equal(results[seed], _gen(serial, seed=seed)[0])
    assert not np.array_equal(results[3], results[4])


def test_graphs_off_runs_directly_with_the_same_images(model_dir, engine_dir):
    graphed = _C.Model(str(model_dir), str(engine_dir), max_concurrency=1)
    direct = _C.Model(str(model_dir), str(engine_dir), max_concurrency=1, max_graphs=-1)
    for sampler in ("dpmpp_2m", "pndm"):
        assert np.array_equal(_gen(direct, sampler)[0], _gen(graphed, sampler)[0])
    step = direct.stats()["step"]
    assert (step["captures"], step["replays"], step["direct"]) == (0, 0, 7)  # 3 dpmpp_2m + 4 pndm evaluations


# ---------------------------------------------------------------------------
# Single-file checkpoints (LDM / A1111 layout), read in C++
# ---------------------------------------------------------------------------

def _native_image(model, sampler="euler", seed=5, steps=3):
    data, width, height, _ = model.generate(PROMPT, None, SIZE, SIZE, steps, 7.5, seed, 1, sampler, None, 0.0, None)[0]
    return np.frombuffer(data, dtype=np.uint8).reshape(height, width, 3)


@pytest.fixture(scope="module")
def sd15_file(tmp_path_factory):
    """The tiny sd15 pipeline (the weights of model_dir) as an LDM single file, written by
    tests/ldm_keys.py (independent of sdengine.ldm_layout), in fp16 as most published files are."""
    from ldm_keys import save_ldm_single_file

    return save_ldm_single_file("sd15", tmp_path_factory.mktemp("single") / "tiny-sd15.safetensors",
                                dtype=torch.float16)


def test_cpp_reads_single_file(sd15_file, model_dir, engine_dir, eager):
    """An A1111-layout file, read and mapped onto the engine in C++, gives the image of the
    same weights read from the diffusers folder (fp16 file -> fp32 engine: within 2/255)."""
    tokenizer = str(model_dir / "tokenizer")
    from_file = _native_image(_C.Model(str(sd15_file), str(engine_dir), tokenizer_dir=tokenizer), "euler_a")
    from_folder = _native_image(_C.Model(str(model_dir), str(engine_dir)), "euler_a")
    assert np.abs(from_file.astype(int) - from_folder.astype(int)).max() <= 2
    ref = _eager_uint8(eager, "euler_a", None, seed=5)[0]
    assert np.abs(from_file.astype(int) - ref.astype(int)).max() <= 2
    # Without engine_dir the runtime finds the engine in the cache by the file's keys and
    # shapes; without tokenizer_dir it uses the engine's CLIP tokenizer (the tiny model's
    # vocabulary is CLIP's).
    found = _native_image(_C.Model(str(sd15_file)), "euler_a")
    assert np.array_equal(found, from_file)


def test_cpp_reads_oldest_sd1_layout(sd15_file, model_dir, engine_dir, tmp_path):
    """The first SD1 files have no `text_model.` level under cond_stage_model.transformer."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(sd15_file))
    old = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v
           for k, v in state.items()}
    assert old.keys() != state.keys()
    save_file(old, str(tmp_path / "old.safetensors"))
    tokenizer = str(model_dir / "tokenizer")
    ours = _native_image(_C.Model(str(tmp_path / "old.safetensors"), str(engine_dir), tokenizer_dir=tokenizer))
    ref = _native_image(_C.Model(str(sd15_file), str(engine_dir), tokenizer_dir=tokenizer))
    assert np.array_equal(ours, ref)


def test_cpp_single_file_errors(sd15_file, model_dir, engine_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    tokenizer = str(model_dir / "tokenizer")
    state = load_file(str(sd15_file))
    missing = "model.diffusion_model.out.2.weight"
    del state[missing]
    save_file(state, str(tmp_path / "no-out.safetensors"))
    with pytest.raises(ValueError, match=f"no-out.safetensors does not fit.*no '{missing}'"):
        _C.Model(str(tmp_path / "no-out.safetensors"), str(engine_dir), tokenizer_dir=tokenizer)
    with pytest.raises(ValueError, match="no compiled engine .* fits .*no-out.safetensors"):
        _C.Model(str(tmp_path / "no-out.safetensors"), tokenizer_dir=tokenizer)
    # A tokenizer whose ids overflow the text encoder's embedding is refused.
    big = tmp_path / "big-vocab"
    big.mkdir()
    (big / "vocab.json").write_text(json.dumps({"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 60000}))
    (big / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(ValueError, match="ids up to 60000 but the text_encoder embeds 49408"):
        _C.Model(str(sd15_file), str(engine_dir), tokenizer_dir=str(big))
    # An engine whose text encoder does not use CLIP's vocabulary carries no tokenizer: the
    # caller must give one.
    no_tokenizer = tmp_path / "engine-without-tokenizer"
    no_tokenizer.mkdir()
    for item in Path(engine_dir).iterdir():
        if item.suffix in (".pt2", ".safetensors"):
            (no_tokenizer / item.name).symlink_to(item)
    meta = json.loads((Path(engine_dir) / "engine.json").read_text())
    del meta["single_file"]["tokenizer"]
    (no_tokenizer / "engine.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="set tokenizer_dir"):
        _C.Model(str(sd15_file), str(no_tokenizer))
    _native_image(_C.Model(str(sd15_file), str(no_tokenizer), tokenizer_dir=tokenizer))
    with pytest.raises(ValueError, match="prediction_type"):
        _C.Model(str(sd15_file), str(engine_dir), tokenizer_dir=tokenizer, prediction_type="x0")
    (tmp_path / "model.ckpt").write_bytes(b"not read")
    with pytest.raises(ValueError, match=r"\.ckpt"):
        _C.Model(str(tmp_path / "model.ckpt"), str(engine_dir))
    with pytest.raises(OSError, match="model not found"):
        _C.Model(str(tmp_path / "absent.safetensors"), str(engine_dir))


def test_cpp_reads_sd2_single_file(tmp_path_factory):
    """SD2: OpenCLIP's fused in_proj split into q, k, v, its unused last layer skipped, and
    v-prediction by default (overridable, or set by the header's modelspec.prediction_type).
    Builds the tiny sd21-v engine (one more AOTInductor compile, cached)."""
    from ldm_keys import save_ldm_single_file
    from safetensors.torch import load_file, save_file

    folder = save_tiny_pipeline("sd21-v", tmp_path_factory.mktemp("tiny-sd21"))
    engine = sdengine.load(folder, backend="native").backend.engine_dir
    path = save_ldm_single_file("sd21-v", tmp_path_factory.mktemp("single-sd21") / "tiny-sd21.safetensors")
    tokenizer = str(folder / "tokenizer")
    v_model = _C.Model(str(path), str(engine), tokenizer_dir=tokenizer)
    ours = _native_image(v_model, "ddim")
    ref = _eager_uint8(sdengine.from_diffusers(tiny_pipeline("sd21-v")), "ddim", None, seed=5)[0]
    assert np.abs(ours.astype(int) - ref.astype(int)).max() <= 2
    epsilon = _native_image(_C.Model(str(path), str(engine), tokenizer_dir=tokenizer, prediction_type="epsilon"), "ddim")
    assert np.abs(epsilon.astype(int) - ours.astype(int)).max() > 2, "prediction_type made no difference"
    declared = path.with_name("declared-eps.safetensors")
    save_file(load_file(str(path)), str(declared), metadata={"modelspec.prediction_type": "epsilon"})
    assert np.array_equal(_native_image(_C.Model(str(declared), str(engine), tokenizer_dir=tokenizer), "ddim"), epsilon)


def test_c_example_reads_single_file(tmp_path, sd15_file, eager):
    """The embedding app, given a single file: engine from the cache, tokenizer from the engine."""
    exe = _compile_c(ROOT / "examples" / "c" / "generate.c", tmp_path / "sde_generate")
    out = tmp_path / "out.ppm"
    rc, log = _run([exe, sd15_file, out, "-s", "ddim", "-t", "3", "-S", "9", "-W", SIZE, "-H", SIZE, "-p", PROMPT])
    assert rc == 0, log
    image = np.frombuffer(out.read_bytes()[-SIZE * SIZE * 3:], dtype=np.uint8).reshape(SIZE, SIZE, 3)
    ref = _eager_uint8(eager, "ddim", None, seed=9)[0]
    assert np.abs(image.astype(int) - ref.astype(int)).max() <= 2


def test_c_example_img2img(tmp_path, model_dir, engine_dir, eager):
    """-i INIT.ppm -r STRENGTH: the embedding app's img2img, matching the eager pipeline."""
    exe = _compile_c(ROOT / "examples" / "c" / "generate.c", tmp_path / "sde_generate")
    init = _init_image(2)
    (tmp_path / "init.ppm").write_bytes(f"P6\n{SIZE} {SIZE}\n255\n".encode() + init.tobytes())
    out = tmp_path / "out.ppm"
    rc, log = _run([exe, model_dir, out, "-e", engine_dir, "-s", "dpmpp_2m", "-t", "4", "-S", "3", "-p", PROMPT,
                    "-i", tmp_path / "init.ppm", "-r", "0.5"])
    assert rc == 0, log
    image = np.frombuffer(out.read_bytes()[-SIZE * SIZE * 3:], dtype=np.uint8).reshape(SIZE, SIZE, 3)
    ref = eager(PROMPT, init_image=init, strength=0.5, num_inference_steps=4, seed=3, sampler="dpmpp_2m",
                output_type="np", progress=False).images[0]
    assert np.abs(image.astype(int) - (ref * 255).round().astype(int)).max() <= 2


# ---------------------------------------------------------------------------
# Inpainting (9-channel UNet) in C++
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def inpaint_models(tmp_path_factory):
    """The tiny sd15-inpaint pipeline: native (builds its engine: one more AOTInductor
    compile, cached) and eager on the same weights."""
    folder = save_tiny_pipeline("sd15-inpaint", tmp_path_factory.mktemp("tiny-inpaint"))
    return sdengine.load(folder, backend="native"), sdengine.from_diffusers(tiny_pipeline("sd15-inpaint"))


def _mask():
    """Repaint the right half and a square in the lower left (uint8 (SIZE, SIZE), 255 = repaint)."""
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[:, SIZE // 2:] = 255
    mask[SIZE - 6:, 2:6] = 200
    mask[0, 0] = 127  # below the threshold: kept
    return mask


@pytest.mark.parametrize("sampler,strength", [("euler_a", None), ("ddim", 0.7), ("dpmpp_2m", 1.0)])
def test_cpp_inpainting_matches_eager_pipeline(inpaint_models, sampler, strength):
    native, eager = inpaint_models
    init, mask = _init_image(3), _mask()
    ours = native.backend.generate(native.tokenizer, PROMPT, "blurry", steps=4, seed=21, sampler=sampler, batch_size=2,
                                   init_image=init, mask_image=mask, strength=strength)
    ref = eager(PROMPT, negative_prompt="blurry", init_image=init, mask_image=mask, strength=strength,
                num_inference_steps=4, seed=21, sampler=sampler, batch_size=2, output_type="np", progress=False).images
    for i in range(2):
        diff = np.abs(ours[i].astype(int) - (ref[i] * 255).round().astype(int)).max()
        assert diff <= 2, f"image {i}: max difference {diff}/255"
    other_mask = native.backend.generate(native.tokenizer, PROMPT, "blurry", steps=4, seed=21, sampler=sampler,
                                         init_image=init, mask_image=255 - mask, strength=strength)[0]
    assert np.abs(other_mask.astype(int) - ours[0].astype(int)).max() > 2, "the mask made no difference"


def test_inpainting_model_errors_and_native_pipeline(inpaint_models):
    native, eager = inpaint_models
    with pytest.raises(ValueError, match="inpainting model: give init_image and mask_image"):
        native.backend.generate(native.tokenizer, PROMPT, width=SIZE, height=SIZE, steps=2)
    with pytest.raises(ValueError, match="mask_image size"):
        native.backend.generate(native.tokenizer, PROMPT, steps=2, init_image=_init_image(), mask_image=_mask()[:8])
    init, mask = _init_image(4), _mask()
    ours = native(PROMPT, init_image=init, mask_image=mask, num_inference_steps=3, seed=6, sampler="euler",
                  output_type="np", progress=False).images[0]
    ref = eager(PROMPT, init_image=init, mask_image=mask, num_inference_steps=3, seed=6, sampler="euler",
                output_type="np", progress=False).images[0]
    assert np.abs((ours - ref) * 255).max() <= 2


# ---------------------------------------------------------------------------
# SDXL: two text encoders, pooled text embedding and size conditioning, in C++
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sdxl_models(tmp_path_factory):
    """The tiny SDXL pipeline: its folder, native (builds its engine: one more AOTInductor
    compile, cached) and eager on the same weights."""
    folder = save_tiny_pipeline("sdxl", tmp_path_factory.mktemp("tiny-sdxl"))
    return folder, sdengine.load(folder, backend="native"), sdengine.from_diffusers(tiny_pipeline("sdxl"))


@pytest.mark.parametrize("negative", [None, "blurry"])
def test_cpp_sdxl_matches_eager_pipeline(sdxl_models, negative):
    """No negative prompt: zero conditioning (diffusers' force_zeros_for_empty_prompt)."""
    folder, native, eager = sdxl_models
    ours = native.backend.generate(native.tokenizer, PROMPT, negative, width=SIZE, height=SIZE, steps=3, seed=8,
                                   sampler="euler_a", batch_size=2, tokenizer_2=native.tokenizer_2)
    ref = _eager_uint8(eager, "euler_a", None, seed=8, negative=negative, batch_size=2)
    for i in range(2):
        diff = np.abs(ours[i].astype(int) - ref[i].astype(int)).max()
        assert diff <= 2, f"image {i}: max difference {diff}/255"
    # The C++ runtime reading the diffusers folder itself (text_encoder_2/, tokenizer_2/).
    from_folder = _C.Model(str(folder), str(native.backend.engine_dir))
    data, width, height, _ = from_folder.generate(PROMPT, negative, SIZE, SIZE, 3, 7.5, 8, 1, "euler_a", None, 0.0,
                                                  None)[0]
    image = np.frombuffer(data, dtype=np.uint8).reshape(height, width, 3)
    assert np.abs(image.astype(int) - ref[0].astype(int)).max() <= 2


def test_aoti_sdxl_step_path_and_single_file(sdxl_models, tmp_path):
    from ldm_keys import save_ldm_single_file

    folder, native, eager = sdxl_models
    ours = sdengine.load(folder, backend="aoti")(PROMPT, num_inference_steps=3, height=SIZE, width=SIZE, seed=2, sampler="dpmpp_2m",
                  output_type="np", progress=False).images[0]
    ref = _eager_uint8(eager, "dpmpp_2m", None, seed=2)[0]
    assert np.abs((ours * 255).round().astype(int) - ref.astype(int)).max() <= 2
    # An SDXL single file, read in C++: CLIP-L and OpenCLIP bigG (fused in_proj, projection matrix).
    engine = native.backend.engine_dir
    path = save_ldm_single_file("sdxl", tmp_path / "tiny-sdxl.safetensors")
    model = _C.Model(str(path), str(engine), tokenizer_dir=str(folder / "tokenizer"),
                     tokenizer_2_dir=str(folder / "tokenizer_2"))
    assert np.abs(_native_image(model, "dpmpp_2m", seed=2).astype(int) - ref.astype(int)).max() <= 2
    # The engine carries both SDXL tokenizers for single files; the second pads with "!".
    tokenizer_2 = json.loads((Path(engine) / "tokenizer_2" / "tokenizer_config.json").read_text())
    assert tokenizer_2["pad_token"] == "!" and (Path(engine) / "tokenizer" / "vocab.json").is_file()


# ---------------------------------------------------------------------------
# backend="native": the Pipeline's requests in the C++ loop
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def family_pipelines(tmp_path_factory):
    """(native, eager) pipelines of a tiny family on the same weights, made on first use (the
    engines are those of the other tests, from the cache)."""
    made = {}

    def get(kind):
        if kind not in made:
            folder = save_tiny_pipeline(kind, tmp_path_factory.mktemp(f"family-{kind}"))
            made[kind] = (sdengine.load(folder, backend="native"), sdengine.from_diffusers(tiny_pipeline(kind)))
        return made[kind]
    return get


def _steps_run(native) -> int:
    step = native.backend.stats()["step"]
    return step["captures"] + step["replays"] + step["direct"] + step["failed"]


@pytest.mark.parametrize("kind", ["sd15", "sd21-v", "sd15-inpaint", "sdxl"])
@pytest.mark.parametrize("sampler,schedule", [("euler", None), ("euler_a", None), ("ddim", None),
                                              ("dpmpp_2m", "karras"), ("pndm", None)])
def test_native_pipeline_runs_cpp_loop(family_pipelines, kind, sampler, schedule):
    """sdengine.load(..., backend="native") runs the Pipeline's requests in the C++ loop (its step
    counters move by the number of model evaluations) and gives the eager pipeline's images."""
    native, eager = family_pipelines(kind)
    assert native.backend.name == "native" and native.backend.runs_whole_requests
    with pytest.raises(ValueError, match="runs whole requests in the C\\+\\+ loop"):
        native.backend.denoise(None, None, None)
    extra = dict(init_image=_init_image(5), mask_image=_mask()) if kind == "sd15-inpaint" else \
        dict(height=SIZE, width=SIZE)
    args = dict(negative_prompt="blurry", num_inference_steps=3, seed=7, sampler=sampler, schedule=schedule,
                batch_size=2, output_type="np", progress=False, **extra)
    before = _steps_run(native) if native.backend._native is not None else 0
    ours = native(PROMPT, **args)
    ref = eager(PROMPT, **args)
    assert _steps_run(native) - before == (4 if sampler == "pndm" else 3)
    assert ours.seeds == ref.seeds == [7, 8]
    assert {k: v for k, v in ours.params.items() if k != "model"} == \
        {k: v for k, v in ref.params.items() if k != "model"}
    diff = np.abs(ours.images * 255 - (ref.images * 255).round()).max()
    assert diff <= 2, f"max difference {diff}/255"
    assert np.abs(ours.images[0] - ours.images[1]).max() > 2 / 255, "seed + 1 gave the same image"


def test_native_pipeline_callback_progress_and_cancel(native, eager, capsys):
    """The Python pipeline's callback, progress bar and cancel semantics, from the C++ loop."""
    seen = {"native": [], "eager": []}
    args = dict(num_inference_steps=3, height=SIZE, width=SIZE, seed=4, sampler="dpmpp_2m", output_type="np")
    for name, pipe in (("native", native), ("eager", eager)):
        pipe(PROMPT, progress=False, callback=lambda i, total, x, name=name: seen[name].append((i, total, x.clone())),
             **args)
    assert [(i, total) for i, total, _ in seen["native"]] == [(0, 3), (1, 3), (2, 3)]
    assert [(i, total) for i, total, _ in seen["native"]] == [(i, total) for i, total, _ in seen["eager"]]
    for (_, _, ours), (_, _, ref) in zip(seen["native"], seen["eager"]):  # diffusers' latents after each step
        torch.testing.assert_close(ours, ref.cpu().float(), rtol=1e-3, atol=1e-3)
    capsys.readouterr()
    native(PROMPT, progress=True, **args)
    assert "dpmpp_2m" in capsys.readouterr().err, "no progress bar"
    with pytest.raises(sdengine.GenerationCancelled, match="at step 2"):
        native(PROMPT, progress=False, callback=lambda i, total, x: i < 1, **args)
    with pytest.raises(KeyError, match="from the callback"):
        native(PROMPT, progress=False, callback=lambda i, total, x: (_ for _ in ()).throw(KeyError("from the callback")),
               **args)
    for bad, why in ((dict(clip_skip=1), "clip_skip"), (dict(sampler="heun"), "sampler 'heun'"),
                     (dict(output_type="latent"), "output_type='latent'"),
                     (dict(prompt="a (cat:1.3)", prompt_syntax="a1111"), "A1111 prompt syntax")):
        call = dict(args, progress=False, **bad)
        with pytest.raises(ValueError, match=f"(?s){re.escape(why)}.*backend='aoti'"):
            native(call.pop("prompt", PROMPT), **call)
    with pytest.raises(ValueError, match="leaves no denoising step"):  # strength 0 is a value, as in Python
        native(PROMPT, init_image=_init_image(), strength=0.0, num_inference_steps=3, progress=False)
    # Per-image prompts and seeds (a batching server's request): one C++ request per run of
    # consecutive images, the images of the eager pipeline.
    mixed = dict(args, progress=False, seed=[1, 5], negative_prompt=["", "blurry"])
    ours, ref = native([PROMPT, "a cat"], **mixed).images, eager([PROMPT, "a cat"], **mixed).images
    assert np.abs(ours * 255 - (ref * 255).round()).max() <= 2
    plain = dict(args, progress=False, prompt_syntax="a1111")  # plain text in A1111 syntax runs as is
    assert np.array_equal(native(PROMPT, **plain).images, native(PROMPT, **dict(plain, prompt_syntax=None)).images)


def test_native_decode_for_kept_latents(native, aoti):
    """decode(): latents a callback kept (a server's interrupted request) decoded by the engine's
    decoder from Python, as aoti does."""
    x = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(native.backend.decode(x), aoti.backend.decode(x))
