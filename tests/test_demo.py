"""Acceptance test of the bundled demo model (sdengine/data/demo-digits) and its trainer.

An end-to-end check of tokenizer, text encoder, UNet, samplers, guidance and VAE: a
support-vector classifier trained here on scikit-learn's real digits reads the digits
that the shipped model draws through the public API (`sdengine.load()`, no path).

Budget: under 4 minutes on 2 CPU cores; generation dominates (8 runs of 100 32x32 images).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import sdengine
from sdengine.training.train import DEMO_MODEL_DIR, DIGIT_WORDS, digits_dataset

pytestmark = pytest.mark.slow

DIGITS = list(range(10))
SEEDS = list(range(10))
PROMPT = "a handwritten digit {word}"
# The samplers the issue names, with their schedule, at 20 steps each.
SAMPLERS_AT_20_STEPS = [("euler", None), ("euler_a", None), ("ddim", None), ("dpmpp_2m", "karras"), ("unipc", None)]


# ---------------------------------------------------------------------------
# Measuring: an SVC trained on the real 8x8 digits
# ---------------------------------------------------------------------------

def to_digits_8x8(images: np.ndarray) -> np.ndarray:
    """Images (N, H, W, 3) in [0, 1] (white ink on black) -> (N, 64) in load_digits' range 0..16.

    Grey level is the channel mean; each 8x8 cell is the mean of its (H/8)x(W/8) block,
    which inverts the trainer's 4x bicubic upscaling up to a slight blur.
    """
    n, h, w, _ = images.shape
    grey = images.mean(axis=-1)  # (N, H, W)
    cells = grey.reshape(n, 8, h // 8, 8, w // 8).mean(axis=(2, 4))  # (N, 8, 8)
    return (cells * 16).reshape(n, 64)


def fit_classifier():
    """(SVC fitted on a stratified 75% of load_digits, indices of the held-out 25%)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.svm import SVC

    digits = load_digits()
    train, test = train_test_split(np.arange(len(digits.target)), test_size=0.25, random_state=0,
                                   stratify=digits.target)
    return SVC(gamma=0.001, C=10.0).fit(digits.data[train], digits.target[train]), test


def generate_digits(pipe, prompt: str = PROMPT, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """10 digits x 10 seeds through the public API: (images (100, H, W, 3), labels (100,))."""
    prompts = [prompt.format(word=DIGIT_WORDS[d], digit=d) for d in DIGITS]
    result = pipe([p for p in prompts for _ in SEEDS], seed=[s for _ in DIGITS for s in SEEDS],
                  output_type="np", progress=False, **kwargs)
    return np.asarray(result.images), np.repeat(DIGITS, len(SEEDS))


def accuracy(classifier, images: np.ndarray, labels: np.ndarray) -> float:
    return float((classifier.predict(to_digits_8x8(images)) == labels).mean())


def mean_pairwise_distance(x: np.ndarray) -> float:
    """Mean Euclidean distance over all pairs of rows of x (N, D)."""
    d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    return float(d[np.triu_indices(len(x), k=1)].mean())


@pytest.fixture(scope="module")
def classifier():
    return fit_classifier()[0]


@pytest.fixture(scope="module")
def pipe():
    return sdengine.load(device="cpu", dtype=torch.float32)  # None: the bundled demo model


@pytest.fixture(scope="module")
def default_run(pipe):
    """The default sampler, steps and guidance: what `sdengine generate` does."""
    return generate_digits(pipe)


# ---------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------

def test_classifier_reads_real_digits():
    """The measuring instrument: ~98% on held-out digits, also after the 32x32 round trip."""
    from sklearn.datasets import load_digits

    svc, test = fit_classifier()
    digits = load_digits()
    assert svc.score(digits.data[test], digits.target[test]) >= 0.97
    # The held-out digits as the trainer sees them (32x32 RGB), read back by to_digits_8x8.
    images, labels = digits_dataset()
    upscaled = (images[test].permute(0, 2, 3, 1).numpy() + 1) / 2  # (N, 32, 32, 3) in [0, 1]
    assert accuracy(svc, upscaled, labels[test].numpy()) >= 0.95


def test_shipped_folder_layout():
    """diffusers layout, safetensors only, a few MB, and the default of sdengine.load()."""
    assert sdengine.api.DEMO_MODEL.resolve() == DEMO_MODEL_DIR.resolve()
    index = json.loads((DEMO_MODEL_DIR / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    for part in ("text_encoder", "tokenizer", "unet", "vae", "scheduler"):
        assert (DEMO_MODEL_DIR / part).is_dir(), part
    files = [p for p in DEMO_MODEL_DIR.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".ckpt")]
    assert sum(p.stat().st_size for p in files) < 8e6


def test_default_sampler_accuracy(classifier, default_run):
    images, labels = default_run
    assert images.shape == (100, 32, 32, 3)
    assert accuracy(classifier, images, labels) >= 0.90


def test_bf16_draws_as_well_as_fp32(classifier, default_run):
    """bf16, sdengine's default on CPUs with bf16 dot products (sdengine/device.py): the same
    digits as fp32 by the classifier's reading, within a small pixel error of fp32's images."""
    images, labels = default_run
    bf16_images, _ = generate_digits(sdengine.load(device="cpu", dtype="bf16"))
    assert accuracy(classifier, bf16_images, labels) >= max(0.90, accuracy(classifier, images, labels) - 0.03)
    assert float(np.abs(bf16_images - images).mean()) <= 0.02


@pytest.mark.parametrize("sampler,schedule", SAMPLERS_AT_20_STEPS)
def test_sampler_accuracy_at_20_steps(classifier, pipe, sampler, schedule):
    images, labels = generate_digits(pipe, sampler=sampler, schedule=schedule, steps=20)
    assert accuracy(classifier, images, labels) >= 0.85


def test_text_conditioning_does_the_work(classifier, pipe, default_run):
    """Without the prompt the model does not draw the digit the labels ask for; guidance helps.

    The unconditional model is the empty prompt (what the 10% prompt dropout trained): with
    10 classes chance is 10% (measured: 10%), and we allow up to 30% so that an
    unconditional model favouring a few digits still passes; against >= 90% with prompts.
    guidance_scale 1.0 with the digit prompts is the conditional model without
    classifier-free guidance (diffusers' meaning): it already draws the right digit most
    of the time (measured 89%), and guidance 7.5 must add at least 5 points (measured 99%).
    """
    images, labels = generate_digits(pipe, prompt="", guidance_scale=1.0, steps=20)
    assert accuracy(classifier, images, labels) <= 0.30
    predicted = classifier.predict(to_digits_8x8(images))
    assert len(set(predicted.tolist())) >= 5  # still digits of many kinds, not one mode

    unguided = accuracy(classifier, *generate_digits(pipe, guidance_scale=1.0, steps=20))
    assert accuracy(classifier, *default_run) >= unguided + 0.05


def test_seeds_give_diverse_digits(default_run):
    """The 10 seeds of one digit are not near-duplicates.

    Scale: the mean pairwise distance (8x8, values 0..16) between different real images of
    the same digit: 27 to 42 on load_digits, depending on the digit. Guidance narrows the
    distribution (measured: 0.5 to 0.7 of the real spread at guidance 7.5), so we ask for at
    least a third of the natural spread per digit, and that no two seeds of one digit are
    closer than a tenth of it (a copy would be ~0; measured minimum: 0.2 of the spread).
    """
    from sklearn.datasets import load_digits

    real = load_digits()
    images, labels = default_run
    cells = to_digits_8x8(images)
    for digit in DIGITS:
        real_spread = mean_pairwise_distance(real.data[real.target == digit])
        ours = cells[labels == digit]
        assert mean_pairwise_distance(ours) >= real_spread / 3, digit
        d = np.sqrt(((ours[:, None] - ours[None]) ** 2).sum(-1))
        assert d[np.triu_indices(len(ours), k=1)].min() >= real_spread / 10, digit


def test_matches_diffusers_on_the_shipped_model(pipe):
    """diffusers' own StableDiffusionPipeline reads the shipped folder and draws the same digits.

    Same seeds (one CPU generator per image), the folder's DPMSolverMultistepScheduler,
    guidance 7.5, fp32 on both sides.
    """
    diffusers = pytest.importorskip("diffusers")
    reference = diffusers.StableDiffusionPipeline.from_pretrained(
        DEMO_MODEL_DIR, local_files_only=True, dtype=torch.float32)
    reference.set_progress_bar_config(disable=True)
    prompts, seeds = ["a handwritten digit seven", "3"], [0, 1]
    theirs = reference(prompts, num_inference_steps=10, guidance_scale=7.5, height=32, width=32,
                       generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="np").images
    ours = pipe(prompts, seed=seeds, steps=10, guidance_scale=7.5, output_type="np", progress=False).images
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=2e-3)


def test_trainer_writes_a_loadable_folder(tmp_path):
    """A two-step training run: the folder loads in sdengine and in diffusers, and replaces atomically."""
    from sdengine.training.train import build_networks, train_demo_digits

    # sdengine's modules are made to be loaded: the trainer must give them a trainable start.
    text_encoder, unet, vae = build_networks(sdengine.PRESETS["demo-digits"])
    for network in (text_encoder, unet, vae):
        for name, m in network.named_modules():
            if isinstance(m, (torch.nn.LayerNorm, torch.nn.GroupNorm)):
                assert torch.all(m.weight == 1) and torch.all(m.bias == 0), name
    embedding = text_encoder.text_model.embeddings.token_embedding.weight
    assert 0.015 < float(embedding.std()) < 0.025

    out = tmp_path / "digits"
    out.mkdir()
    (out / "stale.txt").write_text("from an earlier run")
    train_demo_digits(out, vae_steps=2, unet_steps=2, progress=False)
    assert not (out / "stale.txt").exists()  # the old folder was replaced as a whole
    assert not [p for p in tmp_path.iterdir() if p.name != "digits"]  # no temp folders left
    info = json.loads((out / "training.json").read_text())
    assert (info["vae_steps"], info["unet_steps"]) == (2, 2)

    pipe = sdengine.load(out, device="cpu", dtype=torch.float32)
    vae_config = json.loads((out / "vae" / "config.json").read_text())
    assert pipe.config.vae.scaling_factor == pytest.approx(vae_config["scaling_factor"])
    assert vae_config["scaling_factor"] != sdengine.PRESETS["demo-digits"].vae.scaling_factor  # measured
    image = pipe("7", seed=0, steps=2, output_type="np", progress=False).images[0]
    assert image.shape == (32, 32, 3) and np.isfinite(image).all()

    diffusers = pytest.importorskip("diffusers")
    from safetensors.torch import load_file

    reference = diffusers.StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    assert type(reference.scheduler).__name__ == "DPMSolverMultistepScheduler"
    for part in ("unet", "vae"):  # every tensor diffusers expects is in the file, and no other
        saved = load_file(out / part / "diffusion_pytorch_model.safetensors")
        assert set(saved) == set(getattr(reference, part).state_dict()), part
