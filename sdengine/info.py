"""`sdengine info PATH`: what a checkpoint is, as sdengine detects it, without loading it.

Reads only configs and file headers (safetensors) or the pickle's tensor metadata
(.ckpt), then prints the format, the detected architecture and each network's sizes.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path
from typing import Optional

from .config import ModelConfig
from .ldm_layout import family_name, prediction_type_from_metadata

_FAMILY = {"sd15": "SD1.x", "sd15-inpaint": "SD1.x inpainting", "sd21": "SD2.x (512, epsilon)",
           "sd21-v": "SD2.x (768, v-prediction)", "sd21-inpaint": "SD2.x inpainting", "sdxl": "SDXL base"}


def _millions(count: int) -> str:
    return f"{count / 1e6:.1f} M params"


def _parameter_counts(config: ModelConfig) -> dict[str, int]:
    from .loading import build_networks  # meta-device networks: sizes without memory

    return {name: sum(p.numel() for p in net.parameters()) for name, net in build_networks(config).items()}


def _file_summary(path: Path) -> tuple[str, list[str]]:
    """The format line, and notes about what the file does not record."""
    from .weights import component_weight_files, is_diffusers_folder, open_weights, single_file_reader

    if path.is_dir() and is_diffusers_folder(path):
        dtypes, files = Counter(), []
        for component in ("unet", "vae", "text_encoder", "text_encoder_2"):
            if (path / component).is_dir():
                weights = component_weight_files(path / component)
                files += weights
                dtypes.update(open_weights(weights).dtypes.values())
        size = sum(f.stat().st_size for f in files)
        kinds = ", ".join(f"{d} x{n}" for d, n in dtypes.most_common())
        return f"diffusers folder, {len(files)} weight files, {size / 1e9:.2f} GB ({kinds})", []
    reader, source = single_file_reader(path)
    dtypes = Counter(reader.dtypes.values())
    kinds = ", ".join(f"{d} x{n}" for d, n in dtypes.most_common())
    what = "single-file .safetensors" if source == "single-file" else "pickled checkpoint (torch.load weights_only)"
    line = f"{what}, LDM/A1111 keys, {len(reader.shapes)} tensors, {path.stat().st_size / 1e9:.2f} GB ({kinds})"
    notes = ["head counts, norm groups and sample size are not recorded in a single file: they follow the "
             "family preset (SD1: 8 heads; SD2/SDXL: 64-channel heads)"]
    declared = prediction_type_from_metadata(reader.metadata)
    if declared:
        notes.append(f"the safetensors header declares the prediction type: {declared} (modelspec)")
    elif "v_pred" in reader.shapes:
        notes.append("a 'v_pred' key marks the model as v-prediction")
    return line, notes


def describe(path, prediction_type: Optional[str] = None) -> str:
    """A human-readable report of what `path` holds, as `load_model` would load it."""
    from .loading import detect

    path = Path(path)
    config = detect(path, prediction_type=prediction_type)
    fmt, notes = _file_summary(path)
    counts = _parameter_counts(config)
    unet, vae = config.unet, config.vae
    family = family_name(config)
    marked = any("prediction" in note for note in notes)
    if family == "sd21-v" and not path.is_dir() and prediction_type is None and not marked:
        notes.append("SD2 single files record no prediction type: v-prediction is assumed (the 768-v model); "
                     "pass --prediction-type epsilon for a 512-base SD2 model")

    def text_line(text, label):
        layout = "OpenCLIP" if text.hidden_act == "gelu" else "OpenAI CLIP"
        proj = f", projection {text.projection_dim}" if text.projection_dim else ""
        return (f"{label:<17}{layout}, {text.num_hidden_layers} layers, width {text.hidden_size}, "
                f"{text.num_attention_heads} heads, MLP {text.intermediate_size}{proj}, output {text.output_layer} "
                f"layer; {_millions(counts[label.rstrip(': ').replace(' ', '_')])}")

    lines = [
        f"{'path:':<17}{path}",
        f"{'format:':<17}{fmt}",
        f"{'architecture:':<17}{family} ({_FAMILY[family]})"
        + (f", config {config.name!r}" if config.name != family else ""),
        f"{'prediction:':<17}{config.prediction_type}",
        f"{'native size:':<17}{config.default_size}x{config.default_size}",
        text_line(config.text_encoder, "text encoder:"),
    ]
    if config.text_encoder_2 is not None:
        lines.append(text_line(config.text_encoder_2, "text encoder 2:"))
    added = (f", added embedding {unet.addition_embed_type} ({unet.projection_class_embeddings_input_dim})"
             if unet.addition_embed_type else "")
    lines += [
        f"{'unet:':<17}{unet.in_channels} -> {unet.out_channels} channels, levels {list(unet.block_out_channels)}, "
        f"{unet.layers_per_block} layers per block, heads {list(unet.num_attention_heads)}, transformer depth "
        f"{list(unet.transformer_layers_per_block)}, context {unet.cross_attention_dim}, "
        f"{'linear' if unet.use_linear_projection else 'conv'} proj_in{added}; {_millions(counts['unet'])}",
        f"{'vae:':<17}levels {list(vae.block_out_channels)}, {vae.layers_per_block} layers per block, "
        f"{vae.latent_channels} latent channels, scaling {vae.scaling_factor}"
        + (f", shift {vae.shift_factor}" if vae.shift_factor is not None else "") + f"; {_millions(counts['vae'])}",
        f"{'scheduler:':<17}{config.scheduler.sampler}, {config.scheduler.beta_schedule} betas "
        f"{config.scheduler.beta_start}..{config.scheduler.beta_end}, {config.scheduler.timestep_spacing} spacing",
    ]
    lines += [f"{'note:':<17}{note}" for note in notes]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.json:
        from .loading import detect

        print(json.dumps(detect(args.path, prediction_type=args.prediction_type).to_dict(), indent=2))
    else:
        print(describe(args.path, prediction_type=args.prediction_type))
    return 0


def register(subparsers) -> None:
    """Add the `info` subcommand to the sdengine CLI."""
    parser = subparsers.add_parser(
        "info", help="show the detected architecture of a checkpoint",
        description="Print what a checkpoint holds as sdengine detects it (format, architecture, prediction "
                    "type, network sizes), reading only configs and file headers.")
    parser.add_argument("path", help="a diffusers folder, a .safetensors single file or a .ckpt/.pt file")
    parser.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), default=None,
                        help="override the detected prediction type (SD2 single files are taken as v-prediction)")
    parser.add_argument("--json", action="store_true", help="print the detected ModelConfig as JSON")
    parser.set_defaults(func=run)
