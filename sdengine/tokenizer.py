"""CLIP BPE tokenizer.

The vocabulary is OpenAI CLIP's byte-level BPE (Radford et al. 2021), shipped as
`data/bpe_simple_vocab_16e6.txt.gz` (the MIT-licensed file of open_clip). From it we
derive the `vocab.json` / `merges.txt` pair that Hugging Face tokenizers read.
"""

from __future__ import annotations

import gzip
import json
from functools import lru_cache
from pathlib import Path

DATA_DIR = Path(__file__).parent / "data"
BPE_FILE = DATA_DIR / "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2  # CLIP keeps the first 48,894 merges: 49,408 tokens in all
BOS_TOKEN, EOS_TOKEN = "<|startoftext|>", "<|endoftext|>"


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map of the 256 bytes onto printable unicode characters.

    Printable Latin-1 bytes map to themselves; the others are shifted past 255 so that
    no BPE symbol is whitespace or a control character.
    """
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    mapping, shifted = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + shifted)
            shifted += 1
    # Order: printable bytes first, in byte order, then the shifted ones (CLIP's id order).
    return {b: mapping[b] for b in printable} | {b: mapping[b] for b in range(256) if b not in printable}


@lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's token -> id table and its ordered merge list, built from the BPE file."""
    lines = gzip.open(BPE_FILE).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:NUM_MERGES + 1]]
    base = list(byte_to_unicode().values())
    tokens = base + [t + "</w>" for t in base] + ["".join(m) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    return {t: i for i, t in enumerate(tokens)}, merges


def save_vocab_files(folder) -> tuple[Path, Path]:
    """Write `vocab.json` and `merges.txt` (the Hugging Face CLIP format) into folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab_and_merges()
    vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
    vocab_path.write_text(json.dumps(vocab, ensure_ascii=False))
    merges_path.write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return vocab_path, merges_path
