"""AUTOMATIC1111's prompt syntax: emphasis, `<lora:...>` tags and prompts of any length.

    pipe("a (castle:1.3) on a [hill], BREAK at dusk <lora:watercolor:0.7>", prompt_syntax="a1111",
         lora_dir="loras/")

What it means, as stable-diffusion-webui does it (modules/prompt_parser.py, sd_hijack_clip.py,
sd_emphasis.py "Original", extensions-builtin/Lora):
- `(words)` multiplies the words' weight by 1.1, `[words]` by 1/1.1, `(words:1.5)` by 1.5; they
  nest and multiply. `\\(`, `\\)`, `\\[`, `\\]`, `\\\\` are the literal characters. An unclosed
  `(` or `[` applies to the rest of the prompt; a `)` or `]` that closes nothing, and a `:`
  outside `(...:number)`, are plain text. Nothing in the syntax is ever an error. Not
  implemented: prompt editing `[a:b:when]` and alternation `[a|b]` (their brackets are read as
  emphasis, their text as text).
- A weight scales that token's row of the text encoder's output; the rows of each 77-token
  window are then rescaled together so that their mean is what it was before (A1111's
  "Original" emphasis). With two text encoders (SDXL) each is rescaled on its own.
- The prompt is cut into windows of 75 tokens, each encoded as BOS + 75 + EOS (padded) by
  the text encoder on its own, and the outputs are concatenated: a 200-token prompt gives a
  (1, 3·77, D) context. A window that would end within 20 tokens after a comma ends at the
  comma instead (A1111's comma_padding_backtrack = 20); `BREAK` starts a new window; a
  textual-inversion token is never split between windows. The pooled output (SDXL) is the
  first window's. When the prompt and the negative prompt need different numbers of windows,
  the shorter is padded with windows of the empty prompt (A1111's pad_cond_uncond).
- `<lora:name:w>` (or `<lora:name>`, w = 1; `<lora:name:te:unet>` scales the text encoders by te
  and the UNet by unet) names a LoRA file `name.*` under the LoRA folder; the tags are removed
  from the text that is encoded.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from typing import Optional

import torch

CHUNK_TOKENS = 75  # tokens of a window between BOS and EOS
COMMA_BACKTRACK = 20  # A1111's comma_padding_backtrack default
ROUND_MULTIPLIER = 1.1

# A1111's tokens of the emphasis syntax: escapes, brackets, ":number)", plain runs, a lone ":".
_ATTENTION = re.compile(r"""
\\\(|\\\)|\\\[|\\]|\\\\|\\|
\(|\[|
:\s*([+-]?[.\d]+)\s*\)|
\)|]|
[^\\()\[\]:]+|
:
""", re.X)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
_LORA_TAG = re.compile(r"<lora:([^:>]+)((?::[^:>]*)*)>")


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """[(text, weight), ...] of a prompt in A1111's emphasis syntax; consecutive pieces of equal
    weight are merged, and a BREAK is the piece ("BREAK", -1)."""
    pieces: list[list] = []
    round_open, square_open = [], []

    def multiply_from(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            if piece[1] != -1:  # a BREAK stays a BREAK inside brackets (A1111 would scale it into text)
                piece[1] *= factor

    for m in _ATTENTION.finditer(text):
        token, weight = m.group(0), m.group(1)
        if token.startswith("\\"):
            pieces.append([token[1:], 1.0])
        elif token == "(":
            round_open.append(len(pieces))
        elif token == "[":
            square_open.append(len(pieces))
        elif weight is not None and round_open:
            multiply_from(round_open.pop(), float(weight))
        elif token == ")" and round_open:
            multiply_from(round_open.pop(), ROUND_MULTIPLIER)
        elif token == "]" and square_open:
            multiply_from(square_open.pop(), 1 / ROUND_MULTIPLIER)
        else:
            for i, part in enumerate(_BREAK.split(token)):
                if i > 0:
                    pieces.append(["BREAK", -1])
                pieces.append([part, 1.0])
    for start in round_open:
        multiply_from(start, ROUND_MULTIPLIER)
    for start in square_open:
        multiply_from(start, 1 / ROUND_MULTIPLIER)
    if not pieces:
        pieces = [["", 1.0]]
    merged = [pieces[0]]
    for piece in pieces[1:]:
        if piece[1] == merged[-1][1]:
            merged[-1][0] += piece[0]
        else:
            merged.append(piece)
    return [(text, weight) for text, weight in merged]


@dataclass(frozen=True)
class LoraTag:
    """A `<lora:name:...>` tag: the file name and its UNet and text-encoder scales."""

    name: str
    scale: float = 1.0
    text_scale: Optional[float] = None


def extract_lora_tags(prompt: str) -> tuple[str, list[LoraTag]]:
    """(the prompt without its <lora:...> tags, the tags). ValueError for a scale that is not a number."""
    tags = []

    def take(m: re.Match) -> str:
        name, args = m.group(1).strip(), [a.strip() for a in m.group(2).split(":")[1:]]
        try:
            numbers = [float(a) for a in args if a]
        except ValueError:
            raise ValueError(f"{m.group(0)}: the scales of a LoRA tag are numbers (<lora:name:0.8>)") from None
        if len(numbers) > 2 or not all(math.isfinite(n) for n in numbers):
            raise ValueError(f"{m.group(0)}: a LoRA tag takes at most two finite scales, <lora:name:te:unet>")
        if len(numbers) == 2:  # A1111: the first multiplies the text encoders, the second the UNet
            tags.append(LoraTag(name, scale=numbers[1], text_scale=numbers[0]))
        else:
            tags.append(LoraTag(name, scale=numbers[0] if numbers else 1.0))
        return ""

    return _LORA_TAG.sub(take, prompt), tags


# ---------------------------------------------------------------------------
# Windows of 75 tokens
# ---------------------------------------------------------------------------

@dataclass
class Chunk:
    """One window: ids (77: BOS, 75 tokens or padding, EOS / padding) and each id's weight."""

    ids: list
    weights: list


def chunk_prompt(tokenizer, prompt: str, comma_backtrack: int = COMMA_BACKTRACK) -> list[Chunk]:
    """A prompt in A1111's syntax (without <lora:> tags) as windows of 75 tokens with weights.

    The windows follow A1111's FrozenCLIPEmbedderWithCustomWordsBase.tokenize_line: a window is
    filled to 75 ids and closed; before a token that would overflow it, text after a comma at
    most `comma_backtrack` ids back moves to the next window; BREAK closes the window early; an
    added (textual-inversion) token moves whole to the next window when it does not fit.
    """
    comma = tokenizer.tokens(",")
    comma_id = comma[0] if len(comma) == 1 else None
    pad, bos, eos = tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id
    chunks: list[Chunk] = []
    ids: list = []
    weights: list = []
    last_comma = -1

    def close() -> None:
        nonlocal ids, weights, last_comma
        fill = CHUNK_TOKENS - len(ids)
        # EOS after the text, then the pad token (EOS itself for SD1's tokenizers).
        tail = [eos] + [pad] * fill
        chunks.append(Chunk([bos] + ids + tail, [1.0] + weights + [1.0] * (fill + 1)))
        ids, weights, last_comma = [], [], -1

    for text, weight in parse_prompt_attention(prompt):
        if text == "BREAK" and weight == -1:
            close()
            continue
        for unit in tokenizer.pieces(text):
            if len(unit) == 1 and unit[0] == comma_id:
                last_comma = len(ids)
            elif (comma_backtrack and len(ids) == CHUNK_TOKENS and last_comma != -1
                  and len(ids) - last_comma <= comma_backtrack):
                split = last_comma + 1
                moved_ids, moved_weights = ids[split:], weights[split:]
                ids, weights = ids[:split], weights[:split]
                close()
                ids, weights = moved_ids, moved_weights
            if len(ids) == CHUNK_TOKENS:
                close()
            if len(unit) > 1 or unit[0] >= tokenizer.vocab_size:  # an added token stays whole
                if len(ids) + len(unit) > CHUNK_TOKENS:
                    close()
            ids += list(unit)
            weights += [weight] * len(unit)
    if ids or not chunks:
        close()
    return chunks


def count_windows(tokenizer, prompts: list) -> int:
    """How many 75-token windows the longest of prompts needs."""
    return max(len(chunk_prompt(tokenizer, p)) for p in prompts)


def chunk_ids(tokenizer, prompts: list, count: int):
    """Token ids (B·count, 77) and weights (B·count, 77) of a batch of prompts as `count` windows
    each: shorter prompts get windows of the empty prompt, longer ones are cut."""
    empty = chunk_prompt(tokenizer, "")[0]
    rows = []
    for prompt in prompts:
        chunks = chunk_prompt(tokenizer, prompt)
        rows += chunks[:count] + [empty] * (count - len(chunks))
    ids = torch.tensor([c.ids for c in rows], dtype=torch.long)  # (B·count, 77)
    weights = torch.tensor([c.weights for c in rows], dtype=torch.float32)
    return ids, weights


def apply_emphasis(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111's "Original" emphasis on encoder outputs (rows, 77, D): each token's vector times its
    weight, then each row rescaled to its mean before weighting."""
    weights = weights.to(hidden.device, hidden.dtype)
    if bool((weights == 1).all()):
        return hidden
    original = hidden.mean(dim=(1, 2), keepdim=True)  # (rows, 1, 1)
    weighted = hidden * weights[:, :, None]
    return weighted * (original / weighted.mean(dim=(1, 2), keepdim=True))


def encode(backend, tokenizer, tokenizer_2, prompts: list, clip_skip, *, widths: tuple,
           windows: Optional[int] = None, max_windows: Optional[int] = None):
    """Context (B, windows·77, D) and pooled output (B, P) or None of prompts in A1111's syntax.

    widths: each text encoder's share of D (SDXL: (D1, D2)); emphasis is applied to each share
    on its own, as A1111 weights each encoder's output. windows: how many 75-token windows
    (None: as many as the longest prompt needs; more pads with empty-prompt windows).
    max_windows: the most windows the backend's UNet takes (None: any number); a longer
    prompt is cut, with a warning.
    """
    main = tokenizer if tokenizer is not None else tokenizer_2  # SDXL's refiner has only the second
    if windows is None:
        windows = count_windows(main, prompts)
    if max_windows is not None and windows > max_windows:
        warnings.warn(f"a prompt needs {windows} windows of {CHUNK_TOKENS} tokens but this backend's UNet takes "
                      f"{max_windows}; the rest of the prompt is dropped", UserWarning, stacklevel=3)
        windows = max_windows
    ids, weights = chunk_ids(main, prompts, windows)
    ids_2 = chunk_ids(tokenizer_2, prompts, windows)[0] if tokenizer_2 is not None else None
    context, pooled = backend.encode_text(ids if tokenizer is not None else None, ids_2,
                                          clip_skip=clip_skip)  # (B·windows, 77, D)
    parts = context.float().split(list(widths), dim=-1)
    context = torch.cat([apply_emphasis(part, weights) for part in parts], dim=-1)
    batch = len(prompts)
    context = context.reshape(batch, windows * context.shape[1], context.shape[2])  # (B, windows·77, D)
    if pooled is not None:
        pooled = pooled.float().reshape(batch, windows, -1)[:, 0]  # the first window's
    return context, pooled


def lora_tags(prompts: list, negatives: list, lora_dir) -> tuple[list, list, list]:
    """(prompts and negative prompts without their <lora:...> tags, the LoRA set they name as
    LoraSpecs). Every image of a request shares one set: prompts that name different sets are
    an error. A name is resolved in lora_dir (lora.resolve_lora: unknown names list the available ones)."""
    from .lora import LoraSpec, resolve_lora

    sets, texts = [], {}
    for kind, items in (("prompt", prompts), ("negative", negatives)):
        texts[kind] = []
        for text in items:
            stripped, tags = extract_lora_tags(text)
            texts[kind].append(stripped)
            if kind == "prompt":
                sets.append(tags)
            elif tags:
                sets[len(texts[kind]) - 1] = sets[len(texts[kind]) - 1] + tags
    if any(s != sets[0] for s in sets):
        raise ValueError("the prompts of one request name different <lora:...> sets; give every prompt the same tags")
    specs = [LoraSpec(resolve_lora(tag.name, lora_dir), tag.scale, tag.text_scale) for tag in sets[0]]
    return texts["prompt"], texts["negative"], specs
