"""The fused denoising step of the Triton backend (UNet -> CFG + sampler update in one kernel)
against the unfused path (UNet, then guidance and the sampler update as torch ops).

On the CPU the sampler-step kernels run through Triton's interpreter. A Triton UNet takes
about 5 s a forward there, so most tests put the networks of the Triton backend back on the
eager ops (`_fast_step_pipeline`): what is under test is the step around the UNet (the step
table, the static buffers updated in place, the noise order, the kernel call). One test
runs the real Triton UNet inside the fused step; tests/test_triton_backend.py checks that
UNet against eager. The CUDA-graph capture of the whole step is GPU-only (`gpu` mark): the
replayed steps against the same step run eagerly, and the graphed fused pipeline in fp16
against the unfused one (graphed UNet + eager update) and the eager backend.

Budget: about 40 s on 2 busy cores.
"""

import copy
import dataclasses
import types
from collections import OrderedDict

import numpy as np
import pytest
import torch

import sdengine
from sdengine import kernels, samplers
from sdengine.backends.triton import TritonBackend
from sdengine.config import tiny_config
from sdengine.models.layers import EAGER_OPS, set_ops
from sdengine.samplers import fused
from support.compare import max_diff
from support.graph_stand_in import StandInGraphs
from support.tiny import tiny_pipeline

pytestmark = pytest.mark.skipif(not kernels.HAS_TRITON, reason="triton is not installed")

PROMPTS = ["a lighthouse on a cliff at dusk", "a red bicycle in the snow"]
SEEDS = [21, 40]
H = W = 16
STEPS = 4
TOL = 1 / 255
FUSED = ["euler", "euler_a", "ddim", "dpmpp_2m", "lcm"]


def _fast_step_pipeline(kind):
    """A triton-backend pipeline whose networks run the eager ops (the step's kernels still run
    through Triton), sharing the cached tiny weights."""
    pipe = sdengine.from_diffusers(tiny_pipeline(kind), backend="triton")
    b = pipe.backend
    for module in (b.text_encoder, b.unet, b.vae):
        set_ops(module, EAGER_OPS)
    return pipe


class StepCounter:
    """Wraps a backend's fused_step and denoise: counts the runs fused_step covered, the steps
    those runs took, and the unfused UNet calls (`denoise`)."""

    def __init__(self, backend, monkeypatch):
        self.runs = self.steps = self.denoise_calls = 0
        make, denoise = backend.fused_step, backend.denoise

        def fused_step(*args, **kwargs):
            step = make(*args, **kwargs)
            if step is None:
                return None
            self.runs += 1

            def counted(x, i, noise=None):
                self.steps += 1
                return step(x, i, noise)
            return counted

        def counted_denoise(*args, **kwargs):
            self.denoise_calls += 1
            return denoise(*args, **kwargs)

        monkeypatch.setattr(backend, "fused_step", fused_step)
        monkeypatch.setattr(backend, "denoise", counted_denoise)


@pytest.fixture(scope="module")
def pipelines():
    return sdengine.from_diffusers(tiny_pipeline("sd15")), _fast_step_pipeline("sd15")


def _images(pipe, **kwargs):
    args = dict(steps=STEPS, height=H, width=W, seed=SEEDS, output_type="np", progress=False)
    args.update(kwargs)
    return pipe(PROMPTS, **args).images


def _unfused(pipe, **kwargs):
    pipe.backend.fused_steps = False
    try:
        return _images(pipe, **kwargs)
    finally:
        pipe.backend.fused_steps = True


@pytest.mark.parametrize("guidance_scale", [5.0, 1.0], ids=["cfg", "no_cfg"])
@pytest.mark.parametrize("sampler", FUSED)
def test_fused_step_matches_unfused_triton_and_eager(pipelines, monkeypatch, sampler, guidance_scale):
    eager, fast = pipelines
    counter = StepCounter(fast.backend, monkeypatch)
    got = _images(fast, sampler=sampler, guidance_scale=guidance_scale)
    assert (counter.runs, counter.steps, counter.denoise_calls) == (1, STEPS, 0)  # every step fused
    unfused = _unfused(fast, sampler=sampler, guidance_scale=guidance_scale)
    assert (counter.runs, counter.denoise_calls) == (1, STEPS)  # and this run did not fuse
    ref = _images(eager, sampler=sampler, guidance_scale=guidance_scale)
    assert max_diff(got, unfused) <= TOL and max_diff(got, ref) <= TOL, sampler
    assert max_diff(ref[0], _images(eager, sampler=sampler, guidance_scale=guidance_scale,
                                    seed=[SEEDS[0] + 1, SEEDS[1]])[0]) > 20 * TOL  # the seed shows


def test_fused_path_is_taken_and_a_broken_step_is_caught(pipelines, monkeypatch):
    eager, fast = pipelines
    ref = _images(eager, sampler="dpmpp_2m", guidance_scale=5.0)
    # With the guidance scale column off by 20%, the images must differ: the comparison can fail.
    table = fused.step_table
    monkeypatch.setattr(fused, "step_table",
                        lambda plan, scale: table(plan, scale) * torch.tensor([1.0, 1.0, 1.2, 1.0, 1.0, 1.0]))
    assert max_diff(_images(fast, sampler="dpmpp_2m", guidance_scale=5.0), ref) > 5 * TOL


def test_cpu_fused_path_never_touches_cuda(pipelines, monkeypatch):
    eager, fast = pipelines
    assert fast.backend.graphs is None

    def no_cuda(*args, **kwargs):
        raise AssertionError("torch.cuda touched on the CPU path")

    for name in ("CUDAGraph", "graph", "graph_pool_handle", "Stream", "current_stream", "synchronize", "is_available"):
        monkeypatch.setattr(torch.cuda, name, no_cuda)
    counter = StepCounter(fast.backend, monkeypatch)
    got = _images(fast, sampler="euler_a", guidance_scale=5.0, output_type="latent")
    assert counter.steps == STEPS and got.device.type == "cpu"


def test_one_captured_step_serves_every_step_of_every_run(pipelines, monkeypatch):
    eager, fast = pipelines
    graphs = StandInGraphs()
    monkeypatch.setattr(fast.backend, "graphs", graphs)
    for sampler in ("dpmpp_2m", "euler_a"):
        for scale, seeds in ((5.0, SEEDS), (7.0, [5, 6])):  # the second run replays the first one's capture
            got = _images(fast, sampler=sampler, guidance_scale=scale, seed=seeds)
            assert max_diff(got, _images(eager, sampler=sampler, guidance_scale=scale, seed=seeds)) <= TOL
    steps = [k for k in graphs.entries if k[0] == "step"]
    assert [k[1] for k in steps] == ["dpmpp_2m", "euler_a"]  # one capture per sampler, for both runs
    # the text encoder (prompts and negatives: one shape) and the VAE decoder are graphed too
    assert sorted(k[0] for k in graphs.entries if k[0] != "step") == ["text_encoder(clip_skip=None)", "vae_decode"]
    assert graphs.captures == 4 and graphs.replays > 0


def test_uncovered_samplers_and_models_fall_back_to_the_unfused_step(pipelines, monkeypatch):
    eager, fast = pipelines
    counter = StepCounter(fast.backend, monkeypatch)
    for sampler in ("heun", "dpmpp_2m_sde", "pndm"):
        assert max_diff(_images(fast, sampler=sampler, guidance_scale=5.0),
                        _images(eager, sampler=sampler, guidance_scale=5.0)) <= TOL
    assert counter.runs == 0 and counter.denoise_calls > 0
    cfg = tiny_config("sd15").scheduler
    plan = samplers.make_plan("ddim", "default", 4, cfg)
    assert fused.unsupported(plan, "epsilon") is None
    assert "sample" in fused.unsupported(plan, "sample")
    clipped = samplers.make_plan("ddim", "default", 4, dataclasses.replace(cfg, clip_sample=True))
    assert "clip" in fused.unsupported(clipped, "epsilon")
    heun_2m = samplers.make_plan("dpmpp_2m", "default", 4,
                                 dataclasses.replace(cfg, extra=cfg.extra + (("solver_type", "heun"),)))
    assert "heun" in fused.unsupported(heun_2m, "epsilon")

@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_inpainting_runs_the_fused_step(monkeypatch, strength):
    """The 9-channel UNet gets the mask and masked-image latents from the step's own buffer."""
    eager = sdengine.from_diffusers(tiny_pipeline("sd15-inpaint"))
    fast = _fast_step_pipeline("sd15-inpaint")
    counter = StepCounter(fast.backend, monkeypatch)
    g = torch.Generator().manual_seed(3)
    image = torch.rand(H, W, 3, generator=g).numpy()
    mask = np.zeros((H, W), dtype=np.float32)
    mask[4:12, 4:12] = 1.0
    kwargs = dict(init_image=image, mask_image=mask, sampler="euler", guidance_scale=5.0, strength=strength)
    assert max_diff(_images(fast, **kwargs), _images(eager, **kwargs)) <= TOL
    assert (counter.runs, counter.steps, counter.denoise_calls) == (1, int(STEPS * strength), 0)
    plan = samplers.make_plan("euler", "default", STEPS, fast.config.scheduler)
    context = torch.zeros(2, 77, fast.config.unet.cross_attention_dim)
    assert fast.backend.fused_step(plan, context, 5.0) is None  # no extra channels: not this UNet's input


@pytest.mark.parametrize("sampler,strength", [("dpmpp_2m", 0.6), ("lcm", 0.7), ("euler_a", 0.5)])
def test_fused_img2img_keeps_the_tail_of_the_schedule(pipelines, monkeypatch, sampler, strength):
    eager, fast = pipelines
    counter = StepCounter(fast.backend, monkeypatch)
    image = torch.rand(2, H, W, 3, generator=torch.Generator().manual_seed(4)).numpy()
    kwargs = dict(init_image=image, strength=strength, sampler=sampler, guidance_scale=5.0, steps=6)
    got = _images(fast, **kwargs)
    assert (counter.runs, counter.steps, counter.denoise_calls) == (1, int(6 * strength), 0)
    assert max_diff(got, _images(eager, **kwargs)) <= TOL


def test_fused_ddim_with_eta_draws_the_same_noise(pipelines, monkeypatch):
    eager, fast = pipelines
    counter = StepCounter(fast.backend, monkeypatch)
    got = _images(fast, sampler="ddim", eta=0.7, guidance_scale=5.0)
    assert (counter.runs, counter.denoise_calls) == (1, 0)
    ref = _images(eager, sampler="ddim", eta=0.7, guidance_scale=5.0)
    assert max_diff(got, ref) <= TOL
    assert max_diff(ref, _images(eager, sampler="ddim", eta=0.0, guidance_scale=5.0)) > 5 * TOL


def test_fused_callback_gets_diffusers_latents_and_can_cancel(pipelines):
    eager, fast = pipelines
    seen = {"fused": [], "eager": []}
    for name, pipe in (("fused", fast), ("eager", eager)):
        _images(pipe, sampler="dpmpp_2m", guidance_scale=5.0,  # VP latents: the callback converts
                callback=lambda i, total, x, name=name: seen[name].append((i, total, x)))
    assert [(i, n) for i, n, _ in seen["fused"]] == [(i, STEPS) for i in range(STEPS)]
    for (_, _, a), (_, _, b) in zip(seen["fused"], seen["eager"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    with pytest.raises(sdengine.pipeline.GenerationCancelled):
        _images(fast, sampler="euler", callback=lambda i, total, x: i < 1)


@pytest.mark.parametrize("kind,sampler", [("sd21-v", "euler_a"), ("sd21-v", "dpmpp_2m"), ("sdxl", "euler")])
def test_fused_step_on_v_prediction_and_sdxl_models(monkeypatch, kind, sampler):
    """sd21-v: the kernels' v-prediction conversion; sdxl: added conditioning in the step's buffers."""
    eager = sdengine.from_diffusers(tiny_pipeline(kind))
    fast = _fast_step_pipeline(kind)
    counter = StepCounter(fast.backend, monkeypatch)
    got = _images(fast, sampler=sampler, guidance_scale=5.0)
    assert (counter.runs, counter.denoise_calls) == (1, 0)
    assert max_diff(got, _images(eager, sampler=sampler, guidance_scale=5.0)) <= TOL


def test_fused_step_runs_the_triton_unet(pipelines, monkeypatch):
    """The real Triton UNet (fused QKV, kernel ops) inside the fused step: 2 steps, batch 1."""
    eager, _ = pipelines
    fast = sdengine.from_diffusers(tiny_pipeline("sd15"), backend="triton")
    counter = StepCounter(fast.backend, monkeypatch)
    kwargs = dict(sampler="dpmpp_2m", guidance_scale=5.0, steps=2, height=8, width=8, seed=[SEEDS[0]])
    got = fast(PROMPTS[0], output_type="latent", progress=False, **kwargs).images
    assert (counter.steps, counter.denoise_calls) == (2, 0)
    ref = eager(PROMPTS[0], output_type="latent", progress=False, **kwargs).images
    assert float((got - ref).abs().max() / ref.abs().max()) < 1e-4


# ---------------------------------------------------------------------------
# GPU: the whole step captured as one CUDA graph
# ---------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("sampler", FUSED)
def test_cuda_graph_of_the_whole_step_matches_eager_steps_fp16(sampler):
    pipe = copy.deepcopy(tiny_pipeline("sd15")).to("cuda", torch.float16)
    b = sdengine.from_diffusers(pipe, backend="triton").backend
    eager_steps = TritonBackend(b.config, b.text_encoder, b.unet, b.vae, cuda_graphs=False)  # same modules
    cfg = b.config
    g = torch.Generator().manual_seed(0)
    shape = (2, 4, 12, 12)
    for run, scale in enumerate((5.0, 7.5)):  # the second run replays the graph captured by the first
        plan = samplers.make_plan(sampler, "default", 5, cfg.scheduler, eta=0.3 if sampler == "ddim" else 0.0)
        context = torch.randn(4, 77, cfg.unet.cross_attention_dim, generator=g).to("cuda")
        noise = torch.randn(shape, generator=g).to("cuda")
        latents = {}
        for name, backend in (("graphed", b), ("eager", eager_steps)):
            step = backend.fused_step(plan, context, scale)
            assert step is not None
            seen = latents[name] = []
            generators = [torch.Generator().manual_seed(s) for s in (run, run + 1)]
            samplers.sample(None, noise, plan, step=step, generators=generators, callback=lambda i, x: seen.append(x))
        assert len(latents["graphed"]) == plan.num_steps
        for a, e in zip(latents["graphed"], latents["eager"]):
            assert torch.isfinite(a).all()
            assert float((a - e).abs().max() / e.abs().max()) < 1e-3
        steps = [k for k in b.graphs.entries if k[0] == "step"]
        assert len(steps) == 1 and b.graphs.entries[steps[0]].graph is not None
    assert not any(k[0] == "unet" for k in b.graphs.entries)  # the fused run never ran the UNet graph alone


@pytest.mark.gpu
def test_graphed_fused_pipeline_matches_unfused_on_cuda_fp16(monkeypatch):
    fast = sdengine.from_diffusers(copy.deepcopy(tiny_pipeline("sd15")).to("cuda", torch.float16), backend="triton")
    eager = sdengine.from_diffusers(copy.deepcopy(tiny_pipeline("sd15")).to("cuda", torch.float16))
    counter = StepCounter(fast.backend, monkeypatch)
    for sampler in FUSED:
        got = _images(fast, sampler=sampler, guidance_scale=5.0)
        unfused = _unfused(fast, sampler=sampler, guidance_scale=5.0)  # graphed UNet + eager update
        ref = _images(eager, sampler=sampler, guidance_scale=5.0)
        assert max_diff(got, unfused) <= TOL, sampler  # the same fp16 kernels: only the update differs
        assert max_diff(got, ref) <= 2 * TOL, sampler  # fp16 with other attention / norm kernels
    assert counter.runs == len(FUSED)
    kinds = [k[0] for k in fast.backend.graphs.entries]
    assert kinds.count("step") == len(FUSED) and kinds.count("unet") == 1
