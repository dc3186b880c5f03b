"""Fused CFG + sampler-step kernels.

1. Each kernel against its reference `<name>_ref` (fp32 math, rounded once): fp32 to 1e-4
   relative; fp16/bf16 within two roundings of the output dtype at the output's magnitude
   (the kernel rounds once; the interpreter's fp32→bf16 cast truncates). This is tighter
   than STYLE.md's three-way rule for an op that rounds once.
2. Each reference against the straightforward unfused computation, CFG first and then the
   update: diffusers' schedulers' `step` (Euler, Euler ancestral, DDIM, LCM, with the same
   noise) and a literal copy of k-diffusion's `sample_dpmpp_2m` loop.
"""


import pytest
import torch

# The module: `<name>_triton` the Triton wrappers, `<name>_ref` the references (`<name>` dispatches).
from sdengine.kernels import sampler_step as S  # noqa: E402
from sdengine.kernels.testing import DEVICE, assert_three_way, fresh_seed, max_err, poisoned

SD15 = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            steps_offset=1)
PREDS = ["epsilon", "v_prediction"]
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
EPS = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def _cfg(model_out, scale):
    uncond, cond = model_out.float().chunk(2)
    return uncond + scale * (cond - uncond)


def _args(name, x, cfg, noise, old):
    """(kernel args, ref args) for one step of sampler `name`, with plausible scalars."""
    scale = torch.tensor([7.5]) if cfg else 1.0
    if name == "euler":
        return (x, scale, 3.1, 2.2)
    if name == "euler_a":
        return (x, noise, scale, 3.1, 2.2, 1.0)
    if name == "ddim":
        return (x, scale, 0.35, 0.5, 0.6, noise)
    if name == "dpmpp_2m":
        return (x, old, scale, 3.1, 2.2, 4.4)
    return (x, noise, scale, 0.35, 0.5, 0.3, 0.95)  # lcm


def _run(name, dtype, pred, cfg=True, shape=(2, 4, 9, 7), channels_last=False):
    seed = fresh_seed()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    b = shape[0]
    x = (torch.randn(shape, device=DEVICE) * 3).to(dtype).contiguous(memory_format=fmt)
    model_out = torch.randn((2 * b if cfg else b, *shape[1:]), device=DEVICE).to(dtype).contiguous(memory_format=fmt)
    noise = torch.randn(shape, device=DEVICE).to(dtype).contiguous(memory_format=fmt)
    old = torch.randn(shape, device=DEVICE).to(dtype).contiguous(memory_format=fmt)
    args = _args(name, x, cfg, noise, old)
    out = poisoned(shape, dtype, memory_format=fmt)
    kwargs = {"out": out}
    if name == "dpmpp_2m":
        kwargs["denoised_out"] = poisoned(shape, dtype, memory_format=fmt)
    got = getattr(S, name + "_triton")(model_out, *args, prediction_type=pred, **kwargs)
    f32 = [a.float() if isinstance(a, torch.Tensor) and a.shape == shape else a for a in args]
    want = getattr(S, name + "_ref")(model_out.float(), *f32, prediction_type=pred)
    got, want = (got, want) if name == "dpmpp_2m" else ((got,), (want,))
    assert got[0].data_ptr() == out.data_ptr()
    for g, w in zip(got, want):
        what = f"{name} {dtype} {pred} cfg={cfg} cl={channels_last} seed={seed}"
        if dtype == torch.float32:
            assert_three_way(g, w, None, 0, what=what)
        else:
            assert torch.isfinite(g.float()).all(), what
            bound = 2 * EPS[dtype] * w.abs().max().item()
            assert max_err(g, w) <= bound, f"{what}: {max_err(g, w):.3g} > {bound:.3g}"


NAMES = ["euler", "euler_a", "ddim", "dpmpp_2m", "lcm"]


@pytest.mark.parametrize("cfg", [True, False], ids=["cfg", "nocfg"])
@pytest.mark.parametrize("pred", PREDS)
@pytest.mark.parametrize("name", NAMES)
def test_kernel_matches_reference_fp32(name, pred, cfg):
    _run(name, torch.float32, pred, cfg)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", NAMES)
def test_kernel_matches_reference_half(name, dtype):
    _run(name, dtype, PREDS[NAMES.index(name) % 2], channels_last=name in ("euler_a", "dpmpp_2m"))


def test_dpmpp_2m_first_and_last_step_and_inplace_history():
    """Three steps through one denoised buffer updated in place; first step (no history, sigma_prev = 0)
    and last (sigma_next = 0) take the first-order branch; all as the reference."""
    fresh_seed()
    sigmas = [4.0, 1.5, 0.5, 0.0]
    x = torch.randn(1, 4, 5, 3, device=DEVICE) * 4
    x_ref, history, old_ref = x.clone(), poisoned(x.shape, torch.float32), None
    for i in range(3):
        model_out = torch.randn(2, 4, 5, 3, device=DEVICE)
        prev = sigmas[i - 1] if i else 0.0
        x, _ = S.dpmpp_2m_triton(model_out, x, history if i else None, 5.0, sigmas[i], sigmas[i + 1], prev,
                          denoised_out=history)
        x_ref, old_ref = S.dpmpp_2m_ref(model_out, x_ref, old_ref, 5.0, sigmas[i], sigmas[i + 1], prev)
        torch.testing.assert_close(x, x_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(history, old_ref, rtol=1e-5, atol=1e-5)


# ---- references against the unfused computation (CFG, then the scheduler's update) ----------


def _scheduler(cls, pred, steps, **extra):
    sched = cls(**SD15, prediction_type=pred, **extra)
    sched.set_timesteps(steps)
    return sched


@pytest.mark.parametrize("pred", PREDS)
@pytest.mark.parametrize("i", [0, 4, 9])
def test_euler_ref_equals_diffusers(i, pred):
    from diffusers import EulerDiscreteScheduler

    fresh_seed()
    sched = _scheduler(EulerDiscreteScheduler, pred, 10)
    sigma, sigma_next = sched.sigmas[i], sched.sigmas[i + 1]
    x = torch.randn(1, 4, 8, 8) * sigma
    model_out = torch.randn(2, 4, 8, 8)
    sched._step_index = i
    expected = sched.step(_cfg(model_out, 7.5), sched.timesteps[i], x).prev_sample
    torch.testing.assert_close(S.euler_ref(model_out, x, 7.5, sigma, sigma_next, pred), expected,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pred", PREDS)
@pytest.mark.parametrize("i", [0, 5, 9])
def test_euler_a_ref_equals_diffusers(i, pred):
    from diffusers import EulerAncestralDiscreteScheduler

    seed = fresh_seed()
    sched = _scheduler(EulerAncestralDiscreteScheduler, pred, 10)
    sigma, sigma_next = sched.sigmas[i], sched.sigmas[i + 1]
    x = torch.randn(1, 4, 8, 8) * sigma
    model_out = torch.randn(2, 4, 8, 8)
    sched._step_index = i
    expected = sched.step(_cfg(model_out, 6.0), sched.timesteps[i], x,
                          generator=torch.Generator().manual_seed(seed)).prev_sample
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))  # diffusers' randn_tensor draw
    torch.testing.assert_close(S.euler_a_ref(model_out, x, noise, 6.0, sigma, sigma_next, 1.0, pred), expected,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pred", PREDS)
@pytest.mark.parametrize("eta", [0.0, 0.7])
@pytest.mark.parametrize("i", [0, 9])
def test_ddim_ref_equals_diffusers(i, eta, pred):
    from diffusers import DDIMScheduler

    fresh_seed()
    sched = _scheduler(DDIMScheduler, pred, 10, set_alpha_to_one=False, clip_sample=False)  # SD1.5 config
    t = int(sched.timesteps[i])
    prev_t = t - 1000 // 10
    alpha_t = sched.alphas_cumprod[t]
    alpha_prev = sched.alphas_cumprod[prev_t] if prev_t >= 0 else sched.final_alpha_cumprod
    x, model_out, noise = torch.randn(1, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.randn(1, 4, 8, 8)
    expected = sched.step(_cfg(model_out, 7.5), t, x, eta=eta, variance_noise=noise if eta else None).prev_sample
    got = S.ddim_ref(model_out, x, 7.5, alpha_t, alpha_prev, eta, noise if eta else None, pred)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pred", PREDS)
@pytest.mark.parametrize("i", [0, 3])
def test_lcm_ref_equals_diffusers(i, pred):
    from diffusers import LCMScheduler

    seed = fresh_seed()
    sched = _scheduler(LCMScheduler, pred, 4, set_alpha_to_one=False)
    t = sched.timesteps[i]
    prev_t = sched.timesteps[i + 1] if i + 1 < len(sched.timesteps) else t
    alpha_t = sched.alphas_cumprod[t]
    alpha_prev = sched.alphas_cumprod[prev_t] if prev_t >= 0 else sched.final_alpha_cumprod
    c_skip, c_out = sched.get_scalings_for_boundary_condition_discrete(t)
    ours_skip, ours_out = S.lcm_scalings(t)
    torch.testing.assert_close((ours_skip, ours_out), (c_skip.float(), c_out.float()))
    x, model_out = torch.randn(1, 4, 8, 8), torch.randn(2, 4, 8, 8)
    sched._step_index = i
    prev_sample, denoised = sched.step(_cfg(model_out, 3.0), t, x, generator=torch.Generator().manual_seed(seed),
                                       return_dict=False)
    last = i == len(sched.timesteps) - 1
    noise = None if last else torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    got = S.lcm_ref(model_out, x, noise, 3.0, alpha_t, alpha_prev, c_skip, c_out, pred)
    torch.testing.assert_close(got, prev_sample, rtol=1e-5, atol=1e-5)
    if last:
        torch.testing.assert_close(got, denoised, rtol=1e-5, atol=1e-5)


def _k_diffusion_sample_dpmpp_2m(model, x, sigmas):
    """k-diffusion sampling.py `sample_dpmpp_2m`, verbatim apart from callbacks and tqdm."""
    t_fn = lambda sigma: sigma.log().neg()  # noqa: E731
    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i], i)
        t, t_next = t_fn(sigmas[i]), t_fn(sigmas[i + 1])
        h = t_next - t
        if old_denoised is None or sigmas[i + 1] == 0:
            x = (sigmas[i + 1] / sigmas[i]) * x - (-h).expm1() * denoised
        else:
            h_last = t - t_fn(sigmas[i - 1])
            r = h_last / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigmas[i + 1] / sigmas[i]) * x - (-h).expm1() * denoised_d
        old_denoised = denoised
    return x


@pytest.mark.parametrize("pred", PREDS)
def test_dpmpp_2m_ref_equals_k_diffusion_loop(pred):
    fresh_seed()
    ramp = torch.linspace(0, 1, 6, dtype=torch.float64)  # Karras et al. schedule, rho = 7
    sigmas = (14.6 ** (1 / 7) + ramp * (0.03 ** (1 / 7) - 14.6 ** (1 / 7))) ** 7
    sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
    outputs = [torch.randn(2, 4, 6, 6, dtype=torch.float64) for _ in range(6)]
    x0 = torch.randn(1, 4, 6, 6, dtype=torch.float64) * sigmas[0]

    def model(x, sigma, i):  # CFG, then k-diffusion's CompVis(V)Denoiser
        guided = _cfg(outputs[i], 7.5).double()
        if pred == "v_prediction":
            return x / (sigma**2 + 1) - sigma * guided / (sigma**2 + 1) ** 0.5
        return x - sigma * guided

    expected = _k_diffusion_sample_dpmpp_2m(model, x0, sigmas)
    x, old = x0.float(), None
    for i in range(6):
        prev = sigmas[i - 1] if i else 0.0
        x, old = S.dpmpp_2m_ref(outputs[i].float(), x, old, 7.5, sigmas[i], sigmas[i + 1], prev, pred)
    torch.testing.assert_close(x.double(), expected, rtol=1e-4, atol=1e-4)


def test_bad_arguments_are_named():
    x = torch.randn(1, 4, 3, 3, device=DEVICE)
    with pytest.raises(ValueError, match="prediction_type"):
        S.euler_triton(torch.randn(2, 4, 3, 3, device=DEVICE), x, 7.5, 1.0, 0.5, "sample")
    with pytest.raises(ValueError, match="model_out"):
        S.euler_triton(torch.randn(3, 4, 3, 3, device=DEVICE), x, 7.5, 1.0, 0.5)
    with pytest.raises(ValueError, match="noise"):
        S.ddim_triton(torch.randn(2, 4, 3, 3, device=DEVICE), x, 7.5, 0.3, 0.5, eta=0.5)
    with pytest.raises(ValueError, match="sigma"):
        S.euler_triton(torch.randn(2, 4, 3, 3, device=DEVICE), x, 7.5, torch.ones(2), 0.5)


@pytest.mark.gpu
def test_euler_replays_in_a_cuda_graph_with_device_scalars():
    """The step reads its scalars on the device: a captured graph replays with new values."""
    fresh_seed()
    x = torch.randn(2, 4, 64, 64, device="cuda", dtype=torch.float16)
    model_out = torch.randn(4, 4, 64, 64, device="cuda", dtype=torch.float16)
    scale, sigma, sigma_next = (torch.tensor([v], device="cuda") for v in (7.5, 3.0, 2.0))
    out = torch.empty_like(x)
    S.euler_triton(model_out, x, scale, sigma, sigma_next, out=out)  # compile / autotune outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        S.euler_triton(model_out, x, scale, sigma, sigma_next, out=out)
    for s, sn in [(5.0, 4.0), (1.0, 0.0)]:
        sigma.fill_(s)
        sigma_next.fill_(sn)
        graph.replay()
        torch.testing.assert_close(out.float(), S.euler_ref(model_out, x, 7.5, s, sn).float(), rtol=2e-3, atol=2e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("name", NAMES)
def test_sampler_steps_sd_latents_gpu(name):
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        _run(name, dtype, "epsilon", shape=(1, 4, 64, 64))
        _run(name, dtype, "v_prediction", shape=(2, 4, 128, 128), channels_last=True)
