"""What the engines beside a model's engine share (export/aoti_controlnet.py's ControlNet
engines, export/aoti_deepcache.py's DeepCache engines): their networks compiled one by one in
child processes from a config with random weights (constants handed over at load time), a meta
file written last, the folder written aside and renamed into place, and a cache entry built on
first use under its lock."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Callable

import torch

from . import aoti

log = logging.getLogger("sdengine")


def build(config, names, out_dir, *, meta_file: str, meta: dict, component: Callable[[str], str],
          dtype: torch.dtype, device, progress: bool = True, extra: Callable[[str, dict], dict] = None) -> Path:
    """Compile each network of `names` of `config` into `out_dir`, then write `meta_file`: `meta`
    plus format-independent keys (torch version, device, dtype, CPU capability) and "networks",
    per network its package, component (component(name): whose weights it reads), constant
    prefix, constants' shapes, compile time and extra(name, result)'s keys. Written to a
    temporary sibling and renamed, so a half-built engine is never seen."""
    from tqdm.auto import tqdm

    from sdengine import cachedir

    device = torch.device(device)
    out_dir = Path(out_dir)
    tmp = cachedir.staging(out_dir)
    try:
        networks = {}
        bar = tqdm(names, desc="AOTInductor compile", unit="network", disable=not progress)
        for name in bar:
            bar.set_postfix_str(name)
            result = aoti.compile_in_child(config, name, dtype, device, tmp)
            if result["buffers"]:
                raise RuntimeError(f"{config.name}: the {name} network has non-persistent buffers, which an "
                                   "engine beside the model's does not carry")
            networks[name] = {"package": f"{name}.pt2", "component": component(name), "prefix": aoti.PREFIX,
                              "constants": result["constants"], "compile_s": result["compile_s"],
                              **(extra(name, result) if extra else {})}
        full = {**meta, "torch_version": torch.__version__, "device": device.type, "dtype": aoti.dtype_name(dtype),
                "cpu_capability": aoti.cpu_capability() if device.type == "cpu" else "", "networks": networks}
        (tmp / meta_file).write_text(json_text(full))  # last: marks the folder whole
        cachedir.publish(tmp, out_dir, replace=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def json_text(value) -> str:
    import json

    return json.dumps(json.loads(json.dumps(value, default=str)), indent=1)


def cached(key: str, meta_file: str, build_into: Callable[[Path], Path], what: str) -> Path:
    """The cache entry $SDE_CACHE_DIR/aoti/<key>, built by build_into(path) on first use (one
    builder per entry: sdengine.cachedir's lock)."""
    from sdengine import cachedir

    path = aoti.cache_root() / key
    if (path / meta_file).is_file():
        return path
    with cachedir.lock(path):
        if (path / meta_file).is_file():
            return path
        cachedir.sweep(path)
        started = time.perf_counter()
        out = build_into(path)
        log.info("built the %s engine %s in %.1f s", what, out, time.perf_counter() - started)
        return out
