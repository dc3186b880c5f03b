"""The text-to-image pipeline: txt2img, img2img and inpainting over any backend.

Data flows one way, and `Pipeline._run` reads in that order:

    request -> validate (Run: prompts, images, ControlNets, the sampler's Plan)
            -> encode text (context [uncond, cond]) -> initial latents
            -> the sampler loop, driving the backend's fused step (UNet + guidance + sampler
               update in one function) or model_fn (UNet at batch 2 + classifier-free guidance)
            -> decode -> images

The pipeline never asks which backend it holds: every backend implements the interface of
sdengine/backends/base.py (docs/CONTRACTS.md), whose optional parts answer "not covered" (no
fused step: None; no whole requests: None). A backend that runs whole requests itself
(native: the C++ loop) returns the images from `run_request`. Every image has its own seed
and generator, so an image depends only on its seed, not on the batch.
"""

from __future__ import annotations

import gc
import logging
import threading
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from . import images as imaging
from . import prompt_syntax as a1111
from . import samplers
from .config import ModelConfig
from .controlnet import (ControlInput, ControlNet, check_fits, control_params, controlnet_infotext, keep_table,
                         load_controlnet, prepare_image)
from .errors import GenerationCancelled, InvalidArgumentError, OutOfMemoryError
from .images import numpy_to_pil  # noqa: F401 (re-exported: sdengine.pipeline.numpy_to_pil)
from .lora import LoraWeights, ReadWriteLock
from .request import DEFAULT_GUIDANCE, Request, takes_request_arguments
from .samplers import Plan
from .samplers.plan import steps_before
from .vae_tiling import AUTO_TILE_CELLS, tiled_decode

if TYPE_CHECKING:  # the backend is handed in (sdengine.api builds it): the pipeline imports no backend
    from .backends.base import Backend

log = logging.getLogger("sdengine")


def is_out_of_memory(error: BaseException) -> bool:
    """A failed allocation: CUDA's OutOfMemoryError, MemoryError, or torch's CPU allocator
    giving up ("DefaultCPUAllocator: can't allocate memory", a plain RuntimeError)."""
    return isinstance(error, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(error, RuntimeError) and "can't allocate memory" in str(error))


@dataclass
class GenerationResult:
    """What one call produced.

    images: a list of PIL images ("pil"), a float array (N, H, W, 3) in [0, 1] ("np"),
            or the final latents (N, C, h, w) ("latent").
    seeds:  the seed of each image.
    params: the generation parameters, for reproducing and for PNG metadata.
    """

    images: Any
    seeds: list
    params: dict = field(default_factory=dict)

    def infotext(self, index: int = 0) -> str:
        """A1111's `parameters` text for image `index`, with A1111's names and counts (its sampler
        and schedule labels, its clip skip), so that A1111 and the tools that read it take it back.
        It describes what ran: a run under diffusers' rules says so ("Sampler conventions:
        diffusers", which A1111 would draw differently), and Request.from_infotext draws the same
        image from it (sdengine.infotext)."""
        from .infotext import CONVENTIONS_FIELD, bare, format_infotext, quote
        from .samplers import a1111
        from .samplers.names import A1111_LABELS, A1111_SCHEDULES

        p = self.params
        if p.get("conventions") == "a1111":
            sampler = a1111.label_of(p["sampler"])
            schedule = next(label for label, name in A1111_SCHEDULES.items() if name == p["schedule"])
            default_eta = a1111.options_of(p["sampler"]).get("eta")  # None: the sampler has no eta
            eta_name = "Eta DDIM" if p["sampler"] in a1111.TIMESTEP_SAMPLERS else "Eta"  # A1111's eta_ddim option
            eta_field = (eta_name, p["eta"] if default_eta is not None and p.get("eta") != default_eta else None)
        else:
            sampler = A1111_LABELS["samplers"].get(p["sampler"], p["sampler"])
            schedule = A1111_LABELS["schedules"].get(p["schedule"], p["schedule"])
            eta_field = ("Eta DDIM", p.get("eta") or None)
        subseeds = p.get("subseeds") or []
        resize = p.get("seed_resize_from")
        hires = p.get("hires")
        # A1111 writes the first pass's size, and the hires fix's denoising strength
        width, height = p.get("first_pass_size") or (p["width"], p["height"])
        strength = hires.denoising_strength if hires is not None else \
            p.get("strength") if p.get("mode") != "txt2img" else None
        fields_ = [
            ("Steps", p["steps"]), ("Sampler", sampler), ("Schedule type", schedule),
            ("CFG scale", p["guidance_scale"]), ("Seed", self.seeds[index]),
            ("Size", f"{width}x{height}"), ("Model", p.get("model")),
            ("Variation seed", subseeds[index] if subseeds else None),
            ("Variation seed strength", p.get("subseed_strength") or None),
            ("Seed resize from", f"{resize[0]}x{resize[1]}" if resize else None),
            ("Denoising strength", strength),
            # A1111 counts the last layer too: its "Clip skip: 2" is diffusers' clip_skip=1
            ("Clip skip", p["clip_skip"] + 1 if p.get("clip_skip") else None),
            ("ENSD", p.get("eta_noise_seed_delta") or None),
            # A1111 leaves its default, GPU, out
            ("RNG", {"cpu": "CPU", "nv": "NV"}.get(p.get("rng", "cpu"))),
            eta_field,
            ("Prompt syntax", "plain" if "prompt_syntax" in p and p["prompt_syntax"] is None else None),
            (CONVENTIONS_FIELD, "diffusers" if p.get("conventions") == "diffusers" else None),
            ("Lora hashes", quote(", ".join(f"{bare(lora['name'])}: {lora['hash']}" for lora in p.get("loras") or [])
                                  or None)),
        ]
        if hires is not None:
            from .hires import infotext_fields

            hires_sampler = a1111.label_of(p["hires_sampler"]) if p.get("conventions") == "a1111" else \
                A1111_LABELS["samplers"].get(p["hires_sampler"], p["hires_sampler"])
            fields_ += [(k, quote(v) if isinstance(v, str) else v)
                        for k, v in infotext_fields(hires, dict(p, hires_sampler_label=hires_sampler))]
        if p.get("refiner"):
            fields_ += [("Refiner", quote(p["refiner"])), ("Refiner switch at", p["refiner_switch_at"])]
        # A1111's ControlNet extension: one "ControlNet i" field per unit, its settings in one quoted value
        units = [controlnet_infotext(c) for c in p.get("controls") or []] + list(p.get("ip_adapters") or [])
        fields_ += [(f"ControlNet {i}", quote(", ".join(f"{k}: {v}" for k, v in unit.items())))
                    for i, unit in enumerate(units)]
        fields_ += list(p.get("acceleration_infotext") or [])  # DeepCache, T-GATE, "Token merging ratio"
        negatives = p.get("negative_prompts") or []
        return format_infotext(p["prompts"][index], negatives[index] if negatives else "", fields_)


@dataclass(frozen=True)
class Run:
    """A checked request made concrete for the pipeline's model (Pipeline._validate): what the
    steps of the flow, and a backend that runs whole requests (`run_request`), read."""

    request: Request            # checked, for this model (Request.for_model): sizes and strength resolved
    texts: list                 # the prompts, one per image, without their <lora:> tags
    negatives: list             # the negative prompts, one per image, without their tags
    tag_loras: list             # the LoRAs the tags add for this call (LoraSpec)
    controlnets: list           # request.controls' ControlNets, loaded and checked against the model
    image: Optional[torch.Tensor]  # init image (N, 3, H, W) in [-1, 1] at the request's size
    mask: Optional[torch.Tensor]   # inpainting mask (N, 1, H, W) in {0, 1}, 1 = repaint
    plan: Plan                  # the sampler's schedule (plan.sampler, plan.schedule: canonical names)
    init_for_sampler: bool      # the sampler starts from the image's latents (img2img, inpainting below 1.0)
    generators: list            # one CPU generator per image, seeded: every draw of the run comes from them
    image_noise: Any = None     # A1111's rules: its per-image generators (samplers.rng.ImageNoise), else None

    @property
    def do_cfg(self) -> bool:
        """Classifier-free guidance: the UNet runs on [uncond, cond]. diffusers skips it at a scale
        of 1 or below; A1111 only at exactly 1 (a scale below 1 mixes in the negative prompt)."""
        if self.plan.conventions == "a1111":
            return self.request.guidance_scale != 1.0
        return self.request.guidance_scale > 1.0


class _Progress:
    """The run's progress bar and callback: called with (step_index, latents or None) after
    every step (`samplers.sample`'s callback, a backend's on_step); `step` is the index of the
    step running now. A callback returning False cancels (GenerationCancelled). A request of
    several passes (hires fix, refiner) counts its steps on one bar: `next_pass()` makes the
    following calls' indexes continue from the steps done; `pass_step` is the index in the pass."""

    def __init__(self, run: Run, total: Optional[int] = None):
        self.total, self.callback, self.step = total or run.plan.num_steps, run.request.callback, 0
        self.offset = 0
        self.bar = tqdm(total=self.total, desc=run.plan.sampler, unit="step", disable=not run.request.progress,
                        leave=False)

    def __call__(self, index: int, latents) -> None:
        index += self.offset
        self.step = index + 1
        self.bar.update(1)
        if self.callback is not None and self.callback(index, self.total, latents) is False:
            raise GenerationCancelled(f"cancelled by the callback at step {index + 1}")

    @property
    def pass_step(self) -> int:
        return self.step - self.offset

    def next_pass(self) -> None:
        self.offset = self.step

    def __enter__(self) -> "_Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()


class Pipeline:
    """A loaded model and its backend. Call it to generate images."""

    def __init__(self, backend: Backend, tokenizer, tokenizer_2=None, name: Optional[str] = None):
        self.backend = backend
        self.config: ModelConfig = backend.config
        self.tokenizer = tokenizer
        self.tokenizer_2 = tokenizer_2
        self.name = name or self.config.name
        # Requests read the weights, set_loras and load_embedding write them (sdengine/lora.py).
        self._weights_lock = ReadWriteLock()
        self._loras: Optional[LoraWeights] = None  # made on the first set_loras
        self._lora_set: list = []  # the set given to set_loras; a1111 prompts may add to it per call
        self._controlnets: dict = {}  # path -> ControlNet, loaded on first use by a Control naming a path
        self._controlnets_lock = threading.Lock()
        self._ip_adapters: list = []  # sdengine.ip_adapter.IPAdapter, in load order (load_ip_adapter)
        self._image_encoder = None    # their CLIP vision model

    def __repr__(self):
        return (f"Pipeline({self.name!r}, backend={self.backend.name}, "
                f"device={self.backend.device}, dtype={self.backend.dtype})")

    # ------------------------------------------------------------------
    # The one public entry point
    # ------------------------------------------------------------------

    @takes_request_arguments
    def __call__(self, prompt: str | Sequence[str], **options) -> GenerationResult:
        """Generate images from `prompt`: txt2img, img2img (init_image) or inpainting
        (init_image and mask_image). The options, their defaults and meanings are those of
        Request.from_args (sdengine/request.py), shown here by help() and inspect."""
        return self.run(Request.from_args(prompt, **options).for_model(self.config))

    def run(self, request: Request) -> GenerationResult:
        """Generate from a checked request: `Request.from_args(...).for_model(pipe.config)`
        (sdengine.request), as __call__ does.

        Running out of memory (CUDA, or a failed host allocation) raises OutOfMemoryError
        naming the size and batch, after freeing what the request allocated: its tensors
        (the failed call's frames are cleared), the backend's per-request caches
        (`release_memory()`, e.g. CUDA graphs) and CUDA's cached blocks."""
        try:
            return self._run(request)
        except Exception as e:  # noqa: BLE001 (re-raised unless it is an allocation failure)
            if not is_out_of_memory(e):
                raise
            failure = e
        raise self._out_of_memory(failure, request) from failure

    def _out_of_memory(self, failure: BaseException, request: Request) -> OutOfMemoryError:
        """Free what the failed request held and describe it. Called outside the except block,
        so that only `failure` still refers to the request's frames, and those are cleared."""
        traceback.clear_frames(failure.__traceback__)
        detail = str(failure).strip().splitlines()[0] if str(failure).strip() else type(failure).__name__
        failure.__traceback__ = failure.__context__ = failure.__cause__ = None
        self.backend.release_memory()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        device = self.backend.device
        return OutOfMemoryError(
            f"out of memory on {device} generating {request.n_images} image(s) of {request.width}x{request.height} "
            f"(batch_size {request.batch_size}, {request.steps} steps): {detail}; what the request allocated is "
            f"freed: try a smaller size or batch")

    def _run(self, request: Request) -> GenerationResult:
        """validate -> encode -> initial latents -> the sampler loop -> decode; with a hires fix,
        upscale and a second sampler loop before the decode; with a refiner, its loop on the
        latents handed over, and its decode."""
        run = self._validate(request)  # what needs the model, checked before any work
        # what the backend compiles for this workload, once (the triton layer's kernels, in parallel)
        ip_tokens = tuple(a.num_tokens for a in self._ip_adapters) if request.ip_adapter_image else ()
        self.backend.prepare(request.height, request.width, request.n_images, run.plan.sampler, run.plan.schedule,
                             ip_tokens=ip_tokens)
        controls = self._control_inputs(run)  # a backend that runs no ControlNets refuses here
        if request.acceleration:  # a backend that cannot run DeepCache, T-GATE or ToMe refuses here
            self.backend.check_acceleration(request.acceleration)
        hires = self._hires_run(run) if request.hires is not None else None
        if hires is not None:  # the second pass's size and sampler
            h = hires.request
            self.backend.prepare(h.height, h.width, h.n_images, hires.plan.sampler, hires.plan.schedule,
                                 ip_tokens=ip_tokens)
        refiner = request.refiner
        handoff = refiner._handoff_run(run) if refiner is not None else None
        total = sum(r.plan.num_steps for r in (run, hires, handoff) if r is not None)
        with self._holding_weights(run.tag_loras) as loras, _Progress(run, total) as progress:
            params = self._params(run, loras, hires, handoff)
            pixels = self.backend.run_request(run, self.tokenizer, self.tokenizer_2, progress)
            if pixels is not None:  # a backend that runs whole requests itself (native: the C++ loop)
                return self._result(run, params, pixels=pixels)
            x = self._sample(run, controls, progress)
            if hires is not None:
                progress.next_pass()
                x = self._sample(hires, self._control_inputs(hires), progress, init_latents=self._upscale(run, hires, x))
            if handoff is not None:
                progress.next_pass()
                x = refiner._refine(handoff, x, progress)
            if request.output_type == "latent":
                return GenerationResult(x, list(request.seeds), params)
            decoder = refiner if refiner is not None else self
            return self._result(run, params, decoded=decoder.decode_latents(x, tiling=request.vae_tiling))

    def _sample(self, run: "Run", controls: list, progress: "_Progress", init_latents=None,
                add_noise: bool = True) -> torch.Tensor:
        """One sampler loop over run.plan: encode, initial latents, the backend's fused step or
        model_fn; returns diffusers' latents at the plan's end. init_latents: latents to start
        from instead of the request's (a hires fix's upscaled latents: noised with fresh noise from
        run.generators; a refiner's: as they are, add_noise=False)."""
        context, added_cond = self._encode(run)
        if init_latents is None:
            noise, init_latents, extra_channels = self._initial_latents(run)
        else:
            noise = None
            if add_noise:  # fresh noise at these latents' shape: A1111's generators' first draws, or diffusers'
                noise = run.image_noise.first() if run.image_noise is not None else samplers.randn(
                    tuple(init_latents.shape), run.generators, torch.device("cpu"), torch.float32)
                noise = noise.to(self.backend.device, torch.float32)
            init_latents, extra_channels = init_latents.to(self.backend.device, torch.float32), None
        acceleration = run.request.acceleration  # DeepCache, T-GATE, ToMe: their kinds over this pass's steps
        kinds = acceleration.schedule(run.plan.num_steps, run.do_cfg) if acceleration else None
        step = None if run.plan.conventions == "a1111" else self.backend.fused_step(  # A1111: the Python loop
            run.plan, context, run.request.guidance_scale, added_cond, extra_channels,
            **({"controls": controls} if controls else {}), **({"schedule": kinds} if kinds else {}))
        model_fn = None if step is not None else self._model_fn(run, context, added_cond, extra_channels,
                                                                  controls, progress, kinds)
        return samplers.sample(model_fn, noise, run.plan, step=step, init_latents=init_latents,
                               generators=run.image_noise or run.generators, callback=progress, add_noise=add_noise)

    # ------------------------------------------------------------------
    # Second passes: A1111's hires fix, SDXL's refiner
    # ------------------------------------------------------------------

    def _hires_run(self, run: "Run") -> "Run":
        """The hires fix's second pass (sdengine/hires.py), checked before any work: the request at
        the target size with the hires prompts and sampler, the last steps of A1111's longer
        schedule, and fresh generators from the same seeds (the second pass's noise is drawn again
        at the larger shape, as A1111's sample_hr_pass does)."""
        r, hires = run.request, run.request.hires
        target = hires.target(r.width, r.height, self.config.vae.downscale)
        texts, negatives = run.texts, run.negatives
        if hires.prompt is not None:
            texts = [a1111.extract_lora_tags(hires.prompt)[0] if r.prompt_syntax else hires.prompt] * r.n_images
        if hires.negative_prompt is not None:
            negatives = [a1111.extract_lora_tags(hires.negative_prompt)[0] if r.prompt_syntax
                         else hires.negative_prompt] * r.n_images
        request = replace(r, width=target.width, height=target.height, hires=None, prompts=tuple(texts),
                          negative_prompts=tuple(negatives),
                          negative_prompt_given=r.negative_prompt_given or hires.negative_prompt is not None)
        total, steps = hires.schedule(r.steps)
        try:  # the first pass's rules (A1111's or diffusers'), whatever vocabulary hires.sampler uses
            plan = samplers.plan_for(hires.sampler or r.sampler, r.schedule, total, self.config.scheduler,
                                     eta=r.eta, conventions=run.plan.conventions,
                                     is_sdxl=self.config.is_sdxl).window(total - steps)
        except ValueError as e:
            raise InvalidArgumentError("hires", f"hires: {e}") from None
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in r.seeds]
        return replace(run, request=request, texts=texts, negatives=negatives, plan=plan, generators=generators,
                       init_for_sampler=True, image_noise=self._image_noise(request, plan))

    def _upscale(self, run: "Run", hires_run: "Run", latents: torch.Tensor) -> torch.Tensor:
        """The first pass's latents at the second pass's size: a latent upscaler's interpolation, or
        decode -> A1111's pixel upscaler on 8-bit images -> encode (the posterior's mean)."""
        from . import hires as hires_fix

        r, cell = run.request, self.config.vae.downscale
        target = r.hires.target(r.width, r.height, cell)
        if r.hires.latent:
            return hires_fix.upscale_latents(latents, target, r.hires.upscaler, cell)
        images = hires_fix.upscale_pixels(self.decode_latents(latents, tiling=r.vae_tiling), target, r.hires.upscaler)
        vae = self.config.vae
        mean = torch.cat([self.backend.encode_image(images[i:i + 1])[0] for i in range(len(images))])
        encoded = (mean - vae.shift_factor if vae.shift_factor is not None else mean) * vae.scaling_factor
        return hires_fix.crop_latents(encoded, target)

    def _handoff_run(self, base: "Run") -> "Run":
        """The refiner's part of a base run (called on the refiner): the same prompts (without
        their <lora:> tags), seeds and settings for this model, and the steps of its own schedule
        after `refiner_switch_at` (diffusers' denoising_start), continuing the base's generators."""
        r = base.request
        request = replace(r, prompts=tuple(base.texts), negative_prompts=tuple(base.negatives), refiner=None,
                          controls=(), init_image=None, mask_image=None, latents=None, mode="txt2img",
                          strength=None, ip_adapter_image=(), ip_adapter_scale=()).for_model(self.config)
        plan = samplers.plan_for(r.sampler, r.schedule, r.steps, self.config.scheduler, eta=r.eta,
                                 conventions=base.plan.conventions, is_sdxl=True)
        start = steps_before(plan, r.refiner_switch_at, self.config.scheduler.num_train_timesteps)
        if start >= plan.num_steps:
            raise InvalidArgumentError("refiner_switch_at", f"refiner_switch_at={r.refiner_switch_at} leaves the "
                                                            f"refiner no step of {r.steps}: lower it or add steps")
        if request.acceleration:  # the refiner's steps run the request's DeepCache, T-GATE or ToMe too
            self.backend.check_acceleration(request.acceleration)
        return Run(request, list(base.texts), list(base.negatives), [], [], None, None, plan.window(start), False,
                   base.generators, base.image_noise)

    def _refine(self, run: "Run", latents: torch.Tensor, progress: "_Progress") -> torch.Tensor:
        """The refiner's loop (called on the refiner) from the base's latents, under its own weights."""
        self.backend.prepare(run.request.height, run.request.width, run.request.n_images, run.plan.sampler,
                             run.plan.schedule)
        with self._holding_weights([]):
            return self._sample(run, [], progress, init_latents=latents, add_noise=False)

    # ------------------------------------------------------------------
    # Steps of the flow
    # ------------------------------------------------------------------

    def _validate(self, request: Request) -> "Run":
        """The request made concrete for this model: prompts without their <lora:> tags (and the
        LoRAs those add), its ControlNets loaded and checked, its images as tensors at its size,
        and the sampler's plan (validated: names, steps, strength)."""
        texts, negatives, tag_loras = list(request.prompts), list(request.negative_prompts), []
        if request.prompt_syntax:
            texts, negatives, tag_loras = a1111.lora_tags(texts, negatives, request.lora_dir)
        controlnets = [self._controlnet(c.model) for c in request.controls]
        height, width = request.height, request.width
        image = None if request.init_image is None else imaging.image_tensor(request.init_image, height, width)
        mask = None if request.mask_image is None else imaging.mask_tensor(request.mask_image, height, width)
        init_for_sampler = request.mode == "img2img" or (request.mode == "inpaint" and request.strength < 1.0)
        try:
            plan = samplers.plan_for(request.sampler, request.schedule, request.steps, self.config.scheduler,
                                     strength=request.strength if init_for_sampler else 1.0, eta=request.eta,
                                     conventions=request.conventions, is_sdxl=self.config.is_sdxl)
        except ValueError as e:
            if not str(e).startswith("eta"):
                raise
            raise InvalidArgumentError("eta", str(e)) from None
        if request.refiner is not None:  # diffusers' denoising_end: the steps before the cutoff
            stop = steps_before(plan, request.refiner_switch_at, self.config.scheduler.num_train_timesteps)
            if stop == 0:
                raise InvalidArgumentError("refiner_switch_at", f"refiner_switch_at={request.refiner_switch_at} "
                                                                "leaves the base no step: raise it")
            plan = plan.window(0, stop) if stop < plan.num_steps else plan
        if request.ip_adapter_image and len(request.ip_adapter_image) != len(self._ip_adapters):
            raise InvalidArgumentError("ip_adapter_image", f"ip_adapter_image holds {len(request.ip_adapter_image)} "
                                                           f"image(s) for {len(self._ip_adapters)} loaded IP-Adapter(s) "
                                                           "(pipe.load_ip_adapter): give one per adapter")
        if len(request.ip_adapter_scale) > 1 and len(request.ip_adapter_scale) != len(self._ip_adapters):
            raise InvalidArgumentError("ip_adapter_scale", f"ip_adapter_scale holds {len(request.ip_adapter_scale)} "
                                                           f"scales for {len(self._ip_adapters)} IP-Adapter(s)")
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in request.seeds]  # one per image
        return Run(request, texts, negatives, tag_loras, controlnets, image, mask, plan, init_for_sampler, generators,
                   self._image_noise(request, plan))

    def _image_noise(self, request: Request, plan: Plan):
        """A1111's per-image generators for a run under its rules (variation seeds, seed resizing,
        ENSD, its RNG sources); None under diffusers' rules, which take none of those options."""
        if plan.conventions != "a1111":
            a1111_only = [("subseed_strength", request.subseed_strength),
                          ("seed_resize_from_w", request.seed_resize_from),
                          ("eta_noise_seed_delta", request.eta_noise_seed_delta), ("rng", request.rng != "cpu")]
            for name, value in a1111_only:
                if value:
                    raise InvalidArgumentError(name, f"{name} is one of A1111's seed options: it applies under A1111's "
                                                     f"rules (an A1111 sampler label, or conventions='a1111'), not to "
                                                     f"diffusers' {plan.sampler}")
            return None
        from .samplers.rng import ImageNoise

        vae = self.config.vae
        shape = (vae.latent_channels, request.height // vae.downscale, request.width // vae.downscale)
        try:
            return ImageNoise(shape, request.seeds, subseeds=request.subseeds, subseed_strength=request.subseed_strength,
                              seed_resize_from=request.seed_resize_from,
                              eta_noise_seed_delta=request.eta_noise_seed_delta, source=request.rng,
                              device=self.backend.device, downscale=vae.downscale)
        except ValueError as e:
            raise InvalidArgumentError("rng", str(e)) from None

    def _params(self, run: "Run", loras: list, hires: Optional["Run"] = None, handoff: Optional["Run"] = None) -> dict:
        """The generation parameters of the result (and of the PNG's infotext)."""
        r = run.request
        params = dict(
            mode=r.mode, prompts=list(r.prompts), negative_prompts=run.negatives, steps=r.steps,
            sampler=run.plan.sampler, schedule=run.plan.schedule, guidance_scale=r.guidance_scale, height=r.height,
            width=r.width, strength=r.strength, model=self.name, clip_skip=r.clip_skip, loras=loras,
            eta=run.plan.options.get("eta", r.eta or 0.0), conventions=run.plan.conventions,
            prompt_syntax=r.prompt_syntax, rng=r.rng, eta_noise_seed_delta=r.eta_noise_seed_delta,
            subseeds=list(r.subseeds), subseed_strength=r.subseed_strength, seed_resize_from=r.seed_resize_from,
            controls=[control_params(c, cn, r.width, r.height) for c, cn in zip(r.controls, run.controlnets)],
            acceleration=r.acceleration.params() if r.acceleration else {},
            acceleration_infotext=r.acceleration.infotext() if r.acceleration else [],
        )
        if hires is not None:  # the image is the second pass's size
            params.update(hires=r.hires, hires_sampler=hires.plan.sampler, first_pass_size=(r.width, r.height),
                          width=hires.request.width, height=hires.request.height)
        if handoff is not None:
            params.update(refiner=r.refiner.name, refiner_switch_at=r.refiner_switch_at)
        if self.config.requires_aesthetics_score:
            params.update(aesthetic_score=r.aesthetic_score, negative_aesthetic_score=r.negative_aesthetic_score)
        if r.ip_adapter_image:
            from .ip_adapter import infotext_unit

            scales = r.ip_adapter_scale * len(self._ip_adapters) if len(r.ip_adapter_scale) == 1 else \
                r.ip_adapter_scale or (1.0,) * len(self._ip_adapters)
            params["ip_adapters"] = [infotext_unit(a, self._image_encoder, self.config, s)
                                     for a, s in zip(self._ip_adapters, scales)]
        return params

    def _encode(self, run: "Run") -> tuple:
        """(context (2N or N, 77·windows, D), added_cond or None): [uncond, cond] rows with guidance."""
        r, cfg = run.request, self.config
        syntax = r.prompt_syntax
        # A1111's syntax: prompt and negative prompt take the same number of 77-token windows.
        windows = a1111.count_windows(self.tokenizer or self.tokenizer_2, run.texts + (run.negatives if run.do_cfg else [])) \
            if syntax else None
        context, pooled = self._encode_prompts(run.texts, r.clip_skip, syntax, windows)
        # SDXL micro-conditioning: (original size, crop top-left, target size), or the refiner's
        # (original size, crop top-left, aesthetic score), the negative rows with the negative score
        size = [r.height, r.width, 0, 0]
        time_ids = [size + [r.aesthetic_score]] if cfg.requires_aesthetics_score else [size + [r.height, r.width]]
        time_ids = time_ids * context.shape[0]
        if run.do_cfg:
            # diffusers' force_zeros_for_empty_prompt (read per model: SDXL's base has it, its refiner not)
            if cfg.is_sdxl and cfg.force_zeros_for_empty_prompt and not r.negative_prompt_given:
                neg_context, neg_pooled = torch.zeros_like(context), torch.zeros_like(pooled)
            else:
                neg_context, neg_pooled = self._encode_prompts(run.negatives, r.clip_skip, syntax, windows)
            context = torch.cat([neg_context, context])  # (2N, 77·windows, D): [uncond, cond]
            pooled = torch.cat([neg_pooled, pooled]) if pooled is not None else None
            negative = size + [r.negative_aesthetic_score] if cfg.requires_aesthetics_score else time_ids[0]
            time_ids = [negative] * (context.shape[0] // 2) + time_ids
        added_cond = None
        if cfg.unet.addition_embed_type == "text_time":
            added_cond = {"text_embeds": pooled, "time_ids": torch.tensor(time_ids, dtype=torch.float32)}
        if r.ip_adapter_image:  # the image tokens and scales: step inputs (sdengine/ip_adapter.py)
            from .ip_adapter import image_tokens

            scales = r.ip_adapter_scale * len(self._ip_adapters) if len(r.ip_adapter_scale) == 1 else \
                r.ip_adapter_scale or (1.0,) * len(self._ip_adapters)
            added_cond = {**(added_cond or {}), **image_tokens(
                self._ip_adapters, self._image_encoder, r.ip_adapter_image, scales, r.n_images, run.do_cfg,
                self.backend.device, self.backend.dtype)}
        return context, added_cond

    def _initial_latents(self, run: "Run") -> tuple:
        """(noise (N, C, h, w) float32 on the device, the image latents the sampler starts from or
        None, inpainting's extra UNet input channels (2N or N, 1 + C, h, w) or None). The image
        latents, the noise and the masked image's latents are drawn from the generators in this
        order, as diffusers draws them."""
        r, device, vae = run.request, self.backend.device, self.config.vae
        generators = run.generators
        latent_shape = (r.n_images, vae.latent_channels, r.height // vae.downscale, r.width // vae.downscale)
        init_latents = self._encode_images(run.image, generators) if run.init_for_sampler else None
        if r.latents is not None:
            noise = r.latents
        elif run.image_noise is not None:  # A1111's rules: its generators' first draws
            noise = run.image_noise.first()
        else:
            noise = samplers.randn(latent_shape, generators, torch.device("cpu"), torch.float32)
        noise = noise.to(device, torch.float32)
        if r.mode != "inpaint":
            return noise, init_latents, None
        masked_image_latents = self._encode_images(run.image * (run.mask < 0.5), generators)
        mask_latent = torch.nn.functional.interpolate(run.mask, size=latent_shape[-2:])  # nearest
        extra_channels = torch.cat([mask_latent, masked_image_latents], dim=1).to(device)  # (N, 1 + C, h, w)
        return noise, init_latents, torch.cat([extra_channels, extra_channels]) if run.do_cfg else extra_channels

    def _model_fn(self, run: "Run", context, added_cond, extra_channels, controls: list, progress: "_Progress",
                  kinds: Optional[tuple] = None):
        """model_fn(x_in, t) -> the raw model output (the config's prediction type) with guidance
        applied: one UNet forward on [uncond, cond], with the ControlNets active at this step.
        with_uncond=True (A1111's DDIM CFG++): (guided output, unconditional output), the scale
        multiplied by guidance_multiplier; without guidance both are the conditional output.
        kinds: the acceleration's StepKind per step (sdengine/acceleration.py), whose caches live
        for this run; a step whose kind turns guidance off (T-GATE after its gate) runs the UNet on
        the unconditional rows alone, as tgate does."""
        do_cfg, guidance_scale, total = run.do_cfg, run.request.guidance_scale, run.plan.num_steps
        caches = self._unet_caches(run, kinds) if kinds else None

        def denoise(x_batch, t_batch, context, added_cond, extra, i, step=None):
            if extra is not None:
                x_batch = torch.cat([x_batch, extra.to(x_batch.dtype)], dim=1)
            options = {"step": step} if step is not None else {}
            if controls:  # the ControlNets active at step i
                options["controls"] = [c for c in controls if c.active[i]]
            return self.backend.denoise(x_batch, t_batch, context, added_cond, **options)

        def model_fn(x_in, t, with_uncond: bool = False, guidance_multiplier: float = 1.0):
            i = min(progress.pass_step, total - 1)  # the step of this pass running now
            cfg = do_cfg and (caches is None or kinds[i].cfg)
            rows = x_in.shape[0]
            x_batch = torch.cat([x_in, x_in]) if cfg else x_in  # (2N, C, h, w)
            t_batch = t.expand(x_batch.shape[0]) if t.dim() <= 1 and t.numel() == 1 else \
                (torch.cat([t, t]) if cfg else t)
            ctx, cond, extra = context, added_cond, extra_channels
            if do_cfg and not cfg:  # the unconditional rows (tgate's negative embeddings)
                ctx, extra = context[:rows], extra_channels[:rows] if extra_channels is not None else None
                cond = {k: v[:rows] for k, v in added_cond.items()} if added_cond is not None else None
            if caches is None:
                out = denoise(x_batch, t_batch, ctx, cond, extra, i)
            else:
                out = caches.call(i, lambda step: denoise(x_batch, t_batch, ctx, cond, extra, i, step))
            if not cfg:
                return (out, out) if with_uncond else out
            uncond, cond_out = out.chunk(2)
            guided = uncond + guidance_scale * guidance_multiplier * (cond_out - uncond)
            return (guided, uncond) if with_uncond else guided

        return model_fn

    def _unet_caches(self, run: "Run", kinds: tuple):
        """The run's UNetCaches (sdengine/acceleration.py), started on its step kinds."""
        from .acceleration import UNetCaches
        from .models.unet import transformer_grids

        r, vae = run.request, self.config.vae
        latent = (r.height // vae.downscale, r.width // vae.downscale)
        caches = UNetCaches(transformer_grids(self.config.unet, *latent), kinds[0].tome, latent, self.backend.device)
        caches.start(kinds)
        return caches

    def _result(self, run: "Run", params: dict, *, decoded=None, pixels=None) -> GenerationResult:
        """The caller's images from decoded images (N, 3, H, W) in [-1, 1], or from uint8 pixels
        (N, H, W, 3) of a backend that ran the whole request."""
        seeds = list(run.request.seeds)
        if run.request.output_type == "np":
            images = pixels.astype(np.float32) / 255 if pixels is not None else imaging.to_numpy(decoded)
            return GenerationResult(images, seeds, params)
        return GenerationResult(imaging.to_pil(pixels if pixels is not None else imaging.to_uint8(decoded)), seeds,
                                params)

    # ------------------------------------------------------------------
    # LoRAs and textual inversion
    # ------------------------------------------------------------------

    def set_loras(self, loras) -> None:
        """Merge a set of LoRAs into the weights, replacing the set merged now.

        loras: a list of paths, (path, scale) or (path, scale, text_encoder_scale); [] restores the
        base weights bit for bit. kohya / A1111 and diffusers / PEFT .safetensors files (see
        sdengine/lora.py). Nothing is recompiled or recaptured: the LoRA is merged into the
        tensors the backend already computes with. Waits for running calls to finish and holds
        new ones until the swap is done. Raises FileNotFoundError / ModelLoadError naming the file
        and key (nothing changed) for a missing, corrupt or mismatched file; ValueError for a
        backend that holds no weights in torch (onnx).
        """
        from .lora import LoraSpec

        specs = [LoraSpec.of(entry) for entry in loras]
        with self._weights_lock.writing():
            if self._lora_weights().apply(specs):
                self.backend.weights_changed()
            self._lora_set = specs

    def load_embedding(self, path, token: Optional[str] = None) -> str:
        """Add a textual-inversion embedding's token to the tokenizer(s) and the text encoder(s);
        returns the token (default: a diffusers file's key, else the file's stem). Raises
        ModelLoadError naming the file for a format or width that does not fit, ValueError for a
        token that already exists (nothing changed)."""
        from .embeddings import read_embedding

        with self._weights_lock.writing():
            embedding = read_embedding(path, self.config, token)
            tokenizers = {"text_encoder": self.tokenizer, "text_encoder_2": self.tokenizer_2}
            for component in embedding.vectors:
                if tokenizers[component].has_token(embedding.token):
                    raise ValueError(f"{path}: token {embedding.token!r} already exists in the tokenizer; "
                                     "give load_embedding another token=")
            ids = self.backend.add_token_embeddings(embedding.vectors)
            self.tokenizer = self.tokenizer.with_token(embedding.token, ids["text_encoder"])
            if "text_encoder_2" in ids:
                self.tokenizer_2 = self.tokenizer_2.with_token(embedding.token, ids["text_encoder_2"])
        return embedding.token

    # ------------------------------------------------------------------
    # IP-Adapter
    # ------------------------------------------------------------------

    def load_ip_adapter(self, ip_adapter, image_encoder=None) -> list:
        """Load IP-Adapters (an original `ip-adapter_*.safetensors` or `.bin` file, basic or Plus, or a
        list of them: several run together) and their image encoder, replacing the adapters loaded
        before; returns their names. `pipe(..., ip_adapter_image=image, ip_adapter_scale=0.6)` then
        prompts with images (sdengine/ip_adapter.py); unload_ip_adapter() removes them.

        image_encoder: a transformers CLIPVisionModelWithProjection folder (config.json and weights;
        e.g. h94/IP-Adapter's models/image_encoder); may be left out to keep the one loaded before.
        The adapters' key / value projections join the UNet's cross-attentions in the backend's
        dtype; no base weight changes. Raises ValueError for a backend that runs none (native, aoti,
        onnx), FileNotFoundError / ModelLoadError naming the file (nothing changed)."""
        import os

        from .errors import ModelLoadError
        from .ip_adapter import cross_attentions, load_adapter, load_image_encoder

        paths = [ip_adapter] if isinstance(ip_adapter, (str, os.PathLike)) else list(ip_adapter)
        if not paths:
            raise ValueError("ip_adapter: give a file or a list of files")
        unet = self.backend.ip_adapter_unet()  # a backend that runs none refuses here
        device, dtype = self.backend.device, self.backend.dtype
        if image_encoder is None and self._image_encoder is None:
            raise ValueError("image_encoder: the first load_ip_adapter needs the image encoder's folder")
        encoder = self._image_encoder if image_encoder is None else load_image_encoder(image_encoder, device, dtype)
        adapters = [load_adapter(path, unet, self.config.unet.cross_attention_dim, device, dtype) for path in paths]
        for adapter in adapters:
            first = next(adapter.projection.parameters()).shape  # proj (out, clip) or the Resampler's latents
            width = adapter.projection.proj_in.in_features if adapter.reads_hidden_states else first[1]
            want = encoder.cfg.hidden_size if adapter.reads_hidden_states else encoder.cfg.projection_dim
            if width != want:
                raise ModelLoadError(f"{adapter.path}: reads image features {width} wide; the image encoder gives "
                                     f"{want} (another image encoder?)")
        modules = dict(cross_attentions(unet))
        with self._weights_lock.writing():
            self._detach_ip_adapters(modules)
            for adapter in adapters:
                for name, layer in adapter.layers.items():
                    modules[name].ip_layers.append(layer)
            self._ip_adapters, self._image_encoder = adapters, encoder
            self.backend.release_memory()  # graphs captured over the layers they replace
        return [adapter.name for adapter in adapters]

    @property
    def ip_adapter_names(self) -> list:
        """The loaded IP-Adapters' names (their files' stems), in the order ip_adapter_image follows."""
        return [adapter.name for adapter in self._ip_adapters]

    def unload_ip_adapter(self) -> None:
        """Remove the IP-Adapters: the UNet is the one before load_ip_adapter, bit for bit."""
        from .ip_adapter import cross_attentions

        if not self._ip_adapters:
            return
        with self._weights_lock.writing():
            self._detach_ip_adapters(dict(cross_attentions(self.backend.ip_adapter_unet())))
            self._ip_adapters, self._image_encoder = [], None
            self.backend.release_memory()

    def _detach_ip_adapters(self, modules: dict) -> None:
        for module in modules.values():
            del module.ip_layers[:]

    def _lora_weights(self) -> "LoraWeights":
        if self._loras is None:
            self._loras = LoraWeights(self.config, self.backend.weight_views)
        return self._loras

    @contextmanager
    def _holding_weights(self, extra: list):
        """Hold the weights (read lock) for one call, with the pipeline's LoRA set plus `extra`
        (from <lora:> tags) merged; yields [{name, path, scale, hash}] of the merged LoRAs."""
        while True:
            wanted = self._lora_set + [spec for spec in extra if spec not in self._lora_set]
            merged = lambda: [spec for spec, _ in self._loras.loras] if self._loras is not None else []  # noqa: E731
            if merged() != wanted:
                with self._weights_lock.writing():
                    if self._lora_weights().apply(wanted):
                        self.backend.weights_changed()
            with self._weights_lock.reading():
                if merged() == wanted:  # no other call swapped the set since
                    yield [dict(name=lora.name, path=str(lora.path), scale=spec.scale, hash=lora.shorthash)
                           for spec, lora in (self._loras.loras if self._loras is not None else [])]
                    return

    def prepare(self, height: Optional[int] = None, width: Optional[int] = None, batch_size: int = 1,
                sampler: Optional[str] = None, schedule: Optional[str] = None,
                guidance_scale: float = DEFAULT_GUIDANCE) -> dict:
        """Get a workload ready before its first request, so that no request pays for it:
        compile what the backend compiles for it (the triton layer's kernels, in parallel),
        then run it once (two steps, decoded) so that every CUDA graph is captured and every
        compiled network traced. Any number of steps then replays what was prepared.

        Returns what was done and how long it took (seconds): `compile_s`, `warmup_s`, and
        the backend's own details (e.g. `kernels`, `compiled`).
        """
        import time

        height = height or self.config.default_size
        width = width or self.config.default_size
        started = time.perf_counter()
        info = dict(self.backend.prepare(height, width, batch_size, sampler, schedule))
        compiled = time.perf_counter()
        images = {}
        if self.config.is_inpaint:  # its UNet takes a mask and a masked image
            images = dict(init_image=np.full((height, width, 3), 0.5, dtype=np.float32),
                          mask_image=np.ones((height, width), dtype=np.float32))
        self("", height=height, width=width, batch_size=batch_size, sampler=sampler, schedule=schedule,
             guidance_scale=guidance_scale, steps=2, seed=0, output_type="np", progress=False, **images)
        info.update(compile_s=round(compiled - started, 3), warmup_s=round(time.perf_counter() - compiled, 3))
        return info

    # ------------------------------------------------------------------
    # ControlNets
    # ------------------------------------------------------------------

    def load_controlnet(self, path) -> ControlNet:
        """The ControlNet at path, loaded for this pipeline's device and dtype on first use and
        kept (a Control naming a path loads it this way); checked against the model."""
        key = str(Path(path).resolve())
        with self._controlnets_lock:
            controlnet = self._controlnets.get(key)
            if controlnet is None:
                controlnet = load_controlnet(path, self.backend.device, self.backend.dtype, base=self.config)
                check_fits(controlnet, self.config, self.name)
                self._controlnets[key] = controlnet
        return controlnet

    def _controlnet(self, model) -> ControlNet:
        controlnet = model if isinstance(model, ControlNet) else self.load_controlnet(model)
        check_fits(controlnet, self.config, self.name)
        return controlnet

    def _control_inputs(self, run: Run) -> list:
        """The ControlInputs of a run: control images prepared at the output size on the backend's
        device and dtype (both halves of the batch with guidance, the conditional half in guess
        mode), each ControlNet's steps, and the backend's function for it (made here, before any
        work, so that a backend that cannot run ControlNets says so at once)."""
        r = run.request
        keep = keep_table(r.controls, run.plan.num_steps)
        inputs = []
        for i, (control, controlnet) in enumerate(zip(r.controls, run.controlnets)):
            image = prepare_image(control.image, r.width, r.height, r.n_images,
                                  controlnet.config.conditioning_channels, control.preprocess,
                                  f"control[{i}].image")  # (N, C, H, W) in [0, 1]
            guess_mode = control.guess_mode or controlnet.config.global_pool_conditions  # as diffusers
            cond_only = guess_mode and run.do_cfg
            if run.do_cfg and not cond_only:
                image = torch.cat([image, image])  # [uncond, cond], as the UNet batch
            entry = ControlInput(controlnet, image.to(self.backend.device, self.backend.dtype), float(control.scale),
                                 guess_mode, cond_only, [row[i] for row in keep])
            self.backend.controlnet_fn(entry)
            inputs.append(entry)
        return inputs

    def _encode_prompts(self, prompts: list, clip_skip, syntax: Optional[str] = None, windows: Optional[int] = None):
        if syntax == "a1111":
            widths = tuple(e.hidden_size for e in (self.config.text_encoder, self.config.text_encoder_2)
                           if e is not None)
            return a1111.encode(self.backend, self.tokenizer, self.tokenizer_2, prompts, clip_skip,
                                        widths=widths, windows=windows,
                                        max_windows=self.backend.max_prompt_windows)
        ids = self.tokenizer(prompts) if self.tokenizer is not None else None  # None: SDXL's refiner
        ids_2 = self.tokenizer_2(prompts) if self.tokenizer_2 is not None else None
        context, pooled = self.backend.encode_text(ids, ids_2, clip_skip=clip_skip)
        return context.float(), (pooled.float() if pooled is not None else None)

    def _encode_images(self, images: torch.Tensor, generators) -> torch.Tensor:
        """Images in [-1, 1] -> scaled latents, sampled from the VAE posterior with each
        image's own generator (diffusers' retrieve_latents(sample_mode="sample"))."""
        vae = self.config.vae
        latents = []
        for i, gen in enumerate(generators):
            mean, logvar = self.backend.encode_image(images[i:i + 1])
            eps = samplers.randn(tuple(mean.shape), [gen], torch.device("cpu"), torch.float32).to(mean.device)
            latents.append(mean + torch.exp(0.5 * logvar) * eps)
        latents = torch.cat(latents)
        if vae.shift_factor is not None:
            latents = latents - vae.shift_factor
        return latents * vae.scaling_factor

    def decode_latents(self, latents: torch.Tensor, tiling: Optional[bool] = None) -> torch.Tensor:
        """Scaled latents -> images in [-1, 1], float32.

        tiling: decode in blended tiles (True), in one piece (False), or tile only above
        vae_tiling.AUTO_TILE_CELLS latent cells or when one piece runs out of memory (None).
        """
        vae = self.config.vae
        z = latents / vae.scaling_factor
        if vae.shift_factor is not None:
            z = z + vae.shift_factor
        if tiling or (tiling is None and z.shape[-2] * z.shape[-1] > AUTO_TILE_CELLS):
            return tiled_decode(self.backend.decode, z, scale=vae.downscale)
        try:
            return self.backend.decode(z)
        except torch.cuda.OutOfMemoryError:
            if tiling is False:
                raise
            log.warning("VAE decode ran out of memory; decoding again in tiles")
            torch.cuda.empty_cache()
            return tiled_decode(self.backend.decode, z, scale=vae.downscale)
