"""SDXL base + refiner: the handoff against diffusers' ensemble of expert denoisers, the refiner
alone as img2img, its aesthetic score and per-model force_zeros_for_empty_prompt, loading, errors.

diffusers' reference: StableDiffusionXLPipeline(denoising_end=f, output_type="latent"), then
StableDiffusionXLImg2ImgPipeline(image=latents, denoising_start=f) with the same generators, the
refiner a tiny random one with text_encoder_2 only, requires_aesthetics_score=True and
force_zeros_for_empty_prompt=False, as the published refiner's folder says.
"""

import numpy as np
import pytest
import torch
from PIL import Image

import sdengine
from sdengine.errors import InvalidArgumentError
from support.compare import max_diff
from support.graph_stand_in import use_stand_in
from support.tiny import save_tiny_pipeline, tiny_pipeline

H, W = 16, 24
STEPS = 10
LAYERS = ["eager", "graph", "triton", "compile"]



def _pipe(kind, layer="eager"):
    """The tiny diffusers pipeline `kind` on a speed layer (stand-in CUDA graphs on the CPU;
    compile with torch.compile's aot_eager)."""
    options = {"compiler": "aot_eager"} if layer == "compile" else None
    pipe = sdengine.from_diffusers(tiny_pipeline(kind), backend=layer, backend_options=options)
    if layer != "eager":
        use_stand_in(pipe.backend)
    return pipe


def _diffusers_handoff(prompt, negative, switch, sampler_cls=None, steps=STEPS, seeds=(3,)):
    base, refiner = tiny_pipeline("sdxl"), tiny_pipeline("sdxl-refiner")
    if sampler_cls is not None:  # new pipelines over the cached ones' components
        base = type(base)(**{**base.components, "scheduler": sampler_cls.from_config(base.scheduler.config)})
        refiner = type(refiner)(**{**refiner.components, "scheduler": sampler_cls.from_config(refiner.scheduler.config)},
                                requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    latents = base(prompt, negative_prompt=negative, height=H, width=W, num_inference_steps=steps,
                   guidance_scale=5.0, denoising_end=switch, output_type="latent", generator=generators,
                   num_images_per_prompt=len(seeds)).images
    return refiner(prompt, negative_prompt=negative, image=latents, num_inference_steps=steps, guidance_scale=5.0,
                   denoising_start=switch, output_type="np", generator=generators,
                   num_images_per_prompt=len(seeds)).images


def _ours(base, refiner, prompt, negative, switch, sampler="euler", seeds=(3,), **kwargs):
    return base(prompt, negative_prompt=negative, height=H, width=W, steps=STEPS, guidance_scale=5.0,
                seed=list(seeds), batch_size=len(seeds), sampler=sampler, output_type="np", progress=False,
                refiner=refiner, refiner_switch_at=switch, **kwargs).images


@pytest.mark.parametrize("layer,negative", [("eager", None), ("eager", "blurry, low quality")]
                         + [(layer, None) for layer in LAYERS[1:]])
def test_handoff_matches_diffusers(layer, negative):
    """Euler on both, one schedule cut at 0.8; without a negative prompt the refiner encodes ""
    (its force_zeros_for_empty_prompt is false) while the base uses zeros. The refiner's steps
    run on the layer's fused step where it has one."""
    want = _diffusers_handoff("a red bicycle", negative, 0.8)
    base, refiner = _pipe("sdxl", layer), _pipe("sdxl-refiner", layer)
    got = _ours(base, refiner, "a red bicycle", negative, 0.8)
    assert max_diff(got, want) <= 1 / 255
    if layer != "eager":
        steps = [k for k in refiner.backend.graphs.entries if k[0] == "step"]
        assert steps, "the refiner's steps ran outside the layer's whole step"
    alone = base("a red bicycle", negative_prompt=negative, height=H, width=W, steps=STEPS, guidance_scale=5.0,
                 seed=3, sampler="euler", output_type="np", progress=False).images
    assert max_diff(got, alone) > 0.02  # the refiner changed the base's image


@pytest.mark.parametrize("sampler,scheduler", [("euler_a", "EulerAncestralDiscreteScheduler"),
                                               ("dpmpp_2m", "DPMSolverMultistepScheduler")])
def test_handoff_other_samplers(sampler, scheduler):
    """A stochastic sampler continues the base's generators (diffusers with the same generator
    objects on both); a multistep one restarts its history on the refiner and does not take a
    lower-order step where the base stops. Two images, one per seed."""
    import diffusers

    want = _diffusers_handoff("a blue boat", None, 0.7, getattr(diffusers, scheduler), seeds=(5, 6))
    got = _ours(_pipe("sdxl"), _pipe("sdxl-refiner"), "a blue boat", None, 0.7, sampler=sampler, seeds=(5, 6))
    assert max_diff(got, want) <= 1 / 255


def test_refiner_img2img_with_aesthetic_scores():
    """The refiner alone: diffusers' StableDiffusionXLImg2ImgPipeline on an image, with aesthetic
    scores other than the defaults (the negative rows get the negative score)."""
    g = torch.Generator().manual_seed(11)
    image = Image.fromarray((torch.rand(H, W, 3, generator=g).numpy() * 255).astype("uint8"))
    want = tiny_pipeline("sdxl-refiner")("a castle", image=image, strength=0.6, num_inference_steps=STEPS,
                                         guidance_scale=5.0, aesthetic_score=7.5, negative_aesthetic_score=1.0,
                                         output_type="np", generator=torch.Generator().manual_seed(2)).images
    refiner = _pipe("sdxl-refiner")
    got = refiner("a castle", init_image=image, strength=0.6, steps=STEPS, guidance_scale=5.0, seed=2,
                  aesthetic_score=7.5, negative_aesthetic_score=1.0, sampler="euler", output_type="np",
                  progress=False).images
    assert max_diff(got, want) <= 1 / 255
    default = refiner("a castle", init_image=image, strength=0.6, steps=STEPS, guidance_scale=5.0, seed=2,
                      sampler="euler", output_type="np", progress=False).images
    assert max_diff(got, default) > 1e-3  # the scores reach the UNet


def test_refiner_folder_loads_and_records_the_handoff(tmp_path):
    """A saved diffusers refiner folder (model_index.json: text_encoder null, requires_aesthetics_score,
    force_zeros_for_empty_prompt false) loads as the refiner; the infotext names it and the switch."""
    folder = save_tiny_pipeline("sdxl-refiner", tmp_path / "refiner")
    refiner = sdengine.load(folder, device="cpu", dtype="fp32")
    cfg = refiner.config
    assert cfg.is_refiner and cfg.requires_aesthetics_score and not cfg.force_zeros_for_empty_prompt
    assert refiner.tokenizer is None and refiner.backend.text_encoder is None
    assert sdengine.ModelConfig.from_dict(cfg.to_dict()) == cfg
    base = _pipe("sdxl")
    result = base("a red bicycle", height=H, width=W, steps=STEPS, guidance_scale=5.0, seed=3, sampler="euler",
                  output_type="np", progress=False, refiner=refiner, refiner_switch_at=0.8, prompt_syntax="a1111")
    assert max_diff(result.images, _diffusers_handoff("a red bicycle", None, 0.8)) <= 1 / 255
    assert "Refiner: refiner, Refiner switch at: 0.8" in result.infotext()


def test_callback_counts_both_passes():
    steps = []
    _pipe("sdxl")("a cat", height=H, width=W, steps=STEPS, seed=1, sampler="euler", output_type="latent",
                  progress=False, refiner=_pipe("sdxl-refiner"), refiner_switch_at=0.8,
                  callback=lambda i, total, latents: steps.append((i, total)))
    assert steps == [(i, STEPS) for i in range(STEPS)]


@pytest.mark.parametrize("kwargs,parameter", [
    (dict(refiner_switch_at=0.8), "refiner_switch_at"),                       # no refiner
    (dict(refiner="refiner/", refiner_switch_at=0.5), "refiner"),            # not a Pipeline
    (dict(refiner=True, refiner_switch_at=1.0), "refiner_switch_at"),        # out of (0, 1)
    (dict(refiner=True, refiner_switch_at=0.02), "refiner_switch_at"),       # leaves the base no step
    (dict(refiner=True, hires=sdengine.Hires()), "hires"),                   # not together
    (dict(refiner="sd15"), "refiner"),                                        # not an SDXL model
    (dict(aesthetic_score=float("nan")), "aesthetic_score"),
])
def test_bad_arguments_name_the_parameter(kwargs, parameter):
    if kwargs.get("refiner") is True:
        kwargs["refiner"] = _pipe("sdxl-refiner")
    elif kwargs.get("refiner") == "sd15":
        kwargs["refiner"] = _pipe("sd15")
    with pytest.raises(InvalidArgumentError) as info:
        _pipe("sdxl")("a cat", height=H, width=W, steps=STEPS, seed=1, progress=False, **kwargs)
    assert info.value.parameter == parameter


def test_refiner_single_file_loads_as_the_folder(tmp_path):
    """An A1111 / Civitai refiner file (conditioner.embedders.0.model.* OpenCLIP bigG only, label_emb of
    pooled + 5 numbers): detected as a refiner, the same images as its diffusers folder."""
    from sdengine.loading import load_model
    from sdengine.single_file import save_single_file

    folder = save_tiny_pipeline("sdxl-refiner", tmp_path / "refiner")
    path = save_single_file(load_model(folder, device="cpu", dtype=torch.float32, progress=False),
                            tmp_path / "sd_xl_refiner.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("conditioner.embedders.0.model.") for k in keys)
    assert not any(k.startswith("conditioner.embedders.1.") for k in keys)
    cfg = sdengine.loading.detect(path)
    want = sdengine.load(folder, device="cpu", dtype="fp32").config
    assert cfg.is_refiner and cfg.requires_aesthetics_score and not cfg.force_zeros_for_empty_prompt
    # what the shapes hold (head counts and norm groups follow the real refiner's rules, not the tiny model's)
    assert cfg.unet.block_out_channels == want.unet.block_out_channels
    assert cfg.unet.projection_class_embeddings_input_dim == want.unet.projection_class_embeddings_input_dim
    assert cfg.unet.addition_time_embed_dim == want.unet.addition_time_embed_dim
    assert cfg.text_encoder_2.hidden_size == want.text_encoder_2.hidden_size
    base = _pipe("sdxl")
    kwargs = dict(height=H, width=W, steps=STEPS, guidance_scale=5.0, seed=3, sampler="euler", output_type="np",
                  progress=False, refiner_switch_at=0.8)
    got = base("a red bicycle", refiner=sdengine.load(path, device="cpu", dtype="fp32", config=want), **kwargs).images
    assert max_diff(got, base("a red bicycle", refiner=sdengine.load(folder, device="cpu", dtype="fp32"),
                              **kwargs).images) <= 1e-5


def test_compiled_engines_refuse_the_refiner_by_name():
    from sdengine.config import tiny_config
    from sdengine.export.aoti import check_supported

    with pytest.raises(ValueError, match="refiner.*backend='eager'"):
        check_supported(tiny_config("sdxl-refiner"))
