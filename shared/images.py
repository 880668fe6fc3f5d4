"""Reading one image into the pixels the model sees, with a reason when it cannot be done.

Two decode modes (``--decode``):

- ``exact`` (default): the pixels of ``keras.utils.load_img(path, target_size=(s, s),
  interpolation="bilinear")``: PIL decode, convert to RGB, bilinear resize ignoring aspect ratio.
- ``fast``: a JPEG at least twice the target size is decoded already shrunk by 1/2, 1/4 or 1/8
  in the DCT domain (libjpeg's scaled decoding, via Pillow's ``draft``), so most of its pixels are
  never computed; any other image large enough is first box-reduced by a whole factor
  (``reducing_gap``). The bilinear resize to (s, s) follows as in ``exact``. Features move a
  little (docs/performance.md, "Decoding"); the mode is recorded with them.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import IO, TypeVar

import numpy as np
from PIL import Image, UnidentifiedImageError

from convoy.shared import memory, storage

#: ``--decode`` values; ``exact`` reproduces Keras ``load_img``.
DECODE_MODES = ("exact", "fast")
#: In ``fast`` mode, a whole-factor box reduction first when the image is this many times the target.
_REDUCING_GAP = 2.0

T = TypeVar("T")

#: File endings Convoy treats as images (any case).
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"})


class BadImage(Exception):
    """One image cannot be used; ``str(exc)`` is the reason recorded for it."""


def is_image_name(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS


_SAMPLE = re.compile(r"^(.*\.(?:tar|tar\.gz|tgz|parquet))#(.+)$", re.IGNORECASE)


def sample_in_container(path: str | Path) -> tuple[str, str] | None:
    """(container, member or row) for an image inside a WebDataset tar or a Parquet file, named
    as its features name it (``.../00003.tar#a/1.jpg``, ``.../part.parquet#17``); else None."""
    found = _SAMPLE.match(str(path))
    return (found.group(1), found.group(2)) if found else None


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit greyscale: PIL's convert("RGB") clips at 255, so scale to 8 bits first.
        arr = np.asarray(img, dtype=np.uint32)
        peak = 65535 if img.mode.startswith("I;16") or arr.max() > 255 else 255
        img = Image.fromarray((arr * 255 // max(peak, 1)).astype(np.uint8), mode="L")
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img


def load_pixels(path: str | Path | IO[bytes], size_px: int | None, decode: str = "exact") -> np.ndarray:
    """Pixels of ``path`` (an open file, as workers hand it over from :func:`convoy.shared.paths.open_image`;
    a file's name; or an object's URL: fetched whole first, in the caller's thread) as uint8
    (size_px, size_px, 3) (None: the image's own size), decoded as ``decode`` says (see the
    module's docstring), or :class:`BadImage` with the reason."""
    fast = decode == "fast" and bool(size_px)

    def pixels(img: Image.Image) -> np.ndarray:
        # JPEG only (a no-op for other formats); never below the target size.
        img = _loaded(img, (size_px, size_px) if fast else None)
        if size_px and img.size != (size_px, size_px):
            img = img.resize((size_px, size_px), Image.BILINEAR, reducing_gap=_REDUCING_GAP if fast else None)
        return np.asarray(img, dtype=np.uint8)

    return _read(path, pixels)


def load_views(path: str | Path | IO[bytes], size_hw: tuple[int, int],
               display_px: int) -> tuple[np.ndarray, np.ndarray]:
    """One decode of ``path``, two uint8 RGB views: the pixels at ``size_hw`` (height, width) for a
    model, and the image within ``display_px`` on its longer side (aspect kept, never enlarged) for
    a person. Decoded as ``fast`` does: a JPEG already shrunk to no less than either view needs,
    then box-reduced and resized; the full-size image is never held."""
    height, width = size_hw

    def views(img: Image.Image) -> tuple[np.ndarray, np.ndarray]:
        shown_wh = fit_within(img.size, display_px)
        img = _loaded(img, (max(shown_wh[0], width), max(shown_wh[1], height)))
        model = img.resize((width, height), Image.BILINEAR, reducing_gap=_REDUCING_GAP)
        shown = img if img.size == shown_wh else img.resize(shown_wh, Image.BILINEAR, reducing_gap=_REDUCING_GAP)
        return np.asarray(model, dtype=np.uint8), np.asarray(shown, dtype=np.uint8)

    return _read(path, views)


def fit_within(size_wh: tuple[int, int], longest_px: int) -> tuple[int, int]:
    """(width, height) scaled down so the longer side is at most ``longest_px``, aspect kept."""
    width, height = size_wh
    scale = min(1.0, longest_px / max(width, height, 1))
    return max(1, round(width * scale)), max(1, round(height * scale))


def _loaded(img: Image.Image, draft_wh: tuple[int, int] | None) -> Image.Image:
    """``img`` decoded as RGB (shrunk while decoding to no less than ``draft_wh`` where the format
    can), after checking from its header that the decoded pixels fit this worker's memory budget."""
    if draft_wh:
        img.draft("RGB", draft_wh)
    too_big = memory.image_too_big(*img.size)  # the size draft will decode at, read from the header
    if too_big:
        raise BadImage(too_big)
    img.load()
    return _to_rgb(img)


def _read(path: str | Path | IO[bytes], use: Callable[[Image.Image], T]) -> T:
    """``use`` applied to the image at ``path`` (an open file, a file's name or an object's URL),
    or BadImage."""
    if not isinstance(path, (str, Path)):
        try:
            empty = os.fstat(path.fileno()).st_size == 0
        except io.UnsupportedOperation:  # in memory (an object fetched whole)
            empty = not path.getbuffer().nbytes
        except OSError as exc:
            raise BadImage(file_error(exc)) from None
        if empty:
            raise BadImage("empty file (0 bytes)")
        return _decode(path, use)
    if storage.is_url(path):
        return _decode(fetch_object(path), use)
    try:
        if Path(path).stat().st_size == 0:
            raise BadImage("empty file (0 bytes)")
    except OSError as exc:
        raise BadImage(file_error(exc)) from None
    return _decode(path, use)


def fetch_object(url: str) -> io.BytesIO:
    """An image object on a store, fetched whole, or :class:`BadImage` with the reason."""
    try:
        data = storage.read_bytes(url)
    except storage.StoreError as exc:
        raise BadImage(str(exc)) from None
    if not data:
        raise BadImage("empty object (0 bytes)")
    return io.BytesIO(data)


def file_error(exc: OSError) -> str:
    """The reason a file could not be read, as the user can act on it."""
    if isinstance(exc, FileNotFoundError):
        return "file not found (deleted after the scan?)"
    if isinstance(exc, PermissionError):
        return "permission denied: make the file readable by the worker"
    return f"unreadable or corrupt: {exc.strerror or exc}"


def _decode(source, use: Callable[[Image.Image], T]) -> T:
    """``use`` applied to the opened image (a file or an in-memory file), its errors as BadImage."""
    try:
        with warnings.catch_warnings():
            # Pillow only warns between 1x and 2x its pixel limit; both are refused.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                return use(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadImage(f"decompression bomb: {exc}") from None
    except UnidentifiedImageError:
        raise BadImage("not an image Pillow can identify") from None
    except OSError as exc:
        raise BadImage(file_error(exc)) from None
    except (ValueError, SyntaxError, EOFError) as exc:
        raise BadImage(f"corrupt image data: {exc}") from None
