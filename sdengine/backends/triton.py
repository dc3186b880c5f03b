"""The Triton backend: our networks with fused Triton kernels, fp16 + channels_last,
and the UNet step replayed from CUDA graphs.

What changes against the eager backend, all of it at load time (never in forward):
- the four swappable ops of every network (`sdengine.models.layers.Ops`) become the
  Triton kernels of `sdengine.kernels`: FlashAttention-2 attention, GroupNorm(+SiLU),
  LayerNorm, GEGLU;
- self-attention Q, K, V projections are fused into one matmul (`Attention.fuse_qkv`);
- on CUDA, convolution weights go channels_last, so cuDNN runs NHWC convolutions with
  no transposes, and the GroupNorm kernel reads and writes NHWC directly;
- on CUDA, each UNet forward at a new shape (batch, height, width, context length) is
  captured once as a CUDA graph and replayed afterwards: at batch 2 the eager UNet is
  launch-bound (ANCHORS.md: 54.5 vs 104.6 it/s). Graphs live in a bounded LRU cache
  and share one memory pool; a new resolution captures only its own graph;
- for the samplers with a fused CFG + update kernel (euler, euler_a, ddim, dpmpp_2m, lcm;
  kernels/sampler_step.py) the backend offers `fused_step`: the whole denoising step (UNet
  on the doubled batch, guidance, sampler update) as one function whose scalars are read on
  the device, so that on CUDA one graph of the whole step is replayed for every step. Other
  samplers, "sample"-prediction models, x0 clipping and inpainting's 9-channel UNet take
  the graphed UNet with the eager update.

On the CPU the same kernels run through Triton's interpreter (TRITON_INTERPRET=1): far
too slow for real use, but it is how CI proves that these code paths match eager.
"""

from __future__ import annotations

import importlib
import logging
import time
from collections import OrderedDict
from dataclasses import replace

import torch
import torch.nn.functional as F

from .. import kernels
from ..models.layers import EAGER_OPS, Attention, set_ops
from ..samplers import fused
from .eager import EagerBackend

log = logging.getLogger("sdengine")


# ---------------------------------------------------------------------------
# The ops, in the signatures of sdengine.models.layers.Ops
# ---------------------------------------------------------------------------

def _kernel(name: str):
    """The op to call for kernel `name`.

    On CUDA: the public op of sdengine.kernels, which goes through the registered
    `torch.ops.sdengine.<name>` so that torch.compile / export see the Triton kernel.
    Under TRITON_INTERPRET=1 (CPU tests): the Triton wrapper itself, since the public op
    sends CPU tensors to the plain-torch reference and would prove nothing.
    """
    if kernels.INTERPRET:
        return getattr(importlib.import_module(f"sdengine.kernels.{name}"), name)
    return getattr(kernels, name)


_attention_kernel, _group_norm_kernel = _kernel("attention"), _kernel("group_norm")
_layer_norm_kernel, _geglu_kernel = _kernel("layer_norm"), _kernel("geglu")
# The fused CFG + sampler-update kernels, called through their wrappers (CUDA, or the interpreter
# on CPU): they take `out=` buffers, which lets a step update its state in place.
_sampler_step = importlib.import_module("sdengine.kernels.sampler_step")


def triton_attention(q, k, v, heads: int, *, causal: bool = False, upcast: bool = False):
    """(B, L, heads·d) projections -> (B, Lq, heads·d) through the flash-attention kernel.

    The kernel accumulates in fp32 whatever the input dtype, which is what SD2's
    `upcast_attention` asks for. CLIP's causal attention (77 tokens, 0.1 ms) stays eager.
    """
    if causal:
        return EAGER_OPS.attention(q, k, v, heads, causal=True, upcast=upcast)
    batch, q_len, inner = q.shape
    head_dim = inner // heads
    # (B, L, heads, d) -> (B, heads, L, d) as strided views: no copy
    q4, k4, v4 = (t.view(batch, -1, heads, head_dim).transpose(1, 2) for t in (q, k, v))
    out = _attention_kernel(q4, k4, v4)  # (B, heads, Lq, d), stored as (B, Lq, heads, d)
    return out.transpose(1, 2).reshape(batch, q_len, inner)  # (B, Lq, heads·d), free


def triton_group_norm(x, weight, bias, groups: int, eps: float, silu: bool = False):
    return _group_norm_kernel(x, groups, weight, bias, eps=eps, silu=silu)


def triton_layer_norm(x, weight, bias, eps: float):
    return _layer_norm_kernel(x, weight, bias, eps=eps)


def triton_geglu(x, weight, bias):
    return _geglu_kernel(F.linear(x, weight, bias))  # (..., 2·inner) -> (..., inner)


TRITON_OPS = replace(EAGER_OPS, attention=triton_attention, group_norm=triton_group_norm,
                     layer_norm=triton_layer_norm, geglu=triton_geglu)


def prepare_for_triton(module: torch.nn.Module, channels_last: bool) -> torch.nn.Module:
    """Load-time rewrite of one network: fused QKV, kernel ops, NHWC conv weights."""
    for sub in module.modules():
        if isinstance(sub, Attention) and not sub.is_cross and sub.to_qkv is None:
            sub.fuse_qkv()
    set_ops(module, TRITON_OPS)
    if channels_last:
        module.to(memory_format=torch.channels_last)
    return module


# ---------------------------------------------------------------------------
# CUDA graphs: one bounded cache for UNet forwards and whole fused steps
# ---------------------------------------------------------------------------

class GraphCache:
    """An LRU cache of captured CUDA graphs (UNet forwards and fused steps), keyed by what a
    graph bakes in: input shapes, dtype and, for a fused step, the sampler. All graphs share
    one memory pool, so the cache costs little beyond the activations of the largest shape;
    a graph's inputs and outputs are static buffers that stay alive with its entry.
    """

    def __init__(self, capacity: int = 8):
        self.capacity = capacity
        self.pool = torch.cuda.graph_pool_handle()
        self.entries: OrderedDict = OrderedDict()

    def lookup(self, key: tuple, make):
        """The entry of `key`, made by make() on a miss; the least recently used goes first."""
        entry = self.entries.get(key)
        if entry is None:
            entry = make()
            self.entries[key] = entry
            if len(self.entries) > self.capacity:
                self.entries.popitem(last=False)
        self.entries.move_to_end(key)
        return entry

    def capture(self, run):
        """(graph, output) of run() captured into the shared pool, after two warm-up runs on a
        side stream (Triton autotuning and lazy initialisation stay outside the capture)."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = run()
        return graph, out


class GraphedUNet:
    """The UNet replayed from CUDA graphs, one per input shape (entries of a GraphCache).

    Each entry holds static input buffers, the captured graph and its static output.
    """

    def __init__(self, unet, graphs: GraphCache):
        self.unet = unet
        self.graphs = graphs

    @staticmethod
    def key(x, t, context, added_cond) -> tuple:
        extra = tuple(sorted((k, tuple(v.shape)) for k, v in (added_cond or {}).items()))
        return "unet", tuple(x.shape), tuple(t.shape), tuple(context.shape), extra, x.dtype

    def __call__(self, x, t, context, added_cond=None):
        static_in, graph, static_out = self.graphs.lookup(self.key(x, t, context, added_cond),
                                                          lambda: self._capture(x, t, context, added_cond))
        static_in["x"].copy_(x)
        static_in["t"].copy_(t)
        static_in["context"].copy_(context)
        for k, v in (added_cond or {}).items():
            static_in[k].copy_(v)
        graph.replay()
        return static_out

    def _capture(self, x, t, context, added_cond):
        started = time.perf_counter()
        static_in = {"x": x.clone(), "t": t.clone(), "context": context.clone()}
        static_in.update({k: v.clone() for k, v in (added_cond or {}).items()})

        def run():
            cond = {k: static_in[k] for k in (added_cond or {})} or None
            return self.unet(static_in["x"], static_in["t"], static_in["context"], added_cond=cond)

        graph, static_out = self.graphs.capture(run)
        log.info("captured a CUDA graph of the UNet for x %s, context %s in %.2f s",
                 tuple(x.shape), tuple(context.shape), time.perf_counter() - started)
        return static_in, graph, static_out


# ---------------------------------------------------------------------------
# The fused step: UNet -> guidance + sampler update, one function (one graph) per step
# ---------------------------------------------------------------------------

class FusedStep:
    """One whole denoising step on static buffers, run eagerly or replayed from a CUDA graph:

        x_in = x · c_in -> UNet([x_in, x_in], t, context) -> one kernel of kernels/sampler_step.py
        (classifier-free guidance + the sampler update) -> x, in place.

    A call fills the buffers (state x, the step's row of the step table, the conditioning,
    the noise) and runs the step; the next state is the buffer `x` itself (float32, the
    sampler's units; channels_last on CUDA), and DPM++ 2M's denoised history stays in its own
    buffer. Every per-step scalar is read on the device from the row buffer, so a graph
    captured once serves every step of every run at these shapes.
    """

    def __init__(self, unet, sampler: str, prediction_type: str, x_shape: tuple, context, added_cond=None, *,
                 takes_noise: bool, channels_last: bool, graphs: "GraphCache | None" = None):
        first = next(unet.parameters())
        self.unet, self.dtype = unet, first.dtype
        self.sampler, self.prediction_type = sampler, prediction_type
        self.do_cfg = context.shape[0] == 2 * x_shape[0]
        fmt = torch.channels_last if channels_last else torch.contiguous_format

        def latent_buffer():
            return torch.zeros(x_shape, dtype=torch.float32, device=first.device).contiguous(memory_format=fmt)

        self.x = latent_buffer()
        self.row = torch.zeros(fused.FIRST_KERNEL_SCALAR + len(fused.KERNEL_SCALARS[sampler]),
                               dtype=torch.float32, device=first.device)
        self.noise = latent_buffer() if takes_noise else None
        self.old_denoised = latent_buffer() if sampler == "dpmpp_2m" else None
        self.context = context.clone()
        self.added_cond = {k: v.clone() for k, v in added_cond.items()} if added_cond else None
        self.graphs, self.graph = graphs, None

    @staticmethod
    def key(sampler, prediction_type, x_shape, context, added_cond, takes_noise) -> tuple:
        extra = tuple(sorted((k, tuple(v.shape)) for k, v in (added_cond or {}).items()))
        return "step", sampler, prediction_type, tuple(x_shape), tuple(context.shape), extra, context.dtype, takes_noise

    @torch.inference_mode()
    def __call__(self, x, row, context, added_cond=None, noise=None):
        """The state after one step from state x; row: the step's row of the step table."""
        if x is not self.x:
            self.x.copy_(x)
        self.row.copy_(row)
        self.context.copy_(context)
        for k, v in (added_cond or {}).items():
            self.added_cond[k].copy_(v)
        if self.noise is not None:
            if noise is None:
                self.noise.zero_()
            else:
                self.noise.copy_(noise)
        if self.graphs is None:
            self.run()
        else:
            if self.graph is None:
                self.graph = self._capture()
            self.graph.replay()
        return self.x

    def run(self):
        """The step on the buffers: what a CUDA graph of it captures."""
        row, x = self.row, self.x
        timestep, c_in, cfg_scale = row[0], row[1], row[2:3]  # fused.COLUMNS, as device tensors
        scalars = [row[j:j + 1] for j in range(fused.FIRST_KERNEL_SCALAR, row.shape[0])]  # KERNEL_SCALARS
        x_in = (x * c_in).to(self.dtype)
        x_batch = torch.cat([x_in, x_in]) if self.do_cfg else x_in  # (2N, C, h, w): [uncond, cond]
        if x.is_cuda:
            x_batch = x_batch.contiguous(memory_format=torch.channels_last)
        model_out = self.unet(x_batch, timestep, self.context, added_cond=self.added_cond)
        pred = self.prediction_type
        if self.sampler == "euler":
            _sampler_step.euler(model_out, x, cfg_scale, *scalars, pred, out=x)
        elif self.sampler == "euler_a":
            _sampler_step.euler_a(model_out, x, self.noise, cfg_scale, *scalars, pred, out=x)
        elif self.sampler == "ddim":
            _sampler_step.ddim(model_out, x, cfg_scale, *scalars, self.noise, pred, out=x)
        elif self.sampler == "dpmpp_2m":
            _sampler_step.dpmpp_2m(model_out, x, self.old_denoised, cfg_scale, *scalars, pred, out=x,
                                   denoised_out=self.old_denoised)
        else:  # lcm
            _sampler_step.lcm(model_out, x, self.noise, cfg_scale, *scalars, pred, out=x)
        return x

    def _capture(self):
        """Capture run(); the warm-up runs advance the state, so it is put back afterwards."""
        started = time.perf_counter()
        state = [b for b in (self.x, self.old_denoised) if b is not None]
        saved = [b.clone() for b in state]
        graph, _ = self.graphs.capture(self.run)
        for b, s in zip(state, saved):
            b.copy_(s)
        log.info("captured a CUDA graph of the whole %s step for x %s, context %s in %.2f s", self.sampler,
                 tuple(self.x.shape), tuple(self.context.shape), time.perf_counter() - started)
        return graph


# ---------------------------------------------------------------------------
# The backend
# ---------------------------------------------------------------------------

class TritonBackend(EagerBackend):
    """Our networks with the Triton kernels; on CUDA, channels_last and graphed steps.

    cuda_graphs: replay the UNet, or the whole fused step, from CUDA graphs (CUDA only;
                 default on).
    graph_cache: how many graphs (input shapes x UNet / fused sampler) are kept; the least
                 recently used go first.
    fused_steps: offer `fused_step` (UNet + guidance + sampler update as one function) for
                 the samplers that have a fused kernel (default on).
    """

    name = "triton"

    def __init__(self, config, text_encoder, unet, vae, text_encoder_2=None, *, cuda_graphs: bool = True,
                 graph_cache: int = 8, fused_steps: bool = True):
        if not kernels.HAS_TRITON:
            raise RuntimeError("backend='triton' needs the triton package (pip install triton)")
        super().__init__(config, text_encoder, unet, vae, text_encoder_2)
        on_cuda = self.device.type == "cuda"
        for module in (self.text_encoder, self.text_encoder_2, self.unet, self.vae):
            if module is not None:
                prepare_for_triton(module, channels_last=on_cuda)
        self.graphs = GraphCache(graph_cache) if on_cuda and cuda_graphs else None
        self.graphed_unet = GraphedUNet(self.unet, self.graphs) if self.graphs is not None else None
        self.fused_steps = fused_steps

    @torch.inference_mode()
    def denoise(self, x_in, t, context, added_cond=None):
        x = x_in.to(self.device, self.dtype)
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        t = t.to(self.device)
        context = context.to(self.device, self.dtype)
        if added_cond is not None:
            added_cond = {k: v.to(self.device, self.dtype) for k, v in added_cond.items()}
        if self.graphed_unet is not None:
            return self.graphed_unet(x, t, context, added_cond).float()  # .float() copies out of the graph's buffer
        return self.unet(x, t, context, added_cond=added_cond).float()

    def fused_step(self, plan, context, guidance_scale: float, added_cond=None):
        """The whole denoising step of `plan` as one function `step(x, i, noise) -> x_next`, or None
        where the fused kernels do not cover the run (docs/CONTRACTS.md, Backends).

        context (2N or N, L, D) is [uncond, cond] with guidance, cond alone without; x is the
        sampler's state (N, C, h, w) float32 (see samplers/fused.py). The returned x is a buffer
        that the next step overwrites. On CUDA the step is captured once per shape and sampler
        as a CUDA graph and replayed for every step.
        """
        if not self.fused_steps or kernels.reference_mode():
            return None
        if not (self.device.type == "cuda" or kernels.INTERPRET):  # CPU without the interpreter: no kernels
            return None
        if self.config.unet.in_channels != self.config.vae.latent_channels:  # inpainting's 9-channel input
            return None
        prediction_type = self.config.scheduler.prediction_type
        reason = fused.unsupported(plan, prediction_type)
        if reason is not None:
            log.debug("fused step not used: %s", reason)
            return None
        table = fused.step_table(plan, guidance_scale).to(self.device)  # (steps, columns) float32
        context = context.to(self.device, self.dtype)
        if added_cond is not None:
            added_cond = {k: v.to(self.device, self.dtype) for k, v in added_cond.items()}
        takes_noise = fused.takes_noise(plan)
        entry = None

        def make(x_shape):
            return FusedStep(self.unet, plan.sampler, prediction_type, x_shape, context, added_cond,
                             takes_noise=takes_noise, channels_last=self.device.type == "cuda", graphs=self.graphs)

        def step(x, i, noise=None):
            nonlocal entry
            if entry is None:  # one entry for the whole run: it carries DPM++ 2M's history
                x_shape = tuple(x.shape)
                key = FusedStep.key(plan.sampler, prediction_type, x_shape, context, added_cond, takes_noise)
                entry = self.graphs.lookup(key, lambda: make(x_shape)) if self.graphs is not None else make(x_shape)
            return entry(x.to(self.device), table[i], context, added_cond, self._to_device(noise))

        return step

    def _to_device(self, t):
        """t on the backend's device. From the CPU to CUDA through pinned memory, without
        blocking: a copy from pageable memory would wait for the GPU to finish the previous step."""
        if t is None or t.device == self.device:
            return t
        if self.device.type == "cuda" and t.device.type == "cpu":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)
