"""Train the bundled demo model: a small latent diffusion model of scikit-learn's digits.

The recipe is Stable Diffusion's (Rombach et al. 2022, "High-Resolution Image Synthesis
with Latent Diffusion Models"), shrunk to fit a CPU:
  1. a KL autoencoder (reconstruction + a small KL term) maps 32x32 images to 4x8x8 latents;
     the latent scaling factor is 1 / std of the latents, as in LDM;
  2. a cross-attention UNet learns the noise of DDPM's forward process (Ho et al. 2020,
     "Denoising Diffusion Probabilistic Models": MSE on the predicted noise, linear betas
     1e-4..0.02 over 1000 steps), jointly with a CLIP-style text encoder that reads the
     real CLIP BPE tokens of varied prompts ("a handwritten digit seven", "7", ...).
     About 10% of the prompts are dropped to "", so that classifier-free guidance works
     (Ho & Salimans 2022, "Classifier-Free Diffusion Guidance").

The data is `sklearn.datasets.load_digits` (1,797 8x8 images, shipped inside
scikit-learn: nothing is downloaded), upscaled bicubically to 32x32, replicated to RGB
and scaled to [-1, 1]. The result is a diffusers folder (safetensors) that the normal
loader reads: `sdengine/data/demo-digits` is the copy shipped with the package.

    sdengine train demo-digits                     # retrain the shipped model in place
    sdengine train demo-digits --out my-digits     # or anywhere else
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from sdengine.config import ModelConfig
from sdengine.diffusers_format import DIFFUSERS_VERSION, config_files

DEMO_MODEL_DIR = Path(__file__).resolve().parent.parent / "data" / "demo-digits"
IMAGE_SIZE = 32
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Prompt templates for one digit: {digit} is "7", {word} "seven", {a_word} "a seven" / "an eight".
PROMPT_TEMPLATES = (
    "a handwritten digit {word}",
    "the number {digit}",
    "{digit}",
    "a sketch of {a_word}",
    "{word}",
    "digit {digit}",
    "a picture of the number {word}",
    "the digit {word}",
    "a handwritten {digit}",
    "number {word}",
    "a drawing of the number {digit}",
    "an image of a handwritten {word}",
    "handwritten digit {digit}",
    "{a_word}",
)
PROMPT_DROP_RATE = 0.1  # share of prompts replaced by "" to learn the unconditional model

# Defaults of `sdengine train demo-digits`: the shipped model was trained with these.
DEFAULT_SEED = 0
DEFAULT_VAE_STEPS = 400
DEFAULT_UNET_STEPS = 2000
VAE_BATCH, UNET_BATCH = 32, 64
VAE_LR, UNET_LR = 1e-3, 1e-3
KL_WEIGHT = 1e-6  # LDM's weight of the KL term against the per-image summed L1 + MSE
EMA_DECAY = 0.995  # the saved UNet and text encoder are exponential moving averages (~200-step horizon)
WARMUP_STEPS = 100


def digit_prompts(label: int) -> list[str]:
    """Every training prompt for one digit (0-9), e.g. "a handwritten digit seven", "7"."""
    word = DIGIT_WORDS[label]
    a_word = ("an " if word[0] in "aeiou" else "a ") + word
    return [t.format(digit=label, word=word, a_word=a_word) for t in PROMPT_TEMPLATES]


def digits_dataset(size: int = IMAGE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits as (images (N, 3, size, size) in [-1, 1], labels (N,)).

    The 8x8 images (values 0..16, ink is high) are upscaled bicubically; ink is white.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images).float().div(16)[:, None]  # (N, 1, 8, 8) in [0, 1]
    images = F.interpolate(images, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
    images = images.mul(2).sub(1).expand(-1, 3, -1, -1).contiguous()  # (N, 3, size, size)
    return images, torch.from_numpy(digits.target).long()


# ---------------------------------------------------------------------------
# Networks and the DDPM schedule
# ---------------------------------------------------------------------------

def build_networks(config: ModelConfig):
    """Fresh (text_encoder, unet, vae) of config, with sdengine's own modules."""
    from sdengine.models.clip import CLIPTextModel
    from sdengine.models.unet import UNet2DConditionModel
    from sdengine.models.vae import AutoencoderKL

    networks = CLIPTextModel(config.text_encoder), UNet2DConditionModel(config.unet), AutoencoderKL(config.vae)
    for network in networks:
        init_for_training(network)
    return networks


def init_for_training(module: torch.nn.Module) -> torch.nn.Module:
    """The initialisation transformers / diffusers give these networks before training.

    sdengine's modules are built to be filled by the loader, so their own initial values
    are not fit to train from (norm scales may be zero). Norms start as the identity
    (scale 1, shift 0) and embeddings as N(0, 0.02^2), as transformers' CLIP does;
    convolutions and linear layers keep torch's default (Kaiming-uniform), as diffusers'.
    """
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (torch.nn.LayerNorm, torch.nn.GroupNorm)):
                if m.weight is not None:
                    m.weight.fill_(1.0)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, torch.nn.Embedding):
                m.weight.normal_(0.0, 0.02)
            elif isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                m.reset_parameters()
    return module


def ddpm_alphas_cumprod(config: ModelConfig) -> torch.Tensor:
    """alpha_bar_t of the training schedule, t = 0..num_train_timesteps-1 (fp64)."""
    s = config.scheduler
    n = s.num_train_timesteps
    if s.beta_schedule == "linear":
        betas = torch.linspace(s.beta_start, s.beta_end, n, dtype=torch.float64)
    elif s.beta_schedule == "scaled_linear":
        betas = torch.linspace(s.beta_start ** 0.5, s.beta_end ** 0.5, n, dtype=torch.float64) ** 2
    else:
        raise ValueError(f"the trainer supports linear and scaled_linear betas, not {s.beta_schedule!r}")
    return torch.cumprod(1 - betas, dim=0)


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------

def _lr_at(step: int, base_lr: float, total: int) -> float:
    """Linear warmup, then cosine decay to 10% of the base rate."""
    warmup = min(WARMUP_STEPS, total // 10)
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _batches(n: int, batch: int, steps: int, generator: torch.Generator):
    """Index batches drawn from seeded epoch permutations, `steps` of them."""
    order = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        while len(order) < batch:
            order = torch.cat([order, torch.randperm(n, generator=generator)])
        yield order[:batch]
        order = order[batch:]


def train_vae(vae, images: torch.Tensor, steps: int, generator: torch.Generator, progress: bool = True):
    """Fit the autoencoder: L1 + MSE reconstruction plus KL_WEIGHT * KL(q(z|x) || N(0, I))."""
    from tqdm.auto import tqdm

    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=VAE_LR, weight_decay=0.0)
    bar = tqdm(_batches(len(images), VAE_BATCH, steps, generator), total=steps, desc="autoencoder",
               disable=not progress)
    for step, idx in enumerate(bar):
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, VAE_LR, steps)
        x = images[idx]
        mean, logvar = vae.encode(x)  # (B, 4, 8, 8) each
        z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=generator)
        recon = vae.decode(z)
        err = recon - x
        # Sums per image, averaged over the batch (LDM's convention, which sets KL_WEIGHT's scale).
        rec_loss = (err.abs() + err.square()).flatten(1).sum(1).mean()
        kl = 0.5 * (mean.square() + logvar.exp() - 1 - logvar).flatten(1).sum(1).mean()
        loss = rec_loss + KL_WEIGHT * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 20 == 0 or step == steps - 1:
            bar.set_postfix(l1=f"{err.abs().mean().item():.4f}", kl=f"{kl.item():.0f}")
    vae.eval()
    return vae


@torch.no_grad()
def encode_dataset(vae, images: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior (mean, std) of every image: (N, C, h, w) each."""
    means, stds = [], []
    for start in range(0, len(images), batch):
        mean, logvar = vae.encode(images[start:start + batch])
        means.append(mean)
        stds.append(torch.exp(0.5 * logvar))
    return torch.cat(means), torch.cat(stds)


def latent_scaling_factor(mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator) -> float:
    """1 / std of sampled latents, so that scaled latents have unit variance (LDM sec. 3.1)."""
    z = mean + std * torch.randn(mean.shape, generator=generator)
    return float(1.0 / z.std())


def train_unet(text_encoder, unet, tokenizer, latents_mean, latents_std, labels, config: ModelConfig,
               steps: int, generator: torch.Generator, progress: bool = True):
    """Fit the UNet and text encoder jointly on MSE(predicted noise, noise); returns their EMA copies."""
    from tqdm.auto import tqdm

    prompts = [[p for p in digit_prompts(label)] for label in range(10)]
    per_digit = len(prompts[0])
    # Token ids of every prompt, digit-major, with "" last: (10 * per_digit + 1, 77).
    all_ids = tokenizer([p for digit in prompts for p in digit] + [""])
    empty_index = len(all_ids) - 1
    alphas_cumprod = ddpm_alphas_cumprod(config).float()
    scale = config.vae.scaling_factor
    num_timesteps = config.scheduler.num_train_timesteps

    text_encoder.train()
    unet.train()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=UNET_LR, weight_decay=0.01)
    ema_text, ema_unet = copy.deepcopy(text_encoder).eval(), copy.deepcopy(unet).eval()
    ema_params = list(ema_unet.parameters()) + list(ema_text.parameters())
    for p in ema_params:
        p.requires_grad_(False)

    bar = tqdm(_batches(len(labels), UNET_BATCH, steps, generator), total=steps, desc="unet + text encoder",
               disable=not progress)
    running = None
    for step, idx in enumerate(bar):
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, UNET_LR, steps)
        b = len(idx)
        z0 = (latents_mean[idx] + latents_std[idx] * torch.randn(latents_mean[idx].shape, generator=generator)) * scale
        template = torch.randint(per_digit, (b,), generator=generator)
        prompt_index = labels[idx] * per_digit + template
        dropped = torch.rand(b, generator=generator) < PROMPT_DROP_RATE
        prompt_index = torch.where(dropped, torch.full_like(prompt_index, empty_index), prompt_index)
        t = torch.randint(num_timesteps, (b,), generator=generator)
        noise = torch.randn(z0.shape, generator=generator)
        a = alphas_cumprod[t].view(b, 1, 1, 1)
        noisy = a.sqrt() * z0 + (1 - a).sqrt() * noise  # q(x_t | x_0), DDPM eq. 4

        # Encode each distinct prompt of the batch once: (P, 77, D), then gather per sample.
        unique, inverse = torch.unique(prompt_index, return_inverse=True)
        hidden, _ = text_encoder(all_ids[unique])
        context = hidden[inverse]  # (B, 77, D)
        pred = unet(noisy, t, context)
        loss = F.mse_loss(pred, noise)

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        with torch.no_grad():
            decay = min(EMA_DECAY, (1 + step) / (10 + step))  # short warmup of the average
            torch._foreach_lerp_(ema_params, params, 1 - decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 20 == 0 or step == steps - 1:
            bar.set_postfix(mse=f"{running:.4f}")
    return ema_text, ema_unet


def train_demo_digits(out_dir=DEMO_MODEL_DIR, *, seed: int = DEFAULT_SEED, vae_steps: int = DEFAULT_VAE_STEPS,
                      unet_steps: int = DEFAULT_UNET_STEPS, preset: str = "demo-digits",
                      progress: bool = True) -> Path:
    """Train the demo model from scratch and save it as a diffusers folder at out_dir.

    Deterministic for a given seed, torch version and thread count. The folder is
    written next to out_dir under a temporary name and renamed into place, so an
    interrupted run leaves any previous model untouched.
    """
    from sdengine.tokenizer import CLIPTokenizer

    if vae_steps < 1 or unet_steps < 1:
        raise ValueError(f"vae_steps and unet_steps must be positive, got {vae_steps} and {unet_steps}")
    config = ModelConfig.from_name(preset)
    out_dir = Path(out_dir)
    start = time.perf_counter()
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    images, labels = digits_dataset(config.default_size)
    text_encoder, unet, vae = build_networks(config)
    tokenizer = CLIPTokenizer.default()

    train_vae(vae, images, vae_steps, generator, progress)
    latents_mean, latents_std = encode_dataset(vae, images)
    config = replace(config, vae=replace(config.vae, scaling_factor=latent_scaling_factor(
        latents_mean, latents_std, generator)))
    ema_text, ema_unet = train_unet(text_encoder, unet, tokenizer, latents_mean, latents_std, labels, config,
                                    unet_steps, generator, progress)
    minutes = (time.perf_counter() - start) / 60
    info = {"seed": seed, "vae_steps": vae_steps, "unet_steps": unet_steps, "train_minutes": round(minutes, 1),
            "torch_threads": torch.get_num_threads(), "torch_version": torch.__version__}
    save_diffusers_folder(out_dir, config, ema_text, ema_unet, vae, info)
    return out_dir


# ---------------------------------------------------------------------------
# Saving in the diffusers folder layout
# ---------------------------------------------------------------------------

MODEL_INDEX_TEMPLATE = {
    "_class_name": "StableDiffusionPipeline",
    "_diffusers_version": DIFFUSERS_VERSION,
    "feature_extractor": [None, None],
    "image_encoder": [None, None],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
SPECIAL_TOKENS = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                  "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _save_weights(module, path: Path, dtype: torch.dtype) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().to(dtype).contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(path), metadata={"format": "pt"})


def save_diffusers_folder(out_dir, config: ModelConfig, text_encoder, unet, vae, info: dict | None = None,
                          dtype: torch.dtype = torch.float16) -> Path:
    """Write a StableDiffusionPipeline folder (safetensors weights in `dtype`) at out_dir, atomically.

    The files are those diffusers' `save_pretrained(safe_serialization=True)` writes, so
    diffusers' StableDiffusionPipeline.from_pretrained reads the folder too. fp16 halves
    the size (the text encoder's 49,408-token embedding dominates it).
    """
    from sdengine.tokenizer import save_vocab_files

    out_dir = Path(out_dir).resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        files = config_files(config)  # config.json dicts, as diffusers writes them
        index = dict(MODEL_INDEX_TEMPLATE, scheduler=["diffusers", files["scheduler"]["_class_name"]])
        _write_json(tmp / "model_index.json", index)
        _write_json(tmp / "text_encoder" / "config.json", files["text_encoder"])
        _save_weights(text_encoder, tmp / "text_encoder" / "model.safetensors", dtype)
        _write_json(tmp / "unet" / "config.json", files["unet"])
        _save_weights(unet, tmp / "unet" / "diffusion_pytorch_model.safetensors", dtype)
        _write_json(tmp / "vae" / "config.json", files["vae"])
        _save_weights(vae, tmp / "vae" / "diffusion_pytorch_model.safetensors", dtype)
        _write_json(tmp / "scheduler" / "scheduler_config.json", files["scheduler"])
        save_vocab_files(tmp / "tokenizer")
        _write_json(tmp / "tokenizer" / "special_tokens_map.json", SPECIAL_TOKENS)
        _write_json(tmp / "tokenizer" / "tokenizer_config.json", {
            **SPECIAL_TOKENS, "add_prefix_space": False, "clean_up_tokenization_spaces": True,
            "do_lower_case": True, "errors": "replace", "model_max_length": 77,
            "tokenizer_class": "CLIPTokenizer"})
        if info is not None:
            _write_json(tmp / "training.json", info)
        # Swap into place: the old folder (if any) is removed only once the new one is complete.
        old = None
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
            out_dir.rename(old)
        tmp.rename(out_dir)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


# ---------------------------------------------------------------------------
# Command line: `sdengine train demo-digits`
# ---------------------------------------------------------------------------

def register(subparsers) -> None:
    """Add the `train` subcommand to the sdengine CLI."""
    p = subparsers.add_parser(
        "train", help="train the bundled demo model (scikit-learn digits) on the CPU",
        description="Train a small text-to-image latent diffusion model on scikit-learn's digits "
                    "and save it as a diffusers folder.")
    p.add_argument("preset", choices=["demo-digits"], help="what to train (only demo-digits for now)")
    p.add_argument("--out", type=Path, default=DEMO_MODEL_DIR,
                   help=f"output folder (default: the shipped model, {DEMO_MODEL_DIR})")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"random seed (default {DEFAULT_SEED})")
    p.add_argument("--vae-steps", type=int, default=DEFAULT_VAE_STEPS,
                   help=f"autoencoder training steps (default {DEFAULT_VAE_STEPS})")
    p.add_argument("--unet-steps", type=int, default=DEFAULT_UNET_STEPS,
                   help=f"UNet + text encoder training steps (default {DEFAULT_UNET_STEPS})")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 is much faster on a machine "
                        "whose cores are busy with other work)")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be positive, got {args.threads}")
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    out = train_demo_digits(args.out, seed=args.seed, vae_steps=args.vae_steps, unet_steps=args.unet_steps,
                            preset=args.preset)
    print(f"saved {out} in {(time.perf_counter() - start) / 60:.1f} min")
    return 0
