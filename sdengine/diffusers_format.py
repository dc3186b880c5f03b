"""The one mapping from sdengine's configs to diffusers' and transformers' config.json files.

    files = config_files(config)   # {"text_encoder", "unet", "vae", "scheduler"}: config.json dicts

The dicts are what diffusers' and transformers' save_pretrained write (every key, in
DIFFUSERS_VERSION), so a folder the trainer writes (sdengine/training) reads back in both
libraries and in sdengine.config.ModelConfig.from_diffusers. Without their "_" keys they are
the networks' constructor arguments (`model_kwargs`): the benchmark's and the tests' diffusers
reference networks are built from them (sdengine/bench/reference.py).

diffusers' naming quirk: `attention_head_dim` in SD configs is the number of heads per level,
so the per-level head counts travel under that name.
"""

from __future__ import annotations

from .config import (SCHEDULER_CLASS_TO_SAMPLER, ModelConfig, SchedulerConfig, TextEncoderConfig, UNetConfig,
                     VAEConfig)


DIFFUSERS_VERSION = "0.42.1"  # the version whose save_pretrained output these files reproduce
SAMPLER_TO_SCHEDULER_CLASS = {v: k for k, v in SCHEDULER_CLASS_TO_SAMPLER.items()}


def text_encoder_json(te: TextEncoderConfig) -> dict:
    """transformers' CLIPTextModel config.json, or CLIPTextModelWithProjection's when te has a
    text projection (SDXL's second encoder)."""
    return {
        "architectures": ["CLIPTextModelWithProjection" if te.projection_dim else "CLIPTextModel"],
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "dtype": "float32",
        "eos_token_id": te.eos_token_id,
        "hidden_act": te.hidden_act,
        "hidden_size": te.hidden_size,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": te.intermediate_size,
        "layer_norm_eps": te.layer_norm_eps,
        "max_position_embeddings": te.max_position_embeddings,
        "model_type": "clip_text_model",
        "num_attention_heads": te.num_attention_heads,
        "num_hidden_layers": te.num_hidden_layers,
        "pad_token_id": te.pad_token_id,
        "projection_dim": te.projection_dim or te.hidden_size,  # unused by CLIPTextModel
        "vocab_size": te.vocab_size,
    }


def unet_json(u: UNetConfig) -> dict:
    """diffusers' UNet2DConditionModel config.json (every key save_pretrained writes)."""
    same_per_level = lambda v: v[0] if len(set(v)) == 1 else list(v)  # noqa: E731
    return {
        "_class_name": "UNet2DConditionModel", "_diffusers_version": DIFFUSERS_VERSION,
        "act_fn": "silu", "addition_embed_type": u.addition_embed_type, "addition_embed_type_num_heads": 64,
        "addition_time_embed_dim": u.addition_time_embed_dim,
        "attention_head_dim": same_per_level(u.num_attention_heads), "attention_type": "default",
        "block_out_channels": list(u.block_out_channels), "center_input_sample": False,
        "class_embed_type": None, "class_embeddings_concat": False, "conv_in_kernel": 3, "conv_out_kernel": 3,
        "cross_attention_dim": u.cross_attention_dim, "cross_attention_norm": None,
        "down_block_types": list(u.down_block_types), "downsample_padding": 1, "dropout": 0.0,
        "dual_cross_attention": False, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
        "flip_sin_to_cos": u.flip_sin_to_cos, "freq_shift": u.freq_shift, "in_channels": u.in_channels,
        "layers_per_block": u.layers_per_block, "mid_block_only_cross_attention": None,
        "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": u.norm_eps,
        "norm_num_groups": u.norm_num_groups, "num_attention_heads": None, "num_class_embeds": None,
        "only_cross_attention": False, "out_channels": u.out_channels,
        "projection_class_embeddings_input_dim": u.projection_class_embeddings_input_dim,
        "resnet_out_scale_factor": 1.0, "resnet_skip_time_act": False, "resnet_time_scale_shift": "default",
        "reverse_transformer_layers_per_block": None, "sample_size": u.sample_size, "time_cond_proj_dim": None,
        "time_embedding_act_fn": None, "time_embedding_dim": None, "time_embedding_type": "positional",
        "timestep_post_act": None, "transformer_layers_per_block": same_per_level(u.transformer_layers_per_block),
        "up_block_types": list(u.up_block_types), "upcast_attention": u.upcast_attention,
        "use_linear_projection": u.use_linear_projection,
    }


def vae_json(v: VAEConfig) -> dict:
    """diffusers' AutoencoderKL config.json."""
    levels = len(v.block_out_channels)
    return {
        "_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION, "act_fn": "silu",
        "block_out_channels": list(v.block_out_channels), "down_block_types": ["DownEncoderBlock2D"] * levels,
        "force_upcast": v.force_upcast, "in_channels": v.in_channels, "latent_channels": v.latent_channels,
        "latents_mean": None, "latents_std": None, "layers_per_block": v.layers_per_block,
        "mid_block_add_attention": True, "norm_num_groups": v.norm_num_groups, "out_channels": v.out_channels,
        "sample_size": v.sample_size, "scaling_factor": v.scaling_factor, "shift_factor": v.shift_factor,
        "up_block_types": ["UpDecoderBlock2D"] * levels, "use_post_quant_conv": True, "use_quant_conv": True,
    }


def scheduler_json(s: SchedulerConfig) -> dict:
    """diffusers' scheduler_config.json for the config's default sampler and training schedule."""
    data = {
        "_class_name": SAMPLER_TO_SCHEDULER_CLASS[s.sampler], "_diffusers_version": DIFFUSERS_VERSION,
        "beta_end": s.beta_end, "beta_schedule": s.beta_schedule, "beta_start": s.beta_start,
        "num_train_timesteps": s.num_train_timesteps, "prediction_type": s.prediction_type,
        "rescale_betas_zero_snr": s.rescale_betas_zero_snr, "steps_offset": s.steps_offset,
        "timestep_spacing": s.timestep_spacing, "trained_betas": None,
    }
    if s.sampler in ("ddim", "ddpm", "pndm"):  # keys only the DDPM-family schedulers take
        data.update(clip_sample=s.clip_sample, set_alpha_to_one=s.set_alpha_to_one)
    else:
        data.update(use_karras_sigmas=s.use_karras_sigmas, final_sigmas_type=s.final_sigmas_type)
    data.update(dict(s.extra))
    return dict(sorted(data.items()))


def config_files(config: ModelConfig) -> dict:
    """The config.json dicts of a diffusers folder, as diffusers' and transformers'
    save_pretrained write them: {"text_encoder", "unet", "vae", "scheduler"}. The inverse of
    ModelConfig.from_component_dicts (for one text encoder)."""
    return {"text_encoder": text_encoder_json(config.text_encoder), "unet": unet_json(config.unet),
            "vae": vae_json(config.vae), "scheduler": scheduler_json(config.scheduler)}


def model_kwargs(config_json: dict) -> dict:
    """A network's constructor arguments: its config.json without the "_" keys (class, version)."""
    return {key: value for key, value in config_json.items() if not key.startswith("_")}
