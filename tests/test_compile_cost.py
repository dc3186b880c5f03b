"""The triton layer's bounded cold start: the kernel list of a dry run, compiling it up front
for a GPU target without a GPU, and `python -m sdengine.bench.compile_cost`.

Triton compiles for an sm_90 target on the CPU (a compile-only driver stands in for the
GPU's: kernels/precompile.py), so the first-call compile cost is measured here.
"""

import json
import logging
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

import sdengine
from sdengine import kernels
from sdengine.backends.triton import kernel_launches
from sdengine.config import tiny_config
from sdengine.kernels import precompile
from support.tiny import tiny_pipeline

pytestmark = pytest.mark.skipif(not kernels.HAS_TRITON, reason="triton is not installed")

H, W = 16, 24


def _signature(kernel, args, kwargs):
    """What a launch is, whatever the block sizes (the interpreter's differ from the GPU's)."""
    fn = getattr(kernel, "fn", kernel)
    name = getattr(fn, "__name__", None) or fn.fn.__name__
    pointers = tuple(str(a.dtype) for a in args if isinstance(a, torch.Tensor))
    flags = tuple(sorted((k, v) for k, v in kwargs.items() if not k.startswith(("BLOCK", "num_"))
                         and k != "DOT_FP32"))
    return name, pointers, flags


def test_dry_run_lists_exactly_what_a_real_run_launches():
    """The dry run (meta tensors, the GPU's code path) against a real generation of the same
    tiny workload on the CPU through Triton's interpreter, every launch recorded."""
    config = tiny_config("sd15")
    dry = {_signature(*launch) for launch in kernel_launches(config, H, W, batch=2, sampler="dpmpp_2m",
                                                              dtype=torch.float32, steps=2)}
    pipe = sdengine.from_diffusers(tiny_pipeline("sd15"), backend="triton")
    with precompile.record_launches() as launches:
        latents = pipe("", height=H, width=W, batch_size=2, steps=2, sampler="dpmpp_2m", output_type="latent",
                       progress=False).images
        pipe.decode_latents(latents)
    real = {_signature(*launch) for launch in launches}
    assert dry == real
    names = {name for name, _, _ in real}
    assert {"_attention_kernel", "_group_norm_stats_kernel", "_group_norm_apply_kernel", "_layer_norm_kernel",
            "_geglu_kernel", "_dpmpp_2m_kernel"} <= names


def test_dry_run_with_ip_adapters_matches_a_real_run(tmp_path):
    """With two IP-Adapters (a basic one, 4 image tokens, and a Plus one, 16) the dry run launches
    what a real run with them launches, the attentions over the image tokens included; the kernels
    are not specialized on lengths, so they add nothing to compile."""
    from support.ip_adapter_files import write_image_encoder, write_ip_adapter

    write_image_encoder(tmp_path / "image_encoder")
    adapters = [write_ip_adapter(tmp_path / "basic.safetensors", "sd15"),
                write_ip_adapter(tmp_path / "plus.safetensors", "sd15", plus=True, seed=1, tokens=16)]
    pipe = sdengine.from_diffusers(tiny_pipeline("sd15"), backend="triton")
    pipe.load_ip_adapter(adapters, image_encoder=tmp_path / "image_encoder")
    image = Image.new("RGB", (40, 30), (120, 60, 200))
    with precompile.record_launches() as launches:
        latents = pipe("", height=H, width=W, steps=2, sampler="euler", output_type="latent", progress=False,
                       ip_adapter_image=[image, image]).images
        pipe.decode_latents(latents)
    config = tiny_config("sd15")
    dry = kernel_launches(config, H, W, sampler="euler", dtype=torch.float32, steps=2, ip_tokens=(4, 16))
    plain = kernel_launches(config, H, W, sampler="euler", dtype=torch.float32, steps=2)

    def attention_lengths(recorded):  # the key / value lengths of the attention launches, in order
        return [args[2].shape[2] for kernel, args, _ in recorded if _signature(kernel, args, {})[0] == "_attention_kernel"]

    assert Counter(_signature(*launch) for launch in dry) == Counter(_signature(*launch) for launch in launches)
    assert attention_lengths(dry) == attention_lengths(launches)
    assert {4, 16} <= set(attention_lengths(dry)) and not {4, 16} & set(attention_lengths(plain))
    assert set(precompile.kernel_specs(dry)) == set(precompile.kernel_specs(plain))


def test_kernel_specs_expand_autotuned_kernels_and_record_alignment():
    launches = kernel_launches(tiny_config("sd15"), H, W, sampler="euler")
    specs = precompile.kernel_specs(launches)
    attention = [s for s in specs if s.name == "_attention_kernel"]
    assert attention and {dict(s.kwargs)["BLOCK_M"] for s in attention} >= {64, 128}  # both configs
    euler = [s for s in specs if s.name == "_euler_kernel"]
    assert len(euler) == 1
    pointers = [a for a in euler[0].args if isinstance(a, tuple)]
    # the step table's row slices: cfg_scale at byte 8 and sigma at byte 12 are not 16-byte aligned
    assert [p[2] for p in pointers] == [True, True, True, False, False, True]
    assert len(specs) == len(set(specs))


@pytest.mark.slow
def test_compile_cost_meets_its_targets_and_caches(tmp_path):
    """SD1.5 512², batch 1, for sm_90 on this CPU: N ≤ 32 kernels, S ≤ 120 s; a second run in a
    new process compiles nothing."""
    env = {"SDE_CACHE_DIR": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"}
    import os

    env = dict(os.environ, **env)
    env.pop("TRITON_INTERPRET", None)
    env.pop("TRITON_CACHE_DIR", None)
    command = [sys.executable, "-m", "sdengine.bench.compile_cost", "--arch", "sd15", "--height", "512",
               "--width", "512", "--batch", "1", "--target", "sm_90"]
    first = subprocess.run(command + ["--json", str(tmp_path / "cost.json")], env=env, capture_output=True,
                           text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-2000:]
    record = json.loads((tmp_path / "cost.json").read_text())
    assert record["kernels"] <= 32 and record["serial_s"] <= 120, record["summary"]
    assert record["compiled"] == record["kernels"] > 0 and not record["failures"]
    assert first.stdout.strip().splitlines()[-1] == record["summary"]
    assert (tmp_path / "cache" / "triton").is_dir()
    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-2000:]
    assert f"{record['kernels']} kernels (0 compiled)" in second.stdout.strip().splitlines()[-1]


def test_prepare_compiles_up_front_and_falls_back_on_a_compile_failure(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("SDE_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    eager = sdengine.from_diffusers(tiny_pipeline("sd15"))
    fast = sdengine.from_diffusers(tiny_pipeline("sd15"), backend="triton")
    info = fast.backend.prepare(H, W, 1, "euler", target="sm_90", jobs=2)
    assert info["kernels"] >= 8 and info["compiled"] == info["kernels"] and "fallback" not in info
    assert any((tmp_path / "triton").iterdir())
    # once per workload; a new size needs no new kernel (sizes are not specialized), so no pool
    assert fast.backend.prepare(H, W, 1, "euler", target="sm_90")["prepared_before"]
    calls = []
    real_compile = precompile.compile_specs
    monkeypatch.setattr(precompile, "compile_specs", lambda *a, **k: calls.append(a) or real_compile(*a, **k))
    again = fast.backend.prepare(2 * H, 2 * W, 1, "euler", target="sm_90")
    assert again["compiled"] == 0 and not calls and again["kernels"] > 0
    monkeypatch.setattr(precompile, "compile_specs", real_compile)
    # A kernel that fails to compile: named with the workload, then the graph layer's ops.
    real = precompile.compile_specs

    def one_fails(specs, target, jobs=None):
        report = real(specs, target, jobs)
        report.kernels[0] = {"label": report.kernels[0]["label"], "error": "PTXASError: ptxas fatal"}
        return report

    monkeypatch.setattr(precompile, "compile_specs", one_fails)
    with caplog.at_level(logging.WARNING, logger="sdengine"):
        info = fast.backend.prepare(H, W, 1, "dpmpp_2m", target="sm_90", jobs=2)  # a new kernel: the pool
    message = " ".join(r.getMessage() for r in caplog.records)
    assert "failed to compile for 24x16, batch 1, dpmpp_2m" in message and "PTXASError" in message
    assert "falling back to the graph layer" in message and info["fallback"] == fast.backend.fallback
    kwargs = dict(height=H, width=W, steps=2, seed=3, sampler="euler", output_type="np", progress=False)
    with precompile.record_launches() as launches:
        got = fast("a fox", **kwargs).images
    assert not launches  # no Triton kernel runs any more
    assert np.abs(got - eager("a fox", **kwargs).images).max() <= 1 / 255


def test_the_pipeline_asks_the_backend_to_prepare_each_request(monkeypatch):
    pipe = sdengine.from_diffusers(tiny_pipeline("sd15"), backend="graph")
    asked = []
    monkeypatch.setattr(pipe.backend, "prepare", lambda *args, **kwargs: asked.append((args, kwargs)) or {})
    pipe(["a", "b"], height=H, width=W, steps=2, sampler="DPM++ 2M Karras", output_type="latent", progress=False)
    assert asked == [((H, W, 2, "dpmpp_2m", "karras"), {"ip_tokens": ()})]
    asked.clear()  # a hires fix: its second pass's size too, before any work
    pipe("a", height=H, width=W, steps=2, sampler="euler", hires=sdengine.Hires(scale=2.0, steps=1),
         output_type="latent", progress=False)
    assert [args[:4] for args, _ in asked] == [(H, W, 1, "euler"), (2 * H, 2 * W, 1, "euler")]


def test_pipeline_prepare_runs_the_workload_once():
    pipe = sdengine.from_diffusers(tiny_pipeline("sd15-inpaint"), backend="graph")
    from support.graph_stand_in import use_stand_in

    graphs = use_stand_in(pipe.backend)
    info = pipe.prepare(H, W, batch_size=1, sampler="euler")
    assert set(info) >= {"compile_s", "warmup_s"}
    captured = graphs.captures
    assert captured >= 3  # the step, the text encoder, the VAE decoder
    g = torch.Generator().manual_seed(0)
    mask = np.zeros((H, W), dtype=np.float32)
    mask[2:8, 2:8] = 1
    pipe("a boat", height=H, width=W, steps=4, sampler="euler", init_image=torch.rand(H, W, 3, generator=g).numpy(),
         mask_image=mask, output_type="np", progress=False)
    assert graphs.captures == captured  # the request replayed what prepare captured
