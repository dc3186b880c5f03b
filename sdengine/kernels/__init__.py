"""sdengine's Triton kernels, each with a plain-torch reference of the same signature.

Public ops (dispatching):
    attention(q, k, v, scale=None)
    group_norm(x, num_groups, weight, bias, eps=1e-5, silu=False, residual=None)
    layer_norm(x, weight, bias, eps=1e-5)
    geglu(h)
    decode_to_uint8(x)
    sampler_step_euler / sampler_step_euler_a / sampler_step_ddim / sampler_step_dpmpp_2m /
        sampler_step_lcm  (CFG fused with one sampler update; scalars and formulas in
        kernels/sampler_step.py's docstring)
and their references: `<op>_ref` (plain torch, fp32 math), e.g. `attention_ref`; the sampler
steps' are in their module, `sampler_step.euler_ref`.

Which path runs, one rule for every op (kernels/ops.py, the one dispatcher, decides it:
`uses_triton(t)`; it also holds the registrations, the ops the model layers call on the triton
layer, and the in-place update of a graphed whole step, `ops.sampler_update`):
- CUDA tensor, triton installed, not in reference mode: the Triton kernel, through the
  registered operator `torch.ops.sdengine.<op>` (a `torch.library.triton_op`, so
  torch.compile / torch.export / AOTInductor see the kernel).
- Otherwise the reference: CPU tensors (the interpreter is for tests, not for work; it is
  also what lets torch.compile and torch.export trace these ops on CPU), triton missing
  (`HAS_TRITON` is False), or reference mode.
- Reference mode: `use_reference()` switches it on for the process, `with use_reference():`
  for a block, `use_reference(False)` switches it off; the environment variable
  `SDENGINE_KERNELS=reference` switches it on at import. Export on CPU needs nothing: CPU
  tensors already take the reference path.
- To run a Triton kernel directly (e.g. under TRITON_INTERPRET=1 on CPU), call the wrapper
  in its module: `from sdengine.kernels.attention import attention` (the package attributes
  `attention`, `group_norm`, `layer_norm`, `geglu` are the dispatching functions), or
  `sdengine.kernels.sampler_step.euler_triton` (`sdengine.kernels.sampler_step` is the module
  of the sampler-step kernels: `euler_triton` is the wrapper, `euler_ref` the reference).
- On CUDA the first call at a new shape autotunes (attention, group_norm's apply, geglu):
  make it before capturing a CUDA graph. Triton keeps the winners on disk (its cache dir,
  `cache_results`), so later processes on the machine compile only the winning config.
"""

from pathlib import Path as _Path

# This package's modules live in the repo's top-level kernels/ folder, which has no
# __init__.py: run from the repo root, a `kernels` package there would hide an installed
# distribution of that name (PyPI's `kernels`, which transformers imports). In a checkout
# (an editable install, or the repo root on sys.path) __path__ reaches that folder; a wheel
# carries the modules here, beside this file (setup.py's BuildPy).
_FOLDER = _Path(__file__).resolve().parents[2] / "kernels"
if (_FOLDER / "ops.py").is_file():
    __path__.append(str(_FOLDER))

from . import ops, precompile, sampler_step  # noqa: F401 (sampler_step: the module of the sampler-step kernels)
from ._triton import HAS_TRITON, INTERPRET
from .attention import attention_ref
from .decode import decode_to_uint8_ref
from .geglu import geglu_ref
from .group_norm import group_norm_ref
from .layer_norm import layer_norm_ref
from .ops import (attention, decode_to_uint8, geglu, group_norm, layer_norm, reference_mode, sampler_step_ddim,
                  sampler_step_dpmpp_2m, sampler_step_euler, sampler_step_euler_a, sampler_step_lcm, use_reference,
                  uses_triton)

OPS_REGISTERED = ops.REGISTERED

__all__ = [
    "HAS_TRITON", "INTERPRET", "OPS_REGISTERED", "use_reference", "reference_mode", "uses_triton",
    "attention", "attention_ref", "group_norm", "group_norm_ref", "layer_norm", "layer_norm_ref",
    "geglu", "geglu_ref", "decode_to_uint8", "decode_to_uint8_ref", "sampler_step",
    "sampler_step_euler", "sampler_step_euler_a", "sampler_step_ddim", "sampler_step_dpmpp_2m", "sampler_step_lcm",
]
