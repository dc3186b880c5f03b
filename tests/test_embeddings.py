"""Textual inversion: A1111 .pt / .safetensors, diffusers learned_embeds and SDXL clip_l / clip_g
embeddings against diffusers' load_textual_inversion on the same tiny random weights, and bad
input that changes nothing."""

import copy

import pytest
import torch
from safetensors.torch import save_file

import sdengine
from sdengine.errors import ModelLoadError
from support.compare import max_diff
from support.lora_files import embedding_vectors
from support.tiny import tiny_pipeline

TOL = 1 / 255
H = W = 32


def _run(pipe, prompt, ours=True):
    latents = torch.randn(1, 4, H // 2, W // 2, generator=torch.Generator().manual_seed(3))
    args = dict(height=H, width=W, latents=latents, output_type="np", guidance_scale=5.0)
    if ours:
        return pipe(prompt, steps=4, progress=False, **args).images
    return pipe(prompt, num_inference_steps=4, **args).images


def _write_sd1(kind: str, folder, vectors: torch.Tensor):
    """An SD1 embedding file of one of the formats; returns (path, token it names or None)."""
    if kind == "a1111_pt":
        path = folder / "tinycat.pt"
        torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": "tinycat",
                    "step": 500, "sd_checkpoint": "abc", "sd_checkpoint_name": "tiny"}, path)
        return path, "tinycat"
    if kind == "a1111_safetensors":
        path = folder / "tinycat.safetensors"
        save_file({"emb_params": vectors}, str(path))
        return path, "tinycat"
    path = folder / "learned_embeds.bin"  # diffusers: {token: vector}
    torch.save({"<tiny-cat>": vectors[0]}, path)
    return path, "<tiny-cat>"


@pytest.mark.parametrize("kind", ["a1111_pt", "a1111_safetensors", "diffusers_bin"])
def test_sd1_embeddings_match_diffusers_load_textual_inversion(kind, tmp_path):
    vectors = embedding_vectors(32, 1 if kind == "diffusers_bin" else 3, seed=4)
    path, token = _write_sd1(kind, tmp_path, vectors)
    ours = sdengine.from_diffusers(copy.deepcopy(tiny_pipeline("sd15")))
    assert ours.load_embedding(path) == token  # the file's stem, or the key of a diffusers file
    ref = copy.deepcopy(tiny_pipeline("sd15"))
    ref.set_progress_bar_config(disable=True)
    ref.load_textual_inversion(str(path), token=token)
    prompt = f"a photo of {token} on a sofa"
    got = _run(ours, prompt)
    assert max_diff(got, _run(ref, prompt, ours=False)) <= TOL
    assert max_diff(got, _run(ours, "a photo of a cat on a sofa")) > 10 * TOL  # the vectors show
    count = vectors.shape[0]
    assert ours.tokenizer.tokens(f"x {token.upper()} y")[1:1 + count] == list(range(49408, 49408 + count))


@pytest.mark.slow
def test_sdxl_clip_l_clip_g_embedding_matches_diffusers(tmp_path):
    path = tmp_path / "tinystyle.safetensors"
    save_file({"clip_l": embedding_vectors(32, 2, seed=1), "clip_g": embedding_vectors(32, 2, seed=2)}, str(path))
    ours = sdengine.from_diffusers(copy.deepcopy(tiny_pipeline("sdxl")))
    assert ours.load_embedding(path, token="<tinystyle>") == "<tinystyle>"
    ref = copy.deepcopy(tiny_pipeline("sdxl"))
    ref.set_progress_bar_config(disable=True)
    from safetensors.torch import load_file

    state = load_file(str(path))
    ref.load_textual_inversion(state["clip_l"], token="<tinystyle>", text_encoder=ref.text_encoder,
                               tokenizer=ref.tokenizer)
    ref.load_textual_inversion(state["clip_g"], token="<tinystyle>", text_encoder=ref.text_encoder_2,
                               tokenizer=ref.tokenizer_2)
    prompt = "a castle in <tinystyle>"
    assert max_diff(_run(ours, prompt), _run(ref, prompt, ours=False)) <= TOL


def test_bad_embeddings_are_errors_and_change_nothing(tmp_path):
    import pickle

    pipe = sdengine.from_diffusers(copy.deepcopy(tiny_pipeline("sd15")))
    good, _ = _write_sd1("a1111_safetensors", tmp_path, embedding_vectors(32, 2))
    pipe.load_embedding(good, token="<good>")
    table = pipe.backend.text_encoder.text_model.embeddings.token_embedding.weight.detach().clone()
    tokenizer = pipe.tokenizer
    wide = tmp_path / "wide.safetensors"
    save_file({"emb_params": torch.randn(2, 48)}, str(wide))
    sdxl = tmp_path / "sdxl.safetensors"
    save_file({"clip_l": torch.randn(1, 32), "clip_g": torch.randn(1, 32)}, str(sdxl))
    unknown = tmp_path / "unknown.safetensors"
    save_file({"a": torch.randn(2, 32), "b": torch.randn(2, 32)}, str(unknown))
    pickled = tmp_path / "pickled.pt"
    with open(pickled, "wb") as f:
        pickle.dump({"string_to_param": {"*": torch.randn(1, 32)}, "hook": print}, f)  # a callable: not weights-only
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-40])
    cases = [(wide, ModelLoadError, "width 48"), (sdxl, ModelLoadError, "SDXL embedding"),
             (unknown, ModelLoadError, "keys"), (pickled, ModelLoadError, "weights_only"),
             (truncated, ModelLoadError, "truncated")]
    for path, error, message in cases:
        with pytest.raises(error, match=message) as raised:
            pipe.load_embedding(path, token="<new>")
        assert str(path) in str(raised.value)
    for token in ("cat", "<good>", "<GOOD>", "photo"):  # a vocabulary word, an added token (any case)
        with pytest.raises(ValueError, match="already exists"):
            pipe.load_embedding(good, token=token)
    with pytest.raises(FileNotFoundError):
        pipe.load_embedding(tmp_path / "missing.pt")
    assert torch.equal(pipe.backend.text_encoder.text_model.embeddings.token_embedding.weight, table)
    assert pipe.tokenizer is tokenizer
    sd1_on_sdxl = sdengine.from_diffusers(copy.deepcopy(tiny_pipeline("sdxl")))
    with pytest.raises(ModelLoadError, match="SDXL model"):
        sd1_on_sdxl.load_embedding(good, token="<x>")


def test_embedding_tokens_do_not_touch_the_shared_tokenizer(tmp_path):
    from sdengine.tokenizer import CLIPTokenizer

    pipe = sdengine.load(None, device="cpu")  # the demo model: the bundled (shared) tokenizer
    path, _ = _write_sd1("a1111_pt", tmp_path, embedding_vectors(pipe.config.text_encoder.hidden_size, 2))
    pipe.load_embedding(path)
    assert pipe.tokenizer.tokens("tinycat")[:2] == [49408, 49409]
    assert CLIPTokenizer.default().tokens("tinycat") != [49408, 49409]
    assert pipe("a handwritten digit tinycat", steps=2, seed=0, output_type="np", progress=False).images.shape[0] == 1
