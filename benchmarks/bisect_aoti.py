"""Which compile setting crashes a network's AOTInductor compile: one child per variation.

    python benchmarks/bisect_aoti.py --arch sd15 --network text_encoder --dtype fp16 --device cuda

Compiles one network of a full-size architecture (random weights) with the engine's default
settings (export/aoti.py ATTEMPTS[0]) and with each setting changed on its own: weights
compiled into the package, tensor constants allowed to become literals, no package load in the
compiling process, no size-oblivious export, static shapes. Each compile runs in its own child
process (faulthandler on) with a time limit, as engine builds do, so a crash costs only its
line. Prints one line per variation (outcome, seconds) and writes them to --json.

It answers issue 16's question (which of the candidate causes makes torch 2.11 segfault when
compiling the SD1.5 text encoder for CUDA in fp16) where the crash happens; on the CPU it
shows which variations compile at all.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from sdengine.device import DTYPES


VARIATIONS = {  # name -> the CompileSettings fields it changes from the default
    "default": {},
    "constants-in-so": {"constants_in_so": True},
    "no-keep-tensor-constants": {"keep_tensor_constants": False},
    "no-package-load": {"load_package": False},
    "no-size-oblivious": {"size_oblivious": False},
    "static": {"static": True, "size_oblivious": False},
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="sd15", help="a preset of sdengine.config.PRESETS")
    parser.add_argument("--network", default="text_encoder")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--only", default=None, help="comma-separated variations (default: all)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per compile")
    parser.add_argument("--json", default=None, help="write the outcomes here")
    args = parser.parse_args(argv)

    from sdengine.config import ModelConfig
    from sdengine.export import aoti

    config = ModelConfig.from_name(args.arch)
    dtype = DTYPES[args.dtype]
    device = torch.device(args.device)
    names = args.only.split(",") if args.only else list(VARIATIONS)
    rows = []
    print(f"{args.arch} {args.network} {device.type} {args.dtype}, torch {torch.__version__}", flush=True)
    for name in names:
        settings = dataclasses.replace(aoti.ATTEMPTS[0], name=name, **VARIATIONS[name])
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="sdengine-bisect-") as folder:
            try:
                aoti.compile_in_child(config, args.network, dtype, device, Path(folder), settings,
                                       timeout=args.timeout)
                outcome, output = "ok", ""
            except aoti.CompileCrash as crash:
                outcome, output = crash.outcome, crash.output
        row = {"variation": name, "outcome": outcome, "seconds": round(time.perf_counter() - started, 1),
               "settings": dataclasses.asdict(settings), "output": output[-3000:]}
        rows.append(row)
        print(f"  {name:<26} {outcome:<32} {row['seconds']:>7.1f} s", flush=True)
        if output:
            print("    " + "\n    ".join(output.splitlines()[-8:]), flush=True)
        if args.json:  # after every variation, so that a killed run keeps what it found
            Path(args.json).write_text(json.dumps({"arch": args.arch, "network": args.network, "dtype": args.dtype,
                                                   "device": device.type, "torch": torch.__version__,
                                                   "variations": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
