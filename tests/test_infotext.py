"""A1111's infotext round trip: Request.from_infotext, GenerationResult.infotext, generate --from-png.

Twenty infotexts written in A1111's format (modules/processing.py create_infotext) cover variation
seeds, ENSD, clip skip, LoRA tags, seed resizing, the RNG sources and every schedule label; each
parses to the request it describes and regenerates on the demo model, and the infotext sdengine
writes for that image reads back into the same pixels. Unknown fields are refused by name.

Budget: about 30 s on 2 busy cores (the demo model, 32x32, 4-6 steps).
"""

import numpy as np
import pytest
from PIL import Image

import sdengine
from sdengine.infotext import parse_infotext, request_arguments

SCHEDULES = ("Automatic", "Uniform", "Karras", "Exponential", "Polyexponential", "SGM Uniform", "KL Optimal",
             "Align Your Steps", "Simple", "Normal", "DDIM", "Beta")

INFOTEXTS = [
    # (infotext, what the request must hold)
    ("a handwritten digit seven\nNegative prompt: blurry, low quality\nSteps: 5, Sampler: DPM++ 2M, Schedule type: "
     "Karras, CFG scale: 7, Seed: 1234, Size: 32x32, Model hash: 6ce0161689, Model: demo, RNG: CPU, Version: v1.10.1",
     dict(steps=5, sampler="DPM++ 2M", schedule="Karras", guidance_scale=7.0, seeds=(1234,), rng="cpu")),
    ("a digit two\nSteps: 4, Sampler: Euler a, Schedule type: Automatic, CFG scale: 6.5, Seed: 9, Size: 32x32, "
     "ENSD: 31337, RNG: CPU", dict(sampler="Euler a", schedule=None, eta_noise_seed_delta=31337)),
    ("a digit three\nSteps: 4, Sampler: Euler, CFG scale: 5, Seed: 3, Size: 32x32, Clip skip: 2, RNG: NV",
     dict(clip_skip=1, rng="nv")),
    ("digit four, (bold:1.3)\nSteps: 4, Sampler: DPM++ SDE, Schedule type: Karras, CFG scale: 7, Seed: 44, "
     "Size: 32x32, Variation seed: 77, Variation seed strength: 0.25, RNG: CPU",
     dict(subseeds=(77,), subseed_strength=0.25, seeds=(44,))),
    ("digit five\nSteps: 4, Sampler: DPM++ 2M SDE, Schedule type: Exponential, CFG scale: 7, Seed: 5, "
     "Size: 32x32, Seed resize from: 24x16, RNG: CPU", dict(seed_resize_from=(24, 16))),
    ("digit six\nSteps: 6, Sampler: DPM2, Schedule type: Karras, CFG scale: 4, Seed: 6, Size: 32x32, RNG: CPU",
     dict(sampler="DPM2")),
    ("digit eight\nSteps: 4, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 8, Size: 32x32, RNG: CPU",
     dict(sampler="DPM++ 2M", schedule="Karras")),                       # A1111 before 1.9: schedule in the label
    ("digit nine\nSteps: 4, Sampler: DPM++ 2M, CFG scale: 7, Seed: 9, Size: 32x32, RNG: CPU, Version: v1.8.0",
     dict(schedule="Uniform")),                                          # before 1.9 no label meant the model's sigmas
    ("digit zero\nSteps: 4, Sampler: Euler a, CFG scale: 7, Seed: 10, Size: 32x32, Eta: 0.5, RNG: CPU",
     dict(eta=0.5)),
    ("digit one <lora:strokes:0.7>\nSteps: 4, Sampler: Heun, CFG scale: 7, Seed: 11, Size: 32x32, RNG: CPU, "
     'Lora hashes: "strokes: 0123abcd4567"', dict(prompt_syntax="a1111")),
] + [
    (f"digit {i}\nSteps: 4, Sampler: {sampler}, Schedule type: {schedule}, CFG scale: 7, Seed: {100 + i}, "
     f"Size: 32x32, RNG: CPU", dict(schedule=None if schedule == "Automatic" else schedule))
    for i, (sampler, schedule) in enumerate(zip(
        ["LMS", "DPM++ 2S a", "DPM++ 3M SDE", "DPM2 a", "DPM++ 2M SDE Heun", "Euler", "Heun", "DPM++ 2M", "Euler a",
         "LMS"], ("Uniform", "Polyexponential", "SGM Uniform", "KL Optimal", "Align Your Steps", "Simple", "Normal", "DDIM",
                  "Beta", "Exponential")))
]
assert len(INFOTEXTS) == 20
assert {s for text, _ in INFOTEXTS for s in SCHEDULES if f"Schedule type: {s}," in text} == set(SCHEDULES)


@pytest.fixture(scope="module")
def demo():
    return sdengine.load(None)


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


@pytest.mark.parametrize("text,expected", INFOTEXTS, ids=[f"infotext{i}" for i in range(len(INFOTEXTS))])
def test_infotext_parses_and_regenerates(demo, text, expected):
    request = sdengine.Request.from_infotext(text, progress=False)
    for key, value in expected.items():
        assert getattr(request, key) == value, key
    assert request.conventions == "a1111" and request.prompt_syntax == "a1111"
    if "<lora:" in text:  # its LoRA file is not there: refused, naming it
        with pytest.raises((ValueError, FileNotFoundError), match="strokes"):
            demo.run(request.for_model(demo.config))
        return
    result = demo.run(request.for_model(demo.config))
    assert pixels(result.images[0]).std() > 1
    again = demo.run(sdengine.Request.from_infotext(result.infotext(0), progress=False).for_model(demo.config))
    assert np.array_equal(pixels(again.images[0]), pixels(result.images[0]))
    assert again.infotext(0) == result.infotext(0)


def test_written_infotext_describes_the_run(demo):
    result = demo("a digit", steps=4, seed=5, sampler="DPM++ 2M SDE", subseed=9, subseed_strength=0.5,
                  eta_noise_seed_delta=7, rng="nv", clip_skip=1, progress=False)
    fields = parse_infotext(result.infotext(0)).fields
    assert fields["Sampler"] == "DPM++ 2M SDE" and fields["Schedule type"] == "Exponential"
    assert fields["Variation seed"] == "9" and fields["Variation seed strength"] == "0.5"
    assert fields["ENSD"] == "7" and fields["RNG"] == "NV" and fields["Clip skip"] == "2"
    assert "Sampler conventions" not in fields
    diffusers_run = demo("a digit", steps=4, seed=5, sampler="dpmpp_2m_sde", progress=False)
    fields = parse_infotext(diffusers_run.infotext(0)).fields
    assert fields["Sampler conventions"] == "diffusers"  # A1111 would draw another image
    again = demo.run(sdengine.Request.from_infotext(diffusers_run.infotext(0), progress=False).for_model(demo.config))
    assert np.array_equal(pixels(again.images[0]), pixels(diffusers_run.images[0]))


@pytest.mark.parametrize("fields,named", [
    ("Hires upscale: 2, Hires checkpoint: other.safetensors", "'Hires checkpoint'"),  # the hires fix itself is read
    ("Face restoration: CodeFormer", "'Face restoration'"),
    ("Tiling: True", "'Tiling'"),
    ("Token merging ratio hr: 0.5", "'Token merging ratio hr'"),  # "Token merging ratio" is honoured (ToMe)
    ("Beta schedule alpha: 0.7", "'Beta schedule alpha'"),
])
def test_fields_sdengine_cannot_honour_are_refused_by_name(fields, named):
    with pytest.raises(sdengine.InvalidArgumentError, match=named) as e:
        sdengine.Request.from_infotext(f"x\nSteps: 4, Sampler: Euler, Seed: 1, Size: 32x32, {fields}")
    assert e.value.parameter == "infotext"


def test_defaults_are_a1111s():
    args = request_arguments(parse_infotext("a prompt\nSteps: 4, Sampler: Euler, Seed: 1"))
    assert args["rng"] == "gpu"  # no RNG field: A1111's default, CUDA's generator
    assert "clip_skip" not in args and args["schedule"] is None and args["conventions"] == "a1111"
    assert parse_infotext("just a prompt, with commas").prompt == "just a prompt, with commas"


def test_gpu_rng_on_a_cpu_names_nv(demo):
    request = sdengine.Request.from_infotext("x\nSteps: 4, Sampler: Euler, Seed: 1, Size: 32x32", progress=False)
    with pytest.raises(sdengine.InvalidArgumentError, match="rng='nv'"):
        demo.run(request.for_model(demo.config))
    nv = sdengine.Request.from_infotext("x\nSteps: 4, Sampler: Euler, Seed: 1, Size: 32x32", rng="nv", progress=False)
    assert "RNG: NV" in demo.run(nv.for_model(demo.config)).infotext(0)


def test_old_float16_alphas_are_refused():
    with pytest.raises(sdengine.InvalidArgumentError, match="Downcast alphas_cumprod"):
        sdengine.Request.from_infotext("x\nSteps: 4, Sampler: Euler, Seed: 1, Version: v1.6.0")


def test_denoising_strength_needs_the_init_image():
    with pytest.raises(sdengine.InvalidArgumentError, match="init_image"):
        sdengine.Request.from_infotext("x\nSteps: 4, Sampler: Euler, Seed: 1, Denoising strength: 0.6")


def test_generate_from_png(tmp_path, capsys):
    from sdengine import cli

    first = tmp_path / "first.png"
    assert cli.main(["generate", "a digit four", "--steps", "4", "--seed", "12", "--sampler", "Euler a",
                     "--ensd", "5", "--no-progress", "-o", str(first)]) == 0
    again = tmp_path / "again.png"
    assert cli.main(["generate", "--from-png", str(first), "--no-progress", "-o", str(again)]) == 0
    assert np.array_equal(pixels(Image.open(again)), pixels(Image.open(first)))
    assert Image.open(again).text["parameters"] == Image.open(first).text["parameters"]
    assert cli.main(["generate", "another prompt", "--seed", "3", "--from-png", str(first), "-o", str(again)]) == 2
    assert "drop the prompt, --seed" in capsys.readouterr().err
