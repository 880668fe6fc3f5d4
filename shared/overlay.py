"""What a person looks at: each heatmap over its original image, and one page showing them all.

As the book does: resize the map to the original image, colour it with the jet map, and add it
at 0.4 intensity to the original pixels (``superimposed = heatmap_jet * 0.4 + img``), clipped
to 0..255.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from convoy.shared import storage

#: Weight of the coloured heatmap added to the original image (the book's 0.4).
INTENSITY = 0.4
#: Longest side, pixels, of the overlays and originals drawn (smaller images keep their size): a
#: page of them reads well in a browser, and a worker never holds a photograph at full size.
DISPLAY_PX = 1024


@lru_cache(maxsize=1)
def _jet() -> np.ndarray:
    """matplotlib's jet as a (256, 3) table of 0..255 values."""
    from matplotlib import colormaps

    return colormaps["jet"](np.arange(256))[:, :3] * 255.0


def resize_heatmap(heatmap: np.ndarray, width: int, height: int) -> np.ndarray:
    """The (h, w) map at (height, width), bilinear, still in [0, 1]."""
    img = Image.fromarray(np.asarray(heatmap, np.float32), mode="F")
    return np.clip(np.asarray(img.resize((width, height), Image.BILINEAR)), 0.0, 1.0)


def superimpose(original: np.ndarray, heatmap: np.ndarray, intensity: float = INTENSITY) -> np.ndarray:
    """uint8 (H, W, 3): the jet-coloured heatmap added to ``original`` (uint8 RGB, H x W)."""
    height, width = original.shape[:2]
    levels = np.uint8(np.round(255 * resize_heatmap(heatmap, width, height)))
    coloured = _jet()[levels].astype(np.float32)
    return np.clip(coloured * np.float32(intensity) + original, 0, 255).astype(np.uint8)


def write_png(path: Path, pixels: np.ndarray) -> None:
    """Write under a temporary name, then rename, so a reader never sees half a PNG."""
    with storage.atomic_path(path) as tmp:
        Image.fromarray(pixels, "RGB").save(tmp, format="PNG")


def overlay_name(position: int, rel_path: str, class_index: int, ranked: bool) -> str:
    """A unique, readable file name for one row: image position, path, and class when top-k."""
    plain = Path(rel_path).with_suffix("").as_posix()
    stem = "".join(c if c.isalnum() or c in "-." else "_" for c in plain)[-60:]
    suffix = f"-class{class_index}" if ranked else ""
    return f"{position:05d}-{stem}{suffix}.png"
