"""CUDA graphs for the fast backends: one bounded cache, graphed network calls, and the
whole denoising step on static buffers.

Why: at batch 2 an SD1.5 UNet forward is ~700 kernel launches. On the lent H200 host each
eager op costs ~29 µs of CPU, so the step is launch-bound (ANCHORS.md: eager 54.5 vs
stable-fast 104.6 it/s on an H100). A CUDA graph replays all of a step's launches for one
host call. Three things get graphed, each once per input shape:

- `GraphedFunction`: a network call (text encoder, UNet forward, VAE decode) on static
  input buffers; the output is copied out of the graph's buffer on return;
- `DeviceStep`: the whole denoising step, UNet on the doubled batch -> classifier-free
  guidance -> the sampler update, with every per-step scalar read on the device from a row
  of the run's step table (`samplers.fused.FusedRun`, the step's one input from the sampler
  side), so that one graph serves every step of every run at that shape. The update is
  kernels/ops.py's `sampler_update`: the fused Triton kernel on the triton layer, plain torch
  ops (the kernels' references) on the graph layer;
- both live in one `GraphCache`: a bounded LRU keyed by what a graph bakes in (shapes,
  dtypes, sampler), whose graphs share one memory pool.

`GraphCache.capture(run)` is the only place that touches the torch.cuda graph API, so the CPU
tests substitute a stand-in that runs the function where a graph would be replayed
(tests/support/graph_stand_in.py) and check what capture and replay rely on: warm-ups undone, one
capture per shape serving every step of every run, a bounded cache, and no instance shared
by two runs at once.

A call the graphs cannot serve (the capture fails: an op that syncs, out of memory) runs
uncaptured, with one log line per shape; it is never a wrong result.

Threads: a DeviceStep instance belongs to one run from its first step to its end (or until
the run is dropped, e.g. cancelled); a second run of the same shape at the same time gets its
own instance (its own capture). Graphs of one cache share a memory pool, so they must be
replayed on one stream, one at a time: the backends replay on the current stream, which all
threads share unless they set their own.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import weakref
from collections import OrderedDict
from typing import TYPE_CHECKING, Callable, Optional

import torch

if TYPE_CHECKING:
    from ..samplers.fused import FusedRun

log = logging.getLogger("sdengine")

UNCAPTURABLE = object()  # a cache entry whose capture failed: the call runs uncaptured


class GraphCache:
    """An LRU cache of captured CUDA graphs, keyed by what a graph bakes in.

    capacity: how many graphs are kept; the least recently used is dropped for a new one.
    An entry in use by a run (`busy`) is never dropped; when every entry is busy, the new
    shape runs uncaptured.
    """

    def __init__(self, capacity: int = 8):
        if capacity < 0:
            raise ValueError(f"graph_cache must be 0 or more, got {capacity}")
        self.capacity = capacity
        self.entries: OrderedDict = OrderedDict()
        self.lock = threading.RLock()
        self.captures = 0  # graphs captured so far (what the tests and the benchmark count)
        self._pool = None

    @property
    def pool(self):
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        return self._pool

    def lookup(self, key: tuple, make: Callable[[], object]):
        """The entry of `key`, made by make() on a miss (None when it cannot be kept)."""
        with self.lock:
            entry = self.entries.get(key)
            if entry is not None:
                self.entries.move_to_end(key)
                return entry
            if self.capacity == 0 or not self._make_room():
                log.info("CUDA graph cache full (%d graphs, all in use): running %s uncaptured",
                         self.capacity, key[0])
                return None
            entry = make()
            self.entries[key] = entry
            return entry

    def _make_room(self) -> bool:
        while len(self.entries) >= self.capacity:
            victim = next((k for k, e in self.entries.items() if not getattr(e, "busy", False)), None)
            if victim is None:
                return False
            del self.entries[victim]
        return True

    def capture(self, run: Callable[[], object]):
        """(graph, output) of run() captured into the shared pool, after two warm-up runs on a
        side stream (lazy initialisation, autotuning and compilation stay outside the capture)."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = run()
        self.captures += 1
        return graph, out

    def try_capture(self, run: Callable[[], object], what: str):
        """capture(run), or None (with one log line) when the capture fails."""
        started = time.perf_counter()
        try:
            graph, out = self.capture(run)
        except Exception as e:  # an op that cannot be captured, out of memory, ...
            log.warning("could not capture a CUDA graph of %s (%s: %s); it runs uncaptured",
                        what, type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            return None
        log.info("captured a CUDA graph of %s in %.2f s", what, time.perf_counter() - started)
        return graph, out


def _signature(args) -> tuple:
    """What a graph of a call bakes in about its tensor arguments."""
    return tuple(None if a is None else (tuple(a.shape), a.dtype, a.stride()) for a in args)


def _clone_out(out):
    if isinstance(out, tuple):
        return tuple(_clone_out(o) for o in out)
    return out.clone() if isinstance(out, torch.Tensor) else out


class GraphedFunction:
    """fn(*tensors) replayed from CUDA graphs, one per argument signature (shapes, dtypes,
    strides; None arguments allowed). Non-tensor settings belong in `name` (one
    GraphedFunction per setting). Outputs (a tensor or a tuple of tensors) are copies, never
    the graph's own buffers."""

    def __init__(self, name: str, fn: Callable, graphs: GraphCache):
        self.name, self.fn, self.graphs = name, fn, graphs

    def __call__(self, *args):
        key = (self.name, _signature(args))
        with self.graphs.lock:  # one replay of an entry at a time: its buffers are shared
            entry = self.graphs.lookup(key, lambda: self._capture(args))
            if entry is None or entry is UNCAPTURABLE:
                return self.fn(*args)
            static_in, graph, static_out = entry
            for buffer, a in zip(static_in, args):
                if buffer is not None:
                    buffer.copy_(a)
            graph.replay()
            return _clone_out(static_out)

    def _capture(self, args):
        static_in = tuple(None if a is None else a.clone() for a in args)
        shapes = ", ".join(str(tuple(a.shape)) for a in args if a is not None)
        captured = self.graphs.try_capture(lambda: self.fn(*static_in), f"{self.name} at {shapes}")
        if captured is None:
            return UNCAPTURABLE
        return (static_in, *captured)


# ---------------------------------------------------------------------------
# The whole denoising step
# ---------------------------------------------------------------------------

class DeviceStep:
    """One whole denoising step on static buffers, run directly or replayed from a CUDA graph:

        x_in = x · c_in -> UNet([x_in, x_in], t, context) -> guidance + sampler update -> x, in place

    A call fills the buffers (the state x, the step's row of the step table, the noise) and
    runs the step; the conditioning is copied in once per run. The next state is the buffer
    `x` itself (float32, the sampler's units), and DPM++ 2M's denoised history stays in its
    own buffer. Every per-step scalar is read on the device from the row buffer, so a graph
    captured once serves every step of every run at these shapes.

    unet: the network to call (possibly compiled); fused: the FusedRun of the run that makes the
    instance (its sampler, prediction type, noise input and table width: the same for every run
    whose key matches); kernel: the update runs the fused Triton kernel (kernels/ops.py
    sampler_update's `kernel`).

    ControlNets (`controls`, sdengine.controlnet.ControlInput; `controlnet_fn(control)` gives the
    function that runs one, as the backend prepared it) run inside the same step, before the UNet,
    their residuals summed into it. Their images and scales are static buffers copied in once per
    run, like the context. A call says which of them are active at that step (`active`, one bool
    each: their [start, end]); each combination is its own graph over the same buffers, so a step
    outside a ControlNet's range replays a graph captured without it.

    DeepCache, T-GATE and ToMe (`caches`, sdengine.acceleration.UNetCaches, started by the run on its
    step kinds): each kind of step (a full step keeping DeepCache's branch input, a cached step
    reusing it, T-GATE's phases) is its own graph, chosen per step from the run's schedule, over the
    same static buffers; what a step keeps for the next is copied into the caches' buffers inside
    the graph, and ToMe's random choices are copied in before each replay, like the noise.
    """

    def __init__(self, unet, dtype, device, fused: FusedRun, x_shape: tuple, context, added_cond=None,
                 extra_channels=None, *, channels_last: bool, kernel: bool, graphs: Optional[GraphCache] = None,
                 controls=(), controlnet_fn=None, caches=None):
        self.unet, self.dtype = unet, dtype
        self.sampler, self.prediction_type, self.kernel = fused.sampler, fused.prediction_type, kernel
        self.columns = fused.columns  # how a row of the table reads (a function of the row)
        self.do_cfg = context.shape[0] == 2 * x_shape[0]
        self.channels_last = channels_last
        fmt = torch.channels_last if channels_last else torch.contiguous_format

        def latent_buffer():
            return torch.zeros(x_shape, dtype=torch.float32, device=device).contiguous(memory_format=fmt)

        self.x = latent_buffer()
        self.row = torch.zeros(fused.table.shape[1], dtype=torch.float32, device=device)
        self.noise = latent_buffer() if fused.takes_noise else None
        self.old_denoised = latent_buffer() if fused.sampler == "dpmpp_2m" else None
        self.context = torch.zeros_like(context)
        self.added_cond = {k: torch.zeros_like(v) for k, v in added_cond.items()} if added_cond else None
        # inpainting: mask and masked-image latents, appended to the UNet input's channels
        self.extra_channels = torch.zeros_like(extra_channels).to(dtype) if extra_channels is not None else None
        # ControlNets: the request's images and scales (0-d float32, device scalars), copied in by start()
        self.controls = [dataclasses.replace(c, image=torch.zeros_like(c.image)) for c in controls]
        self.control_scales = [torch.zeros((), dtype=torch.float32, device=device) for _ in controls]
        self.controlnet_fn = controlnet_fn
        self.caches = caches
        self.kept = {}  # graph key -> what that kind of step keeps for later steps (its caches' slots)
        # active ControlNets (a tuple of bools), or with caches (active, the caches' step signature) -> graph
        self.graphs, self.step_graphs = graphs, {}
        self._active, self._signature = (), None
        self.busy = False  # held by a run (see GraphCache: busy entries are never dropped)

    @property
    def graph(self):
        """The graph of the step without ControlNets (None before its capture)."""
        return self.step_graphs.get(tuple(False for _ in self.controls) if self.controls else ())

    @staticmethod
    def key(sampler, prediction_type, x_shape, context, added_cond, extra_channels, takes_noise,
            instance, controls=(), tome=None, accelerated=False) -> tuple:
        extra = tuple(sorted((k, tuple(v.shape)) for k, v in (added_cond or {}).items()))
        channels = tuple(extra_channels.shape) if extra_channels is not None else None
        control = tuple(c.key for c in controls)  # which ControlNets, guess mode, image shapes
        return ("step", sampler, prediction_type, tuple(x_shape), tuple(context.shape), extra, channels,
                context.dtype, takes_noise, control, accelerated, tome, instance)

    def start(self, context, added_cond=None, extra_channels=None, controls=()):
        """Begin a run: copy its conditioning in (once, not at every step)."""
        self.context.copy_(context)
        for k, v in (added_cond or {}).items():
            self.added_cond[k].copy_(v)
        if extra_channels is not None:
            self.extra_channels.copy_(extra_channels)
        for buffer, scale, control in zip(self.controls, self.control_scales, controls):
            buffer.image.copy_(control.image)
            scale.fill_(float(control.scale))

    @torch.inference_mode()
    def __call__(self, x, row, noise=None, active=(), index: int = 0):
        """The state after one step from state x; row: the step's row of the step table;
        active: which ControlNets run at this step (one bool each); index: the step's index in the
        run (which kind of step it is, with caches)."""
        active = tuple(active)
        if len(active) != len(self.controls):
            raise ValueError(f"active names {len(active)} ControlNets, the step has {len(self.controls)}")
        self._active = active
        self._signature = self.caches.before(index) if self.caches is not None else None
        key = active if self._signature is None else (active, self._signature)
        if x is not self.x:
            self.x.copy_(x)
        self.row.copy_(row)
        if self.noise is not None:
            if noise is None:
                self.noise.zero_()
            else:
                self.noise.copy_(noise)
        if self.graphs is None:
            self.run()
        else:
            graph = self.step_graphs.get(key)
            if graph is None:
                graph = self.step_graphs[key] = self._capture()
            if graph is UNCAPTURABLE:
                self.run()
            else:
                graph.replay()
        if self.caches is not None:  # what this kind of step kept (recorded when it ran or was captured)
            self.caches.after(self.kept[key])
        return self.x

    def run(self):
        """The step on the buffers: what a CUDA graph of it captures."""
        from ..kernels.ops import sampler_update

        x = self.x
        timestep, c_in, cfg_scale, scalars = self.columns(self.row)  # device tensors
        signature = self._signature
        do_cfg = self.do_cfg and (signature is None or signature[0].cfg)
        rows = slice(None) if do_cfg or not self.do_cfg else slice(0, x.shape[0])  # T-GATE: the uncond rows
        context, extra_channels = self.context[rows], self.extra_channels
        added_cond = {k: v[rows] for k, v in self.added_cond.items()} if self.added_cond is not None else None
        x_in = (x * c_in).to(self.dtype)
        x_batch = torch.cat([x_in, x_in]) if do_cfg else x_in  # (2N, C, h, w): [uncond, cond]
        # (2N,) dense, as `denoise` passes it: one compiled UNet serves both (the compile layer)
        timestep = timestep.expand(x_batch.shape[0]).contiguous()
        if extra_channels is not None:  # inpainting: (2N, C + 1 + C, h, w)
            x_batch = torch.cat([x_batch, extra_channels[rows]], dim=1)
        if self.channels_last:
            x_batch = x_batch.contiguous(memory_format=torch.channels_last)
        residuals = {}
        if any(self._active):
            from ..controlnet import residuals as control_residuals

            live = [(c, s) for c, s, on in zip(self.controls, self.control_scales, self._active) if on]
            down, mid = control_residuals(self.controlnet_fn, [c for c, _ in live], [s for _, s in live], x_batch,
                                          timestep, context, added_cond, x.shape[1])
            residuals = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
        if signature is None:
            model_out = self.unet(x_batch, timestep, context, added_cond=added_cond, **residuals)
        else:  # DeepCache, T-GATE, ToMe: the UNet returns what it keeps, copied into the caches' buffers
            model_out, stored = self.unet(x_batch, timestep, context, added_cond=added_cond, **residuals,
                                          **self.caches.unet_kwargs(signature))
            self.kept[(self._active, signature)] = self.caches.keep(stored)  # the graph key, as __call__ makes it
        sampler_update(self.sampler, self.prediction_type, model_out, x, scalars, cfg_scale, self.noise,
                       self.old_denoised, kernel=self.kernel)
        return x

    def _capture(self):
        """Capture the step; the warm-up runs advance the state, so it is put back afterwards."""
        state = [b for b in (self.x, self.old_denoised) if b is not None]
        saved = [b.clone() for b in state]
        controls = f", ControlNets {''.join('1' if a else '0' for a in self._active)}" if self._active else ""
        if self._signature is not None:
            kind = self._signature[0]
            controls += f", DeepCache {kind.deep}, attention {kind.self_attn}/{kind.cross_attn}" + \
                (", ToMe" if kind.tome else "") + ("" if kind.cfg else ", no guidance")
        captured = self.graphs.try_capture(
            self.run, f"the whole {self.sampler} step at x {tuple(self.x.shape)}, "
                          f"context {tuple(self.context.shape)}{controls}")
        for b, s in zip(state, saved):
            b.copy_(s)
        return UNCAPTURABLE if captured is None else captured[0]


def device_step(fused: FusedRun, context, added_cond, extra_channels, *, unet, dtype, device, kernel: bool,
                channels_last: bool, graphs: Optional[GraphCache], controls=(), controlnet_fn=None, schedule=None,
                unet_config=None):
    """The function `step(x, i, noise) -> x_next` of a whole run (docs/CONTRACTS.md, Backends):
    the run's FusedRun (samplers/fused.py) on the device.

    On the first step it takes a free DeviceStep instance of the run's shape from the cache
    (capturing one on a miss) and holds it until the last step, or until the step function
    is dropped (a cancelled run). controls: the run's ControlNets (ControlInput, with `active`
    per step), run by controlnet_fn inside the step. schedule: the acceleration's StepKind per
    step (sdengine/acceleration.py), with unet_config (where ToMe's draws go).
    """
    table = fused.table.to(device)  # (steps, columns) float32
    last = table.shape[0] - 1
    state = {"entry": None}

    tome = schedule[0].tome if schedule else None

    def make(x_shape):
        caches = None
        if schedule:
            from ..acceleration import UNetCaches
            from ..models.unet import transformer_grids

            latent = tuple(x_shape[-2:])
            caches = UNetCaches(transformer_grids(unet_config, *latent), tome, latent, device)
        entry = DeviceStep(unet, dtype, device, fused, x_shape, context, added_cond, extra_channels,
                           channels_last=channels_last, kernel=kernel, graphs=graphs, controls=controls,
                           controlnet_fn=controlnet_fn, caches=caches)
        return entry

    def acquire(x_shape):
        if graphs is None:
            return make(x_shape)
        with graphs.lock:
            for instance in range(graphs.capacity + 1):
                key = DeviceStep.key(fused.sampler, fused.prediction_type, x_shape, context, added_cond, extra_channels,
                                     fused.takes_noise, instance, controls, tome, bool(schedule))
                entry = graphs.lookup(key, lambda: make(x_shape))
                if entry is None:  # cache full of busy entries: this run goes uncaptured
                    entry = make(x_shape)
                    entry.graphs = None
                    return entry
                if not entry.busy:
                    entry.busy = True
                    return entry
        raise AssertionError("unreachable: more busy instances than the cache holds")

    def release(_state=state):
        entry = _state["entry"]
        if entry is not None:
            entry.busy = False
            _state["entry"] = None

    def step(x, i, noise=None):
        entry = state["entry"]
        if entry is None:
            entry = state["entry"] = acquire(tuple(x.shape))
            entry.start(context, added_cond, extra_channels, controls)
            if entry.caches is not None:
                entry.caches.start(schedule)
        out = entry(x.to(device), table[i], _to_device(noise, device), tuple(c.active[i] for c in controls), i)
        if i == last:
            out = out.clone()  # the run's result outlives its hold on the instance
            release()
        return out

    weakref.finalize(step, release)  # a run dropped before its last step gives its instance back
    return step


def control_inputs(controls, device) -> list:
    """The tensor inputs of a graphed call with ControlNets: their images, then their scales as
    0-d float32 device tensors (so that one graph serves every scale)."""
    return [c.image for c in controls] + [torch.tensor(float(c.scale), dtype=torch.float32, device=device)
                                          for c in controls]


def _to_device(t, device):
    """t on `device`. From the CPU to CUDA through pinned memory, without blocking: a copy from
    pageable memory would wait for the GPU to finish the previous step."""
    if t is None or t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
