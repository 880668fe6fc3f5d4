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


def make_odd_images(folder: Path) -> dict[str, str | None]:
    """Every kind of awkward file, named by kind; value: a reason substring, or None if usable."""
    import os

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    good = pattern("blobs", 48, rng)
    expected: dict[str, str | None] = {}

    good.save(folder / "truncated.jpg", quality=95)
    data = (folder / "truncated.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    expected["truncated.jpg"] = "corrupt"
    (folder / "zero.jpg").write_bytes(b"")
    expected["zero.jpg"] = "empty file"
    (folder / "text.jpg").write_text("this is not a picture\n")
    expected["text.jpg"] = "not an image"
    Image.new("1", (20000, 20000)).save(folder / "bomb.png")
    expected["bomb.png"] = "decompression bomb"
    os.symlink("loop.png", folder / "loop.png")
    expected["loop.png"] = "symbolic links"

    good.convert("RGBA").save(folder / "alpha.png")
    good.convert("L").save(folder / "grey.png")
    good.convert("P").save(folder / "palette.gif")
    good.convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(np.asarray(good.convert("L"), np.uint16) * 257).save(folder / "deep16.png")
    good.save(folder / "plain.webp")
    good.save(folder / "plain.bmp")
    for name in ("alpha.png", "grey.png", "palette.gif", "cmyk.jpg", "deep16.png", "plain.webp", "plain.bmp"):
        expected[name] = None
    return expected
