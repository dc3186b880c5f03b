"""The native backend: the networks compiled ahead of time with AOTInductor.

The engine (export/aoti.py) is found in the cache or built on first use; it holds no
weights, so the modules that Python loaded hand theirs over without a copy (the tensors
already have the engine's dtype, device and layout).

Two ways to run it:
- the backend interface of docs/CONTRACTS.md (encode_text, denoise, encode_image,
  decode), which the pipeline drives step by step from Python, through the compiled
  packages loaded in this process;
- `generate(...)`, the whole request in C++ (libsdengine: tokenizer, text encoding,
  noise, sampler loop, decode, uint8 RGB), through `sdengine._C`. It gives the same images
  as the Python pipeline for the same seed, sampler and size.

Not compiled (run eagerly, from the same weights): clip_skip other than None, and prompts with
textual-inversion tokens (the engine's token table has the checkpoint's vocabulary only).
The engine reads the modules' own tensors, so LoRAs merged into them in place (`weight_views`)
reach the engine with no reload. Its UNet takes 77-token contexts: A1111-syntax prompts get one
75-token window.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from ..config import ModelConfig

log = logging.getLogger("sdengine")

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.int64: 3}  # sde_dtype


def _load_package(path: Path, constants: dict):
    """A compiled package with its weights handed over (user-managed: no copy)."""
    package = torch._inductor.aoti_load_package(str(path))
    wanted = set(package.get_constant_fqns())
    constants = {k: v for k, v in constants.items() if k in wanted}
    missing = sorted(wanted - set(constants))
    if missing:
        raise ValueError(f"{path}: the weights lack {len(missing)} constants the engine needs, e.g. {missing[0]!r}")
    try:
        package.load_constants(constants, check_full_update=True, user_managed=True)
    except TypeError:  # an older torch without user-managed constants: they are copied
        package.load_constants(constants, check_full_update=True)
    return package


def _first(outputs):
    """The first output of a compiled package (which returns a list)."""
    return outputs[0] if isinstance(outputs, (list, tuple)) else outputs


class NativeBackend:
    """Runs the AOTInductor engine of the model's architecture (see the module docstring)."""

    name = "native"
    max_prompt_windows = 1  # the engine's UNet is compiled for 77-token contexts

    def __init__(self, config: ModelConfig, text_encoder, unet, vae, text_encoder_2=None, *, engine_dir=None,
                 progress: bool = True):
        from sdengine.export import aoti

        aoti.check_supported(config)
        self.config = config
        self.text_encoder, self.unet, self.vae = text_encoder.eval(), unet.eval(), vae.eval()
        self.text_encoder_2 = text_encoder_2.eval() if text_encoder_2 is not None else None
        first = next(unet.parameters())
        self.device, self.dtype = first.device, first.dtype
        if engine_dir is None:
            engine_dir = aoti.engine_for(config, dtype=self.dtype, device=self.device, progress=progress)
        self.engine_dir = Path(engine_dir)
        self.engine = json.loads((self.engine_dir / "engine.json").read_text())
        # The weights each network reads, by "<component>/<key>", already in the engine's
        # dtype and on its device (no copy for weights that are).
        self._weights = {}
        modules = (("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2), ("unet", unet), ("vae", vae))
        for component, module in modules:
            if module is None:
                continue
            for key, tensor in module.state_dict().items():
                self._weights[f"{component}/{key}"] = tensor.detach().to(self.device, self.dtype
                                                                         if tensor.is_floating_point()
                                                                         else tensor.dtype).contiguous()
        self._packages = {}
        self._native = None
        self._tokenizer_dirs = None

    # -- the compiled packages in this process ------------------------------------

    def _package(self, name: str):
        if name not in self._packages:
            info = self.engine["networks"][name]
            prefix, component = info["prefix"], info["component"]
            constants = {}
            for fqn in info["constants"]:
                key = fqn[len(prefix):]
                tensor = self._weights.get(f"{component}/{key}")
                if tensor is not None:
                    constants[fqn] = tensor
            self._packages[name] = _load_package(self.engine_dir / info["package"], constants)
        return self._packages[name]

    def weight_views(self) -> dict:
        """As EagerBackend.weight_views: the modules' tensors, which the engine reads (no copy)."""
        from ..lora import parameter_views

        views = parameter_views({"unet": self.unet, "text_encoder": self.text_encoder,
                                 "text_encoder_2": self.text_encoder_2})
        for component, named in views.items():
            for key, tensor in named.items():
                engine_tensor = self._weights.get(f"{component}/{key}")
                if engine_tensor is not None and engine_tensor.data_ptr() != tensor.data_ptr():
                    raise ValueError(f"the native engine reads a copy of {component}/{key} ({engine_tensor.dtype} on "
                                     f"{engine_tensor.device}), not the module's tensor: load the model in the "
                                     "engine's dtype and device to change its weights")
        return views

    def add_token_embeddings(self, vectors: dict) -> dict:
        """As EagerBackend.add_token_embeddings; prompts with the new ids run the eager text encoders."""
        from ..embeddings import grow_token_embeddings

        return grow_token_embeddings({"text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2},
                                     vectors)

    @torch.inference_mode()
    def encode_text(self, input_ids, input_ids_2=None, clip_skip=None):
        """Token ids (B, 77) -> (context (B, 77, D), pooled (B, P) or None), as the eager backend:
        SDXL concatenates both encoders' hidden states and takes the second's pooled output.
        clip_skip, and ids past the engine's vocabulary (textual inversion), run through the eager
        text encoders (the engine has one output layer and the checkpoint's token table)."""
        vocab = self._weights["text_encoder/text_model.embeddings.token_embedding.weight"].shape[0]
        if clip_skip is not None or int(input_ids.max()) >= vocab:
            from .eager import EagerBackend

            context, pooled = EagerBackend.encode_text(self, input_ids, input_ids_2, clip_skip=clip_skip)
            return context, pooled if self.text_encoder_2 is not None else None  # as the compiled path
        context = _first(self._package("text_encoder")(input_ids.to(self.device)))
        if self.text_encoder_2 is None:
            return context, None
        context_2, pooled = self._package("text_encoder_2")(input_ids_2.to(self.device))
        return torch.cat([context, context_2], dim=-1), pooled  # (B, 77, D1 + D2), (B, P)

    def controlnet_fn(self, control):
        """ControlNets are not run by the native backend's compiled engine yet: a ValueError before any work."""
        raise ValueError("the native backend does not run ControlNets yet; use the eager, graph, triton or "
                         "compile backend for control=")

    @torch.inference_mode()
    def denoise(self, x_in, t, context, added_cond=None):
        """One compiled UNet forward; float32 out. All entries of t must be equal (one step)."""
        if (added_cond is not None) != (self.text_encoder_2 is not None):
            raise ValueError("the native backend takes added conditioning (text_embeds, time_ids) exactly for SDXL")
        x = x_in.to(self.device, self.dtype).contiguous()
        t = torch.as_tensor(t, dtype=torch.float32, device=self.device).reshape(-1).expand(x.shape[0]).contiguous()
        inputs = [x, t, context.to(self.device, self.dtype).contiguous()]
        if added_cond is not None:
            inputs += [added_cond[k].to(self.device, self.dtype).contiguous() for k in ("text_embeds", "time_ids")]
        return _first(self._package("unet")(*inputs)).float()

    @torch.inference_mode()
    def encode_image(self, images):
        """Images (B, 3, H, W) in [-1, 1] -> (mean, logvar), float32, by the compiled encoder."""
        out = _first(self._package("vae_encoder")(images.to(self.device, self.dtype).contiguous()))
        mean, logvar = out.float().chunk(2, dim=1)  # (B, C, h, w) each
        return mean, logvar

    @torch.inference_mode()
    def decode(self, latents):
        """Unscaled latents -> images (B, 3, H, W) in about [-1, 1], float32, by the compiled decoder."""
        return _first(self._package("vae_decoder")(latents.to(self.device, self.dtype).contiguous())).float()

    # -- the whole request in C++ -----------------------------------------------------

    def native_model(self, tokenizer, tokenizer_2=None, max_concurrency: int = 0):
        """The libsdengine model (sdengine._C.Model) over these weights; made on first call.

        tokenizer (and SDXL's tokenizer_2): the pipeline's sdengine CLIPTokenizers; they are
        written to folders the C++ tokenizer reads (vocabulary, merges, pad token, length)."""
        if self._native is None:
            from sdengine import _C

            if (tokenizer_2 is None) != (self.text_encoder_2 is None):
                raise ValueError("give tokenizer_2 exactly for SDXL (a second text encoder)")
            self._tokenizer_dirs = tempfile.TemporaryDirectory(prefix="sdengine-tokenizer-")
            folder = tokenizer.save(Path(self._tokenizer_dirs.name) / "tokenizer")
            folder_2 = tokenizer_2.save(Path(self._tokenizer_dirs.name) / "tokenizer_2") if tokenizer_2 else None
            tensors = []
            for name, tensor in self._weights.items():
                if tensor.dtype not in _DTYPE_CODES:
                    continue
                tensors.append((name, tensor.data_ptr(), _DTYPE_CODES[tensor.dtype], list(tensor.shape),
                                1 if tensor.device.type == "cuda" else 0, tensor.device.index or 0))
            from sdengine.export.aoti import _config_dict

            self._native = _C.Model(tensors, None, json.dumps(_config_dict(self.config)), str(self.engine_dir),
                                    str(folder), max_concurrency, str(folder_2) if folder_2 else None)
        return self._native

    def generate(self, tokenizer, prompt: str, negative_prompt: Optional[str] = None, *, width: int = 0,
                 height: int = 0, steps: int = 30, guidance_scale: float = 7.5, seed: int = 0, batch_size: int = 1,
                 sampler: Optional[str] = None, schedule: Optional[str] = None, eta: float = 0.0,
                 callback: Optional[Callable[[int, int], Optional[bool]]] = None,
                 init_image: Optional[np.ndarray] = None, strength: Optional[float] = None,
                 mask_image: Optional[np.ndarray] = None, tokenizer_2=None) -> list:
        """One txt2img, img2img (`init_image`) or inpainting (`init_image` + `mask_image`, an
        inpainting model) request run entirely in C++. Returns `batch_size` uint8 arrays
        (H, W, 3); image i has seed `seed + i`. callback(step, steps) after each step; False
        cancels (sdengine._C.Cancelled). init_image: uint8 (H, W, 3), the output's size (width
        and height default to it); mask_image: uint8 (H, W), >= 128 repaints; strength in
        (0, 1], default 0.8 for img2img and 1.0 for inpainting. tokenizer_2: SDXL's second
        tokenizer. Errors: ValueError for bad arguments."""
        from ..request import Request

        # The Python API's rules and words (sdengine.request) before anything reaches C++.
        Request.from_args(prompt, negative_prompt, steps, guidance_scale, height or None, width or None, seed,
                          batch_size, sampler, schedule, init_image, strength, mask_image, callback=callback,
                          progress=False, eta=eta).for_model(self.config)
        model = self.native_model(tokenizer, tokenizer_2)
        progress = None
        if callback is not None:
            progress = lambda step, total: callback(step, total) is not False  # noqa: E731
        init_bytes = None
        if init_image is not None:
            init_image = np.asarray(init_image)
            if init_image.dtype != np.uint8 or init_image.ndim != 3 or init_image.shape[2] != 3:
                raise ValueError(f"init_image must be a uint8 array (H, W, 3), got {init_image.dtype} "
                                 f"{init_image.shape}")
            height, width = height or init_image.shape[0], width or init_image.shape[1]
            if (height, width) != init_image.shape[:2]:
                raise ValueError(f"init_image is {init_image.shape[1]}x{init_image.shape[0]} but the request is "
                                 f"{width}x{height} (width x height)")
            init_bytes = np.ascontiguousarray(init_image).tobytes()
        mask_bytes = None
        if mask_image is not None:
            mask_image = np.asarray(mask_image)
            if mask_image.ndim == 3 and mask_image.shape[2] == 1:
                mask_image = mask_image[..., 0]
            if mask_image.dtype != np.uint8 or mask_image.shape != (height, width):
                raise ValueError(f"mask_image must be a uint8 array (H, W) = ({height}, {width}), got "
                                 f"{mask_image.dtype} {mask_image.shape}")
            mask_bytes = np.ascontiguousarray(mask_image).tobytes()
        results = model.generate(prompt, negative_prompt, width, height, steps, float(guidance_scale), int(seed),
                                 batch_size, sampler, schedule, float(eta), progress, init_bytes,
                                 float(strength or 0.0), mask_bytes)
        return [np.frombuffer(data, dtype=np.uint8).reshape(h, w, 3) for data, w, h, _ in results]
