"""Reading one image into the pixels the model sees, with a reason when it cannot be done.

The pixels are those of ``keras.utils.load_img(path, target_size=(s, s),
interpolation="bilinear")``: PIL decode, convert to RGB, bilinear resize ignoring aspect ratio.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

#: File endings Convoy treats as images (any case).
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"})


class BadImage(Exception):
    """One image cannot be used; ``str(exc)`` is the reason recorded for it."""


def is_image_name(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit greyscale: PIL's convert("RGB") clips at 255, so scale to 8 bits first.
        arr = np.asarray(img, dtype=np.uint32)
        peak = 65535 if img.mode.startswith("I;16") or arr.max() > 255 else 255
        img = Image.fromarray((arr * 255 // max(peak, 1)).astype(np.uint8), mode="L")
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img


def load_pixels(path: str | Path, size_px: int | None) -> np.ndarray:
    """Pixels of ``path`` as uint8 (size_px, size_px, 3) (None: the image's own size), or
    :class:`BadImage` with the reason."""
    try:
        if Path(path).stat().st_size == 0:
            raise BadImage("empty file (0 bytes)")
        with warnings.catch_warnings():
            # Pillow only warns between 1x and 2x its pixel limit; both are refused.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
                img = _to_rgb(img)
                if size_px and img.size != (size_px, size_px):
                    img = img.resize((size_px, size_px), Image.BILINEAR)
                return np.asarray(img, dtype=np.uint8)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadImage(f"decompression bomb: {exc}") from None
    except UnidentifiedImageError:
        raise BadImage("not an image Pillow can identify") from None
    except FileNotFoundError:
        raise BadImage("file not found (deleted after the scan?)") from None
    except PermissionError:
        raise BadImage("permission denied: make the file readable by the worker") from None
    except OSError as exc:
        raise BadImage(f"unreadable or corrupt: {exc.strerror or exc}") from None
    except (ValueError, SyntaxError, EOFError) as exc:
        raise BadImage(f"corrupt image data: {exc}") from None


def resize_pixels(pixels: np.ndarray, height_px: int, width_px: int) -> np.ndarray:
    """uint8 RGB pixels at (height_px, width_px), resized exactly as :func:`load_pixels` does."""
    if pixels.shape[:2] == (height_px, width_px):
        return pixels
    return np.asarray(Image.fromarray(pixels, "RGB").resize((width_px, height_px), Image.BILINEAR), dtype=np.uint8)
