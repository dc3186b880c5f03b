"""sdengine's Triton kernels, each with a plain-torch reference of the same signature.

Public ops (dispatching):
    attention(q, k, v, scale=None)
    group_norm(x, num_groups, weight, bias, eps=1e-5, silu=False, residual=None)
    layer_norm(x, weight, bias, eps=1e-5)
    geglu(h)
    decode_to_uint8(x)
    sampler_step.euler / euler_a / ddim / dpmpp_2m / lcm  (CFG fused with the update;
        scalars and formulas in kernels/sampler_step.py's docstring)
and their references `<op>_ref` (plain torch, fp32 math), e.g. `attention_ref`,
`sampler_step.euler_ref`.

Which path runs:
- CUDA tensor, triton installed, not in reference mode: the Triton kernel, through the
  registered operator `torch.ops.sdengine.<op>` (a `torch.library.triton_op`, so
  torch.compile / torch.export / AOTInductor see the kernel; see kernels/ops.py).
- Otherwise the reference: CPU tensors (the interpreter is for tests, not for work; it is
  also what lets torch.compile and torch.export trace these ops on CPU), triton missing
  (`HAS_TRITON` is False), or reference mode.
- Reference mode: `use_reference()` switches it on for the process, `with use_reference():`
  for a block, `use_reference(False)` switches it off; the environment variable
  `SDENGINE_KERNELS=reference` switches it on at import. Export on CPU needs nothing: CPU
  tensors already take the reference path.
- To run a Triton kernel directly (e.g. under TRITON_INTERPRET=1 on CPU), call the wrapper
  in its module: `from sdengine.kernels.attention import attention`. The package attributes
  `attention`, `group_norm`, ..., `sampler_step` are the dispatching functions / namespace, so
  `import sdengine.kernels.sampler_step as m` gives the namespace; for the module itself use
  `importlib.import_module("sdengine.kernels.sampler_step")` or `from ... import name`.
- On CUDA the first call at a new shape autotunes (attention, group_norm's apply, geglu):
  make it before capturing a CUDA graph. Triton keeps the winners on disk (its cache dir,
  `cache_results`), so later processes on the machine compile only the winning config.
"""

import contextlib
import os
import types

import torch

from . import ops, precompile
from ._triton import HAS_TRITON, INTERPRET
from .attention import attention_ref
from .decode import decode_to_uint8_ref
from .geglu import geglu_ref
from .group_norm import group_norm_ref
from .layer_norm import layer_norm_ref
from . import sampler_step as _sampler_step_module

OPS_REGISTERED = ops.REGISTERED
_reference_mode = os.environ.get("SDENGINE_KERNELS", "").lower() in ("ref", "reference")


class _ReferenceMode(contextlib.AbstractContextManager):
    def __init__(self, previous):
        self.previous = previous

    def __exit__(self, *exc):
        global _reference_mode
        _reference_mode = self.previous
        return False


def use_reference(enabled=True):
    """Make the public ops run their plain-torch references (enabled=True) or not.

    Takes effect at once; used as `with use_reference(): ...` the previous mode comes back
    at the end of the block."""
    global _reference_mode
    previous, _reference_mode = _reference_mode, bool(enabled)
    return _ReferenceMode(previous)


def reference_mode():
    """Whether reference mode is on (see use_reference)."""
    return _reference_mode


def uses_triton(t):
    """Whether a public op called on tensor `t` runs its Triton kernel."""
    return OPS_REGISTERED and not _reference_mode and t.is_cuda


def attention(q, k, v, scale=None):
    """softmax(q·kᵀ·scale)·v; q (B, H, Nq, D), k, v (B, H, Nk, D). See kernels/attention.py."""
    if uses_triton(q):
        return torch.ops.sdengine.attention(q, k, v, scale)
    return attention_ref(q, k, v, scale)


def group_norm(x, num_groups, weight, bias, eps=1e-5, silu=False, residual=None):
    """silu?(GroupNorm(x)·weight + bias) + residual on NCHW / channels_last x. See kernels/group_norm.py."""
    if uses_triton(x):
        return torch.ops.sdengine.group_norm(x, num_groups, weight, bias, eps, silu, residual)
    return group_norm_ref(x, num_groups, weight, bias, eps, silu, residual)


def layer_norm(x, weight, bias, eps=1e-5):
    """LayerNorm over the last dim with fp32 statistics. See kernels/layer_norm.py."""
    if uses_triton(x):
        return torch.ops.sdengine.layer_norm(x, weight, bias, eps)
    return layer_norm_ref(x, weight, bias, eps)


def geglu(h):
    """a · gelu(gate) for h = [a, gate] on the last dim (diffusers GEGLU). See kernels/geglu.py."""
    if uses_triton(h):
        return torch.ops.sdengine.geglu(h)
    return geglu_ref(h)


def decode_to_uint8(x):
    """VAE output in [-1, 1] (N, C, H, W) → uint8 (N, H, W, C), as diffusers rounds. See kernels/decode.py."""
    if uses_triton(x):
        return torch.ops.sdengine.decode_to_uint8(x)
    return decode_to_uint8_ref(x)


def _tensor(v, x):
    return _sampler_step_module._scalar("scalar", v, x.device)


def _euler(model_out, x, cfg_scale, sigma, sigma_next, prediction_type="epsilon"):
    if uses_triton(x):
        return torch.ops.sdengine.sampler_step_euler(model_out, x, _tensor(cfg_scale, x), _tensor(sigma, x),
                                                     _tensor(sigma_next, x), prediction_type)
    return _sampler_step_module.euler_ref(model_out, x, cfg_scale, sigma, sigma_next, prediction_type)


def _euler_a(model_out, x, noise, cfg_scale, sigma, sigma_next, eta=1.0, prediction_type="epsilon"):
    if uses_triton(x):
        return torch.ops.sdengine.sampler_step_euler_a(model_out, x, noise, _tensor(cfg_scale, x), _tensor(sigma, x),
                                                       _tensor(sigma_next, x), _tensor(eta, x), prediction_type)
    return _sampler_step_module.euler_a_ref(model_out, x, noise, cfg_scale, sigma, sigma_next, eta, prediction_type)


def _ddim(model_out, x, cfg_scale, alpha_t, alpha_prev, eta=0.0, noise=None, prediction_type="epsilon"):
    if noise is None and not isinstance(eta, torch.Tensor) and eta > 0:
        raise ValueError(f"sampler_step.ddim: eta={eta} > 0 needs noise (diffusers' variance_noise)")
    if uses_triton(x):
        return torch.ops.sdengine.sampler_step_ddim(model_out, x, _tensor(cfg_scale, x), _tensor(alpha_t, x),
                                                    _tensor(alpha_prev, x), _tensor(eta, x), noise, prediction_type)
    return _sampler_step_module.ddim_ref(model_out, x, cfg_scale, alpha_t, alpha_prev, eta, noise, prediction_type)


def _dpmpp_2m(model_out, x, old_denoised, cfg_scale, sigma, sigma_next, sigma_prev, prediction_type="epsilon"):
    if uses_triton(x):
        return torch.ops.sdengine.sampler_step_dpmpp_2m(model_out, x, old_denoised, _tensor(cfg_scale, x),
                                                        _tensor(sigma, x), _tensor(sigma_next, x),
                                                        _tensor(sigma_prev, x), prediction_type)
    return _sampler_step_module.dpmpp_2m_ref(model_out, x, old_denoised, cfg_scale, sigma, sigma_next, sigma_prev,
                                             prediction_type)


def _lcm(model_out, x, noise, cfg_scale, alpha_t, alpha_prev, c_skip, c_out, prediction_type="epsilon"):
    if uses_triton(x):
        return torch.ops.sdengine.sampler_step_lcm(model_out, x, noise, _tensor(cfg_scale, x), _tensor(alpha_t, x),
                                                   _tensor(alpha_prev, x), _tensor(c_skip, x), _tensor(c_out, x),
                                                   prediction_type)
    return _sampler_step_module.lcm_ref(model_out, x, noise, cfg_scale, alpha_t, alpha_prev, c_skip, c_out,
                                        prediction_type)


# `sdengine.kernels.sampler_step.<name>` dispatches like the ops above; the module itself
# (Triton wrappers, docs) stays importable as `from sdengine.kernels.sampler_step import ...`.
sampler_step = types.SimpleNamespace(
    euler=_euler, euler_a=_euler_a, ddim=_ddim, dpmpp_2m=_dpmpp_2m, lcm=_lcm,
    euler_ref=_sampler_step_module.euler_ref, euler_a_ref=_sampler_step_module.euler_a_ref,
    ddim_ref=_sampler_step_module.ddim_ref, dpmpp_2m_ref=_sampler_step_module.dpmpp_2m_ref,
    lcm_ref=_sampler_step_module.lcm_ref, lcm_scalings=_sampler_step_module.lcm_scalings,
    PREDICTION_TYPES=_sampler_step_module.PREDICTION_TYPES,
    __doc__=_sampler_step_module.__doc__,
)

__all__ = [
    "HAS_TRITON", "INTERPRET", "OPS_REGISTERED", "use_reference", "reference_mode", "uses_triton",
    "attention", "attention_ref", "group_norm", "group_norm_ref", "layer_norm", "layer_norm_ref",
    "geglu", "geglu_ref", "decode_to_uint8", "decode_to_uint8_ref", "sampler_step",
]
