"""The one dispatcher of sdengine's kernels: which implementation of an op runs, and the ops as
`torch.ops.sdengine.*` operators for torch.compile, torch.export and AOTInductor.

Which path runs (sdengine/kernels/__init__.py's docstring says it for users):
- the public ops (`attention`, `group_norm`, `layer_norm`, `geglu`, `decode_to_uint8`, and
  `sampler_step.<name>`, whose dispatchers live beside their wrappers in kernels/sampler_step.py):
  on a CUDA tensor with triton installed and reference mode off (`uses_triton`, kept with the
  reference mode in kernels/_triton.py and re-exported here), the registered operator, whose
  body calls the Triton wrapper of kernels/<op>.py; otherwise the plain-torch reference `<op>_ref`;
- the ops that model layers call on the triton layer (`layer_op(name)`, installed by
  sdengine.models.layers.triton_ops()): the public op, except under Triton's interpreter (CPU
  tests) and while launches are recorded on meta tensors (a shape-only dry run,
  kernels/precompile.py), where the Triton wrapper itself runs.

Each registered op is a `torch.library.triton_op`: its body calls the Triton wrapper, whose
launches go through `torch.library.wrap_triton` while compile/export trace it. torch.compile
therefore sees the Triton kernels themselves, and AOTInductor compiles them into its package,
so the native runtime runs them without Python. On a CPU tensor the body returns the
plain-torch reference instead. That is deliberate: under TRITON_INTERPRET=1 a triton_op runs
eagerly but cannot be compiled or exported (Inductor cannot lower an interpreted kernel), and
the interpreter is far too slow for real work anyway. So on CPU `torch.compile` traces the
reference's torch ops and `torch.export` records the op with the reference as its CPU
implementation. Registered only when triton is installed and torch has
`torch.library.triton_op` (2.6+): `REGISTERED` says whether it happened.
"""

import functools
from typing import Optional

import torch
from torch import Tensor

from . import _triton
from . import sampler_step as _sampler_step
from ._triton import CAN_REGISTER, INTERPRET, reference_mode, use_reference, uses_triton  # noqa: F401 (re-exported)
from .attention import attention as attention_triton
from .attention import attention_ref
from .decode import decode_to_uint8 as decode_to_uint8_triton
from .decode import decode_to_uint8_ref
from .geglu import geglu as geglu_triton
from .geglu import geglu_ref
from .group_norm import group_norm as group_norm_triton
from .group_norm import group_norm_ref
from .layer_norm import layer_norm as layer_norm_triton
from .layer_norm import layer_norm_ref

# ---------------------------------------------------------------------------
# The registered operators
# ---------------------------------------------------------------------------

REGISTERED = False

if CAN_REGISTER:
    try:
        torch.ops.sdengine.attention  # noqa: B018  (already registered by an earlier import)
        REGISTERED = True
    except (AttributeError, RuntimeError):
        pass

if CAN_REGISTER and not REGISTERED:
    triton_op = torch.library.triton_op

    @triton_op("sdengine::attention", mutates_args=())
    def _attention_op(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float] = None) -> Tensor:
        if not q.is_cuda:
            return attention_ref(q, k, v, scale)
        return attention_triton(q, k, v, scale)

    @triton_op("sdengine::group_norm", mutates_args=())
    def _group_norm_op(x: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor],
                       eps: float = 1e-5, silu: bool = False, residual: Optional[Tensor] = None) -> Tensor:
        if not x.is_cuda:
            return group_norm_ref(x, num_groups, weight, bias, eps, silu, residual)
        return group_norm_triton(x, num_groups, weight, bias, eps, silu, residual)

    @triton_op("sdengine::layer_norm", mutates_args=())
    def _layer_norm_op(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float = 1e-5) -> Tensor:
        if not x.is_cuda:
            return layer_norm_ref(x, weight, bias, eps)
        return layer_norm_triton(x, weight, bias, eps)

    @triton_op("sdengine::geglu", mutates_args=())
    def _geglu_op(h: Tensor) -> Tensor:
        if not h.is_cuda:
            return geglu_ref(h)
        return geglu_triton(h)

    @triton_op("sdengine::decode_to_uint8", mutates_args=())
    def _decode_to_uint8_op(x: Tensor) -> Tensor:
        if not x.is_cuda:
            return decode_to_uint8_ref(x)
        return decode_to_uint8_triton(x)

    @triton_op("sdengine::sampler_step_euler", mutates_args=())
    def _euler_op(model_out: Tensor, x: Tensor, cfg_scale: Tensor, sigma: Tensor, sigma_next: Tensor,
                  prediction_type: str = "epsilon") -> Tensor:
        if not x.is_cuda:
            return _sampler_step.euler_ref(model_out, x, cfg_scale, sigma, sigma_next, prediction_type)
        return _sampler_step.euler_triton(model_out, x, cfg_scale, sigma, sigma_next, prediction_type)

    @triton_op("sdengine::sampler_step_euler_a", mutates_args=())
    def _euler_a_op(model_out: Tensor, x: Tensor, noise: Tensor, cfg_scale: Tensor, sigma: Tensor,
                    sigma_next: Tensor, eta: Tensor, prediction_type: str = "epsilon") -> Tensor:
        if not x.is_cuda:
            return _sampler_step.euler_a_ref(model_out, x, noise, cfg_scale, sigma, sigma_next, eta, prediction_type)
        return _sampler_step.euler_a_triton(model_out, x, noise, cfg_scale, sigma, sigma_next, eta, prediction_type)

    @triton_op("sdengine::sampler_step_ddim", mutates_args=())
    def _ddim_op(model_out: Tensor, x: Tensor, cfg_scale: Tensor, alpha_t: Tensor, alpha_prev: Tensor,
                 eta: Tensor, noise: Optional[Tensor] = None, prediction_type: str = "epsilon") -> Tensor:
        if not x.is_cuda:
            return _sampler_step.ddim_ref(model_out, x, cfg_scale, alpha_t, alpha_prev, eta, noise, prediction_type)
        return _sampler_step.ddim_triton(model_out, x, cfg_scale, alpha_t, alpha_prev, eta, noise, prediction_type)

    @triton_op("sdengine::sampler_step_dpmpp_2m", mutates_args=())
    def _dpmpp_2m_op(model_out: Tensor, x: Tensor, old_denoised: Optional[Tensor], cfg_scale: Tensor,
                     sigma: Tensor, sigma_next: Tensor, sigma_prev: Tensor,
                     prediction_type: str = "epsilon") -> tuple[Tensor, Tensor]:
        if not x.is_cuda:
            return _sampler_step.dpmpp_2m_ref(model_out, x, old_denoised, cfg_scale, sigma, sigma_next, sigma_prev,
                                              prediction_type)
        return _sampler_step.dpmpp_2m_triton(model_out, x, old_denoised, cfg_scale, sigma, sigma_next, sigma_prev,
                                             prediction_type)

    @triton_op("sdengine::sampler_step_lcm", mutates_args=())
    def _lcm_op(model_out: Tensor, x: Tensor, noise: Optional[Tensor], cfg_scale: Tensor, alpha_t: Tensor,
                alpha_prev: Tensor, c_skip: Tensor, c_out: Tensor, prediction_type: str = "epsilon") -> Tensor:
        if not x.is_cuda:
            return _sampler_step.lcm_ref(model_out, x, noise, cfg_scale, alpha_t, alpha_prev, c_skip, c_out,
                                         prediction_type)
        return _sampler_step.lcm_triton(model_out, x, noise, cfg_scale, alpha_t, alpha_prev, c_skip, c_out,
                                        prediction_type)

    REGISTERED = True


# ---------------------------------------------------------------------------
# The public ops (sdengine.kernels.<op>)
# ---------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------
# The ops of the model layers on the triton layer (sdengine.models.layers.triton_ops)
# ---------------------------------------------------------------------------

_PUBLIC = {"attention": attention, "group_norm": group_norm, "layer_norm": layer_norm, "geglu": geglu}
_WRAPPERS = {"attention": attention_triton, "group_norm": group_norm_triton, "layer_norm": layer_norm_triton,
             "geglu": geglu_triton}


@functools.lru_cache(maxsize=None)
def layer_op(name: str):
    """The function a model layer calls for kernel op `name` (the public op's signature): the public
    op; the Triton wrapper itself under TRITON_INTERPRET=1 (CPU tests: the public op sends CPU
    tensors to the reference and would prove nothing) and while launches are recorded (a dry run)."""
    public, wrapper = _PUBLIC[name], _WRAPPERS[name]

    def op(*args, **kwargs):
        return (wrapper if INTERPRET or _triton._recording is not None else public)(*args, **kwargs)

    op.__name__ = op.__qualname__ = f"triton_{name}"
    op.__doc__ = f"kernels.{name} for model layers (kernels/ops.py layer_op)."
    return op
