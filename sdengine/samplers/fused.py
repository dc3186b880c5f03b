"""The fused denoising step: one function per step, UNet -> guidance -> sampler update.

A backend that can run a whole step as one function (the graph layers, the Triton backend
through the fused CFG + update kernels of kernels/sampler_step.py) offers

    step = backend.fused_step(plan, context, guidance_scale, added_cond=None)  # or None
    x_next = step(x, i, noise)

(docs/CONTRACTS.md, Backends). This module is the sampler side of that step, so that it matches
the unfused samplers of sigma_samplers.py / timestep_samplers.py. The step has one seam to it
on each side:
- the backend builds the step from one `FusedRun` (`fused_run(plan, prediction_type,
  guidance_scale)`), after asking `unsupported(plan, prediction_type)` whether the kernels can
  run the plan at all (None if they can; the reasons: samplers without a kernel, x0 clipping,
  "sample" prediction, DPM++ 2M's heun variant). A FusedRun holds everything the step reads from
  the plan: the sampler and prediction type (which update, kernels/ops.py `sampler_update`), and
  `step_table(plan, guidance_scale)`, every per-step scalar of the run as one float32 table, one
  row per step (`COLUMNS`, then `KERNEL_SCALARS`), so that a step reads its scalars from a device
  tensor indexed by the step and a CUDA graph of the step can be replayed for every step;
- the loop (`samplers.sample`) runs the step through `with_noise(step, plan, generators, shape)`,
  its step(x, i), which draws each step's noise from the per-image CPU generators in the order
  the unfused samplers draw it (`randn`), so the images do not change.

The sampler state is the one of the unfused samplers: σ-space x = x0 + σ·ε for euler,
euler_a and dpmpp_2m (the UNet gets x·c_in, c_in = 1/sqrt(σ² + 1)), diffusers' VP latents
for ddim and lcm (c_in = 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .noise import randn
from .plan import Plan

# The kernel scalars of each fused sampler, in the argument order of kernels/sampler_step.py.
KERNEL_SCALARS = {
    "euler": ("sigma", "sigma_next"),
    "euler_a": ("sigma", "sigma_next", "eta"),
    "ddim": ("alpha_t", "alpha_prev", "eta"),
    "dpmpp_2m": ("sigma", "sigma_next", "sigma_prev"),
    "lcm": ("alpha_t", "alpha_prev", "c_skip", "c_out"),
}
FUSED_SAMPLERS = tuple(KERNEL_SCALARS)

# Columns of a step table: the UNet's timestep and input scale, the guidance scale, then the
# sampler's kernel scalars (KERNEL_SCALARS order) from column FIRST_KERNEL_SCALAR on.
COLUMNS = ("timestep", "c_in", "cfg_scale")
FIRST_KERNEL_SCALAR = len(COLUMNS)


def unsupported(plan: Plan, prediction_type: str) -> Optional[str]:
    """Why the fused kernels cannot run `plan` for a model predicting `prediction_type`;
    None when they can."""
    if plan.sampler not in KERNEL_SCALARS:
        return f"no fused kernel for sampler {plan.sampler!r} (fused: {', '.join(FUSED_SAMPLERS)})"
    if prediction_type not in ("epsilon", "v_prediction"):
        return f"the fused kernels take epsilon or v_prediction models, not {prediction_type!r}"
    if plan.clip_range is not None:
        return "the fused kernels do not clip x0 (scheduler config clip_sample)"
    if plan.sampler == "dpmpp_2m" and plan.options.get("solver_type", "midpoint") != "midpoint":
        return f"the dpmpp_2m kernel is the midpoint solver, not {plan.options['solver_type']!r}"
    return None


def step_table(plan: Plan, guidance_scale: float) -> torch.Tensor:
    """(plan.num_steps, len(COLUMNS) + k) float32 CPU table of every per-step scalar.

    Row i holds step i's timestep, c_in, the guidance scale and the kernel scalars of
    KERNEL_SCALARS[plan.sampler] (see kernels/sampler_step.py for their meaning). DPM++ 2M's
    sigma_prev is 0 where the step is first order: the first step of the run, and the last
    one with options["lower_order_final"] (the kernel is also first order where sigma_next = 0).
    """
    reason = unsupported(plan, "epsilon")
    if reason is not None:
        raise ValueError(f"step_table: {reason}")
    s = plan.step_scalars()  # float64 (n,) each
    ones = torch.ones(plan.num_steps, dtype=torch.float64)
    if plan.is_sigma_sampler:
        sigma_prev = torch.cat([torch.zeros(1, dtype=torch.float64), s["sigma"][:-1]])
        if plan.options.get("lower_order_final", False):
            sigma_prev[-1] = 0.0
        values = dict(c_in=s["c_in"], sigma=s["sigma"], sigma_next=s["sigma_next"], sigma_prev=sigma_prev,
                      eta=ones * plan.options.get("eta", 1.0))  # euler_a: k-diffusion's default eta 1
    else:  # VP latents: the UNet takes them as they are. lcm's alpha_prev is 1 on the last step,
        # so x_next is the denoised sample there
        values = dict(c_in=ones, alpha_t=s["alpha_cumprod"], alpha_prev=s["alpha_cumprod_prev"],
                      eta=ones * plan.options.get("eta", 0.0), c_skip=s.get("c_skip"), c_out=s.get("c_out"))
    values.update(timestep=s["timestep"], cfg_scale=ones * float(guidance_scale))
    columns = COLUMNS + KERNEL_SCALARS[plan.sampler]
    return torch.stack([values[name] for name in columns], dim=1).to(torch.float32)


@dataclass(frozen=True)
class FusedRun:
    """One run of a plan as the fused step takes it: all that the backend's step reads from the
    sampler side, made once per run by `fused_run`.

    sampler, prediction_type: which guidance + update the step runs (kernels/ops.py sampler_update);
    table: (steps, len(COLUMNS) + len(KERNEL_SCALARS[sampler])) float32 CPU (`step_table`);
    takes_noise: whether the update takes a noise input (the step keeps a buffer for it).
    """

    sampler: str
    prediction_type: str
    table: torch.Tensor
    takes_noise: bool

    @staticmethod
    def columns(row: torch.Tensor) -> tuple:
        """A row of the table (on the device) as (timestep, c_in, cfg_scale, [kernel scalars]): views,
        the scalars 1-element each, so that reading them never syncs with the host."""
        scalars = [row[j:j + 1] for j in range(FIRST_KERNEL_SCALAR, row.shape[0])]  # KERNEL_SCALARS order
        return row[0:1], row[1], row[2:3], scalars


def fused_run(plan: Plan, prediction_type: str, guidance_scale: float) -> FusedRun:
    """The FusedRun of `plan` for a model predicting `prediction_type`; a ValueError naming the
    reason where the fused kernels cannot run it (`unsupported`)."""
    reason = unsupported(plan, prediction_type)
    if reason is not None:
        raise ValueError(f"fused step: {reason}")
    return FusedRun(plan.sampler, prediction_type, step_table(plan, guidance_scale), takes_noise(plan))


def takes_noise(plan: Plan) -> bool:
    """Whether the run's kernel takes a noise input: euler_a and lcm always (zeros where a step
    draws none), ddim when eta > 0."""
    return plan.sampler in ("euler_a", "lcm") or (plan.sampler == "ddim" and plan.options.get("eta", 0.0) > 0)


def draws_noise(plan: Plan, i: int) -> bool:
    """Whether step i of the unfused sampler draws fresh noise (and so the fused step needs it)."""
    if plan.sampler == "euler_a":
        return float(plan.sigmas[i + 1]) > 0
    if plan.sampler == "ddim":
        return plan.options.get("eta", 0.0) > 0
    if plan.sampler == "lcm":
        return i < plan.num_steps - 1
    return False


def with_noise(step: Callable, plan: Plan, generators, shape) -> Callable:
    """A fused step(x, i, noise) as the step(x, i) that `samplers.sample`'s loop runs.

    step(x, i, noise) -> the sampler state after step i (noise: standard normal of x's shape on
      the CPU, or None where the step draws none; the step moves it to its device). It may
      return one buffer that it overwrites in place at the next call (the loop hands out copies).
    Each step's noise is drawn from the per-image CPU generators where and as the unfused sampler
    draws it (`randn`, float32), so the images do not change.
    """
    cpu = torch.device("cpu")

    def stepped(x, i):
        return step(x, i, randn(shape, generators, cpu, torch.float32) if draws_noise(plan, i) else None)

    return stepped
