"""The compile caches of the fast layers, under the engine cache dir, and moving them
between machines.

A GPU window starts on a fresh machine, so whatever the fast layers compiled (Triton
kernels, Inductor's graphs and kernels, the autotuners' winners) is lost with it unless it
travels. sdengine keeps all of it under one directory and packs it into one archive:

    $SDE_CACHE_DIR (default ~/.cache/sdengine)
        triton/     Triton's kernel cache (TRITON_CACHE_DIR), autotune winners included
        inductor/   Inductor's caches (TORCHINDUCTOR_CACHE_DIR): FX graphs, their kernels

    sdengine cache export caches.tar.gz      # after a run; at most 64 MiB
    sdengine cache import caches.tar.gz      # on the next machine, before the first run

`use_cache_dirs()` points Triton and Inductor there (unless TRITON_CACHE_DIR /
TORCHINDUCTOR_CACHE_DIR are set already); the fast backends call it before compiling.
An archive carries a manifest of the torch, Triton and CUDA versions and the GPU it was made
on. `import_archive` unpacks it only where they match this machine: a cache from another
torch, Triton or GPU is ignored with a warning, never trusted. Where torch has
`torch.compiler.save_cache_artifacts` (2.7+), the archive also holds the artifacts this
process compiled, which `load_cache_artifacts` hot-loads on import.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
import tempfile
import warnings
from pathlib import Path
from typing import Optional

import torch

log = logging.getLogger("sdengine")

ARCHIVE_FORMAT = 1
MAX_ARCHIVE_BYTES = 64 * 2**20  # what a GPU window can carry in (the device tool's limit)
SUBDIRS = {"triton": "TRITON_CACHE_DIR", "inductor": "TORCHINDUCTOR_CACHE_DIR"}
_MANIFEST = "sdengine-cache.json"
_ARTIFACTS = "torch-cache-artifacts.bin"


def cache_root() -> Path:
    """$SDE_CACHE_DIR, default ~/.cache/sdengine."""
    base = os.environ.get("SDE_CACHE_DIR")
    return Path(base) if base else Path.home() / ".cache" / "sdengine"


def use_cache_dirs() -> dict:
    """Point Triton and Inductor at their directories under cache_root(), unless the user set
    TRITON_CACHE_DIR / TORCHINDUCTOR_CACHE_DIR. Returns {name: directory in use}."""
    dirs = {}
    for name, variable in SUBDIRS.items():
        if not os.environ.get(variable):
            os.environ[variable] = str(cache_root() / name)
        dirs[name] = Path(os.environ[variable])
    return dirs


def fingerprint(device: Optional[torch.device] = None) -> dict:
    """What a compiled artifact depends on: torch, Triton, CUDA and the GPU."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    gpu = capability = None
    if torch.cuda.is_available():
        index = device.index if device is not None and device.index is not None else 0
        gpu = torch.cuda.get_device_name(index)
        capability = ".".join(map(str, torch.cuda.get_device_capability(index)))
    return {"torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda, "gpu": gpu,
            "capability": capability}


def export_archive(path, max_bytes: int = MAX_ARCHIVE_BYTES) -> dict:
    """Pack the cache directories (and this process's torch cache artifacts) into `path`
    (.tar.gz). Written to a temporary file and renamed: never a half-written archive.
    Raises ValueError, writing nothing, when the archive would exceed max_bytes."""
    path = Path(path)
    dirs = use_cache_dirs()
    manifest = {"format": ARCHIVE_FORMAT, "fingerprint": fingerprint(), "files": 0, "bytes": 0}
    artifacts = _save_artifacts()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with tarfile.open(tmp, "w:gz") as tar:
            for name, directory in dirs.items():
                if not directory.is_dir():
                    continue
                for file in sorted(p for p in directory.rglob("*") if p.is_file() and not p.name.endswith(".lock")):
                    tar.add(file, arcname=f"{name}/{file.relative_to(directory)}")
                    manifest["files"] += 1
                    manifest["bytes"] += file.stat().st_size
            if artifacts:
                _add_bytes(tar, _ARTIFACTS, artifacts)
                manifest["artifacts_bytes"] = len(artifacts)
            _add_bytes(tar, _MANIFEST, json.dumps(manifest, indent=2).encode())
        size = Path(tmp).stat().st_size
        if size > max_bytes:
            raise ValueError(f"cache archive {path} would be {size / 2**20:.1f} MiB, over the "
                             f"{max_bytes / 2**20:.0f} MiB limit ({manifest['files']} files, "
                             f"{manifest['bytes'] / 2**20:.1f} MiB before compression); clear "
                             f"{cache_root()} and run only the workloads to carry")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    manifest["archive_bytes"] = size
    return manifest


def import_archive(path) -> Optional[dict]:
    """Unpack an archive made by export_archive into this machine's cache directories.

    Returns its manifest, or None when it was ignored (made with another torch, Triton,
    CUDA or GPU: a warning says which)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"cache archive does not exist: {path}")
    try:
        tar = tarfile.open(path, "r:gz")
    except (tarfile.TarError, OSError) as e:
        raise ValueError(f"{path} is not a cache archive (a .tar.gz from `sdengine cache export`): {e}") from None
    with tar:
        try:
            manifest = json.loads(tar.extractfile(_MANIFEST).read())
        except (KeyError, AttributeError, ValueError) as e:
            raise ValueError(f"{path} has no valid {_MANIFEST}: not an sdengine cache archive ({e})") from None
        if manifest.get("format") != ARCHIVE_FORMAT:
            raise ValueError(f"{path}: cache archive format {manifest.get('format')!r}, this sdengine reads "
                             f"{ARCHIVE_FORMAT}")
        here = fingerprint()
        theirs = manifest.get("fingerprint", {})
        differ = {k: (theirs.get(k), v) for k, v in here.items() if theirs.get(k) != v}
        if differ:
            what = "; ".join(f"{k}: archive {a!r}, here {b!r}" for k, (a, b) in differ.items())
            warnings.warn(f"ignoring the compile cache {path}: it was made for another setup ({what})",
                          stacklevel=2)
            return None
        dirs = use_cache_dirs()
        for member in tar.getmembers():
            name, _, rest = member.name.partition("/")
            if not member.isfile() or name not in dirs or not rest:
                continue
            target = (dirs[name] / rest).resolve()
            if dirs[name].resolve() not in target.parents:  # no path escapes the cache dir
                raise ValueError(f"{path}: member {member.name!r} points outside the cache")
            target.parent.mkdir(parents=True, exist_ok=True)
            data = tar.extractfile(member).read()
            tmp = target.with_name(f".{target.name}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, target)
        try:
            artifacts = tar.extractfile(_ARTIFACTS).read()
        except KeyError:
            artifacts = None
    if artifacts:
        _load_artifacts(artifacts)
    log.info("imported the compile cache %s (%d files)", path, manifest.get("files", 0))
    return manifest


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _save_artifacts() -> Optional[bytes]:
    save = getattr(torch.compiler, "save_cache_artifacts", None)
    if save is None:
        return None
    try:
        result = save()
    except Exception as e:  # an optional extra: the directories carry the same artifacts
        log.warning("torch.compiler.save_cache_artifacts failed (%s); the archive holds the cache directories only",
                    e)
        return None
    return result[0] if result else None


def _load_artifacts(data: bytes):
    load = getattr(torch.compiler, "load_cache_artifacts", None)
    if load is None:
        return
    try:
        load(data)
    except Exception as e:
        log.warning("torch.compiler.load_cache_artifacts failed (%s); the cache directories were imported", e)


# ---------------------------------------------------------------------------
# `sdengine cache`
# ---------------------------------------------------------------------------

def register(subparsers):
    p = subparsers.add_parser("cache", help="export / import the compile caches of the fast layers",
                              description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cache_command", required=True)
    export = sub.add_parser("export", help="pack the caches into one .tar.gz (at most 64 MiB)")
    export.add_argument("archive", type=Path)
    export.add_argument("--max-mb", type=float, default=MAX_ARCHIVE_BYTES / 2**20)
    export.set_defaults(func=_cli_export)
    imp = sub.add_parser("import", help="unpack an archive made on a machine with the same torch, Triton and GPU")
    imp.add_argument("archive", type=Path)
    imp.set_defaults(func=_cli_import)
    info = sub.add_parser("info", help="where the caches are, and what this machine is")
    info.set_defaults(func=_cli_info)
    return p


def _cli_export(args) -> int:
    manifest = export_archive(args.archive, max_bytes=int(args.max_mb * 2**20))
    print(f"wrote {args.archive}: {manifest['files']} files, {manifest['archive_bytes'] / 2**20:.1f} MiB")
    return 0


def _cli_import(args) -> int:
    manifest = import_archive(args.archive)
    if manifest is None:
        print(f"ignored {args.archive}: made for another torch / Triton / GPU (see the warning)")
        return 1
    print(f"imported {args.archive}: {manifest['files']} files into {cache_root()}")
    return 0


def _cli_info(args) -> int:
    print(json.dumps({"cache_root": str(cache_root()), "dirs": {k: str(v) for k, v in use_cache_dirs().items()},
                      "fingerprint": fingerprint()}, indent=2))
    return 0
