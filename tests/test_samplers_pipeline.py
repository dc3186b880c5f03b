"""Every sampler in the full pipeline against diffusers' StableDiffusionPipeline.

Tiny random SD1.5 weights, 10 steps, classifier-free guidance, the same initial latents,
prompt and per-image generators on both sides: the images agree within 1/255. Also a few
samplers on the v-prediction SD2 model and in img2img.
dpmpp_sde (diffusers' DPMSolverSDEScheduler needs torchsde, not installed) and dpmpp_3m_sde
(no diffusers counterpart) are covered against float64 references in test_samplers.py.

Budget: about 30 s on 2 busy cores.
"""

import numpy as np
import pytest
import torch

import diffusers
import sdengine
from sdengine.bench.reference import scheduler_for_sampler
from support.tiny import tiny_pipeline

PROMPT = "a lighthouse on a cliff at dusk"
H, W = 8, 8
STEPS = 10
TOL = 1 / 255

# (sdengine sampler, schedule, diffusers scheduler class); the class and the config values that
# select the algorithm come from the package's one table (sdengine.bench.reference), which the
# benchmark's diffusers anchor uses too.
CASES = [
    ("ddim", None, "DDIMScheduler"),
    ("ddpm", None, "DDPMScheduler"),
    ("pndm", None, "PNDMScheduler"),
    ("lms", None, "LMSDiscreteScheduler"),
    ("euler", None, "EulerDiscreteScheduler"),
    ("euler_a", None, "EulerAncestralDiscreteScheduler"),
    ("heun", None, "HeunDiscreteScheduler"),
    ("dpm_2", None, "KDPM2DiscreteScheduler"),
    ("dpm_2_a", None, "KDPM2AncestralDiscreteScheduler"),
    ("dpmpp_2m", None, "DPMSolverMultistepScheduler"),
    ("dpmpp_2m_karras", None, "DPMSolverMultistepScheduler"),
    ("dpmpp_2m_sde", "karras", "DPMSolverMultistepScheduler"),
    ("unipc", None, "UniPCMultistepScheduler"),
    ("lcm", None, "LCMScheduler"),
]


def matching_scheduler(ref_pipe, ours, sampler, schedule, scheduler_class):
    """diffusers' scheduler for sdengine's (sampler, schedule), from the reference pipeline's config."""
    scheduler = scheduler_for_sampler(*sdengine.samplers.resolve(sampler, schedule, ours.config.scheduler),
                                      ref_pipe.scheduler.config)
    assert type(scheduler).__name__ == scheduler_class
    return scheduler


@pytest.fixture(scope="module")
def pipelines():
    ref = tiny_pipeline("sd15")
    return ref, sdengine.from_diffusers(ref)


@pytest.mark.parametrize("sampler,schedule,scheduler_class", CASES, ids=[c[0] for c in CASES])
def test_sampler_in_pipeline_matches_diffusers(pipelines, sampler, schedule, scheduler_class):
    ref_pipe, ours = pipelines
    scheduler = matching_scheduler(ref_pipe, ours, sampler, schedule, scheduler_class)
    ref_pipe = diffusers.StableDiffusionPipeline(**{**ref_pipe.components, "scheduler": scheduler})
    cfg = ours.config
    latents = torch.randn(2, cfg.vae.latent_channels, H // cfg.vae.downscale, W // cfg.vae.downscale,
                          generator=torch.Generator().manual_seed(5))
    seeds = [21, 22]
    ref = ref_pipe([PROMPT] * 2, num_inference_steps=STEPS, guidance_scale=5.0, height=H, width=W,
                   latents=latents.clone(), generator=[torch.Generator().manual_seed(s) for s in seeds],
                   output_type="np").images
    got = ours(PROMPT, batch_size=2, steps=STEPS, guidance_scale=5.0, height=H, width=W, latents=latents.clone(),
               seed=seeds, sampler=sampler, schedule=schedule, output_type="np", progress=False).images
    diff = float(np.abs(got.astype(np.float64) - ref.astype(np.float64)).max())
    assert diff <= TOL, f"{sampler}: max |difference| {diff * 255:.2f}/255"
    assert got.std() > 0.01


V_CASES = [
    ("ddim", None, "DDIMScheduler"),
    ("euler_a", None, "EulerAncestralDiscreteScheduler"),
    ("dpmpp_2m", "karras", "DPMSolverMultistepScheduler"),
    ("unipc", None, "UniPCMultistepScheduler"),
]


@pytest.mark.parametrize("sampler,schedule,scheduler_class", V_CASES, ids=[c[0] for c in V_CASES])
def test_sampler_with_v_prediction_model(sampler, schedule, scheduler_class):
    ref_pipe = tiny_pipeline("sd21-v")
    ours = sdengine.from_diffusers(ref_pipe)
    scheduler = matching_scheduler(ref_pipe, ours, sampler, schedule, scheduler_class)
    ref_pipe = diffusers.StableDiffusionPipeline(**{**ref_pipe.components, "scheduler": scheduler})
    cfg = ours.config
    latents = torch.randn(1, cfg.vae.latent_channels, H // cfg.vae.downscale, W // cfg.vae.downscale,
                          generator=torch.Generator().manual_seed(6))
    ref = ref_pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=5.0, height=H, width=W, latents=latents.clone(),
                   generator=[torch.Generator().manual_seed(9)], output_type="np").images
    got = ours(PROMPT, steps=STEPS, guidance_scale=5.0, height=H, width=W, latents=latents.clone(), seed=[9],
               sampler=sampler, schedule=schedule, output_type="np", progress=False).images
    diff = float(np.abs(got.astype(np.float64) - ref.astype(np.float64)).max())
    assert diff <= TOL, f"{sampler}: max |difference| {diff * 255:.2f}/255"


IMG2IMG_CASES = [
    ("euler_a", "EulerAncestralDiscreteScheduler", 0.6),
    ("dpmpp_2m_sde", "DPMSolverMultistepScheduler", 0.7),
    ("heun", "HeunDiscreteScheduler", 0.5),
]


@pytest.mark.parametrize("sampler,scheduler_class,strength", IMG2IMG_CASES, ids=[c[0] for c in IMG2IMG_CASES])
def test_sampler_in_img2img_matches_diffusers(pipelines, sampler, scheduler_class, strength):
    ref_pipe, ours = pipelines
    scheduler = matching_scheduler(ref_pipe, ours, sampler, None, scheduler_class)
    ref_pipe = diffusers.StableDiffusionImg2ImgPipeline(**{**ref_pipe.components, "scheduler": scheduler})
    image = torch.rand(3, H, W, generator=torch.Generator().manual_seed(2)).numpy().transpose(1, 2, 0)
    ref = ref_pipe(PROMPT, image=image[None], strength=strength, num_inference_steps=STEPS, guidance_scale=5.0,
                   generator=[torch.Generator().manual_seed(31)], output_type="np").images
    got = ours(PROMPT, init_image=image, strength=strength, steps=STEPS, guidance_scale=5.0, seed=[31],
               sampler=sampler, output_type="np", progress=False).images
    diff = float(np.abs(got.astype(np.float64) - ref.astype(np.float64)).max())
    assert diff <= TOL, f"{sampler}: max |difference| {diff * 255:.2f}/255"
