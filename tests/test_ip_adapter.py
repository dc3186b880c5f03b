"""IP-Adapter against diffusers' load_ip_adapter + set_ip_adapter_scale, on tiny random models.

The adapters are files in the original layout (tests/support/ip_adapter_files.py): basic and Plus,
.safetensors and .bin; the image encoder a transformers CLIPVisionModelWithProjection folder. The
image prompts have odd sizes, so that the resize and the centre crop count. Each test checks that
the image prompt changes the image.
"""

import copy

import numpy as np
import pytest
import torch
from PIL import Image

import sdengine
from sdengine.errors import InvalidArgumentError, ModelLoadError
from support.compare import max_diff
from support.graph_stand_in import use_stand_in
from support.ip_adapter_files import write_image_encoder, write_ip_adapter
from support.tiny import tiny_pipeline

H, W, STEPS = 16, 24, 4
PROMPT = "a cat in a garden"


def _image(width, height, seed):
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(height, width, 3, generator=g).numpy() * 255).astype("uint8"))


IMAGE, OTHER = _image(301, 257, 1), _image(190, 333, 2)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """image_encoder/ and adapters for the tiny SD1 and SDXL models, as diffusers' load_ip_adapter reads them."""
    root = tmp_path_factory.mktemp("ip")
    write_image_encoder(root / "image_encoder")
    write_ip_adapter(root / "sd15.safetensors", "sd15")
    write_ip_adapter(root / "sd15-second.bin", "sd15", seed=1)
    write_ip_adapter(root / "sd15-plus.safetensors", "sd15", plus=True, seed=2)
    write_ip_adapter(root / "sdxl.safetensors", "sdxl", seed=3)
    return root


def _diffusers(kind, folder, names, scales, images, **kwargs):
    from diffusers import EulerDiscreteScheduler

    ref = copy.deepcopy(tiny_pipeline(kind))  # load_ip_adapter rewrites the UNet's processors
    ref.scheduler = EulerDiscreteScheduler.from_config(ref.scheduler.config)
    ref.load_ip_adapter(str(folder), subfolder="", weight_name=names, image_encoder_folder="image_encoder")
    ref.set_ip_adapter_scale(scales)
    return ref(PROMPT, ip_adapter_image=images, height=H, width=W, num_inference_steps=STEPS, guidance_scale=5.0,
               output_type="np", generator=torch.Generator().manual_seed(4), **kwargs).images


def _ours(pipe, **kwargs):
    return pipe(PROMPT, height=H, width=W, steps=STEPS, guidance_scale=5.0, seed=4, sampler="euler",
                output_type="np", progress=False, **kwargs).images


def _pipe(kind, layer="eager"):
    options = {"compiler": "aot_eager"} if layer == "compile" else None
    pipe = sdengine.from_diffusers(tiny_pipeline(kind), backend=layer, backend_options=options)
    graphs = use_stand_in(pipe.backend) if layer != "eager" else None
    return pipe, graphs


def test_preprocessing_equals_clip_image_processor():
    from transformers import CLIPImageProcessor

    from sdengine.ip_adapter import preprocess

    for image in (IMAGE, OTHER, _image(224, 224, 3), _image(640, 97, 4)):
        want = CLIPImageProcessor()(image, return_tensors="pt").pixel_values
        assert max_diff(preprocess(image, 224), want) < 1e-5


@pytest.mark.parametrize("name", ["sd15.safetensors", "sd15-plus.safetensors"])
def test_matches_diffusers(folder, name):
    want = _diffusers("sd15", folder, name, 0.6, IMAGE)
    pipe, _ = _pipe("sd15")
    assert pipe.load_ip_adapter(folder / name, image_encoder=folder / "image_encoder") == [name.split(".")[0]]
    got = _ours(pipe, ip_adapter_image=IMAGE, ip_adapter_scale=0.6)
    assert max_diff(got, want) <= 1 / 255
    other = _ours(pipe, ip_adapter_image=OTHER, ip_adapter_scale=0.6)
    assert max_diff(got, other) > 0.02  # the image prompt counts


def test_two_adapters_and_bin_files(folder):
    """Two adapters at once, one of them a .bin (torch.load(weights_only=True)), each with its scale."""
    want = _diffusers("sd15", folder, ["sd15.safetensors", "sd15-second.bin"], [0.6, 0.3], [IMAGE, OTHER])
    pipe, _ = _pipe("sd15")
    pipe.load_ip_adapter([folder / "sd15.safetensors", folder / "sd15-second.bin"], image_encoder=folder / "image_encoder")
    got = _ours(pipe, ip_adapter_image=[IMAGE, OTHER], ip_adapter_scale=[0.6, 0.3])
    assert max_diff(got, want) <= 1 / 255


def test_sdxl_matches_diffusers(folder):
    want = _diffusers("sdxl", folder, "sdxl.safetensors", 0.7, OTHER, negative_prompt="blurry")
    pipe, _ = _pipe("sdxl")
    pipe.load_ip_adapter(folder / "sdxl.safetensors", image_encoder=folder / "image_encoder")
    got = _ours(pipe, ip_adapter_image=OTHER, ip_adapter_scale=0.7, negative_prompt="blurry")
    assert max_diff(got, want) <= 1 / 255


@pytest.mark.parametrize("layer", ["graph", "triton", "compile"])
def test_fast_layers_run_it_inside_the_captured_step(folder, layer):
    """The image tokens and scales are step inputs: a new image or scale replays the step captured
    for the first, with nothing captured again, and gives the eager backend's image."""
    eager, _ = _pipe("sd15")
    fast, graphs = _pipe("sd15", layer)
    for pipe in (eager, fast):
        pipe.load_ip_adapter(folder / "sd15-plus.safetensors", image_encoder=folder / "image_encoder")
    first = _ours(fast, ip_adapter_image=IMAGE, ip_adapter_scale=0.6)
    captures = graphs.captures
    second = _ours(fast, ip_adapter_image=OTHER, ip_adapter_scale=0.9)
    assert graphs.captures == captures, "a new image prompt recaptured the step"
    assert any(k[0] == "step" for k in graphs.entries)
    assert max_diff(first, _ours(eager, ip_adapter_image=IMAGE, ip_adapter_scale=0.6)) <= 1 / 255
    assert max_diff(second, _ours(eager, ip_adapter_image=OTHER, ip_adapter_scale=0.9)) <= 1 / 255


def test_with_deepcache_tgate_and_tome_the_graph_layer_matches_eager(folder):
    """DeepCache, T-GATE and ToMe (issue 28's caches) and the image attention in one UNet: two
    adapters on the graph layer's whole step, whose steps after T-GATE's gate take the unconditional
    rows of every added_cond tensor (image tokens and scales alike), equal the eager run; the image
    prompts still count."""
    eager, _ = _pipe("sd15")
    fast, graphs = _pipe("sd15", "graph")
    for pipe in (eager, fast):
        pipe.load_ip_adapter([folder / "sd15.safetensors", folder / "sd15-plus.safetensors"],
                             image_encoder=folder / "image_encoder")
    options = dict(ip_adapter_image=[IMAGE, OTHER], ip_adapter_scale=[0.6, 0.8], deepcache=2, tome=0.5,
                   tgate=sdengine.TGate(gate_step=3, sp_interval=2, warm_up=1))
    want = _ours(eager, **options)
    assert max_diff(_ours(fast, **options), want) <= 1 / 255
    assert any(k[0] == "step" for k in graphs.entries)
    assert max_diff(_ours(eager, **dict(options, ip_adapter_image=[OTHER, IMAGE])), want) > 0.01


def test_unload_restores_the_model_bit_for_bit(folder):
    pipe, _ = _pipe("sd15")
    before_state = {k: v.clone() for k, v in pipe.backend.unet.state_dict().items()}
    before = _ours(pipe)
    pipe.load_ip_adapter(folder / "sd15.safetensors", image_encoder=folder / "image_encoder")
    with_adapter = _ours(pipe, ip_adapter_image=IMAGE)
    assert max_diff(before, with_adapter) > 0.02
    assert np.array_equal(_ours(pipe), before)  # loaded but not prompted: the plain model
    pipe.unload_ip_adapter()
    after_state = pipe.backend.unet.state_dict()
    assert after_state.keys() == before_state.keys()
    assert all(torch.equal(after_state[k], v) for k, v in before_state.items())
    assert np.array_equal(_ours(pipe), before)
    with pytest.raises(InvalidArgumentError, match="ip_adapter_image"):
        _ours(pipe, ip_adapter_image=IMAGE)


def test_infotext_names_the_adapter_as_a1111s_controlnet_extension(folder):
    pipe, _ = _pipe("sd15")
    pipe.load_ip_adapter(folder / "sd15.safetensors", image_encoder=folder / "image_encoder")
    result = pipe(PROMPT, height=H, width=W, steps=2, seed=1, progress=False, ip_adapter_image=IMAGE,
                  ip_adapter_scale=0.6)
    assert 'ControlNet 0: "Module: ip-adapter_clip_sd15, Model: sd15, Weight: 0.6' in result.infotext() \
        or 'ControlNet 0: "Module: ip-adapter_clip_sd15, Model: sd15 [' in result.infotext()


@pytest.mark.parametrize("kwargs,parameter", [
    (dict(ip_adapter_image=[IMAGE, OTHER]), "ip_adapter_image"),          # two images, one adapter
    (dict(ip_adapter_image=IMAGE, ip_adapter_scale=[0.5, 0.5]), "ip_adapter_scale"),
    (dict(ip_adapter_scale=0.5), "ip_adapter_scale"),                     # no image
    (dict(ip_adapter_image=IMAGE, ip_adapter_scale=float("inf")), "ip_adapter_scale"),
    (dict(ip_adapter_image="photo.png"), "ip_adapter_image"),
])
def test_bad_arguments_name_the_parameter(folder, kwargs, parameter):
    pipe, _ = _pipe("sd15")
    pipe.load_ip_adapter(folder / "sd15.safetensors", image_encoder=folder / "image_encoder")
    with pytest.raises(InvalidArgumentError) as info:
        _ours(pipe, **kwargs)
    assert info.value.parameter == parameter


def test_bad_files_are_refused_with_nothing_changed(folder, tmp_path):
    pipe, _ = _pipe("sd15")
    with pytest.raises(ValueError, match="image_encoder"):
        pipe.load_ip_adapter(folder / "sd15.safetensors")
    with pytest.raises(ModelLoadError, match="context width 32"):  # an SDXL adapter on SD1
        pipe.load_ip_adapter(folder / "sdxl.safetensors", image_encoder=folder / "image_encoder")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match="junk"):
        pipe.load_ip_adapter(tmp_path / "junk.safetensors", image_encoder=folder / "image_encoder")
    with pytest.raises(FileNotFoundError):
        pipe.load_ip_adapter(tmp_path / "missing.bin", image_encoder=folder / "image_encoder")
    assert all(len(m.ip_layers) == 0 for m in pipe.backend.unet.modules() if hasattr(m, "ip_layers"))


def test_backends_without_it_say_so(folder):
    from sdengine.backends.base import BaseBackend

    class Compiled(BaseBackend):
        name = "aoti"

    pipe, _ = _pipe("sd15")
    pipe.backend = Compiled()
    with pytest.raises(ValueError, match="aoti backend cannot run IP-Adapter"):
        pipe.load_ip_adapter(folder / "sd15.safetensors", image_encoder=folder / "image_encoder")
