"""CLIP tokenizer: identical ids to transformers' CLIPTokenizer built from the same files.

Two references:
  * transformers' `CLIPTokenizer` (what diffusers' pipelines call), from the same
    vocab.json / merges.txt, for SD1's pad token (<|endoftext|>) and SD2's ("!", id 0);
  * an independent pure-Python port of OpenAI's BPE loop (simple_tokenizer.py), written
    here without the `tokenizers` library, so the test does not only compare one
    library configuration with itself.
The corpus lives in tests/data/tokenizer_corpus.txt, shared with the C++ tokenizer tests.
Budget: about 10 s.
"""

import json
import unicodedata
import warnings
from pathlib import Path

import pytest
import regex
import torch

from sdengine.tokenizer import (BOS_TOKEN, EOS_TOKEN, CLIPTokenizer, byte_to_unicode, clip_vocab_and_merges,
                                save_vocab_files)

CORPUS_PATH = Path(__file__).parent / "data" / "tokenizer_corpus.txt"
_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", "\\": "\\"}


def read_corpus(path=CORPUS_PATH) -> list[str]:
    """The prompts of the corpus file (see its header for the format)."""
    prompts = []
    for line in Path(path).read_text(encoding="utf-8").split("\n"):
        if not line or line.startswith("#"):
            continue
        if line == "<empty>":
            prompts.append("")
            continue
        out, i = [], 0
        while i < len(line):
            if line[i] == "\\" and i + 1 < len(line) and line[i + 1] in _ESCAPES:
                out.append(_ESCAPES[line[i + 1]])
                i += 2
            else:
                out.append(line[i])
                i += 1
        prompts.append("".join(out))
    return prompts


CORPUS = read_corpus()


def write_tokenizer_folder(folder: Path, pad_token: str) -> Path:
    """A Hugging Face tokenizer folder as diffusers saves it (SD1: pad <|endoftext|>, SD2: "!")."""
    save_vocab_files(folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "pad_token": pad_token,
        "bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN}))
    (folder / "special_tokens_map.json").write_text(json.dumps({
        "pad_token": {"content": pad_token, "lstrip": False, "rstrip": False, "normalized": False},
        "bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN}))
    return folder


@pytest.fixture(scope="module", params=["<|endoftext|>", "!"], ids=["sd1-pad-eos", "sd2-pad-bang"])
def tokenizer_pair(request, tmp_path_factory):
    from transformers import CLIPTokenizer as HFCLIPTokenizer

    folder = write_tokenizer_folder(tmp_path_factory.mktemp("tokenizer"), request.param)
    return CLIPTokenizer.from_folder(folder), HFCLIPTokenizer.from_pretrained(folder), request.param


# ---------------------------------------------------------------------------
# Independent reference: OpenAI's BPE loop in plain Python
# ---------------------------------------------------------------------------

_PATTERN = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""")


def _bpe(word: str, ranks: dict) -> list[str]:
    symbols = list(word[:-1]) + [word[-1] + "</w>"]
    while len(symbols) > 1:
        pairs = [(ranks.get((a, b), float("inf")), i) for i, (a, b) in enumerate(zip(symbols, symbols[1:]))]
        rank, _ = min(pairs)
        if rank == float("inf"):
            break
        first, second = next((symbols[i], symbols[i + 1]) for r, i in pairs if r == rank)
        merged, i = [], 0
        while i < len(symbols):  # merge every occurrence of the best pair, left to right
            if i + 1 < len(symbols) and symbols[i] == first and symbols[i + 1] == second:
                merged.append(first + second)
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


def reference_tokens(prompt: str, pad_token: str = EOS_TOKEN) -> list[int]:
    """Special tokens (BOS, EOS and the pad token, as in transformers) are matched in the
    raw prompt; each text between them is normalised, split and BPE-encoded."""
    vocab, merges = clip_vocab_and_merges()
    specials = sorted({BOS_TOKEN, EOS_TOKEN, pad_token}, key=len, reverse=True)
    split_specials = regex.compile("(" + "|".join(regex.escape(s) for s in specials) + ")")
    ranks = {pair: i for i, pair in enumerate(merges)}
    to_unicode = byte_to_unicode()
    ids = []
    for segment in split_specials.split(prompt):
        if segment in specials:
            ids.append(vocab[segment])
            continue
        text = regex.sub(r"\s+", " ", unicodedata.normalize("NFC", segment))
        # Lowercase character by character, as the tokenizers library does: no Greek
        # final-sigma rule (str.lower() would turn the last "Σ" of a word into "ς").
        text = "".join(c.lower() for c in text)
        for piece in _PATTERN.findall(text):
            word = "".join(to_unicode[b] for b in piece.encode("utf-8"))
            ids.extend(vocab[s] for s in _bpe(word, ranks))
    return ids


# ---------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------

def test_corpus_is_varied():
    assert len(CORPUS) >= 60 and "" in CORPUS
    assert any(len(p.split()) > 100 for p in CORPUS)
    assert any(ord(c) > 0x3000 for p in CORPUS for c in p)  # CJK
    assert any(ord(c) > 0x1F000 for p in CORPUS for c in p)  # emoji
    assert any("\n" in p or "\t" in p for p in CORPUS)


def test_matches_transformers_padded(tokenizer_pair):
    ours, hf, pad_token = tokenizer_pair
    assert ours.pad_token == pad_token and ours.pad_token_id == hf.pad_token_id
    expected = hf(CORPUS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        got = ours(CORPUS)
    assert got.dtype == torch.long and got.shape == (len(CORPUS), 77)
    for prompt, row_got, row_expected in zip(CORPUS, got, expected):
        assert row_got.tolist() == row_expected.tolist(), f"prompt {prompt!r}"


def test_matches_transformers_unpadded(tokenizer_pair):
    ours, hf, _ = tokenizer_pair
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers warns about sequences over 77 tokens
        expected = hf(CORPUS).input_ids
    for prompt, row_expected in zip(CORPUS, expected):
        assert ours.encode(prompt) == row_expected, f"prompt {prompt!r}"


@pytest.mark.parametrize("pad_token", ["<|endoftext|>", "!"])
def test_matches_plain_python_bpe(pad_token):
    tok = CLIPTokenizer.default(pad_token=pad_token)
    for prompt in CORPUS:
        assert tok.tokens(prompt) == reference_tokens(prompt, pad_token), f"prompt {prompt!r}"


def test_pad_conventions():
    assert CLIPTokenizer.default().pad_token_id == 49407
    assert CLIPTokenizer.default(pad_token="!").pad_token_id == 0
    ids = CLIPTokenizer.default(pad_token="!")(["a cat", ""])
    assert ids[0, :4].tolist() == [49406, 320, 2368, 49407] and (ids[0, 4:] == 0).all()
    assert ids[1, :2].tolist() == [49406, 49407] and (ids[1, 2:] == 0).all()


def test_long_prompt_truncated_with_warning():
    tok = CLIPTokenizer.default()
    prompt = " ".join(["word"] * 80)
    with pytest.warns(UserWarning, match=r"last 5 tokens were dropped"):
        ids = tok(prompt)
    assert ids.shape == (1, 77)
    assert ids[0, 0] == tok.bos_token_id and ids[0, 76] == tok.eos_token_id
    assert ids[0, 1:76].tolist() == tok.tokens(prompt)[:75]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 75 tokens fit exactly: no warning
        tok(" ".join(["word"] * 75))


def test_default_equals_saved_files(tmp_path):
    save_vocab_files(tmp_path)
    from_files, default = CLIPTokenizer.from_folder(tmp_path), CLIPTokenizer.default()
    assert from_files.vocab_size == default.vocab_size == 49408
    assert torch.equal(from_files(CORPUS[:20]), default(CORPUS[:20]))
    assert default.decode(default.encode("a photo of a cat")) == "a photo of a cat"


def test_string_and_list_inputs():
    tok = CLIPTokenizer.default()
    assert torch.equal(tok("a cat"), tok(["a cat"]))
    with pytest.raises(TypeError, match="prompts"):
        tok(["a cat", 3])
    with pytest.raises(TypeError, match="prompt"):
        tok.encode(None)


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        CLIPTokenizer.from_folder(tmp_path / "nowhere")
    save_vocab_files(tmp_path)
    (tmp_path / "merges.txt").unlink()
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        CLIPTokenizer.from_folder(tmp_path)
    save_vocab_files(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<pad-not-in-vocab>"}))
    with pytest.raises(ValueError, match="pad-not-in-vocab"):
        CLIPTokenizer.from_folder(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        CLIPTokenizer.from_folder(tmp_path)


def test_reads_tokenizer_json_as_transformers_saves_it(tokenizer_pair, tmp_path):
    """transformers 5 saves tokenizer.json without vocab.json / merges.txt."""
    _, hf, pad_token = tokenizer_pair
    hf.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file() and not (tmp_path / "vocab.json").exists()
    ours = CLIPTokenizer.from_folder(tmp_path)
    assert ours.pad_token == pad_token
    expected = hf(CORPUS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        assert torch.equal(ours(CORPUS), expected)
