"""DeepCache, T-GATE and ToMe against the authors' own packages, on the tiny random models.

References: DeepCache's `DeepCacheSDHelper` (PyPI DeepCache), tgate's `TgateSDLoader` /
`TgateSDXLLoader` / `TgateSDDeepCacheLoader` (PyPI tgate) and `tomesd.apply_patch` (PyPI tomesd),
each on diffusers' own pipeline over the same weights (tests/support/tiny.py). Each case also checks that
the method changed the image, so a method silently left off cannot pass. The graph layer's whole
step runs through the CUDA-graph stand-in (tests/support/graph_stand_in.py), which counts captures.
"""

import copy

import numpy as np
import pydantic
import pytest
import torch
from PIL import Image

import sdengine
from support.compare import max_diff as _max_diff
from support.graph_stand_in import use_stand_in
from support.tiny import sdengine_controlnet, tiny_controlnet_pipeline, tiny_pipeline

H, W = 16, 24
STEPS = 7
PROMPTS = ["a red bicycle", "a blue boat"]
KINDS = ("sd15", "sd21-v", "sdxl")


def _reference(kind, pipe=None):
    """A private copy of diffusers' tiny pipeline (the packages patch it), with Euler: a sampler
    that the graph layer's whole step covers."""
    from diffusers import EulerDiscreteScheduler

    ref = copy.deepcopy(pipe if pipe is not None else tiny_pipeline(kind))
    if kind != "sd15-inpaint":
        ref.scheduler = EulerDiscreteScheduler.from_config(ref.scheduler.config)
    return ref


def _generators(n=2):
    return [torch.Generator().manual_seed(3 + i) for i in range(n)]


def _theirs(call, n=2, steps=STEPS, guidance_scale=5.0, **kwargs):
    return call(PROMPTS[:n], height=H, width=W, num_inference_steps=steps, guidance_scale=guidance_scale,
                output_type="np", generator=_generators(n), **kwargs).images


def _ours(pipe, n=2, steps=STEPS, **kwargs):
    args = dict(height=H, width=W, steps=steps, guidance_scale=5.0, seed=[3 + i for i in range(n)], output_type="np",
                progress=False, sampler="euler")
    args.update(kwargs)
    return pipe(PROMPTS[:n], **args).images


def _eager_and_graph(kind):
    eager = sdengine.from_diffusers(tiny_pipeline(kind))
    fast = sdengine.from_diffusers(tiny_pipeline(kind), backend="graph")
    return eager, fast, use_stand_in(fast.backend)


def _check(kind, want, method, plain_kwargs=None):
    """Our eager pipeline and the graph layer's whole step (stand-in graphs) against `want`, and the
    method's effect on the image."""
    eager, fast, graphs = _eager_and_graph(kind)
    assert _max_diff(_ours(eager, **method), want) <= 1 / 255
    assert _max_diff(_ours(fast, **method), want) <= 1 / 255
    assert any(k[0] == "step" for k in graphs.entries)  # the whole step ran it
    assert _max_diff(_ours(eager, **(plain_kwargs or {})), want) > 0.01  # the method changed the image


# ---------------------------------------------------------------------------
# Parity with the authors' packages
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("interval,branch", [(3, 0), (2, 1), (2, 3)])
def test_deepcache_matches_deepcache_sd_helper(kind, interval, branch):
    """branch 0 and 1: the shallowest level's layers; 3: the next level's first (tiny UNets have two
    levels of one layer per block: branch b is level b // 3, layer b % 3, as DeepCacheSDHelper reads it)."""
    from DeepCache import DeepCacheSDHelper

    ref = _reference(kind)
    helper = DeepCacheSDHelper(pipe=ref)
    helper.set_params(cache_interval=interval, cache_branch_id=branch)
    helper.enable()
    want = _theirs(ref)
    helper.disable()
    _check(kind, want, dict(deepcache=sdengine.DeepCache(interval=interval, branch=branch)))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tgate", [sdengine.TGate(gate_step=5, sp_interval=2, fi_interval=2, warm_up=1),
                                   sdengine.TGate(gate_step=3)], ids=["phases", "defaults"])
def test_tgate_matches_tgate(kind, tgate):
    """"phases" passes through every phase of TGATE-V2: self-attention computed, kept, reused before
    the gate; both kept (averaged halves) at gate_step - 1; after it, cross-attention reused without
    guidance and self-attention reused every other step."""
    import tgate as tgate_package

    loader = tgate_package.TgateSDXLLoader if kind == "sdxl" else tgate_package.TgateSDLoader
    ref = loader(_reference(kind))
    # guidance 9: T-GATE turns it off after the gate, which then changes the tiny SD1 model's images clearly
    want = _theirs(ref.tgate, steps=9, guidance_scale=9.0, gate_step=tgate.gate_step, sp_interval=tgate.sp_interval,
                   fi_interval=tgate.fi_interval, warm_up=tgate.warm_up)
    _check(kind, want, dict(tgate=tgate, steps=9, guidance_scale=9.0), dict(steps=9, guidance_scale=9.0))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tome", [sdengine.ToMe(ratio=0.5), sdengine.ToMe(ratio=0.6, max_downsample=2, use_rand=False),
                                  sdengine.ToMe(ratio=0.4, merge_crossattn=True, merge_mlp=True)],
                         ids=["defaults", "deeper-norand", "crossattn-mlp"])
def test_tome_matches_tomesd(kind, tome):
    """tomesd's random destination choice is drawn from a generator we seed as sdengine does
    (acceleration.TOME_SEED at the start of the run)."""
    import tomesd

    from sdengine.acceleration import TOME_SEED

    ref = _reference(kind)
    tomesd.apply_patch(ref, ratio=tome.ratio, max_downsample=tome.max_downsample, sx=tome.sx, sy=tome.sy,
                       use_rand=tome.use_rand, merge_attn=tome.merge_attn, merge_crossattn=tome.merge_crossattn,
                       merge_mlp=tome.merge_mlp)
    ref.unet._tome_info["args"]["generator"] = torch.Generator().manual_seed(TOME_SEED)
    want = _theirs(ref, steps=5)
    _check(kind, want, dict(tome=tome, steps=5), dict(steps=5))


def test_tgate_with_deepcache_matches_tgates_deepcache_loader():
    """tgate's own combination: DeepCache's interval restarts at the gate (TgateSDDeepCacheLoader)."""
    import tgate as tgate_package

    ref = tgate_package.TgateSDDeepCacheLoader(_reference("sd15"), cache_interval=2, cache_branch_id=0)
    want = _theirs(ref.tgate, steps=8, gate_step=4, sp_interval=5, fi_interval=1, warm_up=1)
    _check("sd15", want, dict(steps=8, tgate=sdengine.TGate(gate_step=4, warm_up=1), deepcache=2), dict(steps=8))


# ---------------------------------------------------------------------------
# img2img, inpainting, ControlNets
# ---------------------------------------------------------------------------

def _init_image(seed=11):
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(H, W, 3, generator=g).numpy() * 255).astype("uint8"))


def test_deepcache_img2img_and_inpainting_match_deepcache_sd_helper():
    """The run's first step is DeepCache's first full step (img2img starts part-way: the helper counts
    from the first timestep it sees); inpainting's extra UNet channels pass through both steps."""
    import diffusers
    from DeepCache import DeepCacheSDHelper

    init = _init_image()
    mask = np.zeros((H, W), dtype=np.uint8)
    mask[4:12, 6:18] = 255
    cases = [("sd15", diffusers.StableDiffusionImg2ImgPipeline, dict(image=init, strength=0.7), {}),
             ("sd15-inpaint", None, dict(image=init, mask_image=Image.fromarray(mask)), dict(sampler="ddim"))]
    for kind, cls, their_args, our_args in cases:
        base = tiny_pipeline(kind)
        ref = _reference(kind, cls(**base.components) if cls is not None else base)
        helper = DeepCacheSDHelper(pipe=ref)
        helper.set_params(cache_interval=3, cache_branch_id=0)
        helper.enable()
        want = _theirs(ref, n=1, steps=9, **their_args)
        helper.disable()
        ours = dict(init_image=init, n=1, steps=9, **our_args,
                    **({"strength": 0.7} if "strength" in their_args else {"mask_image": Image.fromarray(mask)}))
        eager, fast, graphs = _eager_and_graph(kind)
        for pipe in (eager, fast):
            assert _max_diff(_ours(pipe, deepcache=3, **ours), want) <= 1 / 255, (kind, pipe.backend.name)
        assert _max_diff(_ours(eager, **ours), want) > 0.01, kind
        assert any(k[0] == "step" for k in graphs.entries), kind


def test_deepcache_with_a_controlnet_matches_deepcache_sd_helper():
    """The ControlNet runs at every step; on a cached step its residuals reach the skips that the
    shallow branch consumes (diffusers adds them to every skip, the cached layers' included)."""
    from DeepCache import DeepCacheSDHelper

    control_image = _init_image(seed=7)
    ref = _reference("sd15", tiny_controlnet_pipeline("sd15", "txt2img", (0,)))
    helper = DeepCacheSDHelper(pipe=ref)
    helper.set_params(cache_interval=2, cache_branch_id=1)
    helper.enable()
    want = _theirs(ref, image=control_image, controlnet_conditioning_scale=0.8)
    helper.disable()
    control = [sdengine.Control(sdengine_controlnet("sd15", 0), control_image, scale=0.8)]
    eager, fast, graphs = _eager_and_graph("sd15")
    for pipe in (eager, fast):
        assert _max_diff(_ours(pipe, control=control, deepcache=sdengine.DeepCache(2, 1)), want) <= 1 / 255
    assert _max_diff(_ours(eager, control=control), want) > 0.01


# ---------------------------------------------------------------------------
# The captured step: one graph per kind of step
# ---------------------------------------------------------------------------

def test_the_cached_step_is_captured_once_per_shape_and_replayed():
    """DeepCache's full step and cached step are two graphs of the one DeviceStep of a shape; a second
    run, and a run of another length, capture nothing; every step replays one of the two."""
    eager, fast, graphs = _eager_and_graph("sd15")
    first = _ours(fast, deepcache=3)
    steps = [e for k, e in graphs.entries.items() if k[0] == "step"]
    assert len(steps) == 1
    kinds = {signature[0].deep for _, signature in steps[0].step_graphs}
    assert kinds == {"store", "reuse"} and len(steps[0].step_graphs) == 2
    captures, replays = graphs.captures, graphs.replays
    again = _ours(fast, deepcache=3)
    assert np.array_equal(again, first)  # the caches start afresh with every run
    assert graphs.captures == captures  # nothing captured per step, nor per run
    assert graphs.replays - replays == STEPS + 3  # every step, the text encoder twice (prompts, negatives), the decode
    _ours(fast, deepcache=3, steps=STEPS + 4)
    assert graphs.captures == captures
    assert _max_diff(_ours(fast), first) > 0.01 and graphs.captures == captures + 1  # the plain step: its own
    assert _max_diff(_ours(eager, deepcache=3), first) <= 1 / 255


def test_all_three_together_on_the_graph_layer_match_eager():
    """Any combination is allowed: the graph layer's whole step (T-GATE's phases, DeepCache's two
    steps and ToMe in one schedule of kinds, each kind its own graph) equals the eager run."""
    eager, fast, graphs = _eager_and_graph("sdxl")
    options = dict(steps=9, deepcache=2, tgate=sdengine.TGate(gate_step=5, sp_interval=2, warm_up=1),
                   tome=sdengine.ToMe(ratio=0.5, max_downsample=2))
    want = _ours(eager, **options)
    assert _max_diff(_ours(fast, **options), want) <= 1 / 255
    captures = graphs.captures
    assert _max_diff(_ours(fast, **options), want) <= 1 / 255
    assert graphs.captures == captures
    assert _max_diff(_ours(eager, steps=9), want) > 0.01


def test_triton_and_compile_layers_run_them_inside_their_step():
    """The triton layer (kernels under Triton's interpreter, fused QKV) and the compile layer
    (torch.compile, aot_eager: traced as Inductor does, no code generated) with DeepCache and ToMe."""
    from sdengine import kernels
    from sdengine.backends.compiled import CompileBackend

    eager = sdengine.from_diffusers(tiny_pipeline("sd15"))
    options = dict(steps=4, deepcache=2, tome=sdengine.ToMe(ratio=0.5), n=1)
    want = _ours(eager, **options)
    torch._dynamo.reset()
    compiled = sdengine.from_diffusers(tiny_pipeline("sd15"))
    b = compiled.backend
    compiled.backend = CompileBackend(b.config, b.text_encoder, b.unet, b.vae, compiler="aot_eager")
    assert _max_diff(_ours(compiled, **options), want) <= 1 / 255
    assert not compiled.backend.unet_fn.failed  # traced with the caches, not run uncompiled after a warning
    if kernels.HAS_TRITON and kernels.INTERPRET:
        fast = sdengine.from_diffusers(copy.deepcopy(tiny_pipeline("sd15")), backend="triton")
        assert _max_diff(_ours(fast, **options), want) <= 1 / 255


# ---------------------------------------------------------------------------
# Refusals, the CLI, the infotext
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,parameter", [
    (lambda: dict(deepcache=sdengine.DeepCache(interval=0)), "deepcache.interval"),
    (lambda: dict(deepcache=sdengine.DeepCache(branch=6)), "deepcache.branch"),  # the tiny UNets have 2 levels
    (lambda: dict(tgate=0), "tgate.gate_step"),
    (lambda: dict(tome=0.8), "tome.ratio"),
    (lambda: dict(tome="0.5"), "tome"),
    (lambda: dict(tome=sdengine.ToMe(use_rand=1)), "tome.use_rand"),
], ids=["interval", "branch", "gate_step", "ratio", "tome-type", "use_rand"])
def test_bad_settings_are_refused_naming_the_parameter(kwargs, parameter):
    pipe = sdengine.from_diffusers(tiny_pipeline("sd15"))
    with pytest.raises(sdengine.InvalidArgumentError) as error:
        _ours(pipe, n=1, **kwargs())
    assert error.value.parameter == parameter and str(error.value).startswith(parameter)


def test_tgate_with_a_controlnet_is_refused_naming_both():
    pipe = sdengine.from_diffusers(tiny_pipeline("sd15"))
    control = [sdengine.Control(sdengine_controlnet("sd15", 0), _init_image(7))]
    with pytest.raises(sdengine.InvalidArgumentError, match="tgate does not combine with control"):
        _ours(pipe, n=1, tgate=3, control=control)


def test_a_backend_that_cannot_is_refused_before_any_work():
    """onnx runs the UNet as one compiled graph, and aoti and native run DeepCache only: a clear
    error, never an uncached run."""
    from sdengine.backends.base import BaseBackend

    class Compiled(BaseBackend):
        name = "onnx"

    with pytest.raises(ValueError, match="backend 'onnx' cannot run deepcache, tome"):
        Compiled().check_acceleration(sdengine.acceleration.Acceleration(sdengine.DeepCache(), None, sdengine.ToMe()))
    from sdengine.backends.aoti import AOTIBackend
    from sdengine.backends.native import NativeBackend
    from sdengine.backends.onnx import OnnxBackend

    assert OnnxBackend.check_acceleration is BaseBackend.check_acceleration
    # aoti and native run DeepCache on a DeepCache engine (tests/test_native_deepcache.py), not T-GATE or ToMe
    for cls in (AOTIBackend, NativeBackend):
        backend = cls.__new__(cls)
        backend.check_acceleration(sdengine.acceleration.Acceleration(sdengine.DeepCache()))
        with pytest.raises(ValueError, match=f"tgate: backend '{cls.name}' runs deepcache \\(on its DeepCache engine\\), "
                                             "not tgate, tome; use backend='eager'"):
            backend.check_acceleration(sdengine.acceleration.Acceleration(sdengine.DeepCache(), sdengine.TGate(),
                                                                          sdengine.ToMe()))


def test_infotext_and_the_cli(tmp_path):
    """The PNG's parameters carry the settings (A1111's "Token merging ratio"), and the CLI's flags
    give the same image as the Python API."""
    from sdengine.cli import main

    out = tmp_path / "seven.png"
    assert main(["generate", "a handwritten digit seven", "-o", str(out), "--seed", "4", "--steps", "6",
                 "--deepcache", "2", "--tgate", "4", "--tome", "0.5", "--no-progress", "--threads", "1"]) == 0
    text = Image.open(out).text["parameters"]
    assert "DeepCache interval: 2, DeepCache branch: 0, T-GATE gate step: 4, Token merging ratio: 0.5" in text
    result = sdengine.generate("a handwritten digit seven", seed=4, steps=6, deepcache=2, tgate=4, tome=0.5,
                               progress=False)
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(result.images[0]))
    assert result.params["acceleration"]["deepcache"] == {"interval": 2, "branch": 0}
    from sdengine.acceleration import Acceleration

    read_back = sdengine.Request.from_infotext(text).acceleration  # the infotext parser honours them
    assert read_back == Acceleration(sdengine.DeepCache(2, 0), sdengine.TGate(4), sdengine.ToMe(0.5))


@pytest.mark.slow
def test_demo_accuracy_with_deepcache_stays_within_5_points():
    """The bundled demo model's digits, read by the classifier of tests/test_demo.py (10 digits x 10
    seeds): DeepCache at interval 3 keeps the accuracy within 5 points of no acceleration (measured:
    98% both; scripts/acceleration_quality.py records every method)."""
    from test_demo import accuracy, fit_classifier, generate_digits

    classifier = fit_classifier()[0]
    pipe = sdengine.load()
    plain_images, labels = generate_digits(pipe)
    cached_images, _ = generate_digits(pipe, deepcache=3)
    plain, cached = accuracy(classifier, plain_images, labels), accuracy(classifier, cached_images, labels)
    assert plain >= 0.9 and cached >= plain - 0.05, (plain, cached)
    assert _max_diff(plain_images, cached_images) > 0.01  # DeepCache ran


def test_schedule_follows_the_packages():
    """The kinds of step of a run: DeepCache's full steps every interval-th, T-GATE's phases
    (tgate_scheduler), and only what a later step reuses is kept."""
    from sdengine.acceleration import Acceleration, schedule

    kinds = schedule(Acceleration(deepcache=sdengine.DeepCache(3)), 8, True)
    assert [k.deep for k in kinds] == ["store", "reuse", "reuse"] * 2 + ["store", "reuse"]
    kinds = schedule(Acceleration(tgate=sdengine.TGate(gate_step=6, sp_interval=2, warm_up=1)), 8, True)
    # kept at warm_up (1) and every sp_interval-th step, but only where the next step reuses it
    assert [k.self_attn for k in kinds] == ["compute", "compute", "store", "reuse", "compute", "compute", "compute",
                                            "compute"]
    assert [k.cross_attn for k in kinds] == ["compute"] * 5 + ["store_mean", "reuse", "reuse"]
    assert [k.cfg for k in kinds] == [True] * 6 + [False] * 2
    kinds = schedule(Acceleration(deepcache=sdengine.DeepCache(3), tgate=sdengine.TGate(gate_step=5)), 9, True)
    assert [k.deep for k in kinds] == ["store", "reuse", "reuse", "store", "store", "store", "reuse", "reuse",
                                       "store"]


def test_the_http_api_takes_them_in_override_settings():
    """A1111's token_merging_ratio (and its img2img variant), sdengine's deepcache_* and tgate_gate_step;
    a bad value is a 422 naming the setting."""
    from sdengine.config import SchedulerConfig
    from sdengine.serve.requests import FieldError, Limits, ModelInfo, make_spec
    from sdengine.serve.schemas import Img2ImgRequest, Txt2ImgRequest

    info = ModelInfo("tiny", "tiny", 32, False, SchedulerConfig())
    settings = {"deepcache_interval": 3, "deepcache_branch": 1, "tgate_gate_step": 10, "token_merging_ratio": 0.5,
                "token_merging_ratio_img2img": 0.3}
    spec = make_spec(Txt2ImgRequest(prompt="a cat", override_settings=settings), info, Limits(), img2img=False)
    assert spec.shared["deepcache"] == sdengine.DeepCache(3, 1) and spec.shared["tgate"] == sdengine.TGate(10)
    assert spec.shared["tome"] == sdengine.ToMe(0.5)
    import base64
    import io

    png = io.BytesIO()
    _init_image().save(png, format="PNG")
    img2img = Img2ImgRequest(prompt="a cat", init_images=[base64.b64encode(png.getvalue()).decode()],
                             override_settings=settings)
    assert make_spec(img2img, info, Limits(), img2img=True).shared["tome"] == sdengine.ToMe(0.3)
    assert "deepcache" not in make_spec(Txt2ImgRequest(prompt="a cat"), info, Limits(), img2img=False).shared
    for name, value in (("deepcache_interval", -1), ("token_merging_ratio", 0.9), ("tgate_gate_step", "10")):
        # The request schema refuses what its types and bounds say (the server's 422 names the
        # location); make_spec refuses the rest, naming the field.
        with pytest.raises((FieldError, pydantic.ValidationError)) as error:
            make_spec(Txt2ImgRequest(prompt="a cat", override_settings={name: value}), info, Limits(), img2img=False)
        if isinstance(error.value, FieldError):
            assert error.value.field == f"override_settings.{name}", (name, error.value.field)
        else:
            assert [e["loc"] for e in error.value.errors()] == [("override_settings", name)], error.value.errors()
