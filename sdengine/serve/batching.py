"""Dynamic batching: several requests of the same shape run as one pipeline call.

A `Spec` is one HTTP request made into plain, picklable data (it travels to Ray replicas):
per-image prompts, negative prompts, seeds and init images / masks, plus the parameters
that every image of one UNet batch must share (`Spec.key`: mode, size, steps, sampler,
schedule, guidance, strength, eta, clip skip).

`run_group(pipe, specs, ...)` runs specs that share a key: their images are laid end to end
and cut into chunks of at most `max_batch_images`, and each chunk is one call of the
pipeline with one prompt, negative prompt and seed per image. Every image has its own CPU
generator in the pipeline, so an image depends on its own seed and prompt only, never on
its neighbours in the batch (tests/test_serve.py checks that a batched image equals the
same request served alone).

Cancelling: a chunk stops at the next sampler step once every request in it is cancelled
(client gone, timeout), and at once on an interrupt (POST /sdapi/v1/interrupt), in which
case its requests get the images decoded from the latents reached so far, as A1111 does.
A ValueError from a chunk of several requests is re-run request by request, so that the
error goes to the request that caused it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from .. import images as imaging
from ..pipeline import GenerationCancelled, GenerationResult


@dataclass
class Spec:
    """One request, ready for the pipeline. Lists hold one entry per image."""

    mode: str                       # "txt2img", "img2img" or "inpaint"
    prompts: list
    negatives: list
    seeds: list
    shared: dict                    # steps, guidance_scale, height, width, sampler, schedule, strength, eta, clip_skip
    init_images: Optional[list] = None   # PIL images at (width, height), one per image
    masks: Optional[list] = None         # PIL "L" images at (width, height), one per image
    request_id: str = ""
    task_id: str = ""                    # the client's force_task_id (A1111's /internal/progress), if any
    loras: tuple = ()                    # the <lora:...> set its prompt names: (path, scale, text scale)
    subseeds: Optional[list] = None      # A1111's variation seeds, one per image (with shared subseed_strength)

    @property
    def n_images(self) -> int:
        return len(self.prompts)

    @property
    def key(self) -> tuple:
        """Requests with equal keys can share a UNet batch."""
        return (self.mode, self.loras) + tuple(sorted(self.shared.items()))


@dataclass
class Output:
    """What one request got: images (PIL), their infotexts and seeds, or an error."""

    images: list = field(default_factory=list)
    infotexts: list = field(default_factory=list)
    seeds: list = field(default_factory=list)
    interrupted: bool = False
    cancelled: bool = False
    error: Optional[BaseException] = None
    batch_images: int = 0           # the largest pipeline batch this request ran in
    started_at: float = 0.0
    finished_at: float = 0.0


class ServedPipeline:
    """A pipeline as the server's workers call it. Specs stay plain data (they cross to Ray), so a
    call names its SDXL refiner (an A1111 request's refiner_checkpoint, which make_spec resolves to
    `refiner_name`) and carries its IP-Adapter image prompts as (width, height, RGB bytes) and its
    ControlNet units as (name, (width, height, RGB bytes), scale, start, end, guess_mode)
    (requests.controlnet_unit); this turns them into the refiner pipeline, PIL images and
    sdengine.Controls of the loaded ControlNets (`controlnets`, name -> ControlNet). Everything
    else is the pipeline's."""

    def __init__(self, pipe, refiner=None, refiner_name: Optional[str] = None, controlnets: Optional[dict] = None):
        self.pipe, self.refiner, self.refiner_name = pipe, refiner, refiner_name
        self.controlnets = dict(controlnets or {})

    def __call__(self, *args, refiner=None, ip_adapter_image=None, control=None, **kwargs):
        from PIL import Image

        if refiner is not None and (self.refiner is None or refiner != self.refiner_name):
            raise ValueError(f"refiner {refiner!r} is not loaded")
        if ip_adapter_image is not None:
            ip_adapter_image = [Image.frombytes("RGB", (w, h), data) for w, h, data in ip_adapter_image]
        for name, *_ in control or ():
            if name not in self.controlnets:
                raise ValueError(f"control: ControlNet {name!r} is not loaded")
        controls = [control_of(unit, self.controlnets[unit[0]]) for unit in control] if control else None
        return self.pipe(*args, refiner=self.refiner if refiner is not None else None,
                         ip_adapter_image=ip_adapter_image, control=controls, **kwargs)

    def __getattr__(self, name):
        return getattr(self.pipe, name)


def control_of(unit: tuple, controlnet=None):
    """A ControlNet unit's plain data (requests.controlnet_unit: name, (width, height, RGB bytes),
    scale, start, end, guess_mode) as a sdengine.Control of `controlnet` (default: the name, which
    Request.from_args's checks take)."""
    from PIL import Image

    from ..controlnet import Control

    name, (width, height, data), scale, start, end, guess_mode = unit
    return Control(name if controlnet is None else controlnet, Image.frombytes("RGB", (width, height), data),
                   scale=scale, start=start, end=end, guess_mode=guess_mode)


def load_controlnets(pipe, paths) -> list:
    """--controlnet PATH...: each loaded for pipe (its device and dtype, checked to fit its UNet);
    ValueError when two share a name, which is what a ControlNet unit's model names."""
    controlnets = [pipe.load_controlnet(path) for path in paths]
    names = [c.name for c in controlnets]
    for name in names:
        if names.count(name) > 1:
            raise ValueError(f"--controlnet: two ControlNets are named {name!r}; units name them by name")
    return controlnets


def run_group(pipe, specs: list, *, max_batch_images: int,
              cancelled: Callable[[int], bool] = lambda i: False,
              interrupted: Callable[[], bool] = lambda: False,
              on_step: Optional[Callable[[int, int, object], None]] = None,
              on_chunk: Optional[Callable[[int], None]] = None) -> list:
    """Run specs that share one key; returns one Output per spec, in order.

    cancelled(i): whether spec i no longer wants its result; interrupted(): stop now and
    return what the latents hold; on_step(step, total, latents) after every sampler step
    (latents: the chunk's, a copy, or None where the backend gives none; for live previews);
    on_chunk(n_images) before every pipeline call.
    """
    assert len({s.key for s in specs}) == 1, "run_group takes specs of one key"
    outputs = [Output(started_at=time.time()) for _ in specs]
    flat = [(si, j) for si, spec in enumerate(specs) for j in range(spec.n_images)]
    for start in range(0, len(flat), max_batch_images):
        chunk = flat[start:start + max_batch_images]
        members = sorted({si for si, _ in chunk})
        live = [si for si in members if not cancelled(si) and outputs[si].error is None]
        if not live:
            continue
        chunk = [(si, j) for si, j in chunk if si in live]
        try:
            images, infotexts, seeds, was_interrupted = _call(pipe, specs, chunk, live, cancelled, interrupted,
                                                              on_step, on_chunk)
        except ValueError as e:
            if len(live) > 1:  # find whose request it is: run them one by one
                for si in live:
                    single = [(s, j) for s, j in chunk if s == si]
                    _run_alone(pipe, specs, single, outputs, cancelled, interrupted, on_step, on_chunk)
                continue
            outputs[live[0]].error = e
            continue
        except GenerationCancelled:
            for si in live:
                outputs[si].cancelled = True
            continue
        except Exception as e:  # noqa: BLE001 - a failed batch fails its requests, never the server
            for si in live:
                outputs[si].error = e
            continue
        for (si, _), image, text, seed in zip(chunk, images, infotexts, seeds):
            out = outputs[si]
            out.images.append(image)
            out.infotexts.append(text)
            out.seeds.append(seed)
            out.interrupted |= was_interrupted
            out.batch_images = max(out.batch_images, len(chunk))
    for si, out in enumerate(outputs):
        out.finished_at = time.time()
        if cancelled(si) and out.error is None and not out.images:
            out.cancelled = True
    return outputs


def _run_alone(pipe, specs, chunk, outputs, cancelled, interrupted, on_step, on_chunk):
    si = chunk[0][0]
    try:
        images, infotexts, seeds, was_interrupted = _call(pipe, specs, chunk, [si], cancelled, interrupted,
                                                          on_step, on_chunk)
    except GenerationCancelled:
        outputs[si].cancelled = True
        return
    except Exception as e:  # noqa: BLE001
        outputs[si].error = e
        return
    out = outputs[si]
    out.images += images
    out.infotexts += infotexts
    out.seeds += seeds
    out.interrupted |= was_interrupted
    out.batch_images = max(out.batch_images, len(chunk))


def _call(pipe, specs, chunk, live, cancelled, interrupted, on_step, on_chunk):
    """One pipeline call for the images in chunk: (images, infotexts, seeds, interrupted)."""
    first = specs[chunk[0][0]]
    pick = (lambda attr: [getattr(specs[si], attr)[j] for si, j in chunk])
    last = {}

    def callback(step, total, latents):
        last["latents"] = latents
        if on_step is not None:
            on_step(step, total, latents)
        if interrupted() or all(cancelled(si) for si in live):
            return False
        return None

    if on_chunk is not None:
        on_chunk(len(chunk))
    kwargs = dict(first.shared)
    try:
        result = pipe(
            pick("prompts"), negative_prompt=pick("negatives"), seed=pick("seeds"), batch_size=1,
            subseed=pick("subseeds") if first.subseeds is not None else None,
            init_image=pick("init_images") if first.init_images is not None else None,
            mask_image=pick("masks") if first.masks is not None else None,
            callback=callback, progress=False, **kwargs,
        )
    except GenerationCancelled:
        if not interrupted() or "latents" not in last:
            raise
        result = _partial_result(pipe, first, pick("prompts"), pick("negatives"), pick("seeds"), last["latents"])
        return result.images, [result.infotext(i) for i in range(len(chunk))], result.seeds, True
    return result.images, [result.infotext(i) for i in range(len(chunk))], result.seeds, False


def _partial_result(pipe, spec: Spec, prompts, negatives, seeds, latents) -> GenerationResult:
    """Images decoded from the latents an interrupted run reached (A1111 returns those)."""
    from .. import samplers

    shared = spec.shared
    decoded = pipe.decode_latents(latents)  # (N, 3, H, W) in [-1, 1]
    images = imaging.to_pil(imaging.to_uint8(decoded))
    plan = samplers.plan_for(shared.get("sampler"), shared.get("schedule"), shared["num_inference_steps"],
                             pipe.config.scheduler, eta=shared.get("eta"), conventions=shared.get("conventions"))
    params = dict(mode=spec.mode, prompts=prompts, negative_prompts=negatives, steps=shared["num_inference_steps"],
                  sampler=plan.sampler, schedule=plan.schedule, guidance_scale=shared["guidance_scale"],
                  height=shared["height"], width=shared["width"], strength=shared.get("strength"),
                  model=pipe.name, clip_skip=shared.get("clip_skip"), conventions=plan.conventions,
                  eta=plan.options.get("eta", shared.get("eta") or 0.0), prompt_syntax=shared.get("prompt_syntax"),
                  rng=shared.get("rng", "cpu"), eta_noise_seed_delta=shared.get("eta_noise_seed_delta", 0),
                  subseeds=list(spec.subseeds or []), subseed_strength=shared.get("subseed_strength", 0.0))
    return GenerationResult(images, seeds, params)
