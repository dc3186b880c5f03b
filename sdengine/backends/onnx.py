"""The onnxruntime backend: an ONNX export (sdengine.export.onnx) run by ORT sessions.

    pipe = sdengine.load("sd15-onnx")                 # a folder with sdengine_onnx.json
    pipe = sdengine.load("sd15.safetensors", backend="onnx")   # exported once, then cached

`OnnxBackend.load_model` reads (or makes) the export, `from_loaded` opens its sessions.

The pipeline and samplers are the same as with every other backend; only the four
network calls go through onnxruntime. Providers:
  - CUDAExecutionProvider when onnxruntime has it and torch sees a CUDA device: inputs
    and outputs are bound to torch CUDA tensors (IO binding), so latents never leave
    the device between steps;
  - CPUExecutionProvider otherwise, through numpy.
The provider in use is logged on the "sdengine" logger.
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import operator
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..config import ModelConfig
from ..device import DTYPES, dtype_name
from ..tokenizer import CLIPTokenizer
from .base import BaseBackend

log = logging.getLogger("sdengine")

NETWORKS = ("text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder")
# The manifest names its tensors' element types as numpy does (export/onnx.py `_io_specs`).
_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64}


# ---------------------------------------------------------------------------
# Symbolic output shapes (for binding outputs before the run)
# ---------------------------------------------------------------------------

_BINARY_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv}


def eval_dim(dim, symbols: dict) -> Optional[int]:
    """An ONNX dimension (int, or a name / expression such as "8*height") given the axis
    sizes in `symbols`; None when it cannot be computed. Only + - * // are evaluated."""
    if isinstance(dim, int):
        return dim
    try:
        tree = ast.parse(str(dim), mode="eval").body
    except SyntaxError:
        return None

    def value(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name):
            return symbols[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY_OPS:
            return _BINARY_OPS[type(node.op)](value(node.left), value(node.right))
        raise KeyError(ast.dump(node))

    try:
        return int(value(tree))
    except (KeyError, ZeroDivisionError):
        return None


def bind_dims(spec_shape: list, shape: tuple, symbols: dict) -> None:
    """Record the sizes of the plainly named axes of one input (e.g. batch, height)."""
    for dim, size in zip(spec_shape, shape):
        if isinstance(dim, str) and dim.isidentifier():
            symbols.setdefault(dim, int(size))


# ---------------------------------------------------------------------------
# One graph
# ---------------------------------------------------------------------------

class OnnxGraph:
    """An ORT session over one exported graph, called with and returning torch tensors."""

    def __init__(self, path: Path, record: dict, providers: list, options, device: torch.device):
        import onnxruntime as ort

        self.name = record["file"]
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.inputs = {spec["name"]: spec for spec in record["inputs"]}
        self.outputs = {spec["name"]: spec for spec in record["outputs"]}
        self.device = device
        self.provider = self.session.get_providers()[0]
        self.bound = device.type == "cuda" and self.provider == "CUDAExecutionProvider"

    def __call__(self, outputs: Optional[list] = None, **feeds: torch.Tensor) -> list:
        """Run with the named inputs; returns the requested outputs (default all) as torch tensors."""
        if set(feeds) != set(self.inputs):
            raise ValueError(f"{self.name} takes inputs {sorted(self.inputs)}, got {sorted(feeds)}")
        outputs = list(self.outputs) if outputs is None else outputs
        feeds = {name: tensor.to(self.device, _TORCH_DTYPES[self.inputs[name]["dtype"]]).contiguous()
                 for name, tensor in feeds.items()}
        if self.bound:
            return self._run_bound(feeds, outputs)
        results = self.session.run(outputs, {name: t.cpu().numpy() for name, t in feeds.items()})
        return [torch.from_numpy(r).to(self.device) for r in results]

    def _run_bound(self, feeds: dict, outputs: list) -> list:
        """IO binding: ORT reads the torch inputs and writes torch outputs in device memory."""
        binding = self.session.io_binding()
        device_id = self.device.index if self.device.index is not None else torch.cuda.current_device()
        symbols = {}
        for name, tensor in feeds.items():
            spec = self.inputs[name]
            bind_dims(spec["shape"], tensor.shape, symbols)
            binding.bind_input(name, "cuda", device_id, np.dtype(spec["dtype"]).type, list(tensor.shape),
                               tensor.data_ptr())
        results = []
        for name in outputs:
            spec = self.outputs[name]
            shape = [eval_dim(d, symbols) for d in spec["shape"]]
            if None in shape:  # a size the manifest cannot tell: ORT allocates it on the device
                binding.bind_output(name, "cuda", device_id)
                results.append(None)
                continue
            out = torch.empty(shape, dtype=_TORCH_DTYPES[spec["dtype"]], device=self.device)
            binding.bind_output(name, "cuda", device_id, np.dtype(spec["dtype"]).type, shape, out.data_ptr())
            results.append(out)
        torch.cuda.current_stream(self.device).synchronize()  # the inputs are written
        self.session.run_with_iobinding(binding)
        if None in results:
            values = binding.get_outputs()
            results = [r if r is not None else torch.from_numpy(values[i].numpy()).to(self.device)
                       for i, r in enumerate(results)]
        return results


# ---------------------------------------------------------------------------
# The backend
# ---------------------------------------------------------------------------

def _providers(device: Optional[torch.device]) -> tuple[list, torch.device]:
    """ORT providers for a requested device, and the torch device tensors live on."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    has_cuda_ep = "CUDAExecutionProvider" in available
    if device is None:
        device = torch.device("cuda" if has_cuda_ep and torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda":
        if not has_cuda_ep:
            log.warning("onnx backend: device %s was requested but onnxruntime %s has no CUDAExecutionProvider "
                        "(providers: %s); running on the CPU", device, ort.__version__, ", ".join(available))
            return ["CPUExecutionProvider"], torch.device("cpu")
        index = device.index if device.index is not None else torch.cuda.current_device()
        return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"], torch.device("cuda", index)
    if device.type != "cpu":
        raise ValueError(f"the onnx backend runs on 'cpu' or 'cuda', not {device}")
    return ["CPUExecutionProvider"], device


@dataclass
class OnnxExport:
    """An export folder, read (OnnxBackend.load_model): what the onnx backend is built from."""

    folder: Path
    manifest: dict
    config: ModelConfig
    tokenizer: CLIPTokenizer
    tokenizer_2: Optional[CLIPTokenizer]
    device: Optional[torch.device]  # where the graphs should run (None: CUDA when both ORT and torch have it)

    @property
    def name(self) -> Optional[str]:
        return self.manifest.get("name")

    @classmethod
    def read(cls, onnx_dir, device=None) -> "OnnxExport":
        """Raises FileNotFoundError naming a missing folder or file and ValueError for a bad or
        newer-format manifest (see sdengine.export.onnx.read_manifest)."""
        from sdengine.export.onnx import read_manifest

        onnx_dir = Path(onnx_dir)
        manifest = read_manifest(onnx_dir)
        if manifest["dtype"] not in ("fp32", "fp16"):
            raise ValueError(f"{onnx_dir}: unsupported export dtype {manifest['dtype']!r}")
        tokenizers = manifest.get("tokenizers", {})
        tokenizer = (CLIPTokenizer.from_folder(onnx_dir / tokenizers["tokenizer"])
                     if "tokenizer" in tokenizers else CLIPTokenizer.default())
        tokenizer_2 = (CLIPTokenizer.from_folder(onnx_dir / tokenizers["tokenizer_2"])
                       if "tokenizer_2" in tokenizers else None)
        return cls(onnx_dir, manifest, ModelConfig.from_dict(manifest["config"]), tokenizer, tokenizer_2, device)


class OnnxBackend(BaseBackend):
    """Holds the ORT sessions of one export; implements the backend interface
    (sdengine/backends/base.py): encode_text, denoise, encode_image, decode.

    Attributes: config (ModelConfig from the manifest), device, dtype (the export's),
    provider (the ORT provider running the graphs), manifest.
    """

    name = "onnx"
    cpu_bf16 = False  # float32 or float16 exports: fp32 is its CPU default (sdengine.load)
    max_prompt_windows = 1  # the exported UNet takes 77-token contexts

    def __init__(self, onnx_dir, manifest: dict, graphs: dict, device: torch.device):
        self.onnx_dir = Path(onnx_dir)
        self.manifest = manifest
        self.config = ModelConfig.from_dict(manifest["config"])
        self.graphs = graphs
        self.device = device
        self.dtype = DTYPES[manifest["dtype"]]
        self.provider = graphs["unet"].provider

    @classmethod
    def load_model(cls, path, *, device, dtype, config=None, prediction_type=None) -> OnnxExport:
        """`path` is an export folder, or a checkpoint that is exported on first use into the cache
        (cache_dir) with `dtype` (float32 or float16; the export folder's own dtype otherwise)."""
        from sdengine.export.onnx import MANIFEST_NAME, export_onnx

        path = Path(path)
        if (path / MANIFEST_NAME).is_file():
            onnx_dir = path
        else:
            dtype = torch.float32 if dtype is None else dtype
            if dtype not in (torch.float32, torch.float16):
                raise ValueError(f"the onnx backend runs float32 or float16 exports, not {dtype}")
            onnx_dir = cache_dir(path, dtype_name(dtype))
            if not (onnx_dir / MANIFEST_NAME).is_file():
                log.info("onnx backend: exporting %s to %s (once; later loads reuse it)", path, onnx_dir)
                export_onnx(path, onnx_dir, dtype=dtype_name(dtype), overwrite=True)
        export = OnnxExport.read(onnx_dir, device)
        if dtype is not None and dtype != DTYPES[export.manifest["dtype"]]:
            log.info("onnx backend: %s holds a %s export: it runs in %s, not the requested %s", onnx_dir,
                     export.manifest["dtype"], DTYPES[export.manifest["dtype"]], dtype)
        return export

    @classmethod
    def from_loaded(cls, loaded, *, threads: Optional[int] = None) -> "OnnxBackend":
        """ORT sessions over an export (OnnxExport). threads: ORT intra-op threads (default: ORT's
        choice)."""
        import onnxruntime as ort

        if not isinstance(loaded, OnnxExport):
            raise ValueError(f"backend {cls.name!r} cannot be built from torch modules: it runs an ONNX export "
                             "(sdengine.load(export folder or checkpoint, backend='onnx'))")
        providers, device = _providers(loaded.device)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = int(threads)
        graphs = {name: OnnxGraph(loaded.folder / record["file"], record, providers, options, device)
                  for name, record in loaded.manifest["networks"].items() if name in NETWORKS}
        backend = cls(loaded.folder, loaded.manifest, graphs, device)
        log.info("onnx backend: %s from %s on %s (%s, onnxruntime %s)", loaded.name, loaded.folder,
                 backend.provider, loaded.manifest["dtype"], ort.__version__)
        return backend

    @classmethod
    def from_dir(cls, onnx_dir, device=None, threads: Optional[int] = None) -> "OnnxBackend":
        """Open an export folder. device: "cuda" / "cpu" / None (CUDA when both onnxruntime
        and torch have it). threads: ORT intra-op threads (default: ORT's choice).

        Raises FileNotFoundError naming a missing folder or file and ValueError for a bad
        or newer-format manifest (see sdengine.export.onnx.read_manifest).
        """
        return cls.from_loaded(OnnxExport.read(onnx_dir, device), threads=threads)

    # Weights: the graphs hold them as initializers that onnxruntime has already optimised
    # (folded, fused, laid out for its kernels), so sdengine does not change them in place.

    def weight_views(self) -> dict:
        raise ValueError("the onnx backend cannot merge LoRAs: its weights are initializers inside the ORT "
                         "sessions; use the eager, triton or native backend, or export a model with the LoRA "
                         "merged")

    def add_token_embeddings(self, vectors: dict) -> dict:
        raise ValueError("the onnx backend cannot load textual-inversion embeddings: the exported text encoder "
                         "holds the vocabulary's token table; use the eager, triton or native backend")

    # The backend interface ------------------------------------------------------

    def encode_text(self, input_ids, input_ids_2=None, clip_skip=None):
        """Token ids (B, 77) -> (context (B, 77, D), pooled (B, P)); SDXL concatenates both encoders."""
        context, pooled = self._encode_one("text_encoder", input_ids, clip_skip)
        if "text_encoder_2" in self.graphs:
            if input_ids_2 is None:
                raise ValueError("this model has two text encoders: input_ids_2 is required")
            context_2, pooled = self._encode_one("text_encoder_2", input_ids_2, clip_skip)
            context = torch.cat([context, context_2], dim=-1)  # (B, 77, D1 + D2)
        return context, pooled

    def _encode_one(self, name: str, input_ids, clip_skip):
        graph = self.graphs[name]
        if not clip_skip:
            hidden, pooled = graph(["hidden_states", "pooled"], input_ids=input_ids)
            return hidden, pooled
        by_skip, pooled = graph(["hidden_states_by_skip", "pooled"], input_ids=input_ids)  # (S, B, L, D)
        if not 0 <= int(clip_skip) < by_skip.shape[0]:
            raise ValueError(f"clip_skip={clip_skip} is out of range for {name}: 0 to {by_skip.shape[0] - 1}")
        return by_skip[int(clip_skip)], pooled

    def controlnet_fn(self, control):
        """ControlNets are not run by the onnx backend's exported graphs yet: a ValueError before any work."""
        raise ValueError("the onnx backend does not run ControlNets yet; use the eager, graph, triton or "
                         "compile backend for control=")

    def denoise(self, x_in, t, context, added_cond=None):
        """One UNet forward; returns float32."""
        batch = x_in.shape[0]
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1)
        timestep = t.expand(batch) if t.numel() == 1 else t  # (B,)
        feeds = dict(sample=x_in, timestep=timestep, encoder_hidden_states=context)
        if "text_embeds" in self.graphs["unet"].inputs:
            if added_cond is None:
                raise ValueError("this UNet needs added_cond {'text_embeds', 'time_ids'} (SDXL)")
            feeds.update(text_embeds=added_cond["text_embeds"], time_ids=added_cond["time_ids"])
        (out,) = self.graphs["unet"](**feeds)
        return out.float()

    def encode_image(self, images):
        """Images (B, 3, H, W) in [-1, 1] -> (mean, logvar), float32."""
        mean, logvar = self.graphs["vae_encoder"](sample=images)
        return mean.float(), logvar.float()

    def decode(self, latents):
        """Unscaled latents -> images (B, 3, H, W) in about [-1, 1], float32."""
        (images,) = self.graphs["vae_decoder"](latent_sample=latents)
        images = images.float()
        if self.dtype != torch.float32 and not torch.isfinite(images).all():
            log.warning("onnx backend: the %s VAE decoder gave non-finite values (fp16 overflow); export "
                        "with dtype fp32 to avoid it", self.manifest["dtype"])
        return images


# ---------------------------------------------------------------------------
# sdengine.load(checkpoint, backend="onnx"): the export cache
# ---------------------------------------------------------------------------

def cache_dir(path: Path, dtype: str) -> Path:
    """Where an on-demand export of a checkpoint lives: `$SDE_CACHE_DIR/onnx/<name>-<key>`,
    keyed by the checkpoint's path, size and modification times, the dtype and the versions."""
    from sdengine.export.onnx import FORMAT_VERSION

    path = path.resolve()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    stamp = [(str(p.relative_to(path)) if path.is_dir() else p.name, p.stat().st_size, p.stat().st_mtime_ns)
             for p in files]
    ident = json.dumps({"path": str(path), "files": stamp, "dtype": dtype, "format": FORMAT_VERSION,
                        "torch": torch.__version__}, sort_keys=True)
    key = hashlib.sha256(ident.encode()).hexdigest()[:16]
    base = os.environ.get("SDE_CACHE_DIR")
    return (Path(base) if base else Path.home() / ".cache" / "sdengine") / "onnx" / f"{path.stem}-{dtype}-{key}"
