"""ControlNet: images against diffusers' ControlNet pipelines, the fast path, loading, bad input.

The ControlNets are diffusers' own `ControlNetModel.from_unet` of the tiny UNets, every weight
then perturbed so that the zero convolutions are not zero (tests/support/tiny.py); each test checks that
the ControlNet really changes the image, so a ControlNet silently dropped cannot pass.
"""

import copy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sdengine
from sdengine import Control
from sdengine.errors import ModelLoadError
from support.compare import max_diff
from support.graph_stand_in import use_stand_in
from support.tiny import sdengine_controlnet, tiny_controlnet, tiny_controlnet_pipeline, tiny_pipeline

H, W = 16, 24
STEPS = 4
PROMPTS = ["a red bicycle", "a blue boat"]


def _control_images(n=2, size=(W, H), seed=7):
    g = torch.Generator().manual_seed(seed)
    return [Image.fromarray((torch.rand(size[1], size[0], 3, generator=g).numpy() * 255).astype("uint8"))
            for _ in range(n)]


CONTROL_IMAGES = _control_images()


# Per case: ControlNet seeds, scales, starts, ends, guess mode (diffusers' is one flag per call).
CASES = {
    "one": ((0,), (0.8,), (0.0,), (1.0,), False),
    "two-ranges": ((0, 1), (0.6, 1.2), (0.2, 0.0), (0.7, 1.0), False),
    "guess": ((0,), (1.0,), (0.0,), (1.0,), True),
    "two-guess": ((0, 1), (0.7, 0.9), (0.0, 0.25), (1.0, 0.75), True),
}


def _diffusers_kwargs(case, n_images):
    seeds, scales, starts, ends, guess = CASES[case]
    one = len(seeds) == 1
    images = CONTROL_IMAGES[0] if one else CONTROL_IMAGES[:len(seeds)]
    return dict(controlnet_conditioning_scale=scales[0] if one else list(scales),
                control_guidance_start=starts[0] if one else list(starts),
                control_guidance_end=ends[0] if one else list(ends), guess_mode=guess,
                generator=[torch.Generator().manual_seed(3 + i) for i in range(n_images)]), images


def _controls(kind, case, dtype=torch.float32):
    seeds, scales, starts, ends, guess = CASES[case]
    return [Control(sdengine_controlnet(kind, s, dtype), CONTROL_IMAGES[j], scale=scales[j], start=starts[j],
                    end=ends[j], guess_mode=guess) for j, s in enumerate(seeds)]


def _reference(kind, mode, case):
    """diffusers' ControlNet pipeline of the case, with the Euler scheduler: a sampler the whole
    step covers (the graph layer's fused path), and the model_fn path on the eager backend."""
    from diffusers import EulerDiscreteScheduler

    ref = tiny_controlnet_pipeline(kind, mode, CASES[case][0])
    if kind != "sd15-inpaint":  # the inpainting model's own scheduler, DDIM, is covered too
        ref.scheduler = EulerDiscreteScheduler.from_config(ref.scheduler.config)
    return ref


def _ours(pipe, case, kind, prompts=PROMPTS, **kwargs):
    args = dict(height=H, width=W, steps=STEPS, guidance_scale=5.0, seed=[3, 4], output_type="np", progress=False,
                sampler="euler")
    args.update(kwargs)
    return pipe(prompts, control=_controls(kind, case), **args).images


@pytest.mark.parametrize("kind,case", [("sd15", "one"), ("sd15", "two-ranges"), ("sd15", "guess"),
                                       ("sd21-v", "two-ranges"), ("sdxl", "one"), ("sdxl", "two-guess")])
def test_txt2img_matches_diffusers_and_the_graph_layer(kind, case):
    """diffusers' StableDiffusion(XL)ControlNetPipeline, our eager pipeline, and the graph layer's
    whole-step path (UNet + ControlNets captured as one step, stand-in graphs on the CPU)."""
    ref = _reference(kind, "txt2img", case)
    kwargs, images = _diffusers_kwargs(case, 2)
    want = ref(PROMPTS, image=images, height=H, width=W, num_inference_steps=STEPS, guidance_scale=5.0,
               output_type="np", **kwargs).images
    eager = sdengine.from_diffusers(tiny_pipeline(kind))
    fast = sdengine.from_diffusers(tiny_pipeline(kind), backend="graph")
    graphs = use_stand_in(fast.backend)
    got = _ours(eager, case, kind)
    assert max_diff(got, want) <= 1 / 255
    assert max_diff(_ours(fast, case, kind), want) <= 1 / 255
    steps = [e for k, e in graphs.entries.items() if k[0] == "step"]
    assert len(steps) == 1  # the ControlNets ran inside the whole step
    without = eager(PROMPTS, height=H, width=W, steps=STEPS, guidance_scale=5.0, seed=[3, 4], output_type="np",
                    progress=False, sampler="euler").images
    assert max_diff(got, without) > 0.05  # the ControlNets changed the image


@pytest.mark.parametrize("case", ["one", "two-ranges"])
def test_img2img_matches_diffusers(case):
    init = np.asarray(_control_images(1, seed=11)[0])
    ref = _reference("sd15", "img2img", case)
    kwargs, images = _diffusers_kwargs(case, 2)
    want = ref(PROMPTS, image=Image.fromarray(init), control_image=images, height=H, width=W, strength=0.7,
               num_inference_steps=STEPS + 2, guidance_scale=5.0, output_type="np", **kwargs).images
    for backend in ("eager", "graph"):
        pipe = sdengine.from_diffusers(tiny_pipeline("sd15"), backend=backend)
        use_stand_in(pipe.backend) if backend == "graph" else None
        got = _ours(pipe, case, "sd15", init_image=Image.fromarray(init), strength=0.7, steps=STEPS + 2)
        assert max_diff(got, want) <= 1 / 255, backend


@pytest.mark.parametrize("case", ["one", "two-guess"])
def test_inpainting_matches_diffusers(case):
    """One image: diffusers' inpainting encodes one masked init image with the first generator
    only and repeats it (its images depend on the batch); sdengine's draw from each image's own."""
    init = Image.fromarray(np.asarray(_control_images(1, seed=11)[0]))
    mask = np.zeros((H, W), dtype=np.uint8)
    mask[4:12, 6:18] = 255
    ref = _reference("sd15-inpaint", "inpaint", case)
    kwargs, images = _diffusers_kwargs(case, 1)
    want = ref(PROMPTS[:1], image=init, mask_image=Image.fromarray(mask), control_image=images, height=H, width=W,
               num_inference_steps=STEPS, guidance_scale=5.0, output_type="np", **kwargs).images
    for backend in ("eager", "graph"):
        pipe = sdengine.from_diffusers(tiny_pipeline("sd15-inpaint"), backend=backend)
        use_stand_in(pipe.backend) if backend == "graph" else None
        got = _ours(pipe, case, "sd15-inpaint", init_image=init, mask_image=Image.fromarray(mask), sampler="ddim",
                    prompts=PROMPTS[:1], seed=[3])
        assert max_diff(got, want) <= 1 / 255, backend


# ---------------------------------------------------------------------------
# The fast path: graphs per active set, replays, LoRA swaps
# ---------------------------------------------------------------------------

def test_steps_outside_a_range_replay_a_graph_without_it_and_lora_swaps_keep_the_graphs(tmp_path):
    from support.lora_files import kohya_lora

    fast = sdengine.from_diffusers(tiny_pipeline("sd15"), backend="graph")
    eager = sdengine.from_diffusers(tiny_pipeline("sd15"))
    graphs = use_stand_in(fast.backend)
    controlnet = sdengine_controlnet("sd15", 0)
    controls = [Control(controlnet, CONTROL_IMAGES[0], scale=0.9, start=0.25, end=0.75)]  # steps 1 and 2 of 4
    kwargs = dict(height=H, width=W, steps=STEPS, guidance_scale=5.0, seed=[3, 4], output_type="np", progress=False,
                  sampler="euler", control=controls)
    first = fast(PROMPTS, **kwargs).images
    step = next(e for k, e in graphs.entries.items() if k[0] == "step")
    assert set(step.step_graphs) == {(False,), (True,)}  # with and without the ControlNet
    captures = graphs.captures
    assert np.array_equal(fast(PROMPTS, **kwargs).images, first)
    assert graphs.captures == captures  # every step of the second run replayed
    lora = kohya_lora(tiny_pipeline("sd15"), tmp_path / "style.safetensors", rank=4, alpha=2.0)
    for pipe in (fast, eager):
        pipe.set_loras([(lora, 0.8)])
    swapped = fast(PROMPTS, **kwargs).images
    assert graphs.captures == captures  # the LoRA was merged into the weights the graphs read
    assert max_diff(swapped, eager(PROMPTS, **kwargs).images) <= 1 / 255
    assert max_diff(swapped, first) > 0.01
    different_scale = dict(kwargs, control=[Control(controlnet, CONTROL_IMAGES[0], scale=0.3, start=0.25, end=0.75)])
    assert max_diff(fast(PROMPTS, **different_scale).images, eager(PROMPTS, **different_scale).images) <= 1 / 255
    assert graphs.captures == captures  # the scale is a device scalar, not baked into the graph


def test_triton_layer_matches_eager():
    """The triton layer's kernels on the ControlNet (fused QKV, flash attention, GroupNorm) under
    Triton's interpreter, inside its whole step with the fused sampler update."""
    pytest.importorskip("triton")
    from sdengine import kernels

    if not kernels.INTERPRET:
        pytest.skip("the CPU run of the triton layer needs TRITON_INTERPRET=1 (set by conftest.py)")
    fast = sdengine.from_diffusers(copy.deepcopy(tiny_pipeline("sd15")), backend="triton")
    eager = sdengine.from_diffusers(tiny_pipeline("sd15"))
    kwargs = dict(height=H, width=W, steps=2, guidance_scale=5.0, seed=[3], output_type="np", progress=False,
                  sampler="euler")
    controls = [Control(sdengine_controlnet("sd15", 0), CONTROL_IMAGES[0], scale=0.9, guess_mode=True)]
    got = fast(PROMPTS[:1], control=controls, **kwargs).images
    assert max_diff(got, eager(PROMPTS[:1], control=controls, **kwargs).images) <= 1 / 255
    view = next(iter(fast.backend._controlnet_views))
    assert all(a.to_qkv is not None for a in view.modules() if getattr(a, "is_cross", True) is False)
    assert controls[0].model.model.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_qkv is None  # caller's untouched


def test_compile_layer_compiles_the_controlnet():
    """The compile layer's torch.compile'd ControlNet (aot_eager: traced and partitioned as Inductor
    does, without generating code), inside its whole step, at two scales."""
    from sdengine.backends.compiled import CompileBackend

    torch._dynamo.reset()
    fast = sdengine.from_diffusers(tiny_pipeline("sd15"))
    b = fast.backend
    fast.backend = CompileBackend(b.config, b.text_encoder, b.unet, b.vae, compiler="aot_eager")
    eager = sdengine.from_diffusers(tiny_pipeline("sd15"))
    controlnet = sdengine_controlnet("sd15", 0)
    kwargs = dict(height=H, width=W, steps=2, guidance_scale=5.0, seed=[3], output_type="np", progress=False,
                  sampler="euler")
    for scale in (0.9, 0.4):
        controls = [Control(controlnet, CONTROL_IMAGES[0], scale=scale)]
        got = fast(PROMPTS[:1], control=controls, **kwargs).images
        assert max_diff(got, eager(PROMPTS[:1], control=controls, **kwargs).images) <= 1 / 255
    compiled = fast.backend._controlnet_fns[id(controlnet.model)][1]
    assert not compiled.failed and not fast.backend.unet_fn.failed


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind,suffix,prefix,with_model", [("sd15", ".safetensors", "control_model.", True),
                                                           ("sd21-v", ".pth", "", False),
                                                           ("sdxl", ".safetensors", "control_model.", False)])
def test_single_file_loads_to_identical_tensors(tmp_path, kind, suffix, prefix, with_model):
    """An A1111 single file written by the test's own LDM walk (tests/support/ldm_keys.py), in the layouts
    found in the wild: lllyasviel's control_model.* (v1.0 files also hold the whole SD model),
    thibaud's SD2.1 files without the prefix, .pth through torch.load(weights_only=True)."""
    from safetensors.torch import save_file

    from support.ldm_keys import controlnet_to_ldm, ldm_state_dict

    theirs = tiny_controlnet(kind)
    state = controlnet_to_ldm(theirs, prefix)
    if with_model:
        state.update(ldm_state_dict(tiny_pipeline(kind), "sd1"))
    path = tmp_path / f"control_{kind}{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    base = sdengine.from_diffusers(tiny_pipeline(kind)).config
    loaded = sdengine.load_controlnet(path, "cpu", torch.float32, base=base)
    assert loaded.family == {"sd15": "SD1", "sd21-v": "SD2", "sdxl": "SDXL"}[kind]
    ours = loaded.model.state_dict()
    reference = theirs.state_dict()
    assert set(ours) == set(reference)
    assert all(torch.equal(ours[k], reference[k]) for k in reference)
    # and it runs as the diffusers ControlNet does
    pipe = sdengine.from_diffusers(tiny_pipeline(kind))
    kwargs = dict(height=H, width=W, steps=2, guidance_scale=5.0, seed=[3], output_type="np", progress=False)
    assert np.array_equal(pipe(PROMPTS[:1], control=Control(loaded, CONTROL_IMAGES[0]), **kwargs).images,
                          pipe(PROMPTS[:1], control=Control(sdengine_controlnet(kind), CONTROL_IMAGES[0]),
                               **kwargs).images)


@pytest.mark.parametrize("preset", ["sd15", "sd21", "sdxl"])
def test_full_size_single_files_are_detected_from_their_shapes(preset):
    """SD1.5, SD2.1 and SDXL ControlNets at full size (diffusers' from_unet of the preset UNets, on
    the meta device: shapes only): their LDM single-file shapes give back the architecture, head
    counts included (SD1: 8 heads; SD2 / SDXL: 64-channel heads), with no base model to ask."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    from sdengine.bench.reference import diffusers_unet_kwargs
    from sdengine.config import PRESETS
    from sdengine.ldm_layout import detect_controlnet_config
    from support.ldm_keys import controlnet_to_ldm

    with torch.device("meta"):
        theirs = ControlNetModel.from_unet(UNet2DConditionModel(**diffusers_unet_kwargs(PRESETS[preset].unet)),
                                           load_weights_from_unet=False)
    shapes = {k: tuple(v.shape) for k, v in controlnet_to_ldm(theirs, "control_model.").items()}
    config, prefix = detect_controlnet_config(shapes)
    unet, want = config.unet, PRESETS[preset].unet
    assert prefix == "control_model."
    for field in ("block_out_channels", "down_block_types", "layers_per_block", "num_attention_heads",
                  "transformer_layers_per_block", "cross_attention_dim", "use_linear_projection",
                  "addition_embed_type", "addition_time_embed_dim", "projection_class_embeddings_input_dim"):
        assert getattr(unet, field) == getattr(want, field), field
    assert config.conditioning_embedding_out_channels == (16, 32, 96, 256) and config.conditioning_channels == 3
    from sdengine.models.controlnet import ControlNetModel as Ours

    with torch.device("meta"):
        ours = Ours(config)
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in theirs.state_dict().items()}


def test_diffusers_folder_and_fp16_variant(tmp_path):
    theirs = tiny_controlnet("sd15")
    theirs.save_pretrained(tmp_path / "plain", safe_serialization=True)
    copy.deepcopy(theirs).half().save_pretrained(tmp_path / "half", safe_serialization=True, variant="fp16")
    pipe = sdengine.from_diffusers(tiny_pipeline("sd15"))
    plain = pipe.load_controlnet(tmp_path / "plain")
    assert pipe.load_controlnet(tmp_path / "plain") is plain  # loaded once, kept
    assert all(torch.equal(plain.model.state_dict()[k], v) for k, v in theirs.state_dict().items())
    half = sdengine.load_controlnet(tmp_path / "half", "cpu", torch.float16)
    assert all(torch.equal(half.model.state_dict()[k], v.half()) for k, v in theirs.state_dict().items())
    # a Control naming a path loads it for the pipeline's device and dtype
    kwargs = dict(height=H, width=W, steps=2, guidance_scale=5.0, seed=[3], output_type="np", progress=False)
    by_path = pipe(PROMPTS[:1], control=Control(str(tmp_path / "plain"), CONTROL_IMAGES[0]), **kwargs)
    assert np.array_equal(by_path.images, pipe(PROMPTS[:1], control=Control(plain, CONTROL_IMAGES[0]), **kwargs).images)
    assert by_path.params["controls"][0]["model"] == "plain" and len(by_path.params["controls"][0]["hash"]) == 8


# ---------------------------------------------------------------------------
# Bad input: errors that name the parameter
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sd15():
    return sdengine.from_diffusers(tiny_pipeline("sd15"))


@pytest.mark.parametrize("change,message", [
    (dict(image="edges.png"), r"control\[0\]\.image must be a PIL image"),
    (dict(image=np.zeros((0, 8, 3), np.uint8)), r"control\[0\]\.image is empty"),
    (dict(image=np.zeros((H, W, 5), np.uint8)), r"control\[0\]\.image must be an array .* 1, 3 or 4 channels"),
    (dict(image=[CONTROL_IMAGES[0]] * 3), r"control\[0\]\.image has 3 images but 2 are generated"),
    (dict(start=0.8, end=0.2), r"control\[0\]\.start \(0\.8\) must not be after end \(0\.2\)"),
    (dict(end=1.5), r"control\[0\]\.end must be in \[0, 1\]"),
    (dict(scale=float("nan")), r"control\[0\]\.scale must be a finite number"),
    (dict(scale=float("inf")), r"control\[0\]\.scale must be a finite number"),
    (dict(preprocess="depth"), r"control\[0\]\.preprocess must be None or one of canny"),
    (dict(model=42), r"control\[0\]\.model must be a ControlNet"),
])
def test_bad_input_names_the_parameter(sd15, change, message):
    fields = dict(model=sdengine_controlnet("sd15"), image=CONTROL_IMAGES[0])
    fields.update(change)
    with pytest.raises(ValueError, match=message):
        sd15(PROMPTS, control=Control(**fields), height=H, width=W, steps=2, seed=[3, 4], progress=False)


def test_a_controlnet_of_another_family_is_refused(sd15, tmp_path):
    with pytest.raises(ModelLoadError, match=r"ControlNet tiny-sdxl-controlnet-0 \(SDXL\) does not fit the model "
                                             r".* \(SD1\): its cross-attention width is 64, the model's is 32"):
        sd15(PROMPTS, control=Control(sdengine_controlnet("sdxl"), CONTROL_IMAGES[0]), height=H, width=W, steps=2,
             progress=False)
    tiny_controlnet("sdxl").save_pretrained(tmp_path / "xl", safe_serialization=True)
    with pytest.raises(ModelLoadError, match=r"ControlNet xl \(SDXL\) does not fit"):
        sd15.load_controlnet(tmp_path / "xl")


def test_files_that_are_not_controlnets_are_named(tmp_path):
    from safetensors.torch import save_file

    from support.ldm_keys import ldm_state_dict

    path = tmp_path / "model.safetensors"
    save_file(ldm_state_dict(tiny_pipeline("sd15"), "sd1"), str(path))
    with pytest.raises(ModelLoadError, match=r"model\.safetensors: no ControlNet weights .* a Stable Diffusion checkpoint"):
        sdengine.load_controlnet(path, "cpu")
    truncated = tmp_path / "cut.safetensors"
    from support.ldm_keys import controlnet_to_ldm

    save_file(controlnet_to_ldm(tiny_controlnet("sd15")), str(truncated))
    truncated.write_bytes(truncated.read_bytes()[:-100])
    with pytest.raises(ModelLoadError, match="cut.safetensors"):
        sdengine.load_controlnet(truncated, "cpu")
    state = controlnet_to_ldm(tiny_controlnet("sd15"))
    del state["control_model.zero_convs.1.0.weight"]
    save_file(state, str(tmp_path / "missing.safetensors"))
    with pytest.raises(ModelLoadError, match=r"1 controlnet weights missing .*zero_convs\.1\.0\.weight"):
        sdengine.load_controlnet(tmp_path / "missing.safetensors", "cpu")


# ---------------------------------------------------------------------------
# Preprocessing, size, infotext
# ---------------------------------------------------------------------------

def test_canny_preprocess_and_its_missing_extra(sd15, monkeypatch):
    cv2 = pytest.importorskip("cv2")
    from sdengine.controlnet import prepare_image

    photo = np.asarray(_control_images(1, seed=5)[0])
    edges = prepare_image(photo, W, H, 1, 3, "canny", "control[0].image")
    want = cv2.cvtColor(cv2.Canny(photo, 100, 200), cv2.COLOR_GRAY2RGB).astype(np.float32) / 255
    assert torch.equal(edges[0].permute(1, 2, 0), torch.from_numpy(want))
    assert 0 < float(edges.mean()) < 1
    control = Control(sdengine_controlnet("sd15"), photo, preprocess="canny")
    result = sd15(PROMPTS[:1], control=control, steps=2, seed=3, output_type="np", progress=False)
    assert result.images.shape == (1, H, W, 3)  # the size is the control image's
    monkeypatch.setitem(sys.modules, "cv2", None)
    with pytest.raises(ImportError, match=r'pip install "sdengine\[controlnet\]"'):
        sd15(PROMPTS[:1], control=control, steps=2, seed=3, progress=False)


def test_infotext_records_each_controlnet_as_a1111(sd15):
    controls = [Control(sdengine_controlnet("sd15", 0), CONTROL_IMAGES[0], scale=0.75, start=0.1, end=0.9),
                Control(sdengine_controlnet("sd15", 1), np.asarray(CONTROL_IMAGES[1]), guess_mode=True,
                        preprocess="canny")]
    result = sd15(PROMPTS[:1], control=controls, height=H, width=W, steps=2, seed=3, progress=False)
    text = result.infotext(0)
    units = {}
    import json
    import re

    for key, value in re.findall(r'(ControlNet \d): ("(?:[^"\\]|\\.)*")', text):
        units[key] = {k: v for k, v in (item.strip().split(": ") for item in json.loads(value).split(","))}
    assert units["ControlNet 0"]["Model"] == "tiny-sd15-controlnet-0" and units["ControlNet 0"]["Weight"] == "0.75"
    assert units["ControlNet 0"]["Guidance Start"] == "0.1" and units["ControlNet 0"]["Guidance End"] == "0.9"
    assert units["ControlNet 0"]["Module"] == "none" and units["ControlNet 0"]["Control Mode"] == "Balanced"
    assert units["ControlNet 1"]["Module"] == "canny" and units["ControlNet 1"]["Threshold A"] == "100.0"
    assert units["ControlNet 1"]["Control Mode"] == "ControlNet is more important"


def test_cli_control(tmp_path, capsys):
    from sdengine.cli import main
    from support.tiny import save_tiny_pipeline

    model = save_tiny_pipeline("sd15", tmp_path / "model")
    tiny_controlnet("sd15", 0).save_pretrained(tmp_path / "cn0", safe_serialization=True)
    tiny_controlnet("sd15", 1).save_pretrained(tmp_path / "cn1", safe_serialization=True)
    CONTROL_IMAGES[0].save(tmp_path / "a.png")
    CONTROL_IMAGES[1].save(tmp_path / "b.png")
    out = tmp_path / "out.png"
    assert main(["generate", "a red bicycle", "--model", str(model), "-o", str(out), "--steps", "2", "--seed", "3",
                 "--no-progress", "--sampler", "euler", "--control", f"{tmp_path / 'cn0'}:{tmp_path / 'a.png'}:0.7",
                 "--control", f"{tmp_path / 'cn1'}:{tmp_path / 'b.png'}:1.2:0.0:0.5"]) == 0
    text = Image.open(out).text["parameters"]
    assert "ControlNet 0: \"Module: none, Model: cn0" in text and "Weight: 0.7" in text
    assert "ControlNet 1: \"Module: none, Model: cn1" in text and "Guidance End: 0.5" in text
    assert Image.open(out).size == (W, H)  # the control image's size
    pipe = sdengine.load(model)
    want = pipe("a red bicycle", steps=2, seed=3, progress=False, sampler="euler", control=[
        Control(str(tmp_path / "cn0"), CONTROL_IMAGES[0], scale=0.7),
        Control(str(tmp_path / "cn1"), CONTROL_IMAGES[1], scale=1.2, start=0.0, end=0.5)]).images[0]
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(want))
    capsys.readouterr()
    assert main(["generate", "x", "--model", str(model), "-o", str(out), "--control",
                 f"{tmp_path / 'cn0'}:{tmp_path / 'a.png'}:0.2:0.5"]) == 2
    assert "give MODEL:IMAGE, MODEL:IMAGE:SCALE or MODEL:IMAGE:SCALE:START:END" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# The benchmark's ControlNet workload (sdengine bench --controlnet N)
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind,count", [("sd15", 2), ("sdxl", 1)])
def test_bench_runners_time_the_same_controlnet_step(kind, count):
    """With --controlnet N, diffusers' ControlNet pipeline and sdengine's backends (eager, graph) time
    the same UNet + ControlNets step on the same random ControlNets, and the same generation."""
    from sdengine.bench.reference import reference_pipeline
    from sdengine.bench.runners import DiffusersRunner, EngineRunner, Workload, make_inputs
    from sdengine.config import tiny_config

    cfg = tiny_config(kind)
    source = reference_pipeline(cfg, seed=3)
    workload = Workload("tiny", H, W, steps=2, batch=1, dtype="fp32", sampler="euler", controlnets=count)
    cpu = torch.device("cpu")
    theirs = DiffusersRunner(source, cfg, workload, cpu)
    plain = EngineRunner("eager", source, cfg, Workload("tiny", H, W, steps=2, batch=1, dtype="fp32"), cpu)
    with torch.inference_mode():
        for name in ("eager", "graph"):
            ours = EngineRunner(name, source, cfg, workload, cpu)
            use_stand_in(ours.backend) if name == "graph" else None
            for args in make_inputs("unet_step", cfg, workload, cpu, torch.float32, 2, seed=11):
                a, b = theirs.unet_step(args), ours.unet_step(args)
                assert float((a - b).abs().max()) <= 1e-4 * float(b.abs().max()) + 1e-6, name
                assert float((b - plain.unet_step(args)).abs().max()) > 1e-3  # the ControlNets ran
            args = {"prompts": ["a red cube"], "seed": 5}
            images_theirs, images_ours = theirs.end_to_end(args), ours.end_to_end(args).images
            assert max_diff(np.asarray(images_theirs[0]), np.asarray(images_ours[0])) <= 2, name
            assert ours.ran()["fused_step"] == (name == "graph") and ours.unet_calls == 2
    assert type(theirs.pipe).__name__ == ("StableDiffusionXLControlNetPipeline" if kind == "sdxl"
                                          else "StableDiffusionControlNetPipeline")


@pytest.mark.gpu
@pytest.mark.parametrize("layer", ["graph", "triton", "compile"])
def test_cuda_layers_run_controlnets_in_the_captured_step(layer):
    """On CUDA in fp16: the ControlNets inside real CUDA graphs of the whole step match eager, and a
    second run (another scale, a LoRA-free rerun) replays without capturing again."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    pipe = copy.deepcopy(tiny_pipeline("sd15")).to("cuda", torch.float16)
    fast = sdengine.from_diffusers(pipe, backend=layer)
    eager = sdengine.from_diffusers(copy.deepcopy(tiny_pipeline("sd15")).to("cuda", torch.float16))
    controlnet = sdengine_controlnet("sd15", 0, torch.float16)
    controlnet.model.to("cuda")
    kwargs = dict(height=H, width=W, steps=STEPS, guidance_scale=5.0, seed=[3, 4], output_type="np", progress=False,
                  sampler="euler")
    controls = [Control(controlnet, CONTROL_IMAGES[0], scale=0.8, start=0.25, end=0.75)]
    got, want = fast(PROMPTS, control=controls, **kwargs).images, eager(PROMPTS, control=controls, **kwargs).images
    assert np.abs(got - want).mean() < 0.02
    captures = fast.backend.graphs.captures
    other = [Control(controlnet, CONTROL_IMAGES[0], scale=0.3, start=0.25, end=0.75)]
    assert np.abs(fast(PROMPTS, control=other, **kwargs).images - eager(PROMPTS, control=other, **kwargs).images
                  ).mean() < 0.02
    assert fast.backend.graphs.captures == captures


def test_bench_record_names_the_controlnets():
    from sdengine.bench.harness import Benchmark, BenchOptions
    from sdengine.bench.output import title

    bench = Benchmark(BenchOptions(arch="tiny", backends=("eager",), components=("unet_step",), controlnets=2,
                                   height=H, width=W, device="cpu"), progress=False)
    assert bench.record["workload"]["controlnets"] == 2 and bench.workload.controlnets == 2
    assert "--controlnet 2" in bench.command() and ", 2 ControlNets," in title(bench.record)


def test_aoti_backend_runs_controlnets_through_compiled_engines():
    """The aoti backend (the engine from the Python loop): the ControlNets through controlnet.pt2 and the UNet that takes their
    residuals through unet_control.pt2 (export/aoti_controlnet.py; built once into the engine cache,
    about a minute for the tiny pair on the CPU), against the eager pipeline."""
    native = sdengine.from_diffusers(tiny_pipeline("sd15"), backend="aoti")
    eager = sdengine.from_diffusers(tiny_pipeline("sd15"))
    controls = [Control(sdengine_controlnet("sd15", 0), CONTROL_IMAGES[0], scale=0.7, start=0.25, end=0.75),
                Control(sdengine_controlnet("sd15", 1), CONTROL_IMAGES[1], scale=1.1, guess_mode=True)]
    kwargs = dict(height=H, width=W, steps=STEPS, guidance_scale=5.0, seed=[3, 4], output_type="np", progress=False,
                  sampler="euler")
    got = native(PROMPTS, control=controls, **kwargs).images
    assert max_diff(got, eager(PROMPTS, control=controls, **kwargs).images) <= 1 / 255
    assert max_diff(got, native(PROMPTS, **kwargs).images) > 0.05
    engines = native.backend._controlnet_engines
    assert len(engines) == 1  # both ControlNets share the architecture, so one engine
    meta = __import__("json").loads((next(iter(engines.values())) / "controlnet_engine.json").read_text())
    assert set(meta["networks"]) == {"controlnet", "unet_control"}
    assert all(v == [["control_model." + k2, ""], [k2, ""]] for v in meta["networks"]["controlnet"]["ldm"].values()
               for k2 in [v[1][0]])


def test_c_api_runs_controlnets(tmp_path, capsys):
    """The C API: sde_controlnet_load (a diffusers folder and an A1111 single file) for a model,
    sde_gen_params.controls with two ControlNets (ranges, scales, guess mode) in one C++ request,
    against the eager pipeline; bad controls refused naming the parameter (tests/c/test_capi.c)."""
    from safetensors.torch import save_file

    from sdengine.export.aoti_controlnet import controlnet_engine_for
    from support.ldm_keys import controlnet_to_ldm
    from support.native import compile_c, run_program
    from support.tiny import save_tiny_pipeline

    model_dir = save_tiny_pipeline("sd15", tmp_path / "model")
    native = sdengine.load(model_dir, backend="native")  # the model's engine, from the cache or built
    tiny_controlnet("sd15", 0).save_pretrained(tmp_path / "cn0", safe_serialization=True)
    save_file(controlnet_to_ldm(tiny_controlnet("sd15", 1)), str(tmp_path / "cn1.safetensors"))
    tiny_controlnet("sdxl", 0).save_pretrained(tmp_path / "misfit", safe_serialization=True)
    engine = controlnet_engine_for(native.config, sdengine_controlnet("sd15", 0).config, dtype=torch.float32,
                                   device="cpu", progress=False)
    for i, image in enumerate(CONTROL_IMAGES[:2]):
        (tmp_path / f"image{i}.rgb").write_bytes(np.asarray(image).tobytes())
    program = compile_c(Path(__file__).parent / "c" / "test_capi.c", tmp_path / "sde_capi_test", ["-lpthread"])
    rc, log = run_program([program, "controlnet", model_dir, native.backend.engine_dir, tmp_path / "cn0",
                           tmp_path / "cn1.safetensors", engine, tmp_path / "image0.rgb", tmp_path / "image1.rgb", W, H,
                           tmp_path / "out.rgb", tmp_path / "misfit"])
    assert rc == 0, log
    got = np.frombuffer((tmp_path / "out.rgb").read_bytes(), dtype=np.uint8).reshape(H, W, 3)
    eager = sdengine.from_diffusers(tiny_pipeline("sd15"))
    controls = [Control(sdengine_controlnet("sd15", 0), CONTROL_IMAGES[0], scale=0.7, start=0.25, end=0.75),
                Control(sdengine_controlnet("sd15", 1), CONTROL_IMAGES[1], scale=1.1, guess_mode=True)]
    want = eager("a red bicycle", control=controls, height=H, width=W, steps=STEPS, guidance_scale=5.0, seed=3,
                 sampler="euler", output_type="np", progress=False).images[0]
    assert np.abs(got.astype(int) - (want * 255).round().astype(int)).max() <= 2
    plain = eager("a red bicycle", height=H, width=W, steps=STEPS, guidance_scale=5.0, seed=3, sampler="euler",
                  output_type="np", progress=False).images[0]
    assert np.abs(got.astype(int) - (plain * 255).round().astype(int)).max() > 10  # the ControlNets acted
    # `sdengine export aoti MODEL --controlnet PATH` names (here: finds) both engines
    from sdengine.cli import main

    capsys.readouterr()
    assert main(["export", "aoti", str(model_dir), "--controlnet", str(tmp_path / "cn1.safetensors")]) == 0
    printed = capsys.readouterr().out.split()
    assert printed[-2:] == [str(native.backend.engine_dir), str(engine)]
