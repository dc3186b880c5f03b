"""Test helper: write a diffusers pipeline out as an original LDM / A1111 single file.

This is the test-side key map, written independently of sdengine/ldm_layout.py: it walks
the diffusers module tree (blocks, resnets, attentions, samplers) and numbers the LDM
modules the way ldm's openaimodel.py / model.py build them, instead of rewriting key
strings. So a test that loads its output with sdengine checks ldm_layout.py against an
independent account of the layout, not against itself.

    state = ldm_state_dict(tiny_pipeline("sd15"))       # {"model.diffusion_model...": tensor}
    save_ldm_single_file("sd21-v", "model.safetensors")  # or "model.ckpt"

Layouts: SD1 (cond_stage_model.transformer.text_model.*, transformers' CLIP), SD2
(cond_stage_model.model.*, OpenCLIP with fused in_proj, one extra final resblock that SD2
does not use, text_projection, logit_scale), SDXL (conditioner.embedders.0 / 1).
"""

from __future__ import annotations

from pathlib import Path

import torch

# ldm ResBlock (openaimodel.py): in_layers = [GroupNorm, SiLU, conv], emb_layers = [SiLU, Linear],
# out_layers = [GroupNorm, SiLU, Dropout, conv], skip_connection.
UNET_RESNET_PARTS = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                     "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
# ldm ResnetBlock (model.py): norm1, conv1, norm2, conv2, nin_shortcut.
VAE_RESNET_PARTS = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
                    "conv_shortcut": "nin_shortcut"}


def _put(out: dict, prefix: str, module, parts: dict | None = None, copy: bool = True) -> None:
    """Copy module's tensors under prefix (copy=False: the tensors themselves); parts renames its
    direct children."""
    if parts is None:
        for name, tensor in module.state_dict().items():
            out[prefix + name] = tensor.detach().clone().contiguous() if copy else tensor
        return
    for child, ldm_name in parts.items():
        sub = getattr(module, child, None)
        if sub is not None:
            _put(out, f"{prefix}{ldm_name}.", sub, copy=copy)


def unet_to_ldm(unet, copy: bool = True) -> dict:
    """openaimodel.UNetModel names for a diffusers UNet2DConditionModel (copy=False: its own tensors)."""
    out = {}
    _put(out, "time_embed.0.", unet.time_embedding.linear_1, copy=copy)
    _put(out, "time_embed.2.", unet.time_embedding.linear_2, copy=copy)
    if getattr(unet, "add_embedding", None) is not None:  # SDXL: label_emb.0 = Sequential(Linear, SiLU, Linear)
        _put(out, "label_emb.0.0.", unet.add_embedding.linear_1, copy=copy)
        _put(out, "label_emb.0.2.", unet.add_embedding.linear_2, copy=copy)
    _put(out, "input_blocks.0.0.", unet.conv_in, copy=copy)
    block = 1  # input_blocks is one flat list: conv_in, then (resnet[, attention]) ..., downsample, ...
    for down in unet.down_blocks:
        attentions = getattr(down, "attentions", None)
        for j, resnet in enumerate(down.resnets):
            _put(out, f"input_blocks.{block}.0.", resnet, UNET_RESNET_PARTS, copy=copy)
            if attentions is not None:
                _put(out, f"input_blocks.{block}.1.", attentions[j], copy=copy)
            block += 1
        if down.downsamplers is not None:
            _put(out, f"input_blocks.{block}.0.op.", down.downsamplers[0].conv, copy=copy)
            block += 1
    _put(out, "middle_block.0.", unet.mid_block.resnets[0], UNET_RESNET_PARTS, copy=copy)
    _put(out, "middle_block.1.", unet.mid_block.attentions[0], copy=copy)
    _put(out, "middle_block.2.", unet.mid_block.resnets[1], UNET_RESNET_PARTS, copy=copy)
    block = 0
    for up in getattr(unet, "up_blocks", None) or []:  # a ControlNet's encoder has no decoder
        attentions = getattr(up, "attentions", None)
        for j, resnet in enumerate(up.resnets):
            _put(out, f"output_blocks.{block}.0.", resnet, UNET_RESNET_PARTS, copy=copy)
            if attentions is not None:
                _put(out, f"output_blocks.{block}.1.", attentions[j], copy=copy)
            block += 1
        if up.upsamplers is not None:  # appended to the level's last output block
            slot = 2 if attentions is not None else 1
            _put(out, f"output_blocks.{block - 1}.{slot}.conv.", up.upsamplers[0].conv, copy=copy)
    if getattr(unet, "conv_out", None) is not None:
        _put(out, "out.0.", unet.conv_norm_out, copy=copy)
        _put(out, "out.2.", unet.conv_out, copy=copy)
    return out


def controlnet_to_ldm(controlnet, prefix: str = "control_model.") -> dict:
    """lllyasviel's cldm.py ControlNet names for a diffusers ControlNetModel: the UNet encoder's
    names (time_embed, label_emb, input_blocks, middle_block), input_hint_block = Sequential(conv,
    SiLU, conv, SiLU, ..., zero conv) (convolutions at the even indices), zero_convs.N = Sequential(conv),
    middle_block_out = Sequential(conv)."""
    out = unet_to_ldm(controlnet)
    embedding = controlnet.controlnet_cond_embedding
    convs = [embedding.conv_in, *embedding.blocks, embedding.conv_out]
    for i, conv in enumerate(convs):
        _put(out, f"input_hint_block.{2 * i}.", conv)
    for i, conv in enumerate(controlnet.controlnet_down_blocks):
        _put(out, f"zero_convs.{i}.0.", conv)
    _put(out, "middle_block_out.0.", controlnet.controlnet_mid_block)
    return {prefix + k: v for k, v in out.items()}


def unet_ldm_names(unet) -> dict:
    """diffusers UNet parameter name -> its LDM name, from the walk of unet_to_ldm (matched by storage)."""
    by_storage = {t.data_ptr(): name for name, t in unet.state_dict().items()}
    return {by_storage[t.data_ptr()]: ldm for ldm, t in unet_to_ldm(unet, copy=False).items()}


def _vae_attention(out: dict, prefix: str, attention) -> None:
    """ldm AttnBlock: norm, q, k, v, proj_out, all 1x1 convolutions (C, C, 1, 1)."""
    _put(out, prefix + "norm.", attention.group_norm)
    for diffusers_name, ldm_name in (("to_q", "q"), ("to_k", "k"), ("to_v", "v")):
        linear = getattr(attention, diffusers_name)
        out[f"{prefix}{ldm_name}.weight"] = linear.weight.detach().clone()[:, :, None, None]
        out[f"{prefix}{ldm_name}.bias"] = linear.bias.detach().clone()
    out[prefix + "proj_out.weight"] = attention.to_out[0].weight.detach().clone()[:, :, None, None]
    out[prefix + "proj_out.bias"] = attention.to_out[0].bias.detach().clone()


def vae_to_ldm(vae) -> dict:
    """ldm AutoencoderKL names for a diffusers AutoencoderKL."""
    out = {}
    for side in ("encoder", "decoder"):
        coder = getattr(vae, side)
        _put(out, f"{side}.conv_in.", coder.conv_in)
        _put(out, f"{side}.norm_out.", coder.conv_norm_out)
        _put(out, f"{side}.conv_out.", coder.conv_out)
        _put(out, f"{side}.mid.block_1.", coder.mid_block.resnets[0], VAE_RESNET_PARTS)
        _vae_attention(out, f"{side}.mid.attn_1.", coder.mid_block.attentions[0])
        _put(out, f"{side}.mid.block_2.", coder.mid_block.resnets[1], VAE_RESNET_PARTS)
    for level, down in enumerate(vae.encoder.down_blocks):
        for j, resnet in enumerate(down.resnets):
            _put(out, f"encoder.down.{level}.block.{j}.", resnet, VAE_RESNET_PARTS)
        if down.downsamplers is not None:
            _put(out, f"encoder.down.{level}.downsample.conv.", down.downsamplers[0].conv)
    # The ldm decoder builds self.up from the lowest resolution: up[0] runs last.
    levels = len(vae.decoder.up_blocks)
    for i, up in enumerate(vae.decoder.up_blocks):
        level = levels - 1 - i
        for j, resnet in enumerate(up.resnets):
            _put(out, f"decoder.up.{level}.block.{j}.", resnet, VAE_RESNET_PARTS)
        if up.upsamplers is not None:
            _put(out, f"decoder.up.{level}.upsample.conv.", up.upsamplers[0].conv)
    _put(out, "quant_conv.", vae.quant_conv)
    _put(out, "post_quant_conv.", vae.post_quant_conv)
    return out


def _text_model(text_encoder):
    """transformers' CLIPTextTransformer inside a CLIPTextModel[WithProjection], in either of
    its transformers 4 / 5 shapes."""
    return getattr(text_encoder, "text_model", text_encoder)


def clip_to_ldm(text_encoder) -> dict:
    """transformers' CLIP layout, as SD1 / SDXL checkpoints hold it (text_model.*), plus the
    position_ids buffer that real SD1 files carry."""
    model = _text_model(text_encoder)
    out = {}
    for part in ("embeddings", "encoder", "final_layer_norm"):
        _put(out, f"text_model.{part}.", getattr(model, part))
    positions = model.embeddings.position_embedding.weight.shape[0]
    out["text_model.embeddings.position_ids"] = torch.arange(positions)[None]
    return out


def openclip_to_ldm(text_encoder, extra_layer: bool, generator: torch.Generator) -> dict:
    """open_clip's text tower: token_embedding, positional_embedding, transformer.resblocks.N
    (ln_1, attn.in_proj_*, attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj), ln_final,
    text_projection (width, proj), logit_scale.

    extra_layer: append one random resblock (SD2 files hold all 24 layers of ViT-H; the
    diffusers SD2 text encoder is the first 23).
    """
    model = _text_model(text_encoder)
    out = {"token_embedding.weight": model.embeddings.token_embedding.weight.detach().clone(),
           "positional_embedding": model.embeddings.position_embedding.weight.detach().clone()}
    layers = list(model.encoder.layers)
    for i, layer in enumerate(layers):
        attn, prefix = layer.self_attn, f"transformer.resblocks.{i}."
        # nn.MultiheadAttention's packed projection: rows q, then k, then v.
        for param in ("weight", "bias"):
            packed = [getattr(proj, param) for proj in (attn.q_proj, attn.k_proj, attn.v_proj)]
            out[f"{prefix}attn.in_proj_{param}"] = torch.cat(packed).detach().clone()
        _put(out, prefix + "attn.out_proj.", attn.out_proj)
        _put(out, prefix + "ln_1.", layer.layer_norm1)
        _put(out, prefix + "ln_2.", layer.layer_norm2)
        _put(out, prefix + "mlp.c_fc.", layer.mlp.fc1)
        _put(out, prefix + "mlp.c_proj.", layer.mlp.fc2)
    if extra_layer:
        template = {k: v for k, v in out.items() if k.startswith("transformer.resblocks.0.")}
        for key, tensor in template.items():
            extra_key = key.replace("resblocks.0.", f"resblocks.{len(layers)}.")
            out[extra_key] = torch.randn(tensor.shape, generator=generator)
    _put(out, "ln_final.", model.final_layer_norm)
    width = out["token_embedding.weight"].shape[1]
    projection = getattr(text_encoder, "text_projection", None)
    if projection is not None:
        out["text_projection"] = projection.weight.detach().t().contiguous().clone()
    else:
        out["text_projection"] = torch.randn(width, width, generator=generator)
    out["logit_scale"] = torch.tensor(4.6052)
    return out


def _prefixed(prefix: str, state: dict) -> dict:
    return {prefix + k: v for k, v in state.items()}


def ldm_state_dict(pipe, text_layout: str) -> dict:
    """The whole pipeline in the LDM layout.

    text_layout: "sd1" (CLIP-L), "sd2" (OpenCLIP) or "sdxl" (both, conditioner.embedders.*).
    Also writes the DDPM schedule buffers and EMA counters that real checkpoints carry.
    """
    generator = torch.Generator().manual_seed(1234)
    state = _prefixed("model.diffusion_model.", unet_to_ldm(pipe.unet))
    state |= _prefixed("first_stage_model.", vae_to_ldm(pipe.vae))
    if text_layout == "sd1":
        state |= _prefixed("cond_stage_model.transformer.", clip_to_ldm(pipe.text_encoder))
    elif text_layout == "sd2":
        state |= _prefixed("cond_stage_model.model.", openclip_to_ldm(pipe.text_encoder, True, generator))
    elif text_layout == "sdxl":
        state |= _prefixed("conditioner.embedders.0.transformer.", clip_to_ldm(pipe.text_encoder))
        state |= _prefixed("conditioner.embedders.1.model.", openclip_to_ldm(pipe.text_encoder_2, False, generator))
    else:
        raise ValueError(f"unknown text layout {text_layout!r}")
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    state["betas"] = betas.float()
    state["alphas_cumprod"] = torch.cumprod(1 - betas, 0).float()
    state["model_ema.decay"] = torch.tensor(0.9999)
    state["model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int32)
    return state


TEXT_LAYOUT = {"sd15": "sd1", "sd15-inpaint": "sd1", "sd21-v": "sd2", "sdxl": "sdxl"}


def save_ldm_single_file(kind: str, path, seed: int = 0, dtype: torch.dtype | None = None) -> Path:
    """Write the tiny pipeline `kind` (tests/support/tiny.py) as an LDM single file.

    path ending in .safetensors: safetensors; .ckpt / .pt: torch.save({"state_dict": ...,
    "global_step": ...}) as Lightning does. dtype casts the floating tensors (e.g. fp16).
    """
    from .tiny import tiny_pipeline

    path = Path(path)
    state = ldm_state_dict(tiny_pipeline(kind, seed), TEXT_LAYOUT[kind])
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save({"state_dict": state, "global_step": 1000, "epoch": 1}, path)
    return path
