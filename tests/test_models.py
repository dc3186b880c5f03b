"""Network parity: sdengine's CLIP text encoder, UNet and VAE against transformers / diffusers
on the same random tiny weights, fp32, within 1e-5 relative (max abs diff / max abs ref).

Each of our models is loaded twice from the reference state_dict: built normally and
loaded with strict=True, and built on the meta device and loaded with assign=True (the
loader's path). Parameter counts of the real architectures are checked against the
published figures (ANCHORS.md). Budget: under 60 s on 2 cores, most of it imports.
"""

import dataclasses
import json
from collections import Counter

import pytest
import torch

from sdengine.config import PRESETS, ModelConfig, tiny_config
from sdengine.models import AutoencoderKL, CLIPTextModel, EAGER_OPS, UNet2DConditionModel, set_ops
from sdengine.models.clip import add_text_model_prefix
from sdengine.models.layers import GEGLU, Attention, GroupNorm, LayerNorm

from support import tiny

RTOL = 1e-5
BOS, EOS = 49406, 49407


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny networks gain nothing from intra-op threads, and on a shared 2-core machine a
    second OpenMP thread that gets descheduled makes every op wait (100x slower here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    assert ours.shape == ref.shape, f"shape {tuple(ours.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(ours).all()
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def ours_from(model_cls, cfg, state_dict: dict):
    """Two copies of our model with the reference weights: strict copy, and meta + assign."""
    copied = model_cls(cfg)
    copied.load_state_dict(state_dict, strict=True)
    with torch.device("meta"):
        assigned = model_cls(cfg)
    assigned.load_state_dict({k: v.clone() for k, v in state_dict.items()}, strict=True, assign=True)
    assert not any(p.is_meta for p in assigned.parameters())
    return copied.eval(), assigned.eval()


# ---------------------------------------------------------------------------
# tests/support/tiny.py: its diffusers folders describe the tiny configs
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", [
    "sd15", "sd15-inpaint", "sd21-v", "sdxl"])
def test_tiny_pipeline_config_round_trip(kind, tmp_path):
    folder = tiny.save_tiny_pipeline(kind, tmp_path / kind)
    loaded = ModelConfig.from_diffusers(folder)
    expected = tiny_config(kind)
    # `extra` holds the scheduler keys SchedulerConfig does not name (thresholding, ...), and `given`
    # the keys the file held (a config built in code has None: every value counts); a key our
    # config leaves None ("the scheduler's default") comes back as that default.
    written = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert set(loaded.scheduler.given) == {k for k in written if not k.startswith("_")}
    defaults = {f: None for f in ("final_sigmas_type",) if getattr(expected.scheduler, f) is None}
    # The folder holds every key of the config (as the published scheduler_config.json files hold
    # skip_prk_steps, set_alpha_to_one, ... whatever the class), so no sampler falls back to its
    # class's defaults: `given` names them all.
    named = {f.name for f in dataclasses.fields(expected.scheduler)} - {"sampler", "extra", "given"}
    assert named - set(defaults) <= set(loaded.scheduler.given)
    loaded = dataclasses.replace(loaded, name=expected.name,
                                 scheduler=dataclasses.replace(loaded.scheduler, extra=(), given=None, **defaults))
    for part in ("text_encoder", "text_encoder_2", "unet", "vae", "scheduler"):
        assert getattr(loaded, part) == getattr(expected, part), part


# ---------------------------------------------------------------------------
# Text encoder
# ---------------------------------------------------------------------------

def _prompt_ids(pad_id: int) -> torch.Tensor:
    """Two tokenised prompts of different lengths, BOS ... EOS then padding, (2, 77)."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.full((2, 77), pad_id, dtype=torch.long)
    for row, length in enumerate((9, 40)):
        ids[row, 0] = BOS
        ids[row, 1:length] = torch.randint(0, 49400, (length - 1,), generator=generator)
        ids[row, length] = EOS
    return ids


TEXT_CASES = [  # (kind, encoder, pad id: EOS for OpenAI CLIP tokenizers, "!" = 0 for OpenCLIP ones, clip_skip)
    ("sd15", "text_encoder", EOS, None),
    ("sd15", "text_encoder", EOS, 1),
    ("sd21-v", "text_encoder", 0, None),
    ("sdxl", "text_encoder", EOS, None),
    ("sdxl", "text_encoder", EOS, 1),
    ("sdxl", "text_encoder_2", 0, None),
    ("sdxl", "text_encoder_2", 0, 1),
]


@pytest.mark.parametrize("kind,encoder,pad_id,clip_skip", TEXT_CASES)
@torch.no_grad()
def test_text_encoder_parity(kind, encoder, pad_id, clip_skip):
    cfg = getattr(tiny_config(kind), encoder)
    seed = 10 if encoder == "text_encoder_2" else 0
    ref = tiny.transformers_text_encoder(cfg, seed)
    ids = _prompt_ids(pad_id)
    out = ref(ids, output_hidden_states=True)
    # What diffusers' encode_prompt conditions on (StableDiffusion[XL]Pipeline.encode_prompt).
    skip = clip_skip or 0
    if cfg.output_layer == "last":
        final_norm = getattr(ref, "text_model", ref).final_layer_norm
        ref_hidden = out.last_hidden_state if skip == 0 else final_norm(out.hidden_states[-(skip + 1)])
    else:
        ref_hidden = out.hidden_states[-(skip + 2)]
    ref_pooled = out.text_embeds if cfg.projection_dim is not None else out.pooler_output

    for ours in ours_from(CLIPTextModel, cfg, add_text_model_prefix(ref.state_dict())):
        hidden, pooled = ours(ids, clip_skip=clip_skip)
        assert relative_error(hidden, ref_hidden) <= RTOL
        assert relative_error(pooled, ref_pooled) <= RTOL


def test_text_encoder_keys_and_errors():
    cfg = tiny_config("sdxl").text_encoder_2
    ours = CLIPTextModel(cfg)
    assert set(ours.state_dict()) == set(tiny.transformers_text_encoder(cfg, 10).state_dict())
    with pytest.raises(ValueError, match="clip_skip"):
        ours(_prompt_ids(0), clip_skip=cfg.num_hidden_layers)
    with pytest.raises(ValueError, match="input_ids"):
        ours(torch.zeros(1, 78, dtype=torch.long))


# ---------------------------------------------------------------------------
# UNet
# ---------------------------------------------------------------------------

def _unet_inputs(cfg, height: int, width: int, timestep):
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(2, cfg.in_channels, height, width, generator=generator)
    context = torch.randn(2, 77, cfg.cross_attention_dim, generator=generator)
    added = None
    if cfg.addition_embed_type == "text_time":
        text_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        added = {"text_embeds": torch.randn(2, text_dim, generator=generator),
                 "time_ids": torch.tensor([[64.0, 96.0, 0.0, 8.0, 64.0, 96.0], [32.0, 48.0, 4.0, 0.0, 64.0, 96.0]])}
    return sample, torch.as_tensor(timestep), context, added


UNET_CASES = [  # (kind, latent height, width, timestep)
    ("sd15", 8, 12, [999, 1]),
    ("sd15", 7, 9, 500),  # odd size: the upsample must match the skip's size; 0-d timestep
    ("sd15-inpaint", 8, 12, [981, 21]),
    ("sd21-v", 8, 12, [999.0, 0.5]),  # fractional timesteps (Euler-style schedules)
    ("sdxl", 8, 12, [999, 499]),
]


@pytest.mark.parametrize("kind,height,width,timestep", UNET_CASES)
@torch.no_grad()
def test_unet_parity(kind, height, width, timestep):
    cfg = tiny_config(kind).unet
    ref = tiny.diffusers_unet(cfg)
    sample, t, context, added = _unet_inputs(cfg, height, width, timestep)
    expected = ref(sample, t, context, added_cond_kwargs=added).sample
    assert expected.abs().max() > 0.1
    for ours in ours_from(UNet2DConditionModel, cfg, ref.state_dict()):
        assert relative_error(ours(sample, t, context, added), expected) <= RTOL


@torch.no_grad()
def test_unet_fused_qkv_and_ops_swap():
    """fuse_qkv keeps the output; a swapped Ops table is called by every norm/attention/GEGLU."""
    cfg = tiny_config("sdxl").unet
    ref = tiny.diffusers_unet(cfg)
    sample, t, context, added = _unet_inputs(cfg, 8, 12, [999, 1])
    expected = ref(sample, t, context, added_cond_kwargs=added).sample
    ours, _ = ours_from(UNet2DConditionModel, cfg, ref.state_dict())

    calls = Counter()

    def counted(name):
        op = getattr(EAGER_OPS, name)

        def wrapper(*args, **kwargs):
            calls[name] += 1
            return op(*args, **kwargs)
        return wrapper

    set_ops(ours, dataclasses.replace(EAGER_OPS, **{n: counted(n) for n in ("attention", "group_norm", "layer_norm",
                                                                           "geglu")}))
    self_attentions = [m for n, m in ours.named_modules() if n.endswith("attn1")]
    for attn in self_attentions:
        attn.fuse_qkv()
    assert all(attn.to_qkv is not None and not hasattr(attn, "to_q") for attn in self_attentions)
    assert relative_error(ours(sample, t, context, added), expected) <= RTOL

    modules = Counter(type(m).__name__ for m in ours.modules())
    assert calls == {"attention": modules[Attention.__name__], "group_norm": modules[GroupNorm.__name__],
                     "layer_norm": modules[LayerNorm.__name__], "geglu": modules[GEGLU.__name__]}
    assert calls["attention"] > 0 and calls["geglu"] > 0

    with pytest.raises(ValueError, match="added_cond"):
        ours(sample, t, context)


# ---------------------------------------------------------------------------
# VAE
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind,height,width", [("sd15", 16, 24), ("sdxl", 18, 22)])
@torch.no_grad()
def test_vae_parity(kind, height, width):
    cfg = tiny_config(kind).vae
    ref = tiny.diffusers_vae(cfg)
    generator = torch.Generator().manual_seed(2)
    image = torch.rand(2, 3, height, width, generator=generator) * 2 - 1
    latent_dist = ref.encode(image).latent_dist
    z = torch.randn(2, cfg.latent_channels, height // cfg.downscale, width // cfg.downscale, generator=generator)
    decoded = ref.decode(z).sample
    for ours in ours_from(AutoencoderKL, cfg, ref.state_dict()):
        mean, logvar = ours.encode(image)
        assert relative_error(mean, latent_dist.mean) <= RTOL
        assert relative_error(logvar, latent_dist.logvar) <= RTOL
        assert relative_error(ours.decode(z), decoded) <= RTOL
    for attn in [m for m in ours.modules() if isinstance(m, Attention)]:  # the mid blocks' (biased) attention
        attn.fuse_qkv()
    assert relative_error(ours.encode(image)[0], latent_dist.mean) <= RTOL
    assert relative_error(ours.decode(z), decoded) <= RTOL


# ---------------------------------------------------------------------------
# The real architectures: parameter counts (ANCHORS.md), built on the meta device
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("part,millions", [
    (lambda: UNet2DConditionModel(PRESETS["sd15"].unet), 859.5),
    (lambda: UNet2DConditionModel(PRESETS["sd21"].unet), 865.9),
    (lambda: UNet2DConditionModel(PRESETS["sdxl"].unet), 2567.5),
    (lambda: AutoencoderKL(PRESETS["sd15"].vae).decoder, 49.5),
    (lambda: CLIPTextModel(PRESETS["sd15"].text_encoder), 123.1),
], ids=["sd15-unet", "sd21-unet", "sdxl-unet", "vae-decoder", "clip-l"])
def test_parameter_counts(part, millions):
    with torch.device("meta"):
        model = part()
    count = sum(p.numel() for p in model.parameters())
    assert round(count / 1e6, 1) == millions


# ---------------------------------------------------------------------------
# Reduced precision
# ---------------------------------------------------------------------------

def test_attention_upcast_computes_in_fp32():
    """upcast=True (SD2's upcast_attention) equals fp32 attention on the same bf16 inputs,
    rounded once at the end; without it the bf16 result differs."""
    from sdengine.models.layers import attention

    generator = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 77, 4 * 40, generator=generator).mul(4).to(torch.bfloat16) for _ in range(3))
    expected = attention(q.float(), k.float(), v.float(), 4).to(torch.bfloat16)
    upcast = attention(q, k, v, 4, upcast=True)
    assert upcast.dtype == torch.bfloat16
    assert torch.equal(upcast, expected)
    assert not torch.equal(attention(q, k, v, 4), expected)


def _reduced_precision_errors(kind: str, device: str, dtype: torch.dtype) -> dict:
    """Mean abs error of our networks in `dtype` on `device` against the fp32 CPU reference,
    relative to the reference's mean abs value, per network."""
    cfg = tiny_config(kind)
    errors = {}

    def measure(name, model, run, expected):
        model = model.to(device, dtype)
        out = run(model).float().cpu()
        assert torch.isfinite(out).all(), name
        errors[name] = ((out - expected).abs().mean() / expected.abs().mean()).item()

    def to(x):
        return x.to(device, dtype) if x.is_floating_point() else x.to(device)

    text_ref = tiny.transformers_text_encoder(cfg.text_encoder)
    ids = _prompt_ids(EOS)
    out = text_ref(ids, output_hidden_states=True)
    expected = out.last_hidden_state if cfg.text_encoder.output_layer == "last" else out.hidden_states[-2]
    text, _ = ours_from(CLIPTextModel, cfg.text_encoder, add_text_model_prefix(text_ref.state_dict()))
    measure("text_encoder", text, lambda m: m(to(ids))[0], expected)

    unet_ref = tiny.diffusers_unet(cfg.unet)
    sample, t, context, added = _unet_inputs(cfg.unet, 8, 12, [999, 1])
    expected = unet_ref(sample, t, context, added_cond_kwargs=added).sample
    unet, _ = ours_from(UNet2DConditionModel, cfg.unet, unet_ref.state_dict())
    added = added and {k: to(v) for k, v in added.items()}
    measure("unet", unet, lambda m: m(to(sample), to(t), to(context), added), expected)

    vae_ref = tiny.diffusers_vae(cfg.vae)
    generator = torch.Generator().manual_seed(4)
    image = torch.rand(2, 3, 16, 24, generator=generator) * 2 - 1
    z = torch.randn(2, cfg.vae.latent_channels, 8, 12, generator=generator)
    expected_mean, expected_decoded = vae_ref.encode(image).latent_dist.mean, vae_ref.decode(z).sample
    vae, _ = ours_from(AutoencoderKL, cfg.vae, vae_ref.state_dict())
    measure("vae_encode", vae, lambda m: m.encode(to(image))[0], expected_mean)
    measure("vae_decode", vae, lambda m: m.decode(to(z)), expected_decoded)
    return errors


@pytest.mark.parametrize("kind", ["sd21-v", "sdxl"])
@torch.no_grad()
def test_bf16_cpu_close_to_fp32(kind):
    errors = _reduced_precision_errors(kind, "cpu", torch.bfloat16)
    assert max(errors.values()) < 3e-2, errors


@pytest.mark.gpu
@pytest.mark.parametrize("kind", tiny.TINY_KINDS)
@torch.no_grad()
def test_fp16_cuda_close_to_fp32(kind):
    errors = _reduced_precision_errors(kind, "cuda", torch.float16)
    assert max(errors.values()) < 5e-3, errors
