"""What the benchmark times, for each backend: one adapter per kind of backend.

Every runner answers the same four calls, each on one set of inputs drawn by
`make_inputs` (fresh random values for every call, the same sequence for every backend):

    text_encoder(inputs)  the text encoder(s) on the prompt and negative prompt (batch 2B)
    unet_step(inputs)     one UNet forward at batch 2B plus the classifier-free guidance mix
    vae_decode(inputs)    the VAE decoder on B latents
    end_to_end(inputs)    a whole generation: prompt in, B images out

`DiffusersRunner` runs diffusers' pipeline (SDPA attention), optionally with its UNet
compiled (torch.compile, channels_last): the eager-PyTorch anchors. `EngineRunner` runs
an sdengine Pipeline (`sdengine.from_diffusers`) through its backend interface
(docs/CONTRACTS.md), whichever backend it holds.

End-to-end runs use the workload's sampler on both sides: sdengine's pipeline gets
`sampler=`, diffusers' pipeline the matching scheduler (reference.scheduler_for_sampler).
Each runner counts the UNet calls of its last run; EngineRunner also records whether the
backend's fused step (UNet + guidance + sampler update in one function) ran it.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from sdengine.backends import base as backends
from sdengine.bench.measure import synchronize
from sdengine.config import ModelConfig, VisionEncoderConfig

COMPONENTS = ("text_encoder", "unet_step", "vae_decode", "end_to_end")
DIFFUSERS_BACKENDS = ("diffusers", "diffusers-compile")
ENGINE_BACKENDS = backends.names()  # sdengine's registry (sdengine/backends/base.py): the speed layers first
# The other engines users pick for the same job (sdengine/bench/peers.py): each is a runner kind built
# from the benchmark's weights folder (not the in-memory pipeline), and may run under another
# interpreter (sdengine bench --peer-python NAME=PATH), the environment its users install.
PEER_BACKENDS = {
    "optimum-openvino": "sdengine.bench.peers:OptimumOpenVINORunner",
    "sdcpp": "sdengine.bench.peers:SDCppRunner",
}
# What may follow each peer's name after "@": its precision, in its own names.
PEER_VARIANTS = {
    "optimum-openvino": ("f32", "bf16"),  # OpenVINO's INFERENCE_PRECISION_HINT (default: the CPU's best)
    "sdcpp": ("f32", "f16", "q8_0", "q4_0"),  # ggml weight types
}
PEER_INSTALL = {
    "optimum-openvino": "pip install 'optimum-intel[openvino]' (transformers < 5.6: a venv of its own, then "
                        "--peer-python optimum-openvino=VENV/bin/python; benchmarks/README.md)",
    "sdcpp": "CMAKE_ARGS='-DGGML_NATIVE=ON' pip install stable-diffusion-cpp-python (builds from source), then "
             "--peer-python sdcpp=VENV/bin/python if it lives in another venv",
}


def peer_compute_dtype(name: str, variant: Optional[str]) -> str:
    """The dtype a peer row multiplies in, for its % of peak: OpenVINO's default precision is bf16 on
    a CPU with bf16 dot products; ggml computes in fp32 whatever its weight type."""
    from sdengine.device import cpu_has_fast_bf16

    if name == "optimum-openvino":
        if variant is None:
            return "bf16" if cpu_has_fast_bf16() else "fp32"
        return {"f32": "fp32", "bf16": "bf16"}[variant]
    return "fp32"


# sdengine backends built from the weights folder by sdengine.load (an export of its own, cached)
# rather than from the in-memory diffusers pipeline.
FROM_FOLDER_BACKENDS = ("onnx",)
BACKENDS = ENGINE_BACKENDS + DIFFUSERS_BACKENDS + tuple(PEER_BACKENDS)
# What may follow a backend's name after "@" (`diffusers@bf16`): the precision of that row. sdengine's
# backends and diffusers take a dtype; the peers their own precision names (peers.py).
DTYPE_VARIANTS = ("fp32", "fp16", "bf16")
# Boolean backend options a row may switch on after its dtype, `compile@bf16+freeze+autotune`, so that
# one run measures a layer's settings side by side (sdengine/backends/compiled.py).
ROW_FLAGS = {"compile": ("freeze", "autotune", "int8")}
_FLAG_OPTIONS = {"int8": ("quantize", "int8")}  # a flag that is not a boolean option: (option, value)
# Prompts for end-to-end runs: content does not change the cost (every prompt is padded to 77
# tokens), but each run gets a different one, with a different seed.
PROMPTS = (
    "a photograph of an astronaut riding a horse on the moon",
    "an oil painting of a lighthouse in a storm, dramatic light",
    "a watercolor fox in a snowy birch forest",
    "isometric pixel art of a tiny cozy library",
    "a macro photo of dew drops on a spider web at dawn",
    "a bowl of ramen, studio lighting, 85mm",
)


@dataclass(frozen=True)
class Workload:
    """What one benchmark run generates."""

    arch: str
    height: int
    width: int
    steps: int
    batch: int
    dtype: str
    guidance_scale: float = 7.5
    output_type: str = "pil"
    model: Optional[str] = None
    sampler: str = "euler"  # canonical sdengine names (sdengine.samplers.resolve)
    schedule: str = "default"
    controlnets: int = 0  # ControlNets added to the UNet step and end to end (random, made from the UNet)
    hires_scale: float = 0.0  # end to end with A1111's hires fix at this scale (0: off; hires_of)
    ip_adapters: int = 0  # end to end with this many IP-Adapters, each with an image prompt (random; ip_adapters_for)


def hires_of(workload: Workload):
    """The end-to-end runs' hires fix (sdengine bench --hires SCALE): the Latent upscaler, half the
    steps again at denoising 0.5 (a schedule of `steps` steps, its last half); None when off."""
    from sdengine.hires import Hires

    if not workload.hires_scale:
        return None
    return Hires(scale=workload.hires_scale, upscaler="Latent", steps=max(1, workload.steps // 2),
                 denoising_strength=0.5)


def split_backend(spec: str) -> tuple:
    """'diffusers@bf16' -> ('diffusers', 'bf16'); 'eager' -> ('eager', None)."""
    name, _, variant = spec.partition("@")
    return name, (variant or None)


def check_backend(spec: str, extra: tuple = ()) -> Optional[str]:
    """Why `spec` ("name" or "name@variant") is not a backend the benchmark knows; None when it is.
    extra: names of runners given by factory (tests, plugins)."""
    name, variant = split_backend(spec)
    if name in extra:
        return None
    if name not in BACKENDS:
        return f"unknown backend {name!r}; choose from: {', '.join(BACKENDS)}"
    if variant is None:
        return None
    variant, *flags = variant.split("+")
    unknown = [f for f in flags if f not in ROW_FLAGS.get(name, ())]
    if unknown:
        takes = " / ".join(f"+{f}" for f in ROW_FLAGS.get(name, ())) or "no +flags"
        return f"{spec}: {name} takes {takes}, got +{'+'.join(unknown)}"
    allowed = PEER_VARIANTS[name] if name in PEER_BACKENDS else DTYPE_VARIANTS
    if variant and variant not in allowed:
        return f"{spec}: {name} takes @{' / @'.join(allowed)}, got @{variant}"
    return None


def row_flags(spec: str) -> dict:
    """'compile@bf16+freeze' -> {"freeze": True}: the backend options a row switches on."""
    variant = split_backend(spec)[1] or ""
    return dict(_FLAG_OPTIONS.get(flag, (flag, True)) for flag in variant.split("+")[1:])


def row_dtype(spec: str, default: str) -> str:
    """The dtype a row computes in: its @dtype, else the run's (peers: peers.compute_dtype)."""
    name, variant = split_backend(spec)
    variant = (variant or "").split("+")[0] or None
    if name in PEER_BACKENDS:
        return peer_compute_dtype(name, variant)
    return variant if variant in DTYPE_VARIANTS else default


class BackendUnavailable(Exception):
    """A backend that cannot run here (missing package, no GPU, not implemented yet)."""


# ---------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------

def make_inputs(component: str, config: ModelConfig, workload: Workload, device: torch.device,
                dtype: torch.dtype, count: int, seed: int) -> list:
    """`count` independent random input sets for one component (never zeros)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    batch, cfg_batch = workload.batch, 2 * workload.batch
    latent_h, latent_w = workload.height // config.vae.downscale, workload.width // config.vae.downscale

    def randn(*shape):
        return torch.randn(shape, generator=generator, device=device, dtype=torch.float32).to(dtype)

    def token_ids(vocab_size: int):
        return torch.randint(1, vocab_size, (cfg_batch, 77), generator=generator, device=device)

    sets = []
    for i in range(count):
        if component == "text_encoder":
            ids = {"input_ids": token_ids(config.text_encoder.vocab_size)}
            if config.text_encoder_2 is not None:
                ids["input_ids_2"] = token_ids(config.text_encoder_2.vocab_size)
            sets.append(ids)
        elif component == "unet_step":
            step = {
                "x": randn(cfg_batch, config.unet.in_channels, latent_h, latent_w),
                # what diffusers' pipelines feed the UNet: a 0-d float32 timestep on the device (an
                # int64 one made torch.compile'd UNets compile again for the pipeline's float32)
                "t": torch.randint(1, config.scheduler.num_train_timesteps, (), generator=generator,
                                   device=device).float(),
                "context": randn(cfg_batch, 77, config.unet.cross_attention_dim),
                "added_cond": None,
            }
            if config.unet.addition_embed_type == "text_time":
                pooled_dim = config.unet.projection_class_embeddings_input_dim - 6 * config.unet.addition_time_embed_dim
                size = [workload.height, workload.width, 0, 0, workload.height, workload.width]
                step["added_cond"] = {
                    "text_embeds": randn(cfg_batch, pooled_dim),
                    "time_ids": torch.tensor([size] * cfg_batch, device=device, dtype=dtype),
                }
            if workload.controlnets:  # fresh control images too, as the other inputs
                image = torch.rand(cfg_batch, 3, workload.height, workload.width, generator=generator, device=device)
                step["control_images"] = [image.to(dtype)] * workload.controlnets
            sets.append(step)
        elif component == "vae_decode":
            latents = randn(batch, config.vae.latent_channels, latent_h, latent_w) / config.vae.scaling_factor
            sets.append({"latents": latents})
        elif component == "end_to_end":
            prompts = [PROMPTS[(i + b) % len(PROMPTS)] for b in range(batch)]
            sets.append({"prompts": prompts, "seed": seed + i})
        else:
            raise ValueError(f"unknown component {component!r}; choose one of: {', '.join(COMPONENTS)}")
    return sets


def guidance(noise_pred: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: uncond + scale · (cond − uncond), halves of a 2B batch."""
    uncond, cond = noise_pred.chunk(2)
    return uncond + scale * (cond - uncond)


def on_device(source_pipe, device: torch.device):
    """The source diffusers pipeline on `device`. On the CPU, the worker's own pipeline, read for this
    backend alone (sdengine/bench/worker.py), over the same weight tensors as a user's
    `from_pretrained(..., torch_dtype=...)` gives them, with no copy (a shallow copy of the pipeline
    object, so that a runner's scheduler is its own). On a GPU, a copy: the CPU
    source is never modified, and what a backend keeps on the device is its own (so its peak
    memory is its own)."""
    if device.type == "cpu":  # a shallow copy: the same weight tensors, its own scheduler attribute
        return copy.copy(source_pipe)
    return copy.deepcopy(source_pipe).to(device)


# ---------------------------------------------------------------------------
# diffusers
# ---------------------------------------------------------------------------

# ---------------------------------------------------------------------------
# ControlNets (--controlnet N): the same random ones in every backend's process
# ---------------------------------------------------------------------------

_CONTROLNETS: dict = {}


def controlnets_for(source_pipe, workload: Workload) -> tuple:
    """(diffusers ControlNetModels, control images): `workload.controlnets` ControlNets made with
    diffusers' ControlNetModel.from_unet from the source UNet, every weight then perturbed (seeded,
    so every process makes the same ones and the zero convolutions have an effect), and one random
    control image (PIL, the workload's size) each. Made once per process, on the CPU."""
    key = (id(source_pipe), workload.controlnets, workload.height, workload.width)
    if key not in _CONTROLNETS:
        from diffusers import ControlNetModel
        from PIL import Image

        levels = len(source_pipe.vae.config.block_out_channels)  # the embedding halves as often as the VAE
        channels = ((16, 32, 96, 256) + (256,) * 8)[:levels]
        models, images = [], []
        for i in range(workload.controlnets):
            generator = torch.Generator().manual_seed(1000 + i)
            model = ControlNetModel.from_unet(source_pipe.unet, conditioning_embedding_out_channels=channels)
            with torch.no_grad():
                for _, p in sorted(model.named_parameters()):
                    p.add_(torch.randn(p.shape, generator=generator).to(p.dtype) * 0.02)
            models.append(model.eval())
            pixels = torch.randint(0, 256, (workload.height, workload.width, 3), generator=generator, dtype=torch.uint8)
            images.append(Image.fromarray(pixels.numpy()))
        _CONTROLNETS[key] = (models, images)
    return _CONTROLNETS[key]


# ---------------------------------------------------------------------------
# IP-Adapters (--ip-adapter N): the same random files in every backend's process
# ---------------------------------------------------------------------------

# The image encoder of h94/IP-Adapter's ip-adapter_sd15 and ip-adapter_sdxl_vit-h (models/image_encoder,
# OpenCLIP ViT-H/14: VisionEncoderConfig's defaults); tiny configs get a tiny one (tests/support/ip_adapter_files.py's).
IP_IMAGE_ENCODER = asdict(VisionEncoderConfig())
TINY_IP_IMAGE_ENCODER = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                             image_size=224, patch_size=32, projection_dim=24, hidden_act="gelu")
IP_TOKENS, IP_SCALE = 4, 0.6  # the basic adapters' image tokens; the scale of every adapter
_IP_ADAPTERS: dict = {}


def ip_adapters_for(config: ModelConfig, workload: Workload) -> tuple:
    """(folder, adapter file names, image prompts): `workload.ip_adapters` basic IP-Adapters in the
    original layout (image_proj.*, ip_adapter.{i}.to_k_ip / to_v_ip for every cross-attention i of
    diffusers' order) with seeded random weights, and a random CLIP image encoder at the published
    size (transformers' save_pretrained, fp16), written once per process into a temporary folder
    that both sides load; one random 512x384 image prompt each (an odd shape: resize and crop count)."""
    key = (id(config), workload.ip_adapters)
    if key in _IP_ADAPTERS:
        return _IP_ADAPTERS[key]
    import atexit
    import shutil
    import tempfile

    from PIL import Image
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from sdengine.ip_adapter import cross_attentions
    from sdengine.models.unet import UNet2DConditionModel

    folder = Path(tempfile.mkdtemp(prefix="sdengine-bench-ip-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    context = config.unet.cross_attention_dim
    encoder = IP_IMAGE_ENCODER if context >= 768 else TINY_IP_IMAGE_ENCODER
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2000)
        CLIPVisionModelWithProjection(CLIPVisionConfig(**encoder)).half().save_pretrained(folder / "image_encoder")
    with torch.device("meta"):
        attentions = cross_attentions(UNet2DConditionModel(config.unet))
    names, images = [], []
    for n in range(workload.ip_adapters):
        generator = torch.Generator().manual_seed(2001 + n)

        def rand(*shape, scale=0.02):
            return torch.randn(shape, generator=generator) * scale

        state = {"image_proj.proj.weight": rand(context * IP_TOKENS, encoder["projection_dim"]),
                 "image_proj.proj.bias": rand(context * IP_TOKENS), "image_proj.norm.weight": 1 + rand(context),
                 "image_proj.norm.bias": rand(context)}
        for i, (_, module) in enumerate(attentions):
            if module.is_cross:
                width = module.to_out[0].in_features
                state.update({f"ip_adapter.{i}.to_k_ip.weight": rand(width, context),
                              f"ip_adapter.{i}.to_v_ip.weight": rand(width, context)})
        names.append(f"ip-adapter-{n}.safetensors")
        save_file(state, str(folder / names[-1]))
        pixels = torch.randint(0, 256, (384, 512, 3), generator=generator, dtype=torch.uint8)
        images.append(Image.fromarray(pixels.numpy()))
    _IP_ADAPTERS[key] = (folder, names, images)
    return _IP_ADAPTERS[key]


class DiffusersRunner:
    """diffusers' own pipeline: StableDiffusion(XL)Pipeline, SDPA attention, with the diffusers
    scheduler of the workload's sampler (None where diffusers has none: end_to_end is then skipped)."""

    def __init__(self, source_pipe, config: ModelConfig, workload: Workload, device: torch.device,
                 compile_mode: Optional[str] = None):
        from sdengine.bench.reference import scheduler_for_sampler

        if compile_mode is not None and device.type != "cuda":
            raise BackendUnavailable("needs a CUDA device (torch.compile max-autotune of the UNet on the CPU "
                                     "takes many minutes and is not what the anchor measures)")
        self.config, self.workload, self.device = config, workload, device
        self.pipe = on_device(source_pipe, device)
        self.controlnets, self.control_images = [], []
        if workload.controlnets:  # StableDiffusion(XL)ControlNetPipeline over the same networks
            import diffusers

            models, self.control_images = controlnets_for(source_pipe, workload)
            self.controlnets = [copy.deepcopy(m).to(device, self.pipe.unet.dtype) for m in models]
            xl = config.text_encoder_2 is not None
            cls = diffusers.StableDiffusionXLControlNetPipeline if xl else diffusers.StableDiffusionControlNetPipeline
            parts = {k: v for k, v in self.pipe.components.items() if k in cls._get_signature_keys(cls)[0]}
            parts["controlnet"] = self.controlnets[0] if len(self.controlnets) == 1 else self.controlnets
            if not xl:
                parts.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
            self.pipe = cls(**parts)
        self.pipe.set_progress_bar_config(disable=True)
        self.ip_adapter_images = []
        if workload.ip_adapters:  # diffusers' load_ip_adapter over the same files
            folder, names, self.ip_adapter_images = ip_adapters_for(config, workload)
            # it rewrites the UNet's attention processors: on a copy, so that the source (shared on the CPU) stays plain
            self.pipe.unet = copy.deepcopy(self.pipe.unet)
            self.pipe.load_ip_adapter(str(folder), subfolder="", weight_name=names, image_encoder_folder="image_encoder")
            self.pipe.set_ip_adapter_scale([IP_SCALE] * len(names))
        try:
            self.pipe.scheduler = scheduler_for_sampler(workload.sampler, workload.schedule,
                                                        self.pipe.scheduler.config)
            self.no_scheduler = None
        except ValueError as e:
            self.no_scheduler = str(e)
        self.second_pass = None
        if hires_of(workload) is not None and self.no_scheduler is None:  # A1111's hires fix on diffusers' parts
            import diffusers

            xl = config.text_encoder_2 is not None
            cls = diffusers.StableDiffusionXLImg2ImgPipeline if xl else diffusers.StableDiffusionImg2ImgPipeline
            parts = {k: v for k, v in self.pipe.components.items() if k in cls._get_signature_keys(cls)[0]}
            parts["scheduler"] = type(self.pipe.scheduler).from_config(self.pipe.scheduler.config)
            if not xl:
                parts.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
            self.second_pass = cls(**parts)
            self.second_pass.set_progress_bar_config(disable=True)
        if compile_mode is not None:
            # The anchor of ANCHORS.md: channels_last UNet, torch.compile(mode="max-autotune").
            self.pipe.unet.to(memory_format=torch.channels_last)
            self.pipe.unet = torch.compile(self.pipe.unet, mode=compile_mode)
        self.unet_calls: Optional[int] = None

    def prepare(self) -> dict:
        """One short generation (2 steps) of the workload: lazy initialisation, and the compile
        of diffusers-compile. Returns what was done, for the record."""
        w = self.workload
        self.pipe(prompt=[""] * w.batch, num_inference_steps=2, guidance_scale=w.guidance_scale, height=w.height,
                  width=w.width, output_type=w.output_type, generator=torch.Generator("cpu").manual_seed(0),
                  **self._control_kwargs())
        return {"warmup_steps": 2}

    def _control_kwargs(self) -> dict:
        """The pipeline's ControlNet images and IP-Adapter image prompts, where the workload has them."""
        kwargs = {}
        if self.controlnets:
            kwargs["image"] = self.control_images[0] if len(self.control_images) == 1 else self.control_images
        if self.ip_adapter_images:
            kwargs["ip_adapter_image"] = self.ip_adapter_images
        return kwargs

    def text_encoder(self, inputs):
        pipe = self.pipe
        if self.config.text_encoder_2 is None:
            return pipe.text_encoder(inputs["input_ids"], return_dict=False)[0]
        # SDXL, as StableDiffusionXLPipeline.encode_prompt: penultimate hidden states of both
        # encoders, concatenated; pooled output of the second.
        first = pipe.text_encoder(inputs["input_ids"], output_hidden_states=True)
        second = pipe.text_encoder_2(inputs["input_ids_2"], output_hidden_states=True)
        context = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
        return context, second[0]

    def unet_step(self, inputs):
        added = inputs["added_cond"]
        residuals = {}
        for controlnet, image in zip(self.controlnets, inputs.get("control_images", ())):  # summed, as diffusers'
            down, mid = controlnet(inputs["x"], inputs["t"], encoder_hidden_states=inputs["context"],
                                   controlnet_cond=image, added_cond_kwargs=added, return_dict=False)
            if residuals:
                down = [a + b for a, b in zip(residuals["down_block_additional_residuals"], down)]
                mid = residuals["mid_block_additional_residual"] + mid
            residuals = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
        out = self.pipe.unet(inputs["x"], inputs["t"], encoder_hidden_states=inputs["context"],
                             added_cond_kwargs=added, return_dict=False, **residuals)[0]
        return guidance(out, self.workload.guidance_scale)

    def vae_decode(self, inputs):
        return self.pipe.vae.decode(inputs["latents"], return_dict=False)[0]

    def end_to_end(self, inputs):
        if self.no_scheduler is not None:
            raise BackendUnavailable(self.no_scheduler)
        w = self.workload
        if self.second_pass is not None:
            return self._hires(inputs["prompts"], inputs["seed"], w.output_type)
        images = self.pipe(
            prompt=inputs["prompts"], num_inference_steps=w.steps, guidance_scale=w.guidance_scale,
            height=w.height, width=w.width, output_type=w.output_type,
            generator=torch.Generator("cpu").manual_seed(inputs["seed"]), **self._control_kwargs(),
        ).images
        self.unet_calls = len(self.pipe.scheduler.timesteps)  # e.g. PNDM's PLMS runs steps + 1, Heun 2 steps - 1
        return images

    def _hires(self, prompts, seed: int, output_type: str):
        """A1111's hires fix written out on diffusers' parts: txt2img latents, bilinear upscale, then
        img2img keeping the last `steps` of int(steps / strength) with noise from the same seed."""
        w, hires = self.workload, hires_of(self.workload)
        latents = self.pipe(prompt=prompts, num_inference_steps=w.steps, guidance_scale=w.guidance_scale,
                            height=w.height, width=w.width, output_type="latent",
                            generator=torch.Generator("cpu").manual_seed(seed)).images
        cell = self.config.vae.downscale
        target = hires.target(w.width, w.height, cell)
        latents = torch.nn.functional.interpolate(latents, size=(target.upscale_y // cell, target.upscale_x // cell),
                                                  mode="bilinear")
        total, steps = hires.schedule(w.steps)
        images = self.second_pass(prompt=prompts, image=latents, strength=steps / total, num_inference_steps=total,
                                  guidance_scale=w.guidance_scale, output_type=output_type,
                                  generator=torch.Generator("cpu").manual_seed(seed)).images
        self.unet_calls = w.steps + steps
        return images

    def image(self, prompt: str, seed: int):
        """One image of the workload as a float array (H, W, 3) in [0, 1], for the fidelity check."""
        if self.no_scheduler is not None:
            raise BackendUnavailable(self.no_scheduler)
        w = self.workload
        if self.second_pass is not None:
            return self._hires(prompt, seed, "np")[0]
        return self.pipe(prompt=prompt, num_inference_steps=w.steps, guidance_scale=w.guidance_scale, height=w.height,
                         width=w.width, output_type="np", generator=torch.Generator("cpu").manual_seed(seed),
                         **({"ip_adapter_image": self.ip_adapter_images} if self.ip_adapter_images else {})).images[0]

    def ran(self) -> dict:
        """What the last end-to-end run ran, for the record."""
        return {"scheduler": type(self.pipe.scheduler).__name__}

    def close(self):
        self.pipe = None


# ---------------------------------------------------------------------------
# sdengine
# ---------------------------------------------------------------------------

class EngineRunner:
    """An sdengine Pipeline built with `sdengine.from_diffusers(pipe, backend=name)` on the same weights."""

    def __init__(self, name: str, source_pipe, config: ModelConfig, workload: Workload, device: torch.device,
                 backend_options: Optional[dict] = None):
        import sdengine

        self.config, self.workload, self.device = config, workload, device
        try:
            if isinstance(source_pipe, (str, Path)):  # FROM_FOLDER_BACKENDS: the weights folder
                # (onnx: exported on first use into $SDE_CACHE_DIR, then read from there)
                self.pipe = sdengine.load(source_pipe, device=device, dtype=workload.dtype, backend=name,
                                          backend_options=backend_options)
            else:
                self.pipe = sdengine.from_diffusers(on_device(source_pipe, device), backend=name,
                                                    backend_options=backend_options)
        except Exception as e:  # a backend that cannot be built is reported, never crashes the run
            raise BackendUnavailable(f"{type(e).__name__}: {first_line(e)}") from e
        self.backend = self.pipe.backend
        self.controls = []  # sdengine.Control, over the same random ControlNets as diffusers'
        if workload.controlnets:
            from sdengine import Control

            models, images = controlnets_for(source_pipe, workload)
            self.controls = [Control(_adopt_controlnet(m, device, self.backend.dtype, i), image)
                             for i, (m, image) in enumerate(zip(models, images))]
        self.ip_adapter: dict = {}  # the end-to-end runs' image prompts (sdengine bench --ip-adapter N)
        if workload.ip_adapters:  # load_ip_adapter over the same files as diffusers'
            folder, names, images = ip_adapters_for(config, workload)
            try:
                self.pipe.load_ip_adapter([folder / name for name in names], image_encoder=folder / "image_encoder")
            except ValueError as e:  # native, aoti, onnx: no IP-Adapter
                raise BackendUnavailable(first_line(e)) from e
            self.ip_adapter = {"ip_adapter_image": images, "ip_adapter_scale": IP_SCALE}
        self.acceleration: dict = {}  # deepcache / tgate / tome of the end-to-end runs (sdengine bench --deepcache N)
        self.loop_ms: list = []  # each end-to-end run's denoising loop (samplers.sample), apart from text and VAE
        self.unet_calls: Optional[int] = None
        self.fused_step: Optional[bool] = None  # whether the last end-to-end run took the fused step
        self.sampler: Optional[str] = None  # the sampler the pipeline reports having run

    def prepare(self) -> dict:
        """Pipeline.prepare for the workload: the backend compiles what it compiles for it (the
        triton layer's kernels), then one short generation captures and traces everything."""
        w = self.workload
        info = self.pipe.prepare(w.height, w.width, batch_size=w.batch, sampler=w.sampler, schedule=w.schedule,
                                 guidance_scale=w.guidance_scale)
        if self.controls or self.ip_adapter:  # the ControlNets' or IP-Adapters' captures and compiles too
            self.pipe("", height=w.height, width=w.width, batch_size=w.batch, sampler=w.sampler, schedule=w.schedule,
                      guidance_scale=w.guidance_scale, steps=2, seed=0, output_type="np", progress=False,
                      **({"control": self.controls} if self.controls else {}), **self.ip_adapter)
        fallback = getattr(self.backend, "fallback", None)  # the triton layer's, when its kernels failed
        return dict(info, fallback=fallback) if fallback else info

    def _component(self, method: str):
        # native runs whole requests in the C++ loop (one graphed call per step): only end to end
        # is timed there; the aoti row times the same compiled networks one by one.
        if self.backend.runs_whole_requests:
            raise BackendUnavailable(f"{self.backend.name} runs whole requests (C++ loop): end to end only; "
                                     f"the aoti row times its compiled networks one by one")
        return getattr(self.backend, method)

    def text_encoder(self, inputs):
        return self._component("encode_text")(inputs["input_ids"], inputs.get("input_ids_2"))

    def unet_step(self, inputs):
        if self.controls:
            from sdengine.controlnet import ControlInput

            controls = [ControlInput(c.model, image, c.scale, False, False)
                        for c, image in zip(self.controls, inputs["control_images"])]
            out = self._component("denoise")(inputs["x"], inputs["t"], inputs["context"], inputs["added_cond"],
                                             controls=controls)
        else:
            out = self._component("denoise")(inputs["x"], inputs["t"], inputs["context"], inputs["added_cond"])
        return guidance(out, self.workload.guidance_scale)

    def vae_decode(self, inputs):
        return self._component("decode")(inputs["latents"])

    def end_to_end(self, inputs):
        w = self.workload
        calls, fused_runs = [0], [0]
        phases = self.phases_ms = {"encode_text": 0.0, "denoise": 0.0, "decode": 0.0}

        def counted(fn, phase="denoise"):
            @functools.wraps(fn)
            def call(*args, **kwargs):
                calls[0] += phase == "denoise"
                started = time.perf_counter()
                try:
                    return fn(*args, **kwargs)
                finally:
                    phases[phase] += (time.perf_counter() - started) * 1e3
            return call

        def phase_timer(phase):
            return lambda fn: counted(fn, phase)

        def counted_fused_step(make):
            # The fused step runs the UNet itself, never through denoise: count the calls of the
            # step function it returns (one UNet forward at the doubled batch each).
            @functools.wraps(make)
            def fused_step(*args, **kwargs):
                step = make(*args, **kwargs)
                if step is None:  # not covered: the pipeline falls back to denoise
                    return None
                fused_runs[0] += 1
                return counted(step)
            return fused_step

        patches = {"fused_step": counted_fused_step}
        if not self.backend.runs_whole_requests:  # each phase's time too: what the run spends outside them
            patches.update(denoise=counted, encode_text=phase_timer("encode_text"), decode=phase_timer("decode"))
        prompt = inputs["prompts"][0] if len(inputs["prompts"]) == 1 else inputs["prompts"]
        steps_before = _native_steps(self.backend)
        from sdengine import samplers

        loops = []  # this run's sampler loops (two with the hires fix: their sum is the run's loop)

        def timed_loop(sample):
            @functools.wraps(sample)
            def timed(*args, **kwargs):
                synchronize(self.device)
                started = time.perf_counter()
                out = sample(*args, **kwargs)
                synchronize(self.device)
                loops.append((time.perf_counter() - started) * 1e3)
                return out
            return timed

        with _wrapped(self.backend, patches), _wrapped(samplers, {"sample": timed_loop}):
            result = self.pipe(prompt, num_inference_steps=w.steps, guidance_scale=w.guidance_scale,
                               height=w.height, width=w.width, seed=inputs["seed"], output_type=w.output_type,
                               sampler=w.sampler, schedule=w.schedule, progress=False, hires=hires_of(w),
                               **({"control": self.controls} if self.controls else {}), **self.ip_adapter,
                               **self.acceleration)
        if loops:
            self.loop_ms.append(sum(loops))
        if steps_before is not None:  # the C++ loop: one step call (UNet at the doubled batch) per evaluation
            calls[0] = _native_steps(self.backend) - steps_before
        self.unet_calls = calls[0] or None  # None: the pipeline reached the UNet some other way
        self.fused_step = fused_runs[0] > 0
        self.sampler = result.params.get("sampler")
        return result

    def image(self, prompt: str, seed: int):
        """One image of the workload as a float array (H, W, 3) in [0, 1], for the fidelity check."""
        w = self.workload
        return self.pipe(prompt, num_inference_steps=w.steps, guidance_scale=w.guidance_scale, height=w.height,
                         width=w.width, seed=seed, output_type="np", sampler=w.sampler, schedule=w.schedule,
                         progress=False, hires=hires_of(w), **self.ip_adapter, **self.acceleration).images[0]

    def ran(self) -> dict:
        """What the last end-to-end run ran, for the record, with the time of its network calls
        (the rest of the run is the sampler, the pipeline and the conversion to images)."""
        return {"sampler": self.sampler, "fused_step": self.fused_step,
                "phases_ms": {k: round(v, 3) for k, v in getattr(self, "phases_ms", {}).items()}}

    def close(self):
        self.pipe = self.backend = None


def _adopt_controlnet(theirs, device, dtype, index: int):
    """An sdengine ControlNet over a copy of a diffusers ControlNetModel's weights on `device`."""
    from sdengine.config import ControlNetConfig
    from sdengine.controlnet import ControlNet
    from sdengine.loading import LoadedControlNet
    from sdengine.models.controlnet import ControlNetModel

    config = ControlNetConfig.from_dict(dict(theirs.config))
    with torch.device("meta"):
        model = ControlNetModel(config)
    state = {k: v.to(device, dtype) for k, v in theirs.state_dict().items()}
    model.load_state_dict(state, strict=True, assign=True)
    return ControlNet(LoadedControlNet(config, model.eval(), "bench", f"controlnet-{index}", Path("controlnet")))


def _native_steps(backend) -> Optional[int]:
    """The native backend's step calls so far (sde_model_get_stats), None for other backends."""
    if not hasattr(backend, "stats"):
        return None
    try:
        step = backend.stats()["step"]
    except RuntimeError:  # no request yet
        return 0
    return step["captures"] + step["replays"] + step["direct"] + step["failed"]


@contextlib.contextmanager
def _wrapped(obj, wrappers: dict):
    """Replace each method `name` of `obj` by `wrappers[name](method)` for the duration; restore
    what was there after (an instance attribute, or the class's method)."""
    saved = {}
    try:
        for name, wrap in wrappers.items():
            saved[name] = (getattr(obj, name), name in vars(obj))
            setattr(obj, name, wrap(saved[name][0]))
        yield
    finally:
        for name, (method, own_attribute) in saved.items():
            if own_attribute:
                setattr(obj, name, method)
            else:
                delattr(obj, name)  # back to the class's method


def first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:400] if text else ""


def precheck(name: str, device: torch.device) -> Optional[str]:
    """Why backend `name` cannot run on `device`, where that is known without building it
    (the harness then skips it without starting its process); None otherwise."""
    if name in ("diffusers-compile",) and device.type != "cuda":
        return ("needs a CUDA device (torch.compile max-autotune of the UNet on the CPU takes many minutes and is "
                "not what the anchor measures)")
    return None


def needs_pipeline(name: str) -> bool:
    """Whether runner `name` is built from the diffusers pipeline read from the weights folder
    (else from the folder's path: the peers, and sdengine backends that export their own)."""
    return name not in PEER_BACKENDS and name not in FROM_FOLDER_BACKENDS


def make_runner(spec: str, source, config: ModelConfig, workload: Workload, device: torch.device,
                compile_mode: str = "max-autotune", threads: Optional[int] = None):
    """The runner of backend `spec` ("name" or "name@variant"); source: the diffusers pipeline, or
    the weights folder where `needs_pipeline(name)` is false. Raises BackendUnavailable with the
    reason it cannot run."""
    name, variant = split_backend(spec)
    if name in DIFFUSERS_BACKENDS:
        return DiffusersRunner(source, config, workload, device,
                               compile_mode=compile_mode if name == "diffusers-compile" else None)
    if name in PEER_BACKENDS:
        import importlib

        module, _, attribute = PEER_BACKENDS[name].partition(":")
        return getattr(importlib.import_module(module), attribute)(source, config, workload, device, variant=variant,
                                                                   threads=threads)
    if name in backends.names():
        options = row_flags(spec)
        if name == "onnx" and threads:  # onnxruntime's intra-op threads (torch's backends follow torch's)
            options["threads"] = threads
        return EngineRunner(name, source, config, workload, device, backend_options=options)
    raise ValueError(f"unknown backend {name!r}; choose from: {', '.join(BACKENDS)}")
