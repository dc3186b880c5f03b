"""The options of `sdengine serve`: its arguments and the ServeSettings they make. Shared by the
command (sdengine/serve/cli.py) and the Ray Serve application builder (ray_app.app_from_env),
so that both read the same flags the same way. Imports nothing optional."""

from __future__ import annotations

import os

from ..backends import base as backends


def add_arguments(p) -> None:
    """The arguments of `sdengine serve` (model, server, scheduling, Ray Serve) on parser p."""
    p.add_argument("model", nargs="?", default=None,
                   help="diffusers folder, .safetensors/.ckpt file or ONNX export; default: the bundled demo model")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 exposes the server)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--backend", default=None, choices=backends.names())
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"])
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: the physical cores, but 1 for the small demo model)")
    p.add_argument("--lora-dir", default=None,
                   help="folder of LoRA files that prompts name with <lora:name:weight> (listed at /sdapi/v1/loras)")
    p.add_argument("--prompt-syntax", default="a1111", choices=["a1111", "plain"],
                   help="a1111 (default, as A1111's API): emphasis, 75-token windows, <lora:...> tags; plain: text")
    p.add_argument("--refiner", default=None, metavar="PATH",
                   help="an SDXL refiner that requests name in refiner_checkpoint (its name or this path)")
    p.add_argument("--ip-adapter", action="append", default=[], metavar="FILE",
                   help="an IP-Adapter that A1111 ControlNet units (module ip-adapter_*) name by its file name; "
                        "repeatable (needs --image-encoder)")
    p.add_argument("--image-encoder", default=None, metavar="FOLDER", help="the IP-Adapters' CLIP image encoder")
    p.add_argument("--controlnet", action="append", default=[], metavar="PATH",
                   help="a ControlNet (diffusers folder or A1111 single file) that A1111 ControlNet units (module "
                        "none: the control image as sent) name by its name; listed at /controlnet/model_list; "
                        "repeatable")
    p.add_argument("--api-key", default=os.environ.get("SDENGINE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every endpoint but the web UI's own files, "
                        "which ask for the key (default: $SDENGINE_API_KEY)")
    p.add_argument("--preview-every", type=int, default=1, metavar="N",
                   help="live preview (current_image of /sdapi/v1/progress, A1111's 'Approx cheap') every N "
                        "sampler steps; 0: none (default 1)")
    p.add_argument("--no-web-ui", action="store_true", help="do not serve the web UI at /")
    g = p.add_argument_group("scheduling")
    g.add_argument("--no-batching", action="store_true", help="run every request alone")
    g.add_argument("--max-batch-images", type=int, default=8, help="most images in one pipeline call (default 8)")
    g.add_argument("--batch-window-ms", type=float, default=5.0,
                   help="how long the first request of a batch waits for others of its shape (default 5 ms)")
    g.add_argument("--max-queue", type=int, default=64,
                   help="requests that may wait; more get 503 with Retry-After (default 64)")
    g.add_argument("--request-timeout", type=float, default=600.0,
                   help="seconds a request may take in all, queue included; then 504 (default 600)")
    g.add_argument("--max-size", type=int, default=2048, help="largest width, and largest height (default 2048)")
    g.add_argument("--max-steps", type=int, default=1000, help="most sampler steps a request may ask (default 1000)")
    g.add_argument("--max-batch-size", type=int, default=8, help="largest batch_size of a request (default 8)")
    g.add_argument("--max-batch-count", type=int, default=4,
                   help="largest n_iter (A1111's batch count) of a request (default 4)")
    g.add_argument("--max-body-mb", type=float, default=32.0, help="largest request body in MiB (default 32)")
    r = p.add_argument_group("Ray Serve (scale out)")
    r.add_argument("--ray", action="store_true", help="deploy as a Ray Serve application")
    r.add_argument("--address", default=None,
                   help="Ray cluster to join (e.g. 'auto' or ray://head:10001); default: start a local one")
    r.add_argument("--replicas", type=int, default=None, help="model replicas (default 1)")
    r.add_argument("--autoscale", default=None, metavar="MIN:MAX", help="autoscale the model replicas in [MIN, MAX]")
    r.add_argument("--num-gpus-per-replica", type=float, default=None,
                   help="GPUs per model replica (default 1 when CUDA is available, else 0)")
    r.add_argument("--num-cpus-per-replica", type=float, default=1.0, help="CPUs per model replica (default 1)")


def settings_from_args(args):
    """The ServeSettings of parsed `sdengine serve` arguments; ValueError names a bad flag."""
    from .app import ServeSettings

    checks = (("--max-batch-images", args.max_batch_images, 1), ("--max-queue", args.max_queue, 1),
              ("--max-size", args.max_size, 8), ("--max-steps", args.max_steps, 1),
              ("--max-batch-size", args.max_batch_size, 1), ("--max-batch-count", args.max_batch_count, 1))
    for flag, value, minimum in checks:
        if value < minimum:
            raise ValueError(f"{flag} must be >= {minimum}, got {value}")
    for flag, value in (("--batch-window-ms", args.batch_window_ms), ("--request-timeout", args.request_timeout),
                        ("--max-body-mb", args.max_body_mb)):
        if not value >= 0:
            raise ValueError(f"{flag} must be >= 0, got {value}")
    if args.preview_every < 0:
        raise ValueError(f"--preview-every must be >= 0, got {args.preview_every}")
    if args.api_key is not None and not args.api_key.strip():
        raise ValueError("--api-key must not be empty")
    return ServeSettings(batching=not args.no_batching, max_batch_images=args.max_batch_images,
                         batch_window_ms=args.batch_window_ms, max_queue=args.max_queue,
                         request_timeout_s=args.request_timeout, max_size=args.max_size, max_steps=args.max_steps,
                         max_batch_size=args.max_batch_size, max_batch_count=args.max_batch_count,
                         max_body_bytes=int(args.max_body_mb * 1024 * 1024),
                         api_key=args.api_key, lora_dir=args.lora_dir, refiner=args.refiner,
                         ip_adapters=tuple(args.ip_adapter), image_encoder=args.image_encoder,
                         controlnets=tuple(args.controlnet),
                         prompt_syntax=None if args.prompt_syntax == "plain" else args.prompt_syntax,
                         preview_every=args.preview_every, web_ui=not args.no_web_ui)
