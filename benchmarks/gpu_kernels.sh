#!/usr/bin/env bash
# Test and benchmark sdengine's Triton kernels natively on a GPU; write the records under $OUT.
#
#   OUT=/some/dir benchmarks/gpu_kernels.sh          (OUT defaults to benchmarks/results)
#
# 1. the kernel tests with TRITON_INTERPRET unset: every test runs on CUDA (fp32, fp16, bf16),
#    including the @pytest.mark.gpu ones (SD shapes, CUDA-graph replay, torch.compile);
# 2. python -m sdengine.kernels.bench --json (ms, TFLOP/s or GB/s, % of measured peak);
# 3. the pytest-benchmark suite (benchmarks/test_kernels_bench.py) --benchmark-json.
# Needs torch + triton (+ pytest, pytest-benchmark; diffusers for the tests that compare with
# it: carry them as wheels if the machine lacks them). If sdengine is not installed, the
# kernels are imported from this checkout through a shim package (no native build needed).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
unset TRITON_INTERPRET
PY="${PYTHON:-python3}"
status=0

if ! "$PY" -c "import sdengine.kernels" 2>/dev/null; then
    shim="$(mktemp -d)/shim"
    mkdir -p "$shim/sdengine/kernels"
    : > "$shim/sdengine/__init__.py"
    # the package's face; its __path__ reaches the top-level kernels/ folder beside it
    ln -s "$PWD/sdengine/kernels/__init__.py" "$shim/sdengine/kernels/__init__.py"
    export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}"
    echo "sdengine not installed: importing sdengine.kernels from $PWD/kernels"
fi

"$PY" - <<'PYEOF' 2>&1 | tee "$OUT/kernels_env.txt"
import torch, triton, sdengine.kernels as K
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "NONE")
print("HAS_TRITON", K.HAS_TRITON, "OPS_REGISTERED", K.OPS_REGISTERED, "INTERPRET", K.INTERPRET)
PYEOF

if "$PY" -c "import pytest" 2>/dev/null; then
    timeout_arg=()
    "$PY" -c "import pytest_timeout" 2>/dev/null && timeout_arg=(--timeout=120)
    # one line per test and short tracebacks: a run stopped early still says what failed
    PYTHONUNBUFFERED=1 "$PY" -X faulthandler -m pytest -v --tb=short -rfEs -p no:cacheprovider "${timeout_arg[@]}" \
        tests/test_kernels_*.py \
        --junitxml="$OUT/kernels_tests.xml" 2>&1 | tee "$OUT/kernels_tests.log" || status=1
else
    echo "pytest is not installed: kernel tests skipped" | tee "$OUT/kernels_tests.log"
    status=1
fi

PYTHONUNBUFFERED=1 "$PY" -m sdengine.kernels.bench --json "$OUT/kernels_bench.json" 2>&1 \
    | tee "$OUT/kernels_bench.log" || status=1

if "$PY" -c "import pytest_benchmark" 2>/dev/null; then
    PYTHONUNBUFFERED=1 "$PY" -m pytest -q -p no:cacheprovider benchmarks/test_kernels_bench.py \
        --benchmark-json="$OUT/kernels_pytest_bench.json" 2>&1 | tail -40 > "$OUT/kernels_pytest_bench.log" || status=1
else
    echo "pytest-benchmark is not installed: suite skipped" | tee "$OUT/kernels_pytest_bench.log"
fi
exit $status
