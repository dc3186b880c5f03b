"""The FastAPI app: A1111's /sdapi/v1 endpoints over an engine, plus /health and /metrics.

The engine is what runs the requests: `LocalEngine` (the scheduler and one pipeline in this
process) or `ray_app.RayEngine` (a Ray Serve model deployment). The app is the same for
both; it looks the engine up in `app.state.engine` on every request, so that a Ray ingress
replica can set it after the app has been shipped to it.

Status codes: 422 names the field (pydantic's errors, and ours in the same shape); 401
without the bearer token when --api-key is set; 413 for a body over the cap; 503 with
Retry-After when the queue is full or a Ray replica died under the request; 504 when a
request outlives its timeout. A failure inside the model is a 500 with its message, and
the server goes on.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response

from ..samplers.names import A1111_SAMPLER_LIST, A1111_SCHEDULE_TABLE, SAMPLER_TABLE
from .requests import (IP_ADAPTER_MODULES, FieldError, Limits, ModelInfo, decode_image, field_of, make_spec,
                       response_body)
from .scheduler import ClientGone, ModelUnavailable, QueueFull, RequestTimeout, Scheduler, progress_body
from .schemas import (Img2ImgRequest, ImageResponse, PngInfoRequest, PngInfoResponse, ProgressResponse, SamplerItem,
                      SchedulerItem, SDModelItem, TaskProgressRequest, TaskProgressResponse, Txt2ImgRequest)

log = logging.getLogger("sdengine.serve")


@dataclass
class ServeSettings:
    """Everything `sdengine serve` can set, besides the model and where to listen."""

    batching: bool = True
    max_batch_images: int = 8
    batch_window_ms: float = 5.0
    max_queue: int = 64
    request_timeout_s: float = 600.0
    max_size: int = 2048          # width and height, each
    max_steps: int = 1000
    max_batch_size: int = 8
    max_batch_count: int = 4      # n_iter
    max_body_bytes: int = 32 * 1024 * 1024
    api_key: Optional[str] = None
    lora_dir: Optional[str] = None  # where <lora:name:weight> finds name.safetensors; /sdapi/v1/loras lists it
    prompt_syntax: Optional[str] = "a1111"  # A1111's: emphasis, 75-token windows, <lora:...> tags
    preview_every: int = 1  # live preview (current_image of /progress) every N steps; 0: none
    web_ui: bool = True     # the web UI at / (sdengine/serve/ui)
    refiner: Optional[str] = None  # an SDXL refiner that requests name in refiner_checkpoint (--refiner)
    ip_adapters: tuple = ()        # IP-Adapter files that ControlNet units name (--ip-adapter)
    image_encoder: Optional[str] = None  # their image encoder (--image-encoder)
    controlnets: tuple = ()        # ControlNets (folders or files) that ControlNet units name (--controlnet)

    @property
    def limits(self) -> Limits:
        return Limits(max_size=self.max_size, max_steps=self.max_steps, max_batch_size=self.max_batch_size,
                      max_batch_count=self.max_batch_count)


# A1111's lists (its labels, aliases and options), then the samplers sdengine adds (DDPM)
SAMPLER_LABELS = tuple((label, list(aliases), dict(options)) for label, aliases, options in A1111_SAMPLER_LIST) + tuple(
    (label, list(aliases), {}) for _, label, aliases in SAMPLER_TABLE
    if label not in {label for label, _, _ in A1111_SAMPLER_LIST})
SCHEDULER_LABELS = tuple((name, label, list(aliases) if aliases else None, rho, inner)
                         for name, label, aliases, rho, inner in A1111_SCHEDULE_TABLE)


class LocalEngine:
    """One pipeline in this process, behind the batching scheduler."""

    def __init__(self, loaded, settings: ServeSettings, metrics=None):
        """loaded: the model (model.load_served_model)."""
        from .preview import LatentPreview, Previews
        from .scheduler import SchedulerSettings

        self._info = loaded.info
        every = settings.preview_every
        self.previews = Previews(LatentPreview.for_pipeline(loaded.pipe) if every > 0 else None, every)
        self.scheduler = Scheduler(
            loaded.served, SchedulerSettings(batching=settings.batching, max_batch_images=settings.max_batch_images,
                                    batch_window_s=settings.batch_window_ms / 1000, max_queue=settings.max_queue),
            on_batch=metrics.batch_images.observe if metrics else None, previews=self.previews)

    async def info(self) -> ModelInfo:
        return self._info

    async def run(self, spec, *, timeout_s, disconnected):
        return await self.scheduler.run(spec, timeout_s=timeout_s, disconnected=disconnected)

    async def interrupt(self):
        self.scheduler.interrupt()

    async def progress(self) -> dict:
        return self.scheduler.progress()

    async def current_image(self) -> Optional[str]:
        return await asyncio.to_thread(self.previews.png_b64)

    async def task_state(self, task_id: str) -> dict:
        return self.scheduler.task_state(task_id)

    def queue_depth(self) -> int:
        return self.scheduler.queue_depth()

    def close(self):
        self.scheduler.close()


def create_app(engine=None, settings: ServeSettings = ServeSettings(), metrics=None) -> FastAPI:
    """The ASGI app. `engine` may be set later as `app.state.engine` (Ray ingress)."""
    from .metrics import Metrics

    app = FastAPI(title="sdengine serve", description="AUTOMATIC1111-compatible /sdapi/v1 API over sdengine",
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    app.state.settings = settings
    app.state.metrics = metrics or Metrics(lambda: app.state.engine.queue_depth() if app.state.engine else 0)
    app.state.started = time.time()
    app.state.openapi = None

    def engine_of(request: Request):
        eng = request.app.state.engine
        if eng is None:
            raise ModelUnavailable("the model is not loaded yet")
        return eng

    async def generate(request: Request, req, img2img: bool):
        eng = engine_of(request)
        path = request.url.path
        started = time.monotonic()
        info = await eng.info()
        spec = await asyncio.to_thread(make_spec, req, info, settings.limits, img2img=img2img,
                                       prompt_syntax=settings.prompt_syntax, lora_dir=settings.lora_dir)
        out = await eng.run(spec, timeout_s=settings.request_timeout_s, disconnected=request.is_disconnected)
        if out.error is not None:
            if isinstance(out.error, ValueError):
                raise FieldError(field_of(out.error), str(out.error))
            if isinstance(out.error, ModelUnavailable):
                raise out.error
            raise RuntimeError(f"generation failed: {type(out.error).__name__}: {out.error}")
        if out.cancelled:
            raise ModelUnavailable("the request was cancelled before it finished")
        body = await asyncio.to_thread(response_body, req, spec, out, info)
        metrics = request.app.state.metrics
        metrics.latency.labels(path).observe(time.monotonic() - started)
        metrics.observe_images(len(out.images))
        return body

    @app.post("/sdapi/v1/txt2img", response_model=ImageResponse)
    async def txt2img(request: Request, req: Txt2ImgRequest):
        return await generate(request, req, img2img=False)

    @app.post("/sdapi/v1/img2img", response_model=ImageResponse)
    async def img2img(request: Request, req: Img2ImgRequest):
        return await generate(request, req, img2img=True)

    @app.get("/sdapi/v1/progress", response_model=ProgressResponse)
    async def progress(request: Request, skip_current_image: bool = False):
        """The running job's progress; current_image is its live preview (base64 PNG, every
        --preview-every steps), unless skip_current_image."""
        eng = engine_of(request)
        state = await eng.progress()
        image = None if skip_current_image or not state.get("job_count") else await eng.current_image()
        return progress_body(state, image)

    @app.post("/internal/progress", response_model=TaskProgressResponse)
    async def task_progress(request: Request, req: TaskProgressRequest):
        """A1111's own web UI's progress call: where the request sent with force_task_id=id_task
        is (queued with N requests ahead, active, completed), with the live preview while it runs."""
        eng = engine_of(request)
        where = await eng.task_state(req.id_task)
        if not where.get("active"):
            queued = where.get("queued")
            text = (f"In queue: {queued} request{'s' if queued != 1 else ''} ahead" if queued is not None
                    else None if where.get("completed") else "Waiting...")
            return {"active": False, "queued": queued is not None, "completed": bool(where.get("completed")),
                    "queue_position": queued, "progress": None, "eta": None, "live_preview": None,
                    "id_live_preview": req.id_live_preview, "textinfo": text}
        body = progress_body(await eng.progress())
        image = await eng.current_image() if req.live_preview else None
        step, total = body["state"].get("sampling_step", 0), body["state"].get("sampling_steps", 0)
        return {"active": True, "queued": False, "completed": False, "queue_position": 0,
                "progress": body["progress"], "eta": body["eta_relative"],
                "live_preview": f"data:image/png;base64,{image}" if image else None,
                "id_live_preview": req.id_live_preview + 1 if image else req.id_live_preview,
                "textinfo": f"Step {step}/{total}" if total else "Starting..."}

    @app.post("/sdapi/v1/interrupt")
    async def interrupt(request: Request):
        await engine_of(request).interrupt()
        return {}

    @app.get("/sdapi/v1/samplers", response_model=list[SamplerItem])
    async def sampler_list():
        return [{"name": name, "aliases": aliases, "options": options} for name, aliases, options in SAMPLER_LABELS]

    @app.get("/sdapi/v1/schedulers", response_model=list[SchedulerItem])
    async def scheduler_list():
        return [{"name": name, "label": label, "aliases": aliases, "default_rho": rho, "need_inner_model": inner}
                for name, label, aliases, rho, inner in SCHEDULER_LABELS]

    @app.get("/sdapi/v1/sd-models", response_model=list[SDModelItem])
    async def sd_models(request: Request):
        info = await engine_of(request).info()
        return [{"title": info.title, "model_name": info.title, "hash": None, "sha256": None,
                 "filename": info.filename, "config": None}]

    @app.get("/sdapi/v1/loras")
    async def loras():
        """A1111's Lora extension: the LoRAs <lora:name:weight> can name (name, alias, path, metadata)."""
        return await asyncio.to_thread(lora_list, settings.lora_dir)

    @app.get("/sdapi/v1/options")
    async def options(request: Request):
        info = await engine_of(request).info()
        return {"sd_model_checkpoint": info.title, "CLIP_stop_at_last_layers": 1, "samples_format": "png",
                "eta_ddim": 0.0, "eta_ancestral": 1.0}

    @app.get("/controlnet/model_list")
    async def controlnet_model_list(request: Request, update: Optional[bool] = None):
        """A1111's ControlNet extension: the models a unit can name, the loaded ControlNets as
        "name [hash]" (sdengine serve --controlnet), then the IP-Adapters (--ip-adapter). `update`
        (rescan the models folder) has nothing to do here."""
        info = await engine_of(request).info()
        return {"model_list": [*info.controlnet_titles, *info.ip_adapters]}

    @app.get("/controlnet/module_list")
    async def controlnet_module_list(request: Request, alias_names: Optional[bool] = None):
        """A1111's ControlNet extension: the modules (preprocessors) a unit can name. "none" (the
        control image is the control map as sent) and, with IP-Adapters loaded, their modules."""
        info = await engine_of(request).info()
        return {"module_list": ["none", *(IP_ADAPTER_MODULES if info.ip_adapters else ())]}

    @app.get("/sdapi/v1/scripts")
    async def scripts():
        return {"txt2img": [], "img2img": []}

    @app.post("/sdapi/v1/png-info", response_model=PngInfoResponse)
    async def png_info(req: PngInfoRequest):
        """A1111's PNG Info: an image's text chunks; `info` is its `parameters` (the infotext) and
        `parameters` that text parsed (sdengine.infotext.parse_infotext: A1111's keys, Size as
        Size-1 and Size-2, values as text)."""
        return await asyncio.to_thread(png_info_body, req.image, settings.limits)

    if settings.web_ui:
        _add_web_ui(app)

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi_json(request: Request):
        """The schema, completed for this server's caps and model (openapi.py)."""
        if app.state.openapi is None:
            from .openapi import openapi_schema

            info = await engine_of(request).info()
            app.state.openapi = openapi_schema(app.openapi(), settings.limits, info, settings.api_key is not None)
        return app.state.openapi

    @app.get("/docs", include_in_schema=False)
    async def docs():
        from fastapi.openapi.docs import get_swagger_ui_html

        return get_swagger_ui_html(openapi_url="/openapi.json", title="sdengine serve")

    @app.get("/health")
    async def health(request: Request):
        eng = request.app.state.engine
        return {"status": "ok" if eng is not None else "loading", "queue_depth": eng.queue_depth() if eng else 0,
                "uptime_s": round(time.time() - request.app.state.started, 3)}

    @app.get("/metrics")
    async def metrics_text(request: Request):
        body, content_type = request.app.state.metrics.render()
        return Response(body, media_type=content_type)

    @app.exception_handler(FieldError)
    async def on_field_error(request: Request, e: FieldError):
        return JSONResponse({"detail": e.detail()}, status_code=422)

    @app.exception_handler(QueueFull)
    async def on_queue_full(request: Request, e: QueueFull):
        return JSONResponse({"detail": str(e)}, status_code=503, headers={"Retry-After": str(e.retry_after_s)})

    @app.exception_handler(ModelUnavailable)
    async def on_unavailable(request: Request, e: ModelUnavailable):
        return JSONResponse({"detail": str(e)}, status_code=503, headers={"Retry-After": "1"})

    @app.exception_handler(RequestTimeout)
    async def on_timeout(request: Request, e: RequestTimeout):
        return JSONResponse({"detail": str(e)}, status_code=504)

    @app.exception_handler(ClientGone)
    async def on_gone(request: Request, e: ClientGone):
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it

    @app.exception_handler(RuntimeError)
    async def on_failure(request: Request, e: RuntimeError):
        log.error("%s %s failed: %s", request.method, request.url.path, e)
        return JSONResponse({"detail": str(e)}, status_code=500)

    app.add_middleware(Guard, settings=settings, metrics=app.state.metrics)
    return app


UI_DIR = Path(__file__).resolve().parent / "ui"
UI_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
            ".css": "text/css; charset=utf-8"}
# Everything the page loads comes from this server; images are data: URLs it built.
UI_HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; "
                                         "script-src 'self'; connect-src 'self'; frame-ancestors 'none'",
              "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}


def _add_web_ui(app: FastAPI):
    """The web UI (sdengine/serve/ui): / is its page, /ui/NAME its scripts and styles. Static
    files that hold no data, so they load without the API key (the page asks for it)."""
    files = {path.name: path for path in UI_DIR.iterdir() if path.suffix in UI_TYPES}

    def serve_file(name: str) -> Response:
        path = files.get(name)
        if path is None:
            return JSONResponse({"detail": f"no such file: {name}"}, status_code=404)
        return Response(path.read_bytes(), media_type=UI_TYPES[path.suffix], headers=UI_HEADERS)

    @app.get("/", include_in_schema=False)
    async def web_ui():
        return serve_file("index.html")

    @app.get("/ui/{name}", include_in_schema=False)
    async def web_ui_file(name: str):
        return serve_file(name)


def png_info_body(image: str, limits: Limits) -> dict:
    """POST /sdapi/v1/png-info's answer (A1111's PNGInfoResponse)."""
    from ..infotext import parse_infotext

    decoded = decode_image(image, "image", limits)
    items = {k: v for k, v in decoded.info.items() if isinstance(v, str)}
    text = items.pop("parameters", "")
    parameters = {}
    if text:
        parsed = parse_infotext(text)
        parameters = {"Prompt": parsed.prompt, "Negative prompt": parsed.negative_prompt, **parsed.fields}
        width, _, height = str(parsed.fields.get("Size", "")).partition("x")
        if width.isdigit() and height.isdigit():
            parameters.update({"Size-1": width, "Size-2": height})
    return {"info": text, "items": items, "parameters": parameters}


# Paths counted by name in sdengine_requests_total; anything else counts as "other".
_KNOWN_PATHS = {"/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/sdapi/v1/progress", "/sdapi/v1/interrupt",
                "/sdapi/v1/samplers", "/sdapi/v1/schedulers", "/sdapi/v1/sd-models", "/sdapi/v1/options",
                "/sdapi/v1/loras", "/sdapi/v1/scripts", "/sdapi/v1/png-info", "/internal/progress", "/health",
                "/metrics", "/", "/openapi.json", "/controlnet/model_list", "/controlnet/module_list"}


class Guard:
    """Pure-ASGI middleware: bearer-token check, body-size cap, and counting answers by status.

    A refused request never reaches a route: a body whose Content-Length is over the cap is
    refused before it is read, and a chunked one is cut off at the cap (413 either way).
    """

    def __init__(self, app, settings: ServeSettings, metrics):
        self.app = app
        self.settings = settings
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        label = path if path in _KNOWN_PATHS else "other"

        async def counted_send(message):
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(label, str(message["status"])).inc()
            await send(message)

        public = self.settings.web_ui and (path == "/" or path.startswith("/ui/"))
        if self.settings.api_key is not None and not public and not self._authorized(scope):
            return await _json(counted_send, 401, {"detail": "missing or wrong bearer token (--api-key)"},
                               {"www-authenticate": "Bearer"})
        limit = self.settings.max_body_bytes
        too_large = f"request body over {limit} bytes (--max-body-mb)"
        length = dict(scope.get("headers", [])).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await _json(counted_send, 413, {"detail": too_large}, {"connection": "close"})
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:  # FastAPI answers an HTTPException raised while it reads the body
                    raise HTTPException(status_code=413, detail=too_large)
            return message

        await self.app(scope, limited_receive, counted_send)

    def _authorized(self, scope) -> bool:
        header = dict(scope.get("headers", [])).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(),
                                                                   self.settings.api_key.encode())


async def _json(send, status: int, body: dict, headers: Optional[dict] = None):
    raw = json.dumps(body).encode()
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    hdrs += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": raw})


def lora_list(lora_dir) -> list:
    """The LoRA files of lora_dir as A1111's /sdapi/v1/loras lists them; a safetensors file's
    metadata is its header's __metadata__ (read without loading a tensor)."""
    if lora_dir is None:
        return []
    from ..lora import available_loras

    out = []
    for name, path in sorted(available_loras(lora_dir).items()):
        metadata = {}
        if path.suffix == ".safetensors":
            try:
                from safetensors import safe_open

                with safe_open(str(path), framework="pt") as f:
                    metadata = f.metadata() or {}
            except Exception:  # a broken file still lists; loading it is what refuses it
                metadata = {}
        out.append({"name": name, "alias": metadata.get("ss_output_name", name), "path": str(path),
                    "metadata": metadata})
    return out
