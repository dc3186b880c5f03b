"""The graph backend: our eager networks, with every call replayed from CUDA graphs.

The first speed layer, and the cheapest to start: no custom kernel and no compiler, so it
costs nothing but the captures (a fraction of a second per shape). On a host that pays
~29 µs of CPU per eager op (the lent H200's), SD1.5 at batch 2 is launch-bound; a graph
replays a whole call's launches for one host call.

What is graphed, once per input shape (sdengine/backends/cuda_graphs.py):
- the whole denoising step, UNet on the doubled batch -> classifier-free guidance -> the
  sampler update in plain torch ops on device scalars, for the samplers of
  `samplers.fused.FUSED_SAMPLERS` (euler, euler_a, ddim, dpmpp_2m with any schedule, lcm),
  txt2img, img2img and inpainting alike: `fused_step`;
- the UNet forward alone, for every other sampler (their updates stay on the host): `denoise`;
- the text encoder(s) and the VAE decoder.

On the CPU nothing is captured (graphs are CUDA's): the same step functions run directly,
which is how CI checks this layer against eager.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Optional

import torch

from ..samplers import fused
from .cuda_graphs import GraphCache, GraphedFunction, control_inputs, device_step
from .eager import EagerBackend, run_text_encoders

log = logging.getLogger("sdengine")


class GraphBackend(EagerBackend):
    """Eager networks; on CUDA every call is replayed from a CUDA graph.

    cuda_graphs: replay from CUDA graphs (CUDA only; default on).
    graph_cache: how many graphs are kept (shapes x networks / step kinds); the least
                 recently used go first.
    fused_steps: offer `fused_step`, the whole denoising step as one function (default on).
    """

    name = "graph"
    step_update = "torch"  # the whole step's guidance + update: "triton" (the fused kernel) or "torch" (its reference)
    channels_last = False  # NHWC activations on CUDA (the Triton and compile layers)

    def __init__(self, config, text_encoder, unet, vae, text_encoder_2=None, *, cuda_graphs: bool = True,
                 graph_cache: int = 8, fused_steps: bool = True):
        super().__init__(config, text_encoder, unet, vae, text_encoder_2)
        self.fused_steps = fused_steps
        self.graphs = GraphCache(graph_cache) if self.device.type == "cuda" and cuda_graphs else None
        self._graphed = {}  # name -> GraphedFunction
        # What the graphs call: the networks themselves here, compiled ones in the compile layer.
        self.text_fn = lambda ids, ids_2, clip_skip: run_text_encoders(self.text_encoder, self.text_encoder_2, ids,
                                                                       ids_2, clip_skip)
        self.unet_fn = self.unet
        self.decode_fn = self.vae.decode

    def release_memory(self):
        """After a request ran out of memory: drop every captured graph, their static buffers
        and their memory pool (the pipeline then empties CUDA's cache). The next request of
        each shape captures again."""
        if self.graphs is not None:
            with self.graphs.lock:
                self.graphs.entries.clear()
                self.graphs._pool = None
        self._graphed.clear()

    # The network calls of EagerBackend, each through a graph -------------------------------

    def _graphed_call(self, name: str, fn):
        """fn, replayed from CUDA graphs when graphs are on (one GraphedFunction per name)."""
        if self.graphs is None:
            return fn
        if name not in self._graphed:
            self._graphed[name] = GraphedFunction(name, fn, self.graphs)
        return self._graphed[name]

    def _text(self, input_ids, input_ids_2, clip_skip):
        run = self._graphed_call(f"text_encoder(clip_skip={clip_skip})",
                                 lambda ids, ids_2: self.text_fn(ids, ids_2, clip_skip))
        return run(input_ids, input_ids_2)

    def _unet(self, x, t, context, added_cond, controls=()):
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        t = t.reshape(-1).expand(x.shape[0]).contiguous() if t.numel() == 1 else t  # (B,): one graph for 0-d and (B,)
        # added_cond's tensors are the graph's inputs, in a fixed order (SDXL's; IP-Adapter's tokens and scales)
        names = tuple(sorted(added_cond)) if added_cond else ()
        values = [added_cond[k] for k in names]
        if controls:  # the ControlNets inside the same graph: images and scales are inputs, the rest is baked in
            return self._controlled_unet(controls, names)(x, t.float(), context,
                                                          *values, *control_inputs(controls, self.device))

        def unet(x, t, context, *values):
            return self.unet_fn(x, t, context, added_cond=dict(zip(names, values)) or None)

        return self._graphed_call("unet" + _extra_inputs(names), unet)(x, t.float(), context, *values)

    def _controlled_unet(self, controls, names: tuple = ()):
        """The UNet with these ControlNets, one graphed function per ControlNet configuration
        (which networks, guess mode, image shapes: `ControlInput.key`) and added_cond keys."""
        from ..controlnet import residuals
        from .eager import residual_kwargs

        count, latent_channels, conds = len(controls), self.config.vae.latent_channels, len(names)

        def unet(x, t, context, *inputs):
            cond = dict(zip(names, inputs[:conds])) or None
            images_and_scales = inputs[conds:]
            live = [dataclasses.replace(c, image=image) for c, image in zip(controls, images_and_scales[:count])]
            res = residuals(self.controlnet_fn, live, images_and_scales[count:], x, t, context, cond, latent_channels)
            return self.unet_fn(x, t, context, added_cond=cond, **residual_kwargs(res))

        name = "unet+controlnet" + repr(tuple(c.key for c in controls)) + _extra_inputs(names)
        if self.graphs is None:
            return unet
        return self._graphed_call(name, unet)

    def _decode(self, z):
        if self.channels_last:
            z = z.contiguous(memory_format=torch.channels_last)
        return self._graphed_call("vae_decode", lambda z: self.decode_fn(z))(z)

    # The whole step ---------------------------------------------------------------------------

    def fused_step(self, plan, context, guidance_scale: float, added_cond=None, extra_channels=None, controls=(),
                   schedule=None):
        """The whole denoising step of `plan` as one function `step(x, i, noise) -> x_next`, or
        None where the device update does not cover the run (docs/CONTRACTS.md, Backends).

        context (2N or N, L, D) is [uncond, cond] with guidance, cond alone without; added_cond
        and extra_channels (inpainting's mask and masked-image latents, (2N or N, 1 + C, h, w))
        have the same rows. On CUDA the step is captured once per shape and sampler as a CUDA
        graph and replayed for every step of every run. controls: the run's ControlNets
        (sdengine.controlnet.ControlInput, with `active` per step), run inside the same step.
        schedule: DeepCache / T-GATE / ToMe's StepKind per step (sdengine/acceleration.py): each kind
        of step is its own graph, chosen per step.
        """
        reason = self.fused_unsupported(plan)
        in_channels = self.config.vae.latent_channels + (extra_channels.shape[1] if extra_channels is not None else 0)
        if reason is None and in_channels != self.config.unet.in_channels:
            reason = (f"the UNet takes {self.config.unet.in_channels} channels, the step would give it {in_channels} "
                      "(inpainting models need extra_channels)")
        if reason is not None:
            log.debug("fused step not used: %s", reason)
            return None
        context = context.to(self.device, self.dtype)
        if added_cond is not None:
            added_cond = {k: v.to(self.device, self.dtype) for k, v in added_cond.items()}
        if extra_channels is not None:
            extra_channels = extra_channels.to(self.device, self.dtype)
        run = fused.fused_run(plan, self.config.scheduler.prediction_type, guidance_scale)  # the sampler side
        return device_step(run, context, added_cond, extra_channels, unet=self.unet_fn, dtype=self.dtype,
                           device=self.device, kernel=self.step_update == "triton", channels_last=self.channels_last,
                           graphs=self.graphs, controls=list(controls), controlnet_fn=self.controlnet_fn,
                           schedule=schedule, unet_config=self.config.unet)

    def fused_unsupported(self, plan) -> Optional[str]:
        """Why fused_step declines `plan` (None when it covers it)."""
        if not self.fused_steps:
            return "fused steps are switched off (fused_steps=False)"
        return fused.unsupported(plan, self.config.scheduler.prediction_type)


def _extra_inputs(names: tuple) -> str:
    """What a graphed UNet's name adds for added_cond keys beyond SDXL's (IP-Adapter's)."""
    return "" if names in ((), ("text_embeds", "time_ids")) else repr(names)
