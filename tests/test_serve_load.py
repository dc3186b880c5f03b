"""Load test of `sdengine serve` (issue 18): a real server process, a real HTTP client.

200 requests from 16 concurrent httpx clients, mixing sizes and samplers, 20 of which hang
up mid-request and 10 of which are invalid; then a burst that overflows the queue.
Bounded: the demo model at 32-48 px and 6-8 steps, well under a minute on 2 cores.
"""

import gc
import random

import pytest

pytest.importorskip("fastapi", reason="needs the serve extra: pip install 'sdengine[serve]'")
pytest.importorskip("httpx")
pytest.importorskip("psutil")

from sdengine.serve.loadgen import LoadRequest, ServerProcess, run_load, txt2img  # noqa: E402

pytestmark = pytest.mark.slow

SAMPLERS = ("Euler a", "DPM++ 2M", "Euler", "DDIM")
SIZES = (32, 48)

# (body, the field the 422 must name)
INVALID = [
    ({"steps": "many"}, "steps"), ({"width": 33}, "width"), ({"height": -8}, "height"),
    ({"cfg_scale": "high"}, "cfg_scale"), ({"sampler_name": "No Such Sampler"}, "sampler_name"),
    ({"batch_size": 0}, "batch_size"), ({"seed": "abc"}, "seed"), ({"width": 8192, "height": 8192}, "width"),
    ({"batch_size": 8, "n_iter": 8}, "n_iter"), ({"enable_hr": True, "hr_upscaler": "ESRGAN_4x"}, "hr_upscaler"),
]


def _mix(n: int, rng: random.Random, seed_base: int) -> list:
    return [LoadRequest(txt2img(f"a handwritten digit {rng.randrange(10)}", seed=seed_base + i, steps=rng.choice((6, 8)),
                                size=rng.choice(SIZES), sampler=rng.choice(SAMPLERS)))
            for i in range(n)]


def test_load_200_requests_16_clients():
    rng = random.Random(0)
    with ServerProcess(["--max-queue", "48", "--request-timeout", "120"]) as server:
        warmup = run_load(server.url, _mix(48, rng, 10_000), concurrency=16)
        assert not warmup.unexpected(), warmup.unexpected()[:3]
        gc.collect()
        rss_after_warmup = server.rss_bytes()

        requests = _mix(170, rng, 0)
        for i in range(20):  # hang up while the server works on it
            requests.append(LoadRequest(txt2img("a handwritten digit eight", seed=500 + i, steps=60, size=48),
                                        disconnect_after_s=0.05 + 0.01 * i))
        for body, _ in INVALID:
            requests.append(LoadRequest(dict(txt2img(), **body), expect=422))
        rng.shuffle(requests)
        assert len(requests) == 200
        stats = run_load(server.url, requests, concurrency=16)

        assert stats.unexpected() == [], [(r.status, r.error, r.request.body) for r in stats.unexpected()[:5]]
        summary = stats.summary()
        assert summary["ok"] == 170 and summary["by_status"]["422"] == 10
        named = {tuple(r.body["detail"][0]["loc"]) for r in stats.results if r.status == 422}
        assert named == {("body", field) for _, field in INVALID}, named
        assert sum(1 for r in stats.results if r.error == "disconnected") == 20

        # Overflow: more requests at once than the queue holds -> 503 with Retry-After.
        burst = [LoadRequest(txt2img(seed=900 + i, steps=40, size=48)) for i in range(80)]
        overflow = run_load(server.url, burst, concurrency=80)
        statuses = {r.status for r in overflow.results}
        assert statuses <= {200, 503}, statuses
        assert 503 in statuses and 200 in statuses

        assert server.alive()
        import httpx

        assert httpx.get(server.url + "/health").json()["status"] == "ok"
        metrics = httpx.get(server.url + "/metrics").text
        assert 'sdengine_requests_total{path="/sdapi/v1/txt2img",status="503"}' in metrics
        assert 'sdengine_requests_total{path="/sdapi/v1/txt2img",status="422"} 10.0' in metrics
        assert "sdengine_queue_depth 0.0" in metrics

        # Memory: after the load (and its 20 cancelled requests), RSS is back near its warm level.
        run_load(server.url, _mix(16, rng, 20_000), concurrency=16)
        rss_after = server.rss_bytes()
        assert rss_after <= 1.05 * rss_after_warmup, (rss_after_warmup, rss_after)
