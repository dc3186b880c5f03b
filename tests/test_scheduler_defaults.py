"""diffusers' rules for a scheduler config's missing keys: the class of the sampler that runs
gives its own defaults (SchedulerConfig.for_sampler), as <Class>.from_config does.

SD1.5's published scheduler_config.json (PNDMScheduler, steps_offset 1, skip_prk_steps, no
timestep_spacing) must give diffusers' schedule for every sampler, read from a diffusers folder
and as the single-file preset; each sampling key is dropped in turn from a full config too.

Budget: about 30 s on 2 busy cores.
"""

import inspect
import json

import diffusers
import numpy as np
import pytest
import torch

import sdengine
from sdengine.bench.reference import DIFFUSERS_SCHEDULERS
from sdengine.config import (NEUTRAL_SAMPLING_VALUES, PRESETS, SCHEDULER_CLASS_DEFAULTS, SD_PIPELINE_VALUES,
                             scheduler_config_from_dict)
from sdengine.samplers import make_plan
from support.tiny import save_tiny_pipeline

# runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json, as published
SD15_PUBLISHED = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
                  "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
                  "clip_sample": False}
# (KDPM2 interleaves its midpoints with its sigmas; its runs are compared in test_samplers.py)
SAMPLERS = ("euler", "euler_a", "heun", "lms", "dpmpp_2m", "dpmpp_2m_sde", "unipc", "ddim", "pndm", "ddpm", "lcm")


def test_class_defaults_are_diffusers_signatures():
    for cls_name, table in SCHEDULER_CLASS_DEFAULTS.items():
        params = inspect.signature(getattr(diffusers, cls_name).__init__).parameters
        for key in NEUTRAL_SAMPLING_VALUES:
            if key in params:
                default = params[key].default
                assert key in table, f"{cls_name} takes {key}: its default belongs in the table"
                assert table[key] == (tuple(default) if isinstance(default, list) else default), f"{cls_name}.{key}"
            else:
                assert key not in table, f"{cls_name} does not take {key}"


def diffusers_schedule(sampler, config, steps):
    cls_name, fixed = DIFFUSERS_SCHEDULERS[sampler]
    scheduler = getattr(diffusers, cls_name).from_config({**config, **fixed})
    for key, value in SD_PIPELINE_VALUES.items():  # what StableDiffusionPipeline.__init__ forces
        if getattr(scheduler.config, key, value) != value:
            scheduler.register_to_config(**{key: value})
    scheduler.set_timesteps(steps)
    return scheduler


def assert_same_schedule(plan, scheduler, what):
    if plan.is_sigma_sampler:  # Heun lists each sigma twice (its second-order evaluations)
        second_order = plan.sampler == "heun"
        sigmas = scheduler.sigmas.double()
        sigmas = torch.cat([sigmas[:1], sigmas[1:-1:2], sigmas[-1:]]) if second_order else sigmas
        np.testing.assert_allclose(plan.sigmas.numpy(), sigmas.numpy(), rtol=1e-6, err_msg=what)
        timesteps = scheduler.timesteps.double()
        timesteps = torch.cat([timesteps[:1], timesteps[1::2]]) if second_order else timesteps
        np.testing.assert_allclose(plan.timesteps.numpy(), timesteps.numpy(), rtol=1e-6, err_msg=what)
    else:
        np.testing.assert_array_equal(plan.timesteps.numpy(), scheduler.timesteps.double().numpy(), err_msg=what)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_published_sd15_config(sampler):
    config = scheduler_config_from_dict(SD15_PUBLISHED)
    for steps in (4, 10):
        plan = make_plan(sampler, "default", steps, config)
        assert_same_schedule(plan, diffusers_schedule(sampler, SD15_PUBLISHED, steps), f"{sampler} {steps} steps")


@pytest.mark.parametrize("sampler", ("euler", "dpmpp_2m", "heun", "ddim", "euler_a"))
def test_single_file_preset_is_the_published_config(sampler):
    plan = make_plan(sampler, "default", 10, PRESETS["sd15"].scheduler)
    assert_same_schedule(plan, diffusers_schedule(sampler, SD15_PUBLISHED, 10), sampler)


def test_euler_on_the_published_config_spans_the_whole_model():
    plan = make_plan("euler", "karras", 10, scheduler_config_from_dict(SD15_PUBLISHED))
    assert float(plan.sigmas[0]) == pytest.approx(14.6146, abs=1e-3)  # not 11.03 (leading)
    assert float(plan.sigmas[-2]) == pytest.approx(0.0292, abs=1e-3)  # not 0.041


FULL = {"_class_name": "DPMSolverMultistepScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "beta_start": 0.00085, "num_train_timesteps": 1000, "timestep_spacing": "trailing", "steps_offset": 1,
        "use_karras_sigmas": True, "final_sigmas_type": "sigma_min", "lower_order_final": False,
        "euler_at_final": True, "solver_order": 2, "clip_sample": False, "set_alpha_to_one": False}


@pytest.mark.parametrize("sampler", ("euler", "dpmpp_2m", "unipc", "ddim", "heun", "lms"))
@pytest.mark.parametrize("dropped", [k for k in FULL if not k.startswith("_") and not k.startswith("beta")
                                     and k != "num_train_timesteps"])
def test_each_missing_key_takes_the_class_default(sampler, dropped):
    config = {k: v for k, v in FULL.items() if k != dropped}
    plan = make_plan(sampler, "default", 7, scheduler_config_from_dict(config))
    assert_same_schedule(plan, diffusers_schedule(sampler, config, 7), f"{sampler} without {dropped}")


def test_from_diffusers_object_honours_use_default_values(tmp_path):
    """A pipeline loaded by diffusers lists the keys its file lacked; they take the new class's defaults."""
    folder = save_tiny_pipeline("sd15", tmp_path / "sd15")
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD15_PUBLISHED))
    ref = diffusers.StableDiffusionPipeline.from_pretrained(folder)
    from_object = sdengine.from_diffusers(ref).config.scheduler
    from_folder = sdengine.load(folder).config.scheduler
    for config in (from_object, from_folder):
        assert "timestep_spacing" not in config.given
        assert config.for_sampler("euler").timestep_spacing == "linspace"
        assert config.for_sampler("ddim").timestep_spacing == "leading"


@pytest.mark.parametrize("sampler,scheduler_class", [("euler", "EulerDiscreteScheduler"),
                                                     ("euler_a", "EulerAncestralDiscreteScheduler"),
                                                     ("dpmpp_2m", "DPMSolverMultistepScheduler"),
                                                     ("heun", "HeunDiscreteScheduler")])
def test_published_config_folder_matches_diffusers_images(tmp_path_factory, sampler, scheduler_class):
    folder = tmp_path_factory.getbasetemp() / "sd15-published"
    if not folder.exists():
        save_tiny_pipeline("sd15", folder)
        (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD15_PUBLISHED))
    ref = diffusers.StableDiffusionPipeline.from_pretrained(folder)
    ref.scheduler = getattr(diffusers, scheduler_class).from_config(ref.scheduler.config)
    ours = sdengine.load(folder)
    latents = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    want = ref("a red boat", num_inference_steps=10, guidance_scale=5.0, height=8, width=8, latents=latents.clone(),
               generator=torch.Generator().manual_seed(8), output_type="np").images
    got = ours("a red boat", steps=10, guidance_scale=5.0, height=8, width=8, latents=latents.clone(), seed=8,
               sampler=sampler, output_type="np", progress=False).images
    diff = float(np.abs(got.astype(np.float64) - want.astype(np.float64)).max())
    assert diff <= 1 / 255, f"{sampler}: {diff * 255:.2f}/255"
