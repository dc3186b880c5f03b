"""The `sdengine` command line.

`generate` and `info` live here; other subcommands are registered by the modules
that own them (each exposes `register(subparsers)`), so that this file stays small:
`bench` (sdengine.bench), `export` (sdengine.export.cli), `train` (sdengine.training.train),
`serve` (sdengine.serve.cli), `cache` (sdengine.compile_cache).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .backends import base as backends
from .hires import UPSCALERS

SUBCOMMAND_MODULES = ("sdengine.info", "sdengine.bench.cli", "sdengine.export.cli", "sdengine.training.train",
                      "sdengine.serve.cli", "sdengine.compile_cache")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdengine", description="Fast, dependable Stable Diffusion inference.")
    sub = parser.add_subparsers(dest="command", required=True)
    _register_generate(sub)
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError as e:
            if e.name and name.startswith(e.name):  # that subcommand has not landed
                continue
            raise
        module.register(sub)
    return parser


def _register_generate(sub):
    p = sub.add_parser("generate", help="generate images from a prompt",
                       description="Generate images; PNGs carry the parameters in a 'parameters' text chunk "
                                   "(A1111's convention).")
    p.add_argument("prompt", nargs="?", default=None, help="the prompt (or --from-png)")
    p.add_argument("--from-png", default=None, metavar="PNG",
                   help="regenerate the image a PNG's A1111 'parameters' text describes (A1111's or sdengine's): "
                        "its prompts, sampler, schedule, seeds, size and settings, under A1111's rules unless it "
                        "says otherwise; fields sdengine cannot honour are refused by name. --rng, --lora-dir, "
                        "--init-image and --mask-image apply on top")
    p.add_argument("--model", "-m", default=None,
                   help="diffusers folder, .safetensors/.ckpt file or ONNX export; default: the bundled demo model")
    p.add_argument("--output", "-o", default="out.png",
                   help="output PNG; with several images, -1, -2, ... are added before the suffix")
    p.add_argument("--negative-prompt", "-n", default=None)
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default 30)")
    p.add_argument("--guidance-scale", "--cfg", type=float, default=7.5)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--seed", type=int, default=None, help="seed of the first image; image i gets seed + i")
    p.add_argument("--batch-size", "-b", type=int, default=1)
    p.add_argument("--sampler", default=None, help="e.g. euler_a, dpmpp_2m, 'DPM++ 2M Karras'; default: the model's")
    p.add_argument("--schedule", default=None, help="default, normal, karras, exponential, sgm_uniform, simple, ...")
    p.add_argument("--init-image", default=None, help="img2img source image")
    p.add_argument("--mask-image", default=None, help="inpainting mask (white = repaint)")
    p.add_argument("--strength", type=float, default=None)
    p.add_argument("--clip-skip", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"])
    p.add_argument("--backend", default=None, choices=backends.names(),
                   help="speed layer (default: graph on CUDA, eager on the CPU; onnx for an ONNX export)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: the physical cores, but 1 for the small demo model, where more "
                        "threads only add synchronisation)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                   help="merge a LoRA (kohya / A1111 or diffusers / PEFT .safetensors) at SCALE (default 1); repeatable")
    p.add_argument("--control", action="append", default=[], metavar="MODEL:IMAGE[:SCALE[:START:END]]",
                   help="a ControlNet (diffusers folder or A1111 single file) and its control image, with its scale "
                        "(default 1) and the part of the run it acts in (default 0:1); repeatable")
    p.add_argument("--control-preprocess", default=None, choices=["canny"],
                   help="make every control map from its image with this preprocessor (canny needs the "
                        "controlnet extra: pip install \"sdengine[controlnet]\")")
    p.add_argument("--deepcache", type=int, default=None, metavar="INTERVAL",
                   help="DeepCache: run the whole UNet every INTERVAL steps, its shallow branch between (e.g. 3)")
    p.add_argument("--deepcache-branch", type=int, default=0, metavar="BRANCH",
                   help="DeepCache's skip branch (DeepCacheSDHelper's cache_branch_id; default 0, the fastest)")
    p.add_argument("--tgate", type=int, default=None, metavar="GATE_STEP",
                   help="T-GATE: reuse cross-attention and stop guidance from this step on (e.g. 10)")
    p.add_argument("--tome", type=float, default=None, metavar="RATIO",
                   help="token merging (ToMe): merge this fraction of the tokens before self-attention (e.g. 0.5)")
    p.add_argument("--lora-dir", default=None, help="folder where <lora:name:scale> in the prompt finds name.safetensors")
    p.add_argument("--embedding", action="append", default=[], metavar="PATH[:TOKEN]",
                   help="load a textual-inversion embedding (A1111 .pt/.safetensors, diffusers learned_embeds); its "
                        "token is the file name unless given; repeatable")
    p.add_argument("--conventions", default=None, choices=["a1111", "diffusers"],
                   help="whose image a sampler name draws: a1111 (A1111's sigmas, start and noise) or diffusers "
                        "(diffusers' scheduler); default: A1111's labels ('Euler a') follow A1111, sdengine's names "
                        "('euler_a') diffusers")
    p.add_argument("--rng", default=None, choices=["cpu", "nv", "gpu"],
                   help="A1111's RNG source: cpu (default), nv (CUDA's randn numbers on any device), gpu (CUDA)")
    p.add_argument("--subseed", type=int, default=None, help="A1111's variation seed")
    p.add_argument("--subseed-strength", type=float, default=0.0, help="A1111's variation strength, in [0, 1]")
    p.add_argument("--ensd", type=int, default=0, help="A1111's eta noise seed delta")
    p.add_argument("--prompt-syntax", default="a1111", choices=["a1111", "none"],
                   help="a1111 (default): (emphasis:1.2), [less], BREAK, prompts over 75 tokens in windows, <lora:> "
                        "tags; none: plain text, truncated at 75 tokens")
    p.add_argument("--refiner", default=None, metavar="PATH",
                   help="an SDXL refiner (diffusers folder or single file) that takes over the latents at "
                        "--refiner-switch-at and decodes")
    p.add_argument("--refiner-switch-at", type=float, default=None,
                   help="fraction of the denoising the base does before the refiner takes over (default 0.8)")
    p.add_argument("--aesthetic-score", type=float, default=6.0, help="SDXL refiner's aesthetic score (6.0)")
    p.add_argument("--negative-aesthetic-score", type=float, default=2.5,
                   help="SDXL refiner's aesthetic score for the negative prompt (2.5)")
    ip = p.add_argument_group("IP-Adapter: an image as a prompt")
    ip.add_argument("--ip-adapter", action="append", default=[], metavar="FILE:IMAGE[:SCALE]",
                    help="an IP-Adapter file (ip-adapter_*.safetensors / .bin, basic or Plus), its image prompt and "
                         "scale (default 1.0); repeatable (needs --image-encoder)")
    ip.add_argument("--image-encoder", default=None, metavar="FOLDER",
                    help="the IP-Adapters' CLIP image encoder (a transformers CLIPVisionModelWithProjection folder)")
    hires = p.add_argument_group("hires fix (A1111's): draw at --width x --height, upscale, denoise again")
    hires.add_argument("--hires", action="store_true", help="turn the hires fix on")
    hires.add_argument("--hires-scale", type=float, default=2.0, help="upscale factor (2.0)")
    hires.add_argument("--hires-upscaler", default="Latent", choices=UPSCALERS, help="(Latent)")
    hires.add_argument("--hires-steps", type=int, default=0,
                       help="second-pass steps actually run (0: the first pass's)")
    hires.add_argument("--hires-denoising-strength", type=float, default=0.7, help="(0.7)")
    hires.add_argument("--hires-resize", default=None, metavar="WxH",
                       help="target size instead of --hires-scale; 0 for a side follows the aspect ratio")
    hires.add_argument("--hires-sampler", default=None, help="second-pass sampler (default: --sampler)")
    hires.add_argument("--hires-prompt", default=None, help="second-pass prompt (default: the prompt)")
    hires.add_argument("--hires-negative-prompt", default=None)
    p.set_defaults(func=_generate)


def hires_from_args(args):
    """The sdengine.Hires of the --hires options, None without --hires (a --hires-* option alone is an error)."""
    from .hires import Hires

    given = [f"--{name.replace('_', '-')}" for name in ("hires_resize", "hires_sampler", "hires_prompt",
                                                        "hires_negative_prompt") if getattr(args, name) is not None]
    if not args.hires:
        if given:
            raise ValueError(f"{given[0]} needs --hires")
        return None
    resize = (0, 0)
    if args.hires_resize is not None:
        try:
            resize = tuple(int(v) for v in args.hires_resize.lower().split("x"))
            assert len(resize) == 2
        except (ValueError, AssertionError):
            raise ValueError(f"--hires-resize must be WxH (e.g. 1024x0), got {args.hires_resize!r}") from None
    return Hires(scale=args.hires_scale, upscaler=args.hires_upscaler, steps=args.hires_steps,
                 denoising_strength=args.hires_denoising_strength, resize_x=resize[0], resize_y=resize[1],
                 sampler=args.hires_sampler, prompt=args.hires_prompt, negative_prompt=args.hires_negative_prompt)


def _generate(args) -> int:
    from pathlib import Path

    import torch
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    import sdengine
    from sdengine.device import set_cpu_threads

    def open_image(path, name):
        if path is None:
            return None
        if not Path(path).exists():
            raise FileNotFoundError(f"{name}: no such file: {path}")
        return Image.open(path)

    out = Path(args.output)
    if out.suffix.lower() != ".png":
        raise ValueError(f"--output must be a .png file, got {out}")
    # the demo model: 30 steps take ~5 s on one thread, ~10x longer on two busy ones
    set_cpu_threads(args.threads, demo_model=args.model is None)
    loras = [_path_and_suffix(value, "--lora", float) for value in args.lora]
    embeddings = [_path_and_suffix(value, "--embedding", str) for value in args.embedding]
    pipe = sdengine.load(args.model, device=args.device, dtype=args.dtype, backend=args.backend,
                         loras=[(path, 1.0 if scale is None else scale) for path, scale in loras])
    for path, token in embeddings:
        pipe.load_embedding(path, token)
    controls = [parse_control(value, open_image, args.control_preprocess) for value in args.control]
    hires = hires_from_args(args)
    ip_images, ip_scales = [], []
    if args.ip_adapter:
        adapters = [parse_ip_adapter(value, open_image) for value in args.ip_adapter]
        pipe.load_ip_adapter([path for path, _, _ in adapters], image_encoder=args.image_encoder)
        ip_images, ip_scales = [image for _, image, _ in adapters], [scale for _, _, scale in adapters]
    elif args.image_encoder is not None:
        raise ValueError("--image-encoder needs --ip-adapter")
    refiner = None
    if args.refiner is not None:
        refiner = sdengine.load(args.refiner, device=args.device, dtype=args.dtype, backend=args.backend)
    passes = dict(refiner=refiner, refiner_switch_at=args.refiner_switch_at, aesthetic_score=args.aesthetic_score,
                  negative_aesthetic_score=args.negative_aesthetic_score,
                  ip_adapter_image=ip_images or None, ip_adapter_scale=ip_scales or None)
    if args.from_png is not None:  # its Hires fields, or --hires; the refiner and image prompts from the options
        extra = {k: v for k, v in passes.items() if v is not None and k not in ("aesthetic_score",
                                                                                 "negative_aesthetic_score")}
        result = pipe.run(_request_from_png(args, open_image, dict(extra, **({"hires": hires} if hires else {})))
                          .for_model(pipe.config))
    else:
        if args.prompt is None:
            raise ValueError("generate needs a prompt, or --from-png PNG")
        result = pipe(
            args.prompt, negative_prompt=args.negative_prompt, steps=args.steps, guidance_scale=args.guidance_scale,
            height=args.height, width=args.width, seed=args.seed, batch_size=args.batch_size, sampler=args.sampler,
            schedule=args.schedule, init_image=open_image(args.init_image, "--init-image"),
            mask_image=open_image(args.mask_image, "--mask-image"), strength=args.strength, clip_skip=args.clip_skip,
            progress=not args.no_progress, prompt_syntax=None if args.prompt_syntax == "none" else args.prompt_syntax,
            lora_dir=args.lora_dir, control=controls or None, conventions=args.conventions, rng=args.rng,
            subseed=args.subseed, subseed_strength=args.subseed_strength, eta_noise_seed_delta=args.ensd,
            deepcache=sdengine.DeepCache(args.deepcache, args.deepcache_branch) if args.deepcache else None,
            tgate=args.tgate, tome=args.tome,
            hires=hires, **passes,
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(result.images):
        path = out if len(result.images) == 1 else out.with_name(f"{out.stem}-{i + 1}{out.suffix}")
        info = PngInfo()
        info.add_text("parameters", result.infotext(i))
        tmp = path.with_name(path.name + ".part")
        image.save(tmp, format="PNG", pnginfo=info)
        tmp.replace(path)  # never leave a half-written PNG under the real name
        print(f"wrote {path} (seed {result.seeds[i]})")
    return 0


# generate's options that a PNG's parameters already set: given with --from-png they would be ignored
_SET_BY_THE_PNG = ("negative_prompt", "steps", "height", "width", "seed", "sampler", "schedule", "strength",
                   "clip_skip", "conventions", "subseed", "control")


def _request_from_png(args, open_image, extra: dict):
    """sdengine.Request of the PNG's `parameters` text (Request.from_infotext), with the options
    that do not change what it describes (--rng, --lora-dir, images, --no-progress) on top."""
    from PIL import Image

    from .request import Request

    given = [name for name in _SET_BY_THE_PNG if getattr(args, name, None) not in (None, [], 0.0)]
    if args.prompt is not None or given or args.subseed_strength or args.ensd:
        what = ", ".join(["the prompt"] * (args.prompt is not None) + [f"--{n.replace('_', '-')}" for n in given])
        raise ValueError(f"--from-png takes its prompt and settings from the PNG; drop {what or 'the seed options'}")
    image = open_image(args.from_png, "--from-png")
    text = getattr(image, "text", {}).get("parameters") or image.info.get("parameters")
    if not text:
        raise ValueError(f"--from-png: {args.from_png} has no 'parameters' text chunk (A1111's infotext)")
    overrides = dict(progress=not args.no_progress, lora_dir=args.lora_dir,
                     init_image=open_image(args.init_image, "--init-image"),
                     mask_image=open_image(args.mask_image, "--mask-image"))
    if args.rng is not None:
        overrides["rng"] = args.rng
    if args.batch_size != 1:
        overrides["batch_size"] = args.batch_size
    return Request.from_infotext(text, **{k: v for k, v in overrides.items() if v is not None}, **extra)
def parse_ip_adapter(value: str, open_image) -> tuple:
    """--ip-adapter FILE:IMAGE[:SCALE] -> (file, PIL image, scale). Both paths must exist."""
    from pathlib import Path

    parts = value.split(":")
    scale = 1.0
    if len(parts) >= 3:
        try:
            scale = float(parts[-1])
            parts = parts[:-1]
        except ValueError:
            pass
    if len(parts) != 2:
        raise ValueError(f"--ip-adapter must be FILE:IMAGE[:SCALE], got {value!r}")
    path, image = parts
    if not Path(path).exists():
        raise FileNotFoundError(f"--ip-adapter: no such file: {path}")
    return path, open_image(image, "--ip-adapter image"), scale


def parse_control(value: str, open_image, preprocess=None):
    """--control MODEL:IMAGE[:SCALE[:START:END]] -> sdengine.Control. Both paths must exist."""
    from pathlib import Path

    import sdengine

    parts = value.split(":")
    numbers = []
    while parts and len(numbers) < 3:
        try:
            numbers.insert(0, float(parts[-1]))
        except ValueError:
            break
        parts.pop()
    if len(numbers) == 2:  # SCALE:START without END, or START:END without SCALE: ambiguous
        raise ValueError(f"--control {value}: give MODEL:IMAGE, MODEL:IMAGE:SCALE or MODEL:IMAGE:SCALE:START:END")
    for cut in range(1, len(parts)):  # paths may hold ':' themselves: the split where both exist
        model, image = ":".join(parts[:cut]), ":".join(parts[cut:])
        if Path(model).exists() and Path(image).is_file():
            break
    else:
        if len(parts) < 2:
            raise ValueError(f"--control {value}: expected MODEL:IMAGE[:SCALE[:START:END]]")
        model, image = parts[0], ":".join(parts[1:])
        if not Path(model).exists():
            raise FileNotFoundError(f"--control {value}: no such ControlNet: {model}")
    scale, start, end = (numbers + [None] * 3)[:3] if len(numbers) != 3 else numbers
    kwargs = {"scale": 1.0 if scale is None else scale}
    if len(numbers) == 3:
        kwargs.update(start=start, end=end)
    return sdengine.Control(model, open_image(image, "--control"), preprocess=preprocess, **kwargs)


def _path_and_suffix(value: str, option: str, kind):
    """"path:suffix" -> (path, kind(suffix)); a path alone (or one whose last ':' part is not a
    `kind`, e.g. a Windows drive) -> (path, None). The file must exist."""
    from pathlib import Path

    path, suffix = value, None
    if ":" in value and not Path(value).is_file():
        head, _, tail = value.rpartition(":")
        try:
            suffix = kind(tail)
            path = head
        except ValueError:
            pass
    if not Path(path).is_file():
        raise FileNotFoundError(f"{option} {value}: no such file: {path}")
    return Path(path), suffix


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except (ValueError, FileNotFoundError, PermissionError) as e:
        print(f"sdengine {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sdengine {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
