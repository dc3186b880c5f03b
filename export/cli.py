"""`sdengine export`: write a model's networks in a format another runtime loads.

    sdengine export onnx MODEL OUT_DIR [--dtype fp16|fp32] [--opset N] [--optimize] [--overwrite]
    sdengine export aoti MODEL ...      (AOTInductor packages; export/aoti.py, when installed)
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def register(subparsers) -> None:
    """Add the `export` subcommand and its formats to the `sdengine` parser."""
    parser = subparsers.add_parser("export", help="export the networks for another runtime (ONNX, AOTInductor)",
                                   description=__doc__.split("\n\n")[0])
    formats = parser.add_subparsers(dest="format", required=True, metavar="FORMAT")

    onnx_parser = formats.add_parser(
        "onnx", help="ONNX graphs of the text encoder, UNet and VAE, validated on onnxruntime",
        description="Export the text encoder(s), UNet, VAE decoder and VAE encoder to ONNX with dynamic "
                    "batch, height and width, check each with onnx.checker and against torch on "
                    "onnxruntime, and write sdengine_onnx.json. `sdengine.load(OUT_DIR)` runs the export.")
    onnx_parser.add_argument("model", help="a diffusers folder, a single-file .safetensors or a .ckpt")
    onnx_parser.add_argument("out_dir", help="the export folder (written to a temporary sibling, then renamed)")
    onnx_parser.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32",
                             help="weights and float inputs/outputs (default fp32)")
    onnx_parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default 18)")
    onnx_parser.add_argument("--optimize", action="store_true",
                             help="apply onnxruntime's transformer optimizer (SD fusions) and re-validate")
    onnx_parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")
    onnx_parser.add_argument("--tolerance", type=float, default=None,
                             help="validation tolerance, max|ort - torch| / max|torch| "
                                  "(default 1e-4 for fp32, 3e-2 for fp16)")
    onnx_parser.set_defaults(func=_run_onnx)

    if importlib.util.find_spec("sdengine.export.aoti") is not None:
        aoti_parser = formats.add_parser("aoti", help="compile the networks ahead of time for the native runtime",
                                         description=_run_aoti.__doc__.strip())
        aoti_parser.add_argument("model", help="a diffusers folder or a single-file checkpoint")
        aoti_parser.add_argument("--out", default=None,
                                 help="engine folder (default: the cache, $SDE_CACHE_DIR/aoti/<key>)")
        aoti_parser.add_argument("--dtype", default=None,
                                 help="fp32, fp16 or bf16 (default: fp16 on CUDA, fp32 on the CPU)")
        aoti_parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
        aoti_parser.add_argument("--controlnet", action="append", default=[], metavar="PATH",
                                 help="also build the engine of this ControlNet (a diffusers folder or an A1111 "
                                      "single file) with the model, into the cache (export/aoti_controlnet.py); "
                                      "repeatable")
        aoti_parser.add_argument("--deepcache-branch", action="append", default=[], type=int, metavar="B",
                                 help="also build the DeepCache engine of branch B (sdengine.DeepCache's branch) "
                                      "for the C++ loop, into the cache (export/aoti_deepcache.py); repeatable")
        aoti_parser.set_defaults(func=_run_aoti)


def _run_onnx(args) -> int:
    import logging

    from sdengine.export.onnx import export_onnx

    logging.basicConfig(format="%(message)s")
    logging.getLogger("sdengine").setLevel(logging.INFO)  # the validation figures and the provider
    try:
        out = export_onnx(args.model, args.out_dir, dtype=args.dtype, opset=args.opset, optimize=args.optimize,
                          overwrite=args.overwrite, tolerance=args.tolerance)
    except FileExistsError as e:
        print(f"sdengine export onnx: error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


def _run_aoti(args) -> int:
    """Build the engine of `args.model`'s architecture and print its folder."""
    from sdengine.config import ModelConfig
    from sdengine.device import resolve_device_dtype
    from sdengine.export.aoti import build_engine, engine_for
    from sdengine.export.aoti_controlnet import controlnet_engine_for
    from sdengine.export.aoti_deepcache import deepcache_engine_for
    from sdengine.loading import detect, detect_controlnet

    device, dtype = resolve_device_dtype(args.device, args.dtype)
    path = Path(args.model)
    if not path.exists():
        raise FileNotFoundError(f"model path does not exist: {path}")
    config = ModelConfig.from_diffusers(path) if path.is_dir() else detect(path)
    if args.out:
        out = build_engine(config, Path(args.out), dtype=dtype, device=device)
    else:
        out = engine_for(config, dtype=dtype, device=device)
    print(out)
    for controlnet in args.controlnet:
        print(controlnet_engine_for(config, detect_controlnet(controlnet, base=config), dtype=dtype, device=device))
    for branch in args.deepcache_branch:
        print(deepcache_engine_for(config, branch, dtype=dtype, device=device))
    return 0
