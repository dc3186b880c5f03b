"""The scripts a session with a lent GPU runs, checked here so that they do not rot between
GPU sessions (device time is scarce: a broken script wastes a whole session).

- benchmarks/gpu_session.sh end to end with a stand-in `python` that records its command
  lines: every step runs in order, the SD1.5 benchmark names every speed layer with its caps,
  a carried compile cache is imported first, the native benchmark runs only once its engine
  was built, and everything comes back packed in one file beside the exported cache.
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
  *prebuild_native.py*) [[ ${STUB_PREBUILD_RC:-0} == 0 ]] && echo "engine /tmp/e ready in 1.0 s"
                        exit "${STUB_PREBUILD_RC:-0}";;
  *"cache export"*) touch "${@: -1}";;
esac
exit 0
"""


def _run_session(tmp_path: Path, prebuild_rc: int, with_cache: bool = False):
    stub = tmp_path / "python"
    stub.write_text(STUB)
    stub.chmod(0o755)
    out, work, log = tmp_path / "out", tmp_path / "work", tmp_path / "calls.log"
    env = dict(os.environ, OUT=str(out), WORK=str(work), PYTHON=str(stub), STUB_LOG=str(log),
               STUB_PREBUILD_RC=str(prebuild_rc), SESSION_SECONDS="480")
    root = ROOT
    if with_cache:  # a copy of the script beside a carried cache archive
        root = tmp_path / "tree"
        (root / "benchmarks").mkdir(parents=True)
        (root / "benchmarks" / "gpu_session.sh").write_text((ROOT / "benchmarks" / "gpu_session.sh").read_text())
        (root / ".whl").mkdir()
        (root / ".whl" / "sdengine-cache.tgz").write_bytes(b"x")
    proc = subprocess.run(["bash", str(root / "benchmarks" / "gpu_session.sh")], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return out, log.read_text().splitlines(), proc.stdout


@pytest.mark.parametrize("prebuild_rc", [0, 1])
def test_gpu_session_script_runs_every_step_in_order_and_packs_its_results(tmp_path, prebuild_rc):
    out, calls, stdout = _run_session(tmp_path, prebuild_rc)
    assert sorted(p.name for p in out.iterdir()) == ["gpu_session.tgz", "sdengine-cache.tgz", "session.log"]
    with tarfile.open(out / "gpu_session.tgz") as tar:
        names = {Path(n).name for n in tar.getnames()}
    assert {"build.log", "profile_unet.log", "bench_sd15.log", "kernels_bench.log", "cache_export.log",
            "gpu_tests.log", "bench_sd21.log", "bench_sdxl.log", "session.log"} <= names
    order = [next(i for i, c in enumerate(calls) if needle in c)
             for needle in ("install --no-build-isolation", "profile_unet.py", "bench --arch sd15",
                            "sdengine.kernels.bench", "cache export", "--lora-swap", "-m gpu", "--batch 4", "--arch sd21-v",
                            "--arch sdxl", "prebuild_native.py")]
    assert order == sorted(order), calls
    bench = next(c for c in calls if "bench --arch sd15" in c)
    backends = bench.split("--backends ")[1].split()[0].split(",")
    assert backends == ["diffusers", "graph", "triton", "compile", "eager", "diffusers-compile"]
    assert "--prepare-cap" in bench and "--run-cap" in bench and "--e2e-repeats 10" in bench
    profile = next(c for c in calls if "profile_unet.py" in c)
    assert "diffusers,eager" in profile
    native = [c for c in calls if "--backends diffusers,native" in c]
    assert len(native) == (1 if prebuild_rc == 0 else 0)  # the native benchmark only once its engine built
    # issue 16: the full-size native check after a build, the compile bisect after a failed one
    assert any("test_native_cuda.py" in c and "full_size" in c for c in calls) == (prebuild_rc == 0)
    assert any("bisect_aoti.py" in c for c in calls) == (prebuild_rc != 0)
    tests = next(c for c in calls if "-m gpu" in c)
    assert "-v" in tests.split() and "--continue-on-collection-errors" in tests
    assert not any("cache import" in c for c in calls)
    assert "== done in" in stdout


def test_gpu_session_imports_a_carried_compile_cache_first(tmp_path):
    _, calls, _ = _run_session(tmp_path, 0, with_cache=True)
    imported = next(i for i, c in enumerate(calls) if "cache import .whl/sdengine-cache.tgz" in c)
    assert imported < next(i for i, c in enumerate(calls) if "profile_unet.py" in c)


def test_profile_unet_smoke_on_cpu(tmp_path):
    path = tmp_path / "profile.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "profile_unet.py"), "--arch", "tiny", "--size", "16",
           "--dtype", "fp32", "--device", "cpu", "--repeats", "2", "--top", "4",
           "--variants", "diffusers,eager,graph", "--json", str(path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(path.read_text())
    assert set(report["variants"]) == {"diffusers", "eager", "graph"}
    for name, entry in report["variants"].items():
        assert "error" not in entry, (name, entry.get("error"))
        assert entry["latency_ms"] > 0 and entry["host_ms"] > 0 and entry["first_call_s"] > 0
        assert 0 < len(entry["top"]) <= 4 and entry["top"][0]["calls"] >= 1 and entry["kernels"] > 0
        # each row once: the top rows never add up to more than the whole profile
        assert sum(r["ms"] for r in entry["top"]) <= entry["profiled_ms"] + 1e-6
