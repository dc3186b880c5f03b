"""The eager backend: our plain-torch networks, run as they are.

It is the reference every other backend is compared with, and the one that runs
on any device torch supports.
"""

from __future__ import annotations

import copy
import logging

import torch

from ..config import ModelConfig
from .base import BaseBackend

log = logging.getLogger("sdengine")


def residual_kwargs(res) -> dict:
    """The UNet's keyword arguments for ControlNet residuals (down list, mid), or none."""
    if res is None:
        return {}
    return {"down_block_additional_residuals": res[0], "mid_block_additional_residual": res[1]}


def run_text_encoders(text_encoder, text_encoder_2, input_ids, input_ids_2, clip_skip):
    """The text encoder(s) on device ids -> (context (B, 77, D), pooled (B, P) or None). SDXL
    concatenates both encoders' hidden states on the feature axis and pools with the second;
    SDXL's refiner (no text_encoder, input_ids None) has the second's alone."""
    if text_encoder is None:
        return text_encoder_2(input_ids_2, clip_skip=clip_skip)
    context, pooled = text_encoder(input_ids, clip_skip=clip_skip)
    if input_ids_2 is not None:
        context_2, pooled = text_encoder_2(input_ids_2, clip_skip=clip_skip)
        context = torch.cat([context, context_2], dim=-1)  # (B, 77, D1 + D2)
    return context, pooled


class EagerBackend(BaseBackend):
    """Holds the networks on one device and dtype; implements the backend interface
    (sdengine/backends/base.py): encode_text, denoise, encode_image, decode. No fused step."""

    name = "eager"
    max_prompt_windows = None  # the UNet takes contexts of any number of 77-token windows

    def __init__(self, config: ModelConfig, text_encoder, unet, vae, text_encoder_2=None):
        self.config = config
        self.text_encoder = text_encoder.eval() if text_encoder is not None else None  # None: SDXL's refiner
        self.text_encoder_2 = text_encoder_2.eval() if text_encoder_2 is not None else None
        self.unet = unet.eval()
        self.vae = vae.eval()
        first = next(unet.parameters())
        self.device, self.dtype = first.device, first.dtype
        from ..embeddings import reserve_added_tokens

        reserve_added_tokens({"text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2})

    def weight_views(self) -> dict:
        """component -> diffusers-style parameter name -> the tensor the networks compute with
        (sdengine/lora.py: LoRAs are merged into these in place). Backends that rewrite modules
        at load time (fused QKV) inherit this; the map follows the modules as they are."""
        from ..lora import parameter_views

        return parameter_views({"unet": self.unet, "text_encoder": self.text_encoder,
                                "text_encoder_2": self.text_encoder_2})

    def ip_adapter_unet(self):
        """The UNet the IP-Adapters' key / value projections join (Pipeline.load_ip_adapter)."""
        return self.unet

    def add_token_embeddings(self, vectors: dict) -> dict:
        """Write textual-inversion vectors {component: (n, D)} into the text encoders' added-token
        tables (in place); returns {component: their ids} (sdengine/embeddings.py)."""
        from ..embeddings import write_added_tokens

        return write_added_tokens({"text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2}, vectors)

    @torch.inference_mode()
    def encode_text(self, input_ids, input_ids_2=None, clip_skip=None):
        """Token ids (B, 77) -> (context (B, 77, D), pooled (B, P) or None).

        SDXL concatenates both encoders' hidden states on the feature axis and takes
        the pooled output of the second. SDXL's refiner has only the second: input_ids is
        ignored (None).
        """
        ids_2 = None
        if self.text_encoder_2 is not None:
            if input_ids_2 is None:
                raise ValueError("input_ids_2 is required: this model has a second text encoder (SDXL)")
            ids_2 = input_ids_2.to(self.device)
        ids = input_ids.to(self.device) if self.text_encoder is not None else None
        return self._text(ids, ids_2, clip_skip)

    def _text(self, input_ids, input_ids_2, clip_skip):
        """The text encoder(s) on device ids: what a faster backend replaces (e.g. by a graph)."""
        return run_text_encoders(self.text_encoder, self.text_encoder_2, input_ids, input_ids_2, clip_skip)

    def check_acceleration(self, acceleration) -> None:
        """DeepCache, T-GATE and ToMe run inside our UNet (models/caching.py): every layer takes them."""

    @torch.inference_mode()
    def denoise(self, x_in, t, context, added_cond=None, controls=(), step=None):
        """One UNet forward; returns float32 whatever the backend's dtype. controls: the
        ControlNets that run at this step (sdengine.controlnet.ControlInput); their residuals
        are summed into the UNet's. step: an accelerated call (sdengine.acceleration.UNetStep)."""
        if added_cond is not None:
            added_cond = {k: v.to(self.device, self.dtype) for k, v in added_cond.items()}
        x = x_in.to(self.device, self.dtype)
        args = (x, t.to(self.device), context.to(self.device, self.dtype), added_cond, list(controls))
        if step is None:
            return self._unet(*args).float()
        out, stored = self._unet_step(*args, step.kwargs)
        step.keep(stored)
        return out.float()

    def _unet(self, x, t, context, added_cond, controls=()):
        """One UNet forward (with its ControlNets) on device tensors of the backend's dtype."""
        return self._unet_step(x, t, context, added_cond, controls)

    def _unet_step(self, x, t, context, added_cond, controls=(), step_kwargs=None):
        """The UNet (with its ControlNets), with an accelerated call's keyword arguments (kind,
        cached, rand: then it returns (output, stored)) or without."""
        from ..controlnet import residuals

        scales = [c.scale for c in controls]
        res = residuals(self.controlnet_fn, controls, scales, x, t, context, added_cond,
                        self.config.vae.latent_channels)
        return self.unet(x, t, context, added_cond=added_cond, **residual_kwargs(res), **(step_kwargs or {}))

    # ControlNets ---------------------------------------------------------------------------

    def controlnet_fn(self, control):
        """The function that runs control's ControlNet on this backend:
        fn(x, t, context, image, scale, guess_mode, added_cond) -> (down residuals, mid residual).
        Made once per ControlNet (`prepare_controlnet`) and kept."""
        controlnet = control.controlnet
        fns = self.__dict__.setdefault("_controlnet_fns", {})
        entry = fns.get(id(controlnet.model))
        if entry is None or entry[0] is not controlnet.model:
            if (controlnet.device, controlnet.dtype) != (self.device, self.dtype):
                raise ValueError(f"the ControlNet {controlnet.name} is on {controlnet.device} in {controlnet.dtype}, "
                                 f"the pipeline on {self.device} in {self.dtype}: load it with "
                                 "sdengine.load_controlnet(path, device=..., dtype=...) to match")
            entry = fns[id(controlnet.model)] = (controlnet.model, self.prepare_controlnet(controlnet))
        return entry[1]

    def prepare_controlnet(self, controlnet):
        """A function running the ControlNet as this backend runs its UNet; eager: the network."""
        model = controlnet.model.eval()

        def run(x, t, context, image, scale, guess_mode, added_cond):
            return model(x, t, context, image, scale, guess_mode, added_cond=added_cond)

        return run

    @staticmethod
    def controlnet_view(controlnet):
        """A new ControlNetModel over the same weight tensors (no copy), for a backend to rewrite
        (fused QKV, kernel ops, channels_last) without touching the caller's network."""
        from ..models.controlnet import ControlNetModel

        with torch.device("meta"):
            view = ControlNetModel(controlnet.config)
        view.load_state_dict(controlnet.model.state_dict(), strict=True, assign=True)
        return view.eval().requires_grad_(False)

    @torch.inference_mode()
    def encode_image(self, images):
        """Images (B, 3, H, W) in [-1, 1] -> latent distribution (mean, logvar), float32."""
        mean, logvar = self.vae.encode(images.to(self.device, self._vae_dtype))
        return mean.float(), logvar.float()

    @torch.inference_mode()
    def decode(self, latents):
        """Unscaled latents -> images (B, 3, H, W) in about [-1, 1], float32.

        NaN guard: a reduced-precision decode that yields non-finite values (the fp16
        VAE overflow that makes black images) is redone in fp32 for those images, with
        one warning. No black image is ever returned for that reason.
        """
        images = self._decode(latents.to(self.device, self._vae_dtype)).float()
        if self._vae_dtype == torch.float32 or images.is_meta:  # meta: a shape-only dry run
            return images
        bad = ~torch.isfinite(images).flatten(1).all(dim=1)  # (B,)
        if bad.any():
            log.warning("VAE decode in %s gave non-finite values for %d image(s); decoding them again "
                        "in float32", self._vae_dtype, int(bad.sum()))
            images[bad] = self._vae_fp32().decode(latents[bad].to(self.device, torch.float32)).float()
        return images

    def _decode(self, z):
        """The VAE decoder on device latents of the VAE's dtype."""
        return self.vae.decode(z)

    def _vae_fp32(self):
        """A float32 copy of the VAE, made on first need and kept."""
        if getattr(self, "_vae_fp32_copy", None) is None:
            self._vae_fp32_copy = copy.deepcopy(self.vae).float()
        return self._vae_fp32_copy

    @property
    def _vae_dtype(self):
        return next(self.vae.parameters()).dtype
