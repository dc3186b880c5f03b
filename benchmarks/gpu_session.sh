#!/usr/bin/env bash
# The ONE script a session with a lent GPU runs (see ../shared/GPU.md). Under 9 minutes of wall time.
#
#   device tool call:  SDENGINE_COMMIT=<git rev-parse HEAD> bash benchmarks/gpu_session.sh
#   with carry: [".whl"] when the diffusers wheel was downloaded (GPU.md says how)
#
# Steps, each with its own time cap inside one overall deadline (a step that runs out is
# stopped with SIGTERM, and `sdengine bench` then writes what it measured, marked incomplete):
#   1. nvidia-smi; install the carried wheels (.whl/*.whl) if any;
#   2. build the project (pip install -e ., CMake + libtorch);
#   3. GPU tests: pytest -m gpu tests/, then benchmarks/gpu_kernels.sh if it exists;
#   4. sdengine bench, --sampler euler on every backend (the Triton backend's fused step covers it;
#      diffusers runs EulerDiscreteScheduler): SD1.5 512x512 fp16 with every backend; SD2.1 768x768; then SD1.5 with
#      diffusers-compile (max-autotune compiles for minutes: last, so nothing waits on it).
# Everything lands under $OUT: logs, junit XML, and the records (json, md, png) in $OUT/results.
# Copy $OUT/results/* into benchmarks/results/ and commit them.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/sdengine-gpu}"
mkdir -p "$OUT/results"
PY="${PYTHON:-python3}"
START=$(date +%s)
DEADLINE=$((START + ${SESSION_SECONDS:-530}))
export PYTHONUNBUFFERED=1
exec > >(tee -a "$OUT/session.log") 2>&1

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
    timeout -s TERM -k 20 "$cap" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "== $name: rc=$rc, +$(($(date +%s) - START)) s"
    tail -n 15 "$OUT/$name.log"
    return 0
}

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || echo "nvidia-smi failed"
head -n 15 "$OUT/nvidia-smi.txt"

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
PYEOF

export CMAKE_BUILD_PARALLEL_LEVEL=16
run_step build 240 "$PY" -m pip install --no-build-isolation --no-deps -e .
export PATH="$HOME/.local/bin:$PATH"
SDE=("$PY" -m sdengine.cli)  # works whether or not the console script landed on PATH

run_step gpu_tests 100 "$PY" -m pytest -q -rs -m gpu -p no:cacheprovider tests/ --junitxml="$OUT/gpu_tests.xml"
if [[ -x benchmarks/gpu_kernels.sh || -f benchmarks/gpu_kernels.sh ]]; then
    mkdir -p "$OUT/kernels"
    OUT="$OUT/kernels" run_step gpu_kernels 90 bash benchmarks/gpu_kernels.sh
fi

BENCH=(--repeats 20 --warmup 3 --e2e-repeats 5 --budget 20 --no-progress --out-dir "$OUT/results")
run_step bench_sd15 150 "${SDE[@]}" bench --arch sd15 --height 512 --width 512 --steps 30 --sampler euler \
    --batch 1 --dtype fp16 --backends diffusers,eager,triton,native,onnx "${BENCH[@]}"
run_step bench_sd21 80 "${SDE[@]}" bench --arch sd21-v --height 768 --width 768 --steps 30 --sampler euler \
    --batch 1 --dtype fp16 --backends diffusers,eager,triton,native "${BENCH[@]}"
run_step bench_sd15_compile 200 "${SDE[@]}" bench --arch sd15 --height 512 --width 512 --steps 30 --sampler euler \
    --batch 1 --dtype fp16 --backends diffusers,diffusers-compile "${BENCH[@]}"

echo "== records"
ls -la "$OUT/results"
for md in "$OUT"/results/*.md; do [[ -f $md ]] && sed -n '1,16p' "$md"; done
echo "== done in $(($(date +%s) - START)) s"
