"""Checkpoint loading: diffusers folders, single-file `.safetensors`, `.ckpt` / `.pt`.

    loaded = load_model("v1-5-pruned-emaonly.safetensors", device="cuda", dtype=torch.float16)
    loaded.unet, loaded.vae, loaded.text_encoder, loaded.tokenizer, loaded.config

Method (gpt-fast's generate.py): every network is built on the meta device, so no
memory is spent on random initialisation; the loader then checks the whole checkpoint
against the networks (missing keys, unexpected keys, shapes) before it reads a single
tensor, so a bad file fails with nothing half-loaded. Tensors are read one at a time
through safetensors' memory map, renamed (ldm_layout.py), cast once to the target dtype and
device, and handed to `load_state_dict(assign=True)`: the only full copy of the weights
is the one the networks end up holding.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from .config import ModelConfig
from .ldm_layout import (Layout, Source, UnmappedKey, apply_transform, detect_config, family_name,
                      same_up_to_unit_dims, to_ldm_state_dict, transformed_shape)
from .device import resolve_device_dtype
from .errors import ModelLoadError
from .tokenizer import EOS_TOKEN, CLIPTokenizer

SINGLE_FILE_SUFFIXES = (".safetensors",)
TORCH_FILE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
# Weight file names in a diffusers component folder, in order of preference: plain files
# before the fp16 variant, safetensors before pickled .bin, one file before shards.
_WEIGHT_BASENAMES = ("diffusion_pytorch_model", "model", "pytorch_model")
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
    text_encoder: nn.Module
    text_encoder_2: Optional[nn.Module]
    unet: nn.Module
    vae: nn.Module
    tokenizer: CLIPTokenizer
    tokenizer_2: Optional[CLIPTokenizer]
    source: str
    name: Optional[str] = None  # the checkpoint's: its file's stem or its folder's name


# ---------------------------------------------------------------------------
# Weight files
# ---------------------------------------------------------------------------

class WeightReader:
    """Tensors of one checkpoint (one file or a set of shards), by key.

    `shapes` comes from the file headers alone; `get` reads one tensor (on the CPU).
    """

    shapes: dict[str, tuple]
    dtypes: dict[str, str]
    metadata: dict[str, str] = {}  # the safetensors header's __metadata__ (first file)

    def get(self, key: str) -> torch.Tensor:
        raise NotImplementedError

    def file_of(self, key: str) -> Path:
        raise NotImplementedError

    def release(self, key: str) -> None:
        """The caller is done with key (lets an in-memory checkpoint free it)."""

    @property
    def name(self) -> str:
        raise NotImplementedError


class SafetensorsReader(WeightReader):
    """One or more .safetensors files, memory-mapped (safe_open): headers only until `get`."""

    def __init__(self, paths: list[Path]):
        from safetensors import SafetensorError, safe_open

        self.paths = [Path(p) for p in paths]
        self._handles, self._file_of, self.shapes, self.dtypes = {}, {}, {}, {}
        for path in self.paths:
            try:
                handle = safe_open(str(path), framework="pt", device="cpu")
                keys = list(handle.keys())
                for key in keys:
                    view = handle.get_slice(key)
                    if key in self._file_of:
                        raise ModelLoadError(f"{path}: key {key!r} is also in {self._file_of[key]}")
                    self._file_of[key] = path
                    self.shapes[key], self.dtypes[key] = tuple(view.get_shape()), view.get_dtype()
            except SafetensorError as e:
                raise ModelLoadError(f"{path}: not a valid safetensors file (truncated or corrupt?): {e}") from None
            self._handles[path] = handle
        self.metadata = dict(self._handles[self.paths[0]].metadata() or {}) if self.paths else {}

    def get(self, key: str) -> torch.Tensor:
        from safetensors import SafetensorError

        path = self._file_of[key]
        try:
            return self._handles[path].get_tensor(key)
        except SafetensorError as e:
            raise ModelLoadError(f"{path}: cannot read tensor {key!r}: {e}") from None

    def file_of(self, key: str) -> Path:
        return self._file_of[key]

    @property
    def name(self) -> str:
        return str(self.paths[0]) if len(self.paths) == 1 else f"{self.paths[0].parent} ({len(self.paths)} shards)"


class TorchReader(WeightReader):
    """A pickled checkpoint (.ckpt, .pt, .bin), read only through torch.load(weights_only=True).

    Zip-format files are memory-mapped; a "state_dict" entry (Lightning checkpoints) is
    unwrapped, and non-tensor entries (global_step, ...) are ignored.
    """

    def __init__(self, paths: list[Path]):
        self.paths = [Path(p) for p in paths]
        self._tensors, self._file_of = {}, {}
        for path in self.paths:
            for key, tensor in self._load(path).items():
                if key in self._file_of:
                    raise ModelLoadError(f"{path}: key {key!r} is also in {self._file_of[key]}")
                self._tensors[key], self._file_of[key] = tensor, path
        self.shapes = {k: tuple(t.shape) for k, t in self._tensors.items()}
        self.dtypes = {k: str(t.dtype).replace("torch.", "") for k, t in self._tensors.items()}

    @staticmethod
    def _load(path: Path) -> dict:
        load = lambda mmap: torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)  # noqa: E731
        try:
            try:
                data = load(True)
            except RuntimeError as e:
                if "mmap" not in str(e):  # legacy (non-zip) files cannot be memory-mapped
                    raise
                data = load(False)
        except pickle.UnpicklingError as e:
            raise ModelLoadError(f"{path}: refused by torch.load(weights_only=True); it holds objects other than "
                                 f"tensors, and sdengine does not run pickled code: {str(e).splitlines()[0]}") from None
        except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
            raise ModelLoadError(f"{path}: not a readable torch checkpoint (truncated or corrupt?): {e}") from None
        if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
            data = data["state_dict"]
        if not isinstance(data, dict):
            raise ModelLoadError(f"{path}: expected a dict of tensors, found {type(data).__name__}")
        return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}

    def get(self, key: str) -> torch.Tensor:
        return self._tensors[key]

    def release(self, key: str) -> None:
        self._tensors.pop(key, None)

    def file_of(self, key: str) -> Path:
        return self._file_of[key]

    @property
    def name(self) -> str:
        return str(self.paths[0]) if len(self.paths) == 1 else f"{self.paths[0].parent} ({len(self.paths)} shards)"


def open_weights(paths: list[Path]) -> WeightReader:
    """A reader for checkpoint files of one kind (all .safetensors, or all pickled)."""
    if all(p.suffix == ".safetensors" for p in paths):
        return SafetensorsReader(paths)
    return TorchReader(paths)


def component_weight_files(folder: Path) -> list[Path]:
    """The weight file(s) of a diffusers component folder (unet/, vae/, text_encoder/ ...).

    Tries `{diffusion_pytorch_model,model,pytorch_model}{,.fp16}.{safetensors,bin}` and their
    `.index.json` shard maps, preferring the plain variant, then safetensors.
    """
    for variant in ("", ".fp16"):
        for ext in (".safetensors", ".bin"):
            for base in _WEIGHT_BASENAMES:
                single = folder / f"{base}{variant}{ext}"
                if single.is_file():
                    return [single]
                index = folder / f"{base}{variant}{ext}.index.json"
                if index.is_file():
                    try:
                        weight_map = json.loads(index.read_text())["weight_map"]
                    except (json.JSONDecodeError, KeyError, TypeError) as e:
                        raise ModelLoadError(f"{index}: not a valid shard index: {e!r}") from None
                    shards = [folder / name for name in sorted(set(weight_map.values()))]
                    for shard in shards:
                        if not shard.is_file():
                            raise FileNotFoundError(f"{index} names a missing shard: {shard}")
                    return shards
    present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    raise FileNotFoundError(f"no weights in {folder}: expected diffusion_pytorch_model.safetensors, model.safetensors "
                            f"or a .bin / .fp16 variant; found {present or 'nothing'}")


# ---------------------------------------------------------------------------
# Plans: which checkpoint tensor fills which parameter, checked before reading
# ---------------------------------------------------------------------------

@dataclass
class _Plan:
    component: str
    model: nn.Module  # on the meta device
    reader: WeightReader
    sources: dict  # sdengine key -> Source


def _build_networks(config: ModelConfig) -> dict[str, nn.Module]:
    from .models import AutoencoderKL, CLIPTextModel, UNet2DConditionModel

    with torch.device("meta"):
        networks = {
            "text_encoder": CLIPTextModel(config.text_encoder),
            "unet": UNet2DConditionModel(config.unet),
            "vae": AutoencoderKL(config.vae),
        }
        if config.text_encoder_2 is not None:
            networks["text_encoder_2"] = CLIPTextModel(config.text_encoder_2)
    return networks


def _few(items, n: int = 5) -> str:
    items = sorted(items)
    return ", ".join(items[:n]) + (f" (and {len(items) - n} more)" if len(items) > n else "")


def _make_plan(component: str, model: nn.Module, reader: WeightReader, source_of: Callable[[str], Source],
               config_name: str) -> _Plan:
    """Map every parameter of model to a checkpoint tensor; fail on missing keys and shapes."""
    sources, missing = {}, []
    for key, param in model.state_dict().items():
        try:
            source = source_of(key)
        except UnmappedKey:
            raise ModelLoadError(f"{reader.name}: the {component} parameter {key!r} has no counterpart in this "
                                 "checkpoint layout (unsupported architecture)") from None
        if source.key not in reader.shapes:
            missing.append(source.key)
            continue
        found = transformed_shape(reader.shapes[source.key], source.transform)
        if found != tuple(param.shape) and not same_up_to_unit_dims(found, tuple(param.shape)):
            raise ModelLoadError(
                f"{reader.file_of(source.key)}: shape mismatch for {source.key!r}: "
                f"found {list(reader.shapes[source.key])}, the {component} of a {config_name} model expects {list(param.shape)} (for {key})")
        sources[key] = source
    if missing:
        raise ModelLoadError(f"{reader.name}: {len(missing)} {component} weights missing for a {config_name} model: "
                             f"{_few(missing)}")
    return _Plan(component, model, reader, sources)


def _check_unused(reader: WeightReader, used: set, ignorable: Callable[[str], bool], what: str) -> None:
    extra = [k for k in reader.shapes if k not in used and not ignorable(k)]
    if extra:
        raise ModelLoadError(f"{reader.name}: {len(extra)} unexpected weights that no network of {what} uses: "
                             f"{_few(extra)}")


def _execute(plans: list[_Plan], device: torch.device, dtype: torch.dtype, progress: bool) -> dict[str, nn.Module]:
    """Read, rename, cast and assign every tensor; each source is read once per use."""
    from tqdm.auto import tqdm

    remaining_uses: dict = {}
    for plan in plans:
        for source in plan.sources.values():
            remaining_uses[(id(plan.reader), source.key)] = remaining_uses.get((id(plan.reader), source.key), 0) + 1
    total = sum(len(p.sources) for p in plans)
    networks = {}
    with tqdm(total=total, desc="loading weights", unit="tensor", disable=not progress, leave=False) as bar:
        for plan in plans:
            state = {}
            for key, param in plan.model.state_dict().items():
                source = plan.sources[key]
                tensor = apply_transform(plan.reader.get(source.key), source.transform)
                if tuple(tensor.shape) != tuple(param.shape):  # 1x1 conv kernel <-> linear weight
                    tensor = tensor.reshape(param.shape)
                cast = dtype if tensor.is_floating_point() else None
                state[key] = tensor.to(device=device, dtype=cast).contiguous()
                use = (id(plan.reader), source.key)
                remaining_uses[use] -= 1
                if not remaining_uses[use]:
                    plan.reader.release(source.key)
                bar.update()
            plan.model.load_state_dict(state, strict=True, assign=True)
            del state
            left_on_meta = [n for n, t in (*plan.model.named_parameters(), *plan.model.named_buffers()) if t.is_meta]
            if left_on_meta:
                raise ModelLoadError(f"{plan.component}: tensors not filled by the checkpoint: {_few(left_on_meta)}")
            networks[plan.component] = plan.model.eval().requires_grad_(False)
    return networks


# ---------------------------------------------------------------------------
# Formats
# ---------------------------------------------------------------------------

def _check_path(path) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model path does not exist: {path}")
    return path


def _is_diffusers_folder(path: Path) -> bool:
    return path.is_dir() and (path / "model_index.json").is_file()


def _single_file_reader(path: Path) -> tuple[WeightReader, str]:
    if path.suffix in SINGLE_FILE_SUFFIXES:
        return SafetensorsReader([path]), "single-file"
    if path.suffix in TORCH_FILE_SUFFIXES:
        return TorchReader([path]), "ckpt"
    raise ModelLoadError(f"{path}: unsupported file type {path.suffix!r}; expected a diffusers folder, "
                         f"a .safetensors file or a .ckpt / .pt file")


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
        if component == "text_encoder_2" and (not entry or (isinstance(entry, list) and entry[-1] is None)):
            continue
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
        if not _is_diffusers_folder(path):
            raise ModelLoadError(f"{path}: a folder but not a diffusers pipeline (no model_index.json)")
        return _override_prediction(_diffusers_config(path), prediction_type)
    reader, _ = _single_file_reader(path)
    return _detect_single_file(reader, prediction_type)[0]


def _detect_single_file(reader: WeightReader, prediction_type: Optional[str]) -> tuple[ModelConfig, Layout]:
    try:
        return detect_config(reader.shapes, prediction_type=prediction_type, metadata=reader.metadata)
    except ModelLoadError as e:
        raise ModelLoadError(f"{reader.name}: {e}") from None


def _diffusers_plans(path: Path, config: ModelConfig, networks: dict) -> list[_Plan]:
    plans = []
    for component, model in networks.items():
        folder = path / component
        reader = open_weights(component_weight_files(folder))
        if component.startswith("text_encoder") and not any(k.startswith("text_model.") for k in reader.shapes):
            # transformers 5 saves CLIPTextModel without the "text_model." level.
            source_of = lambda key: Source(key.removeprefix("text_model."))  # noqa: E731
        else:
            source_of = Source
        plan = _make_plan(component, model, reader, source_of, config.name)
        _check_unused(reader, {s.key for s in plan.sources.values()}, lambda k: k.endswith("position_ids"),
                      f"the {component}")
        plans.append(plan)
    return plans


def _single_file_plans(reader: WeightReader, layout: Layout, config: ModelConfig, networks: dict) -> list[_Plan]:
    plans = [_make_plan(component, model, reader, lambda key, c=component: layout.source(c, key, config), config.name)
             for component, model in networks.items()]
    used = {s.key for plan in plans for s in plan.sources.values()}
    _check_unused(reader, used, lambda key: layout.ignorable(key, config), f"a {config.name} model")
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
        if not _is_diffusers_folder(path):
            raise ModelLoadError(f"{path}: a folder but not a diffusers pipeline (no model_index.json)")
        config = _override_prediction(config or _diffusers_config(path), prediction_type)
        networks = _build_networks(config)
        plans = _diffusers_plans(path, config, networks)
        source = "diffusers"
        openclip = config.text_encoder.hidden_act == "gelu"  # SD2's OpenCLIP tokenizer pads with "!"
        tokenizer = _tokenizer(path / "tokenizer", "!" if openclip else EOS_TOKEN)
        tokenizer_2 = _tokenizer(path / "tokenizer_2", "!") if config.text_encoder_2 is not None else None
    else:
        reader, source = _single_file_reader(path)
        detected, layout = _detect_single_file(reader, prediction_type)
        config = _override_prediction(config or detected, prediction_type)
        networks = _build_networks(config)
        try:
            plans = _single_file_plans(reader, layout, config, networks)
        except UnmappedKey as e:
            raise ModelLoadError(f"{path}: no LDM name for {e}") from None
        # Single files carry no tokenizer: the bundled CLIP BPE, with each encoder's pad token.
        tokenizer = CLIPTokenizer.default(pad_token="!" if layout.text_openclip else EOS_TOKEN)
        tokenizer_2 = CLIPTokenizer.default(pad_token="!") if config.text_encoder_2 is not None else None

    loaded = _execute(plans, device, dtype, progress)
    return LoadedModel(config=config, text_encoder=loaded["text_encoder"], text_encoder_2=loaded.get("text_encoder_2"),
                       unet=loaded["unet"], vae=loaded["vae"], tokenizer=tokenizer, tokenizer_2=tokenizer_2,
                       source=source, name=path.stem if path.is_file() else path.name)


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------

_MODELSPEC_ARCHITECTURE = {"sd15": "stable-diffusion-v1", "sd21": "stable-diffusion-v2-512",
                           "sd21-v": "stable-diffusion-v2-768-v", "sdxl": "stable-diffusion-xl-v1-base"}


def save_single_file(model: LoadedModel, path, dtype: Optional[torch.dtype] = None) -> Path:
    """Write a loaded model as one LDM / A1111 `.safetensors` file, the layout that A1111,
    ComfyUI and `load_model` read (see ldm_layout.to_ldm_state_dict).

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


def _controlnet_folder(path: Path) -> Path:
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
        plan = _make_plan("controlnet", model, reader, source_of, f"{controlnet_family_name(config)} ControlNet")
    except UnmappedKey as e:
        raise ModelLoadError(f"{path}: no LDM name for {e}") from None
    _check_unused(reader, {s.key for s in plan.sources.values()}, ignorable, "a ControlNet")
    loaded = _execute([plan], device, dtype, progress)["controlnet"]
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
        folder = _controlnet_folder(path)
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
        reader, source = _single_file_reader(path)
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
        return "SDXL" if family == "sdxl" else "SD2" if family.startswith("sd21") else "SD1"
    return {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL"}[controlnet_family(config.unet)]
