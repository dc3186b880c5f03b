"""Test helper: LoRA and textual-inversion files in the real layouts, with random low-rank weights.

The kohya names are made the way kohya-ss/sd-scripts' networks/lora.py makes them, from the
reference (diffusers / transformers) networks, not from sdengine's tables: every Linear or
Conv2d inside a module of a target class gets `prefix + "." + path + "." + child` with "_" for
".". Targets: Transformer2DModel in the UNet; with LoCon also ResnetBlock2D, Downsample2D and
Upsample2D (3x3 down, 1x1 up); CLIPAttention and CLIPMLP in the text encoders, named as on
transformers 4 (`text_model.` level), which is how the files in the wild name them. kohya's
SDXL trainer runs the LDM ("sgm") UNet, so SDXL files name the UNet in the LDM layout, taken
from tests/support/ldm_keys.py's independent walk.

PEFT files are made by peft and diffusers themselves (add_adapter, get_peft_model_state_dict,
save_lora_weights with adapter metadata).

    path = kohya_lora(tiny_pipeline("sd15"), tmp / "a.safetensors", rank=4, alpha=2.0, locon=True)
    path = peft_lora(tiny_pipeline("sd15"), tmp / "b", rank=4, alpha=8)
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from .ldm_keys import unet_ldm_names

UNET_TARGETS = ("Transformer2DModel",)
UNET_CONV_TARGETS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
TEXT_TARGETS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")


def kohya_modules(root, prefix: str, classes: tuple, path_prefix: str = "") -> dict:
    """{kohya name: (module path in root, module)} of every Linear / Conv2d under a module of `classes`."""
    out = {}
    for name, module in root.named_modules():
        if type(module).__name__ not in classes:
            continue
        for child_name, child in module.named_modules():
            if isinstance(child, (torch.nn.Linear, torch.nn.Conv2d)):
                path = f"{name}.{child_name}" if child_name else name
                out[(f"{prefix}.{path_prefix}{path}").replace(".", "_")] = (path, child)
    return out


def _factors(module, rank: int, generator, down_kernel=None):
    """Random (down, up) for a Linear or Conv2d, scaled so that the update is a few % of the weight."""
    w = module.weight
    out_dim, in_dim = w.shape[:2]
    kernel = tuple(w.shape[2:]) if down_kernel is None else down_kernel
    fan_in = in_dim * (int(torch.tensor(kernel).prod()) if kernel else 1)
    down = torch.randn(rank, in_dim, *kernel, generator=generator) / fan_in ** 0.5
    up = torch.randn(out_dim, rank, *([1, 1] if kernel else []), generator=generator) * 0.6 / rank ** 0.5
    return down, up


def kohya_state_dict(pipe, *, rank: int = 4, alpha: float | None = 2.0, locon: bool = True,
                     text: bool = True, ldm_unet: bool = False, skip=(), seed: int = 0,
                     dtype=torch.float32) -> dict:
    """A kohya / A1111 LoRA state dict for a diffusers pipeline (StableDiffusion or XL).

    ldm_unet: name the UNet in the LDM layout (as kohya's SDXL trainer; forced for SDXL).
    skip: substrings of kohya names or of the reference module paths to leave out.
    """
    generator = torch.Generator().manual_seed(seed)
    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    unet_classes = UNET_TARGETS + (UNET_CONV_TARGETS if locon else ())
    modules = kohya_modules(pipe.unet, "lora_unet", unet_classes)
    if ldm_unet or sdxl:
        ldm = unet_ldm_names(pipe.unet)
        modules = {("lora_unet_" + ldm[path + ".weight"].removesuffix(".weight")).replace(".", "_"): (path, m)
                   for path, m in modules.values()}
    if text:
        encoders = [("lora_te1", pipe.text_encoder), ("lora_te2", pipe.text_encoder_2)] if sdxl else \
            [("lora_te", pipe.text_encoder)]
        for prefix, encoder in encoders:
            root = getattr(encoder, "text_model", encoder)
            modules.update(kohya_modules(root, prefix, TEXT_TARGETS, path_prefix="text_model."))
    state = {}
    for name in sorted(modules, key=lambda n: (n.split("_")[1], modules[n][0])):  # draws in module order:
        path, module = modules[name]  # the same factors whichever names the file uses
        if any(s in name or s in path for s in skip):
            continue
        down, up = _factors(module, rank, generator)
        state[f"{name}.lora_down.weight"] = down.to(dtype)
        state[f"{name}.lora_up.weight"] = up.to(dtype)
        if alpha is not None:
            state[f"{name}.alpha"] = torch.tensor(float(alpha)).to(dtype)
    return state


def kohya_lora(pipe, path, **kwargs) -> Path:
    """Write kohya_state_dict(pipe, **kwargs) to path (.safetensors, or .pt through torch.save)."""
    path = Path(path)
    state = kohya_state_dict(pipe, **kwargs)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path), metadata={"ss_network_module": "networks.lora"})
    else:
        torch.save(state, path)
    return path


def peft_lora(pipe, folder, *, rank: int = 4, alpha: float = 8.0, seed: int = 1, text: bool = True,
              diffusers_format: bool = False) -> Path:
    """A diffusers / PEFT LoRA made by peft and diffusers: adapters on the attention projections of
    the UNet and the text encoder(s), random weights, saved with save_lora_weights (adapter
    metadata in the header). diffusers_format: convert the PEFT keys (lora_A / lora_B) to
    diffusers' own (lora.down / lora_linear_layer.down), as its training scripts do. Returns the
    .safetensors path."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    generator = torch.Generator().manual_seed(seed)
    folder = Path(folder)
    unet = copy.deepcopy(pipe.unet)
    unet_config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                             init_lora_weights=False)
    unet.add_adapter(unet_config)
    layers = {"unet_lora_layers": unet}
    metadata = {"unet_lora_adapter_metadata": unet_config.to_dict()}
    if text:
        text_config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"],
                                 init_lora_weights=False)
        encoders = {"text_encoder": pipe.text_encoder}
        if getattr(pipe, "text_encoder_2", None) is not None:
            encoders["text_encoder_2"] = pipe.text_encoder_2
        for name, encoder in encoders.items():
            encoder = inject_adapter_in_model(text_config, copy.deepcopy(encoder))  # transformers' add_adapter
            # wants a newer peft than diffusers does
            layers[f"{name}_lora_layers"] = encoder
            metadata[f"{name}_lora_adapter_metadata"] = text_config.to_dict()
    state_dicts = {}
    for key, model in layers.items():
        with torch.no_grad():
            for name, p in sorted(model.named_parameters()):
                if "lora_A" in name:
                    p.copy_(torch.randn(p.shape, generator=generator) / p.shape[1] ** 0.5)
                elif "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.6 / p.shape[1] ** 0.5)
        state = get_peft_model_state_dict(model)
        state_dicts[key] = convert_state_dict_to_diffusers(state) if diffusers_format else state
    for key in metadata:  # LoraConfig.to_dict holds sets, which JSON cannot
        metadata[key] = {k: (sorted(v) if isinstance(v, set) else v) for k, v in metadata[key].items()}
    type(pipe).save_lora_weights(folder, **state_dicts, **metadata, safe_serialization=True)
    return folder / "pytorch_lora_weights.safetensors"


def embedding_vectors(width: int, count: int, seed: int = 0) -> torch.Tensor:
    """Random token vectors (count, width) about as large as CLIP's token embeddings here."""
    return torch.randn(count, width, generator=torch.Generator().manual_seed(seed)) * 0.5
