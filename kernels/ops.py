"""The one dispatcher of sdengine's kernels: which implementation of an op runs, and the ops as
`torch.ops.sdengine.*` operators for torch.compile, torch.export and AOTInductor.

The rule (`uses_triton(t)`; sdengine/kernels/__init__.py's docstring says it for users): an op
called on a CUDA tensor, with triton installed and reference mode off, runs its Triton kernel;
everything else runs the plain-torch reference `<op>_ref`. Every path below applies it:
- the public ops, `attention`, `group_norm`, `layer_norm`, `geglu`, `decode_to_uint8` and the
  sampler steps `sampler_step_<name>` (CFG fused with one sampler update, kernels/sampler_step.py):
  the registered operator where the rule says kernel, else the reference;
- the registered operators' bodies: the Triton wrapper of kernels/<op>.py where the rule says
  kernel (CUDA), else the reference (CPU: what torch.compile and torch.export trace there);
- the ops that model layers call on the triton layer (`layer_op(name)`, installed by
  sdengine.models.layers.triton_ops()): the public op; and the guidance + sampler update of a
  whole step on static buffers (`sampler_update`, backends/cuda_graphs.py's DeviceStep), when its
  backend asks for the kernel: the Triton wrapper itself, writing in place into the step's
  buffers. Both also launch the wrapper itself under Triton's interpreter (CPU tests) and while
  launches are recorded on meta tensors (a shape-only dry run, kernels/precompile.py):
  `launches_directly()`.
The wrappers' own `check_launch` (kernels/_triton.py) decides nothing: it only refuses, with the
fix in its message, a wrapper called directly where no kernel can launch.

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
from ._triton import CAN_REGISTER, INTERPRET, reference_mode, use_reference  # noqa: F401 (re-exported)
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
# The rule
# ---------------------------------------------------------------------------

def uses_triton(t) -> bool:
    """Whether an op called on tensor `t` runs its Triton kernel: CUDA, triton installed (and the
    ops registered), reference mode off. Otherwise it runs its plain-torch reference."""
    return CAN_REGISTER and not reference_mode() and t.is_cuda


def launches_directly() -> bool:
    """Whether the engine's ops (`layer_op`, `sampler_update` with kernel=True) launch the Triton
    wrapper itself whatever the tensor: under TRITON_INTERPRET=1 (the CPU tests: the public op sends
    CPU tensors to the reference and would prove nothing) and while launches are recorded (a dry run
    on meta tensors, kernels/precompile.py)."""
    return INTERPRET or _triton._recording is not None


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
        if not uses_triton(q):
            return attention_ref(q, k, v, scale)
        return attention_triton(q, k, v, scale)

    @triton_op("sdengine::group_norm", mutates_args=())
    def _group_norm_op(x: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor],
                       eps: float = 1e-5, silu: bool = False, residual: Optional[Tensor] = None) -> Tensor:
        if not uses_triton(x):
            return group_norm_ref(x, num_groups, weight, bias, eps, silu, residual)
        return group_norm_triton(x, num_groups, weight, bias, eps, silu, residual)

    @triton_op("sdengine::layer_norm", mutates_args=())
    def _layer_norm_op(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float = 1e-5) -> Tensor:
        if not uses_triton(x):
            return layer_norm_ref(x, weight, bias, eps)
        return layer_norm_triton(x, weight, bias, eps)

    @triton_op("sdengine::geglu", mutates_args=())
    def _geglu_op(h: Tensor) -> Tensor:
        if not uses_triton(h):
            return geglu_ref(h)
        return geglu_triton(h)

    @triton_op("sdengine::decode_to_uint8", mutates_args=())
    def _decode_to_uint8_op(x: Tensor) -> Tensor:
        if not uses_triton(x):
            return decode_to_uint8_ref(x)
        return decode_to_uint8_triton(x)

    @triton_op("sdengine::sampler_step_euler", mutates_args=())
    def _euler_op(model_out: Tensor, x: Tensor, cfg_scale: Tensor, sigma: Tensor, sigma_next: Tensor,
                  prediction_type: str = "epsilon") -> Tensor:
        if not uses_triton(x):
            return _sampler_step.euler_ref(model_out, x, cfg_scale, sigma, sigma_next, prediction_type)
        return _sampler_step.euler_triton(model_out, x, cfg_scale, sigma, sigma_next, prediction_type)

    @triton_op("sdengine::sampler_step_euler_a", mutates_args=())
    def _euler_a_op(model_out: Tensor, x: Tensor, noise: Tensor, cfg_scale: Tensor, sigma: Tensor,
                    sigma_next: Tensor, eta: Tensor, prediction_type: str = "epsilon") -> Tensor:
        if not uses_triton(x):
            return _sampler_step.euler_a_ref(model_out, x, noise, cfg_scale, sigma, sigma_next, eta, prediction_type)
        return _sampler_step.euler_a_triton(model_out, x, noise, cfg_scale, sigma, sigma_next, eta, prediction_type)

    @triton_op("sdengine::sampler_step_ddim", mutates_args=())
    def _ddim_op(model_out: Tensor, x: Tensor, cfg_scale: Tensor, alpha_t: Tensor, alpha_prev: Tensor,
                 eta: Tensor, noise: Optional[Tensor] = None, prediction_type: str = "epsilon") -> Tensor:
        if not uses_triton(x):
            return _sampler_step.ddim_ref(model_out, x, cfg_scale, alpha_t, alpha_prev, eta, noise, prediction_type)
        return _sampler_step.ddim_triton(model_out, x, cfg_scale, alpha_t, alpha_prev, eta, noise, prediction_type)

    @triton_op("sdengine::sampler_step_dpmpp_2m", mutates_args=())
    def _dpmpp_2m_op(model_out: Tensor, x: Tensor, old_denoised: Optional[Tensor], cfg_scale: Tensor,
                     sigma: Tensor, sigma_next: Tensor, sigma_prev: Tensor,
                     prediction_type: str = "epsilon") -> tuple[Tensor, Tensor]:
        if not uses_triton(x):
            return _sampler_step.dpmpp_2m_ref(model_out, x, old_denoised, cfg_scale, sigma, sigma_next, sigma_prev,
                                              prediction_type)
        return _sampler_step.dpmpp_2m_triton(model_out, x, old_denoised, cfg_scale, sigma, sigma_next, sigma_prev,
                                             prediction_type)

    @triton_op("sdengine::sampler_step_lcm", mutates_args=())
    def _lcm_op(model_out: Tensor, x: Tensor, noise: Optional[Tensor], cfg_scale: Tensor, alpha_t: Tensor,
                alpha_prev: Tensor, c_skip: Tensor, c_out: Tensor, prediction_type: str = "epsilon") -> Tensor:
        if not uses_triton(x):
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


def _scalar(value, x):
    """A per-step scalar (a number or a 1-element tensor) as the float32 tensor on x's device that the
    registered operators take (the wrappers check that it holds one element)."""
    return torch.as_tensor(value, dtype=torch.float32, device=x.device)


def sampler_step_euler(model_out, x, cfg_scale, sigma, sigma_next, prediction_type="epsilon"):
    """CFG + one Euler step of σ-space x. See kernels/sampler_step.py (euler_triton / euler_ref)."""
    if uses_triton(x):
        return torch.ops.sdengine.sampler_step_euler(model_out, x, _scalar(cfg_scale, x), _scalar(sigma, x),
                                                     _scalar(sigma_next, x), prediction_type)
    return _sampler_step.euler_ref(model_out, x, cfg_scale, sigma, sigma_next, prediction_type)


def sampler_step_euler_a(model_out, x, noise, cfg_scale, sigma, sigma_next, eta=1.0, prediction_type="epsilon"):
    """CFG + one Euler-ancestral step. See kernels/sampler_step.py (euler_a_triton / euler_a_ref)."""
    if uses_triton(x):
        return torch.ops.sdengine.sampler_step_euler_a(model_out, x, noise, _scalar(cfg_scale, x), _scalar(sigma, x),
                                                       _scalar(sigma_next, x), _scalar(eta, x), prediction_type)
    return _sampler_step.euler_a_ref(model_out, x, noise, cfg_scale, sigma, sigma_next, eta, prediction_type)


def sampler_step_ddim(model_out, x, cfg_scale, alpha_t, alpha_prev, eta=0.0, noise=None, prediction_type="epsilon"):
    """CFG + one DDIM step of VP-space x. See kernels/sampler_step.py (ddim_triton / ddim_ref)."""
    if noise is None and not isinstance(eta, Tensor) and eta > 0:
        raise ValueError(f"sampler_step.ddim: eta={eta} > 0 needs noise (diffusers' variance_noise)")
    if uses_triton(x):
        return torch.ops.sdengine.sampler_step_ddim(model_out, x, _scalar(cfg_scale, x), _scalar(alpha_t, x),
                                                    _scalar(alpha_prev, x), _scalar(eta, x), noise, prediction_type)
    return _sampler_step.ddim_ref(model_out, x, cfg_scale, alpha_t, alpha_prev, eta, noise, prediction_type)


def sampler_step_dpmpp_2m(model_out, x, old_denoised, cfg_scale, sigma, sigma_next, sigma_prev,
                          prediction_type="epsilon"):
    """CFG + one DPM-Solver++(2M) step; (x_next, denoised). See kernels/sampler_step.py (dpmpp_2m_triton /
    dpmpp_2m_ref)."""
    if uses_triton(x):
        return torch.ops.sdengine.sampler_step_dpmpp_2m(model_out, x, old_denoised, _scalar(cfg_scale, x),
                                                        _scalar(sigma, x), _scalar(sigma_next, x),
                                                        _scalar(sigma_prev, x), prediction_type)
    return _sampler_step.dpmpp_2m_ref(model_out, x, old_denoised, cfg_scale, sigma, sigma_next, sigma_prev,
                                      prediction_type)


def sampler_step_lcm(model_out, x, noise, cfg_scale, alpha_t, alpha_prev, c_skip, c_out, prediction_type="epsilon"):
    """CFG + one LCM step of VP-space x. See kernels/sampler_step.py (lcm_triton / lcm_ref)."""
    if uses_triton(x):
        return torch.ops.sdengine.sampler_step_lcm(model_out, x, noise, _scalar(cfg_scale, x), _scalar(alpha_t, x),
                                                   _scalar(alpha_prev, x), _scalar(c_skip, x), _scalar(c_out, x),
                                                   prediction_type)
    return _sampler_step.lcm_ref(model_out, x, noise, cfg_scale, alpha_t, alpha_prev, c_skip, c_out, prediction_type)


# ---------------------------------------------------------------------------
# The guidance + sampler update of a whole step (backends/cuda_graphs.py's DeviceStep)
# ---------------------------------------------------------------------------

SAMPLER_STEPS = ("euler", "euler_a", "ddim", "dpmpp_2m", "lcm")


def sampler_update(sampler: str, prediction_type: str, model_out, x, scalars, cfg_scale, noise, old_denoised, *,
                   kernel: bool) -> None:
    """Guidance + one update of `sampler` (one of SAMPLER_STEPS), written into x in place (and DPM++ 2M's
    denoised into old_denoised, its history buffer).

    scalars: the sampler's per-step scalars in its kernel's argument order (samplers/fused.py
    KERNEL_SCALARS); they and cfg_scale are 1-element device tensors, so nothing here syncs with the
    host and a CUDA graph can capture it. kernel: whether the backend asks for the fused Triton kernel (the
    triton layer) or the plain-torch reference (the graph layer). The kernel runs where the rule says so
    (`uses_triton(x)`, or `launches_directly()`), as its wrapper called with out= (the step's buffers;
    the registered operator would allocate new ones); elsewhere the reference.
    """
    if sampler not in SAMPLER_STEPS:
        raise ValueError(f"no sampler update for {sampler!r} (have: {', '.join(SAMPLER_STEPS)})")
    triton_fn = getattr(_sampler_step, f"{sampler}_triton")
    reference = getattr(_sampler_step, f"{sampler}_ref")
    # each sampler's arguments before prediction_type, in its kernel's order (kernels/sampler_step.py)
    args = {
        "euler": (model_out, x, cfg_scale, *scalars),
        "euler_a": (model_out, x, noise, cfg_scale, *scalars),
        "ddim": (model_out, x, cfg_scale, *scalars, noise),
        "dpmpp_2m": (model_out, x, old_denoised, cfg_scale, *scalars),
        "lcm": (model_out, x, noise, cfg_scale, *scalars),
    }[sampler]
    if kernel and (uses_triton(x) or launches_directly()):
        history = {"denoised_out": old_denoised} if sampler == "dpmpp_2m" else {}
        triton_fn(*args, prediction_type, out=x, **history)
    elif sampler == "dpmpp_2m":
        x_next, denoised = reference(*args, prediction_type)
        x.copy_(x_next)
        old_denoised.copy_(denoised)
    else:
        x.copy_(reference(*args, prediction_type))


# ---------------------------------------------------------------------------
# The ops of the model layers on the triton layer (sdengine.models.layers.triton_ops)
# ---------------------------------------------------------------------------

_PUBLIC = {"attention": attention, "group_norm": group_norm, "layer_norm": layer_norm, "geglu": geglu}
_WRAPPERS = {"attention": attention_triton, "group_norm": group_norm_triton, "layer_norm": layer_norm_triton,
             "geglu": geglu_triton}


@functools.lru_cache(maxsize=None)
def layer_op(name: str):
    """The function a model layer calls for kernel op `name` (the public op's signature): the public
    op (through the registered operator, which torch.compile and AOTInductor see); the Triton wrapper
    itself where `launches_directly()` (the interpreter, a dry run)."""
    public, wrapper = _PUBLIC[name], _WRAPPERS[name]

    def op(*args, **kwargs):
        return (wrapper if launches_directly() else public)(*args, **kwargs)

    op.__name__ = op.__qualname__ = f"triton_{name}"
    op.__doc__ = f"kernels.{name} for model layers (kernels/ops.py layer_op)."
    return op
