"""`sdengine serve`: the subcommand (registered by sdengine.cli). Imports nothing optional
until it runs, so that `sdengine --help` works without the serve extra."""

from __future__ import annotations

import logging
import os
import sys

from .options import add_arguments, settings_from_args

log = logging.getLogger("sdengine.serve")


def register(sub):
    p = sub.add_parser(
        "serve", help="serve an AUTOMATIC1111-compatible HTTP API (/sdapi/v1) with dynamic batching",
        description="Keep one model loaded and serve A1111's /sdapi/v1 API (txt2img, img2img, inpainting, "
                    "progress, interrupt, ...), A1111's ControlNet extension's units and /controlnet/model_list "
                    "(--controlnet, --ip-adapter), plus /health and /metrics. Requests of the same size, steps, "
                    "sampler and guidance that arrive within --batch-window-ms run as one UNet batch. "
                    "Needs: pip install \"sdengine[serve]\".")
    add_arguments(p)
    p.set_defaults(func=_serve)


def _serve(args) -> int:
    from . import require

    try:
        require()
        if args.ray:
            require("ray.serve")
    except ImportError as e:
        print(f"sdengine serve: error: {e}", file=sys.stderr)
        return 2
    settings = settings_from_args(args)
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s: the API is reachable from other machines%s", args.host,
                    "" if settings.api_key else " and has no --api-key")
        print(f"sdengine serve: warning: listening on {args.host} exposes the server beyond this machine"
              f"{'' if settings.api_key else '; consider --api-key'}", file=sys.stderr)
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if args.model is not None and not os.path.exists(args.model):
        raise FileNotFoundError(f"model path does not exist: {args.model}")
    if args.ray:
        from .ray_app import RayOptions, run

        run(args.model, settings, RayOptions.from_args(args), host=args.host, port=args.port,
            backend=args.backend, device=args.device, dtype=args.dtype, threads=args.threads)
        return 0
    if args.replicas is not None or args.autoscale is not None or args.address is not None:
        raise ValueError("--replicas, --autoscale and --address need --ray")
    import uvicorn

    app = build_local_app(args.model, settings, backend=args.backend, device=args.device, dtype=args.dtype,
                          threads=args.threads)
    print(f"sdengine serve: {app.state.engine._info.title} on http://{args.host}:{args.port} "
          f"(batching {'on' if settings.batching else 'off'}"
          f"{'; web UI at /' if settings.web_ui else ''})", file=sys.stderr, flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=5)
    finally:
        app.state.engine.close()
    return 0


def build_local_app(model, settings, *, backend=None, device=None, dtype=None, threads=None):
    """Load the model and build the app around a LocalEngine (used by the CLI and the tests)."""
    from .app import LocalEngine, create_app
    from .model import load_served_model

    loaded = load_served_model(model, backend=backend, device=device, dtype=dtype, threads=threads,
                               refiner=settings.refiner, ip_adapters=settings.ip_adapters,
                               image_encoder=settings.image_encoder, controlnets=settings.controlnets)
    app = create_app(None, settings)
    app.state.engine = LocalEngine(loaded, settings, app.state.metrics)
    return app
