"""The openvino backend: our networks converted by OpenVINO and run by its CPU plugin.

    pipe = sdengine.load("sd15.safetensors", backend="openvino")        # bf16 where the CPU has it
    pipe = sdengine.load("sd15.safetensors", backend="openvino", dtype="fp32")

OpenVINO is the inference engine Intel's users already trust on CPUs (its static-shape SD
pipelines are the fastest published CPU figures: ANCHORS.md). This backend keeps everything
else of sdengine (pipeline, samplers, prompt syntax, API, server) and hands it the networks:

- each network (text encoder(s), UNet, VAE decoder) is converted from our torch module by
  `openvino.convert_model` (traced in float32) into an IR with dynamic batch and size, saved
  under `$SDE_CACHE_DIR/openvino/<weights fingerprint>/` and read from there next time;
- per workload it is reshaped to static shapes (the batch, the latent size) and compiled for the
  CPU with the precision of the backend's dtype (INFERENCE_PRECISION_HINT: bf16, f32 or f16),
  at INFERENCE_NUM_THREADS = torch's thread count, with OpenVINO's own blob cache
  (CACHE_DIR) beside the IR: a second process compiles from the cache;
- ControlNets and the VAE encoder (img2img) run in torch (the eager backend's code);
- a LoRA (set_loras, <lora:> tags) is merged into the torch weights as on every backend; the
  networks are then converted and compiled again (`weights_changed`): seconds on a small
  model, minutes at SD1.5 size (README, "On a CPU": measured cost). An IR is keyed by a
  fingerprint of the weights, so going back to a set of weights seen before reads its IR.

It is an optional extra: `pip install 'sdengine[openvino]'`.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from .eager import EagerBackend, run_text_encoders

log = logging.getLogger("sdengine")

INSTALL = "pip install 'sdengine[openvino]' (or: pip install openvino)"
PRECISION = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}


def import_openvino():
    try:
        import openvino
    except ImportError as e:
        raise RuntimeError(f"the openvino backend needs OpenVINO ({e}): {INSTALL}") from None
    return openvino


def weights_fingerprint(modules: dict) -> str:
    """A short hash of the networks' weights: every tensor's name, shape and dtype, and a sample
    of its values (its first and last 64 values and 64 spread between: a LoRA, a fine-tune or
    another seed changes them all), so that a converted IR is never used for other weights."""
    digest = hashlib.sha256()
    for component, module in sorted(modules.items()):
        if module is None:
            continue
        for name, tensor in sorted(module.state_dict().items()):
            flat = tensor.detach().reshape(-1)
            picks = torch.cat([flat[:64], flat[-64:], flat[:: max(1, flat.numel() // 64)][:64]])
            digest.update(f"{component}.{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
            digest.update(picks.float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


class _UNetCall(nn.Module):
    """The UNet with plain tensor inputs, as the converter traces it."""

    def __init__(self, unet, sdxl: bool):
        super().__init__()
        self.unet, self.sdxl = unet, sdxl

    def forward(self, x, t, context, text_embeds=None, time_ids=None):
        cond = {"text_embeds": text_embeds, "time_ids": time_ids} if self.sdxl else None
        return self.unet(x, t, context, added_cond=cond)


class _TextCall(nn.Module):
    def __init__(self, text_encoder, text_encoder_2, clip_skip):
        super().__init__()
        self.text_encoder, self.text_encoder_2, self.clip_skip = text_encoder, text_encoder_2, clip_skip

    def forward(self, input_ids, input_ids_2=None):
        context, pooled = run_text_encoders(self.text_encoder, self.text_encoder_2, input_ids, input_ids_2,
                                            self.clip_skip)
        return context, pooled


class _DecodeCall(nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, z):
        return self.vae.decode(z)


class OpenVINOBackend(EagerBackend):
    """The eager backend whose text encoder, UNet and VAE decoder calls run OpenVINO compiled models.

    precision: INFERENCE_PRECISION_HINT ("bf16", "f32", "f16"); default: that of the dtype.
    threads:   INFERENCE_NUM_THREADS; default: torch's thread count.
    """

    name = "openvino"

    def __init__(self, config, text_encoder, unet, vae, text_encoder_2=None, *, precision: Optional[str] = None,
                 threads: Optional[int] = None):
        super().__init__(config, text_encoder, unet, vae, text_encoder_2)
        ov = import_openvino()
        if self.device.type != "cpu":
            raise ValueError(f"the openvino backend runs on the CPU, got device {self.device}")
        self.precision = precision or PRECISION[self.dtype]
        self.threads = threads
        self.core = ov.Core()
        self._ov = ov
        self._compiled: dict = {}  # (network, static shapes) -> openvino.CompiledModel
        self._fingerprint: Optional[str] = None
        self.costs: dict = {}  # network -> seconds spent converting / reading and compiling (the last time)

    # What the pipeline calls ---------------------------------------------------------------

    def _text(self, input_ids, input_ids_2, clip_skip):
        inputs = [input_ids] + ([input_ids_2] if input_ids_2 is not None else [])
        context, pooled = self._run(f"text_encoder(clip_skip={clip_skip})", inputs,
                                    lambda: _TextCall(self.text_encoder, self.text_encoder_2, clip_skip))
        return context, pooled

    def _unet(self, x, t, context, added_cond, controls=()):
        if controls:  # ControlNets run in torch, with the torch UNet
            return super()._unet(x, t, context, added_cond, controls)
        t = t.reshape(-1).expand(x.shape[0]).float()  # (B,)
        inputs = [x, t, context]
        if added_cond is not None:
            inputs += [added_cond["text_embeds"], added_cond["time_ids"]]
        (out,) = self._run("unet", inputs, lambda: _UNetCall(self.unet, added_cond is not None))
        return out

    def _decode(self, z):
        (images,) = self._run("vae_decode", [z], lambda: _DecodeCall(self.vae))
        return images

    def weights_changed(self) -> None:
        """A LoRA was merged or removed: convert and compile again at the next call (an IR of
        these weights made before is read from the cache instead)."""
        self._compiled.clear()
        self._fingerprint = None

    def release_memory(self) -> None:
        self._compiled.clear()

    # Conversion and compilation ---------------------------------------------------------------

    def cache_dir(self) -> Path:
        from ..compile_cache import cache_root

        if self._fingerprint is None:
            self._fingerprint = weights_fingerprint({"text_encoder": self.text_encoder, "unet": self.unet,
                                                     "vae": self.vae, "text_encoder_2": self.text_encoder_2})
        return cache_root() / "openvino" / self._fingerprint

    def _run(self, network: str, inputs: list, module_fn) -> list:
        arrays = [np.ascontiguousarray(_numpy(t)) for t in inputs]
        key = (network, tuple(a.shape for a in arrays))
        compiled = self._compiled.get(key)
        if compiled is None:
            compiled = self._compiled[key] = self._compile(network, arrays, module_fn)
        outputs = compiled(arrays)
        return [torch.from_numpy(np.asarray(outputs[out])).to(self.dtype) for out in compiled.outputs]

    def _compile(self, network: str, arrays: list, module_fn):
        """The IR of `network` (read, or converted and saved), reshaped to the arrays' shapes and
        compiled for the CPU."""
        started = time.perf_counter()
        folder = self.cache_dir()
        # one IR per network and shapes: the traced graph holds its shapes as constants
        shapes = "_".join("x".join(map(str, a.shape)) for a in arrays)
        path = folder / f"{network}-{shapes}-{self.precision}.xml"
        if path.is_file():
            model = self.core.read_model(path)
        else:
            model = self._convert(network, arrays, module_fn, path)
        config = {"INFERENCE_PRECISION_HINT": self.precision, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1",
                  "INFERENCE_NUM_THREADS": str(self.threads or torch.get_num_threads()),
                  "CACHE_DIR": str(folder / "blobs")}
        compiled = self.core.compile_model(model, "CPU", config)
        self.costs[network] = round(time.perf_counter() - started, 3)
        log.info("openvino: %s ready for %s in %.1f s", network, [a.shape for a in arrays], self.costs[network])
        return compiled

    def _convert(self, network: str, arrays: list, module_fn, path: Path):
        """convert_model on a float32 copy of the network, traced at these shapes; saved (weights in
        fp16 unless the precision is f32: bf16 compute loses nothing more) beside its final name
        and renamed into place."""
        ov = self._ov
        module = copy.deepcopy(module_fn()).float().eval()
        examples = tuple(torch.from_numpy(a).float() if a.dtype.kind == "f" else torch.from_numpy(a) for a in arrays)
        with torch.inference_mode(False), torch.no_grad():
            model = ov.convert_model(module, example_input=examples)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{network}.", dir=path.parent))
        try:
            ov.save_model(model, tmp / path.name, compress_to_fp16=self.precision != "f32")
            for file in tmp.iterdir():
                os.replace(file, path.parent / file.name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return self.core.read_model(path)


def _numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    if t.is_floating_point():
        t = t.float()
    return t.contiguous().numpy()
