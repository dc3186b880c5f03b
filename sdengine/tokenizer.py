"""CLIP BPE tokenizer.

The vocabulary is OpenAI CLIP's byte-level BPE (Radford et al. 2021), shipped as
`data/bpe_simple_vocab_16e6.txt.gz` (the MIT-licensed file of open_clip). From it we
derive the `vocab.json` / `merges.txt` pair that Hugging Face tokenizers read.
"""

from __future__ import annotations

import copy
import gzip
import json
import re
import warnings
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    import torch

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


# ---------------------------------------------------------------------------
# The tokenizer
# ---------------------------------------------------------------------------

CONTEXT_LENGTH = 77  # CLIP's text context: BOS + 75 tokens + EOS
# CLIP's pre-tokenisation (OpenAI simple_tokenizer.py): special tokens, English
# contractions, runs of letters, single digits, runs of other non-space characters.
CLIP_SPLIT_PATTERN = (r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"""
                      r"""[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""")


def _token_content(value) -> Optional[str]:
    """A special token as written in tokenizer_config.json: a string or {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _read_vocab_and_merges(vocab_path: Path, merges_path: Path) -> tuple[dict, list]:
    try:
        vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{vocab_path} is not a valid vocabulary file: {e}") from None
    merges = []
    for number, line in enumerate(merges_path.read_text(encoding="utf-8").split("\n"), 1):
        if not line or line.startswith("#version"):
            continue
        pair = line.split()
        if len(pair) != 2:
            raise ValueError(f"{merges_path}:{number}: expected two symbols, got {line!r}")
        merges.append(tuple(pair))
    return vocab, merges


def _read_tokenizer_json(path: Path) -> tuple[dict, list]:
    """Vocabulary and merges of a Hugging Face `tokenizer.json` holding a BPE model."""
    try:
        model = json.loads(path.read_text(encoding="utf-8"))["model"]
        if model.get("type") != "BPE":
            raise ValueError(f"{path}: expected a BPE tokenizer model, got {model.get('type')!r}")
        vocab = dict(model["vocab"])
        # Merges are "a b" strings in older files and [a, b] pairs in newer ones.
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a valid tokenizer file: {e!r}") from None
    for pair in merges:
        if len(pair) != 2:
            raise ValueError(f"{path}: merge {pair!r} is not a pair of symbols")
    return vocab, merges


class CLIPTokenizer:
    """CLIP's byte-level BPE tokenizer, built on the Hugging Face `tokenizers` library.

    The pipeline is that of transformers' `CLIPTokenizer` (which diffusers uses), so the
    ids are identical to it:
      1. normalise: NFC, every run of whitespace to one space, lowercase;
      2. split with `CLIP_SPLIT_PATTERN`, dropping whitespace, then map bytes to GPT-2's
         printable characters;
      3. BPE with the end-of-word suffix `</w>` on each word's last symbol.
    Unlike OpenAI's original tokenizer there is no ftfy / HTML unescaping ("&amp;" stays
    as written), again as in transformers. `<|startoftext|>`, `<|endoftext|>` and the pad
    token written in a prompt are read as those special tokens (so with SD2's pad token "!",
    "wow!!" is `wow</w>`, 0, 0: transformers' behaviour, which diffusers' SD2 pipelines see).

    Prompts longer than 75 tokens are truncated, not chunked: the first 75 tokens are kept
    between BOS and EOS and a `UserWarning` says how many were dropped. This is what
    diffusers' pipelines do; A1111's 75-token windows are `sdengine.prompt_syntax`.

    Added tokens (textual inversion, `with_token`) are found in a prompt before BPE, as
    case-insensitive substrings, and map to their ids (one per learned vector).
    """

    def __init__(self, vocab: dict, merges: list, pad_token: str = EOS_TOKEN,
                 max_length: int = CONTEXT_LENGTH):
        from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
        from tokenizers.models import BPE

        for name in (BOS_TOKEN, EOS_TOKEN, pad_token):
            if name not in vocab:
                raise ValueError(f"tokenizer vocabulary has no token {name!r}")
        if max_length < 2:
            raise ValueError(f"tokenizer max_length must be at least 2, got {max_length}")
        self.vocab_size = len(vocab)
        self.max_length = max_length
        self.bos_token_id = vocab[BOS_TOKEN]
        self.eos_token_id = vocab[EOS_TOKEN]
        self.pad_token = pad_token
        self.pad_token_id = vocab[pad_token]

        tok = Tokenizer(BPE(vocab=dict(vocab), merges=[tuple(m) for m in merges], dropout=None,
                            continuing_subword_prefix="", end_of_word_suffix="</w>",
                            fuse_unk=False, unk_token=EOS_TOKEN))
        tok.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            # invert=True: the pattern's matches are the pieces; what lies between is dropped.
            pre_tokenizers.Split(Regex(CLIP_SPLIT_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ])
        tok.decoder = decoders.ByteLevel()
        # Special tokens are matched in the raw prompt, before normalisation. As in
        # transformers, the pad token is one of them: with SD2's pad "!", every "!" in a
        # prompt becomes id 0 on its own rather than a BPE piece such as "!!!".
        tok.add_special_tokens(list(dict.fromkeys([BOS_TOKEN, EOS_TOKEN, pad_token])))
        self._tokenizer = tok
        self._vocab = vocab
        self.added_tokens: dict[str, tuple[int, ...]] = {}  # lowercased token -> ids
        self._added_pattern = None

    # Construction -------------------------------------------------------------

    @classmethod
    def from_folder(cls, folder) -> "CLIPTokenizer":
        """Read a Hugging Face CLIP tokenizer folder (a diffusers pipeline's `tokenizer/`).

        Reads `vocab.json` + `merges.txt` (the files of the Stable Diffusion repositories),
        or else the vocabulary and merges inside `tokenizer.json` (what transformers 5
        saves); the CLIP normalisation and splitting rules are always those above. The pad
        token comes from `tokenizer_config.json` or `special_tokens_map.json` when present:
        SD1 pads with `<|endoftext|>`, SD2 with "!" (id 0). `model_max_length` there, if
        any, sets the context length.
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"tokenizer folder not found: {folder}")
        vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
        if not vocab_path.is_file() and not merges_path.is_file() and (folder / "tokenizer.json").is_file():
            vocab, merges = _read_tokenizer_json(folder / "tokenizer.json")
        else:
            for path in (vocab_path, merges_path):
                if not path.is_file():
                    raise FileNotFoundError(f"tokenizer file missing: {path}")
            vocab, merges = _read_vocab_and_merges(vocab_path, merges_path)

        pad_token, max_length = EOS_TOKEN, CONTEXT_LENGTH
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins
            path = folder / name
            if not path.is_file():
                continue
            try:
                settings = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} is not valid JSON: {e}") from None
            pad_token = _token_content(settings.get("pad_token")) or pad_token
            length = settings.get("model_max_length")
            if isinstance(length, int) and 2 <= length <= 10_000:  # HF writes 1e30 for "none"
                max_length = length
        if pad_token not in vocab:
            raise ValueError(f"{folder}: pad token {pad_token!r} is not in the vocabulary")
        bundled_vocab, bundled_merges = clip_vocab_and_merges()
        if max_length == CONTEXT_LENGTH and merges == bundled_merges and vocab == bundled_vocab:
            return cls.default(pad_token)  # every SD tokenizer: skip rebuilding the BPE tables
        return cls(vocab, merges, pad_token=pad_token, max_length=max_length)

    @classmethod
    def default(cls, pad_token: str = EOS_TOKEN) -> "CLIPTokenizer":
        """The tokenizer of the bundled CLIP BPE file, for checkpoints that carry none.

        pad_token: `<|endoftext|>` for SD1 (CLIP ViT-L) and SDXL's first encoder; "!" for
        the OpenCLIP encoders (SD2, SDXL's second encoder). One shared instance per pad
        token (building the BPE tables takes a few tenths of a second; a tokenizer has
        no mutable state).
        """
        return _default_tokenizer(cls, pad_token)

    def save(self, folder) -> Path:
        """Write the tokenizer as a Hugging Face tokenizer folder that `from_folder`, transformers
        and libsdengine's C++ tokenizer read back identically: `vocab.json`, `merges.txt` and
        `tokenizer_config.json` (pad token, context length). Returns the folder."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        model = json.loads(self._tokenizer.to_str())["model"]
        merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
        (folder / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False), encoding="utf-8")
        (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        settings = {"pad_token": self.pad_token, "model_max_length": self.max_length,
                    "bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN}
        (folder / "tokenizer_config.json").write_text(json.dumps(settings, indent=1), encoding="utf-8")
        return folder

    # Added tokens (textual inversion) -------------------------------------------

    def has_token(self, token: str) -> bool:
        """Whether `token` already means something: a vocabulary entry (as a word or a word
        piece; prompts are lowercased) or an added token."""
        lower = token.lower()
        return lower in self.added_tokens or lower in self._vocab or lower + "</w>" in self._vocab

    def with_token(self, token: str, ids) -> "CLIPTokenizer":
        """A copy of this tokenizer that reads `token` in a prompt as `ids` (this one is unchanged:
        the default tokenizers are shared). ValueError if the token already means something."""
        if self.has_token(token):
            raise ValueError(f"token {token!r} already exists in the tokenizer; choose another token")
        new = copy.copy(self)
        new.added_tokens = {**self.added_tokens, token.lower(): tuple(int(i) for i in ids)}
        alternatives = sorted(new.added_tokens, key=len, reverse=True)  # longest match first
        new._added_pattern = re.compile("|".join(re.escape(t) for t in alternatives), re.IGNORECASE)
        return new

    # Encoding -----------------------------------------------------------------

    def pieces(self, prompt: str) -> list[tuple[int, ...]]:
        """One prompt as units that must stay together: each BPE token alone, each added token
        with all its ids. No BOS, EOS, truncation or padding."""
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
        if self._added_pattern is None:
            return [(i,) for i in self._tokenizer.encode(prompt, add_special_tokens=False).ids]
        units, start = [], 0
        for match in [*self._added_pattern.finditer(prompt), None]:
            end = match.start() if match is not None else len(prompt)
            if end > start:
                units += [(i,) for i in self._tokenizer.encode(prompt[start:end], add_special_tokens=False).ids]
            if match is not None:
                units.append(self.added_tokens[match.group(0).lower()])
                start = match.end()
        return units

    def tokens(self, prompt: str) -> list[int]:
        """The ids of one prompt (BPE, and added tokens), without BOS, EOS, truncation or padding."""
        return [i for unit in self.pieces(prompt) for i in unit]

    def encode(self, prompt: str) -> list[int]:
        """`[BOS, *tokens, EOS]` for one prompt: no truncation and no padding."""
        return [self.bos_token_id, *self.tokens(prompt), self.eos_token_id]

    def __call__(self, prompts) -> "torch.LongTensor":
        """Token ids of shape (B, max_length): BOS, tokens, EOS, then the pad token.

        prompts: a string or a list of strings. Longer prompts are truncated to
        max_length - 2 tokens with a warning naming how many tokens were dropped.
        """
        import torch

        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
            raise TypeError("prompts must be a string or a list of strings")
        room = self.max_length - 2
        ids = torch.full((len(prompts), self.max_length), self.pad_token_id, dtype=torch.long)
        if self._added_pattern is None:
            encoded = [e.ids for e in self._tokenizer.encode_batch(list(prompts), add_special_tokens=False)]
        else:
            encoded = [self.tokens(p) for p in prompts]
        for row, (prompt, tokens) in enumerate(zip(prompts, encoded)):
            if len(tokens) > room:
                warnings.warn(f"prompt {row} is {len(tokens)} tokens long; the last {len(tokens) - room} "
                              f"tokens were dropped (the limit is {room}): {prompt[:60]!r}...",
                              UserWarning, stacklevel=2)
                tokens = tokens[:room]
            ids[row, 0] = self.bos_token_id
            ids[row, 1:len(tokens) + 1] = torch.tensor(tokens, dtype=torch.long)
            ids[row, len(tokens) + 1] = self.eos_token_id
        return ids

    def decode(self, ids) -> str:
        """Text of a list of ids (special tokens and padding dropped), for messages and debugging."""
        ids = [int(i) for i in ids if int(i) not in (self.bos_token_id, self.eos_token_id)]
        text = self._tokenizer.decode(ids, skip_special_tokens=True)
        return text.replace("</w>", " ").strip()

    def __repr__(self) -> str:
        return (f"CLIPTokenizer(vocab_size={self.vocab_size}, max_length={self.max_length}, "
                f"pad_token={self.pad_token!r})")


@lru_cache(maxsize=4)
def _default_tokenizer(cls, pad_token: str) -> CLIPTokenizer:
    vocab, merges = clip_vocab_and_merges()
    return cls(vocab, merges, pad_token=pad_token)
