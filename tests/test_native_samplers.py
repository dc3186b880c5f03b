"""Every sampler and schedule of the Python API in the C++ loop (csrc/src/samplers.cpp, a1111.cpp),
under both sets of rules, against the Python pipeline: the plans (no engine), A1111's NV generator,
and `backend="native"` images within 2/255 of `backend="eager"` on tiny SD1, SD2-v and SDXL with the
default schedule and with Karras, plus explicit initial latents and A1111's seed options.

Budget: the tiny SD1 engine is shared with the other native tests (cached); the SD2-v and SDXL
engines compile once each (a few minutes on 2 cores; cached in $SDE_CACHE_DIR for later runs)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

import sdengine
from sdengine.config import SchedulerConfig
from sdengine.samplers import SAMPLERS, SCHEDULES, a1111, make_plan
from sdengine.samplers.names import A1111_SAMPLERS, A1111_SCHEDULES, C_SAMPLERS, C_SCHEDULES
from sdengine.samplers.plan import SCHEDULES_FOR
from sdengine.samplers.rng import PhiloxGenerator
from support.native import PROMPT, SIZE, cache_dir, eager, model_dir, native, one_thread  # noqa: F401
from support.tiny import save_tiny_pipeline, tiny_pipeline

_C = pytest.importorskip("sdengine._C")

A1111_LABELS = list(A1111_SAMPLERS)


def _config_json(cfg: SchedulerConfig) -> str:
    return json.dumps(cfg.to_dict())


# ---------------------------------------------------------------------------
# Tables and plans (no engine)
# ---------------------------------------------------------------------------

def test_c_enums_are_the_python_tables():
    """sdengine.h's enums are written from names.py (csrc/tools/gen_sampler_names.py --header):
    their names in order, and the header on disk is what the tool writes."""
    from pathlib import Path
    import subprocess
    import sys

    assert [_C.sampler_name(i) for i in range(len(C_SAMPLERS))] == list(C_SAMPLERS)
    assert [_C.schedule_name(i) for i in range(len(C_SCHEDULES))] == list(C_SCHEDULES)
    root = Path(__file__).resolve().parents[1]
    header = (root / "csrc/include/sdengine.h").read_text()
    copy = Path(__import__("tempfile").mkdtemp()) / "sdengine.h"
    copy.write_text(header)
    subprocess.run([sys.executable, str(root / "csrc/tools/gen_sampler_names.py"),
                    str(root / "sdengine/samplers/names.py"), "--header", str(copy)], check=True)
    assert copy.read_text() == header, "sdengine.h's enums differ from names.py: run gen_sampler_names.py --header"


@pytest.mark.parametrize("name,expected", [
    ("euler_a", ("euler_a", None, "diffusers")), ("Euler a", ("euler_a", None, "a1111")),
    ("DPM++ 2M Karras", ("dpmpp_2m", "karras", "a1111")), ("dpmpp_2m_karras", ("dpmpp_2m", "karras", "diffusers")),
    ("k_dpm_fast", ("dpm_fast", None, "a1111")), ("plms", ("pndm", None, "a1111")), ("ddim", ("ddim", None, "diffusers")),
    ("LMSDiscreteScheduler", ("lms", None, "diffusers")), ("DPM++ 2M SDE Heun", ("dpmpp_2m_sde_heun", None, "a1111")),
    ("Euler a Align Your Steps", ("euler_a", "align_your_steps", "a1111")),
])
def test_cpp_reads_names_as_python(name, expected):
    """sde_sampler_parse: the sampler, the schedule a name carries and the conventions it implies,
    as sdengine.samplers.conventions_for / resolve / resolve_a1111 read the name."""
    from sdengine.samplers import conventions_for

    assert _C.parse_sampler_conventions(name) == expected
    assert conventions_for(name) == expected[2]


DIFFUSERS_CONFIGS = {
    "sd15": SchedulerConfig(),
    "sd21-v": SchedulerConfig(sampler="ddim", prediction_type="v_prediction"),
    "trailing-karras": SchedulerConfig(sampler="euler", timestep_spacing="trailing", steps_offset=0,
                                       use_karras_sigmas=True, set_alpha_to_one=True),
    "linspace-linear": SchedulerConfig(sampler="dpmpp_2m", timestep_spacing="linspace", beta_schedule="linear",
                                       beta_start=0.0001, beta_end=0.02, final_sigmas_type="sigma_min"),
    # a published config that lacks keys: each sampler's diffusers class fills them (for_sampler)
    "sd15-published": sdengine.config.PRESETS["sd15"].scheduler,
}


@pytest.mark.parametrize("cfg_name", sorted(DIFFUSERS_CONFIGS))
def test_cpp_plans_equal_python_plans_for_every_sampler(cfg_name):
    """Every sampler and schedule under diffusers' rules: the C++ plan is make_plan's (the
    config read as each sampler's class reads it), and its program takes the plan's steps."""
    cfg = DIFFUSERS_CONFIGS[cfg_name]
    cfg_json = _config_json(cfg)
    checked = 0
    for sampler in SAMPLERS:
        for schedule in SCHEDULES:
            for steps, strength in ((2, 1.0), (7, 1.0), (25, 1.0), (7, 0.6), (2, 0.3)):
                where = f"{sampler}/{schedule}/{steps}/strength {strength}"
                try:
                    plan = make_plan(sampler, schedule, steps, cfg, strength=strength)
                except ValueError:
                    with pytest.raises(ValueError):
                        _C.plan(sampler, schedule, steps, cfg_json, strength)
                    continue
                ours = _C.plan(sampler, schedule, steps, cfg_json, strength)
                assert ours["start"] == plan.start, where
                np.testing.assert_allclose(ours["timesteps"], plan.timesteps.numpy(), rtol=1e-6, atol=1e-4, err_msg=where)
                if plan.is_sigma_sampler:
                    np.testing.assert_allclose(ours["sigmas"], plan.sigmas.numpy(), rtol=1e-6, err_msg=where)
                    assert ours["init_noise_sigma"] == pytest.approx(plan.init_noise_sigma, rel=1e-6), where
                elif plan.prev_timesteps is not None:
                    np.testing.assert_array_equal(ours["prev_timesteps"], plan.prev_timesteps.numpy(), err_msg=where)
                assert ours["num_steps"] == ours["program_steps"] == plan.num_steps, where
                checked += 1
    assert checked > 300


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_cpp_a1111_plans_equal_python_plans(prediction):
    """Every A1111 sampler and every A1111 schedule: a1111.make_plan's
    sigmas (float32), start, loop steps and first sigma."""
    cfg = SchedulerConfig(prediction_type=prediction)
    cfg_json = _config_json(cfg)
    checked = 0
    for label in A1111_LABELS:
        sampler = A1111_SAMPLERS[label][0]
        for schedule in [None, *A1111_SCHEDULES.values()]:
            for steps, strength, sdxl in ((4, 1.0, False), (10, 1.0, True), (21, 1.0, False), (37, 1.0, False),
                                          (10, 0.6, False)):
                where = f"{label}/{schedule}/{steps}/strength {strength}"
                try:
                    plan = a1111.make_plan(sampler, schedule if schedule != "automatic" else None, steps, cfg,
                                           strength=strength, is_sdxl=sdxl)
                except ValueError:
                    with pytest.raises(ValueError):
                        _C.plan(sampler, schedule or "automatic", steps, cfg_json, strength, "a1111", -1.0, sdxl)
                    continue
                ours = _C.plan(sampler, schedule or "automatic", steps, cfg_json, strength, "a1111", -1.0, sdxl)
                assert ours["start"] == plan.start, where
                assert ours["num_steps"] == ours["program_steps"] == plan.num_steps, where
                if plan.is_sigma_sampler and sampler not in ("dpm_fast", "dpm_adaptive"):
                    np.testing.assert_allclose(ours["sigmas"], plan.sigmas.numpy(), rtol=2e-6, atol=1e-7, err_msg=where)
                    assert ours["init_noise_sigma"] == pytest.approx(plan.init_noise_sigma, rel=1e-6), where
                elif not plan.is_sigma_sampler:
                    np.testing.assert_allclose(ours["timesteps"], plan.timesteps.numpy(), rtol=1e-6, atol=1e-4,
                                               err_msg=where)
                checked += 1
    assert checked > 500


def test_cpp_philox_is_a1111_nv_generator():
    """A1111's "NV" source: Philox 4x32-10 + Box-Muller, the numbers of rng.PhiloxGenerator."""
    for seed in (0, 3, 2 ** 40 + 7):
        gen = PhiloxGenerator(seed)
        draws = _C.philox_randn(seed, [2, 3, 5], 3)
        for data in draws:
            ours = np.frombuffer(data, dtype=np.float32).reshape(2, 3, 5)
            np.testing.assert_allclose(ours, gen.randn((2, 3, 5)), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------
# Images: backend="native" against backend="eager"
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pipelines(tmp_path_factory, native, eager):  # noqa: F811
    """(native, eager) pipelines of a tiny family on the same weights (SD1: the shared fixtures)."""
    made = {"sd15": (native, eager)}

    def get(kind):
        if kind not in made:
            folder = save_tiny_pipeline(kind, tmp_path_factory.mktemp(f"samplers-{kind}"))
            made[kind] = (sdengine.load(folder, backend="native"), sdengine.from_diffusers(tiny_pipeline(kind)))
        return made[kind]
    return get


def _compare(pipelines, kind, steps=4, **options):
    native, eager = pipelines(kind)
    args = dict(negative_prompt="blurry", num_inference_steps=steps, seed=7, batch_size=2, output_type="np",
                progress=False, height=SIZE, width=SIZE, **options)
    try:
        ref = eager(PROMPT, **args)
    except ValueError as e:  # what Python cannot run (a config's class defaults), C++ refuses too
        with pytest.raises(ValueError, match=re.escape(str(e).split(";")[0][:40])):
            native(PROMPT, **args)
        return None
    ours = native(PROMPT, **args)
    assert ours.seeds == ref.seeds
    assert {k: v for k, v in ours.params.items() if k != "model"} == {k: v for k, v in ref.params.items() if k != "model"}
    diff = np.abs(ours.images * 255 - (ref.images * 255).round()).max()
    assert diff <= 2, f"{kind} {options}: max difference {diff}/255"
    return ours


DIFFUSERS_CASES = [(s, sched) for s in SAMPLERS for sched in ("default", "karras") if sched in SCHEDULES_FOR[s]]
A1111_CASES = [(label, sched) for label in A1111_LABELS for sched in (None, "Karras")]
# DPM adaptive's step sizes follow its error norm, which on the tiny SD2-v model sits where 1e-5
# differences move the controller: the Python loop on the same compiled networks (backend="aoti")
# already ends 16/255 from eager (25 trial steps against 23), the C++ loop 12/255. Measured, not a
# bug of the C++ port (which matches eager within 2/255 on SD1 and SDXL).
_CHAOTIC = {("DPM adaptive", "sd21-v")}


@pytest.mark.parametrize("kind", ["sd15", "sd21-v", "sdxl"])
@pytest.mark.parametrize("sampler,schedule", DIFFUSERS_CASES)
def test_native_diffusers_samplers_match_eager(pipelines, kind, sampler, schedule):
    _compare(pipelines, kind, sampler=sampler, schedule=schedule)


@pytest.mark.parametrize("kind", ["sd15", "sd21-v", "sdxl"])
@pytest.mark.parametrize("label,schedule", A1111_CASES)
def test_native_a1111_samplers_match_eager(pipelines, kind, label, schedule, request):
    if (label, kind) in _CHAOTIC:
        request.applymarker(pytest.mark.xfail(reason="DPM adaptive's controller amplifies compiled-vs-eager "
                                                     "differences on the tiny SD2-v model (aoti: 16/255)", strict=False))
    _compare(pipelines, kind, sampler=label, schedule=schedule)


@pytest.mark.parametrize("schedule", sorted(set(A1111_SCHEDULES) - {"Automatic", "Karras"}))
def test_native_a1111_schedules_match_eager(pipelines, schedule):
    _compare(pipelines, "sd15", sampler="Euler", schedule=schedule)


def test_native_a1111_seeds_match_eager(pipelines):
    """Variation seed and strength, seed resizing, ENSD and the NV source in the C++ loop."""
    ours = _compare(pipelines, "sd15", sampler="Euler a", subseed=11, subseed_strength=0.4, eta_noise_seed_delta=31337,
                    rng="nv")
    assert ours.seeds == [7, 7]
    _compare(pipelines, "sd15", sampler="DPM2 a", seed_resize_from_w=8, seed_resize_from_h=24, rng="cpu",
             eta_noise_seed_delta=5)
    _compare(pipelines, "sd15", sampler="DDIM", eta=0.5, rng="nv")


def test_native_explicit_latents_match_eager(pipelines):
    """latents= (sde_gen_params.latents_in): the start is the caller's noise; later draws still
    come from the seeds."""
    native, _ = pipelines("sd15")
    latents = torch.randn(2, native.config.vae.latent_channels, SIZE // native.config.vae.downscale,
                          SIZE // native.config.vae.downscale, generator=torch.Generator().manual_seed(3))
    for sampler in ("euler_a", "Euler a", "dpmpp_2m"):
        _compare(pipelines, "sd15", sampler=sampler, latents=latents)


def test_cpp_brownian_noise_is_torchsde_tree():
    """A1111's SDE noise: one torchsde BrownianTree per image seed (rng.BrownianNoise), queried over
    each step's sigma interval, in any order."""
    from sdengine.samplers.rng import BrownianNoise

    seeds, shape = [7, 2 ** 33 + 5], (2, 3, 4)
    queries = [(14.6, 9.1), (9.1, 5.02), (5.02, 5.3), (0.5, 0.0292), (3.7, 1.1), (14.6, 0.0292), (1.1, 3.7)]
    ref = BrownianNoise(torch.zeros((2, *shape)), 0.0292, 14.6, seeds)
    ours = _C.brownian_noise(seeds, list(shape), 0.0292, 14.6, queries)
    for (a, b), data in zip(queries, ours):
        np.testing.assert_allclose(np.frombuffer(data, dtype=np.float32).reshape(2, *shape), ref(a, b).numpy(),
                                   rtol=1e-5, atol=1e-5, err_msg=f"{a} -> {b}")
