#!/usr/bin/env bash
# The CPU acceptance session of issue 27: every CPU peer and every sdengine CPU path in one
# `sdengine bench` run per size, on a QUIET machine (nothing else running: the figures are
# ratios within one run, but a busy neighbour still skews them). Run from the repository root:
#
#     bash benchmarks/cpu_session.sh [PEERS_PYTHON]      # default /work/venvs/peers/bin/python
#
# Prerequisite: the peers' venv (benchmarks/README.md, "Peers"). Writes its records under
# benchmarks/results/ (commit them) and its logs under benchmarks/results/logs/<date>_cpu/.
# Each step has its own cap; a step that fails or runs out of time is logged and the next runs.
# Expected wall time on 2 cores: 1.5-3 h (the 512² run dominates: fp32 diffusers ~45 s an image,
# the cold Inductor compile and OpenVINO's export several minutes each).
set -uo pipefail
cd "$(dirname "$0")/.."

PEERS=${1:-/work/venvs/peers/bin/python}
DAY=$(date -u +%Y-%m-%d)
LOGS=benchmarks/results/logs/${DAY}_cpu
mkdir -p "$LOGS"
export SDE_CACHE_DIR=${SDE_CACHE_DIR:-$HOME/.cache/sdengine}

say() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$LOGS/session.log"; }
step() {  # step NAME CAP_SECONDS COMMAND...: run under timeout, log to $LOGS/NAME.log
    local name=$1 cap=$2; shift 2
    say "$name: start (cap ${cap}s): $*"
    timeout --signal=TERM --kill-after=60 "$cap" "$@" >"$LOGS/$name.log" 2>&1
    say "$name: exit $?"
}

say "load before: $(cat /proc/loadavg)"
top -bn1 | head -15 >>"$LOGS/session.log"
lscpu | grep -E "Model name|^CPU\(s\)|Thread|Flags" | sed 's/Flags:.*\(avx512_bf16\|amx\).*/Flags: ... (see lscpu) .../' >>"$LOGS/session.log"
PEER_ARGS=()
if [ -x "$PEERS" ]; then
    PEER_ARGS=(--peer-python "optimum-openvino=$PEERS" --peer-python "sdcpp=$PEERS")
else
    say "no peers' venv at $PEERS: the optimum-openvino and sdcpp rows will be skipped with their install command"
fi

# The acceptance command (issue 27), at 512² then 256². The rows without @ run in sdengine's CPU
# default (bf16 on a CPU with bf16 dot products); the baseline is diffusers@fp32. compile@bf16 is
# the default compile layer (weights read at every call: LoRAs hot-swap), compile@bf16+freeze
# the frozen / prepacked one (a LoRA recompiles).
BACKENDS=diffusers@fp32,diffusers@bf16,optimum-openvino,sdcpp,sdcpp@q8_0,eager,compile,compile@bf16+freeze,openvino,onnx@fp32
for size in 512 256; do
    step "bench_${size}" 7200 sdengine bench --arch sd15 --height $size --width $size --steps 4 --device cpu \
        --backends "$BACKENDS" "${PEER_ARGS[@]}" \
        --components text_encoder,unet_step,vae_decode,end_to_end --repeats 3 --warmup 1 \
        --e2e-repeats 3 --e2e-warmup 1 --budget 180 --prepare-cap 1500 --run-cap 1800 \
        --json "benchmarks/results/${DAY}_cpu_sd15-${size}.json" --no-progress
done

# First-call cost from the caches the 512² run left (Inductor's FX/kernel cache, OpenVINO's IR and
# blobs): the same rows again, end to end only; their prepare_s is the warm start.
step warm_512 2400 sdengine bench --arch sd15 --height 512 --width 512 --steps 4 --device cpu \
    --backends compile,compile@bf16+freeze,openvino --components end_to_end --e2e-repeats 1 --e2e-warmup 0 \
    --json "benchmarks/results/${DAY}_cpu_sd15-512-warm.json" --no-progress
step cache_export 600 sdengine cache export "$LOGS/sdengine-cache.tar.gz"

# The diffusers rows against diffusers timed plainly on the same weights, in its own process.
WEIGHTS=$SDE_CACHE_DIR/bench-weights/sd15-seed0
for dtype in fp32 bf16; do
    step "plain_diffusers_${dtype}" 1800 python benchmarks/plain_diffusers.py "$WEIGHTS" --dtype $dtype \
        --height 512 --width 512 --steps 4 --runs 3 --json "$LOGS/plain_diffusers_${dtype}_512.json"
done

say "load after: $(cat /proc/loadavg)"
python -m sdengine.bench.report --all benchmarks/results/${DAY}_cpu_sd15-512.json \
    benchmarks/results/${DAY}_cpu_sd15-256.json >"$LOGS/readme_table.md" 2>>"$LOGS/session.log"
say "done: records in benchmarks/results/${DAY}_cpu_sd15-*.json; README table in $LOGS/readme_table.md"
