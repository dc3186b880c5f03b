"""Checkpoint loading: diffusers folders, single-file `.safetensors`, `.ckpt` / `.pt`.

    loaded = load_model("v1-5-pruned-emaonly.safetensors", device="cuda", dtype=torch.float16)
    loaded.unet, loaded.vae, loaded.text_encoder, loaded.tokenizer, loaded.config

Method (gpt-fast's generate.py): every network is built on the meta device, so no
memory is spent on random initialisation; the loader then checks the whole checkpoint
against the networks (missing keys, unexpected keys, shapes) before it reads a single
tensor, so a bad file fails with nothing half-loaded. Tensors are read one at a time
through safetensors' memory map, renamed (ldm_layout.py), cast once to the target dtype and
device, and handed to `load_state_dict(assign=True)`: the only full copy of the weights
is the one the networks end up holding. The readers and the load plan are sdengine.weights;
this module drives them for whole models (load_model, detect) and loads ControlNets
(load_controlnet_model, detect_controlnet). sdengine.single_file writes single files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .config import ModelConfig
from .device import resolve_device_dtype
from .errors import ModelLoadError
from .ldm_layout import Layout, Source, UnmappedKey, detect_config
from .tokenizer import EOS_TOKEN, CLIPTokenizer
from .weights import (LoadPlan, WeightReader, check_unused, component_weight_files, fill_networks,
                      is_diffusers_folder, make_load_plan, open_weights, single_file_reader)

_NETWORK_CLASSES = {
    "unet": ("UNet2DConditionModel",),
    "vae": ("AutoencoderKL",),
    "text_encoder": ("CLIPTextModel", "CLIPTextModelWithProjection"),
    "text_encoder_2": ("CLIPTextModel", "CLIPTextModelWithProjection"),
}


@dataclass
class LoadedModel:
    """The networks, tokenizers and config of one checkpoint, on one device and dtype.

    source: "diffusers" (a pipeline folder), "single-file" (.safetensors) or "ckpt"
    (.ckpt / .pt read through torch.load(weights_only=True)).
    """

    config: ModelConfig
    text_encoder: Optional[nn.Module]  # None: SDXL's refiner
    text_encoder_2: Optional[nn.Module]
    unet: nn.Module
    vae: nn.Module
    tokenizer: Optional[CLIPTokenizer]  # None: SDXL's refiner
    tokenizer_2: Optional[CLIPTokenizer]
    source: str
    name: Optional[str] = None  # the checkpoint's: its file's stem or its folder's name


def build_networks(config: ModelConfig) -> dict[str, nn.Module]:
    """The networks of a config on the meta device (no memory, no initialisation): what a
    load fills, and what sizes and LoRA key tables are read from."""
    from .models import AutoencoderKL, CLIPTextModel, UNet2DConditionModel

    with torch.device("meta"):
        networks = {"unet": UNet2DConditionModel(config.unet), "vae": AutoencoderKL(config.vae)}
        if config.text_encoder is not None:  # SDXL's refiner has none
            networks["text_encoder"] = CLIPTextModel(config.text_encoder)
        if config.text_encoder_2 is not None:
            networks["text_encoder_2"] = CLIPTextModel(config.text_encoder_2)
    return networks


# ---------------------------------------------------------------------------
# Formats
# ---------------------------------------------------------------------------

def _check_path(path) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model path does not exist: {path}")
    return path


def _override_prediction(config: ModelConfig, prediction_type: Optional[str]) -> ModelConfig:
    if prediction_type is None:
        return config
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
    return replace(config, scheduler=replace(config.scheduler, prediction_type=prediction_type))


def _diffusers_config(path: Path) -> ModelConfig:
    try:
        index = json.loads((path / "model_index.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path / 'model_index.json'} is not valid JSON: {e}") from None
    for component, classes in _NETWORK_CLASSES.items():
        entry = index.get(component)
        if component.startswith("text_encoder") and (not entry or (isinstance(entry, list) and entry[-1] is None)):
            continue  # SD1/SD2 have no text_encoder_2, SDXL's refiner no text_encoder (the config says if none is)
        class_name = entry[-1] if isinstance(entry, list) else None
        if class_name not in classes:
            found = {k: v[-1] for k, v in index.items() if isinstance(v, list) and v[-1]}
            raise ModelLoadError(f"{path}: unsupported architecture: model_index.json names {component}={class_name!r} "
                                 f"(expected {' or '.join(classes)}); components found: {found}")
    try:
        return ModelConfig.from_diffusers(path)
    except (ValueError, TypeError) as e:
        raise ModelLoadError(f"{path}: unsupported or invalid diffusers config: {e}") from None


def detect(path, prediction_type: Optional[str] = None) -> ModelConfig:
    """The ModelConfig of a checkpoint, read from its configs or its keys and shapes only.

    See `ldm_layout.detect_config` for the single-file rules, and `load_model` for the arguments.
    """
    path = _check_path(path)
    if path.is_dir():
        if not is_diffusers_folder(path):
            raise ModelLoadError(f"{path}: a folder but not a diffusers pipeline (no model_index.json)")
        return _override_prediction(_diffusers_config(path), prediction_type)
    reader, _ = single_file_reader(path)
    return _detect_single_file(reader, prediction_type)[0]


def _detect_single_file(reader: WeightReader, prediction_type: Optional[str]) -> tuple[ModelConfig, Layout]:
    try:
        return detect_config(reader.shapes, prediction_type=prediction_type, metadata=reader.metadata)
    except ModelLoadError as e:
        raise ModelLoadError(f"{reader.name}: {e}") from None


def _diffusers_plans(path: Path, config: ModelConfig, networks: dict) -> list[LoadPlan]:
    plans = []
    for component, model in networks.items():
        folder = path / component
        reader = open_weights(component_weight_files(folder))
        if component.startswith("text_encoder") and not any(k.startswith("text_model.") for k in reader.shapes):
            # transformers 5 saves CLIPTextModel without the "text_model." level.
            source_of = lambda key: Source(key.removeprefix("text_model."))  # noqa: E731
        else:
            source_of = Source
        plan = make_load_plan(component, model, reader, source_of, config.name)
        check_unused(reader, {s.key for s in plan.sources.values()}, lambda k: k.endswith("position_ids"),
                      f"the {component}")
        plans.append(plan)
    return plans


def _single_file_plans(reader: WeightReader, layout: Layout, config: ModelConfig,
                       networks: dict) -> list[LoadPlan]:
    plans = [make_load_plan(component, model, reader, lambda key, c=component: layout.source(c, key, config),
                            config.name)
             for component, model in networks.items()]
    used = {s.key for plan in plans for s in plan.sources.values()}
    check_unused(reader, used, lambda key: layout.ignorable(key, config), f"a {config.name} model")
    return plans


def _tokenizer(folder: Path, pad_token: str) -> CLIPTokenizer:
    return CLIPTokenizer.from_folder(folder) if folder.is_dir() else CLIPTokenizer.default(pad_token=pad_token)


def load_model(path, device=None, dtype=None, *, config: Optional[ModelConfig] = None,
               prediction_type: Optional[str] = None, progress: bool = True) -> LoadedModel:
    """Load a checkpoint's networks, tokenizers and config.

    path:   a diffusers folder (model_index.json + unet/, vae/, text_encoder/ ...; weights as
            .safetensors or .bin, or their .fp16 variant), a single-file .safetensors with
            the LDM / A1111 key names, or a .ckpt / .pt (torch.load(weights_only=True)).
    device: default "cuda" when available, else "cpu".
    dtype:  torch.float32 / float16 / bfloat16 (or "fp32", "fp16", "bf16"); default fp16
            on CUDA, fp32 on the CPU. Floating-point weights are cast once, on the way in.
    config: a ModelConfig to use instead of the detected one (single files whose head
            counts or group norms follow no preset rule, e.g. tiny test models).
    prediction_type: "epsilon" or "v_prediction", overriding what was detected (SD2
            single files are taken as v-prediction; see ldm_layout.detect_config).
    progress: show a tqdm bar while reading tensors.

    Raises FileNotFoundError for a missing path or file, and ModelLoadError (a ValueError)
    naming the file and key for an unsupported architecture, a corrupt or truncated file,
    missing or unexpected weights, or a shape mismatch. Everything is checked before any
    tensor is read, so an error never leaves a half-loaded model.
    """
    path = _check_path(path)
    device, dtype = resolve_device_dtype(device, dtype)
    if path.is_dir():
        if not is_diffusers_folder(path):
            raise ModelLoadError(f"{path}: a folder but not a diffusers pipeline (no model_index.json)")
        config = _override_prediction(config or _diffusers_config(path), prediction_type)
        networks = build_networks(config)
        plans = _diffusers_plans(path, config, networks)
        source = "diffusers"
        openclip = config.text_encoder is not None and config.text_encoder.hidden_act == "gelu"
        # SD2's OpenCLIP tokenizer pads with "!"; SDXL's refiner has no first tokenizer
        tokenizer = _tokenizer(path / "tokenizer", "!" if openclip else EOS_TOKEN) if config.text_encoder else None
        tokenizer_2 = _tokenizer(path / "tokenizer_2", "!") if config.text_encoder_2 is not None else None
    else:
        reader, source = single_file_reader(path)
        detected, layout = _detect_single_file(reader, prediction_type)
        config = _override_prediction(config or detected, prediction_type)
        networks = build_networks(config)
        try:
            plans = _single_file_plans(reader, layout, config, networks)
        except UnmappedKey as e:
            raise ModelLoadError(f"{path}: no LDM name for {e}") from None
        # Single files carry no tokenizer: the bundled CLIP BPE, with each encoder's pad token.
        tokenizer = CLIPTokenizer.default(pad_token="!" if layout.text_openclip else EOS_TOKEN) \
            if config.text_encoder is not None else None
        tokenizer_2 = CLIPTokenizer.default(pad_token="!") if config.text_encoder_2 is not None else None

    loaded = fill_networks(plans, device, dtype, progress)
    return LoadedModel(config=config, text_encoder=loaded.get("text_encoder"), text_encoder_2=loaded.get("text_encoder_2"),
                       unet=loaded["unet"], vae=loaded["vae"], tokenizer=tokenizer, tokenizer_2=tokenizer_2,
                       source=source, name=path.stem if path.is_file() else path.name)


# ---------------------------------------------------------------------------
# ControlNets
# ---------------------------------------------------------------------------

@dataclass
class LoadedControlNet:
    """A ControlNet's network and config, on one device and dtype.

    source: "diffusers" (a folder with config.json), "single-file" (.safetensors) or "ckpt"
    (.pth / .ckpt / .pt through torch.load(weights_only=True)). name: the file or folder name.
    """

    config: "ControlNetConfig"  # noqa: F821 (sdengine.config)
    model: nn.Module
    source: str
    name: str
    path: Path


def controlnet_folder(path: Path) -> Path:
    """The folder holding the ControlNet's config.json: path, or a pipeline folder's controlnet/."""
    if (path / "config.json").is_file():
        return path
    if (path / "controlnet" / "config.json").is_file():
        return path / "controlnet"
    raise ModelLoadError(f"{path}: a folder without a ControlNet config.json (a diffusers ControlNetModel folder "
                         "holds config.json and diffusion_pytorch_model.safetensors)")


def load_controlnet_model(path, device=None, dtype=None, *, base: Optional[ModelConfig] = None,
                          progress: bool = False) -> LoadedControlNet:
    """Load a ControlNet: a diffusers ControlNetModel folder (config.json + weights as .safetensors
    or .bin, or their .fp16 variant), or an A1111 / Civitai single file in the LDM layout
    (`control_model.*` keys; .safetensors, or .pth / .ckpt / .pt through torch.load(weights_only=True)).
    SD1, SD2 and SDXL ControlNets are told apart from their keys and shapes.

    base: the config of the model it will run with. A single file does not record head counts;
    they are taken from base's UNet when its levels agree (see ldm_layout.detect_controlnet_config).
    The ControlNet is not checked against base here (see sdengine.controlnet.check_fits).

    Raises FileNotFoundError for a missing path, ModelLoadError (a ValueError) naming the file and
    key for anything else: not a ControlNet, an unsupported architecture, a corrupt file, missing
    or unexpected weights, a shape mismatch. Nothing is read before everything is checked.
    """
    from .models.controlnet import ControlNetModel

    path = _check_path(path)
    device, dtype = resolve_device_dtype(device, dtype)
    config, reader, source_of, source, ignorable = _controlnet_source(path, base)
    with torch.device("meta"):
        model = ControlNetModel(config)
    name = path.name
    try:
        plan = make_load_plan("controlnet", model, reader, source_of, f"{controlnet_family_name(config)} ControlNet")
    except UnmappedKey as e:
        raise ModelLoadError(f"{path}: no LDM name for {e}") from None
    check_unused(reader, {s.key for s in plan.sources.values()}, ignorable, "a ControlNet")
    loaded = fill_networks([plan], device, dtype, progress)["controlnet"]
    return LoadedControlNet(config=config, model=loaded, source=source, name=name, path=path)


def detect_controlnet(path, base: Optional[ModelConfig] = None):
    """The ControlNetConfig of a ControlNet folder or single file, from its config or its keys and
    shapes only (see load_controlnet_model)."""
    return _controlnet_source(_check_path(path), base)[0]


def _controlnet_source(path: Path, base: Optional[ModelConfig]):
    """(config, reader, source_of, source kind, ignorable) of a ControlNet folder or single file."""
    from .config import ControlNetConfig
    from .ldm_layout import controlnet_key_to_ldm, detect_controlnet_config

    if path.is_dir():
        folder = controlnet_folder(path)
        try:
            data = json.loads((folder / "config.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ModelLoadError(f"{folder / 'config.json'} is not valid JSON: {e}") from None
        class_name = data.get("_class_name", "ControlNetModel")
        if class_name != "ControlNetModel":
            raise ModelLoadError(f"{folder}: unsupported architecture: config.json names {class_name!r} "
                                 "(expected ControlNetModel)")
        try:
            config = ControlNetConfig.from_dict(data, str(folder / "config.json"))
        except (ValueError, TypeError) as e:
            raise ModelLoadError(f"{folder}: unsupported or invalid ControlNet config: {e}") from None
        reader = open_weights(component_weight_files(folder))
        source_of, source, ignorable = Source, "diffusers", (lambda key: False)
    else:
        reader, source = single_file_reader(path)
        try:
            config, prefix = detect_controlnet_config(reader.shapes, base.unet if base is not None else None)
        except ModelLoadError as e:
            raise ModelLoadError(f"{reader.name}: {e}") from None

        def source_of(key, config=config, prefix=prefix):
            return Source(prefix + controlnet_key_to_ldm(key, config))

        # lllyasviel's v1.0 files also hold the whole SD model the ControlNet was trained with: not read.
        ignorable = (lambda key: not key.startswith(prefix)) if prefix else (lambda key: False)
    return config, reader, source_of, source, ignorable


def controlnet_family_name(config) -> str:
    """"SD1", "SD2" or "SDXL" for a ControlNetConfig or a ModelConfig."""
    from .ldm_layout import controlnet_family, family_name

    if isinstance(config, ModelConfig):  # told apart by its text encoders
        family = family_name(config)
        return "SDXL" if family.startswith("sdxl") else "SD2" if family.startswith("sd21") else "SD1"
    return {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL"}[controlnet_family(config.unet)]
