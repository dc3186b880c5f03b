"""The native runtime's graphs: each (batch, latent size) captured once per instance and replayed, whatever the sampler."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from support.native import PROMPT, SIZE, cache_dir, eager, engine_dir, model_dir, native, one_thread

_C = pytest.importorskip("sdengine._C")


# ---------------------------------------------------------------------------
# Graphs: each (batch, latent size) captured once per instance and replayed (graphs.h).
# On the CPU a capture runs its call and keeps it, a replay runs it again: the cache logic of
# the CUDA graphs, counted by sde_model_get_stats.
# ---------------------------------------------------------------------------

def _gen(model, sampler="euler", seed=1, size=(SIZE, SIZE), guidance=7.5, batch=1, prompt=PROMPT, progress=None):
    width, height = size
    out = model.generate(prompt, "blurry", width, height, 3, guidance, seed, batch, sampler, None, 0.0, progress)
    return [np.frombuffer(data, dtype=np.uint8).reshape(h, w, 3) for data, w, h, _ in out]


def test_step_graph_captured_once_per_shape(model_dir, engine_dir, eager):
    model = _C.Model(str(model_dir), str(engine_dir), max_concurrency=1)
    assert model.stats()["cuda_graphs"] is False and model.stats()["instances"] == 1
    _gen(model)
    step, text, decode = (model.stats()[k] for k in ("step", "text", "decode"))
    assert (step["captures"], step["replays"], step["cached"]) == (1, 2, 1)  # 3 steps: 1 capture + 2 replays
    assert (text["captures"], text["replays"]) == (1, 1)  # prompt and negative prompt: batch 1 twice
    assert (decode["captures"], decode["replays"]) == (1, 0)
    # Same shape, another prompt, seed and guidance scale: replays only, and the right image (what
    # changes per request goes through the graph's buffers, not into the graph).
    ours = _gen(model, seed=9, guidance=4.0, prompt="a red square")[0]
    ref = eager("a red square", negative_prompt="blurry", num_inference_steps=3, guidance_scale=4.0, height=SIZE,
                width=SIZE, seed=9, sampler="euler", output_type="np", progress=False).images[0]
    assert np.abs(ours.astype(int) - (ref * 255).round().astype(int)).max() <= 2
    step = model.stats()["step"]
    assert (step["captures"], step["replays"]) == (1, 5)
    # A new latent size or batch is a new shape: one more capture each. A new sampler is not: every
    # sampler's numbers are rows of the evaluation table the one graph reads (sampling.h).
    for sampler in ("euler_a", "heun", "lms", "dpmpp_3m_sde", "unipc", "ddpm", "Euler a", "DPM fast", "Restart"):
        _gen(model, sampler=sampler)
    assert model.stats()["step"]["captures"] == 1
    _gen(model, size=(SIZE + 8, SIZE))
    _gen(model, batch=2)
    stats = model.stats()
    assert (stats["step"]["captures"], stats["step"]["cached"]) == (3, 3)
    assert (stats["text"]["captures"], stats["decode"]["captures"]) == (2, 3)  # batch 2; 24x16, batch 2
    assert stats["step"]["evicted"] == 0 and stats["step"]["direct"] == 0


def test_graph_cache_is_bounded(model_dir, engine_dir):
    """max_graphs=2: a third shape drops the least recently used; coming back recaptures it,
    with the same image as before."""
    model = _C.Model(str(model_dir), str(engine_dir), max_concurrency=1, max_graphs=2)
    first = _gen(model, size=(SIZE, SIZE))[0]
    _gen(model, size=(SIZE + 8, SIZE))
    _gen(model, size=(SIZE, SIZE + 8))
    step = model.stats()["step"]
    assert (step["captures"], step["cached"], step["evicted"]) == (3, 2, 1)
    again = _gen(model, size=(SIZE, SIZE))[0]
    step = model.stats()["step"]
    assert (step["captures"], step["cached"], step["evicted"]) == (4, 2, 2)
    assert np.array_equal(again, first)


def test_graphs_are_not_shared_by_concurrent_requests(model_dir, engine_dir):
    """Two requests of one shape at the same time (both wait for the other inside their first
    step's callback) run on two instances, each capturing its own graph; the images equal
    those of the same requests run one after the other."""
    model = _C.Model(str(model_dir), str(engine_dir), max_concurrency=2)
    meet = threading.Barrier(2, timeout=120)
    results, errors = {}, []

    def request(seed):
        try:
            results[seed] = _gen(model, seed=seed, progress=lambda step, total: step != 1 or meet.wait() >= 0)[0]
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=request, args=(seed,)) for seed in (3, 4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    stats = model.stats()
    assert stats["instances"] == 2 and stats["step"]["captures"] == 2, stats  # one graph per instance
    serial = _C.Model(str(model_dir), str(engine_dir), max_concurrency=1)
    for seed in (3, 4):
        assert np.array_equal(results[seed], _gen(serial, seed=seed)[0])
    assert not np.array_equal(results[3], results[4])


def test_graphs_off_runs_directly_with_the_same_images(model_dir, engine_dir):
    graphed = _C.Model(str(model_dir), str(engine_dir), max_concurrency=1)
    direct = _C.Model(str(model_dir), str(engine_dir), max_concurrency=1, max_graphs=-1)
    for sampler in ("dpmpp_2m", "pndm"):
        assert np.array_equal(_gen(direct, sampler)[0], _gen(graphed, sampler)[0])
    step = direct.stats()["step"]
    assert (step["captures"], step["replays"], step["direct"]) == (0, 0, 7)  # 3 dpmpp_2m + 4 pndm evaluations
