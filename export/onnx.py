"""ONNX export of the text encoder(s), the UNet and the VAE, validated against torch.

    sdengine.export.onnx("v1-5-pruned-emaonly.safetensors", "sd15-onnx", dtype="fp16")
    sdengine export onnx MODEL OUT_DIR [--dtype fp16|fp32] [--opset N] [--optimize]

This module is callable: `sdengine.export.onnx(...)` is `export_onnx(...)`.

An export is a folder that onnxruntime (or any ONNX runtime) can serve on its own:

    text_encoder.onnx     input_ids (batch, 77) int64 -> hidden_states (batch, 77, D),
                          pooled (batch, P), hidden_states_by_skip (S, batch, 77, D)
    text_encoder_2.onnx   the same, SDXL only
    unet.onnx             sample (batch, C, height, width), timestep (batch,) float32,
                          encoder_hidden_states (batch, 77, D) [, text_embeds (batch, P),
                          time_ids (batch, 6): SDXL] -> out_sample (batch, C_out, height, width)
    vae_decoder.onnx      latent_sample (batch, 4, height, width), *unscaled* (the pipeline
                          applies scaling_factor) -> sample (batch, 3, 8*height, 8*width)
    vae_encoder.onnx      sample (batch, 3, 8*height, 8*width) in [-1, 1] -> mean, logvar
                          (batch, 4, height, width), logvar clamped to [-30, 20]
    tokenizer/ ...        vocab.json, merges.txt, tokenizer_config.json
    sdengine_onnx.json    the manifest: format version, model config (architecture and
                          sampler), every input and output with its dtype and shape,
                          exporter and library versions, the validation figures

`hidden_states_by_skip[k]` is the conditioning that `clip_skip=k` selects (index 0 is
`hidden_states` itself), so one graph serves every clip_skip.

Batch, height and width are dynamic axes: one export serves 512x512 and 768x768.
Graphs whose weights pass 2 GB (the protobuf limit; SD's fp32 UNet is 3.4 GB) keep
their weights in `<name>.onnx.data` next to them (ONNX external data).

Exporter: `torch.onnx.export(dynamo=True)` (torch.export + onnxscript). If it fails
for a network, the legacy TorchScript exporter is tried, and the reason -- the dynamo
exporter's error -- is logged and recorded in the manifest.

Validation: each graph is checked with `onnx.checker` (by path, so that external data
is checked too), then run once on onnxruntime's CPU provider on random inputs of a
shape other than the one traced, and compared with the float32 torch network. The
error is max|ort - torch| / max|torch| over each output; the export fails with
`OnnxValidationError` when it exceeds the tolerance (TOLERANCES).

Nothing is half-written: the export goes to a temporary sibling folder that is renamed
into place only when every network has passed.
"""

from __future__ import annotations

import copy
import datetime
import json
import logging
import platform
import shutil
import sys
import tempfile
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from sdengine import cachedir
from sdengine.device import DTYPES

from .graphs import TextEncoderGraph, UNetGraph, VAEDecoderGraph, VAEEncoderGraph

log = logging.getLogger("sdengine")

FORMAT = "sdengine-onnx"
FORMAT_VERSION = 2  # 2: the config as ModelConfig.to_dict writes it (the scheduler's extra keys inline)
MANIFEST_NAME = "sdengine_onnx.json"
DEFAULT_OPSET = 18  # the dynamo exporter's native opset; GroupNormalization-free, widely supported
# Relative tolerance of the export-time check, max|ort - torch| / max|torch|, against the
# float32 torch network. fp16 graphs carry fp16 rounding through ~100 layers.
TOLERANCES = {"fp32": 1e-4, "fp16": 3e-2}
EXTERNAL_DATA_BYTES = 2 * 1000**3 - 64 * 1024**2  # protobuf's 2 GiB cap, with room for the graph
EXPORT_DTYPES = ("fp32", "fp16")  # sdengine.device.DTYPES names


class OnnxValidationError(ValueError):
    """An exported graph is invalid (onnx.checker) or disagrees with torch beyond tolerance."""


@dataclass
class _Network:
    """One graph to export: its module, example inputs, dynamic axes and validation inputs."""

    name: str
    module: nn.Module  # an export/graphs.py wrapper around the float32 network
    input_names: list
    output_names: list
    example: tuple  # traced inputs (batch 2)
    dynamic_shapes: tuple  # torch.export dims, one dict per input
    dynamic_axes: dict  # the same axes, legacy-exporter style: {input name: {axis: name}}
    check: tuple  # validation inputs: another batch and size than `example`
    float_inputs: set = field(default_factory=set)  # inputs cast to the export dtype
    output_axes: dict = field(default_factory=dict)  # {output: {axis: name}} written into the graph

    @property
    def file(self) -> str:
        return f"{self.name}.onnx"


def _networks(loaded, generator: torch.Generator) -> list[_Network]:
    """The graphs of a model, with example inputs that avoid special sizes.

    Traced at batch 2 and a non-square latent (2m x 3m, m = the UNet's total downsampling),
    validated at batch 1 and 3m x 2m: a graph that hard-coded a traced size fails validation.
    """
    Dim = torch.export.Dim
    cfg = loaded.config
    levels = len(cfg.unet.block_out_channels)
    multiple = 2 ** (levels - 1)
    batch = Dim("batch")
    # The UNet's downsampled sizes must stay above 1 (torch.export guards on size 1).
    height = Dim("height", min=multiple + 1)
    width = Dim("width", min=multiple + 1)
    vae_height, vae_width = Dim("height", min=2), Dim("width", min=2)
    scale = cfg.vae.downscale
    tokens = cfg.text_encoder.max_position_embeddings
    latent_c = cfg.vae.latent_channels

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    def ids(b):
        return torch.randint(0, cfg.text_encoder.vocab_size, (b, tokens), generator=generator)

    def latent_axes(name):
        return {name: {0: "batch", 2: "height", 3: "width"}}

    nets = []
    for name, encoder in (("text_encoder", loaded.text_encoder), ("text_encoder_2", loaded.text_encoder_2)):
        if encoder is None:
            continue
        nets.append(_Network(
            name, TextEncoderGraph(encoder, outputs="by_skip"), ["input_ids"],
            ["hidden_states", "pooled", "hidden_states_by_skip"],
            example=(ids(2),), dynamic_shapes=({0: batch},), dynamic_axes={"input_ids": {0: "batch"}},
            check=(ids(1),),
        ))

    unet_inputs = ["sample", "timestep", "encoder_hidden_states"]
    context_dim = cfg.unet.cross_attention_dim

    def unet_args(b, h, w):
        args = [randn(b, cfg.unet.in_channels, h, w), torch.rand(b, generator=generator) * 999,
                randn(b, tokens, context_dim)]
        if cfg.unet.addition_embed_type == "text_time":
            pooled_dim = cfg.unet.projection_class_embeddings_input_dim - 6 * cfg.unet.addition_time_embed_dim
            args += [randn(b, pooled_dim), torch.tensor([[h * scale, w * scale, 0, 0, h * scale, w * scale]],
                                                        dtype=torch.float32).repeat(b, 1)]
        return tuple(args)

    unet_dynamic = [{0: batch, 2: height, 3: width}, {0: batch}, {0: batch}]
    unet_axes = {**latent_axes("sample"), "timestep": {0: "batch"}, "encoder_hidden_states": {0: "batch"}}
    float_inputs = {"sample", "encoder_hidden_states"}
    if cfg.unet.addition_embed_type == "text_time":
        unet_inputs += ["text_embeds", "time_ids"]
        unet_dynamic += [{0: batch}, {0: batch}]
        unet_axes.update(text_embeds={0: "batch"}, time_ids={0: "batch"})
        float_inputs.add("text_embeds")
    nets.append(_Network(
        "unet", UNetGraph(loaded.unet), unet_inputs, ["out_sample"],
        example=unet_args(2, 2 * multiple, 3 * multiple), dynamic_shapes=tuple(unet_dynamic),
        dynamic_axes=unet_axes, check=unet_args(1, 3 * multiple, 2 * multiple), float_inputs=float_inputs,
        output_axes={"out_sample": {0: "batch", 2: "height", 3: "width"}},
    ))
    nets.append(_Network(
        "vae_decoder", VAEDecoderGraph(loaded.vae), ["latent_sample"], ["sample"],
        example=(randn(2, latent_c, 2, 3),), dynamic_shapes=({0: batch, 2: vae_height, 3: vae_width},),
        dynamic_axes=latent_axes("latent_sample"), check=(randn(1, latent_c, 3, 2),),
        float_inputs={"latent_sample"},
        output_axes={"sample": {0: "batch", 2: f"{scale}*height", 3: f"{scale}*width"}},
    ))
    nets.append(_Network(
        "vae_encoder", VAEEncoderGraph(loaded.vae, stacked=False), ["sample"], ["mean", "logvar"],
        example=(randn(2, 3, 2 * scale, 3 * scale).clamp(-1, 1),),
        dynamic_shapes=({0: batch, 2: scale * vae_height, 3: scale * vae_width},),
        dynamic_axes={"sample": {0: "batch", 2: "image_height", 3: "image_width"}},
        check=(randn(1, 3, 3 * scale, 2 * scale).clamp(-1, 1),), float_inputs={"sample"},
        output_axes={"mean": {0: "batch", 2: "height", 3: "width"}, "logvar": {0: "batch", 2: "height", 3: "width"}},
    ))
    return nets


# ---------------------------------------------------------------------------
# Export of one graph
# ---------------------------------------------------------------------------

def _param_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def _cast_inputs(net: _Network, args: tuple, dtype: torch.dtype) -> tuple:
    return tuple(a.to(dtype) if name in net.float_inputs else a for name, a in zip(net.input_names, args))


def _export_dynamo(net: _Network, module: nn.Module, args: tuple, path: Path, opset: int, external: bool):
    program = torch.onnx.export(
        module, args, dynamo=True, dynamic_shapes=net.dynamic_shapes, input_names=net.input_names,
        output_names=net.output_names, opset_version=opset, verbose=False, optimize=True,
    )
    program.save(str(path), external_data=external)


def _export_legacy(net: _Network, module: nn.Module, args: tuple, path: Path, opset: int, external: bool):
    import onnx

    # The legacy exporter decides on external data by itself (one file per tensor): export
    # into a scratch folder, then store the graph as the manifest says.
    with tempfile.TemporaryDirectory(prefix=".legacy-", dir=path.parent) as scratch:
        scratch_path = Path(scratch) / path.name
        with torch.no_grad():
            torch.onnx.export(
                module, args, str(scratch_path), dynamo=False, input_names=net.input_names,
                output_names=net.output_names, dynamic_axes=net.dynamic_axes, opset_version=opset,
                do_constant_folding=True,
            )
        _save_onnx(onnx.load(str(scratch_path)), path, external)


def _save_onnx(model, path: Path, external: bool) -> None:
    import onnx

    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(model, str(path))


def _export_network(net: _Network, module: nn.Module, args: tuple, path: Path, opset: int) -> dict:
    """Export one graph to `path`; returns the manifest fields of how it was exported."""
    external = _param_bytes(module) > EXTERNAL_DATA_BYTES
    info = {"exporter": "dynamo", "fallback_reason": None}
    try:
        with torch.no_grad():
            _export_dynamo(net, module, args, path, opset, external)
    except Exception as e:  # noqa: BLE001 (any exporter failure falls back, with the reason kept)
        reason = f"torch.onnx.export(dynamo=True) failed: {type(e).__name__}: {str(e).strip().splitlines()[0][:500]}"
        log.warning("ONNX export of %s: %s; falling back to the legacy TorchScript exporter", net.name, reason)
        for stale in (path, path.with_name(path.name + ".data")):
            stale.unlink(missing_ok=True)
        try:
            _export_legacy(net, module, args, path, opset, external)
        except Exception as legacy_error:  # noqa: BLE001
            first_line = str(legacy_error).strip().splitlines()[0][:500] if str(legacy_error).strip() else ""
            raise RuntimeError(f"ONNX export of {net.name} failed with both exporters. {reason}. Legacy "
                               f"exporter: {type(legacy_error).__name__}: {first_line}") from legacy_error
        info = {"exporter": "legacy", "fallback_reason": reason}
    info["external_data"] = [path.name + ".data"] if external else []
    return info


def _name_output_axes(path: Path, output_axes: dict) -> None:
    """Give the graph outputs' dynamic axes their names (the exporter may write "s89" for
    a size it derived); the weights, internal or external, are left where they are."""
    import onnx

    if not output_axes:
        return
    model = onnx.load(str(path), load_external_data=False)
    for value in model.graph.output:
        for axis, name in output_axes.get(value.name, {}).items():
            dim = value.type.tensor_type.shape.dim[axis]
            if dim.dim_param or not dim.dim_value:
                dim.dim_param = name
    onnx.save_model(model, str(path))


def _io_specs(path: Path) -> tuple[list, list]:
    """Names, dtypes and shapes (ints or axis names) of a graph's inputs and outputs, read back from the file."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def spec(value):
        tensor_type = value.type.tensor_type
        shape = [d.dim_param if d.dim_param else d.dim_value for d in tensor_type.shape.dim]
        return {"name": value.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type).name,
                "shape": shape}

    return [spec(v) for v in model.graph.input], [spec(v) for v in model.graph.output]


# ---------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------

def relative_error(actual, expected) -> float:
    """max|actual - expected| / max|expected|: the export's agreement figure (inf for non-finite output)."""
    actual = torch.as_tensor(actual).double()
    expected = torch.as_tensor(expected).double()
    if actual.shape != expected.shape:
        raise OnnxValidationError(f"output shape {tuple(actual.shape)} differs from torch's {tuple(expected.shape)}")
    if not torch.isfinite(actual).all():
        return float("inf")
    scale = expected.abs().max().item()
    return (actual - expected).abs().max().item() / max(scale, 1e-12)


def check_graph(path: Path) -> None:
    """onnx.checker on the file (path-based, so external data and >2 GB graphs are checked)."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=False)
    except onnx.checker.ValidationError as e:
        raise OnnxValidationError(f"{path.name} fails onnx.checker: {e}") from None


def _ort_session(path: Path, optimized: bool = True):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not optimized:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def validate_graph(path: Path, net: _Network, args: tuple, expected: tuple, dtype: torch.dtype,
                   tolerance: float) -> dict:
    """Run the graph once on ORT's CPU provider and compare with torch's float32 outputs."""
    session = _ort_session(path)
    feeds = {name: a.numpy() for name, a in zip(net.input_names, _cast_inputs(net, args, dtype))}
    outputs = session.run(net.output_names, feeds)
    errors = {name: relative_error(torch.from_numpy(out).float(), ref)
              for name, out, ref in zip(net.output_names, outputs, expected)}
    error = max(errors.values())
    figures = {
        "provider": "CPUExecutionProvider",
        "metric": "max|ort - torch_fp32| / max|torch_fp32|",
        "error": error,
        "errors": errors,
        "tolerance": tolerance,
        "input_shapes": {name: list(a.shape) for name, a in zip(net.input_names, args)},
    }
    if not error <= tolerance:
        raise OnnxValidationError(
            f"{path.name}: onnxruntime output differs from torch by {error:.3g} (relative; per output "
            f"{ {k: float(f'{v:.3g}') for k, v in errors.items()} }), above the tolerance {tolerance:g}")
    log.info("ONNX export of %s: onnxruntime vs torch relative error %.2e (tolerance %g)", net.name, error, tolerance)
    return figures


# ---------------------------------------------------------------------------
# ORT transformer optimizer (--optimize)
# ---------------------------------------------------------------------------

_OPTIMIZER_MODEL_TYPES = {"text_encoder": "clip", "text_encoder_2": "clip", "unet": "unet",
                          "vae_decoder": "vae", "vae_encoder": "vae"}


def optimize_graph(path: Path, net_name: str, external: bool) -> dict:
    """Apply onnxruntime's transformer optimizer with its Stable Diffusion model types.

    The fusions kept are those the CPU provider runs too (attention, LayerNorm, GELU,
    bias-add and the like). Fusions into CUDA-only contrib ops (GroupNorm, BiasSplitGelu,
    NhwcConv, packed QKV) are turned off, so the optimized graph runs wherever the
    exported one does. Returns the fused-op counts for the manifest.
    """
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    model_type = _OPTIMIZER_MODEL_TYPES[net_name]
    options = FusionOptions(model_type)
    for flag in ("enable_group_norm", "enable_skip_group_norm", "enable_bias_splitgelu", "enable_nhwc_conv",
                 "enable_packed_qkv", "enable_packed_kv", "enable_bias_add"):
        if hasattr(options, flag):
            setattr(options, flag, False)
    optimized = optimize_model(str(path), model_type=model_type, num_heads=0, hidden_size=0, opt_level=0,
                               optimization_options=options, use_gpu=False)
    counts = {op: n for op, n in optimized.get_fused_operator_statistics().items() if n}
    for stale in (path, path.with_name(path.name + ".data")):
        stale.unlink(missing_ok=True)
    optimized.save_model_to_file(str(path), use_external_data_format=external, all_tensors_to_one_file=True)
    if external and not path.with_name(path.name + ".data").exists():
        # onnxruntime names the data file after the graph; keep the name the manifest promises.
        _save_onnx(optimized.model, path, external)
    return counts


# ---------------------------------------------------------------------------
# Tokenizers and configs
# ---------------------------------------------------------------------------

def save_tokenizer(tokenizer, folder: Path) -> None:
    """Write a sdengine CLIPTokenizer as a Hugging Face tokenizer folder (vocab.json, merges.txt,
    tokenizer_config.json) that `CLIPTokenizer.from_folder` reads back identically."""
    tokenizer.save(folder)


def _versions() -> dict:
    import onnx

    versions = {"python": platform.python_version(), "torch": torch.__version__, "onnx": onnx.__version__}
    for name in ("onnxruntime", "onnxscript"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    try:
        import sdengine

        versions["sdengine"] = sdengine.__version__
    except (ImportError, AttributeError):
        versions["sdengine"] = None
    return versions


# ---------------------------------------------------------------------------
# The whole export
# ---------------------------------------------------------------------------

def _prepare_out_dir(out_dir: Path, overwrite: bool) -> Path:
    """Check the target and make the temporary sibling the export is written into."""
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"ONNX export target {out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"ONNX export target {out_dir} already exists and is not empty; "
                              f"pass overwrite=True (--overwrite) to replace it")
    parent = out_dir.parent
    try:
        return cachedir.staging(out_dir)  # renamed into place by _move_into_place once complete
    except OSError as e:
        raise PermissionError(f"cannot write the ONNX export to {out_dir}: {e.strerror or e} "
                              f"(in {e.filename or parent})") from None


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename the finished export to out_dir, replacing an old one only after the new one is complete."""
    cachedir.publish(tmp, out_dir, replace=True)


def _load(model):
    """A LoadedModel in float32 on the CPU, from a path or a LoadedModel (copied if need be)."""
    from dataclasses import replace

    from sdengine.loading import LoadedModel, load_model

    if isinstance(model, LoadedModel):
        first = next(model.unet.parameters())
        if first.dtype != torch.float32 or first.device.type != "cpu":
            def cpu32(network):
                return None if network is None else copy.deepcopy(network).to("cpu", torch.float32)

            model = replace(model, text_encoder=cpu32(model.text_encoder), text_encoder_2=cpu32(model.text_encoder_2),
                            unet=cpu32(model.unet), vae=cpu32(model.vae))
        return model, None
    path = Path(model)
    if not path.exists():
        raise FileNotFoundError(f"model path does not exist: {path}")
    return load_model(path, device="cpu", dtype=torch.float32), path


def export_onnx(model, out_dir, *, dtype: str = "fp32", opset: Optional[int] = None, optimize: bool = False,
                overwrite: bool = False, tolerance: Optional[float] = None, progress: bool = True) -> Path:
    """Export a model's networks to ONNX in `out_dir`, validate them, write the manifest.

    model:     a path (diffusers folder, single-file .safetensors, .ckpt) or a
               sdengine.loading.LoadedModel (its networks are not modified).
    out_dir:   the export folder; written to a temporary sibling, then renamed into place.
    dtype:     "fp32" or "fp16": the dtype of the weights and float inputs and outputs
               (timestep is always float32, input_ids int64).
    opset:     ONNX opset (default DEFAULT_OPSET).
    optimize:  apply onnxruntime's transformer optimizer (SD fusions that the CPU provider
               runs too, see optimize_graph) and validate the optimized graphs again.
    overwrite: replace an existing non-empty out_dir (only once the new export is complete).
    tolerance: the validation tolerance (default TOLERANCES[dtype]).
    progress:  show a tqdm bar over the networks.

    Returns out_dir. Raises FileNotFoundError (no model), FileExistsError (out_dir exists),
    PermissionError (out_dir cannot be written, naming the path), ValueError (bad
    argument) and OnnxValidationError (a graph failed onnx.checker or disagrees with torch).
    """
    from tqdm.auto import tqdm

    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(EXPORT_DTYPES)}, got {dtype!r}")
    opset = DEFAULT_OPSET if opset is None else int(opset)
    if not 14 <= opset <= 23:
        raise ValueError(f"opset must be between 14 and 23, got {opset}")
    tolerance = TOLERANCES[dtype] if tolerance is None else float(tolerance)
    torch_dtype = DTYPES[dtype]
    out_dir = Path(out_dir)
    # Check the target before the (slow) load, and create the temporary folder.
    tmp = _prepare_out_dir(out_dir, overwrite)
    try:
        loaded, source = _load(model)
        if loaded.config.text_encoder is None:
            raise ValueError(f"{model}: SDXL's refiner (no first text encoder, an aesthetic score) is not exported to "
                             "ONNX; run it with backend='eager', 'graph', 'triton' or 'compile'")
        generator = torch.Generator().manual_seed(0)
        nets = _networks(loaded, generator)
        records = {}
        bar = tqdm(nets, desc="ONNX export", unit="network", disable=not progress)
        for net in bar:
            bar.set_postfix_str(net.name)
            records[net.name] = _export_one(net, tmp, torch_dtype, opset, optimize, tolerance)
        tokenizers = {"tokenizer": loaded.tokenizer, "tokenizer_2": loaded.tokenizer_2}
        for name, tokenizer in tokenizers.items():
            if tokenizer is not None:
                save_tokenizer(tokenizer, tmp / name)

        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "name": loaded.config.name,
            "source": str(source) if source is not None else None,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "dtype": dtype,
            "opset": opset,
            "optimized": bool(optimize),
            "config": loaded.config.to_dict(),
            "tokenizers": {name: name for name, t in tokenizers.items() if t is not None},
            "networks": records,
            "versions": _versions(),
        }
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("ONNX export of %s written to %s", loaded.config.name, out_dir)
    return out_dir


def _export_one(net: _Network, folder: Path, dtype: torch.dtype, opset: int, optimize: bool,
                tolerance: float) -> dict:
    """Export, check and validate one network; returns its manifest record."""
    net.module.eval()
    with torch.no_grad():
        expected = net.module(*net.check)  # float32 torch reference
    expected = expected if isinstance(expected, tuple) else (expected,)
    expected = tuple(t.float() for t in expected)
    module = net.module if dtype == torch.float32 else copy.deepcopy(net.module).to(dtype)
    path = folder / net.file
    record = {"file": net.file}
    record.update(_export_network(net, module, _cast_inputs(net, net.example, dtype), path, opset))
    _name_output_axes(path, net.output_axes)
    check_graph(path)
    record["validation"] = validate_graph(path, net, net.check, expected, dtype, tolerance)
    if optimize:
        record["optimizer"] = {"fused_ops": optimize_graph(path, net.name, bool(record["external_data"]))}
        _name_output_axes(path, net.output_axes)
        check_graph(path)
        record["validation"] = validate_graph(path, net, net.check, expected, dtype, tolerance)
    record["inputs"], record["outputs"] = _io_specs(path)
    del module
    return record


# ---------------------------------------------------------------------------
# Reading an export back
# ---------------------------------------------------------------------------

def read_manifest(onnx_dir) -> dict:
    """The manifest of an export folder, checked: format, version, and every file it names.

    Raises FileNotFoundError naming the missing folder or file, and ValueError for a
    manifest that is not JSON, of another format, or from a newer format version.
    """
    onnx_dir = Path(onnx_dir)
    if not onnx_dir.is_dir():
        raise FileNotFoundError(f"ONNX export folder not found: {onnx_dir}")
    path = onnx_dir / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"not an sdengine ONNX export: {path} is missing")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ValueError(f"{path}: not an sdengine ONNX manifest (format {found!r}, expected {FORMAT!r})")
    version = manifest.get("format_version")
    if not isinstance(version, int):
        raise ValueError(f"{path}: format_version is missing or not an integer")
    if version > FORMAT_VERSION:
        raise ValueError(f"{path} has format_version {version}, newer than this sdengine reads "
                         f"({FORMAT_VERSION}): upgrade sdengine or export the model again with this version")
    for key in ("config", "networks", "dtype"):
        if key not in manifest:
            raise ValueError(f"{path}: key {key!r} is missing")
    for name in ("text_encoder", "unet", "vae_decoder", "vae_encoder"):
        if name not in manifest["networks"]:
            raise ValueError(f"{path}: network {name!r} is missing from 'networks'")
    for name, record in manifest["networks"].items():
        for file in [record["file"], *record.get("external_data", [])]:
            if not (onnx_dir / file).is_file():
                raise FileNotFoundError(f"ONNX export {onnx_dir} is incomplete: {file} (network {name}) is missing")
    for folder in manifest.get("tokenizers", {}).values():
        for file in ("vocab.json", "merges.txt"):
            if not (onnx_dir / folder / file).is_file():
                raise FileNotFoundError(f"ONNX export {onnx_dir} is incomplete: {folder}/{file} is missing")
    return manifest


class _CallableModule(types.ModuleType):
    """Makes `sdengine.export.onnx(...)` call export_onnx while staying the module."""

    def __call__(self, *args, **kwargs):
        return export_onnx(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
