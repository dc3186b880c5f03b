"""Helpers shared by the kernel tests and benchmarks (not used at run time).

- `DEVICE`: "cuda" when there is a GPU, else "cpu" (kernels then run under
  TRITON_INTERPRET=1, which tests/conftest.py sets before triton is imported).
- `fresh_seed()`: a new random seed per call, printed in every failure message, so each
  run draws new inputs and a failing draw can be replayed (SDENGINE_TEST_SEED=<seed>).
- `assert_three_way(...)`: STYLE.md's tolerance rule for fp16/bf16, and a relative bound for fp32.
"""

import os

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def fresh_seed():
    """Seed torch's RNG with a fresh seed (or SDENGINE_TEST_SEED) and return it."""
    seed = int(os.environ.get("SDENGINE_TEST_SEED", 0)) or int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    return seed


def poisoned(shape, dtype, device=DEVICE, memory_format=torch.contiguous_format):
    """An output buffer full of NaN: any element the kernel fails to write stays NaN."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device).contiguous(memory_format=memory_format)


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def assert_three_way(out, ref32, torch_same, atol, rtol32=1e-4, what=""):
    """Check a kernel's output against the fp32 reference.

    fp32 outputs: max|out − ref32| ≤ rtol32 · max(1, max|ref32|) (no TF32 anywhere).
    fp16/bf16 outputs (STYLE.md's three-way rule, on the max norm):
        max|out − ref32| ≤ 2 · max|torch_same − ref32| + atol,
    where torch_same is plain torch computing the same thing in out's dtype.
    Also: no NaN/Inf anywhere (outputs start poisoned with NaN).
    """
    assert torch.isfinite(out.float()).all(), f"{what}: non-finite values (unwritten or overflow)"
    err = max_err(out, ref32)
    if out.dtype == torch.float32:
        bound = rtol32 * max(1.0, ref32.abs().max().item())
        assert err <= bound, f"{what}: fp32 max error {err:.3g} > {bound:.3g}"
    else:
        base = max_err(torch_same, ref32)
        bound = 2 * base + atol
        assert err <= bound, f"{what}: {out.dtype} max error {err:.3g} > 2·{base:.3g} (torch) + {atol:g}"
