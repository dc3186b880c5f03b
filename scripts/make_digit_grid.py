"""Draw docs/digits_grid.png: the bundled demo model's digits, one row per digit, one column per seed.

    python scripts/make_digit_grid.py                    # 10 digits x 8 seeds, default sampler
    python scripts/make_digit_grid.py --seeds 12 --scale 3 --out grid.png

Generation goes through the public API (`sdengine.load()` with no path is the demo model).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

import sdengine
from sdengine.training.train import DIGIT_WORDS

ROOT = Path(__file__).resolve().parent.parent


def digit_grid(pipe, n_seeds: int, prompt: str, gap: int = 2, **kwargs) -> Image.Image:
    """A (10 rows x n_seeds columns) grid of generated digits, grey gaps between tiles."""
    prompts = [prompt.format(word=word, digit=d) for d, word in enumerate(DIGIT_WORDS)]
    seeds = list(range(n_seeds))
    result = pipe([p for p in prompts for _ in seeds], seed=[s for _ in prompts for s in seeds],
                  output_type="np", **kwargs)
    images = np.asarray(result.images)  # (10 * n_seeds, H, W, 3) in [0, 1]
    h, w = images.shape[1:3]
    grid = np.full((10 * (h + gap) + gap, n_seeds * (w + gap) + gap, 3), 0.35, dtype=np.float32)
    for i, image in enumerate(images):
        row, col = divmod(i, n_seeds)
        y, x = gap + row * (h + gap), gap + col * (w + gap)
        grid[y:y + h, x:x + w] = image
    return Image.fromarray((grid * 255).round().astype(np.uint8))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "digits_grid.png")
    parser.add_argument("--seeds", type=int, default=8, help="columns: seeds 0..N-1 (default 8)")
    parser.add_argument("--prompt", default="a handwritten digit {word}",
                        help="prompt template; {word} is 'seven', {digit} is '7'")
    parser.add_argument("--scale", type=int, default=2, help="nearest-neighbour upscaling of the PNG (default 2)")
    parser.add_argument("--model", default=None, help="model path (default: the bundled demo model)")
    args = parser.parse_args()
    if args.seeds < 1 or args.scale < 1:
        parser.error("--seeds and --scale must be positive")

    pipe = sdengine.load(args.model, device="cpu")
    grid = digit_grid(pipe, args.seeds, args.prompt)
    grid = grid.resize((grid.width * args.scale, grid.height * args.scale), Image.NEAREST)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=args.out.parent)  # write, then rename into place
    os.close(fd)
    try:
        grid.save(tmp)
        os.replace(tmp, args.out)
    except BaseException:
        os.unlink(tmp)
        raise
    print(f"wrote {args.out} ({grid.width}x{grid.height})")


if __name__ == "__main__":
    main()
