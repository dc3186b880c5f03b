"""The scripts a session with a lent GPU runs, checked here so that they do not rot between
GPU sessions (device time is scarce: a broken script wastes a whole session).

- benchmarks/gpu_session.sh end to end with a stand-in `python` that records its command
  lines: every step runs in order, the native benchmark joins only after its engine was
  built, and everything comes back packed in one file.
- benchmarks/profile_unet.py on the CPU (its smoke mode) on the tiny SD1 model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

STUB = """#!/usr/bin/env bash
echo "$*" >> "$STUB_LOG"
case "$*" in
  *prebuild_native.py*) exit "${STUB_PREBUILD_RC:-0}";;
esac
exit 0
"""


def _run_session(tmp_path: Path, prebuild_rc: int):
    stub = tmp_path / "python"
    stub.write_text(STUB)
    stub.chmod(0o755)
    out, work, log = tmp_path / "out", tmp_path / "work", tmp_path / "calls.log"
    env = dict(os.environ, OUT=str(out), WORK=str(work), PYTHON=str(stub), STUB_LOG=str(log),
               STUB_PREBUILD_RC=str(prebuild_rc), SESSION_SECONDS="300")
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_session.sh")], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return out, log.read_text().splitlines(), proc.stdout


@pytest.mark.parametrize("prebuild_rc", [0, 1])
def test_gpu_session_script_runs_every_step_and_packs_one_file(tmp_path, prebuild_rc):
    out, calls, stdout = _run_session(tmp_path, prebuild_rc)
    assert sorted(p.name for p in out.iterdir()) == ["gpu_session.tgz", "session.log"]
    with tarfile.open(out / "gpu_session.tgz") as tar:
        names = {Path(n).name for n in tar.getnames()}
    assert {"build.log", "profile_unet.log", "gpu_tests.log", "prebuild_native.log", "bench_sd15.log",
            "bench_sd21.log", "session.log"} <= names
    order = [next(i for i, c in enumerate(calls) if needle in c)
             for needle in ("install --no-build-isolation", "profile_unet.py", "prebuild_native.py", "-m gpu",
                           "bench --arch sd15")]
    assert order == sorted(order), calls
    bench = next(c for c in calls if "bench --arch sd15" in c and "diffusers-compile" not in c)
    assert ("native" in bench.split("--backends ")[1].split()[0]) == (prebuild_rc == 0)
    tests = next(c for c in calls if "-m gpu" in c)
    assert "-v" in tests.split() and "--continue-on-collection-errors" in tests
    assert "== done in" in stdout


def test_profile_unet_smoke_on_cpu(tmp_path):
    path = tmp_path / "profile.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "profile_unet.py"), "--arch", "tiny", "--size", "16",
           "--dtype", "fp32", "--device", "cpu", "--repeats", "2", "--top", "4",
           "--variants", "diffusers,eager,triton-ops", "--json", str(path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(path.read_text())
    assert set(report["variants"]) == {"diffusers", "eager", "triton-ops"}
    for name, entry in report["variants"].items():
        assert "error" not in entry, (name, entry.get("error"))
        assert entry["median_ms"] > 0 and entry["first_call_s"] > 0
        assert 0 < len(entry["top"]) <= 4 and entry["top"][0]["calls"] >= 1
