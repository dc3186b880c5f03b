"""The `sdengine` command line.

`generate` and `info` live here; other subcommands are registered by the modules
that own them (each exposes `register(subparsers)`), so that this file stays small:
`bench` (sdengine.bench), `export` (sdengine.export.cli), `train` (sdengine.train).
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMAND_MODULES = ("sdengine.bench.cli", "sdengine.export.cli", "sdengine.train")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdengine", description="Fast, dependable Stable Diffusion inference.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError as e:
            if e.name and name.startswith(e.name):  # that subcommand has not landed
                continue
            raise
        module.register(sub)
    return parser


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
