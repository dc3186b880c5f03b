"""Bad arguments are refused in one place with one set of words (sdengine/request.py, and
sde_generate in csrc/src/sdengine.cpp for the C API), before any work.

One table: each row is a bad value and the phrase the refusal must contain, which names the
parameter (an InvalidArgumentError's message starts with it). A row runs through every front end where the value can be given:
- "py":  Pipeline.__call__ (what sdengine.generate calls),
- "cli": `sdengine generate` (exit status 2, the phrase on stderr),
- "c":   the C API through its Python bindings (sdengine._C.Model.generate, no Python-side
         checks in between), on the tiny SD1 engine that tests/support/native.py builds.
load()'s arguments have their own table.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import sdengine
from sdengine.errors import InvalidArgumentError
from support.tiny import save_tiny_pipeline, tiny_pipeline

PROMPT = "a red square"
SIZE = 16
IMAGE = np.full((SIZE, SIZE, 3), 0.5, np.float32)
MASK = np.ones((SIZE, SIZE), np.float32)
UNSET = object()


def row(phrase, py=UNSET, cli=UNSET, c=UNSET, model="sd15"):
    """py: Pipeline kwargs; cli: extra command-line args; c: _C.Model.generate kwargs."""
    return phrase, py, cli, c, model


def rows_for(column: int) -> list:
    """The rows a front end takes (column 1: py, 2: cli, 3: c), as pytest params."""
    return [pytest.param(r[0], r[column], r[4], id=f"{i}-{r[0][:40]}") for i, r in enumerate(ROWS)
            if r[column] is not UNSET]


ROWS = [
    # The three the issue found: eta below 0, a callback that is not callable, a seed past uint64.
    row("eta must be a finite number >= 0", py=dict(eta=-1.0), c=dict(eta=-1.0)),
    row("eta must be a finite number >= 0", py=dict(eta=math.nan), c=dict(eta=math.nan)),
    row("callback must be callable or None", py=dict(callback=5)),
    row("seed must be an integer in [0, 2**64 - 1]", py=dict(seed=2**70), cli=["--seed", str(2**70)],
        c=dict(seed=2**70)),
    row("seed must be an integer in [0, 2**64 - 1]", py=dict(seed=-1), cli=["--seed", "-1"], c=dict(seed=-1)),
    row("seed must be an integer in [0, 2**64 - 1]", py=dict(seed=2**64 - 1, batch_size=2),
        cli=["--seed", str(2**64 - 1), "-b", "2"], c=dict(seed=2**64 - 1, batch_size=2)),
    row("seed must be an integer in [0, 2**64 - 1]", py=dict(seed=1.5)),
    row("seed must be an integer in [0, 2**64 - 1]", py=dict(seed=[1, 2])),
    row("seed must be an integer in [0, 2**64 - 1]", py=dict(seed=True)),
    # clip_skip beyond the encoder's depth (the tiny encoder has 2 layers)
    row("clip_skip must be an integer in [0, 1] (the text encoder has 2 layers), got 2", py=dict(clip_skip=2),
        cli=["--clip-skip", "2"], c=dict(clip_skip=2)),
    row("clip_skip must be an integer in [0, 1000]", py=dict(clip_skip=-1), cli=["--clip-skip", "-1"],
        c=dict(clip_skip=-1)),
    row("clip_skip must be an integer", py=dict(clip_skip="1")),
    # latents of the wrong shape or dtype
    row("latents must have shape (1, 4, 8, 8)", py=dict(latents=torch.randn(1, 4, 5, 5))),
    row("latents must be a floating-point tensor", py=dict(latents=torch.zeros(1, 4, 8, 8, dtype=torch.int64))),
    row("latents must be a torch.Tensor", py=dict(latents=np.zeros((1, 4, 8, 8), np.float32))),
    row("latents must hold finite values", py=dict(latents=torch.full((1, 4, 8, 8), math.nan))),
    # init and mask images
    row("mask_image size (16, 8) does not match init_image size (16, 16)",
        py=dict(init_image=IMAGE, mask_image=MASK[:8]), model="sd15-inpaint"),
    row("mask_image needs init_image", py=dict(mask_image=MASK), cli=["--mask-image", "MASK"],
        c=dict(mask_image=bytes(SIZE * SIZE))),
    row("mask_image needs an inpainting model", py=dict(init_image=IMAGE, mask_image=MASK)),
    row("init_image must be a PIL image, an array", py=dict(init_image="cat.png")),
    row("init_image must hold finite values", py=dict(init_image=np.full((SIZE, SIZE, 3), np.inf, np.float32))),
    row("init_image is required", py=dict(), model="sd15-inpaint"),
    # non-finite strength or guidance
    row("strength must be a number in [0, 1]", py=dict(init_image=IMAGE, strength=math.nan),
        cli=["--init-image", "IMAGE", "--strength", "nan"], c=dict(init_image=True, strength=math.nan)),
    row("strength must be a number in [0, 1]", py=dict(init_image=IMAGE, strength=1.5),
        cli=["--init-image", "IMAGE", "--strength", "1.5"], c=dict(init_image=True, strength=1.5)),
    row("strength applies to img2img and inpainting", py=dict(strength=0.5), cli=["--strength", "0.5"]),
    row("guidance_scale must be a finite number", py=dict(guidance_scale=math.nan), cli=["--cfg", "nan"],
        c=dict(guidance_scale=math.nan)),
    row("guidance_scale must be a finite number", py=dict(guidance_scale=math.inf), cli=["--cfg", "inf"],
        c=dict(guidance_scale=math.inf)),
    row("guidance_scale must be a finite number", py=dict(guidance_scale="7")),
    # prompts that are not (valid) strings
    row("prompt must be a string or a non-empty list of strings", py=dict(prompt=5)),
    row("prompt must be a string or a non-empty list of strings", py=dict(prompt=[])),
    row("prompt must be a string or a non-empty list of strings", py=dict(prompt=["a", 3])),
    row("prompt must be a string or a non-empty list of strings", py=dict(prompt=None)),
    row("prompt must be valid UTF-8 text", py=dict(prompt="a \ud800 b"), c=dict(prompt=b"a \xff b")),
    row("negative_prompt must be valid UTF-8 text", c=dict(negative_prompt=b"\xc0\xaf")),
    row("negative_prompt must be a string or a non-empty list of strings", py=dict(negative_prompt=5)),
    row("negative_prompt must have one entry per prompt", py=dict(negative_prompt=["a", "b"])),
    # a batch over the caps (batch_size 64, 1024 images per request)
    row("batch_size must be an integer in [1, 64]", py=dict(batch_size=65), cli=["-b", "65"], c=dict(batch_size=65)),
    row("batch_size must be an integer in [1, 64]", py=dict(batch_size=0), cli=["-b", "0"], c=dict(batch_size=0)),
    row("batch_size must be an integer in [1, 64]", py=dict(batch_size=2.0)),
    row("batch_size x prompts must be at most 1024 images", py=dict(prompt=["a"] * 40, batch_size=26)),
    # sizes: multiples of 8, sides up to 8192, at most 4096 x 4096 pixels
    row("height must be a multiple of 8 in [8, 8192]", py=dict(height=8200), cli=["--height", "8200"],
        c=dict(height=8200)),
    row("width must be a multiple of 8 in [8, 8192]", py=dict(width=12), cli=["--width", "12"], c=dict(width=12)),
    row("height must be a multiple of 8 in [8, 8192]", py=dict(height=-8), cli=["--height", "-8"], c=dict(height=-8)),
    row("width x height must be at most 16777216 pixels", py=dict(width=8192, height=4096),
        cli=["--width", "8192", "--height", "4096"], c=dict(width=8192, height=4096)),
    # steps
    row("num_inference_steps must be an integer in [1, 1000]", py=dict(steps=0), cli=["--steps", "0"]),
    row("num_inference_steps must be an integer in [1, 1000]", py=dict(steps=1001), cli=["--steps", "1001"]),
    row("num_inference_steps must be an integer in [1, 1000]", py=dict(num_inference_steps=2.5)),
    row("steps must be an integer in [1, 1000]", c=dict(steps=1001)),
    row("num_inference_steps and steps disagree", py=dict(num_inference_steps=3, steps=4)),
    # names and flags
    row("unknown sampler", py=dict(sampler="warp-drive"), cli=["--sampler", "warp-drive"], c=dict(sampler="warp-drive")),
    row("unknown schedule", py=dict(schedule="weird"), cli=["--schedule", "weird"], c=dict(schedule="weird")),
    row("sampler must be a name (a string) or None", py=dict(sampler=5)),
    row("output_type must be 'pil', 'np' or 'latent'", py=dict(output_type="jpeg")),
    row("progress must be True or False", py=dict(progress="yes")),
    row("vae_tiling must be True, False or None", py=dict(vae_tiling="auto")),
]


@pytest.fixture(scope="module")
def pipes():
    return {kind: sdengine.from_diffusers(tiny_pipeline(kind)) for kind in ("sd15", "sd15-inpaint")}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_pipeline("sd15", tmp_path_factory.mktemp("validation") / "tiny-sd15")


@pytest.fixture(scope="module")
def c_model(folder):
    """sdengine._C.Model, the C API's bindings, on the tiny engine (built once, cached)."""
    _C = pytest.importorskip("sdengine._C")
    engine = sdengine.load(folder, backend="native").backend.engine_dir
    return _C.Model(str(folder), str(engine))


def test_table_is_big_enough():
    assert len(ROWS) >= 40
    assert len(rows_for(3)) >= 15 and len(rows_for(2)) >= 15  # C API and CLI rows


@pytest.mark.parametrize("phrase, py, model", rows_for(1))
def test_python_api_refuses(pipes, phrase, py, model):
    base = dict(prompt=PROMPT, height=SIZE, width=SIZE, progress=False)
    if "num_inference_steps" not in py:
        base["steps"] = 2
    kwargs = dict(base, **py)
    called = []
    if "callback" not in py:
        kwargs["callback"] = lambda *a: called.append(1)
    with pytest.raises(ValueError) as info:
        pipes[model](**kwargs)
    assert phrase in str(info.value)
    if isinstance(info.value, InvalidArgumentError):  # the parameter, named first
        assert phrase.startswith(info.value.parameter) and str(info.value).startswith(info.value.parameter)
    assert not called, "refused only after work began"


@pytest.mark.parametrize("phrase, cli, model", rows_for(2))
def test_cli_refuses(folder, tmp_path, capsys, phrase, cli, model):
    from PIL import Image

    from sdengine.cli import main

    Image.fromarray((IMAGE * 255).astype(np.uint8)).save(tmp_path / "image.png")
    Image.fromarray((MASK * 255).astype(np.uint8)).save(tmp_path / "mask.png")
    cli = [{"IMAGE": str(tmp_path / "image.png"), "MASK": str(tmp_path / "mask.png")}.get(a, a) for a in cli]
    out = tmp_path / "x.png"
    base = ["generate", PROMPT, "--model", str(folder), "--steps", "2", "--height", str(SIZE), "--width", str(SIZE),
            "-o", str(out), "--no-progress"]
    assert main(base + cli) == 2
    assert phrase in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("phrase, c, model", rows_for(3))
def test_c_api_refuses(c_model, phrase, c, model):
    kwargs = dict(dict(prompt=PROMPT, width=SIZE, height=SIZE, steps=2, sampler="euler"), **c)
    if kwargs.pop("init_image", None):
        kwargs["init_image"] = bytes(SIZE * SIZE * 3)
    calls = []
    with pytest.raises(ValueError) as info:
        c_model.generate(progress=lambda step, total: calls.append(step) or True, **kwargs)
    assert phrase in str(info.value)
    assert not calls


@pytest.mark.parametrize("kwargs, error, phrase", [
    (dict(path=5), ValueError, "path must be a file or folder path"),
    (dict(path="/no/such/model"), FileNotFoundError, "/no/such/model"),
    (dict(device="tpu"), ValueError, "device must be 'cpu', 'cuda' or 'cuda:N'"),
    (dict(device="cuda:0"), ValueError, "device='cuda' was requested"),
    (dict(dtype="fp8"), ValueError, "dtype must be one of"),
    (dict(dtype=torch.int8), ValueError, "dtype must be float32, float16 or bfloat16"),
    (dict(backend="tensorrt"), ValueError, "backend must be one of"),
    (dict(prediction_type="x0"), ValueError, "prediction_type must be 'epsilon', 'v_prediction' or None"),
])
def test_load_refuses(folder, kwargs, error, phrase):
    if kwargs.get("device", "").startswith("cuda") and torch.cuda.is_available():
        pytest.skip("CUDA is present")
    kwargs = dict(dict(path=folder, device="cpu"), **kwargs)
    with pytest.raises(error, match=phrase.replace("(", r"\(").replace(")", r"\)")):
        sdengine.load(kwargs.pop("path"), **kwargs)


def test_largest_seed_is_accepted(pipes):
    """2**64 - 1 is a seed (torch's and the C API's range)."""
    result = pipes["sd15"](PROMPT, height=SIZE, width=SIZE, steps=2, seed=2**64 - 1, progress=False,
                           output_type="latent")
    assert result.seeds == [2**64 - 1]
