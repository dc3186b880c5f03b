"""Scale-out on Ray Serve: the same FastAPI app, as a Ray Serve application.

    Ingress (the app of app.py, @serve.ingress)  --handle-->  SDModel replicas (@serve.batch)

- `Ingress` builds the app of app.py on its replica, around a `RayEngine`: validation,
  image decoding and PNG encoding happen there, and a `Spec` (plain data) goes to a model
  replica.
- `SDModel` holds one pipeline per replica (`ray_actor_options={"num_gpus": ...}`). Its
  `@serve.batch` method receives the specs that arrived within the batch window, groups
  them by shape key and runs each group as one pipeline call (batching.run_group), in a
  worker thread so that the replica keeps answering while it computes.
- Replicas are fixed (`--replicas N`) or autoscaled (`--autoscale MIN:MAX`); `--address`
  joins an existing cluster (KubeRay: see docs/serving.md), else a local one is started.

A replica that dies under a request fails that request with a 503 (the ingress maps Ray's
actor errors), never a hang: the per-request timeout bounds every wait, and Serve's
controller starts a new replica. /interrupt cancels the ingress's requests in flight (they
answer 200 with no images and `"interrupted": true` in `info`); a replica stops a batch
once every request in it is cancelled.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import Optional

from .batching import Output, run_group
from .requests import ModelInfo
from .scheduler import ClientGone, ModelUnavailable, QueueFull, RequestTimeout, idle_state

log = logging.getLogger("sdengine.serve")

APP_NAME = "sdengine"


@dataclass
class RayOptions:
    address: Optional[str] = None
    replicas: Optional[int] = None
    autoscale: Optional[tuple] = None        # (min, max)
    num_gpus_per_replica: Optional[float] = None
    num_cpus_per_replica: float = 1.0

    @classmethod
    def from_args(cls, args) -> "RayOptions":
        autoscale = None
        if args.autoscale is not None:
            if args.replicas is not None:
                raise ValueError("give --replicas or --autoscale, not both")
            lo, sep, hi = args.autoscale.partition(":")
            if not (sep and lo.isdigit() and hi.isdigit() and int(lo) <= int(hi) and int(hi) >= 1):
                raise ValueError(f"--autoscale must be MIN:MAX with 0 <= MIN <= MAX, MAX >= 1; got {args.autoscale!r}")
            autoscale = (int(lo), int(hi))
        if args.replicas is not None and args.replicas < 1:
            raise ValueError(f"--replicas must be >= 1, got {args.replicas}")
        return cls(address=args.address, replicas=args.replicas, autoscale=autoscale,
                   num_gpus_per_replica=args.num_gpus_per_replica, num_cpus_per_replica=args.num_cpus_per_replica)


class SDModel:
    """One pipeline per replica; specs arrive through the @serve.batch method `_batched`
    (added by _deployment_class, so that this module imports without ray)."""

    def __init__(self, model, backend, device, dtype, threads, max_batch_images: int, batch_wait_s: float,
                 batching: bool, preview_every: int = 0, refiner: Optional[str] = None, ip_adapters: tuple = (),
                 image_encoder: Optional[str] = None, controlnets: tuple = ()):
        from .model import load_served_model
        from .preview import LatentPreview, Previews

        loaded = load_served_model(model, backend=backend, device=device, dtype=dtype, threads=threads,
                                   refiner=refiner, ip_adapters=ip_adapters, image_encoder=image_encoder,
                                   controlnets=controlnets)
        self.model_info, self.pipe = loaded.info, loaded.served
        self.previews = Previews(LatentPreview.for_pipeline(loaded.pipe) if preview_every > 0 else None, preview_every)
        self.max_batch_images = max_batch_images
        self._batched.set_max_batch_size(max_batch_images if batching else 1)
        self._batched.set_batch_wait_timeout_s(batch_wait_s if batching else 0.0)
        self._cancelled: set = set()
        self._progress: dict = {}

    def info(self) -> ModelInfo:
        return self.model_info

    def pid(self) -> int:
        return os.getpid()

    def progress(self) -> dict:
        return dict(idle_state(), **self._progress)

    def current_image(self):
        return self.previews.png_b64() if self._progress else None

    async def generate(self, spec) -> Output:
        try:
            return await self._batched(spec)
        except asyncio.CancelledError:  # the ingress cancelled: client gone, timeout or /interrupt
            self._cancelled.add(spec.request_id)
            raise

    async def _run_batch(self, specs: list) -> list:
        """The body of the @serve.batch method: one Output per spec, in order."""
        groups: dict = {}
        for i, spec in enumerate(specs):
            groups.setdefault(spec.key, []).append(i)
        results: list = [None] * len(specs)
        for indices in groups.values():
            group = [specs[i] for i in indices]
            self._progress = dict(job=f"batch of {len(group)}", job_count=len(group), time_start=time.time())
            self.previews.start_job()

            def on_step(step, total, latents):
                self._progress = dict(self._progress, sampling_step=step + 1, sampling_steps=total)
                self.previews.keep(step + 1, total, latents)

            outputs = await asyncio.to_thread(
                run_group, self.pipe, group, max_batch_images=self.max_batch_images,
                cancelled=lambda j, group=group: group[j].request_id in self._cancelled, on_step=on_step)
            for i, out in zip(indices, outputs):
                results[i] = out
                self._cancelled.discard(specs[i].request_id)
            self._progress = {}
        return results


def _deployment_class(serve):
    """SDModel with its @serve.batch method; the batch size and window are set per replica
    in SDModel.__init__ (set_max_batch_size, set_batch_wait_timeout_s)."""

    class SDModelReplica(SDModel):
        @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
        async def _batched(self, specs: list) -> list:
            return await self._run_batch(specs)

    return SDModelReplica


class RayEngine:
    """The app's engine on the ingress replica: forwards specs to the SDModel deployment."""

    def __init__(self, handle, max_in_flight: int):
        self.handle = handle
        self.max_in_flight = max_in_flight
        self._info: Optional[ModelInfo] = None
        self._in_flight: dict = {}
        self._task_ids: dict = {}   # request_id -> the client's force_task_id
        self._interrupted: set = set()

    async def info(self) -> ModelInfo:
        if self._info is None:
            self._info = await self.handle.info.remote()
        return self._info

    async def run(self, spec, *, timeout_s, disconnected) -> Output:
        if len(self._in_flight) >= self.max_in_flight:
            raise QueueFull(1)
        response = self.handle.generate.remote(spec)
        self._in_flight[spec.request_id] = response
        if spec.task_id:
            self._task_ids[spec.request_id] = spec.task_id
        waiter = asyncio.ensure_future(_await(response))
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    response.cancel()
                    raise RequestTimeout(f"no result within {timeout_s:g} s")
                done, _ = await asyncio.wait({waiter}, timeout=min(0.1, left))
                if done:
                    break
                if await disconnected():
                    response.cancel()
                    raise ClientGone("the client disconnected")
            try:
                return waiter.result()
            except Exception as e:  # noqa: BLE001 - Ray's errors: the replica died, or we cancelled
                if spec.request_id in self._interrupted:
                    return Output(interrupted=True)
                raise ModelUnavailable(f"the model replica failed: {type(e).__name__}: {str(e)[:300]}") from None
        finally:
            self._in_flight.pop(spec.request_id, None)
            self._task_ids.pop(spec.request_id, None)
            self._interrupted.discard(spec.request_id)
            if not waiter.done():
                waiter.cancel()

    async def interrupt(self):
        for request_id, response in list(self._in_flight.items()):
            self._interrupted.add(request_id)
            response.cancel()

    async def progress(self) -> dict:
        return await self.handle.progress.remote()

    async def current_image(self):
        return await self.handle.current_image.remote()

    async def task_state(self, task_id: str) -> dict:
        """Ray queues on its replicas, out of the ingress's sight: active while in flight."""
        return {"active": True} if task_id in self._task_ids.values() else {}

    def queue_depth(self) -> int:
        return len(self._in_flight)


async def _await(response):
    return await response


def build_application(model, settings, options: RayOptions, *, backend=None, device=None, dtype=None,
                      threads=None):
    """The Ray Serve application (bound deployments): Ingress(SDModel)."""
    from ray import serve

    from .app import create_app

    num_gpus = options.num_gpus_per_replica
    if num_gpus is None:
        import torch

        num_gpus = 1 if torch.cuda.is_available() else 0
    scaling = ({"autoscaling_config": {"min_replicas": options.autoscale[0], "max_replicas": options.autoscale[1],
                                       "target_ongoing_requests": max(1, settings.max_batch_images)}}
               if options.autoscale else {"num_replicas": options.replicas or 1})
    model_deployment = serve.deployment(
        _deployment_class(serve), name="SDModel",
        ray_actor_options={"num_gpus": num_gpus, "num_cpus": options.num_cpus_per_replica},
        max_ongoing_requests=max(2 * settings.max_batch_images, 8), health_check_period_s=2.0,
        health_check_timeout_s=30.0, graceful_shutdown_timeout_s=5.0, **scaling)

    @serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0.1},
                      max_ongoing_requests=settings.max_queue + 16)
    @serve.ingress()
    class Ingress:
        """The app of app.py, built on the ingress replica around a RayEngine."""

        def __init__(self, model_handle, settings):
            self.sdengine_app = create_app(RayEngine(model_handle, settings.max_queue), settings)

        def __serve_build_asgi_app__(self):
            return self.sdengine_app

    return Ingress.bind(model_deployment.bind(model, backend, device, dtype, threads, settings.max_batch_images,
                                              settings.batch_window_ms / 1000, settings.batching,
                                              settings.preview_every, settings.refiner, settings.ip_adapters,
                                              settings.image_encoder, settings.controlnets), settings)


def run(model, settings, options: RayOptions, *, host: str, port: int, backend=None, device=None, dtype=None,
        threads=None):
    """`sdengine serve --ray`: start or join a cluster, deploy, and serve until interrupted."""
    import ray
    from ray import serve

    ray.init(address=options.address, include_dashboard=False, logging_level=logging.WARNING)
    serve.start(http_options={"host": host, "port": port})
    application = build_application(model, settings, options, backend=backend, device=device, dtype=dtype,
                                    threads=threads)
    serve.run(application, name=APP_NAME, route_prefix="/")
    print(f"sdengine serve: Ray Serve application {APP_NAME!r} on http://{host}:{port}", file=sys.stderr, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()


def app_from_env(args: Optional[dict] = None):
    """A Ray Serve application builder for `serve deploy` / KubeRay's serveConfigV2
    (`import_path: sdengine.serve.ray_app:app_from_env`): the model from $SDENGINE_MODEL
    (default: the demo model), the other `sdengine serve` options from $SDENGINE_SERVE_ARGS,
    the API key from $SDENGINE_API_KEY."""
    import argparse
    import shlex

    from .options import add_arguments, settings_from_args

    parser = argparse.ArgumentParser(prog="sdengine serve")
    add_arguments(parser)
    argv = [*([os.environ["SDENGINE_MODEL"]] if os.environ.get("SDENGINE_MODEL") else []),
            *shlex.split(os.environ.get("SDENGINE_SERVE_ARGS", "")), "--ray"]
    ns = parser.parse_args(argv)
    return build_application(ns.model, settings_from_args(ns), RayOptions.from_args(ns), backend=ns.backend,
                             device=ns.device, dtype=ns.dtype, threads=ns.threads)
