"""GET /metrics: Prometheus text format, one registry per app (prometheus_client).

    sdengine_queue_depth                     requests waiting for the model
    sdengine_requests_total{path,status}     answered requests by path and HTTP status
    sdengine_request_latency_seconds         histogram of generation request latency (txt2img, img2img)
    sdengine_images_total                    images generated
    sdengine_images_per_second               images generated per second over the last minute
    sdengine_batch_images                    histogram of images per pipeline call (UNet batch / 2 with CFG)
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Callable

WINDOW_S = 60.0
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300, 600)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)


class Metrics:
    def __init__(self, queue_depth: Callable[[], int]):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self._lock = threading.Lock()
        self._image_times: deque = deque()
        self._started = time.monotonic()
        Gauge("sdengine_queue_depth", "Requests waiting for the model", registry=self.registry).set_function(
            lambda: float(queue_depth()))
        self.requests = Counter("sdengine_requests", "Answered requests by path and HTTP status",
                                ["path", "status"], registry=self.registry)
        self.latency = Histogram("sdengine_request_latency_seconds", "Latency of generation requests",
                                 ["path"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.images = Counter("sdengine_images", "Images generated", registry=self.registry)
        Gauge("sdengine_images_per_second", f"Images per second over the last {WINDOW_S:.0f} s",
              registry=self.registry).set_function(self.images_per_second)
        self.batch_images = Histogram("sdengine_batch_images", "Images per pipeline call",
                                      buckets=BATCH_BUCKETS, registry=self.registry)

    def observe_images(self, n: int):
        now = time.monotonic()
        self.images.inc(n)
        with self._lock:
            self._image_times.extend([now] * n)
            self._trim(now)

    def images_per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            self._trim(now)
            span = min(WINDOW_S, now - self._started)
            return len(self._image_times) / span if span > 0 else 0.0

    def _trim(self, now: float):
        while self._image_times and self._image_times[0] < now - WINDOW_S:
            self._image_times.popleft()

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
