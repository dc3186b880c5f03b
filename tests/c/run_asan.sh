#!/usr/bin/env bash
# The C API tests under AddressSanitizer (and LeakSanitizer): libsdengine and the test
# program built with -fsanitize=address in their own CMake folder, run against the tiny
# SD1 model and its engine (built by Python on first use, cached in $SDE_CACHE_DIR).
#
#   bash tests/c/run_asan.sh [BUILD_DIR]      (default build/asan)
set -euo pipefail
cd "$(dirname "$0")/../.."
BUILD=${1:-build/asan}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

TORCH_PREFIX=$(python -c "import torch.utils; print(torch.utils.cmake_prefix_path)")
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DSDE_SANITIZE=address \
  -DCMAKE_PREFIX_PATH="$TORCH_PREFIX" -DPython_EXECUTABLE="$(command -v python)" > "$WORK/cmake.log" || { cat "$WORK/cmake.log"; exit 1; }
cmake --build "$BUILD" --target sde_capi_test sde_fuzz_reader sde_lora_test -j "${CMAKE_BUILD_PARALLEL_LEVEL:-2}"

# The tiny model and its engine (the same as tests/support/native.py's).
ENGINE=$(python - "$WORK/model" <<'PY'
import sys
sys.path.insert(0, "tests")
from support.tiny import save_tiny_pipeline
import sdengine
folder = save_tiny_pipeline("sd15", sys.argv[1])
print(sdengine.load(folder, backend="native").backend.engine_dir)
PY
)
python - "$WORK/model" "$WORK/corrupt" <<'PY'
import shutil, sys
shutil.copytree(sys.argv[1], sys.argv[2])
path = f"{sys.argv[2]}/unet/diffusion_pytorch_model.safetensors"
data = bytearray(open(path, "rb").read())
data[8:20] = b"{not json!!!"
open(path, "wb").write(bytes(data))
PY

# libtorch itself is not instrumented; its one-time allocations at exit are not ours.
# intercept_tls_get_addr=0: the compiled packages are dlopen'ed and their dynamic TLS blocks
# go stale; LeakSanitizer's exit-time scan of them then crashes ("Tracer caught signal 11",
# "DTLS ... at 0x000000022350") on some heap layouts. Leaks are still checked everywhere else.
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=0:halt_on_error=1:intercept_tls_get_addr=0}
export LSAN_OPTIONS=${LSAN_OPTIONS:-suppressions=$PWD/tests/c/lsan.supp:print_suppressions=0}
export OMP_NUM_THREADS=1
"$BUILD/sde_capi_test" args "$WORK/model" "$ENGINE" "$WORK/corrupt"
"$BUILD/sde_capi_test" threads "$WORK/model" "$ENGINE" 4 2
# Every sampler under both rules, one request each, then 8 threads mixing them on one model (equal to serial).
"$BUILD/sde_capi_test" samplers "$WORK/model" "$ENGINE" 8
"$BUILD/sde_capi_test" rss "$WORK/model" "$ENGINE" 20 100  # leaks: LeakSanitizer at exit, not RSS
# 16 threads x 60 requests, a quarter cancelled at a random step: cancelled requests free everything.
"$BUILD/sde_capi_test" soak "$WORK/model" "$ENGINE" 16 60 25
# ControlNets (the tiny ones of tests/test_controlnet.py: a folder, a single file, an SDXL misfit)
CN_ENGINE=$(python - "$WORK" <<'PY'
import sys
sys.path.insert(0, "tests")
import numpy as np
import torch
from safetensors.torch import save_file
import sdengine
from support.ldm_keys import controlnet_to_ldm
from test_controlnet import CONTROL_IMAGES
from support.tiny import sdengine_controlnet, tiny_controlnet
from sdengine.export.aoti_controlnet import controlnet_engine_for
work = sys.argv[1]
tiny_controlnet("sd15", 0).save_pretrained(f"{work}/cn0", safe_serialization=True)
save_file(controlnet_to_ldm(tiny_controlnet("sd15", 1)), f"{work}/cn1.safetensors")
tiny_controlnet("sdxl", 0).save_pretrained(f"{work}/misfit", safe_serialization=True)
for i, image in enumerate(CONTROL_IMAGES[:2]):
    open(f"{work}/image{i}.rgb", "wb").write(np.asarray(image).tobytes())
config = sdengine.load(f"{work}/model", backend="native").config
print(controlnet_engine_for(config, sdengine_controlnet("sd15", 0).config, dtype=torch.float32, device="cpu",
                            progress=False))
PY
)
"$BUILD/sde_capi_test" controlnet "$WORK/model" "$ENGINE" "$WORK/cn0" "$WORK/cn1.safetensors" "$CN_ENGINE" \
  "$WORK/image0.rgb" "$WORK/image1.rgb" 24 16 "$WORK/out.rgb" "$WORK/misfit"
# DeepCache (branch 0's engine of the tiny model: export/aoti_deepcache.py)
DC_ENGINE=$(python - "$WORK/model" <<'PY'
import sys
import torch
import sdengine
from sdengine.export.aoti_deepcache import deepcache_engine_for
config = sdengine.load(sys.argv[1], backend="native").config
print(deepcache_engine_for(config, 0, dtype=torch.float32, device="cpu", progress=False))
PY
)
"$BUILD/sde_capi_test" deepcache "$WORK/model" "$ENGINE" "$DC_ENGINE" "$WORK/deepcache.rgb"
# The file readers (safetensors, engine.json, the single-file key map) on 300 mutants of each,
# answers compared with the references (tests/support/fuzz_files.py; tests/test_fuzz.py runs 4,000 more
# without ASan).
PYTHONPATH="tests${PYTHONPATH:+:$PYTHONPATH}" python -m support.fuzz_files all --driver "$BUILD/sde_fuzz_reader" --count 300 --seed 1919
# LoRA swaps and textual inversion (issue 17): 4 threads generating while a fifth swaps 20 times.
python - "$WORK" <<'PY'
import sys
sys.path.insert(0, "tests")
from pathlib import Path
from safetensors.torch import save_file
from support.lora_files import embedding_vectors, kohya_lora, peft_lora
from support.tiny import tiny_pipeline
work = Path(sys.argv[1])
kohya_lora(tiny_pipeline("sd15"), work / "a.safetensors", rank=4, alpha=2.0, locon=True)
peft_lora(tiny_pipeline("sd15"), work / "b", rank=4, alpha=8.0).rename(work / "b.safetensors")
save_file({"emb_params": embedding_vectors(32, 2)}, str(work / "emb.safetensors"))
PY
mkdir -p "$WORK/out"
"$BUILD/sde_lora_test" images "$WORK/model" "$ENGINE" "$WORK/a.safetensors" "$WORK/b.safetensors" \
  "$WORK/emb.safetensors" "$WORK/out"
"$BUILD/sde_lora_test" threads "$WORK/model" "$ENGINE" "$WORK/a.safetensors" "$WORK/b.safetensors" 4 20
echo "AddressSanitizer: C API tests passed"
