"""DeepCache in the C++ loop (issue 33 item 5): backend="native" (and backend="aoti", the same
engines from the Python loop) with deepcache= on the DeepCache engine (export/aoti_deepcache.py)
against the eager pipeline, whose DeepCache is checked against
the authors' DeepCacheSDHelper in tests/test_acceleration.py; and the C API's DeepCache from C
(tests/c/test_capi.c)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import sdengine
from support.native import ROOT, cache_dir, compile_c, run_program  # noqa: F401 (a fixture)
from support.tiny import save_tiny_pipeline, tiny_pipeline

_C = pytest.importorskip("sdengine._C")

PROMPT = "a red cat on a blue sofa"
ARGS = dict(negative_prompt="blurry", num_inference_steps=5, seed=7, height=64, width=64, batch_size=2,
            output_type="np", progress=False)


@pytest.fixture(scope="module")
def pipelines(cache_dir, tmp_path_factory):  # noqa: F811
    """(native, eager, model folder, aoti) of a tiny family on the same weights, made on first use."""
    made = {}

    def get(kind):
        if kind not in made:
            folder = save_tiny_pipeline(kind, tmp_path_factory.mktemp(f"deepcache-{kind}"))
            made[kind] = (sdengine.load(folder, backend="native"), sdengine.from_diffusers(tiny_pipeline(kind)), folder,
                          sdengine.load(folder, backend="aoti"))
        return made[kind]
    return get


def _max_diff(ours, ref) -> float:
    return float(np.abs(ours.images * 255 - (ref.images * 255).round()).max())


@pytest.mark.parametrize("kind,samplers", [("sd15", ("euler", "dpmpp_2m", "heun", "pndm")), ("sdxl", ("euler", "dpmpp_2m"))])
def test_deepcache_in_cpp_matches_eager(pipelines, kind, samplers):
    """DeepCache (interval 2, the shallowest branch) in the C++ loop gives the eager pipeline's
    images within 2/255, for one-step, multistep, two-evaluation and PLMS (steps + 1 evaluations) samplers; it changes the
    image (the cached steps ran); one step graph per kind of step; the infotext reads back in C."""
    native, eager, _, aoti = pipelines(kind)
    deepcache = sdengine.DeepCache(interval=2, branch=0)
    for sampler in samplers:
        ref = eager(PROMPT, sampler=sampler, deepcache=deepcache, **ARGS)
        for pipe in (aoti, native):
            ours = pipe(PROMPT, sampler=sampler, deepcache=deepcache, **ARGS)
            assert _max_diff(ours, ref) <= 2, f"{pipe.backend.name}, {kind} {sampler}: {_max_diff(ours, ref)}/255"
        assert {k: v for k, v in ours.params.items() if k != "model"} == \
            {k: v for k, v in ref.params.items() if k != "model"}
        plain = native(PROMPT, sampler=sampler, **ARGS)
        assert _max_diff(plain, ours) > 2, f"{kind} {sampler}: DeepCache made no difference"
    read = _C.infotext_params(ours.infotext(0))
    assert (read["deepcache_interval"], read["deepcache_branch"]) == (2, 0)
    # one graph per (shape, kind): the plain step, DeepCache's full and cached steps
    assert native.backend.stats()["step"]["captures"] == 3


def test_deepcache_branches_and_intervals_match_eager(pipelines):
    """A deeper branch (its own engine) and interval 3 over 7 steps, with img2img."""
    from PIL import Image

    native, eager, _, aoti = pipelines("sd15")
    init = Image.fromarray((np.indices((64, 64)).sum(0) * 2 % 256).astype(np.uint8)).convert("RGB")
    for deepcache, extra in ((sdengine.DeepCache(interval=3, branch=1), {}),
                             (sdengine.DeepCache(interval=2, branch=0), dict(init_image=init, strength=0.7))):
        args = dict(ARGS, num_inference_steps=7, **extra)
        ref = eager(PROMPT, sampler="euler_a", deepcache=deepcache, **args)
        for pipe in (aoti, native):
            ours = pipe(PROMPT, sampler="euler_a", deepcache=deepcache, **args)
            assert _max_diff(ours, ref) <= 2, f"{pipe.backend.name}, {deepcache}: {_max_diff(ours, ref)}/255"
    meta = json.loads((_engine(native, 1) / "deepcache_engine.json").read_text())
    assert meta["branch"] == 1 and set(meta["networks"]) == {"unet_deep_store", "unet_deep_reuse"}


def _engine(native, branch):
    from sdengine.export.aoti_deepcache import deepcache_engine_for

    return deepcache_engine_for(native.config, branch, dtype=native.backend.dtype, device=native.backend.device)


def test_tgate_tome_and_controlnets_are_refused_by_name(pipelines):
    native, _, _, aoti = pipelines("sd15")
    for pipe in (native, aoti):
        for option in (dict(tgate=2), dict(tome=0.5), dict(deepcache=2, tome=0.5)):
            other = next(k for k in option if k != "deepcache")
            with pytest.raises(ValueError, match=f"backend '{pipe.backend.name}' runs deepcache \\(on its DeepCache "
                                                 f"engine\\), not {other}"):
                pipe(PROMPT, **dict(ARGS, **option))
        with pytest.raises(sdengine.InvalidArgumentError, match="deepcache.branch must be below 6"):
            pipe(PROMPT, deepcache=sdengine.DeepCache(branch=6), **ARGS)


def test_max_graphs_1_keeps_the_sampler_state(pipelines):
    """With one step graph kept per instance, DeepCache's two kinds of step evict each other every
    step: the sampler state and the kept state still carry over (the same images)."""
    native, eager, folder, _ = pipelines("sd15")
    tight = sdengine.load(folder, backend="native", backend_options={"max_graphs": 1})
    args = dict(ARGS, sampler="dpmpp_2m", deepcache=sdengine.DeepCache(interval=2))
    assert np.array_equal(tight(PROMPT, **args).images, native(PROMPT, **args).images)
    assert tight.backend.stats()["step"]["evicted"] > 0


def test_capi_deepcache_from_c(pipelines, tmp_path):
    """tests/c/test_capi.c's DeepCache case (engine by folder and from the cache, another branch
    refused, the request's rules, 4 threads equal to serial, the infotext's fields); its image
    equals the eager pipeline's within 2/255."""
    native, eager, folder, _ = pipelines("sd15")
    program = compile_c(ROOT / "tests" / "c" / "test_capi.c", tmp_path / "sde_capi_test", extra=["-pthread"])
    out = tmp_path / "deepcache.rgb"
    engine = _engine(native, 0)
    rc, log = run_program([program, "deepcache", folder, native.backend.engine_dir, engine, out])
    assert rc == 0, log
    ref = eager("a tiny red square", negative_prompt="blurry", num_inference_steps=4, seed=11, height=16, width=16,
                sampler="euler", deepcache=sdengine.DeepCache(interval=2, branch=0), output_type="np", progress=False)
    ours = np.frombuffer(out.read_bytes(), dtype=np.uint8).reshape(16, 16, 3).astype(np.float64)
    diff = np.abs(ours - (ref.images[0] * 255).round()).max()
    assert diff <= 2, f"max difference {diff}/255"


def test_redraw_example_redraws_a_deepcache_png(pipelines, tmp_path):
    """examples/c/redraw.c on a PNG whose infotext has DeepCache's fields: it loads the engine of
    the branch (-d) and draws the eager pipeline's image."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    native, eager, folder, _ = pipelines("sd15")
    result = eager(PROMPT, sampler="Euler a", num_inference_steps=5, seed=3, height=64, width=64,
                   deepcache=sdengine.DeepCache(interval=3, branch=0), progress=False)
    text = result.infotext(0)
    assert "DeepCache interval: 3, DeepCache branch: 0" in text
    source, out = tmp_path / "in.png", tmp_path / "out.png"
    info = PngInfo()
    info.add_text("parameters", text)
    result.images[0].save(source, pnginfo=info)
    exe = compile_c(ROOT / "examples" / "c" / "redraw.c", tmp_path / "sde_redraw")
    code, output = run_program([exe, folder, source, out, "-e", native.backend.engine_dir, "-d", _engine(native, 0)])
    assert code == 0, output
    diff = np.abs(np.asarray(Image.open(out), dtype=int) - np.asarray(result.images[0], dtype=int)).max()
    assert diff <= 2, f"max difference {diff}/255"
    code, output = run_program([exe, folder, source, out, "-e", native.backend.engine_dir, "-d", tmp_path])
    assert code != 0 and "deepcache_engine.json" in output, output


def test_a_lora_reaches_the_deepcache_engines(pipelines, tmp_path):
    """A LoRA merged in place reaches both DeepCache networks (they read the model's UNet tensors):
    native and aoti with DeepCache equal eager with the LoRA and DeepCache, and differ from
    without the LoRA."""
    import copy

    from support.lora_files import kohya_lora

    native, _, _, aoti = pipelines("sd15")
    path = kohya_lora(tiny_pipeline("sd15"), tmp_path / "k.safetensors", rank=4, alpha=2.0, locon=True)
    reference = sdengine.from_diffusers(copy.deepcopy(tiny_pipeline("sd15")))
    reference.set_loras([(path, 0.8)])
    args = dict(ARGS, sampler="euler", deepcache=sdengine.DeepCache(interval=2))
    ref = reference(PROMPT, **args)
    for pipe in (native, aoti):
        base = pipe(PROMPT, **args)
        pipe.set_loras([(path, 0.8)])
        try:
            ours = pipe(PROMPT, **args)
        finally:
            pipe.set_loras([])
        assert _max_diff(ours, ref) <= 2, f"{pipe.backend.name}: {_max_diff(ours, ref)}/255"
        assert _max_diff(base, ours) > 2, f"{pipe.backend.name}: the LoRA made no difference"


def test_export_cli_names_the_deepcache_engines(pipelines, capsys):
    """`sdengine export aoti MODEL --deepcache-branch B` (repeatable) names (here: finds) the model's
    engine and each branch's DeepCache engine; a branch the UNet lacks is refused by name."""
    from sdengine.cli import main

    native, _, folder, _ = pipelines("sd15")
    capsys.readouterr()
    assert main(["export", "aoti", str(folder), "--device", "cpu", "--dtype", "fp32",
                 "--deepcache-branch", "0", "--deepcache-branch", "1"]) == 0
    printed = capsys.readouterr().out.split()
    assert printed[-3:] == [str(native.backend.engine_dir), str(_engine(native, 0)), str(_engine(native, 1))]
    assert main(["export", "aoti", str(folder), "--device", "cpu", "--dtype", "fp32", "--deepcache-branch", "6"]) == 2
    assert "deepcache.branch must be below 6 for this UNet" in capsys.readouterr().err
