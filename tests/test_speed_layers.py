"""The speed layers against the eager backend, and the graph-capture logic they share.

Layers (docs/CONTRACTS.md, Backends): `graph` (eager networks, every call replayed from CUDA
graphs, the whole step with a torch update), `compile` (the same with torch.compile'd
networks), `triton` (Triton kernels; its networks are tested in test_triton_backend.py and
its fused step in test_fused_step.py). On the CPU the graphs are a stand-in
(tests/support/graph_stand_in.py) that runs the function where a graph would be replayed, so these
tests check what capture and replay rely on; the CUDA path itself is gpu-marked.

The compile layer is checked with torch.compile's "aot_eager" backend for every config
(it traces and partitions as Inductor does, without generating code) and with Inductor
itself for SD1 (`slow`: C++ code generation takes about a minute on the CPU).
"""

import gc
import logging
import threading

import numpy as np
import pytest
import torch

import sdengine
from sdengine import samplers
from sdengine.backends.compiled import CompileBackend
from sdengine.backends.cuda_graphs import DeviceStep
from sdengine.backends.graph import GraphBackend
from sdengine.config import tiny_config
from support.compare import max_diff
from support.graph_stand_in import use_stand_in
from support.tiny import tiny_pipeline

H, W = 16, 24
PROMPT = "a watercolor painting of a lighthouse"
KINDS = ["sd15", "sd15-inpaint", "sd21-v", "sdxl"]


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def _layer(kind: str, layer: str, compiler: str = "aot_eager"):
    pipe = tiny_pipeline(kind)
    eager = sdengine.from_diffusers(pipe)
    if layer == "compile":
        b = eager.backend
        fast = sdengine.from_diffusers(pipe)  # new modules sharing the weights, then the compile layer on them
        fb = fast.backend
        fast.backend = CompileBackend(fb.config, fb.text_encoder, fb.unet, fb.vae, fb.text_encoder_2,
                                      compiler=compiler)
        assert b.unet is not fb.unet
    else:
        fast = sdengine.from_diffusers(pipe, backend=layer)
    graphs = use_stand_in(fast.backend)
    return eager, fast, graphs


def _inputs(kind: str, batch: int = 2):
    cfg = tiny_config(kind)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cfg.unet.in_channels, H // 2, W // 2, generator=g)
    t = torch.tensor([801.0] * batch)
    context = torch.randn(batch, 77, cfg.unet.cross_attention_dim, generator=g)
    added = None
    if cfg.unet.addition_embed_type == "text_time":
        added = {"text_embeds": torch.randn(batch, cfg.text_encoder_2.projection_dim, generator=g),
                 "time_ids": torch.tensor([[H, W, 0, 0, H, W]] * batch, dtype=torch.float32)}
    return x, t, context, added


def _image_kwargs(kind: str, sampler: str):
    kwargs = dict(steps=3, guidance_scale=5.0, height=H, width=W, seed=[3, 4], sampler=sampler, output_type="np",
                  progress=False)
    if kind == "sd15-inpaint":
        g = torch.Generator().manual_seed(5)
        mask = np.zeros((H, W), dtype=np.float32)
        mask[4:12, 6:18] = 1.0
        kwargs.update(init_image=torch.rand(H, W, 3, generator=g).numpy(), mask_image=mask)
    return kwargs


def _check_layer(kind: str, eager, fast, graphs):
    x, t, context, added = _inputs(kind)
    ref = eager.backend.denoise(x, t, context, added)
    for _ in range(2):  # the second call replays
        assert _rel(fast.backend.denoise(x, t, context, added), ref) < 1e-4
    ids = eager.tokenizer([PROMPT, ""])
    ids_2 = eager.tokenizer_2([PROMPT, ""]) if eager.tokenizer_2 is not None else None
    for got, want in zip(fast.backend.encode_text(ids, ids_2), eager.backend.encode_text(ids, ids_2)):
        assert _rel(got, want) < 1e-4
    z = torch.randn(1, 4, H // 2, W // 2, generator=torch.Generator().manual_seed(1))
    assert _rel(fast.backend.decode(z), eager.backend.decode(z)) < 1e-4
    for sampler in ("euler_a", "dpmpp_2m", "heun"):  # heun: the graphed UNet with the host update
        kwargs = _image_kwargs(kind, sampler)
        got = fast(["a red bicycle", "a blue boat"], **kwargs).images
        want = eager(["a red bicycle", "a blue boat"], **kwargs).images
        assert max_diff(got, want) <= 1 / 255, (kind, sampler)
    kinds = {k[0] for k in graphs.entries}
    assert {"step", "unet", "vae_decode"} <= kinds and any(k.startswith("text_encoder") for k in kinds)


@pytest.mark.parametrize("kind", KINDS)
def test_graph_layer_matches_eager(kind):
    _check_layer(kind, *_layer(kind, "graph"))


@pytest.mark.parametrize("kind", KINDS)
def test_compile_layer_matches_eager(kind):
    _check_layer(kind, *_layer(kind, "compile", compiler="aot_eager"))


@pytest.mark.slow
def test_compile_layer_with_inductor_matches_eager():
    """Inductor's code (C++ on the CPU) at one workload: three compiles (text encoder, UNet,
    VAE decoder), each then shared by the pipeline's calls and the direct ones."""
    torch._dynamo.reset()
    eager, fast, graphs = _layer("sd15", "compile", compiler="inductor")
    kwargs = _image_kwargs("sd15", "euler")
    got = fast(["a red bicycle", "a blue boat"], **kwargs).images
    assert max_diff(got, eager(["a red bicycle", "a blue boat"], **kwargs).images) <= 1 / 255
    x, t, context, _ = _inputs("sd15", batch=4)  # the pipeline's UNet batch: 2 images with guidance
    assert _rel(fast.backend.denoise(x, t, context), eager.backend.denoise(x, t, context)) < 1e-4
    assert not any(f.failed for f in (fast.backend.unet_fn, fast.backend.text_fn, fast.backend.decode_fn))
    assert {k[0] for k in graphs.entries} >= {"step", "vae_decode", "text_encoder(clip_skip=None)"}


@pytest.mark.slow
def test_frozen_compile_matches_eager_and_recompiles_after_a_lora(tmp_path):
    """freeze=True on the CPU: Inductor's C++ code with the weights frozen (prepacked for oneDNN),
    channels_last, matches eager; a LoRA merged through the pipeline reaches the frozen code, which
    `weights_changed` compiles again (without it the old constants would still be used)."""
    import copy

    from support.lora_files import kohya_lora

    torch._dynamo.reset()
    eager = sdengine.from_diffusers(copy.deepcopy(tiny_pipeline("sd15")))
    fast = sdengine.from_diffusers(copy.deepcopy(tiny_pipeline("sd15")), backend="compile",
                                   backend_options={"freeze": True})
    assert fast.backend.compile_options["options"] == {"freezing": True} and fast.backend.channels_last
    x, t, context, _ = _inputs("sd15")
    assert _rel(fast.backend.denoise(x, t, context), eager.backend.denoise(x, t, context)) < 1e-4
    before = eager.backend.denoise(x, t, context)
    lora = kohya_lora(tiny_pipeline("sd15"), tmp_path / "lora.safetensors")
    for pipe in (eager, fast):
        pipe.set_loras([(lora, 1.0)])
    after = eager.backend.denoise(x, t, context)
    assert _rel(after, before) > 1e-3  # the LoRA changes the UNet's output
    assert _rel(fast.backend.denoise(x, t, context), after) < 1e-4
    assert not fast.backend.unet_fn.failed


def _broken_compiler(gm, example_inputs):
    raise RuntimeError("the code generator crashed")  # as a compiler bug would


def test_compile_failure_falls_back_to_the_uncompiled_network(caplog):
    torch._dynamo.reset()  # Dynamo reuses code compiled at these shapes by the tests above
    eager, fast, _ = _layer("sd15", "compile", compiler=_broken_compiler)
    x, t, context, _ = _inputs("sd15")
    with caplog.at_level(logging.WARNING, logger="sdengine"):
        got = fast.backend.denoise(x, t, context)
        fast.backend.denoise(x, t, context)
    assert _rel(got, eager.backend.denoise(x, t, context)) < 1e-5
    warned = [r.getMessage() for r in caplog.records if "torch.compile of the UNet failed" in r.getMessage()]
    assert len(warned) == 1 and "(2, 4, 8, 12)" in warned[0]
    assert fast.backend.unet_fn.failed


def test_compile_layer_rejects_unknown_custom_ops():
    b = sdengine.from_diffusers(tiny_pipeline("sd15")).backend
    with pytest.raises(ValueError, match="custom_ops: unknown op.*flash"):
        CompileBackend(b.config, b.text_encoder, b.unet, b.vae, custom_ops=("flash",))


# ---------------------------------------------------------------------------
# The graph-capture logic, through the stand-in
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sd15():
    return sdengine.from_diffusers(tiny_pipeline("sd15"))


def _graph_pipe(capacity=8, **kwargs):
    fast = sdengine.from_diffusers(tiny_pipeline("sd15"), backend="graph")
    return fast, use_stand_in(fast.backend, capacity, **kwargs)


def _run(pipe, **kwargs):
    args = dict(steps=4, guidance_scale=5.0, height=16, width=16, seed=[1, 2], output_type="np", progress=False)
    args.update(kwargs)
    return pipe(["a cat", "a dog"], **args).images


# (A1111's labels, e.g. "DPM++ 2M Karras", run A1111's rules in the Python loop, without a fused step)
@pytest.mark.parametrize("sampler", ["euler", "euler_a", "ddim", "dpmpp_2m", "dpmpp_2m_karras", "lcm"])
def test_one_step_capture_serves_every_step_of_every_run(sd15, sampler):
    fast, graphs = _graph_pipe()
    for scale, seeds in ((5.0, [1, 2]), (7.0, [8, 9])):  # the second run replays the first one's capture
        got = _run(fast, sampler=sampler, guidance_scale=scale, seed=seeds)
        assert max_diff(got, _run(sd15, sampler=sampler, guidance_scale=scale, seed=seeds)) <= 1 / 255
    steps = [k for k in graphs.entries if k[0] == "step"]
    assert len(steps) == 1 and not graphs.entries[steps[0]].busy  # released at the end of each run
    assert not any(k[0] == "unet" for k in graphs.entries)  # the step ran the UNet, never denoise


def test_warm_ups_are_undone_and_outputs_are_copies(sd15):
    """A capture's warm-ups advance the state (DPM++ 2M's history too): they must not leak into
    the run. A graphed call's output must survive the next replay."""
    fast, graphs = _graph_pipe()
    got = _run(fast, sampler="dpmpp_2m")
    assert max_diff(got, _run(sd15, sampler="dpmpp_2m")) <= 1 / 255
    x, t, context, _ = _inputs("sd15")
    first = fast.backend.denoise(x, t, context)
    second = fast.backend.denoise(x * 2, t, context)
    assert not torch.equal(first, second)
    assert _rel(first, sd15.backend.denoise(x, t, context)) < 1e-5  # not overwritten by the replay


def test_graph_cache_is_bounded_and_drops_the_least_recently_used(sd15):
    fast, graphs = _graph_pipe(capacity=3)
    for size in (8, 16, 24, 32):
        _run(fast, sampler="euler", height=size, width=size, steps=2)
    assert len(graphs.entries) == 3
    x, t, context, _ = _inputs("sd15")
    for scale in (1, 2, 3, 4):  # new UNet shapes keep the cache at 3
        assert _rel(fast.backend.denoise(x[:1].repeat(scale, 1, 1, 1), t[:1].repeat(scale), context[:1].repeat(
            scale, 1, 1)), sd15.backend.denoise(x[:1].repeat(scale, 1, 1, 1), t[:1].repeat(scale),
                                                context[:1].repeat(scale, 1, 1))) < 1e-5
    assert len(graphs.entries) == 3 and [k[0] for k in graphs.entries] == ["unet"] * 3


def test_two_runs_at_once_never_share_an_instance(sd15):
    """A run holds its step instance from its first step to its last; a second run of the same
    shape meanwhile gets its own (its own capture), and a cancelled run gives its instance back."""
    fast, graphs = _graph_pipe()
    plan = samplers.make_plan("dpmpp_2m", "default", 4, fast.config.scheduler)
    ctx_a, ctx_b = (torch.randn(4, 77, 32, generator=torch.Generator().manual_seed(s)) for s in (1, 2))
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    step_a, step_b = (fast.backend.fused_step(plan, c, 5.0) for c in (ctx_a, ctx_b))
    xa, xb = plan.initial_state(noise, None), plan.initial_state(noise, None)
    for i in range(plan.num_steps):  # interleaved, as two threads would
        xa = step_a(xa, i)
        xb = step_b(xb, i)
    instances = sorted(k[-1] for k in graphs.entries if k[0] == "step")
    assert instances == [0, 1] and graphs.captures == 2
    alone = fast.backend.fused_step(plan, ctx_a, 5.0)
    x = plan.initial_state(noise, None)
    for i in range(plan.num_steps):
        x = alone(x, i)
    assert torch.equal(x, xa) and not torch.equal(xa, xb)  # the interleaved run equals its run alone
    assert graphs.captures == 2  # instance 0 was free again: reused
    cancelled = fast.backend.fused_step(plan, ctx_a, 5.0)
    cancelled(plan.initial_state(noise, None), 0)
    assert any(e.busy for e in graphs.entries.values())
    del cancelled
    gc.collect()
    assert not any(e.busy for e in graphs.entries.values())  # given back when the run was dropped


def test_threads_generating_at_once_equal_serial(sd15):
    fast, graphs = _graph_pipe()
    serial = {s: _run(fast, sampler="euler_a", seed=[s, s + 1]) for s in (10, 20, 30, 40)}
    got, errors = {}, []

    def work(seed):
        try:
            got[seed] = _run(fast, sampler="euler_a", seed=[seed, seed + 1])
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=work, args=(s,)) for s in serial]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    assert all(np.array_equal(got[s], serial[s]) for s in serial)


def test_uncapturable_calls_and_a_full_cache_run_uncaptured(sd15, caplog):
    fast, graphs = _graph_pipe(fail=("unet",))  # the UNet's capture raises
    x, t, context, _ = _inputs("sd15")
    with caplog.at_level(logging.INFO, logger="sdengine"):
        for _ in range(3):
            assert _rel(fast.backend.denoise(x, t, context), sd15.backend.denoise(x, t, context)) < 1e-5
    failed = [r for r in caplog.records if "could not capture" in r.getMessage()]
    assert len(failed) == 1 and "unet" in failed[0].getMessage()  # one log line, not one per call
    # every entry held by a run: a new shape runs uncaptured, with one log line
    fast, graphs = _graph_pipe(capacity=1)
    plan = samplers.make_plan("euler", "default", 3, fast.config.scheduler)
    ctx = torch.randn(4, 77, 32)
    holding = fast.backend.fused_step(plan, ctx, 5.0)
    holding(plan.initial_state(torch.randn(2, 4, 8, 8), None), 0)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="sdengine"):
        got = _run(fast, sampler="heun", steps=2)
    assert max_diff(got, _run(sd15, sampler="heun", steps=2)) <= 1 / 255
    assert any("cache full" in r.getMessage() for r in caplog.records)
    assert len(graphs.entries) == 1 and isinstance(next(iter(graphs.entries.values())), DeviceStep)


def test_graph_layer_on_the_cpu_never_touches_cuda(monkeypatch):
    fast = sdengine.from_diffusers(tiny_pipeline("sd15"), backend="graph")
    assert fast.backend.graphs is None

    def no_cuda(*args, **kwargs):
        raise AssertionError("torch.cuda touched on the CPU path")

    for name in ("CUDAGraph", "graph", "graph_pool_handle", "Stream", "current_stream", "synchronize"):
        monkeypatch.setattr(torch.cuda, name, no_cuda)
    assert _run(fast, sampler="euler_a", output_type="latent").device.type == "cpu"


@pytest.mark.gpu
@pytest.mark.parametrize("layer", ["graph", "compile"])
def test_cuda_layer_fp16_matches_eager_and_replays(layer):
    import copy

    pipe = copy.deepcopy(tiny_pipeline("sd15")).to("cuda", torch.float16)
    fast = sdengine.from_diffusers(pipe, backend=layer)
    eager = sdengine.from_diffusers(copy.deepcopy(tiny_pipeline("sd15")).to("cuda", torch.float16))
    for sampler in ("euler", "dpmpp_2m", "heun"):
        got, want = _run(fast, sampler=sampler), _run(eager, sampler=sampler)
        assert np.abs(got - want).mean() < 0.02, sampler
    captures = fast.backend.graphs.captures
    _run(fast, sampler="euler")
    assert fast.backend.graphs.captures == captures  # replayed, nothing captured again


def test_backend_options_reach_the_layer_and_unknown_ones_are_named():
    pipe = sdengine.from_diffusers(tiny_pipeline("sd15"), backend="compile",
                                   backend_options={"custom_ops": ("attention",), "compiler": "aot_eager"})
    assert pipe.backend.custom_ops == ("attention",) and pipe.backend.compile_options["backend"] == "aot_eager"
    with pytest.raises(ValueError, match="backend_options: graph_cache not accepted by backend 'eager'"):
        sdengine.from_diffusers(tiny_pipeline("sd15"), backend_options={"graph_cache": 3})
    with pytest.raises(ValueError, match="bogus not accepted by backend 'graph' .*graph_cache"):
        sdengine.from_diffusers(tiny_pipeline("sd15"), backend="graph", backend_options={"bogus": 1})


def test_running_out_of_memory_drops_the_captured_graphs(monkeypatch):
    """A request that runs out of memory frees the graphs of every shape (the pipeline calls
    release_memory); the next request captures again and is right."""
    from sdengine.errors import OutOfMemoryError

    eager = sdengine.from_diffusers(tiny_pipeline("sd15"))
    fast, graphs = _graph_pipe()
    _run(fast, sampler="euler")
    assert graphs.entries
    real = fast.backend.decode

    def out_of_memory(latents):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(fast.backend, "decode", out_of_memory)
    with pytest.raises(OutOfMemoryError, match="out of memory"):
        _run(fast, sampler="euler")
    assert not graphs.entries and not fast.backend._graphed
    monkeypatch.setattr(fast.backend, "decode", real)
    captures = graphs.captures
    assert max_diff(_run(fast, sampler="euler"), _run(eager, sampler="euler")) <= 1 / 255
    assert graphs.captures > captures


def test_a_new_embedding_is_seen_by_the_graphed_text_encoder(tmp_path):
    """Textual inversion writes the token's vectors into the text encoder's added-token table in
    place (sdengine/embeddings.py): the captured graph of the text encoder is kept, replayed,
    and sees the token (as the eager backend does)."""
    import copy

    from safetensors.torch import save_file

    from support.lora_files import embedding_vectors

    path = tmp_path / "tinycat.safetensors"
    save_file({"emb_params": embedding_vectors(32, 2, seed=4)}, str(path))
    eager = sdengine.from_diffusers(copy.deepcopy(tiny_pipeline("sd15")))
    fast = sdengine.from_diffusers(copy.deepcopy(tiny_pipeline("sd15")), backend="graph")
    graphs = use_stand_in(fast.backend)
    _run(fast, sampler="euler")  # the text encoder's graph is captured with the old table
    text_captures = [k for k in graphs.entries if k[0].startswith("text_encoder")]
    assert text_captures
    table = fast.backend.text_encoder.text_model.embeddings.added_tokens
    ptr = table.data_ptr()
    for pipe in (eager, fast):
        assert pipe.load_embedding(path) == "tinycat"
    # the tensor a graph reads is the same, now holding the vectors: the graph is kept
    assert table.data_ptr() == ptr and float(table[:2].abs().sum()) > 0
    assert all(k in graphs.entries for k in text_captures)
    captures = graphs.captures
    got = fast(["a tinycat on a sofa", "a dog"], sampler="euler", steps=4, guidance_scale=5.0, height=16, width=16, seed=[1, 2],
               output_type="np", progress=False).images
    want = eager(["a tinycat on a sofa", "a dog"], sampler="euler", steps=4, guidance_scale=5.0, height=16, width=16, seed=[1, 2],
                 output_type="np", progress=False).images
    assert max_diff(got, want) <= 1 / 255
    assert graphs.captures == captures  # the text encoder and the step replayed: nothing captured again
