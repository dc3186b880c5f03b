"""Writing single-file checkpoints: a loaded model as one LDM / A1111 `.safetensors` file.

    save_single_file(load_model("my-diffusers-folder"), "model.safetensors", dtype=torch.float16)

The inverse of loading one (sdengine.loading.load_model): the keys are renamed by
ldm_layout.to_ldm_state_dict, and the header carries the modelspec keys that A1111 and
ComfyUI read.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Optional

import torch

from .ldm_layout import family_name, to_ldm_state_dict

_MODELSPEC_ARCHITECTURE = {"sd15": "stable-diffusion-v1", "sd21": "stable-diffusion-v2-512",
                           "sd21-v": "stable-diffusion-v2-768-v", "sdxl": "stable-diffusion-xl-v1-base",
                           "sdxl-refiner": "stable-diffusion-xl-v1-refiner"}


def save_single_file(model, path, dtype: Optional[torch.dtype] = None) -> Path:
    """Write a loaded model (sdengine.loading.LoadedModel) as one LDM / A1111 `.safetensors`
    file, the layout that A1111, ComfyUI and `load_model` read (see ldm_layout.to_ldm_state_dict).

    dtype: cast the floating-point tensors (default: keep the model's dtype). The header
    records the prediction type (`modelspec.prediction_type`, plus a `v_pred` key for
    v-prediction models, A1111's and ComfyUI's marker), so an SD2 512-base model is not
    read back as v-prediction. The file is written next to `path` and renamed into place:
    an error leaves no partial file.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"save_single_file writes .safetensors files, got {path.name!r}")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"output folder does not exist: {path.parent}")
    networks = {name: getattr(model, name) for name in ("unet", "vae", "text_encoder", "text_encoder_2")
                if getattr(model, name) is not None}
    state = to_ldm_state_dict(model.config, {name: net.state_dict() for name, net in networks.items()})
    v_prediction = model.config.prediction_type == "v_prediction"
    if v_prediction:
        state["v_pred"] = torch.zeros(0)
    state = {key: (t.to(dtype) if dtype is not None and t.is_floating_point() else t).detach().cpu().contiguous()
             for key, t in state.items()}
    metadata = {"format": "pt", "modelspec.prediction_type": "v" if v_prediction else "epsilon"}
    architecture = _MODELSPEC_ARCHITECTURE.get(family_name(model.config))
    if architecture:
        metadata |= {"modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": architecture,
                     "modelspec.implementation": "sgm"}
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(handle)
    try:
        save_file(state, temporary, metadata=metadata)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path
