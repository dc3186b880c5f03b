"""The command line: generate writes PNGs with A1111 `parameters`; errors name their cause."""

import numpy as np
import pytest
from PIL import Image

from sdengine.cli import main
from support.tiny import save_tiny_pipeline


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny_pipeline("sd15", tmp_path_factory.mktemp("models") / "tiny-sd15")


def test_generate_writes_pngs_with_parameters(tiny_folder, tmp_path, capsys):
    out = tmp_path / "cat.png"
    code = main(["generate", "a cat on a sofa", "--model", str(tiny_folder), "-o", str(out), "--steps", "3",
                 "--height", "16", "--width", "24", "--seed", "5", "-b", "2", "--sampler", "Euler a",
                 "--negative-prompt", "dogs", "--no-progress"])
    assert code == 0
    first, second = tmp_path / "cat-1.png", tmp_path / "cat-2.png"
    assert first.exists() and second.exists() and not list(tmp_path.glob("*.part"))
    image = Image.open(first)
    assert image.size == (24, 16)
    params = image.text["parameters"]
    assert params.splitlines()[0] == "a cat on a sofa"
    assert "Negative prompt: dogs" in params
    assert "Seed: 5" in params and "Sampler: Euler a" in params and "Size: 24x16" in params
    assert "Seed: 6" in Image.open(second).text["parameters"]
    assert "seed 5" in capsys.readouterr().out


def test_generate_is_reproducible_from_the_seed(tiny_folder, tmp_path):
    args = ["generate", "a cat", "--model", str(tiny_folder), "--steps", "2", "--height", "16", "--width", "16",
            "--seed", "9", "--no-progress"]
    assert main(args + ["-o", str(tmp_path / "a.png")]) == 0
    assert main(args + ["-o", str(tmp_path / "b.png")]) == 0
    assert Image.open(tmp_path / "a.png").tobytes() == Image.open(tmp_path / "b.png").tobytes()


@pytest.mark.parametrize("extra, message", [
    (["--height", "30"], "height"),
    (["--steps", "0"], "num_inference_steps"),
    (["--sampler", "warp-drive"], "sampler"),
    (["-o", "out.jpg"], "--output"),
    (["--init-image", "/no/such/image.png"], "--init-image"),
])
def test_generate_errors_name_the_argument(tiny_folder, tmp_path, capsys, extra, message):
    args = ["generate", "a cat", "--model", str(tiny_folder), "--steps", "2", "--height", "16", "--width", "16",
            "-o", str(tmp_path / "x.png"), "--no-progress"]
    assert main(args + extra) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_generate_missing_model_is_a_clear_error(tmp_path, capsys):
    assert main(["generate", "a cat", "--model", str(tmp_path / "missing"), "-o", str(tmp_path / "x.png")]) == 2
    assert "missing" in capsys.readouterr().err


def test_info_prints_the_detected_architecture(tiny_folder, capsys):
    assert main(["info", str(tiny_folder)]) == 0
    out = capsys.readouterr().out
    assert "sd15" in out and "epsilon" in out


def test_generate_with_loras_embeddings_and_prompt_syntax(tiny_folder, tmp_path, capsys):
    import torch
    from safetensors.torch import save_file

    from support.lora_files import kohya_lora
    from support.tiny import tiny_pipeline

    loras = tmp_path / "loras"
    loras.mkdir()
    lora = kohya_lora(tiny_pipeline("sd15"), loras / "ink.safetensors", rank=4, alpha=2.0)
    embedding = tmp_path / "emb.safetensors"
    save_file({"emb_params": torch.randn(2, 32)}, str(embedding))
    base = ["generate", "--model", str(tiny_folder), "--steps", "2", "--height", "16", "--width", "16", "--seed", "3",
            "--no-progress"]

    def image(name, prompt, *extra):
        assert main(base[:1] + [prompt] + base[1:] + ["-o", str(tmp_path / name), *extra]) == 0
        return Image.open(tmp_path / name)

    tagged = image("tag.png", "a cat <lora:ink:0.8>", "--lora-dir", str(loras))
    flag = image("flag.png", "a cat ", "--lora", f"{lora}:0.8")
    plain = image("plain.png", "a cat ")
    assert tagged.tobytes() == flag.tobytes() != plain.tobytes()
    assert 'Lora hashes: "ink: ' in tagged.text["parameters"]
    assert image("emb.png", "a cat <emb>", "--embedding", f"{embedding}:<emb>").tobytes() != plain.tobytes()
    literal = image("literal.png", "a (cat:1.5)", "--prompt-syntax", "none")
    assert literal.tobytes() != image("weighted.png", "a (cat:1.5)").tobytes()
    assert main(base[:1] + ["a cat <lora:oil>"] + base[1:] + ["-o", str(tmp_path / "x.png"), "--lora-dir",
                                                            str(loras)]) == 2
    err = capsys.readouterr().err
    assert "unknown LoRA 'oil'" in err and "ink" in err
    assert main(base[:1] + ["a cat"] + base[1:] + ["-o", str(tmp_path / "y.png"), "--lora",
                                                   str(tmp_path / "none.safetensors:0.5")]) == 2
    assert "--lora" in capsys.readouterr().err


def test_generate_hires_fix_matches_the_python_api(tiny_folder, tmp_path):
    import numpy as np

    import sdengine

    out = tmp_path / "hires.png"
    assert main(["generate", "a cat", "--model", str(tiny_folder), "-o", str(out), "--steps", "3", "--height", "16",
                 "--width", "32", "--seed", "4", "--sampler", "euler", "--hires", "--hires-scale", "1.5",
                 "--hires-steps", "2", "--hires-denoising-strength", "0.6", "--hires-upscaler", "Latent (bicubic)",
                 "--no-progress"]) == 0
    image = Image.open(out)
    want = sdengine.load(tiny_folder, device="cpu", dtype="fp32")(
        "a cat", steps=3, height=16, width=32, seed=4, sampler="euler", progress=False, prompt_syntax="a1111",
        hires=sdengine.Hires(scale=1.5, steps=2, denoising_strength=0.6, upscaler="Latent (bicubic)")).images[0]
    assert image.size == (48, 24) and image.tobytes() == want.tobytes()
    assert "Hires upscale: 1.5, Hires steps: 2, Hires upscaler: Latent (bicubic)" in image.text["parameters"]
    assert np.asarray(image).std() > 0


def test_generate_with_a_refiner(tmp_path):
    base = save_tiny_pipeline("sdxl", tmp_path / "base")
    refiner = save_tiny_pipeline("sdxl-refiner", tmp_path / "refiner")
    out = tmp_path / "refined.png"
    args = ["generate", "a cat", "--model", str(base), "--steps", "4", "--height", "16", "--width", "16", "--seed", "2",
            "--sampler", "euler", "--no-progress"]
    assert main(args + ["-o", str(out), "--refiner", str(refiner), "--refiner-switch-at", "0.5"]) == 0
    assert main(args + ["-o", str(tmp_path / "plain.png")]) == 0
    assert "Refiner: refiner, Refiner switch at: 0.5" in Image.open(out).text["parameters"]
    assert Image.open(out).tobytes() != Image.open(tmp_path / "plain.png").tobytes()


@pytest.mark.parametrize("extra, message", [
    (["--hires-prompt", "a dog"], "--hires-prompt needs --hires"),
    (["--hires", "--hires-resize", "64"], "--hires-resize"),
    (["--hires", "--hires-denoising-strength", "0"], "hires.denoising_strength"),
    (["--refiner-switch-at", "0.5"], "refiner_switch_at"),
])
def test_generate_hires_and_refiner_errors_name_the_option(tiny_folder, tmp_path, capsys, extra, message):
    args = ["generate", "a cat", "--model", str(tiny_folder), "--steps", "2", "--height", "16", "--width", "16",
            "-o", str(tmp_path / "x.png"), "--no-progress"]
    assert main(args + extra) == 2
    assert message in capsys.readouterr().err


def test_generate_with_an_ip_adapter(tiny_folder, tmp_path):
    from support.ip_adapter_files import write_image_encoder, write_ip_adapter

    import sdengine

    encoder = write_image_encoder(tmp_path / "image_encoder")
    adapter = write_ip_adapter(tmp_path / "ip.safetensors", "sd15")
    prompt_image = tmp_path / "prompt.png"
    Image.fromarray((np.random.default_rng(0).random((77, 61, 3)) * 255).astype("uint8")).save(prompt_image)
    out = tmp_path / "ip.png"
    assert main(["generate", "a cat", "--model", str(tiny_folder), "-o", str(out), "--steps", "2", "--height", "16",
                 "--width", "16", "--seed", "3", "--no-progress", "--ip-adapter", f"{adapter}:{prompt_image}:0.7",
                 "--image-encoder", str(encoder)]) == 0
    pipe = sdengine.load(tiny_folder, device="cpu", dtype="fp32")
    pipe.load_ip_adapter(adapter, image_encoder=encoder)
    want = pipe("a cat", steps=2, height=16, width=16, seed=3, progress=False, prompt_syntax="a1111",
                ip_adapter_image=Image.open(prompt_image), ip_adapter_scale=0.7).images[0]
    assert Image.open(out).tobytes() == want.tobytes()
    assert "Module: ip-adapter_clip_sd15, Model: ip" in Image.open(out).text["parameters"]
