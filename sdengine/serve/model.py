"""The model a server runs, loaded one way for `sdengine serve` (app.LocalEngine) and for each Ray
replica (ray_app.SDModel): the pipeline with its IP-Adapters, its SDXL refiner and its ControlNets,
what the info routes report of them (requests.ModelInfo), and the pipeline as the batching
workers call it (batching.ServedPipeline)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .batching import ServedPipeline, load_controlnets
from .requests import ModelInfo


@dataclass
class ServedModel:
    pipe: object           # the sdengine.Pipeline (latent previews read its VAE)
    served: ServedPipeline  # what the workers call: refiner, IP-Adapter images and ControlNet units resolved
    info: ModelInfo


def load_served_model(model: Optional[str], *, backend=None, device=None, dtype=None, threads=None,
                      refiner: Optional[str] = None, ip_adapters=(), image_encoder: Optional[str] = None,
                      controlnets=()) -> ServedModel:
    """Load `model` (None: the bundled demo model) with `threads` CPU threads, its IP-Adapters, its
    ControlNets (paths, each named by its file or folder) and its SDXL refiner, on one backend,
    device and dtype. The errors are sdengine.load's, load_ip_adapter's and load_controlnets'."""
    import sdengine

    from ..device import set_cpu_threads

    set_cpu_threads(threads, demo_model=model is None)  # see `sdengine generate --threads`
    pipe = sdengine.load(model, device=device, dtype=dtype, backend=backend)
    if ip_adapters:
        pipe.load_ip_adapter(list(ip_adapters), image_encoder=image_encoder)
    loaded_controlnets = load_controlnets(pipe, controlnets)
    refiner_pipe = sdengine.load(refiner, device=device, dtype=dtype, backend=backend) if refiner else None
    info = ModelInfo.of(pipe, model, refiner_pipe, refiner, loaded_controlnets)
    served = ServedPipeline(pipe, refiner_pipe, info.refiners[0] if refiner_pipe is not None else None,
                            {c.name: c for c in loaded_controlnets})
    return ServedModel(pipe, served, info)
