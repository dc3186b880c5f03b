"""Textual inversion (Gal et al. 2022, "An Image is Worth One Word: Personalizing Text-to-Image
Generation using Textual Inversion"): new words whose token embeddings were learned.

    pipe.load_embedding("my-style.pt")                   # token: the file name, "my-style"
    pipe("a castle in my-style", ...)

A new word gets one id per learned vector, after the vocabulary (49408, 49409, ...): the
tokenizer maps the word to those ids, and the text encoder looks them up in its added-token
table (`CLIPTextEmbeddings.reserve_added_tokens`: ADDED_TOKENS rows made when the backend is
built, written in place, so text-encoder graphs captured before stay valid). The result is
that of diffusers' `load_textual_inversion`, which grows the token table by those rows.

File formats (detected from the keys):
- A1111 `.pt` / `.bin`: {"string_to_param": {"*": (n, D)}, "name": ..., ...}, read only through
  torch.load(weights_only=True);
- A1111 `.safetensors`: {"emb_params": (n, D)};
- diffusers `learned_embeds`: {token: (D,) or (n, D)} (.safetensors or .bin);
- SDXL: {"clip_l": (n, 768), "clip_g": (n, 1280)}, one set of vectors per text encoder.
The default token is the key of a diffusers file and the file's stem otherwise (A1111 names
embeddings after their files).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .config import ModelConfig
from .errors import ModelLoadError, weights_file

EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".bin", ".ckpt")
MAX_VECTORS = 75  # one prompt chunk
ADDED_TOKENS = 256  # textual-inversion vectors a text encoder can take in all (A1111 users load many)


@dataclass
class Embedding:
    """A textual-inversion embedding fitted to one model: its token and the vectors of each text encoder."""

    path: Path
    token: str
    vectors: dict  # component ("text_encoder", "text_encoder_2") -> (n, D) float tensor

    @property
    def num_vectors(self) -> int:
        return next(iter(self.vectors.values())).shape[0]


def _read_tensors(path: Path) -> dict:
    """The file's top-level entries: tensors, or (A1111 .pt) nested dicts of them."""
    from .weights import SafetensorsReader

    if path.suffix == ".safetensors":
        reader = SafetensorsReader([path])
        return {key: reader.get(key) for key in reader.shapes}
    import pickle
    import zipfile

    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ModelLoadError(f"{path}: refused by torch.load(weights_only=True); it holds objects other than "
                             f"tensors, and sdengine does not run pickled code: {str(e).splitlines()[0]}") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        raise ModelLoadError(f"{path}: not a readable torch file (truncated or corrupt?): {e}") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a dict, found {type(data).__name__}")
    return data


def _vectors_of(path: Path, data: dict) -> tuple[dict, Optional[str]]:
    """({"clip_l"/"clip_g"/"": (n, D)}, the token a diffusers file names) of an embedding file's entries."""
    def as_matrix(tensor, key):
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point() or tensor.ndim not in (1, 2):
            raise ModelLoadError(f"{path}: {key!r} is not a vector or an (n, width) matrix of floats")
        return tensor.detach().reshape(-1, tensor.shape[-1])

    if "clip_l" in data or "clip_g" in data:
        missing = [k for k in ("clip_l", "clip_g") if k not in data]
        if missing:
            raise ModelLoadError(f"{path}: an SDXL embedding needs both clip_l and clip_g; {missing[0]!r} is missing")
        return {name: as_matrix(data[name], name) for name in ("clip_l", "clip_g")}, None
    if "string_to_param" in data:
        params = data["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise ModelLoadError(f"{path}: 'string_to_param' must hold one tensor (A1111 embeddings hold {{'*': ...}})")
        key, tensor = next(iter(params.items()))
        return {"": as_matrix(tensor, f"string_to_param.{key}")}, None
    if "emb_params" in data:
        return {"": as_matrix(data["emb_params"], "emb_params")}, None
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if len(tensors) == 1 and len(data) == 1:  # diffusers' learned_embeds: {token: vector}
        token, tensor = next(iter(tensors.items()))
        return {"": as_matrix(tensor, token)}, token
    keys = sorted(str(k) for k in data)
    raise ModelLoadError(f"{path}: not a textual-inversion embedding sdengine reads (A1111 string_to_param / "
                         f"emb_params, diffusers {{token: vector}}, SDXL clip_l + clip_g); keys: {keys[:6]}")


def read_embedding(path, config: ModelConfig, token: Optional[str] = None) -> Embedding:
    """Read an embedding file and fit it to the text encoder(s) of `config`.

    Raises FileNotFoundError, or ModelLoadError naming the file and key for an unknown format, a
    vector width that does not fit a text encoder (e.g. an SD1 embedding on SD2 or SDXL), or a
    truncated or corrupt file; ValueError for an empty token.
    """
    path = weights_file(path, "embedding", EMBEDDING_SUFFIXES)
    found, named = _vectors_of(path, _read_tensors(path))
    token = token if token is not None else named if named is not None else path.stem
    if not isinstance(token, str) or not token.strip() or token != token.strip():
        raise ValueError(f"embedding token must be a non-empty string without surrounding spaces, got {token!r}")

    encoders = {"text_encoder": config.text_encoder}
    if config.text_encoder_2 is not None:
        encoders["text_encoder_2"] = config.text_encoder_2
    if config.text_encoder_2 is not None:
        if "" in found:
            width = found[""].shape[1]
            raise ModelLoadError(f"{path}: an embedding of one text encoder (width {width}) on an SDXL model, which "
                                 "needs clip_l and clip_g vectors")
        by_component = {"text_encoder": ("clip_l", found["clip_l"]), "text_encoder_2": ("clip_g", found["clip_g"])}
    else:
        if "" not in found:
            raise ModelLoadError(f"{path}: an SDXL embedding (clip_l + clip_g) on a model with one text encoder")
        by_component = {"text_encoder": ("vectors", found[""])}
    vectors = {}
    for component, (key, tensor) in by_component.items():
        width = encoders[component].hidden_size
        if tensor.shape[1] != width:
            raise ModelLoadError(f"{path}: {key} has width {tensor.shape[1]} but the {component} of {config.name} "
                                 f"embeds tokens in {width} dimensions (an embedding for another model?)")
        vectors[component] = tensor.float()
    counts = {t.shape[0] for t in vectors.values()}
    if len(counts) != 1 or not 1 <= next(iter(counts)) <= MAX_VECTORS:
        raise ModelLoadError(f"{path}: an embedding has 1 to {MAX_VECTORS} vectors, the same number per text "
                             f"encoder; found {sorted(t.shape[0] for t in vectors.values())}")
    return Embedding(path=path, token=token, vectors=vectors)


def token_names(token: str, count: int) -> list[str]:
    """The tokenizer entries of an embedding's vectors: token, token_1, ... (diffusers' naming)."""
    return [token] + [f"{token}_{i}" for i in range(1, count)]


def reserve_added_tokens(text_encoders: dict) -> None:
    """Give each text encoder (component -> CLIPTextModel or None) its added-token table of
    ADDED_TOKENS rows (zeros), once: a fixed tensor that embeddings are written into in place,
    so graphs captured and functions compiled before a load_embedding stay valid."""
    for module in text_encoders.values():
        embeddings = module.text_model.embeddings if module is not None else None
        if embeddings is not None and "added_tokens" not in embeddings._buffers:
            embeddings.reserve_added_tokens(ADDED_TOKENS)


@torch.no_grad()
def write_added_tokens(text_encoders: dict, vectors: dict) -> dict:
    """Write `vectors[component]` (n, D) into the next free rows of each text encoder's
    added-token table; returns component -> their ids (vocab_size + row). Checked for room in
    every table before any row is written; ValueError when a table is full."""
    plans = {}
    for component, rows in vectors.items():
        embeddings = text_encoders[component].text_model.embeddings
        table = embeddings._buffers.get("added_tokens")
        used = getattr(embeddings, "added_tokens_used", 0)
        if table is None or used + rows.shape[0] > table.shape[0]:
            room = 0 if table is None else table.shape[0] - used
            raise ValueError(f"the {component} has room for {room} more textual-inversion vectors, this embedding "
                             f"has {rows.shape[0]}")
        plans[component] = (embeddings, table, used)
    ids = {}
    for component, (embeddings, table, used) in plans.items():
        rows = vectors[component]
        table[used:used + rows.shape[0]].copy_(rows.to(table.device, table.dtype))
        embeddings.added_tokens_used = used + rows.shape[0]
        vocab = embeddings.token_embedding.weight.shape[0]
        ids[component] = list(range(vocab + used, vocab + used + rows.shape[0]))
    return ids
