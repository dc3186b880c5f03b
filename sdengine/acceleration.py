"""Training-free acceleration: DeepCache, T-GATE and token merging (ToMe), as opt-ins of a request.

    pipe("a cat", deepcache=sdengine.DeepCache(interval=3, branch=0))  # DeepCacheSDHelper.set_params
    pipe("a cat", tgate=sdengine.TGate(gate_step=10))                  # tgate's TgateSDLoader(...).tgate
    pipe("a cat", tome=sdengine.ToMe(ratio=0.5))                       # tomesd.apply_patch(pipe, ratio=0.5)

Each option means what the authors' package means by it, and the images match that package's
patched diffusers pipeline on the same weights (tests/test_acceleration.py). Any combination is
allowed; with DeepCache, T-GATE restarts DeepCache's interval at its gate (as tgate's
TgateSDDeepCacheLoader does). T-GATE does not combine with ControlNets (refused, naming both).

How it runs: `schedule()` turns the options into one `StepKind` per step of the run (what that
step's UNet call computes, keeps and reuses: sdengine/models/caching.py), and `UNetCaches` keeps
the tensors between the calls of a run, in buffers whose address never changes, so that a backend
may capture each kind of step once as a CUDA graph and replay it (backends/cuda_graphs.py's
DeviceStep: one graph per kind of step, chosen per step from the schedule).

Deliberate differences from the packages, each for a property every sdengine image has:
- ToMe's random destination choice (tomesd's use_rand) comes from a generator seeded with
  TOME_SEED at the start of every run, not from a fork of torch's global RNG, and it is drawn for
  every batch size (tomesd turns it off for an odd batch): an image depends only on its seed.
- A step's index, not its timestep, counts DeepCache's interval (DeepCacheSDHelper looks the
  timestep up in the scheduler's list), so samplers that call the UNet twice per step (heun,
  dpm_2) cache per step.
- T-GATE without classifier-free guidance keeps its gate step's attention outputs as they are
  (tgate averages the unconditional and conditional halves, which do not exist then).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields
from typing import Callable, Optional

import torch

from .errors import InvalidArgumentError
from .models.caching import COMPUTE, REUSE, STORE, STORE_MEAN, StepKind, ToMeArgs, tome_applies, tome_draw_shape

TOME_SEED = 0  # seeds ToMe's random destination choices at the start of every run


def _fail(parameter: str, message: str):
    raise InvalidArgumentError(parameter, f"{parameter} {message}")


def _int_at_least(value, name: str, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
        _fail(name, f"must be an integer >= {least}, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class DeepCache:
    """DeepCache (Ma et al., CVPR 2024): every `interval`-th step runs the whole UNet and keeps the
    input of the skip branch `branch`'s first up layer; the steps between run that shallow branch
    only. DeepCacheSDHelper.set_params(cache_interval=interval, cache_branch_id=branch) in its
    uniform mode: branch b is down level b // 3, layer b % 3 (0: the shallowest, the fastest)."""

    interval: int = 3
    branch: int = 0

    def __post_init__(self):
        _int_at_least(self.interval, "deepcache.interval", 1)
        _int_at_least(self.branch, "deepcache.branch", 0)

    @property
    def level_and_layer(self) -> tuple:
        return self.branch // 3, self.branch % 3


@dataclass(frozen=True)
class TGate:
    """T-GATE (Zhang et al. 2024; TGATE-V2): cross-attention is computed until `gate_step`, then its
    output (at step gate_step - 1, averaged over the unconditional and conditional halves) is reused,
    and classifier-free guidance stops (the UNet runs once per step). Self-attention is kept at
    `warm_up` and every `sp_interval` steps before the gate and reused between, and from the gate on
    reused except every `fi_interval` steps. tgate's tgate(..., gate_step, sp_interval, fi_interval,
    warm_up) with its defaults."""

    gate_step: int = 10
    sp_interval: int = 5
    fi_interval: int = 1
    warm_up: int = 2

    def __post_init__(self):
        _int_at_least(self.gate_step, "tgate.gate_step", 1)
        _int_at_least(self.sp_interval, "tgate.sp_interval", 1)
        _int_at_least(self.fi_interval, "tgate.fi_interval", 1)
        _int_at_least(self.warm_up, "tgate.warm_up", 0)


@dataclass(frozen=True)
class ToMe(ToMeArgs):
    """Token merging for SD (Bolya & Hoffman 2023): before the self-attention of the transformer
    blocks at most `max_downsample` times downsampled, `ratio` of the tokens are merged into similar
    ones (one destination per sx x sy cell), and un-merged after it. tomesd.apply_patch's arguments
    and defaults (merge_crossattn, merge_mlp: merge for those too)."""

    def __post_init__(self):
        most = 1 - 1 / (self.sx * self.sy) if isinstance(self.sx, int) and isinstance(self.sy, int) else 1
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, numbers.Real) or not math.isfinite(self.ratio) \
                or not 0 <= self.ratio <= most:
            _fail("tome.ratio", f"must be a number in [0, {most:g}] (1 - 1/(sx·sy)), got {self.ratio!r}")
        _int_at_least(self.max_downsample, "tome.max_downsample", 1)
        _int_at_least(self.sx, "tome.sx", 1)
        _int_at_least(self.sy, "tome.sy", 1)
        for name in ("use_rand", "merge_attn", "merge_crossattn", "merge_mlp"):
            if not isinstance(getattr(self, name), bool):
                _fail(f"tome.{name}", f"must be True or False, got {getattr(self, name)!r}")

    def args(self) -> ToMeArgs:
        """The same arguments as the network reads them."""
        return ToMeArgs(**{f.name: getattr(self, f.name) for f in fields(ToMeArgs)})


# Each option's shorthand: a number for its main setting (the CLI's and the HTTP API's form).
_SHORTHAND = {"deepcache": (DeepCache, "interval", numbers.Integral), "tgate": (TGate, "gate_step", numbers.Integral),
              "tome": (ToMe, "ratio", numbers.Real)}


def as_option(value, name: str):
    """A request's deepcache / tgate / tome argument: None or False (off), the option, or its
    shorthand number (deepcache=3 is DeepCache(interval=3), tgate=10 TGate(gate_step=10), tome=0.5
    ToMe(ratio=0.5))."""
    cls, field_name, number = _SHORTHAND[name]
    if value is None or value is False:
        return None
    if isinstance(value, cls):
        return value
    if isinstance(value, number) and not isinstance(value, bool):
        return cls(**{field_name: value})
    _fail(name, f"must be None, a sdengine.{cls.__name__} or a number ({field_name}), got {type(value).__name__}")


@dataclass(frozen=True)
class Acceleration:
    """A request's acceleration options (any of them None)."""

    deepcache: Optional[DeepCache] = None
    tgate: Optional[TGate] = None
    tome: Optional[ToMe] = None

    def __bool__(self) -> bool:
        return any(getattr(self, f.name) is not None for f in fields(self))

    def names(self) -> list:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]

    def check_model(self, unet_config) -> None:
        """What depends on the model: DeepCache's branch must be in the UNet."""
        if self.deepcache is not None:
            level, layer = self.deepcache.level_and_layer
            levels = len(unet_config.block_out_channels)
            if level >= levels:
                _fail("deepcache.branch", f"must be below {3 * levels} for this UNet ({levels} levels: branch b is "
                                          f"level b // 3, layer b % 3), got {self.deepcache.branch}")

    def infotext(self) -> list:
        """The infotext fields (A1111's "Token merging ratio"; sdengine's names for the others)."""
        out = []
        if self.deepcache is not None:
            out += [("DeepCache interval", self.deepcache.interval), ("DeepCache branch", self.deepcache.branch)]
        if self.tgate is not None:
            out.append(("T-GATE gate step", self.tgate.gate_step))
        if self.tome is not None:
            out.append(("Token merging ratio", self.tome.ratio))
        return out

    def params(self) -> dict:
        """The options as plain data (GenerationResult.params)."""
        from dataclasses import asdict

        return {name: asdict(getattr(self, name)) for name in self.names()}

    def schedule(self, num_steps: int, do_cfg: bool) -> Optional[tuple]:
        """One StepKind per step, or None when nothing is on."""
        return schedule(self, num_steps, do_cfg) if self else None


def schedule(acceleration: Acceleration, num_steps: int, do_cfg: bool) -> tuple:
    """What each step of a run computes, keeps and reuses (a StepKind per step).

    T-GATE's phases are tgate's tgate_scheduler: before gate_step - 1, cross-attention is computed
    and self-attention computed (before warm_up), kept (at warm_up and every sp_interval-th step) or
    reused; at gate_step - 1 both are kept, as the mean of the two guidance halves; after it the
    cross-attention is reused, guidance is off, and self-attention is kept every fi_interval-th step
    and reused between. DeepCache's full steps are every interval-th from the run's first step, and,
    with T-GATE, from gate_step - 1 and from gate_step (where the batch halves).
    An attention output that no step reuses is not kept (the kind computes instead)."""
    deepcache, tgate, tome = acceleration.deepcache, acceleration.tgate, acceleration.tome
    starts = [0] + ([s for s in (tgate.gate_step - 1, tgate.gate_step) if s > 0] if tgate is not None else [])
    kinds = []
    for i in range(num_steps):
        cfg, self_attn, cross_attn = do_cfg, COMPUTE, COMPUTE
        if tgate is not None:
            gate = tgate.gate_step
            if i < gate - 1:
                if i == tgate.warm_up or (i > tgate.warm_up and i % tgate.sp_interval == 0):
                    self_attn = STORE
                elif i > tgate.warm_up:
                    self_attn = REUSE
            elif i == gate - 1:
                self_attn = cross_attn = STORE_MEAN if do_cfg else STORE
            else:
                cross_attn, cfg = REUSE, False
                self_attn = STORE if i % tgate.fi_interval == 0 else REUSE
        deep, branch = COMPUTE, None
        if deepcache is not None:
            start = max(s for s in starts if s <= i)
            deep = STORE if (i - start) % deepcache.interval == 0 else REUSE
            branch = deepcache.level_and_layer
        kinds.append(dict(cfg=cfg, deep=deep, branch=branch, self_attn=self_attn, cross_attn=cross_attn,
                          tome=tome.args() if tome is not None else None))
    # T-GATE's attention outputs are kept only where a step reuses them before the next keeps them
    # again (fi_interval 1 keeps none after the gate). With DeepCache, only where some later step
    # reuses them: a cached step keeps nothing of the deep blocks it skips, so a reuse there reads an
    # earlier full step's. DeepCache's last full step keeps its branch anyway: one kind of full step
    # (one graph) rather than two.
    for family in ("self_attn", "cross_attn"):
        events = [(i, kind[family]) for i, kind in enumerate(kinds) if kind[family] != COMPUTE]
        for n, (i, mode) in enumerate(events):
            later = [m for _, m in events[n + 1:]]
            needed = REUSE in later if deepcache is not None else bool(later) and later[0] == REUSE
            if mode in (STORE, STORE_MEAN) and not needed:
                kinds[i][family] = COMPUTE
    return tuple(StepKind(**kind) for kind in kinds)


class UNetCaches:
    """What the accelerated UNet calls of a run keep between them, for one shape of call.

    Kept tensors live in buffers keyed by (name, shape, dtype) whose address never changes, so a
    captured graph writes and reads them in place; `latest` says which buffer holds this run's
    latest version of each name. ToMe's random choices live in one buffer per transformer block,
    refilled before every call from the run's generator (seeded with TOME_SEED at `start`).

    A call goes: `before(i)` (outside any graph: picks step i's kind, draws ToMe's choices; returns
    the call's signature: what a graph of it bakes in), `unet_kwargs()` and `keep(stored)` (inside:
    the UNet's inputs, and copying what it kept into the buffers; returns where), `after(kept)`
    (outside: records this run's latest versions).
    """

    def __init__(self, grids: list, tome: Optional[ToMeArgs], latent_size: tuple, device):
        self.device = device
        self.buffers: dict = {}
        self.latest: dict = {}
        self.kinds: tuple = ()
        self.generator: Optional[torch.Generator] = None
        self.rand: dict = {}  # transformer block index -> (h // sy, w // sx, 1) int64 on the device
        self.draws = []  # (block index, shape, high) of ToMe's choices per call, in call order
        if tome is not None and tome.use_rand:
            self.draws = [(index, tome_draw_shape(tome, h, w), tome.sx * tome.sy) for index, h, w in grids
                          if tome_applies(tome, latent_size, h, w)]
        self._signature = None

    def start(self, kinds: tuple) -> None:
        """Begin a run of these step kinds: nothing kept yet, ToMe's generator reseeded."""
        self.kinds = tuple(kinds)
        self.latest.clear()
        self.generator = torch.Generator().manual_seed(TOME_SEED)

    def before(self, i: int) -> tuple:
        """Step i's kind and the buffers it reads (its signature); draws ToMe's choices."""
        kind = self.kinds[min(i, len(self.kinds) - 1)]
        for index, shape, high in self.draws:  # tomesd: torch.randint(sx·sy, (h//sy, w//sx, 1)) per block
            values = torch.randint(high, shape, generator=self.generator)
            if index not in self.rand:
                self.rand[index] = torch.empty(shape, dtype=torch.int64, device=self.device)
            self.rand[index].copy_(values)
        self._signature = (kind, tuple(sorted((k, v) for k, v in self.latest.items() if kind.reads(k))))
        return self._signature

    def unet_kwargs(self, signature: Optional[tuple] = None) -> dict:
        """The UNet's keyword arguments for the call of `signature` (default: the last before())."""
        kind, reads = signature or self._signature
        return dict(kind=kind, cached={name: self.buffers[slot] for name, slot in reads}, rand=self.rand)

    def keep(self, stored: dict) -> tuple:
        """Copy what a call kept into the buffers; returns ((name, slot), ...)."""
        kept = []
        for name, tensor in stored.items():
            slot = (name, tuple(tensor.shape), tensor.dtype)
            if slot not in self.buffers:
                self.buffers[slot] = torch.empty_like(tensor, memory_format=torch.contiguous_format)
            self.buffers[slot].copy_(tensor)
            kept.append((name, slot))
        return tuple(kept)

    def after(self, kept: tuple) -> None:
        self.latest.update(kept)

    def call(self, i: int, unet_call):
        """One direct (uncaptured) call of step i: unet_call(UNetStep) -> the UNet's output."""
        kept = []
        out = unet_call(UNetStep(self.unet_kwargs(self.before(i)), lambda stored: kept.extend(self.keep(stored))))
        self.after(tuple(kept))
        return out


@dataclass(frozen=True)
class UNetStep:
    """An accelerated UNet call as a backend's `denoise(..., step=)` gets it: the UNet's keyword
    arguments (`kind`, `cached`, `rand`), and `keep(stored)`, which takes what the UNet returned
    kept (models/unet.py: with `kind`, the UNet returns (output, stored))."""

    kwargs: dict
    keep: Callable


def check_request(acceleration: Acceleration, controls) -> None:
    """The combinations that are refused: T-GATE with ControlNets (after the gate the UNet runs
    without guidance on reused cross-attention, which a ControlNet's residuals do not follow)."""
    if acceleration.tgate is not None and controls:
        _fail("tgate", "does not combine with control= (ControlNets): use deepcache or tome with ControlNets")
