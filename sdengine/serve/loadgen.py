"""A load generator for `sdengine serve`: many concurrent clients over real HTTP (httpx).

Used by tests/test_serve_load.py and benchmarks/serve_bench.py:

    with ServerProcess(["--no-batching"]) as server:       # `sdengine serve` in a child process
        stats = run_load(server.url, [txt2img(...)] * 64, concurrency=16)
        stats.summary()   # {"requests", "ok", "p50_s", "p99_s", "throughput_img_s", ...}

A request is a `LoadRequest`: a path, a JSON body, what status it expects, and optionally
a client-side timeout after which the client hangs up mid-request (a disconnect).
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Optional


@dataclass
class LoadRequest:
    body: dict
    path: str = "/sdapi/v1/txt2img"
    expect: int = 200
    disconnect_after_s: Optional[float] = None   # hang up after this long
    n_images: int = 1


@dataclass
class LoadResult:
    request: LoadRequest
    status: Optional[int]        # None: the client hung up (disconnect) or the connection failed
    latency_s: float
    error: str = ""
    body: Optional[dict] = None


@dataclass
class LoadStats:
    results: list = field(default_factory=list)
    wall_s: float = 0.0

    def latencies(self, status: int = 200) -> list:
        return sorted(r.latency_s for r in self.results if r.status == status)

    def unexpected(self) -> list:
        """Results other than expected: the wrong status, or a failure where none was planned."""
        bad = []
        for r in self.results:
            if r.request.disconnect_after_s is not None:
                if r.status is not None and r.status != 200:
                    bad.append(r)
            elif r.status != r.request.expect:
                bad.append(r)
        return bad

    def summary(self) -> dict:
        ok = self.latencies(200)
        images = sum(r.request.n_images for r in self.results if r.status == 200)
        return {
            "requests": len(self.results), "ok": len(ok),
            "by_status": {str(s): sum(1 for r in self.results if r.status == s)
                          for s in sorted({r.status for r in self.results}, key=lambda s: (s is None, s or 0))},
            "p50_s": _quantile(ok, 0.50), "p99_s": _quantile(ok, 0.99), "mean_s": sum(ok) / len(ok) if ok else None,
            "wall_s": self.wall_s, "images": images,
            "throughput_img_s": images / self.wall_s if self.wall_s else None,
        }


def _quantile(sorted_values: list, q: float):
    """Nearest-rank quantile (no interpolation): the value at rank ceil(q * n)."""
    if not sorted_values:
        return None
    rank = max(1, -(-int(q * 1000) * len(sorted_values) // 1000))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def txt2img(prompt: str = "a handwritten digit three", *, seed: int = 1, steps: int = 8, size: int = 32,
            sampler: str = "Euler a", **extra) -> dict:
    return dict(prompt=prompt, seed=seed, steps=steps, width=size, height=size, sampler_name=sampler,
                cfg_scale=7.0, **extra)


def run_load(url: str, requests: list, *, concurrency: int = 16, timeout_s: float = 120.0,
             headers: Optional[dict] = None) -> LoadStats:
    """Send `requests` from `concurrency` clients (each its own connection pool) and wait for all."""
    return asyncio.run(_run_load(url, requests, concurrency, timeout_s, headers or {}))


async def _run_load(url, requests, concurrency, timeout_s, headers) -> LoadStats:
    import httpx

    queue: asyncio.Queue = asyncio.Queue()
    for r in requests:
        queue.put_nowait(r)
    stats = LoadStats()

    async def client():
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout_s) as http:
            while True:
                try:
                    req = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                start = time.perf_counter()
                try:
                    call = http.post(req.path, json=req.body)
                    if req.disconnect_after_s is not None:
                        response = await asyncio.wait_for(call, req.disconnect_after_s)
                    else:
                        response = await call
                    body = response.json() if response.headers.get("content-type", "").startswith(
                        "application/json") else None
                    stats.results.append(LoadResult(req, response.status_code, time.perf_counter() - start,
                                                    body=body if response.status_code != 200 else None))
                except asyncio.TimeoutError:
                    stats.results.append(LoadResult(req, None, time.perf_counter() - start, "disconnected"))
                except httpx.HTTPError as e:
                    stats.results.append(LoadResult(req, None, time.perf_counter() - start, repr(e)))

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    stats.wall_s = time.perf_counter() - start
    return stats


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`sdengine serve ARGS` in a child process on a free loopback port, up until the context ends."""

    def __init__(self, args: list, *, startup_timeout_s: float = 120.0, env: Optional[dict] = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = args
        self.startup_timeout_s = startup_timeout_s
        self.env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
        self.proc: Optional[subprocess.Popen] = None

    def __enter__(self) -> "ServerProcess":
        import httpx

        self.proc = subprocess.Popen([sys.executable, "-m", "sdengine.cli", "serve", "--host", "127.0.0.1",
                                      "--port", str(self.port), *self.args], env=self.env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sdengine serve exited with {self.proc.returncode}: {self.proc.stdout.read()}")
            try:
                if httpx.get(self.url + "/health", timeout=1.0).status_code in (200, 401):
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.__exit__(None, None, None)
        raise RuntimeError(f"sdengine serve did not answer /health within {self.startup_timeout_s} s")

    def rss_bytes(self) -> int:
        import psutil

        return psutil.Process(self.proc.pid).memory_info().rss

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __exit__(self, *exc):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
