#!/usr/bin/env bash
# The ONE script a session with a lent GPU runs (see ../shared/GPU.md). Under 9 minutes of wall time.
#
#   device tool call:  SDENGINE_COMMIT=<git rev-parse HEAD> SESSION_SECONDS=540 bash benchmarks/gpu_session.sh
#   with timeout_s 595 and carry: [".whl"] (the diffusers wheel; GPU.md says how to download it).
#   A session has 15 minutes of device time, a fresh machine takes 1-2 of them to start, and
#   none starts with under 4 left: one full call, then give_back (or one short follow-up call
#   within the 30 s the machine stays warm; it keeps the build and /tmp/site).
#
# Steps, each with its own time cap inside one overall deadline (a step that runs out is
# stopped with SIGTERM, and `sdengine bench` then writes what it measured, marked incomplete):
#   1. nvidia-smi; install the carried wheels (.whl/*.whl) if any; versions, ORT providers;
#   2. build the project (pip install -e ., CMake + libtorch);
#   3. benchmarks/profile_unet.py: one UNet step of diffusers and of ours (eager, Triton), first
#      call and steady state, top kernels; then, in the background, build the native backend's
#      SD1.5 fp16 engine (benchmarks/prebuild_native.py: minutes of AOTInductor);
#   4. GPU tests: pytest -m gpu tests/ (the fused step, the models in fp16, the native runtime
#      on CUDA, the Triton backend), one line per test, a time limit per test;
#   5. benchmarks/gpu_kernels.sh (kernel tests natively, kernel benchmarks);
#   6. sdengine bench, --sampler euler on every backend (diffusers runs EulerDiscreteScheduler):
#      SD1.5 512x512 fp16 with diffusers, eager, triton and (once its engine is built) native;
#   7. SD2.1 768x768 with diffusers, eager, triton; then SD1.5 with diffusers-compile if time is left.
# Everything is written under $WORK (logs, junit XML, the records: json, md, png in
# $WORK/results) and packed at the end into ONE file, $OUT/gpu_session.tgz (the device tool
# brings back 8 files at most), beside $OUT/session.log.
# Unpack it and copy results/* into benchmarks/results/, then commit them.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/sdengine-gpu}"
WORK="${WORK:-$(mktemp -d /tmp/sdengine-gpu-work.XXXX)}"
mkdir -p "$OUT" "$WORK/results"
PY="${PYTHON:-python3}"
START=$(date +%s)
DEADLINE=$((START + ${SESSION_SECONDS:-530}))
export PYTHONUNBUFFERED=1
export SDE_CACHE_DIR="${SDE_CACHE_DIR:-$WORK/cache}"
exec > >(tee -a "$WORK/session.log") 2>&1

pack() {
    cp "$WORK/session.log" "$OUT/session.log" 2>/dev/null
    tar -czf "$OUT/gpu_session.tgz" -C "$WORK" --exclude=cache . 2>/dev/null
    ls -la "$OUT"
}
trap pack EXIT

# run_step NAME CAP_SECONDS COMMAND...: run with min(CAP, time left) and log the outcome.
run_step() {
    local name=$1 cap=$2
    shift 2
    local left=$((DEADLINE - $(date +%s)))
    if ((left < 20)); then
        echo "== $name: skipped, $left s left"
        return 0
    fi
    ((cap > left)) && cap=$left
    echo "== $name (cap ${cap} s) at +$(($(date +%s) - START)) s"
    timeout -s TERM -k 20 "$cap" "$@" > "$WORK/$name.log" 2>&1
    local rc=$?
    echo "== $name: rc=$rc, +$(($(date +%s) - START)) s"
    tail -n 15 "$WORK/$name.log"
    return 0
}

nvidia-smi > "$WORK/nvidia-smi.txt" 2>&1 || echo "nvidia-smi failed"
head -n 15 "$WORK/nvidia-smi.txt"

if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \
        export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" - <<'PYEOF'
import importlib
for name in ("torch", "triton", "diffusers", "transformers", "onnxruntime", "jsonschema", "matplotlib"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "?"))
    except ImportError as e:
        print(name, "MISSING", e)
import torch
print("cuda", torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else "NO GPU")
try:
    import onnxruntime
    print("onnxruntime providers", onnxruntime.get_available_providers())
except ImportError:
    pass
PYEOF

export CMAKE_BUILD_PARALLEL_LEVEL=16
run_step build 150 "$PY" -m pip install --no-build-isolation --no-deps -e .
if ! "$PY" -c "import sdengine._C" 2>/dev/null; then  # the Python side still runs without the native part
    echo "== the native build failed: installing the Python packages alone (SDE_NO_NATIVE=1)"
    SDE_NO_NATIVE=1 run_step build_python_only 60 "$PY" -m pip install --no-build-isolation --no-deps -e .
fi
export PATH="$HOME/.local/bin:$PATH"
SDE=("$PY" -m sdengine.cli)  # works whether or not the console script landed on PATH

# pytest, so that a killed step still says which test failed and why: one line per test (-v),
# short tracebacks, a per-test time limit where pytest-timeout is installed, a Python stack
# on a crash (faulthandler), and collection errors (a missing optional package) not fatal.
PYTEST=("$PY" -X faulthandler -m pytest -v --tb=short -rfEs -p no:cacheprovider --continue-on-collection-errors)
"$PY" -c "import pytest_timeout" 2>/dev/null && PYTEST+=(--timeout=120)

# Where one UNet step's time goes (diffusers vs ours, eager and Triton), and how long the
# Triton kernels' first call (compile + autotune) takes: alone on the machine, before anything
# else loads the CPU.
TRITON_PRINT_AUTOTUNING=1 run_step profile_unet 170 "$PY" -X faulthandler benchmarks/profile_unet.py \
    --arch sd15 --size 512 --json "$WORK/profile_unet.json"

# The native backend's SD1.5 engine, built while the tests run (the benchmark waits for it).
# It stops 150 s before the deadline at the latest, which leaves the benchmark its time.
PREBUILD_CAP=$((DEADLINE - $(date +%s) - 150))
((PREBUILD_CAP > 420)) && PREBUILD_CAP=420
PREBUILD_PID=
if ((PREBUILD_CAP >= 60)); then
    echo "== prebuild_native (background, cap ${PREBUILD_CAP} s) at +$(($(date +%s) - START)) s"
    timeout -s TERM -k 10 "$PREBUILD_CAP" "$PY" -X faulthandler benchmarks/prebuild_native.py --arch sd15 \
        --dtype fp16 > "$WORK/prebuild_native.log" 2>&1 &
    PREBUILD_PID=$!
else
    echo "== prebuild_native: skipped, ${PREBUILD_CAP} s of its window left"
fi

run_step gpu_tests 120 "${PYTEST[@]}" -m gpu tests/ --ignore-glob="tests/test_kernels_*" \
    --junitxml="$WORK/gpu_tests.xml"

# The kernel tests and benchmarks time on the GPU (CUDA events), which the compile's CPU
# load does not disturb.
if [[ -f benchmarks/gpu_kernels.sh ]]; then
    mkdir -p "$WORK/kernels"
    OUT="$WORK/kernels" run_step gpu_kernels 50 bash benchmarks/gpu_kernels.sh
fi

# No end-to-end benchmark runs beside the compile (it would take CPU from the timed runs).
SD15_BACKENDS=diffusers,eager,triton
if [[ -n $PREBUILD_PID ]]; then
    echo "== waiting for prebuild_native at +$(($(date +%s) - START)) s"
    wait "$PREBUILD_PID"
    PREBUILD_RC=$?
    echo "== prebuild_native: rc=$PREBUILD_RC, +$(($(date +%s) - START)) s"
    tail -n 30 "$WORK/prebuild_native.log"
    ((PREBUILD_RC == 0)) && SD15_BACKENDS+=,native
fi

BENCH=(--repeats 20 --warmup 3 --e2e-repeats 5 --budget 20 --no-progress --out-dir "$WORK/results")
run_step bench_sd15 130 "${SDE[@]}" bench --arch sd15 --height 512 --width 512 --steps 30 --sampler euler \
    --batch 1 --dtype fp16 --backends "$SD15_BACKENDS" "${BENCH[@]}"
run_step bench_sd21 80 "${SDE[@]}" bench --arch sd21-v --height 768 --width 768 --steps 30 --sampler euler \
    --batch 1 --dtype fp16 --backends diffusers,eager,triton "${BENCH[@]}"
run_step bench_sd15_compile 200 "${SDE[@]}" bench --arch sd15 --height 512 --width 512 --steps 30 --sampler euler \
    --batch 1 --dtype fp16 --backends diffusers,diffusers-compile --compile-mode default "${BENCH[@]}"

echo "== records"
ls -la "$WORK/results"
for md in "$WORK"/results/*.md; do [[ -f $md ]] && sed -n '1,16p' "$md"; done
echo "== done in $(($(date +%s) - START)) s"
