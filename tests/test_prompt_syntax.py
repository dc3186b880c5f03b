"""A1111's prompt syntax: the emphasis parser against stable-diffusion-webui's documented behaviour
(the doctests of modules/prompt_parser.py and the wiki's rules), 75-token windows, emphasis on
the encoder output, <lora:> tags through the pipeline, and the PNG "Lora hashes" field."""

import copy
import hashlib

import numpy as np
import pytest
import torch

import sdengine
from sdengine import prompt_syntax
from sdengine.prompt_syntax import LoraTag, extract_lora_tags, parse_prompt_attention
from support.lora_files import kohya_lora
from support.tiny import tiny_pipeline

R, S = 1.1, 1 / 1.1  # (round) and [square] multipliers

PARSER_CASES = [
    # A1111's doctests
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", R), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", R)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", R)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.3 * R * R), (" ", R), ("on", 1.0), (" a ", R), ("hill", 0.55),
      (", sun, ", R), ("sky", R ** 4), (".", R)]),
    # the wiki's rules, one at a time
    ("[word]", [("word", S)]),
    ("((word))", [("word", R * R)]),
    ("[[word]]", [("word", S * S)]),
    ("(word:1.5)", [("word", 1.5)]),
    ("(word: 0.25 )", [("word", 0.25)]),
    ("(a (b:2) c)", [("a ", R), ("b", 2 * R), (" c", R)]),
    ("([mixed])", [("mixed", 1.0 * S * R)]),
    ("[unbalanced", [("unbalanced", S)]),
    ("((a)", [("a", R * R)]),  # one closed, one left open to the end
    ("a]b", [("a]b", 1.0)]),  # a closer with nothing open is text
    ("a)b", [("a)b", 1.0)]),
    ("a:b", [("a:b", 1.0)]),  # a colon outside (...:number) is text
    ("(a:b)", [("a:b", R)]),
    ("(x:1.0) y", [("x y", 1.0)]),  # equal weights merge
    ("(a:1.2) (b:1.2)", [("a", 1.2), (" ", 1.0), ("b", 1.2)]),
    ("a \\(b\\) \\[c\\]", [("a (b) [c]", 1.0)]),
    ("back\\\\slash", [("back\\slash", 1.0)]),
    ("a\\b", [("ab", 1.0)]),  # a lone backslash is dropped, as A1111 does
    ("a BREAK b", [("a", 1.0), ("BREAK", -1), ("b", 1.0)]),
    ("aBREAK b", [("aBREAK b", 1.0)]),  # BREAK only as a word
    ("(a BREAK b)", [("a", R), ("BREAK", -1), ("b", R)]),
    ("", [("", 1.0)]),
    ("(word:-1)", [("word", -1.0)]),
    ("[a:b:0.5]", [("a:b:0.5", S)]),  # prompt editing is not implemented: plain emphasis
]


@pytest.mark.parametrize("prompt,expected", PARSER_CASES, ids=[c[0] or "empty" for c in PARSER_CASES])
def test_parser_table(prompt, expected):
    got = parse_prompt_attention(prompt)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected], rel=1e-12)


def test_doctest_weights_are_exact():
    """The products are taken in A1111's order, so the floats are its floats."""
    got = dict(parse_prompt_attention("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky)))."))
    assert got["house"] == 1.5730000000000004 and got["sky"] == 1.4641000000000006


def test_lora_tags():
    assert extract_lora_tags("a <lora:foo:0.5> cat <lora:bar>") == ("a  cat ", [LoraTag("foo", 0.5), LoraTag("bar")])
    assert extract_lora_tags("<lora:x:0.3:0.9>")[1] == [LoraTag("x", scale=0.9, text_scale=0.3)]
    assert extract_lora_tags("no tags <hypernet:x:1>") == ("no tags <hypernet:x:1>", [])
    with pytest.raises(ValueError, match="numbers"):
        extract_lora_tags("<lora:x:strong>")


# ---------------------------------------------------------------------------
# Windows and emphasis
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sd15():
    return sdengine.from_diffusers(tiny_pipeline("sd15"))


def test_200_token_prompt_gives_three_windows(sd15):
    prompt = " ".join(["red"] * 120 + ["house"] * 80)
    assert len(sd15.tokenizer.tokens(prompt)) == 200
    context, pooled = sd15._encode_prompts([prompt], None, "a1111")
    assert tuple(context.shape) == (1, 231, 32) and tuple(pooled.shape) == (1, 32)
    chunks = prompt_syntax.chunk_prompt(sd15.tokenizer, prompt)
    assert [sum(1 for i in c.ids[1:] if i != sd15.tokenizer.eos_token_id) for c in chunks] == [75, 75, 50]
    # each window is encoded on its own: the second equals encoding its 75 tokens alone
    ids = torch.tensor([chunks[1].ids])
    alone, _ = sd15.backend.encode_text(ids)
    torch.testing.assert_close(context[:, 77:154], alone.float())
    # without the syntax: truncated to one window, with a warning
    with pytest.warns(UserWarning, match="dropped"):
        assert sd15._encode_prompts([prompt], None)[0].shape == (1, 77, 32)


def test_comma_backtrack_break_and_whole_embeddings(sd15):
    tok = sd15.tokenizer
    words = " ".join(["red"] * 70) + ", " + " ".join(["blue"] * 10)  # the window would end 4 tokens after the comma
    first, second = prompt_syntax.chunk_prompt(tok, words)
    red, blue, comma = tok.tokens("red")[0], tok.tokens("blue")[0], tok.tokens(",")[0]
    assert first.ids[1:73] == [red] * 70 + [comma] + [tok.eos_token_id]  # the window ends at the comma
    assert second.ids[1:11] == [blue] * 10
    assert len(prompt_syntax.chunk_prompt(tok, "a BREAK b")) == 2
    with_token = copy.copy(sd15)
    with_token.tokenizer = tok.with_token("<emb>", [49408, 49409, 49410])
    chunks = prompt_syntax.chunk_prompt(with_token.tokenizer, " ".join(["red"] * 73) + " <emb>")
    assert 49408 not in chunks[0].ids and chunks[1].ids[1:4] == [49408, 49409, 49410]  # not split


def test_emphasis_scales_token_rows_and_keeps_each_windows_mean(sd15):
    tok = sd15.tokenizer
    context, _ = sd15._encode_prompts(["a (cat:1.5) on a [mat]"], None, "a1111")
    ids = torch.tensor([prompt_syntax.chunk_prompt(tok, "a cat on a mat")[0].ids])
    plain, _ = sd15.backend.encode_text(ids)
    plain = plain.float()
    weights = torch.ones(77)
    weights[2], weights[5] = 1.5, 1 / 1.1  # BOS, a, cat, on, a, mat
    expected = plain * weights[None, :, None]
    expected = expected * (plain.mean() / expected.mean())
    torch.testing.assert_close(context, expected)
    assert float((context - plain).abs().max()) > 1e-3


def test_sdxl_windows_and_pooled_from_the_first():
    pipe = sdengine.from_diffusers(tiny_pipeline("sdxl"))
    prompt = " ".join(["red"] * 100)
    context, pooled = pipe._encode_prompts([prompt], None, "a1111")
    assert tuple(context.shape) == (1, 154, 64)
    first = torch.tensor([prompt_syntax.chunk_prompt(pipe.tokenizer, prompt)[0].ids])
    first_2 = torch.tensor([prompt_syntax.chunk_prompt(pipe.tokenizer_2, prompt)[0].ids])
    _, expected_pooled = pipe.backend.encode_text(first, first_2)
    torch.testing.assert_close(pooled, expected_pooled.float())


def test_prompt_and_negative_get_the_same_number_of_windows(sd15):
    long = " ".join(["red"] * 100)
    result = sd15(long, negative_prompt="blurry", prompt_syntax="a1111", steps=2, height=16, width=16, seed=1,
                  output_type="latent", progress=False)
    assert result.images.shape == (1, 4, 8, 8)
    with pytest.raises(ValueError, match="prompt_syntax"):
        sd15("x", prompt_syntax="comfy", steps=1)


# ---------------------------------------------------------------------------
# <lora:> tags through the pipeline, and the infotext
# ---------------------------------------------------------------------------

def test_lora_tags_in_prompts_apply_and_record_hashes(tmp_path):
    folder = tmp_path / "loras" / "styles"
    folder.mkdir(parents=True)
    path = kohya_lora(tiny_pipeline("sd15"), folder / "watercolor.safetensors", rank=4, alpha=2.0)
    pipe = sdengine.from_diffusers(copy.deepcopy(tiny_pipeline("sd15")))
    before = {k: v.clone() for k, v in pipe.backend.unet.state_dict().items()}
    run = dict(steps=3, height=16, width=16, seed=5, output_type="np", progress=False)
    tagged = pipe("a lighthouse <lora:watercolor:0.7>", prompt_syntax="a1111", lora_dir=tmp_path / "loras", **run)
    assert not any(torch.equal(before[k], v) for k, v in pipe.backend.unet.state_dict().items()
                   if "attn1.to_q" in k)
    reference = sdengine.from_diffusers(copy.deepcopy(tiny_pipeline("sd15")))
    reference.set_loras([(path, 0.7)])
    assert np.array_equal(tagged.images, reference("a lighthouse ", **run).images)

    header = int.from_bytes(path.read_bytes()[:8], "little")
    digest = hashlib.sha256(path.read_bytes()[8 + header:]).hexdigest()[:12]
    assert tagged.params["loras"] == [dict(name="watercolor", path=str(path), scale=0.7, hash=digest)]
    info = tagged.infotext()
    assert info.splitlines()[0] == "a lighthouse <lora:watercolor:0.7>"  # the prompt as written
    assert f'Lora hashes: "watercolor: {digest}"' in info

    untagged = pipe("a lighthouse", prompt_syntax="a1111", **run)  # no tag: the base weights again
    assert all(torch.equal(before[k], v) for k, v in pipe.backend.unet.state_dict().items())
    assert "Lora hashes" not in untagged.infotext()
    with pytest.raises(ValueError, match="available in .*: watercolor"):
        pipe("x <lora:oils:1>", prompt_syntax="a1111", lora_dir=tmp_path / "loras", **run)
    with pytest.raises(ValueError, match="lora_dir"):
        pipe("x <lora:watercolor:1>", prompt_syntax="a1111", **run)
    plain = pipe("x <lora:watercolor:1>", **run)  # without the syntax a tag is text
    assert "loras" in plain.params and plain.params["loras"] == []
