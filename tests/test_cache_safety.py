"""The caches survive their builders being killed, and concurrent builders (sdengine/cachedir.py).

- An engine build (export/aoti.py engine_for) SIGKILLed at random instants, 20 times, and at
  every rename of the publish step: afterwards the cache holds the whole engine or no entry,
  never a half-written one that a later load trusts. The C++ runtime's cache search and
  engine_for then find a good engine (the next engine_for sweeps the leftovers).
- An ONNX export killed the same way leaves the old export or the whole new one.
- A corrupt engine.json in the cache is skipped with a warning and rebuilt, never trusted.
- Two processes building the same engine at once: one build, one good entry.

The builders are forked processes whose network compiler is replaced by a slow copy of the
tiny SD1 engine's real packages (so a kill lands mid-write, and a complete entry really
loads); everything else (staging, engine.json, publish, lock, sweep) is the real code.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import sdengine
from sdengine.config import tiny_config
from sdengine.export import aoti
from sdengine.export.engine_meta import engine_problem
from support.tiny import save_tiny_pipeline

_C = pytest.importorskip("sdengine._C")
TRIALS = 20
CONFIG = tiny_config("sd15")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_pipeline("sd15", tmp_path_factory.mktemp("cache-safety") / "tiny-sd15")


@pytest.fixture(scope="module")
def real_engine(model_dir):
    """The tiny SD1 engine, really compiled (cached in $SDE_CACHE_DIR, shared with tests/support/native.py)."""
    return Path(sdengine.load(model_dir, backend="native").backend.engine_dir)


@pytest.fixture(scope="module")
def reference_image(model_dir, real_engine):
    return _image(_C.Model(str(model_dir), str(real_engine)))


def _image(model):
    data, width, height, _ = model.generate("a red square", None, 16, 16, 2, 7.5, 3, 1, "euler", None, 0.0, None)[0]
    return np.frombuffer(data, dtype=np.uint8).reshape(height, width, 3)


def _slow_compiler(real_engine: Path, calls_file: Path | None = None, delay: float = 0.004):
    """A stand-in for aoti.compile_in_child: copies the real package in 128 KiB pieces (a
    pause after each) and returns the real constants, so a build takes about a second."""
    meta = json.loads((real_engine / "engine.json").read_text())

    def compile_in_child(config, name, dtype, device, folder, settings=None, timeout=None):
        if calls_file is not None:
            with open(calls_file, "a") as f:
                f.write(f"{os.getpid()} {name}\n")
        with open(real_engine / f"{name}.pt2", "rb") as src, open(folder / f"{name}.pt2", "wb") as dst:
            while chunk := src.read(128 << 10):
                dst.write(chunk)
                dst.flush()
                time.sleep(delay)
        buffers = {}
        if (real_engine / "buffers.safetensors").is_file():
            from safetensors.torch import load_file

            buffers = {k.split("/", 1)[1]: v for k, v in load_file(str(real_engine / "buffers.safetensors")).items()
                       if k.startswith(name + "/")}
        return {"constants": meta["networks"][name]["constants"], "compile_s": 0.1, "buffers": buffers}

    return compile_in_child


def _fork(target) -> int:
    """Run target() in a forked child that exits 0 when it returns, 1 when it raises."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            target()
            code = 0
        except BaseException:  # noqa: BLE001
            import traceback

            traceback.print_exc()
        finally:
            os._exit(code)
    return pid


def _builder(cache: Path, real_engine: Path, calls_file=None, kill_at_rename=None):
    """engine_for in a child with the slow compiler; kill_at_rename=(n, before): SIGKILL itself
    at the n-th os.rename of cachedir, before or after it happens."""
    def run():
        os.environ["SDE_CACHE_DIR"] = str(cache)
        aoti.compile_in_child = _slow_compiler(real_engine, calls_file)
        if kill_at_rename is not None:
            n, before = kill_at_rename
            real_rename, count = os.rename, [0]

            def rename(src, dst):
                ours = Path(dst).parent == cache / "aoti"  # the publish step's renames only
                count[0] += ours
                if ours and count[0] == n and before:
                    os.kill(os.getpid(), signal.SIGKILL)
                real_rename(src, dst)
                if ours and count[0] == n and not before:
                    os.kill(os.getpid(), signal.SIGKILL)

            os.rename = rename
        aoti.engine_for(CONFIG, dtype=torch.float32, device="cpu", progress=False)
    return _fork(run)


def _entries(cache: Path) -> list:
    root = cache / "aoti"
    return sorted(p for p in root.iterdir() if not p.name.startswith(".")) if root.is_dir() else []


CORRUPT = '{"format": 3, "networks": {'


def _check_cache(cache: Path, model_dir: Path, reference_image, monkeypatch) -> str:
    """What the cache holds after a kill: 'none' (no entry), 'old' (the corrupt entry that was
    being replaced, still refused) or 'whole' (an entry that loads and gives the reference
    image). A half-written entry fails the test."""
    entries = _entries(cache)
    assert len(entries) <= 1, entries
    monkeypatch.setenv("SDE_CACHE_DIR", str(cache))
    if not entries or (entries[0] / "engine.json").read_text() == CORRUPT:
        with pytest.raises(ValueError, match="no compiled engine"):
            _C.Model(str(model_dir))  # the C++ cache search trusts nothing it finds
        return "old" if entries else "none"
    problem = engine_problem(entries[0])
    assert problem is None, f"a visible entry is not whole: {problem}"
    assert np.array_equal(_image(_C.Model(str(model_dir))), reference_image)  # the C++ search finds and loads it
    return "whole"


def _kill_after(pid: int, seconds: float) -> bool:
    """SIGKILL pid after `seconds` unless it exits first; True when it was killed."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0, "the builder failed"
            return False
        time.sleep(0.005)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return True


def test_engine_build_killed_at_random_points(tmp_path, model_dir, real_engine, reference_image, monkeypatch):
    # How long one build takes, to spread the kills over it (and past its end).
    cache = tmp_path / "timing"
    start = time.monotonic()
    pid = _builder(cache, real_engine)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    duration = time.monotonic() - start
    assert _check_cache(cache, model_dir, reference_image, monkeypatch) == "whole"

    rng = random.Random(19)
    outcomes = []
    for trial in range(TRIALS):
        cache = tmp_path / f"trial-{trial}"
        if trial % 4 == 3:  # an existing entry with a corrupt engine.json being rebuilt
            entry = cache / "aoti" / aoti.engine_key(CONFIG, torch.float32, torch.device("cpu"))
            shutil.copytree(real_engine, entry)
            (entry / "engine.json").write_text(CORRUPT)
        # Most kills within the build's length, a few past it (the builds' pace varies with load).
        killed = _kill_after(_builder(cache, real_engine), rng.uniform(0.0, duration * (1.0 if trial % 5 else 1.6)))
        outcomes.append((killed, _check_cache(cache, model_dir, reference_image, monkeypatch)))
        # The next engine_for sweeps what the killed builder left and ends with a good engine.
        monkeypatch.setattr(aoti, "compile_in_child", _slow_compiler(real_engine, delay=0))
        path = aoti.engine_for(CONFIG, dtype=torch.float32, device="cpu", progress=False)
        assert engine_problem(path) is None
        assert [p.name for p in path.parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name] == []
    killed = sum(k for k, _ in outcomes)
    print(f"engine cache: {TRIALS} builds killed at random instants ({killed} before they finished): "
          f"{sum(o == 'none' for _, o in outcomes)} left no entry, {sum(o == 'old' for _, o in outcomes)} the old "
          f"corrupt one (refused), {sum(o == 'whole' for _, o in outcomes)} a whole one, 0 a half-written one")
    assert killed >= TRIALS // 4  # kills land mid-build


@pytest.mark.parametrize("replace", [False, True])
@pytest.mark.parametrize("at", [(1, True), (1, False), (2, True), (2, False)])
def test_engine_build_killed_at_each_rename(tmp_path, model_dir, real_engine, reference_image, monkeypatch, at,
                                            replace):
    """The publish step's renames: with no entry, one rename; replacing a corrupt entry, the old
    one is renamed aside, then the new one in. A kill before or after any of them leaves the
    old (refused) entry, none, or the whole new one."""
    cache = tmp_path / "cache"
    if replace:
        entry = cache / "aoti" / aoti.engine_key(CONFIG, torch.float32, torch.device("cpu"))
        shutil.copytree(real_engine, entry)
        (entry / "engine.json").write_text(CORRUPT)
    pid = _builder(cache, real_engine, kill_at_rename=at)
    os.waitpid(pid, 0)
    outcome = _check_cache(cache, model_dir, reference_image, monkeypatch)
    assert outcome != "old" or replace
    monkeypatch.setattr(aoti, "compile_in_child", _slow_compiler(real_engine, delay=0))
    assert engine_problem(aoti.engine_for(CONFIG, dtype=torch.float32, device="cpu", progress=False)) is None


def test_corrupt_engine_json_is_skipped_with_a_warning_and_rebuilt(tmp_path, real_engine, monkeypatch, caplog,
                                                                   model_dir, reference_image):
    cache = tmp_path / "cache"
    monkeypatch.setenv("SDE_CACHE_DIR", str(cache))
    entry = cache / "aoti" / aoti.engine_key(CONFIG, torch.float32, torch.device("cpu"))
    shutil.copytree(real_engine, entry)
    meta = json.loads((entry / "engine.json").read_text())
    meta["networks"]["unet"]["package"] = "../unet.pt2"
    (entry / "engine.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="(?s)no compiled engine .*networks.unet.package must name a file"):
        _C.Model(str(model_dir))  # the C++ cache search skips it, saying why
    calls = tmp_path / "calls"
    monkeypatch.setattr(aoti, "compile_in_child", _slow_compiler(real_engine, calls, delay=0))
    with caplog.at_level(logging.WARNING, logger="sdengine"):
        path = aoti.engine_for(CONFIG, dtype=torch.float32, device="cpu", progress=False)
    assert path == entry and engine_problem(path) is None
    assert "cannot be used" in caplog.text and "networks.unet.package" in caplog.text
    assert len(calls.read_text().splitlines()) == 4  # rebuilt: every network compiled again
    assert np.array_equal(_image(_C.Model(str(model_dir))), reference_image)


def test_two_processes_building_one_engine_build_it_once(tmp_path, real_engine, model_dir, reference_image,
                                                         monkeypatch):
    cache, calls = tmp_path / "cache", tmp_path / "calls"
    pids = [_builder(cache, real_engine, calls) for _ in range(2)]
    codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
    assert codes == [0, 0]
    compiles = calls.read_text().splitlines()
    assert len(compiles) == 4 and len({line.split()[0] for line in compiles}) == 1, \
        f"the engine was built more than once: {compiles}"
    assert _check_cache(cache, model_dir, reference_image, monkeypatch) == "whole"
    assert not [p for p in (cache / "aoti").iterdir() if ".tmp-" in p.name]


def test_onnx_export_killed_mid_write_leaves_old_or_new(tmp_path, monkeypatch):
    """export/onnx.py writes aside and publishes with cachedir too: killed at random instants
    while writing over an existing export, the folder is the old export or the whole new one."""
    from sdengine.export import onnx as onnx_export

    out = tmp_path / "export"

    def write_export(generation: str):
        def run():
            tmp = onnx_export._prepare_out_dir(out, overwrite=True)
            for i in range(20):
                (tmp / f"part-{i}.bin").write_bytes(os.urandom(64 << 10))
                time.sleep(0.01)
            (tmp / "sdengine_onnx.json").write_text(json.dumps({"generation": generation, "parts": 20}))
            onnx_export._move_into_place(tmp, out)
        return run

    rng = random.Random(5)
    seen = set()
    for trial in range(10):
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        (out / "sdengine_onnx.json").write_text(json.dumps({"generation": "old"}))
        _kill_after(_fork(write_export(f"new-{trial}")), rng.uniform(0.0, 0.35))
        manifest = json.loads((out / "sdengine_onnx.json").read_text())
        if manifest["generation"] == "old":
            assert not list(out.glob("part-*")), "the old export holds new files"
        else:
            assert len(list(out.glob("part-*"))) == manifest["parts"] == 20, "a half-written export"
        seen.add(manifest["generation"] == "old")
    assert len(seen) == 2  # some kills landed before the publish, some after
