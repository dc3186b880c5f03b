"""Samplers vs diffusers' schedulers, step by step, in float64.

The "model" is a fixed random linear function of (x_in, t), so any error in what a
sampler feeds the UNet propagates into every later step. Both sides run the same model;
every model call's (x_in, t) and the final latents must agree to 1e-6 relative. Stochastic
samplers get the same per-image generators on both sides.

Budget: about 20 s on 2 busy cores.
"""

import dataclasses
import inspect
import math

import diffusers
import pytest
import torch

from sdengine.bench.reference import DIFFUSERS_SCHEDULERS
from sdengine.config import SchedulerConfig
from sdengine import samplers
from sdengine.samplers import (SAMPLERS, SCHEDULES, SEEDS_DDPM, NAMES, make_plan, normalize_name, plan_for, randn,
                               resolve, sample, sigmas_karras)

RTOL = 1e-6


def sample_by_names(model, noise, *, sampler, schedule, steps, scheduler_config, init_latents=None, strength=1.0,
                    eta=0.0, **kwargs):
    """samplers.sample on the plan of these names (samplers.plan_for), as the pipeline makes it:
    strength applies to a run that starts from init_latents."""
    plan = plan_for(sampler, schedule, steps, scheduler_config,
                    strength=strength if init_latents is not None else 1.0, eta=eta)
    return sample(model, noise, plan, init_latents=init_latents, **kwargs)

SD = SchedulerConfig()  # SD1.5: scaled_linear 0.00085..0.012, leading, steps_offset 1
SD_V = dataclasses.replace(SD, prediction_type="v_prediction", timestep_spacing="trailing", steps_offset=0)

# sdengine sampler -> (diffusers scheduler class, config values selecting the algorithm): the
# package's one table, which the benchmark's diffusers anchor uses too.
DIFFUSERS = DIFFUSERS_SCHEDULERS


def make_model(seed=0, channels=4):
    """A fixed random linear function of x_in and t, shaped like an epsilon / v model."""
    g = torch.Generator().manual_seed(seed)
    mix = (0.6 * torch.eye(channels, dtype=torch.float64)
           + 0.1 * torch.randn(channels, channels, generator=g, dtype=torch.float64))
    bias = 0.3 * torch.randn(1, channels, 1, 1, generator=g, dtype=torch.float64)
    calls = []

    def model_fn(x_in, t):
        t = torch.as_tensor(t).float().double().reshape(-1)  # the UNet's time embedding is float32
        t = t.expand(x_in.shape[0]) if t.numel() == 1 else t
        calls.append((x_in.clone(), t.clone()))
        return torch.einsum("ij,bjhw->bihw", mix, x_in) + bias * torch.sin(t / 150.0 + 0.3)[:, None, None, None]

    return model_fn, calls


def diffusers_scheduler(sampler, cfg, **overrides):
    cls_name, fixed = DIFFUSERS[sampler]
    config = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("sampler", "extra")}
    config.update(dict(cfg.extra))
    if config.get("final_sigmas_type") is None:
        config.pop("final_sigmas_type")
    config.update(fixed)
    config.update(overrides)
    return getattr(diffusers, cls_name).from_config(config)


def generators(seed, batch=2):
    return [torch.Generator().manual_seed(seed + i) for i in range(batch)]


def run_diffusers(scheduler, model_fn, noise, steps, *, seed=None, init=None, strength=1.0, eta=None):
    """diffusers' denoising loop (StableDiffusionPipeline / Img2Img get_timesteps + add_noise)."""
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps
    if init is None:
        x = noise * scheduler.init_noise_sigma
    else:
        t_start = max(steps - min(int(steps * strength), steps), 0)
        timesteps = timesteps[t_start * scheduler.order:]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(t_start * scheduler.order)
        x = scheduler.add_noise(init, noise, timesteps[:1].repeat(noise.shape[0]))
    step_args = inspect.signature(scheduler.step).parameters
    kwargs = {}
    if "generator" in step_args and seed is not None:
        kwargs["generator"] = generators(seed, noise.shape[0])
    if eta is not None:
        kwargs["eta"] = eta
    for t in timesteps:
        x_in = scheduler.scale_model_input(x, t)
        x = scheduler.step(model_fn(x_in, t), t, x, **kwargs).prev_sample
    return x


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def assert_same_calls(ours, theirs, rtol=RTOL):
    assert len(ours) == len(theirs), f"{len(ours)} model calls vs diffusers' {len(theirs)}"
    for i, ((x_a, t_a), (x_b, t_b)) in enumerate(zip(ours, theirs)):
        assert rel(t_a, t_b) <= rtol, f"call {i}: timestep {t_a.tolist()} vs diffusers {t_b.tolist()}"
        assert rel(x_a, x_b) <= rtol, f"call {i}: model input differs by {rel(x_a, x_b):.2e}"


def check_parity(sampler, cfg, steps, *, schedule=None, stochastic=False, init=False, strength=1.0, eta=None,
                 diffusers_overrides=None, shape=(2, 4, 8, 8), rtol=RTOL):
    """Run `sampler` and its diffusers scheduler on the same model and noise; compare every call."""
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    init_latents = torch.randn(shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64) if init else None
    seed = 100 if stochastic else None
    model_a, calls_a = make_model(channels=shape[1])
    model_b, calls_b = make_model(channels=shape[1])
    ours = sample_by_names(model_a, noise, sampler=sampler, schedule=schedule, steps=steps, scheduler_config=cfg,
                  init_latents=init_latents, strength=strength, generators=generators(seed) if stochastic else None,
                  **({"eta": eta} if eta is not None else {}))
    theirs = run_diffusers(diffusers_scheduler(sampler, cfg, **(diffusers_overrides or {})), model_b, noise, steps,
                           seed=seed, init=init_latents, strength=strength, eta=eta)
    assert_same_calls(calls_a, calls_b, rtol)
    assert rel(ours, theirs) <= rtol, f"final latents differ by {rel(ours, theirs):.2e}"
    assert torch.isfinite(ours).all()


# ---------------------------------------------------------------------------
# Per-step parity, every sampler with a diffusers counterpart
# ---------------------------------------------------------------------------

CASES = [
    # (sampler, config, steps, schedule, diffusers overrides)
    ("ddim", SD, 20, None, {}),
    ("ddim", SD_V, 12, None, {}),
    ("ddim", dataclasses.replace(SD, timestep_spacing="linspace", set_alpha_to_one=True), 15, None, {}),
    ("pndm", SD, 20, None, {}),
    ("pndm", dataclasses.replace(SD, timestep_spacing="linspace"), 7, None, {}),
    ("ddim", dataclasses.replace(SD_V, rescale_betas_zero_snr=True), 10, None, {}),
    ("ddim", dataclasses.replace(SD, beta_schedule="squaredcos_cap_v2", clip_sample=True), 10, None, {}),
    ("lms", SD, 20, None, {}),
    ("lms", SD_V, 10, "karras", {"use_karras_sigmas": True}),
    ("euler", SD, 20, None, {}),
    ("euler", SD_V, 12, None, {}),
    ("euler", SD, 15, "karras", {"use_karras_sigmas": True}),
    ("euler", SD, 15, "exponential", {"use_exponential_sigmas": True}),
    ("euler", dataclasses.replace(SD, final_sigmas_type="sigma_min", timestep_spacing="linspace"), 10, None, {}),
    ("heun", SD, 12, None, {}),
    ("heun", SD_V, 8, "karras", {"use_karras_sigmas": True}),
    ("heun", dataclasses.replace(SEEDS_DDPM, clip_sample=True), 8, None, {}),
    ("dpm_2", SD, 12, None, {}),
    ("dpm_2", SD_V, 8, "karras", {"use_karras_sigmas": True}),
    ("dpm_2", SD, 8, "exponential", {"use_exponential_sigmas": True}),
    ("dpmpp_2m", SD, 20, None, {}),
    ("dpmpp_2m", SD, 10, "karras", {"use_karras_sigmas": True}),
    ("dpmpp_2m", SD_V, 12, "exponential", {"use_exponential_sigmas": True}),
    ("dpmpp_2m", dataclasses.replace(SD, extra=(("solver_type", "heun"),), final_sigmas_type="sigma_min"), 10,
     None, {}),
    ("dpmpp_2m", dataclasses.replace(SD, timestep_spacing="linspace", beta_schedule="squaredcos_cap_v2"), 10,
     None, {}),
    ("dpmpp_2m", dataclasses.replace(SD, timestep_spacing="linspace", steps_offset=0), 16, None, {}),
    ("euler", dataclasses.replace(SD, beta_schedule="squaredcos_cap_v2", timestep_spacing="linspace"), 10, None, {}),
    ("unipc", SD, 20, None, {}),
    ("unipc", dataclasses.replace(SD, beta_schedule="squaredcos_cap_v2"), 10, None, {}),
    ("unipc", dataclasses.replace(SD, extra=(("disable_corrector", (2, 3)),)), 10, None, {}),
    # bh1 with a final sigma of 0 is NaN in diffusers (B(h) = -h is infinite there): end at sigma_min
    ("unipc", dataclasses.replace(SD, extra=(("solver_type", "bh1"),), final_sigmas_type="sigma_min"), 10, None, {}),
    ("unipc", SD_V, 10, "karras", {"use_karras_sigmas": True}),
    ("unipc", dataclasses.replace(SD, extra=(("solver_order", 3),)), 12, None, {}),
    ("unipc", SD, 10, "exponential", {"use_exponential_sigmas": True}),
]


@pytest.mark.parametrize("sampler,cfg,steps,schedule,overrides", CASES,
                         ids=[f"{c[0]}-{c[1].prediction_type}-{c[1].timestep_spacing}-{c[3] or 'default'}-{i}"
                              for i, c in enumerate(CASES)])
def test_parity_deterministic(sampler, cfg, steps, schedule, overrides):
    check_parity(sampler, cfg, steps, schedule=schedule, diffusers_overrides=overrides)


STOCHASTIC = [
    ("ddim", SD, 10, None, {}, 0.7),
    ("ddpm", SEEDS_DDPM, 25, None, {}, None),
    ("ddpm", SD_V, 10, None, {}, None),
    ("euler_a", SD, 15, None, {}, None),
    ("euler_a", SD_V, 10, None, {}, None),
    ("dpm_2_a", SD, 10, None, {}, None),
    ("dpm_2_a", SD_V, 8, "karras", {"use_karras_sigmas": True}, None),
    ("dpmpp_2m_sde", SD, 12, "karras", {"use_karras_sigmas": True}, None),
    ("dpmpp_2m_sde", SD_V, 16, None, {}, None),
    ("dpmpp_2m_sde", dataclasses.replace(SD, extra=(("solver_type", "heun"),)), 10, None, {}, None),
    ("lcm", dataclasses.replace(SD, extra=(("timestep_scaling", 10.0),)), 6, None, {}, None),
]


@pytest.mark.parametrize("sampler,cfg,steps,schedule,overrides,eta", STOCHASTIC,
                         ids=[f"{c[0]}-{c[1].prediction_type}-{c[3] or 'default'}" for c in STOCHASTIC])
def test_parity_stochastic(sampler, cfg, steps, schedule, overrides, eta):
    check_parity(sampler, cfg, steps, schedule=schedule, stochastic=True, eta=eta, diffusers_overrides=overrides)


IMG2IMG = [
    ("euler", SD, 20, 0.6, False), ("heun", SD, 10, 0.5, False), ("dpm_2_a", SD, 10, 0.7, True),
    ("ddim", SD, 20, 0.75, False), ("pndm", SD, 20, 0.55, False), ("ddpm", SEEDS_DDPM, 20, 0.5, True),
    ("dpmpp_2m", SD, 20, 0.6, False), ("dpmpp_2m_sde", SD_V, 12, 0.8, True), ("unipc", SD, 15, 0.6, False),
    ("lcm", SD, 4, 0.5, True), ("euler_a", SD_V, 10, 1.0, True),
]


@pytest.mark.parametrize("sampler,cfg,steps,strength,stochastic", IMG2IMG,
                         ids=[f"{c[0]}-{c[3]}" for c in IMG2IMG])
def test_parity_img2img_tail(sampler, cfg, steps, strength, stochastic):
    check_parity(sampler, cfg, steps, init=True, strength=strength, stochastic=stochastic)


@pytest.mark.parametrize("sampler,steps,eta", [("ddpm", 200, None), ("ddim", 50, 0.0), ("ddim", 25, 1.0)])
def test_seeds_ddpm_in_pixel_space(sampler, steps, eta):
    """The seeds' DDPM (linear betas 1e-4..0.02, T = 1000, x0 clipped to [-1, 1]) on RGB pixels."""
    check_parity(sampler, SEEDS_DDPM, steps, stochastic=sampler == "ddpm" or bool(eta), eta=eta,
                 shape=(2, 3, 8, 8))


def test_zero_terminal_snr_v_prediction():
    """rescale_betas_zero_snr puts the first sigma at 4096 (alphas_cumprod[-1] = 2**-24). diffusers'
    Euler step computes in float32, so its latents carry |x| * 6e-8 ~ 2.4e-4 absolute rounding
    error there; the comparison allows 1e-5 relative for that, not RTOL."""
    cfg = dataclasses.replace(SD, rescale_betas_zero_snr=True, prediction_type="v_prediction",
                              timestep_spacing="trailing")
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    model_a, calls_a = make_model()
    model_b, calls_b = make_model()
    ours = sample_by_names(model_a, noise, sampler="euler", schedule=None, steps=10, scheduler_config=cfg)
    theirs = run_diffusers(diffusers_scheduler("euler", cfg), model_b, noise, 10)
    assert len(calls_a) == len(calls_b)
    assert max(rel(a[0], b[0]) for a, b in zip(calls_a, calls_b)) <= 1e-5
    assert rel(ours, theirs) <= 1e-5


def test_callback_latents_match_diffusers_every_step():
    """The callback sees diffusers' latents after each step (VP units for DPM-Solver)."""
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    model_a, _ = make_model()
    model_b, _ = make_model()
    seen = []
    sample_by_names(model_a, noise, sampler="dpmpp_2m", schedule="karras", steps=8, scheduler_config=SD,
           callback=lambda i, x: seen.append((i, x.clone())))
    sched = diffusers_scheduler("dpmpp_2m", SD, use_karras_sigmas=True)
    sched.set_timesteps(8)
    x = noise * sched.init_noise_sigma
    for i, t in enumerate(sched.timesteps):
        x = sched.step(model_b(sched.scale_model_input(x, t), t), t, x).prev_sample
        assert seen[i][0] == i and rel(seen[i][1], x) <= RTOL, f"step {i}"
    assert len(seen) == 8


def test_inpainting_full_strength_starts_from_pure_noise():
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    init = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    model_a, calls_a = make_model()
    model_b, calls_b = make_model()
    inpaint = sample_by_names(model_a, noise, sampler="ddim", schedule=None, steps=5, scheduler_config=SD,
                     init_latents=init, strength=1.0, inpainting=True)
    txt2img = sample_by_names(model_b, noise, sampler="ddim", schedule=None, steps=5, scheduler_config=SD)
    assert torch.equal(inpaint, txt2img)
    img2img = sample_by_names(make_model()[0], noise, sampler="ddim", schedule=None, steps=5, scheduler_config=SD,
                     init_latents=init, strength=1.0)
    assert not torch.equal(img2img, txt2img)


# ---------------------------------------------------------------------------
# dpmpp_sde and dpmpp_3m_sde: no usable diffusers counterpart
# ---------------------------------------------------------------------------

def _vp(sigma):
    """(alpha_t, sigma_t, lambda_t) of a VE sigma."""
    alpha = 1 / math.sqrt(1 + sigma ** 2)
    return alpha, sigma * alpha, math.log(alpha) - math.log(sigma * alpha)


def reference_dpmpp_sde(model_fn, x_vp, plan, noises):
    """DPM-Solver++(2S) SDE with r = 1/2 in VP form (Lu et al. 2022, DPM-Solver++ paper's
    data-prediction SDE solver; the ancestral split of k-diffusion), written independently of
    sdengine's VE-form code. `noises` yields the standard normal draws."""
    sigmas = [float(s) for s in plan.sigmas]
    log_sigmas = torch.from_numpy(plan.log_sigmas).double()

    def x0_at(x, sigma, t=None):
        alpha, s, _ = _vp(sigma)
        if t is None:  # log-sigma interpolation between training timesteps
            ls = math.log(sigma)
            idx = int(torch.searchsorted(log_sigmas, torch.tensor(ls)).clamp(1, len(log_sigmas) - 1)) - 1
            w = (log_sigmas[idx] - ls) / (log_sigmas[idx] - log_sigmas[idx + 1])
            t = float((1 - w) * idx + w * (idx + 1))
        out = model_fn(x, torch.full((x.shape[0],), t, dtype=torch.float32))
        return (x - s * out) / alpha

    for i in range(len(sigmas) - 1):
        sig, sig_next = sigmas[i], sigmas[i + 1]
        x0 = x0_at(x_vp, sig, float(plan.timesteps[i]))
        a_s, s_s, lam_s = _vp(sig)
        if sig_next == 0:
            x_vp = x0
            continue
        a_t, s_t, lam_t = _vp(sig_next)
        h = lam_t - lam_s
        sig_mid = math.exp(-(lam_s + h / 2))  # VE sigma at the lambda midpoint
        a_m, s_m, _ = _vp(sig_mid)
        # to the midpoint: ancestral split of the VE step sig -> sig_mid, in VP units
        up = math.sqrt(sig_mid ** 2 * (sig ** 2 - sig_mid ** 2) / sig ** 2)
        down = math.sqrt(sig_mid ** 2 - up ** 2)
        x_mid = a_m * (down / sig * x_vp / a_s + (1 - down / sig) * x0) + a_m * up * next(noises)
        x0_mid = x0_at(x_mid, sig_mid)
        up = math.sqrt(sig_next ** 2 * (sig ** 2 - sig_next ** 2) / sig ** 2)
        down = math.sqrt(sig_next ** 2 - up ** 2)
        x_vp = a_t * (down / sig * x_vp / a_s + (1 - down / sig) * x0_mid) + a_t * up * next(noises)
    return x_vp


def reference_dpmpp_3m_sde(model_fn, x_vp, plan, noises):
    """DPM-Solver++(3M) SDE in VP form with log-SNR lambda (Lu et al. 2022): the exponential
    integrator of the data-prediction SDE, x_t = (sigma_t/sigma_s) e^{-h} x_s + alpha_t (1 - e^{-2h}) x0
    + alpha_t * (phi_2 D1 - phi_3 D2) + sigma_t sqrt(1 - e^{-2h}) z, with D1, D2 the divided
    differences of the last three x0 predictions (the sign of k-diffusion; diffusers'
    DPMSolverMultistep third-order SDE term has +0.5 where the ODE form has -0.5, so it is
    not used as the reference)."""
    sigmas = [float(s) for s in plan.sigmas]
    history = []  # (lambda, x0)
    for i in range(len(sigmas) - 1):
        sig, sig_next = sigmas[i], sigmas[i + 1]
        a_s, s_s, lam_s = _vp(sig)
        out = model_fn(x_vp, torch.full((x_vp.shape[0],), float(plan.timesteps[i]), dtype=torch.float32))
        x0 = (x_vp - s_s * out) / a_s
        history = (history + [(lam_s, x0)])[-3:]
        if sig_next == 0:
            x_vp = x0
            continue
        a_t, s_t, lam_t = _vp(sig_next)
        h = lam_t - lam_s
        x_new = s_t / s_s * math.exp(-h) * x_vp + a_t * (1 - math.exp(-2 * h)) * x0
        phi_2 = (math.exp(-2 * h) - 1) / (2 * h) + 1
        if len(history) >= 2:
            lam_1, x0_1 = history[-2]
            r0 = (lam_s - lam_1) / h
            d1_0 = (x0 - x0_1) / r0
            if len(history) == 3:
                lam_2, x0_2 = history[-3]
                r1 = (lam_1 - lam_2) / h
                d1_1 = (x0_1 - x0_2) / r1
                d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_3 = phi_2 / (2 * h) - 0.5
                x_new = x_new + a_t * (phi_2 * d1 - phi_3 * d2)
            else:
                x_new = x_new + a_t * phi_2 * d1_0
        x_vp = x_new + s_t * math.sqrt(1 - math.exp(-2 * h)) * next(noises)
    return x_vp


@pytest.mark.parametrize("sampler,reference", [("dpmpp_sde", reference_dpmpp_sde),
                                               ("dpmpp_3m_sde", reference_dpmpp_3m_sde)])
@pytest.mark.parametrize("cfg,schedule", [(SD, "karras"), (SD, "default")], ids=["eps-karras", "eps-default"])
def test_sde_samplers_vs_float64_reference(sampler, reference, cfg, schedule):
    """dpmpp_sde: diffusers' DPMSolverSDEScheduler needs torchsde (not installed) and a Brownian
    tree; dpmpp_3m_sde has no exact diffusers counterpart. Both are checked against independent
    float64 VP-form implementations of the algorithms, fed the same per-image noise."""
    steps = 10
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    model_a, _ = make_model(1)
    model_b, _ = make_model(1)
    ours = sample_by_names(model_a, noise, sampler=sampler, schedule=schedule, steps=steps, scheduler_config=cfg,
                  generators=generators(30))
    name, schedule = resolve(sampler, schedule, cfg)
    plan = make_plan(name, schedule, steps, cfg)
    gens = generators(30)
    dtype = torch.float32 if sampler == "dpmpp_3m_sde" else torch.float64
    draws = (randn(noise.shape, gens, "cpu", dtype).double() for _ in iter(int, 1))
    x_vp = noise * plan.init_noise_sigma  # diffusers' latents: VP for DPM-Solver's family
    if not plan.vp_latents:
        x_vp = x_vp / math.sqrt(1 + float(plan.sigmas[0]) ** 2)
    theirs = reference(model_b, x_vp, plan, draws)
    assert rel(ours, theirs) <= RTOL, f"{sampler}: {rel(ours, theirs):.2e}"


# ---------------------------------------------------------------------------
# Schedules, names, noise
# ---------------------------------------------------------------------------

def test_sigmas_karras_endpoints_and_rho():
    s = sigmas_karras(10, 0.03, 14.6)
    assert abs(s[0] - 14.6) < 1e-12 and abs(s[-1] - 0.03) < 1e-12
    inv = s ** (1 / 7)
    assert abs((inv[1:] - inv[:-1]).std()) < 1e-12  # evenly spaced in sigma^(1/rho)


def test_schedule_names_match_diffusers_spacing():
    """normal = linspace spacing, sgm_uniform = trailing, ddim_uniform = leading + offset 1."""
    cfg = dataclasses.replace(SD, steps_offset=0)
    for schedule, spacing, offset in [("normal", "linspace", 0), ("sgm_uniform", "trailing", 0),
                                      ("ddim_uniform", "leading", 1)]:
        plan = make_plan("ddim", schedule, 20, cfg)
        ref = diffusers_scheduler("ddim", dataclasses.replace(cfg, timestep_spacing=spacing, steps_offset=offset))
        ref.set_timesteps(20)
        assert plan.timesteps.long().tolist() == ref.timesteps.tolist(), schedule


def test_simple_schedule_is_comfyui_simple():
    plan = make_plan("euler", "simple", 7, SD)
    assert plan.timesteps.tolist() == [999 - math.floor(i * 1000 / 7) for i in range(7)]
    assert float(plan.sigmas[-1]) == 0.0


def test_resolve_names():
    assert resolve("DPM++ 2M Karras", None, SD) == ("dpmpp_2m", "karras")
    assert resolve("DPM++ 2M SDE Karras", None, SD) == ("dpmpp_2m_sde", "karras")
    assert resolve("Euler a", None, SD) == ("euler_a", "default")
    assert resolve("euler_ancestral", "sgm_uniform", SD) == ("euler_a", "sgm_uniform")
    assert resolve("DDIM", None, SD) == ("ddim", "default")
    assert resolve("PLMS", None, SD) == ("pndm", "default")
    assert resolve("LMS Karras", None, SD) == ("lms", "karras")
    assert resolve("UniPC", None, SD) == ("unipc", "default")
    assert resolve("LCM", None, SD) == ("lcm", "default")
    assert resolve("DPM2 a Karras", None, SD) == ("dpm_2_a", "karras")
    assert resolve("dpmpp_3m_sde_gpu", "exponential", SD) == ("dpmpp_3m_sde", "exponential")
    assert resolve(None, None, SD) == ("pndm", "default")
    assert resolve(None, "karras", dataclasses.replace(SD, sampler="euler")) == ("euler", "karras")
    for name in SAMPLERS:
        assert resolve(name, None, SD)[0] == name
    for name in SCHEDULES:
        assert resolve("euler", name, SD)[1] == name


def test_a1111_labels_cover_every_name_and_read_back():
    """The PNG `parameters` text writes A1111's labels ("Euler a", "Karras"): one for every
    sampler and schedule, each resolving back to its own name (A1111 reads ours, we read theirs)."""
    from sdengine.samplers.names import A1111_LABELS

    assert set(A1111_LABELS["samplers"]) == set(SAMPLERS) and set(A1111_LABELS["schedules"]) == set(SCHEDULES)
    for name, label in A1111_LABELS["samplers"].items():
        assert resolve(label, None, SD)[0] == name, label
    for name, label in A1111_LABELS["schedules"].items():
        assert resolve("euler", label, SD)[1] == name, label


def test_name_table_is_plain_data():
    import json
    table = json.loads(json.dumps(NAMES))
    assert table == NAMES
    assert set(NAMES["samplers"].values()) == set(SAMPLERS)
    assert set(NAMES["schedules"].values()) == set(SCHEDULES)
    assert all(normalize_name(k) == k for section in NAMES.values() for k in section)


def test_randn_is_batch_independent():
    gens = generators(11, 3)
    batch = randn((3, 4, 8, 8), gens, "cpu", torch.float32)
    single = randn((1, 4, 8, 8), [torch.Generator().manual_seed(12)], "cpu", torch.float32)
    assert torch.equal(batch[1:2], single)
    ref = diffusers.utils.torch_utils.randn_tensor((3, 4, 8, 8), generator=generators(11, 3), dtype=torch.float32)
    assert torch.equal(batch, ref)


def test_stochastic_sampler_is_batch_independent():
    noise = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    outs = sample_by_names(make_model()[0], noise, sampler="euler_a", schedule=None, steps=6, scheduler_config=SD,
                  generators=generators(40, 3))
    one = sample_by_names(make_model()[0], noise[2:], sampler="euler_a", schedule=None, steps=6, scheduler_config=SD,
                 generators=[torch.Generator().manual_seed(42)])
    assert rel(outs[2:], one) < 1e-12


@pytest.mark.parametrize("sampler", ["pndm", "heun", "ddim", "dpmpp_2m"])
def test_callback_count_is_plan_num_steps(sampler):
    steps, strength = 10, 0.55
    plan = make_plan(sampler, "default", steps, SD, strength=strength)
    seen = []
    sample_by_names(make_model()[0], torch.randn(1, 4, 8, 8, dtype=torch.float64), sampler=sampler, schedule=None,
           steps=steps, scheduler_config=SD, init_latents=torch.zeros(1, 4, 8, 8, dtype=torch.float64),
           strength=strength, callback=lambda i, x: seen.append(i))
    assert seen == list(range(plan.num_steps))
    assert plan.num_steps == (6 if sampler == "pndm" else 5)  # diffusers keeps int(10 * 0.55) = 5 steps (+1 PLMS)


def test_callback_exception_propagates():
    class Cancelled(Exception):
        pass

    def cancel(i, latents):
        if i == 2:
            raise Cancelled

    noise = torch.randn(1, 4, 8, 8, dtype=torch.float64)
    model, calls = make_model()
    with pytest.raises(Cancelled):
        sample_by_names(model, noise, sampler="euler", schedule=None, steps=10, scheduler_config=SD, callback=cancel)
    assert len(calls) == 3


def test_step_scalars_reproduce_euler_and_ddim():
    plan = make_plan("euler_a", "karras", 8, SD)
    sc = plan.step_scalars()
    assert torch.equal(sc["sigma"], plan.sigmas[:-1]) and torch.equal(sc["sigma_next"], plan.sigmas[1:])
    assert torch.allclose(sc["sigma_down"] ** 2 + sc["sigma_up"] ** 2, plan.sigmas[1:] ** 2)
    ddim = make_plan("ddim", "default", 10, SD).step_scalars()
    ref = diffusers_scheduler("ddim", SD)
    ref.set_timesteps(10)
    assert torch.allclose(ddim["alpha_cumprod"], ref.alphas_cumprod[ref.timesteps].double())


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------

def _sample(**kw):
    args = dict(sampler="euler", schedule=None, steps=10, scheduler_config=SD)
    args.update(kw)
    return sample_by_names(make_model()[0], torch.randn(1, 4, 8, 8, dtype=torch.float64), **args)


def test_unknown_sampler_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown sampler 'DPM\+\+ 9M'.*dpmpp_2m.*unipc"):
        _sample(sampler="DPM++ 9M")


def test_unknown_schedule_lists_valid_ones():
    with pytest.raises(ValueError, match="unknown schedule 'cosine'.*karras.*sgm_uniform"):
        _sample(schedule="cosine")


@pytest.mark.parametrize("sampler,schedule", [("ddim", "karras"), ("pndm", "exponential"), ("lcm", "normal"),
                                              ("DDPM Karras", None)])
def test_impossible_combination(sampler, schedule):
    with pytest.raises(ValueError, match="cannot follow"):
        _sample(sampler=sampler, schedule=schedule)


def test_conflicting_schedules():
    with pytest.raises(ValueError, match="implies the 'karras' schedule"):
        _sample(sampler="DPM++ 2M Karras", schedule="exponential")


@pytest.mark.parametrize("sampler,steps", [("dpmpp_3m_sde", 2), ("pndm", 1), ("dpmpp_2m", 1), ("unipc", 1)])
def test_too_few_steps_for_multistep(sampler, steps):
    with pytest.raises(ValueError, match=f"{sampler}.*multistep.*steps >= "):
        _sample(sampler=sampler, steps=steps)


@pytest.mark.parametrize("steps", [0, -3, 2.5])
def test_bad_steps(steps):
    with pytest.raises(ValueError, match="steps must be"):
        _sample(steps=steps)


def test_too_many_lcm_steps():
    with pytest.raises(ValueError, match="original_inference_steps"):
        _sample(sampler="lcm", steps=60)


@pytest.mark.parametrize("strength", [-0.1, 1.5])
def test_strength_outside_unit_interval(strength):
    with pytest.raises(ValueError, match=r"strength must be in \[0, 1\]"):
        _sample(init_latents=torch.zeros(1, 4, 8, 8, dtype=torch.float64), strength=strength)


def test_strength_too_small_for_any_step():
    with pytest.raises(ValueError, match="leaves no denoising step"):
        _sample(init_latents=torch.zeros(1, 4, 8, 8, dtype=torch.float64), strength=0.05)


def test_unknown_option_is_named():
    with pytest.raises(ValueError, match="no option 'order'"):
        _sample(sampler="euler", order=3)


def test_generator_count_must_match_batch():
    with pytest.raises(ValueError, match="2 generators for a batch of 1"):
        _sample(sampler="euler_a", generators=generators(0, 2))


@pytest.mark.parametrize("key,value", [("thresholding", True), ("timestep_type", "continuous"),
                                       ("use_beta_sigmas", True), ("interpolation_type", "log_linear")])
def test_unsupported_scheduler_config_key_is_named(key, value):
    cfg = dataclasses.replace(SD, extra=((key, value),))
    with pytest.raises(ValueError, match=f"unsupported {key}="):
        _sample(scheduler_config=cfg)


def test_a_fused_step_runs_in_the_same_loop_and_takes_no_sampler_options():
    """samplers.sample's one loop runs a fused step(x, i, noise) exactly as many times as the plan
    has steps, hands the callback copies, and refuses sampler options it cannot pass on."""
    plan = samplers.make_plan("euler_a", "default", 4, SD)
    calls = []

    def step(x, i, noise):
        calls.append((i, noise is not None))
        x.mul_(0.5)  # a fused step may overwrite its buffer in place
        return x

    seen = []
    out = samplers.sample(None, torch.ones(1, 4, 2, 2, dtype=torch.float64), plan, step=step,
                          generators=[torch.Generator().manual_seed(0)], callback=lambda i, x: seen.append(x))
    assert [i for i, _ in calls] == list(range(plan.num_steps))
    assert [drew for _, drew in calls] == [float(plan.sigmas[i + 1]) > 0 for i in range(plan.num_steps)]
    assert len({id(x) for x in seen}) == len(seen) and float(seen[0].flatten()[0]) != float(seen[1].flatten()[0])
    assert out.shape == (1, 4, 2, 2)
    with pytest.raises(ValueError, match="order"):
        samplers.sample(None, torch.ones(1, 4, 2, 2), plan, step=step, order=3)
