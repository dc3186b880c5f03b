"""The openvino backend (sdengine/backends/openvino.py) against the eager backend on the same
tiny random weights: what OpenVINO's CPU plugin computes from our converted networks.

References: the eager backend (fp32 torch) for the images; a LoRA merged into eager's weights
for the reconversion after set_loras. Budget: about a minute on 2 CPU cores (conversion and
compilation of three tiny networks, twice).
"""

import copy

import numpy as np
import pytest
import torch

import sdengine
from support.lora_files import kohya_lora
from support.tiny import tiny_pipeline

pytest.importorskip("openvino", reason="the openvino extra: pip install 'sdengine[openvino]'")

KWARGS = dict(steps=3, height=16, width=24, seed=[1, 2], output_type="np", progress=False)
PROMPTS = ["a red cube", "a blue sphere"]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SDE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "openvino"


def _pipes(kind="sd15", dtype=torch.float32):
    pipe = tiny_pipeline(kind)
    eager = sdengine.from_diffusers(copy.deepcopy(pipe))
    fast = sdengine.from_diffusers(copy.deepcopy(pipe).to(dtype), backend="openvino")
    return eager, fast


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_fp32_matches_eager(kind, cache):
    eager, fast = _pipes(kind)
    assert fast.backend.precision == "f32"
    got, want = fast(PROMPTS, **KWARGS).images, eager(PROMPTS, **KWARGS).images
    assert np.abs(got - want).max() <= 1e-4
    assert {"unet", "vae_decode"} <= set(fast.backend.costs)
    assert len(list(cache.rglob("unet-*.xml"))) == 1  # converted once, at the workload's shapes


def test_bf16_is_close_to_fp32_and_a_second_load_reads_the_cache(cache):
    eager, fast = _pipes(dtype=torch.bfloat16)
    assert fast.backend.precision == "bf16"
    got, want = fast(PROMPTS, **KWARGS).images, eager(PROMPTS, **KWARGS).images
    assert np.abs(got - want).mean() <= 0.02
    files = sorted(p.name for p in cache.rglob("*.xml"))
    again = sdengine.from_diffusers(copy.deepcopy(tiny_pipeline("sd15")).to(torch.bfloat16), backend="openvino")
    assert np.abs(again(PROMPTS, **KWARGS).images - got).max() <= 1e-6  # the same IR and compiled blobs
    assert sorted(p.name for p in cache.rglob("*.xml")) == files  # nothing converted again


def test_a_lora_is_merged_then_the_networks_converted_again(cache, tmp_path):
    eager, fast = _pipes()
    base = fast(PROMPTS, **KWARGS).images
    lora = kohya_lora(tiny_pipeline("sd15"), tmp_path / "lora.safetensors")
    for pipe in (eager, fast):
        pipe.set_loras([(lora, 1.0)])
    got, want = fast(PROMPTS, **KWARGS).images, eager(PROMPTS, **KWARGS).images
    assert np.abs(got - base).max() > 1e-3 and np.abs(got - want).max() <= 1e-4
    assert len(list(cache.iterdir())) == 2  # one IR folder per set of weights
    fast.set_loras([])
    assert np.abs(fast(PROMPTS, **KWARGS).images - base).max() <= 1e-6  # the base weights' IR, read back


def test_without_openvino_the_error_names_the_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_openvino(name, *args, **kwargs):
        if name == "openvino" or name.startswith("openvino."):
            raise ImportError("No module named 'openvino'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_openvino)
    with pytest.raises(RuntimeError, match=r"pip install 'sdengine\[openvino\]'"):
        sdengine.from_diffusers(tiny_pipeline("sd15"), backend="openvino")
