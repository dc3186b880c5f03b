"""The kernels as `torch.ops.sdengine.*` operators, for torch.compile, torch.export and AOTInductor.

Each op is a `torch.library.triton_op`: its body calls the Triton wrapper, whose launches go
through `torch.library.wrap_triton` while compile/export trace it. torch.compile therefore
sees the Triton kernels themselves, and AOTInductor compiles them into its package, so the
native runtime runs them without Python.

On a CPU tensor the body returns the plain-torch reference instead. That is deliberate:
under TRITON_INTERPRET=1 a triton_op runs eagerly but cannot be compiled or exported (Inductor
cannot lower an interpreted kernel), and the interpreter is far too slow for real work anyway.
So on CPU `torch.compile` traces the reference's torch ops and `torch.export` records the op
with the reference as its CPU implementation. (Tests call the Triton wrappers in the kernel
modules directly to run the kernels under the interpreter.)

Registered only when triton is installed and torch has `torch.library.triton_op` (2.6+):
`REGISTERED` says whether it happened.
"""

from typing import Optional

import torch
from torch import Tensor

from . import attention as _attention
from . import decode as _decode
from . import geglu as _geglu
from . import group_norm as _group_norm
from . import layer_norm as _layer_norm
from . import sampler_step as _sampler_step
from ._triton import HAS_TRITON

REGISTERED = False

if HAS_TRITON and hasattr(torch.library, "triton_op"):
    try:
        torch.ops.sdengine.attention  # noqa: B018  (already registered by an earlier import)
        REGISTERED = True
    except (AttributeError, RuntimeError):
        pass

if HAS_TRITON and hasattr(torch.library, "triton_op") and not REGISTERED:
    triton_op = torch.library.triton_op

    @triton_op("sdengine::attention", mutates_args=())
    def attention(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float] = None) -> Tensor:
        if not q.is_cuda:
            return _attention.attention_ref(q, k, v, scale)
        return _attention.attention(q, k, v, scale)

    @triton_op("sdengine::group_norm", mutates_args=())
    def group_norm(x: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor],
                   eps: float = 1e-5, silu: bool = False, residual: Optional[Tensor] = None) -> Tensor:
        if not x.is_cuda:
            return _group_norm.group_norm_ref(x, num_groups, weight, bias, eps, silu, residual)
        return _group_norm.group_norm(x, num_groups, weight, bias, eps, silu, residual)

    @triton_op("sdengine::layer_norm", mutates_args=())
    def layer_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float = 1e-5) -> Tensor:
        if not x.is_cuda:
            return _layer_norm.layer_norm_ref(x, weight, bias, eps)
        return _layer_norm.layer_norm(x, weight, bias, eps)

    @triton_op("sdengine::geglu", mutates_args=())
    def geglu(h: Tensor) -> Tensor:
        if not h.is_cuda:
            return _geglu.geglu_ref(h)
        return _geglu.geglu(h)

    @triton_op("sdengine::decode_to_uint8", mutates_args=())
    def decode_to_uint8(x: Tensor) -> Tensor:
        if not x.is_cuda:
            return _decode.decode_to_uint8_ref(x)
        return _decode.decode_to_uint8(x)

    @triton_op("sdengine::sampler_step_euler", mutates_args=())
    def sampler_step_euler(model_out: Tensor, x: Tensor, cfg_scale: Tensor, sigma: Tensor, sigma_next: Tensor,
                           prediction_type: str = "epsilon") -> Tensor:
        if not x.is_cuda:
            return _sampler_step.euler_ref(model_out, x, cfg_scale, sigma, sigma_next, prediction_type)
        return _sampler_step.euler(model_out, x, cfg_scale, sigma, sigma_next, prediction_type)

    @triton_op("sdengine::sampler_step_euler_a", mutates_args=())
    def sampler_step_euler_a(model_out: Tensor, x: Tensor, noise: Tensor, cfg_scale: Tensor, sigma: Tensor,
                             sigma_next: Tensor, eta: Tensor, prediction_type: str = "epsilon") -> Tensor:
        if not x.is_cuda:
            return _sampler_step.euler_a_ref(model_out, x, noise, cfg_scale, sigma, sigma_next, eta, prediction_type)
        return _sampler_step.euler_a(model_out, x, noise, cfg_scale, sigma, sigma_next, eta, prediction_type)

    @triton_op("sdengine::sampler_step_ddim", mutates_args=())
    def sampler_step_ddim(model_out: Tensor, x: Tensor, cfg_scale: Tensor, alpha_t: Tensor, alpha_prev: Tensor,
                          eta: Tensor, noise: Optional[Tensor] = None, prediction_type: str = "epsilon") -> Tensor:
        if not x.is_cuda:
            return _sampler_step.ddim_ref(model_out, x, cfg_scale, alpha_t, alpha_prev, eta, noise, prediction_type)
        return _sampler_step.ddim(model_out, x, cfg_scale, alpha_t, alpha_prev, eta, noise, prediction_type)

    @triton_op("sdengine::sampler_step_dpmpp_2m", mutates_args=())
    def sampler_step_dpmpp_2m(model_out: Tensor, x: Tensor, old_denoised: Optional[Tensor], cfg_scale: Tensor,
                              sigma: Tensor, sigma_next: Tensor, sigma_prev: Tensor,
                              prediction_type: str = "epsilon") -> tuple[Tensor, Tensor]:
        if not x.is_cuda:
            return _sampler_step.dpmpp_2m_ref(model_out, x, old_denoised, cfg_scale, sigma, sigma_next, sigma_prev,
                                              prediction_type)
        return _sampler_step.dpmpp_2m(model_out, x, old_denoised, cfg_scale, sigma, sigma_next, sigma_prev,
                                      prediction_type)

    @triton_op("sdengine::sampler_step_lcm", mutates_args=())
    def sampler_step_lcm(model_out: Tensor, x: Tensor, noise: Optional[Tensor], cfg_scale: Tensor, alpha_t: Tensor,
                         alpha_prev: Tensor, c_skip: Tensor, c_out: Tensor,
                         prediction_type: str = "epsilon") -> Tensor:
        if not x.is_cuda:
            return _sampler_step.lcm_ref(model_out, x, noise, cfg_scale, alpha_t, alpha_prev, c_skip, c_out,
                                         prediction_type)
        return _sampler_step.lcm(model_out, x, noise, cfg_scale, alpha_t, alpha_prev, c_skip, c_out,
                                 prediction_type)

    REGISTERED = True
