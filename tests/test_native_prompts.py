"""The C runtime's prompt path and A1111's infotext against the Python pipeline: A1111 prompt syntax
(emphasis; prompts of several 75-token windows: test_native_families.py), textual-inversion tokens and ControlNets from
`backend="native"`, `sde_gen_params_from_infotext` against sdengine.infotext, and the C example
that redraws a PNG from its `parameters` chunk (examples/c/redraw.c)."""

from __future__ import annotations

import re

import numpy as np
import pytest

import sdengine
from sdengine.infotext import parse_infotext, request_arguments
from support.native import (PROMPT, SIZE, cache_dir, compile_c, eager, engine_dir, model_dir, native,  # noqa: F401
                            one_thread, run_program)
from support.tiny import save_tiny_pipeline, tiny_pipeline
from test_infotext import INFOTEXTS

_C = pytest.importorskip("sdengine._C")
ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def _same(native, eager, prompt, **options):  # noqa: F811
    args = {**dict(num_inference_steps=3, seed=5, height=SIZE, width=SIZE, output_type="np", progress=False,
                   negative_prompt="blurry, (ugly:1.2)"), **options}
    ours, ref = native(prompt, **args), eager(prompt, **args)
    diff = np.abs(ours.images * 255 - (ref.images * 255).round()).max()
    assert diff <= 2, f"{prompt!r}: max difference {diff}/255"
    return ours


@pytest.mark.parametrize("prompt", ["a (red:1.4) [square] on a ((blue)) field", "plain \\(text\\) and a: colon",
                                    "(unclosed emphasis on [everything", "a [[dim]] (cat:0.5), (dog:1.6)"])
def test_native_a1111_emphasis_matches_eager(native, eager, prompt):  # noqa: F811
    plain = _same(native, eager, prompt, prompt_syntax="a1111", sampler="euler")
    differs = _same(native, eager, prompt, prompt_syntax=None, sampler="euler")
    if "(" in prompt.replace("\\(", ""):
        assert np.abs(plain.images - differs.images).max() > 0, "emphasis changed nothing"


def test_native_sdxl_emphasis_matches_eager(tmp_path):
    folder = save_tiny_pipeline("sdxl", tmp_path / "sdxl")
    _same(sdengine.load(folder, backend="native"), sdengine.from_diffusers(tiny_pipeline("sdxl")),
          "a (red:1.3) [square]", prompt_syntax="a1111", sampler="Euler a")


def test_native_sdxl_textual_inversion_matches_eager(tmp_path):
    """An SDXL embedding (clip_l and clip_g vectors) loaded on backend="native": its vectors reach the
    added-token tables both compiled text encoders read, and the C++ tokenizers learn the token."""
    from safetensors.torch import save_file

    from support.lora_files import embedding_vectors

    native = sdengine.load(save_tiny_pipeline("sdxl", tmp_path / "sdxl"), backend="native")
    eager = sdengine.from_diffusers(tiny_pipeline("sdxl"))
    widths = [enc.text_model.embeddings.token_embedding.weight.shape[1]
              for enc in (native.backend.text_encoder, native.backend.text_encoder_2)]
    path = tmp_path / "tinycat.safetensors"
    save_file({"clip_l": embedding_vectors(widths[0], 2), "clip_g": embedding_vectors(widths[1], 2)}, str(path))
    run = dict(num_inference_steps=3, height=SIZE, width=SIZE, seed=3, sampler="euler", output_type="np",
               progress=False)
    before = native("a photo of tinycat", **run).images[0]
    native.load_embedding(path)
    eager.load_embedding(path)
    ours = native("a photo of tinycat", **run).images[0]
    assert np.abs((ours - eager("a photo of tinycat", **run).images[0]) * 255).max() <= 2
    assert np.abs((ours - before) * 255).max() > 10, "the token changed nothing"


def test_native_refuses_more_windows_than_its_unet_takes(native):  # noqa: F811
    """The engine's UNet takes contexts of 1 to export.aoti.MAX_WINDOWS windows (engine.json
    max_prompt_windows); a longer prompt is refused with the count, not cut."""
    from sdengine.export import aoti

    words = " ".join(["word"] * (75 * aoti.MAX_WINDOWS + 1))
    with pytest.raises(ValueError, match=f"needs {aoti.MAX_WINDOWS + 1} windows of 75 tokens .* takes at most "
                                         f"{aoti.MAX_WINDOWS}"):
        native(words, prompt_syntax="a1111", num_inference_steps=2, height=SIZE, width=SIZE, progress=False)
    assert native.backend.max_prompt_windows == aoti.MAX_WINDOWS


def test_native_controlnet_matches_eager(model_dir, tmp_path):  # noqa: F811
    """A ControlNet loaded from a file runs in the C++ loop (sde_controlnet_load) from Python."""
    from support.tiny import tiny_controlnet
    from test_controlnet import CONTROL_IMAGES

    tiny_controlnet("sd15", 0).save_pretrained(tmp_path / "cn", safe_serialization=True)
    native_pipe = sdengine.load(model_dir, backend="native")
    eager_pipe = sdengine.load(model_dir, backend="eager")
    for control in ([sdengine.Control(str(tmp_path / "cn"), CONTROL_IMAGES[0], scale=0.9, start=0.25, end=0.75)],
                    [sdengine.Control(str(tmp_path / "cn"), CONTROL_IMAGES[0], scale=1.1, guess_mode=True)]):
        _same(native_pipe, eager_pipe, PROMPT, control=control, sampler="dpmpp_2m", num_inference_steps=4)
    # a prompt of two 75-token windows: the ControlNet's compiled graph takes the (154-token) context too
    _same(native_pipe, eager_pipe, "a (red:1.2) square BREAK a blue field", control=control, sampler="euler",
          prompt_syntax="a1111")


# ---------------------------------------------------------------------------
# A1111's infotext in C
# ---------------------------------------------------------------------------

_TO_C = {"sampler", "schedule", "steps", "guidance_scale", "width", "height", "eta_noise_seed_delta",
         "subseed_strength", "eta", "strength", "conventions"}


@pytest.mark.parametrize("text,_", INFOTEXTS)
def test_cpp_infotext_reads_as_python(text, _):
    """sde_gen_params_from_infotext: the request sdengine.infotext.request_arguments makes, or an
    error where Python's is (and where the C runtime cannot honour a field: step caching)."""
    from sdengine.samplers import resolve_a1111
    from sdengine.config import SchedulerConfig

    try:
        args = request_arguments(parse_infotext(text))
    except sdengine.InvalidArgumentError:
        with pytest.raises(ValueError):
            _C.infotext_params(text)
        return
    if {"deepcache", "tgate", "tome"} & set(args):  # what the C runtime does not run
        with pytest.raises(ValueError, match="DeepCache|T-GATE|Token merging"):
            _C.infotext_params(text)
        return
    ours = _C.infotext_params(text)
    assert ours["prompt"] == args["prompt"] and (ours["negative_prompt"] or None) == args.get("negative_prompt")
    assert (ours["steps"], ours["guidance_scale"], ours["seed"]) == (args["steps"], args["guidance_scale"], args["seed"])
    assert (ours["width"], ours["height"]) == (args["width"], args["height"])
    sampler, schedule = resolve_a1111(args["sampler"], args["schedule"], SchedulerConfig())
    assert ours["sampler"] == sampler and ours["conventions"] == args["conventions"]
    if schedule is not None:
        assert ours["schedule"] == {"ddim": "ddim_uniform"}.get(schedule, schedule)
    assert ours["rng"] == {"gpu": "nv"}.get(args["rng"], args["rng"])
    assert ours["eta_noise_seed_delta"] == args.get("eta_noise_seed_delta", 0)
    assert ours["subseed_strength"] == args.get("subseed_strength", 0.0)
    if "subseed" in args:
        assert ours["subseed"] == args["subseed"]
    if "eta" in args:
        assert ours["eta"] == args["eta"]
    assert ours["seed_resize_from"] == (args.get("seed_resize_from_w", 0), args.get("seed_resize_from_h", 0))
    assert ours["prompt_syntax"] == ("a1111" if args.get("prompt_syntax") == "a1111" else "plain")
    assert ours["clip_skip"] == args.get("clip_skip", 0)


def test_cpp_infotext_refuses_unknown_fields_by_name():
    with pytest.raises(ValueError, match="'Hires upscale', 'Refiner'"):
        _C.infotext_params("x\nSteps: 4, Sampler: Euler, Seed: 1, Hires upscale: 2, Refiner: sdxl_refiner")
    with pytest.raises(ValueError, match="float16"):
        _C.infotext_params("x\nSteps: 4, Sampler: Euler, Seed: 1, Version: v1.6.0")
    assert _C.infotext_params("just a prompt, no fields")["prompt"] == "just a prompt, no fields"


def test_redraw_example_redraws_a_png(native, eager, model_dir, engine_dir, tmp_path):  # noqa: F811
    """examples/c/redraw.c: a PNG written by the Python pipeline (its `parameters` text) redrawn in C
    gives the same image, and writes that text into its own PNG. Its clip skip (A1111's "Clip skip:
    2", diffusers' 1, the tiny encoder's largest) is read and honoured in C."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    result = eager("a (red:1.2) square", sampler="Euler a", schedule="Karras", num_inference_steps=4, seed=21,
                   height=SIZE, width=24, guidance_scale=6.0, subseed=5, subseed_strength=0.3, rng="nv",
                   eta_noise_seed_delta=31337, prompt_syntax="a1111", clip_skip=1, progress=False)
    text = result.infotext(0)
    assert "Clip skip: 2" in text
    source = tmp_path / "in.png"
    info = PngInfo()
    info.add_text("parameters", text)
    result.images[0].save(source, pnginfo=info)
    exe = compile_c(ROOT / "examples" / "c" / "redraw.c", tmp_path / "sde_redraw")
    out = tmp_path / "out.png"
    code, output = run_program([exe, model_dir, source, out, "-e", engine_dir])
    assert code == 0, output
    redrawn = Image.open(out)
    assert redrawn.text["parameters"] == text
    diff = np.abs(np.asarray(redrawn, dtype=int) - np.asarray(result.images[0], dtype=int)).max()
    assert diff <= 2, f"max difference {diff}/255"
    bad = tmp_path / "bad.png"
    info = PngInfo()
    info.add_text("parameters", text + ", Hires upscale: 2")
    result.images[0].save(bad, pnginfo=info)
    code, output = run_program([exe, model_dir, bad, out, "-e", engine_dir])
    assert code != 0 and re.search("Hires upscale", output), output
