"""Checkpoint weights: the readers of weight files and the load plan that fills networks from them.

    reader = open_weights(component_weight_files(folder))      # or single_file_reader(path)
    plan = make_load_plan("unet", meta_unet, reader, Source, "sd15")  # every key and shape checked
    check_unused(reader, {s.key for s in plan.sources.values()}, ignorable, "the unet")
    networks = fill_networks([plan], device, dtype, progress)   # then read, renamed, cast, assigned

A reader knows its tensors' names, shapes and dtypes from the file headers alone, and reads
one tensor at a time: safetensors through its memory map, pickled checkpoints only through
torch.load(weights_only=True). A load plan maps every parameter of a network built on the
meta device to one checkpoint tensor (and the transform that renames or reshapes it,
ldm_layout.py) and fails on anything missing or misshapen before a tensor is read.
sdengine.loading drives them for whole models and ControlNets; LoRA and embedding files use
the readers too.
"""

from __future__ import annotations

import json
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .errors import ModelLoadError
from .ldm_layout import Source, UnmappedKey, apply_transform, same_up_to_unit_dims, transformed_shape

SINGLE_FILE_SUFFIXES = (".safetensors",)
TORCH_FILE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
# Weight file names in a diffusers component folder, in order of preference: plain files
# before the fp16 variant, safetensors before pickled .bin, one file before shards.
_WEIGHT_BASENAMES = ("diffusion_pytorch_model", "model", "pytorch_model")


# ---------------------------------------------------------------------------
# Readers
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


def is_diffusers_folder(path: Path) -> bool:
    """A diffusers pipeline folder (it holds model_index.json)."""
    return path.is_dir() and (path / "model_index.json").is_file()


def single_file_reader(path: Path) -> tuple[WeightReader, str]:
    """The reader of a single-file checkpoint and its kind: "single-file" or "ckpt"."""
    if path.suffix in SINGLE_FILE_SUFFIXES:
        return SafetensorsReader([path]), "single-file"
    if path.suffix in TORCH_FILE_SUFFIXES:
        return TorchReader([path]), "ckpt"
    raise ModelLoadError(f"{path}: unsupported file type {path.suffix!r}; expected a diffusers folder, "
                         f"a .safetensors file or a .ckpt / .pt file")


# ---------------------------------------------------------------------------
# Load plans: which checkpoint tensor fills which parameter, checked before reading
# ---------------------------------------------------------------------------

@dataclass
class LoadPlan:
    """Where each parameter of one network (built on the meta device) comes from: reader's
    tensor sources[key].key, through sources[key].transform (ldm_layout.Source)."""

    component: str
    model: nn.Module  # on the meta device
    reader: WeightReader
    sources: dict  # sdengine key -> Source


def _few(items, n: int = 5) -> str:
    items = sorted(items)
    return ", ".join(items[:n]) + (f" (and {len(items) - n} more)" if len(items) > n else "")


def make_load_plan(component: str, model: nn.Module, reader: WeightReader, source_of: Callable[[str], Source],
                   config_name: str) -> LoadPlan:
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
    return LoadPlan(component, model, reader, sources)


def check_unused(reader: WeightReader, used: set, ignorable: Callable[[str], bool], what: str) -> None:
    """Fail on checkpoint tensors that no plan uses and `ignorable` does not excuse."""
    extra = [k for k in reader.shapes if k not in used and not ignorable(k)]
    if extra:
        raise ModelLoadError(f"{reader.name}: {len(extra)} unexpected weights that no network of {what} uses: "
                             f"{_few(extra)}")


def fill_networks(plans: list[LoadPlan], device: torch.device, dtype: torch.dtype,
                  progress: bool) -> dict[str, nn.Module]:
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
