"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"): reading kohya /
A1111 and diffusers / PEFT files, and merging them into the networks' weights in place.

    pipe.set_loras([("style.safetensors", 0.8), ("detail.safetensors", 0.5)])   # replaces the set
    pipe.set_loras([])                                                        # the base weights, bit for bit

A LoRA adds a low-rank product to a weight: W' = W + Σ_i s_i · (alpha_i / rank_i) · up_i @ down_i.
sdengine merges that sum **into the tensors the networks already use** (`Tensor.copy_`, never a
new Parameter), so everything compiled around those tensors stays valid across a swap: CUDA
graphs read the weights in place, AOTInductor engines hold them as user-managed constants, and
the Triton backend's fused QKV projection is a tensor whose row slices are to_q / to_k / to_v.
A swap costs a few matmuls; nothing is recompiled or recaptured.

The seam between LoRA and a backend is one map, `backend.weight_views()`: component ("unet",
"text_encoder", "text_encoder_2") -> diffusers-style parameter name
("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight") -> the tensor, or view of
a tensor, that holds it (`parameter_views` builds it from torch modules, fused QKV included).

Bit-exact restore: before a weight is first changed, a copy of it is kept (only the weights some
LoRA touches, and kept for the next swap: their size again in memory, ~1.4 GB in fp32 for a
kohya-default SD1.5 LoRA); `set_loras([])` copies them back. Every file is read and checked against the
model before any weight changes, so bad input leaves every weight as it was.

File layouts (detected from the keys):
- kohya / A1111: `lora_unet_<module>.lora_down.weight`, `.lora_up.weight`, `.alpha`, where
  <module> is the module path with "_" for "." in diffusers' UNet names (SD1 / SD2, as kohya's
  trainer names them) or in the LDM names (input_blocks_4_1_..., as kohya's SDXL trainer and
  older tools name them); text encoders `lora_te_` (SD1 / SD2) or `lora_te1_` / `lora_te2_`
  (SDXL), in transformers' CLIP names. LoCon convolution layers have a (rank, in, kh, kw) down
  and a (out, rank, 1, 1) up. Scale alpha / rank (1 without alpha).
- diffusers / PEFT: `unet.<module>.lora_A.weight` / `.lora_B.weight` (also `text_encoder.`,
  `text_encoder_2.`), or diffusers' format of the same (`.lora.down.weight` / `.lora.up.weight`,
  `.lora_linear_layer.down.weight` / `.up.weight`, what its training scripts save). Alpha from the header's `lora_adapter_metadata` (diffusers'
  save_lora_weights: `<component>.lora_alpha`, `.r`, `.alpha_pattern`, `.rank_pattern`,
  `.use_rslora`), else from `<module>.alpha` keys, else scale 1 (PEFT's default lora_alpha = r).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
import threading
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

import torch
from torch import nn

from .config import ModelConfig
from .ldm_layout import UnmappedKey, same_up_to_unit_dims, unet_key_to_ldm
from .errors import ModelLoadError, weights_file

LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin")
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
# The part of a key after the module name -> its role, per layout.
_KOHYA_PARTS = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
_PEFT_PARTS = {"lora_A.weight": "down", "lora_B.weight": "up", "alpha": "alpha",
               # diffusers' own format (convert_state_dict_to_diffusers, which its training scripts save):
               "lora.down.weight": "down", "lora.up.weight": "up",
               "lora_linear_layer.down.weight": "down", "lora_linear_layer.up.weight": "up"}
# Keys of adapter kinds sdengine does not merge, with what they are (for the error message).
_UNSUPPORTED_PARTS = {"lora_mid.weight": "LoCon with a Tucker-decomposed middle (lora_mid)",
                      "dora_scale": "DoRA", "lora_magnitude_vector": "DoRA", "hada_w1_a": "LyCORIS LoHa",
                      "lokr_w1": "LyCORIS LoKr", "lora_B.bias": "a LoRA with a bias (lora_B.bias)",
                      "diff": "a full-weight difference (LyCORIS 'full')", "oft_blocks": "OFT"}


# ---------------------------------------------------------------------------
# Names: which module of the model a LoRA file's key refers to
# ---------------------------------------------------------------------------

@functools.lru_cache(maxsize=8)
def lora_targets(config: ModelConfig) -> dict[tuple[str, str], tuple]:
    """(component, weight key) -> weight shape, for every weight a LoRA may change: the Linear
    and Conv2d weights of the UNet and the text encoder(s)."""
    from .loading import build_networks

    targets = {}
    for component, network in build_networks(config).items():  # on the meta device: names and shapes only
        if component not in COMPONENTS:
            continue
        for module_name, module in network.named_modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                targets[(component, f"{module_name}.weight")] = tuple(module.weight.shape)
    return targets


@functools.lru_cache(maxsize=8)
def lora_names(config: ModelConfig) -> dict[str, tuple[str, str]]:
    """Every module name a LoRA file may use for a weight of this model -> (component, weight key).

    kohya's names ("lora_unet_down_blocks_0_..._to_q", its LDM form
    "lora_unet_input_blocks_1_1_..._to_q", "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
    "lora_te1_" / "lora_te2_" for SDXL) and PEFT's dotted paths with the component in front
    ("unet.down_blocks.0....to_q", "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
    also without "text_model.", as transformers 5 names CLIPTextModel's modules).
    """
    sdxl = config.text_encoder_2 is not None
    kohya_prefix = {"unet": "lora_unet_", "text_encoder": "lora_te1_" if sdxl else "lora_te_",
                    "text_encoder_2": "lora_te2_"}
    names: dict[str, tuple[str, str]] = {}

    def add(name: str, target: tuple[str, str]) -> None:
        if names.setdefault(name, target) != target:  # a name must never be ambiguous
            raise AssertionError(f"LoRA module name {name!r} refers to both {names[name]} and {target}")

    for target in lora_targets(config):
        component, key = target
        module_name = key.removesuffix(".weight")
        add(kohya_prefix[component] + module_name.replace(".", "_"), target)
        add(f"{component}.{module_name}", target)
        if component == "unet":
            try:
                ldm = unet_key_to_ldm(key, config.unet).removesuffix(".weight")
            except UnmappedKey:
                continue
            add("lora_unet_" + ldm.replace(".", "_"), target)
        elif module_name.startswith("text_model."):
            add(f"{component}.{module_name.removeprefix('text_model.')}", target)
    return names


# ---------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------

@dataclass
class LoraLayer:
    """One weight's low-rank update: delta = scale · up @ down, reshaped to the weight's shape."""

    component: str
    key: str                 # the sdengine (diffusers) weight name
    name: str                # the module name in the file, for messages
    down: torch.Tensor       # (rank, in) or (rank, in, kh, kw)
    up: torch.Tensor         # (out, rank) or (out, rank, 1, 1)
    scale: float             # alpha / rank (or PEFT's scaling)

    @property
    def delta_shape(self) -> tuple:
        return (self.up.shape[0], *self.down.shape[1:])


@dataclass
class Lora:
    """A LoRA file read and checked against one model's architecture."""

    path: Path
    layout: str                        # "kohya" or "peft"
    layers: list                       # LoraLayer
    _prepared: dict = field(default_factory=dict, repr=False)  # device -> [(up 2D, down 2D) float32]
    _hash: Optional[str] = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def shorthash(self) -> str:
        """A1111's "Lora hashes" value: the first 12 hex digits of the file's sha256 (for
        .safetensors the kohya / addnet hash, of the bytes after the header)."""
        if self._hash is None:
            self._hash = file_hash(self.path)
        return self._hash[:12]

    def factors(self, device: torch.device) -> list:
        """(up (out, rank), down (rank, in·kh·kw)) float32 on device, per layer, kept for the next swap."""
        key = str(device)
        if key not in self._prepared:
            self._prepared.clear()  # one device at a time
            self._prepared[key] = [(layer.up.reshape(layer.up.shape[0], -1).to(device, torch.float32),
                                    layer.down.reshape(layer.down.shape[0], -1).to(device, torch.float32))
                                   for layer in self.layers]
        return self._prepared[key]


def file_hash(path) -> str:
    """sha256 hex of a LoRA file as A1111 records it: for .safetensors, of the bytes after the
    header (kohya's / sd-webui-additional-networks' hash); for other files, of the whole file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if Path(path).suffix == ".safetensors":
            header_size = int.from_bytes(f.read(8), "little")
            f.seek(8 + header_size)
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _split_key(key: str, layout: str) -> tuple[str, str]:
    """(module name, part) of a LoRA key: "lora_unet_x.lora_down.weight" -> ("lora_unet_x", "lora_down.weight")."""
    if layout == "kohya":
        module, _, part = key.partition(".")
        return module, part
    for part in sorted((*_PEFT_PARTS, *_UNSUPPORTED_PARTS), key=len, reverse=True):
        if key.endswith("." + part):
            return key[:-len(part) - 1], part
    return key, ""


def detect_layout(keys: Iterable[str], path) -> str:
    """"kohya" or "peft" from a file's keys; ModelLoadError naming the file and a key otherwise."""
    keys = sorted(keys)
    if not keys:
        raise ModelLoadError(f"{path}: no tensors: not a LoRA file")
    kohya = [k for k in keys if k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_"))]
    peft = [k for k in keys if any(k.endswith("." + part) for part in _PEFT_PARTS if part != "alpha")]
    if kohya and len(kohya) == len(keys):
        return "kohya"
    if peft and all(k.startswith(tuple(c + "." for c in COMPONENTS)) for k in keys):
        return "peft"
    odd = next((k for k in keys if k not in kohya and k not in peft), keys[0])
    hint = ""
    if set(keys) & {"emb_params", "string_to_param", "clip_l", "clip_g"} or len(keys) == 1:
        hint = " (it looks like a textual-inversion embedding: load it with load_embedding)"
    raise ModelLoadError(
        f"{path}: not a LoRA layout sdengine reads{hint}; key {odd!r} fits neither kohya / A1111 "
        "(lora_unet_* / lora_te_* / lora_te1_* / lora_te2_* with .lora_down.weight, .lora_up.weight, .alpha) nor "
        "diffusers / PEFT (unet.* / text_encoder.* / text_encoder_2.* with .lora_A.weight, .lora_B.weight)")


def _peft_alphas(metadata: dict, path) -> dict:
    """component -> settings from diffusers' `lora_adapter_metadata` header entry (or {})."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        packed = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path}: lora_adapter_metadata in the header is not valid JSON: {e}") from None
    settings: dict = {}
    for key, value in packed.items():  # diffusers packs "<component>.<setting>"
        component, _, setting = key.partition(".")
        if component in COMPONENTS:
            settings.setdefault(component, {})[setting] = value
    return settings


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern: the first pattern that matches the end of the module path."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def read_lora(path, config: ModelConfig) -> Lora:
    """Read a LoRA file and check every key and shape against the model of `config`.

    Raises FileNotFoundError for a missing file, and ModelLoadError naming the file and key for
    a layout it does not know, a module the model does not have (e.g. an SDXL LoRA on SD1), a
    missing down or up weight, ranks that differ between them, a shape that does not fit the
    weight, or a truncated or corrupt file.
    """
    from .weights import SafetensorsReader, TorchReader

    path = weights_file(path, "LoRA", LORA_SUFFIXES)
    reader = SafetensorsReader([path]) if path.suffix == ".safetensors" else TorchReader([path])
    layout = detect_layout(reader.shapes, path)
    names = lora_names(config)
    peft_settings = _peft_alphas(reader.metadata, path) if layout == "peft" else {}

    modules: dict[str, dict[str, str]] = {}  # module name -> part -> key
    for key in reader.shapes:
        module, part = _split_key(key, layout)
        for unsupported, what in _UNSUPPORTED_PARTS.items():
            if part == unsupported or part.startswith(unsupported + "."):
                raise ModelLoadError(f"{path}: key {key!r} belongs to {what}, which sdengine does not merge")
        role = (_KOHYA_PARTS if layout == "kohya" else _PEFT_PARTS).get(part)
        if role is None:
            raise ModelLoadError(f"{path}: unexpected key {key!r} in a {layout} LoRA")
        if role in modules.setdefault(module, {}):
            raise ModelLoadError(f"{path}: {key!r} and {modules[module][role]!r} are both the {role} weight of "
                                 f"{module!r}")
        modules[module][role] = key

    down_part, up_part = "down", "up"
    layers, seen = [], {}
    for module in sorted(modules):
        parts = modules[module]
        target = names.get(module)
        if target is None:
            raise ModelLoadError(f"{path}: the model ({config.name}) has no layer {module!r} (key "
                                 f"{next(iter(parts.values()))!r}): a LoRA for another architecture?")
        if target in seen:
            raise ModelLoadError(f"{path}: {module!r} and {seen[target]!r} both name the weight {target[1]} "
                                 f"of the {target[0]}")
        seen[target] = module
        for part in (down_part, up_part):
            if part not in parts:
                raise ModelLoadError(f"{path}: {module!r} has no {part} weight (only {sorted(parts.values())})")
        down_shape, up_shape = reader.shapes[parts[down_part]], reader.shapes[parts[up_part]]
        if len(down_shape) not in (2, 4) or len(up_shape) != len(down_shape):
            raise ModelLoadError(f"{path}: {parts[down_part]!r} {list(down_shape)} and {parts[up_part]!r} "
                                 f"{list(up_shape)} are not a linear or convolution LoRA pair")
        if up_shape[1] != down_shape[0]:
            raise ModelLoadError(f"{path}: mismatched ranks in {module!r}: {parts[down_part]!r} has rank "
                                 f"{down_shape[0]} ({list(down_shape)}) but {parts[up_part]!r} has rank {up_shape[1]} "
                                 f"({list(up_shape)})")
        if any(d != 1 for d in up_shape[2:]):
            raise ModelLoadError(f"{path}: {parts[up_part]!r} has a {list(up_shape[2:])} kernel; sdengine merges "
                                 "LoRA up weights with 1x1 kernels only")
        component, key = target
        expected = lora_targets(config)[target]
        delta = (up_shape[0], *down_shape[1:])
        if delta != expected and not same_up_to_unit_dims(delta, expected):
            raise ModelLoadError(f"{path}: {module!r} (key {parts[down_part]!r}) gives a {list(delta)} update but "
                                 f"the {component} weight {key} is {list(expected)}")
        rank = down_shape[0]
        alpha = None
        if "alpha" in parts:
            if math.prod(reader.shapes[parts["alpha"]]) != 1:
                raise ModelLoadError(f"{path}: {parts['alpha']!r} has shape {list(reader.shapes[parts['alpha']])}; "
                                     "alpha is one number")
            alpha = float(reader.get(parts["alpha"]).reshape(()).item())
        settings = peft_settings.get(component, {})
        if alpha is None and settings:
            alpha = float(_pattern_value(settings.get("alpha_pattern"), module.partition(".")[2],
                                         settings.get("lora_alpha", rank)))
        if alpha is None or alpha == 0:  # kohya: alpha 0 or absent means alpha = rank
            alpha = rank
        scale = alpha / math.sqrt(rank) if settings.get("use_rslora") else alpha / rank
        layers.append(LoraLayer(component, key, module, reader.get(parts[down_part]), reader.get(parts[up_part]),
                                scale))
    for layer in layers:
        for which in ("down", "up"):
            tensor = getattr(layer, which)
            if not tensor.is_floating_point():
                raise ModelLoadError(f"{path}: the {which} weight of {layer.name!r} is {tensor.dtype}, not floating point")
    return Lora(path=path, layout=layout, layers=layers)


# ---------------------------------------------------------------------------
# The seam: parameter name -> the tensor that holds it
# ---------------------------------------------------------------------------

def parameter_views(networks: dict) -> dict[str, dict[str, torch.Tensor]]:
    """component -> diffusers-style parameter name -> the tensor (or view) the network computes with.

    networks: component name -> torch module (None entries are skipped). Parameters map to
    themselves (detached: same storage). A self-attention whose q, k, v were fused at load time
    (`Attention.fuse_qkv`: one `to_qkv` of 3·dim rows, in q, k, v order) maps `to_q.weight`,
    `to_k.weight`, `to_v.weight` (and biases) to the three row slices of `to_qkv`.
    """
    from .models.layers import Attention

    views: dict[str, dict[str, torch.Tensor]] = {}
    for component, module in networks.items():
        if module is None:
            continue
        named = {name: p.detach() for name, p in module.named_parameters()}
        for name, sub in module.named_modules():
            if isinstance(sub, Attention) and sub.to_qkv is not None:
                rows = sub.to_qkv.out_features // 3
                for i, part in enumerate("qkv"):
                    for kind in ("weight", "bias"):
                        fused = getattr(sub.to_qkv, kind)
                        if fused is not None:
                            named[f"{name}.to_{part}.{kind}"] = fused.detach()[i * rows:(i + 1) * rows]  # (dim, ...)
        views[component] = named
    return views


# ---------------------------------------------------------------------------
# Merging
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class LoraSpec:
    """One entry of a LoRA set: a file and its scale (text_scale: the text encoders' scale, when
    it differs, as A1111's <lora:name:te_scale:unet_scale>)."""

    path: Path
    scale: float = 1.0
    text_scale: Optional[float] = None

    @classmethod
    def of(cls, entry) -> "LoraSpec":
        """From a path, (path, scale), (path, scale, text_scale) or a LoraSpec."""
        if isinstance(entry, LoraSpec):
            return entry
        if isinstance(entry, (str, os.PathLike)):
            return cls(Path(entry))
        if isinstance(entry, (tuple, list)) and len(entry) in (2, 3) and isinstance(entry[0], (str, os.PathLike)):
            try:
                scales = [float(s) for s in entry[1:]]
            except (TypeError, ValueError):
                scales = [math.nan]
            if not all(math.isfinite(s) for s in scales):
                raise ValueError(f"LoRA scales must be finite numbers: (path, scale), got {entry!r}")
            return cls(Path(entry[0]), *scales)
        raise ValueError(f"a LoRA is a path, (path, scale) or (path, scale, text_encoder_scale); got {entry!r}")

    def scale_for(self, component: str) -> float:
        return self.text_scale if self.text_scale is not None and component != "unet" else self.scale


class LoraWeights:
    """The LoRA set merged into one model's weights, and the copies that undo it.

    weight_views: a callable returning the backend's `weight_views()` map (read at every swap, so
    a backend that rebuilt a module is seen as it is now). Not thread-safe by itself: the
    pipeline holds its write lock around `apply`.
    """

    def __init__(self, config: ModelConfig, weight_views, cache_size: int = 8):
        self.config = config
        self.weight_views = weight_views
        self.active: tuple = ()          # ((LoraSpec, file stamp), ...) merged now
        self.loras: list = []            # [(LoraSpec, Lora)] merged now, in order
        self._backups: dict = {}         # (component, key) -> the weight before any LoRA (kept for the next swap)
        self._changed: set = set()       # targets whose weight differs from its backup now
        self._files: OrderedDict = OrderedDict()  # (path, stamp) -> Lora
        self._cache_size = cache_size

    def _read(self, spec: LoraSpec) -> tuple[tuple, Lora]:
        path = spec.path
        if not path.is_file():
            raise FileNotFoundError(f"LoRA file not found: {path}")
        stat = path.stat()
        stamp = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        lora = self._files.get(stamp)
        if lora is None:
            lora = read_lora(path, self.config)
            self._files[stamp] = lora
            while len(self._files) > self._cache_size:
                self._files.popitem(last=False)
        self._files.move_to_end(stamp)
        return stamp, lora

    @torch.inference_mode()
    def apply(self, entries) -> bool:
        """Merge the LoRA set `entries` (see LoraSpec.of), replacing the one merged now; [] restores
        the base weights bit for bit. Returns False when that set is already merged.

        Every file is read and checked (keys, ranks, shapes against the weights) before any weight
        changes; on an error every weight keeps its value.
        """
        specs = [LoraSpec.of(e) for e in entries]
        read = [(spec, *self._read(spec)) for spec in specs]
        wanted = tuple((spec, stamp) for spec, stamp, _ in read)
        if wanted == self.active:
            return False
        views = self.weight_views()
        terms: dict = {}  # (component, key) -> [(up, down, scale)]
        for spec, _, lora in read:
            for layer in lora.layers:
                view = views.get(layer.component, {}).get(layer.key)
                if view is None:
                    raise ModelLoadError(f"{lora.path}: this backend holds no weight {layer.component}/{layer.key} "
                                         f"(for {layer.name!r})")
                if not same_up_to_unit_dims(layer.delta_shape, tuple(view.shape)) \
                        and layer.delta_shape != tuple(view.shape):
                    raise ModelLoadError(f"{lora.path}: {layer.name!r} gives a {list(layer.delta_shape)} update but "
                                         f"the weight {layer.component}/{layer.key} is {list(view.shape)}")
        device = next(iter(views["unet"].values())).device
        for spec, _, lora in read:  # the device copies of the factors (they allocate: before any change)
            for layer, (up, down) in zip(lora.layers, lora.factors(device)):
                terms.setdefault((layer.component, layer.key), []).append(
                    (up, down, spec.scale_for(layer.component) * layer.scale))
        try:
            for target in sorted(set(terms) | self._changed):
                view = views[target[0]][target[1]]
                if target not in self._backups:  # first change of this weight: keep its value
                    self._backups[target] = view.clone()
                if target in terms:
                    _merge(view, self._backups[target], terms[target], holds_base=target not in self._changed)
                    self._changed.add(target)
                else:
                    view.copy_(self._backups[target])
                    self._changed.discard(target)
        except BaseException:
            self._restore(views)  # never leave a half-applied set
            self.active, self.loras = (), []
            raise
        self.active = wanted
        self.loras = [(spec, lora) for spec, _, lora in read]
        return True

    def _restore(self, views) -> None:
        for component, key in self._changed:
            views[component][key].copy_(self._backups[(component, key)])
        self._changed.clear()


def _merge(view: torch.Tensor, base: torch.Tensor, terms: list, holds_base: bool) -> None:
    """view <- base + Σ scale · up @ down, accumulated in float32 and rounded once to view's dtype.

    holds_base: view's values are base's now (then a float32 weight is updated in place: one pass
    over it, the cost of a swap on the CPU)."""
    rows = view.shape[0]
    if view.dtype == torch.float32 and view.is_contiguous():
        flat = view.view(rows, -1)  # (out, in·kh·kw), the same storage
        (up, down, scale), rest = terms[0], terms[1:]
        if holds_base:
            flat.addmm_(up, down, alpha=scale)
        else:
            torch.addmm(base.reshape(rows, -1), up, down, alpha=scale, out=flat)
    else:
        flat, rest = base.reshape(rows, -1).float(), terms  # a new float32 tensor (or base itself: not changed below)
        flat = flat.clone() if flat.data_ptr() == base.data_ptr() else flat
    for up, down, scale in rest:
        flat.addmm_(up, down, alpha=scale)
    if flat.data_ptr() != view.data_ptr():
        view.copy_(flat.view(view.shape))  # copy_ keeps view's dtype and memory format (channels_last)


# ---------------------------------------------------------------------------
# A readers-writer lock: requests read the weights, a swap writes them
# ---------------------------------------------------------------------------

class ReadWriteLock:
    """Many readers or one writer; a waiting writer goes before new readers (a stream of requests
    cannot starve a swap). Not reentrant."""

    def __init__(self):
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def reading(self):
        with self._cond:
            self._cond.wait_for(lambda: not self._writer and not self._writers_waiting)
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextmanager
    def writing(self):
        with self._cond:
            self._writers_waiting += 1
            self._cond.wait_for(lambda: not self._writer and not self._readers)
            self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


# ---------------------------------------------------------------------------
# <lora:name:...> names in a folder
# ---------------------------------------------------------------------------

def available_loras(lora_dir) -> dict[str, Path]:
    """name (file stem) -> path of every LoRA file under lora_dir, searched recursively as A1111
    does; the first in sorted path order wins a name given twice."""
    found: dict[str, Path] = {}
    for path in sorted(Path(lora_dir).rglob("*")):
        if path.suffix in LORA_SUFFIXES and path.is_file():
            found.setdefault(path.stem, path)
    return found


def resolve_lora(name: str, lora_dir) -> Path:
    """The file of `<lora:name:...>` in lora_dir; ValueError listing the available names."""
    if lora_dir is None:
        raise ValueError(f"<lora:{name}:...> in the prompt needs a LoRA folder (lora_dir= / --lora-dir)")
    if not Path(lora_dir).is_dir():
        raise FileNotFoundError(f"LoRA folder not found: {lora_dir}")
    found = available_loras(lora_dir)
    if name not in found:
        listing = ", ".join(sorted(found)) or "none"
        raise ValueError(f"unknown LoRA {name!r} in the prompt; available in {lora_dir}: {listing}")
    return found[name]
