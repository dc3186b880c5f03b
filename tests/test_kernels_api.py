"""sdengine.kernels' public surface: dispatch, reference mode, torch.library registration,
torch.export / torch.compile on CPU, and importing without triton."""

import os
import subprocess
import sys

import pytest
import torch

import sdengine.kernels as K
from sdengine.kernels.testing import DEVICE, fresh_seed

OP_NAMES = ["attention", "group_norm", "layer_norm", "geglu", "decode_to_uint8", "sampler_step_euler",
            "sampler_step_euler_a", "sampler_step_ddim", "sampler_step_dpmpp_2m", "sampler_step_lcm"]


def test_flags_and_registration():
    assert K.HAS_TRITON
    assert K.OPS_REGISTERED
    for name in OP_NAMES:
        assert hasattr(torch.ops.sdengine, name), name


def test_cpu_dispatch_is_the_reference_and_reference_mode_toggles():
    fresh_seed()
    x = torch.randn(2, 64, 5, 3)
    w, b = torch.randn(64), torch.randn(64)
    assert not K.uses_triton(x)  # CPU tensors always take the reference
    assert torch.equal(K.group_norm(x, 32, w, b, silu=True), K.group_norm_ref(x, 32, w, b, silu=True))
    assert not K.reference_mode()
    with K.use_reference():
        assert K.reference_mode()
        assert not K.uses_triton(x.to(DEVICE))
    assert not K.reference_mode()
    K.use_reference(True)
    try:
        assert K.reference_mode()
    finally:
        K.use_reference(False)
    assert not K.reference_mode()


def test_public_ops_match_references_on_this_device():
    """Through the dispatcher (Triton on CUDA, the reference on CPU)."""
    fresh_seed()
    q = torch.randn(1, 2, 77, 40, device=DEVICE)
    torch.testing.assert_close(K.attention(q, q, q), K.attention_ref(q, q, q), rtol=1e-4, atol=1e-4)
    h = torch.randn(2, 7, 64, device=DEVICE)
    torch.testing.assert_close(K.geglu(h), K.geglu_ref(h), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(K.layer_norm(h, None, None), K.layer_norm_ref(h, None, None), rtol=1e-4, atol=1e-4)
    img = torch.randn(1, 3, 8, 8, device=DEVICE)
    assert torch.equal(K.decode_to_uint8(img), K.decode_to_uint8_ref(img))
    x, m, noise = torch.randn(1, 4, 8, 8, device=DEVICE), torch.randn(2, 4, 8, 8, device=DEVICE), torch.randn(
        1, 4, 8, 8, device=DEVICE)
    ss = K.sampler_step
    pairs = [
        (K.sampler_step_euler(m, x, 7.5, 2.0, 1.0), ss.euler_ref(m, x, 7.5, 2.0, 1.0)),
        (K.sampler_step_euler_a(m, x, noise, 7.5, 2.0, 1.0), ss.euler_a_ref(m, x, noise, 7.5, 2.0, 1.0)),
        (K.sampler_step_ddim(m, x, 7.5, 0.3, 0.5, 0.5, noise), ss.ddim_ref(m, x, 7.5, 0.3, 0.5, 0.5, noise)),
        (K.sampler_step_dpmpp_2m(m, x, noise, 7.5, 2.0, 1.0, 3.0)[0],
         ss.dpmpp_2m_ref(m, x, noise, 7.5, 2.0, 1.0, 3.0)[0]),
        (K.sampler_step_lcm(m, x, noise, 7.5, 0.3, 0.5, 0.1, 0.9), ss.lcm_ref(m, x, noise, 7.5, 0.3, 0.5, 0.1, 0.9)),
    ]
    for got, want in pairs:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


class _Block(torch.nn.Module):
    """GroupNorm+SiLU, attention and a guided Euler step, as the UNet and the loop use them."""

    def forward(self, x, weight, bias, q, model_out, sigma, sigma_next):
        h = K.group_norm(x, 32, weight, bias, silu=True)
        a = torch.ops.sdengine.attention(q, q, q, None)
        step = K.sampler_step_euler(model_out, h, 7.5, sigma, sigma_next)
        return step, a


def _block_inputs():
    fresh_seed()
    return (torch.randn(1, 64, 4, 4), torch.randn(64), torch.randn(64), torch.randn(1, 2, 16, 40),
            torch.randn(2, 64, 4, 4), torch.tensor(2.0), torch.tensor(1.0))


def test_export_on_cpu_uses_the_reference_path():
    args = _block_inputs()
    ep = torch.export.export(_Block(), args)
    assert "sdengine.attention" in ep.graph_module.code  # the op stays an op in the graph
    for got, want in zip(ep.module()(*args), _Block()(*args)):
        torch.testing.assert_close(got, want)


def test_compile_on_cpu_traces_the_reference():
    args = _block_inputs()
    compiled = torch.compile(_Block(), backend="aot_eager", fullgraph=True)
    for got, want in zip(compiled(*args), _Block()(*args)):
        torch.testing.assert_close(got, want)


def test_import_without_triton_falls_back_to_references():
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'triton' or name.startswith('triton.'):\n"
        "            raise ImportError('blocked for the test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import torch, sdengine.kernels as K\n"
        "assert not K.HAS_TRITON and not K.OPS_REGISTERED\n"
        "x = torch.randn(1, 64, 3, 5)\n"
        "assert torch.equal(K.group_norm(x, 32, None, None, silu=True), K.group_norm_ref(x, 32, None, None, silu=True))\n"
        "from sdengine.kernels.attention import attention\n"
        "try:\n"
        "    attention(x[:, :4], x[:, :4], x[:, :4])\n"
        "except RuntimeError as e:\n"
        "    assert 'triton is not installed' in str(e)\n"
        "else:\n"
        "    raise SystemExit('expected an error')\n"
        "print('ok')\n"
    )
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


@pytest.mark.gpu
def test_compile_sees_the_triton_kernel_on_cuda():
    """torch.compile (Inductor) of a function calling the triton_op: same result as eager."""
    fresh_seed()
    q = torch.randn(2, 8, 4096, 40, device="cuda", dtype=torch.float16)
    k = torch.randn(2, 8, 77, 40, device="cuda", dtype=torch.float16)
    fn = torch.compile(lambda q, k: torch.ops.sdengine.attention(q, k, k, None), fullgraph=True)
    torch.testing.assert_close(fn(q, k), K.attention(q, k, k), rtol=2e-3, atol=2e-3)
    x = torch.randn(2, 320, 64, 64, device="cuda", dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    gn = torch.compile(lambda x: torch.ops.sdengine.group_norm(x, 32, None, None, 1e-5, True, None), fullgraph=True)
    torch.testing.assert_close(gn(x), K.group_norm(x, 32, None, None, silu=True), rtol=2e-3, atol=2e-3)


def test_bench_smoke_writes_a_record(tmp_path):
    """`python -m sdengine.kernels.bench --json` runs (tiny shapes on CPU) and records raw samples."""
    import json

    path = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "sdengine.kernels.bench", "--json", str(path), "--only", "euler_sd15,decode",
           "--iters", "2"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads(path.read_text())
    assert {r["name"] for r in record["results"]} == {"euler_sd15", "decode_to_uint8"}
    for r in record["results"]:
        assert len(r["ours_ms"]) == 2 and len(r["torch_ms"]) == 2 and r["ours_median_ms"] > 0
    assert record["torch"] == torch.__version__ and "sdengine.kernels.bench" in record["command"]
    assert record["peaks"]["copy_gbps"] > 0 and "% peak" in result.stdout


def test_autotune_caches_winners_on_disk_where_triton_can(monkeypatch):
    """The autotuned kernels ask Triton to keep the winning configs on disk (cache_results),
    so that a new process does not benchmark and compile every config again."""
    from sdengine.kernels import _triton

    if not _triton.HAS_TRITON:
        pytest.skip("triton is not installed")
    seen = []

    def recording_autotune(configs, key, cache_results=False):
        seen.append((key, cache_results))
        return lambda fn: fn

    monkeypatch.setattr(_triton.triton, "autotune", recording_autotune)
    _triton.autotune(["config"], key=["N"])
    assert seen == [(["N"], True)]

    def old_autotune(configs, key):  # a Triton without cache_results still works
        seen.append((key, None))
        return lambda fn: fn

    monkeypatch.setattr(_triton.triton, "autotune", old_autotune)
    _triton.autotune(["config"], key=["M"])
    assert seen[-1] == (["M"], None)
