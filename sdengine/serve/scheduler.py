"""The scheduler in front of one loaded model: a bounded queue and one worker thread.

Requests (`Spec`s) wait in a FIFO. The worker takes the oldest, then, for up to
`batch_window_s`, gathers the waiting requests of the same key (size, steps, sampler,
guidance, ...) until `max_batch_images` images are collected, and runs them as one
pipeline call (batching.run_group). With `batching=False` every request runs alone.

Only the worker thread touches the pipeline. Each request's state (its future and its
cancel flag) belongs to its own Ticket; the worker's progress snapshot is replaced under a
lock, never shared mutably with the request handlers.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Optional

from .batching import Output, Spec, run_group

log = logging.getLogger("sdengine.serve")


class QueueFull(RuntimeError):
    """The queue holds max_queue requests: answer 503 with Retry-After."""

    def __init__(self, retry_after_s: int):
        super().__init__(f"the queue is full; retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


class RequestTimeout(RuntimeError):
    """The request did not finish within the per-request timeout (504)."""


class ClientGone(RuntimeError):
    """The client disconnected; nobody reads the answer."""


class ModelUnavailable(RuntimeError):
    """The model replica serving the request died (Ray): 503."""


@dataclass
class Ticket:
    spec: Spec
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued_at: float = field(default_factory=time.monotonic)


@dataclass
class SchedulerSettings:
    batching: bool = True
    max_batch_images: int = 8
    batch_window_s: float = 0.005
    max_queue: int = 64


class Scheduler:
    """Runs Specs on one pipeline from one worker thread. `await run(spec, ...)` from asyncio."""

    def __init__(self, pipe, settings: SchedulerSettings = SchedulerSettings(), on_batch=None, previews=None):
        self.pipe = pipe
        self.settings = settings
        self._on_batch = on_batch      # on_batch(n_images) before each pipeline call (metrics)
        self.previews = previews       # preview.Previews: the running job's live preview, or None
        self._cv = threading.Condition()
        self._pending: deque = deque()
        self._closed = False
        self._interrupt_epoch = 0
        self._progress_lock = threading.Lock()
        self._progress = idle_state()
        self._recent_s: deque = deque(maxlen=32)  # seconds per finished group: Retry-After estimate
        self._running_ids: frozenset = frozenset()   # task ids (force_task_id) of the group running now
        self._running_count = 0                      # requests in the group running now
        self._finished_ids: deque = deque(maxlen=256)  # the last requests finished, for task_state
        self._thread = threading.Thread(target=self._loop, name="sdengine-serve-worker", daemon=True)
        self._thread.start()

    # -- front side (any thread / the event loop) ------------------------------------

    def queue_depth(self) -> int:
        with self._cv:
            return len(self._pending)

    def submit(self, spec: Spec) -> Ticket:
        ticket = Ticket(spec)
        with self._cv:
            if self._closed:
                raise RuntimeError("the scheduler is closed")
            if len(self._pending) >= self.settings.max_queue:
                raise QueueFull(self._retry_after())
            self._pending.append(ticket)
            self._cv.notify()
        return ticket

    async def run(self, spec: Spec, *, timeout_s: float,
                  disconnected: Optional[Callable[[], Awaitable[bool]]] = None, poll_s: float = 0.1) -> Output:
        """Queue spec and wait for its Output; cancels it on timeout or when the client goes."""
        ticket = self.submit(spec)
        waiter = asyncio.wrap_future(ticket.future)
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RequestTimeout(f"no result within {timeout_s:g} s")
                done, _ = await asyncio.wait({waiter}, timeout=min(poll_s, left))
                if done:
                    return waiter.result()
                if disconnected is not None and await disconnected():
                    raise ClientGone("the client disconnected")
        except BaseException:
            ticket.cancelled.set()  # the worker drops it from the queue, or stops its batch
            with self._cv:
                try:
                    self._pending.remove(ticket)
                except ValueError:
                    pass
            waiter.cancel()
            raise

    def interrupt(self):
        """Stop the batch that is running now (A1111's /interrupt); queued requests go on."""
        with self._progress_lock:
            self._interrupt_epoch += 1
            if self._progress["job_count"]:
                self._progress = dict(self._progress, interrupted=True)

    def progress(self) -> dict:
        with self._progress_lock:
            return dict(self._progress)

    def task_state(self, task_id: str) -> dict:
        """Where request `task_id` (its force_task_id) is: {"queued": n requests ahead of it},
        {"active": True}, {"completed": True}, or {} when this server does not know it."""
        with self._cv:
            for ahead, ticket in enumerate(self._pending):
                if ticket.spec.task_id == task_id:
                    return {"queued": ahead + self._running_count}
        with self._progress_lock:
            if task_id in self._running_ids:
                return {"active": True}
            if task_id in self._finished_ids:
                return {"completed": True}
        return {}

    def close(self, timeout_s: float = 5.0):
        with self._cv:
            self._closed = True
            for ticket in self._pending:
                _resolve(ticket.future, Output(error=RuntimeError("the server is shutting down")))
            self._pending.clear()
            self._cv.notify_all()
        self.interrupt()
        self._thread.join(timeout_s)

    # -- worker side ---------------------------------------------------------------------

    def _retry_after(self) -> int:
        per_group = sorted(self._recent_s)[len(self._recent_s) // 2] if self._recent_s else 1.0
        return max(1, round(per_group * max(1, len(self._pending)) / max(1, self.settings.max_batch_images)))

    def _take_group(self) -> Optional[list]:
        """The oldest live request plus, within the window, those it can share a batch with."""
        s = self.settings
        with self._cv:
            while True:
                while not self._pending and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return None
                first = self._pending.popleft()
                if not first.cancelled.is_set():
                    break
            group, n_images = [first], first.spec.n_images
            if not s.batching:
                return group
            deadline = time.monotonic() + s.batch_window_s
            key = first.spec.key
            while n_images < s.max_batch_images:
                for ticket in list(self._pending):
                    if ticket.spec.key == key and n_images + ticket.spec.n_images <= s.max_batch_images:
                        self._pending.remove(ticket)
                        if not ticket.cancelled.is_set():
                            group.append(ticket)
                            n_images += ticket.spec.n_images
                left = deadline - time.monotonic()
                if left <= 0 or n_images >= s.max_batch_images or self._closed:
                    break
                self._cv.wait(left)
            return group

    def _loop(self):
        while True:
            group = self._take_group()
            if group is None:
                return
            self._run(group)

    def _run(self, group: list):
        with self._progress_lock:
            epoch = self._interrupt_epoch
            self._progress = dict(idle_state(), job=f"batch of {len(group)}", job_count=len(group),
                                  job_timestamp=time.strftime("%Y%m%d%H%M%S"), time_start=time.time())
            self._running_ids = frozenset(t.spec.task_id for t in group if t.spec.task_id)
            self._running_count = len(group)
        if self.previews is not None:
            self.previews.start_job()
        started = time.monotonic()

        def on_step(step: int, total: int, latents):
            with self._progress_lock:
                self._progress = dict(self._progress, sampling_step=step + 1, sampling_steps=total)
            if self.previews is not None:
                self.previews.keep(step + 1, total, latents)

        def on_chunk(n: int):
            if self._on_batch is not None:
                self._on_batch(n)

        try:
            outputs = run_group(self.pipe, [t.spec for t in group], max_batch_images=self.settings.max_batch_images,
                                cancelled=lambda i: group[i].cancelled.is_set(),
                                interrupted=lambda: self._interrupt_epoch != epoch,
                                on_step=on_step, on_chunk=on_chunk)
        except BaseException as e:  # noqa: BLE001 - keep the worker alive whatever happens
            log.exception("batch failed")
            outputs = [Output(error=e) for _ in group]
        self._recent_s.append(time.monotonic() - started)
        with self._progress_lock:
            self._progress = idle_state()
            self._finished_ids.extend(self._running_ids)
            self._running_ids = frozenset()
            self._running_count = 0
        if self.previews is not None:
            self.previews.start_job()  # no preview while idle
        for ticket, out in zip(group, outputs):
            _resolve(ticket.future, out)


def _resolve(future: concurrent.futures.Future, out: Output):
    """Set a ticket's result unless its waiter gave up (cancelled) meanwhile."""
    try:
        future.set_result(out)
    except concurrent.futures.InvalidStateError:
        pass


def idle_state() -> dict:
    """A1111's shared.state.dict() fields."""
    return dict(skipped=False, interrupted=False, stopping_generation=False, job="", job_count=0,
                job_timestamp="0", job_no=0, sampling_step=0, sampling_steps=0, time_start=None)


def progress_body(state: dict, current_image: Optional[str] = None) -> dict:
    """A1111's /sdapi/v1/progress answer from a state snapshot (current_image: base64 PNG)."""
    if not state.get("job_count"):
        return dict(progress=0.0, eta_relative=0.0, state=state, current_image=None, textinfo=None)
    progress = 0.01
    if state.get("sampling_steps"):
        progress += state["sampling_step"] / state["sampling_steps"]
    progress = min(progress, 1.0)
    elapsed = time.time() - (state.get("time_start") or time.time())
    eta = elapsed / progress - elapsed
    return dict(progress=progress, eta_relative=eta, state=state, current_image=current_image, textinfo=None)
