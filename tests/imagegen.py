"""Small generated images for tests: two kinds of pattern a classifier can tell apart."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def pattern(kind: str, size_px: int, rng: np.random.Generator) -> Image.Image:
    """``stripes``: horizontal bands; ``blobs``: a bright disc on a dark ground."""
    yy, xx = np.mgrid[0:size_px, 0:size_px]
    if kind == "stripes":
        period = rng.integers(4, 9)
        base = ((yy // period) % 2) * 200 + 30
    else:
        cy, cx, r = rng.integers(size_px // 4, 3 * size_px // 4, size=2).tolist() + [size_px // 4]
        base = np.where((yy - cy) ** 2 + (xx - cx) ** 2 < r * r, 230, 25)
    noise = rng.normal(0, 12, size=(size_px, size_px, 3))
    tint = rng.uniform(0.7, 1.0, size=3)
    arr = np.clip(base[..., None] * tint + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def make_tree(root: Path, per_class: dict[str, int], splits=("train", "validation", "test"),
              size_px: int = 40, seed: int = 0, fmt: str = "png") -> Path:
    """root/{split}/{stripes,blobs}/img-NNN.fmt; ``per_class`` maps split -> images per class."""
    rng = np.random.default_rng(seed)
    for split in splits:
        for kind in ("blobs", "stripes"):
            folder = root / split / kind if split else root / kind
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class[split]):
                pattern(kind, size_px, rng).save(folder / f"img-{i:03d}.{fmt}")
    return root


def make_flat(root: Path, n: int, size_px: int = 40, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        pattern("stripes" if i % 2 else "blobs", size_px, rng).save(root / f"img-{i:03d}.jpg")
    return root
