"""A1111's rules against k-diffusion driven as A1111 drives it (tests/support/kdiffusion_reference.py).

Sampler level: a fixed random function of (x_in, t) stands in for the guided UNet, so that a
wrong timestep, sigma, start or noise shows in every later step; every A1111 sampler sdengine
runs, on every A1111 schedule, against k-diffusion's own sampler over CompVisDenoiser with the
LDM alphas_cumprod, A1111's get_sigmas, the start at noise * sigma_0 and A1111's CPU noise
(ancestral draws from the image generators, Brownian trees for the SDE samplers).

Budget: about 40 s on 2 busy cores.
"""

import numpy as np
import pytest
import torch

from support import kdiffusion_reference as ref
from sdengine import samplers
from sdengine.config import SchedulerConfig
from sdengine.samplers import a1111, rng

SD = SchedulerConfig()
SD_V = SchedulerConfig(prediction_type="v_prediction")
SHAPE = (4, 6, 5)   # (C, h, w) of one image's latents
SEEDS = (11, 12)
STEPS = 8
RTOL = 2e-4         # float32 on both sides; k-diffusion keeps sigmas as float32 tensors, sdengine as floats

DETERMINISTIC = ("Euler", "Heun", "LMS", "DPM2", "DPM++ 2M")
STOCHASTIC = ("Euler a", "DPM2 a", "DPM++ 2S a", "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 3M SDE")


def make_model(seed=0, channels=4):
    """A fixed random function of x_in and t shaped like an epsilon / v model (float32)."""
    g = torch.Generator().manual_seed(seed)
    mix = 0.6 * torch.eye(channels) + 0.1 * torch.randn(channels, channels, generator=g)
    bias = 0.3 * torch.randn(1, channels, 1, 1, generator=g)
    calls = []

    def model_fn(x_in, t):
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1).expand(x_in.shape[0])
        calls.append(t.clone())
        return torch.einsum("ij,bjhw->bihw", mix, x_in) + bias * torch.sin(t / 150.0 + 0.3)[:, None, None, None]

    return model_fn, calls


def ours(label, schedule, cfg=SD, steps=STEPS, eta=None, seeds=SEEDS, **noise_options):
    model_fn, calls = make_model()
    plan = samplers.plan_for(label, schedule, steps, cfg, eta=eta)
    assert plan.conventions == "a1111"
    noise = rng.ImageNoise(SHAPE, seeds, **noise_options)
    x = samplers.sample(model_fn, noise.first(), plan, generators=noise)
    return x, calls


def theirs(label, schedule, cfg=SD, steps=STEPS, eta=None, seeds=SEEDS):
    model_fn, calls = make_model()
    x = ref.sample(model_fn, ref.ldm_alphas_cumprod(cfg.beta_start, cfg.beta_end), label, schedule, steps, seeds,
                   SHAPE, v_prediction=cfg.prediction_type == "v_prediction", eta=eta)
    return x, calls


def assert_close(got, want, what):
    scale = float(want.abs().max())
    diff = float((got - want).abs().max())
    assert diff <= RTOL * scale, f"{what}: max |difference| {diff:.3g} (scale {scale:.3g})"


@pytest.mark.parametrize("schedule", ref.SCHEDULE_LABELS)
@pytest.mark.parametrize("label", DETERMINISTIC)
def test_deterministic_sampler_on_every_schedule(label, schedule):
    got, got_calls = ours(label, schedule)
    want, want_calls = theirs(label, schedule)
    assert len(got_calls) == len(want_calls)
    assert_close(torch.stack(got_calls), torch.stack(want_calls), f"{label} / {schedule} timesteps")
    assert_close(got, want, f"{label} / {schedule}")


@pytest.mark.parametrize("cfg", [SD, SD_V], ids=["eps", "v"])
@pytest.mark.parametrize("label", STOCHASTIC)
def test_stochastic_sampler_with_a1111_noise(label, cfg):
    got, _ = ours(label, "Automatic", cfg)
    want, _ = theirs(label, "Automatic", cfg)
    assert_close(got, want, label)


@pytest.mark.parametrize("label,eta", [("Euler a", 0.5), ("DPM++ 2M SDE", 0.3), ("DPM2 a", 0.0)])
def test_eta(label, eta):
    got, _ = ours(label, "Karras", eta=eta)
    want, _ = theirs(label, "Karras", eta=eta)
    assert_close(got, want, f"{label} eta={eta}")
    assert not torch.allclose(got, ours(label, "Karras")[0]), "eta must change the image"


@pytest.mark.parametrize("label", DETERMINISTIC + ("Euler a",))
def test_v_prediction(label):
    got, _ = ours(label, "Automatic", SD_V)
    want, _ = theirs(label, "Automatic", SD_V)
    assert_close(got, want, label)


@pytest.mark.parametrize("label,schedule", [("DPM2", "Normal"), ("DPM++ 3M SDE", "Karras"), ("DPM2 a", "Exponential")])
def test_discard_next_to_last_sigma(label, schedule):
    plan = samplers.plan_for(label, schedule, STEPS, SD)
    wrap = ref.denoiser(lambda x, t: x, ref.ldm_alphas_cumprod())
    want = ref.get_sigmas(wrap, label, schedule, STEPS)
    assert len(plan.sigmas) == STEPS + 1 == len(want)
    np.testing.assert_allclose(plan.sigmas.numpy(), want.double().numpy(), rtol=1e-6)


def test_model_sigmas_and_timesteps_are_compvis_denoisers():
    wrap = ref.denoiser(lambda x, t: x, ref.ldm_alphas_cumprod())
    model = a1111.DiscreteSchedule(a1111.ldm_alphas_cumprod(SD))
    assert torch.equal(model.sigmas, wrap.sigmas)
    sigma = torch.tensor([14.6, 3.3, 1.0, 0.2, 0.03])
    assert torch.equal(model.sigma_to_t(sigma), wrap.sigma_to_t(sigma))
    t = torch.tensor([999.0, 500.5, 10.25, 0.0])
    assert torch.equal(model.t_to_sigma(t), wrap.t_to_sigma(t))
    assert (model.sigma_min, model.sigma_max) == (pytest.approx(0.0292, abs=1e-4), pytest.approx(14.6146, abs=1e-4))


def test_txt2img_starts_at_noise_times_sigma_max():
    plan = samplers.plan_for("DPM++ 2M", "Karras", 10, SD)
    noise = torch.randn(1, *SHAPE)
    assert torch.allclose(plan.initial_state(noise), noise * float(plan.sigmas[0]))
    assert float(plan.sigmas[0]) == pytest.approx(14.6146, abs=1e-3)  # the model's whole range, not 0.041..11.03


def test_img2img_keeps_a1111s_tail():
    """t_enc = int(min(strength, 0.999) * steps); sigma_sched = sigmas[steps - t_enc - 1:]."""
    full = samplers.plan_for("Euler", None, 20, SD)
    tail = samplers.plan_for("Euler", None, 20, SD, strength=0.75)
    assert torch.equal(tail.sigmas, full.sigmas[20 - 15 - 1:])
    assert tail.num_steps == 16


def test_automatic_is_each_samplers_own_schedule():
    expected = {"DPM++ 2M": "karras", "DPM++ SDE": "karras", "DPM++ 2M SDE": "exponential",
                "DPM++ 3M SDE": "exponential", "DPM2": "karras", "DPM2 a": "karras", "DPM++ 2S a": "karras",
                "Euler": "uniform", "Euler a": "uniform", "LMS": "uniform", "Heun": "uniform"}
    for label, schedule in expected.items():
        assert samplers.plan_for(label, None, 10, SD).schedule == schedule, label
        assert samplers.plan_for(label, "Automatic", 10, SD).schedule == schedule, label


def test_vocabulary_picks_the_rules():
    assert samplers.conventions_for("Euler a") == "a1111"
    assert samplers.conventions_for("DPM++ 2M Karras") == "a1111"
    assert samplers.conventions_for("k_dpmpp_2m") == "a1111"
    assert samplers.conventions_for("euler_a") == "diffusers"
    assert samplers.conventions_for("dpmpp_2m_karras") == "diffusers"
    assert samplers.conventions_for(None) == "diffusers"
    assert samplers.conventions_for("DDIM") == "a1111"
    assert samplers.conventions_for("ddim") == "diffusers"  # sdengine's own names mean diffusers'
    assert samplers.conventions_for("lcm") == "diffusers"
    assert samplers.conventions_for("euler_a", "a1111") == "a1111"
    assert samplers.plan_for("euler_a", None, 10, SD, conventions="a1111").sampler == "euler_a"
    assert samplers.plan_for("ddim", None, 10, SD, conventions="a1111").sampler == "ddim"
    assert samplers.conventions_for("UniPC") == "a1111" and samplers.conventions_for("unipc") == "diffusers"
    with pytest.raises(ValueError, match="does not reproduce A1111's ddpm"):  # no A1111 sampler
        samplers.plan_for("ddpm", None, 10, SD, conventions="a1111")


@pytest.mark.parametrize("a1111_name,schedule,diffusers_name", [("DPM++ 2M", "Karras", "dpmpp_2m_karras"),
                                                                 ("Euler", "Automatic", "euler")])
def test_diffusers_rules_draw_another_image(a1111_name, schedule, diffusers_name):
    """The comparison can fail: diffusers' scheduler of the same name is far from A1111's."""
    model_fn, _ = make_model()
    plan = samplers.plan_for(diffusers_name, None, STEPS, SD)
    noise = rng.ImageNoise(SHAPE, SEEDS)
    got = samplers.sample(model_fn, noise.first(), plan)
    want, _ = theirs(a1111_name, schedule)
    assert float((got - want).abs().max()) > 10 * RTOL * float(want.abs().max())


# ---------------------------------------------------------------------------
# A1111's other samplers: DPM fast / adaptive (k-diffusion), Restart, LCM, DDIM, PLMS, DDIM CFG++
# ---------------------------------------------------------------------------

# DPM fast with nfe = steps 8, 9 and 10 ends in each lower order; DPM adaptive takes no step count
KDIFFUSION_DRIVEN = [("DPM fast", 8), ("DPM fast", 9), ("DPM fast", 10), ("DPM adaptive", 8), ("Restart", 8),
                     ("Restart", 9), ("LCM", 8), ("LCM", 9)]


@pytest.mark.parametrize("label,steps", KDIFFUSION_DRIVEN)
@pytest.mark.parametrize("cfg", [SD, SD_V], ids=["eps", "v"])
def test_kdiffusion_driven_samplers(label, steps, cfg):
    """DPM fast and DPM adaptive are k-diffusion's, called with the model's sigma range and
    A1111's eta 1 (its noise from the images' generators); Restart and LCM are A1111's own loops
    over k-diffusion's parts (kdiffusion_reference.restart_sample, lcm_denoiser)."""
    got, got_calls = ours(label, "Automatic", cfg, steps=steps)
    want, want_calls = theirs(label, "Automatic", cfg, steps=steps)
    assert len(got_calls) == len(want_calls)
    assert_close(torch.stack(got_calls), torch.stack(want_calls), f"{label} timesteps")
    assert_close(got, want, label)


@pytest.mark.parametrize("label,schedule", [("Restart", "Exponential"), ("LCM", "Karras"), ("LCM", "Normal"),
                                            ("LCM", "DDIM"), ("DPM fast", "Karras"), ("Restart", "Align Your Steps")])
def test_kdiffusion_driven_samplers_on_other_schedules(label, schedule):
    got, _ = ours(label, schedule)
    want, _ = theirs(label, schedule)
    assert_close(got, want, f"{label} / {schedule}")


@pytest.mark.parametrize("steps", [20, 37])
def test_restart_restarts(steps):
    """From 20 steps Restart jumps back up (once, from 36 twice), with fresh noise each time."""
    got, got_calls = ours("Restart", "Automatic", steps=steps)
    want, want_calls = theirs("Restart", "Automatic", steps=steps)
    assert len(got_calls) == len(want_calls)
    timesteps = [float(t[0]) for t in got_calls]
    jumps = sum(later > earlier + 100 for earlier, later in zip(timesteps, timesteps[1:]))
    assert jumps >= (2 if steps >= 36 else 1), timesteps
    assert_close(got, want, f"Restart {steps} steps")


def test_restart_below_20_steps_is_kdiffusions_heun():
    """The cross-check of the Restart reference with k-diffusion's sample_heun: no restart, Heun."""
    got, _ = ours("Restart", "Karras", steps=12)
    want, _ = theirs("Heun", "Karras", steps=12)
    assert_close(got, want, "Restart = Heun")


def test_dpm_fast_and_adaptive_eta():
    for label in ("DPM fast", "DPM adaptive"):
        got, _ = ours(label, "Automatic", eta=0.0)
        want, _ = theirs(label, "Automatic", eta=0.0)
        assert_close(got, want, f"{label} eta 0")
        assert not torch.allclose(got, ours(label, "Automatic")[0])


def timestep_model(cfg_scale=None):
    """The stand-in model as A1111's timestep samplers see it, and with a second, unconditional
    branch for CFG++: model_fn(x, t, cond) for the reference, and sdengine's model_fn."""
    model_fn, calls = make_model()
    other, _ = make_model(seed=1)

    def theirs_fn(x, t, cond):
        if cond is None:
            return model_fn(x, t)
        half = x.shape[0] // 2
        return torch.cat([model_fn(x[:half], t[:half]), other(x[half:], t[half:])])

    def ours_fn(x, t, with_uncond=False, guidance_multiplier=1.0):
        if cfg_scale is None:
            return (model_fn(x, t),) * 2 if with_uncond else model_fn(x, t)
        cond, uncond = model_fn(x, t), other(x, t)
        guided = uncond + (cond - uncond) * cfg_scale * guidance_multiplier
        return (guided, uncond) if with_uncond else guided

    return theirs_fn, ours_fn, calls


def run_timestep(label, steps, cfg=SD, cfg_scale=None, eta=None):
    theirs_fn, ours_fn, _ = timestep_model(cfg_scale)
    plan = samplers.plan_for(label, None, steps, cfg, eta=eta)
    noise = rng.ImageNoise(SHAPE, SEEDS)
    got = samplers.sample(ours_fn, noise.first(), plan, generators=noise)
    alphas = ref.ldm_alphas_cumprod(cfg.beta_start, cfg.beta_end)
    alphas64 = torch.from_numpy(np.cumprod(1 - np.linspace(cfg.beta_start ** 0.5, cfg.beta_end ** 0.5, 1000) ** 2))
    cond = None if cfg_scale is None else torch.zeros(len(SEEDS))
    model = ref.TimestepCFG(theirs_fn, alphas64, cond, cond, cfg_scale or 1.0, cfg.prediction_type == "v_prediction")
    want = ref.timestep_sample(model, alphas, label, steps, SEEDS, SHAPE, eta=eta or 0.0)
    return got, want


@pytest.mark.parametrize("steps", [7, 10, 20])
@pytest.mark.parametrize("label", ref.TIMESTEP_LABELS)
@pytest.mark.parametrize("cfg", [SD, SD_V], ids=["eps", "v"])
def test_timestep_samplers(label, steps, cfg):
    """DDIM, PLMS and DDIM CFG++ against the transcription of A1111's loops (its timesteps
    1, 1 + 1000 // steps, ...: 7 steps give 8 timesteps)."""
    got, want = run_timestep(label, steps, cfg, cfg_scale=4.0)
    assert_close(got, want, f"{label} {steps} steps")


def test_ddim_eta_draws_a1111s_noise():
    got, want = run_timestep("DDIM", 10, eta=0.7)
    assert_close(got, want, "DDIM eta 0.7")
    assert not torch.allclose(got, run_timestep("DDIM", 10)[0])


def test_cfgpp_differs_from_ddim():
    assert not torch.allclose(run_timestep("DDIM CFG++", 10, cfg_scale=4.0)[0],
                              run_timestep("DDIM", 10, cfg_scale=4.0)[0], rtol=1e-3)


def _diffusers_over(scheduler_cls, steps, **config):
    """x after diffusers' scheduler over all its timesteps but the last (A1111 stops at t = 1),
    from A1111's first draws, with the stand-in eps model."""
    import diffusers

    model_fn, _ = make_model()
    scheduler = getattr(diffusers, scheduler_cls)(beta_start=SD.beta_start, beta_end=SD.beta_end,
                                                  beta_schedule="scaled_linear", set_alpha_to_one=False,
                                                  steps_offset=1, timestep_spacing="leading", **config)
    scheduler.set_timesteps(steps)
    x = rng.ImageNoise(SHAPE, SEEDS).first()
    for t in scheduler.timesteps[:-1]:
        x = scheduler.step(model_fn(x, t.float().expand(x.shape[0])), t, x).prev_sample
    return x


@pytest.mark.parametrize("label,scheduler_cls,config", [("DDIM", "DDIMScheduler", {"clip_sample": False}),
                                                         ("DDIM CFG++", "DDIMScheduler", {"clip_sample": False}),
                                                         ("PLMS", "PNDMScheduler", {"skip_prk_steps": True})])
@pytest.mark.parametrize("steps", [8, 20])
def test_timestep_reference_against_diffusers(label, scheduler_cls, config, steps):
    """The cross-check of the transcription: where A1111's timesteps are diffusers' (1000 % steps
    == 0: leading spacing, offset 1) and diffusers' last step (to t < 1) is left out, DDIM and PLMS
    are diffusers' DDIMScheduler / PNDMScheduler (PLMS: skip_prk_steps); CFG++ without guidance
    is DDIM."""
    _, want = run_timestep(label, steps)
    got = _diffusers_over(scheduler_cls, steps, **config)
    assert float((got - want).abs().max()) <= 1e-4 * float(want.abs().max()), label


def _a1111_unipc_times(steps, start_timestep=None):
    """A1111's UniPC times and sigmas, from its description: ceil(1000 / (1000 // steps)) steps
    evenly spaced in t from 1 (img2img: last kept timestep / 1000 + 1/1000) to 1/1000; log alpha
    piecewise linear in t through ((k + 1) / 1000, 0.5 log alphas_cumprod[k])."""
    n = len(range(0, 1000, 1000 // steps))
    t_start = 1.0 if start_timestep is None else float(torch.tensor(start_timestep) / 1000 + 1 / 1000)
    times = torch.linspace(t_start, 1 / 1000, n + 1)
    log_alpha = np.interp(times.double().numpy(), np.arange(1, 1001) / 1000,
                          0.5 * np.log(ref.ldm_alphas_cumprod().double().numpy()))
    alpha = np.exp(log_alpha)
    return times, torch.from_numpy(np.sqrt(1 - alpha ** 2) / alpha)


@pytest.mark.parametrize("steps", [7, 20, 26])
@pytest.mark.parametrize("cfg", [SD, SD_V], ids=["eps", "v"])
def test_unipc_against_diffusers_on_a1111s_times(steps, cfg):
    """A1111's UniPC (bh1, order 3, lower order at the end, corrector but on the last step) is
    diffusers' UniPCMultistepScheduler with those options run over A1111's continuous times: its
    sigmas and (fractional) model timesteps set from them. A v output becomes eps at int(t), as
    A1111's CompVisTimestepsVDenoiser does. 26 steps (27 times, 37 apart) are diffusers' own
    linspace schedule with final_sigmas_type sigma_min."""
    import diffusers

    model_fn, calls = make_model()
    plan = samplers.plan_for("UniPC", None, steps, cfg)
    noise = rng.ImageNoise(SHAPE, SEEDS)
    got = samplers.sample(model_fn, noise.first(), plan, generators=noise)

    alphas = torch.from_numpy(np.cumprod(1 - np.linspace(SD.beta_start ** 0.5, SD.beta_end ** 0.5, 1000) ** 2))
    reference_fn, reference_calls = make_model()

    def eps_fn(x, t):
        out = reference_fn(x, t)
        if cfg.prediction_type == "epsilon":
            return out
        k = int(t.reshape(-1)[0])
        return float(alphas[k].sqrt()) * out + float((1 - alphas[k]).sqrt()) * x

    scheduler = diffusers.UniPCMultistepScheduler(
        beta_start=SD.beta_start, beta_end=SD.beta_end, beta_schedule="scaled_linear", solver_order=3,
        solver_type="bh1", lower_order_final=True, timestep_spacing="linspace", final_sigmas_type="sigma_min")
    times, sigmas = _a1111_unipc_times(steps)
    scheduler.set_timesteps(len(times) - 1)
    if steps == 26:
        assert torch.equal(scheduler.timesteps.float(), (times[:-1] - 1 / 1000) * 1000)
    scheduler.timesteps = (times[:-1] - 1 / 1000) * 1000
    scheduler.sigmas = sigmas.float()
    want = rng.ImageNoise(SHAPE, SEEDS).first()
    for t in scheduler.timesteps:
        want = scheduler.step(eps_fn(want, t.expand(want.shape[0])), t, want).prev_sample
    assert len(calls) == len(reference_calls) == len(times) - 1
    assert_close(torch.stack(calls), torch.stack(reference_calls), "UniPC timesteps")
    assert_close(got, want, f"UniPC {steps} steps")
