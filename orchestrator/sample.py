"""A small sample of real photographs in the book's layout, cut from scikit-image's data.

Class ``cat`` is crops of scikit-image's ``chelsea`` photo; class ``other`` is crops of its
other colour photographs (coffee, rocket, astronaut, motorcycle, Hubble deep field). Every split
holds crops of the same six photographs: a demo that runs end to end, not a benchmark. What was
made is kept in ``DATA/.convoy-sample.json`` (hidden: a scan passes it by), so a run's summary
and report can say so.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

from convoy.shared import storage
from convoy.shared.words import plural

SPLIT_SHARES = (("train", 0.5), ("validation", 0.25), ("test", 0.25))
CLASS_SOURCES = {
    "cat": ["chelsea.png"],
    "other": ["coffee.png", "rocket.jpg", "astronaut.png", "motorcycle_left.png", "hubble_deep_field.jpg"],
}
SIZE_PX = (500, 375)
#: What ``convoy sample`` made, in DATA.
RECORD_NAME = ".convoy-sample.json"


def _sources() -> dict[str, list[Image.Image]]:
    import skimage

    data = Path(skimage.__file__).parent / "data"
    return {c: [Image.open(data / n).convert("RGB") for n in names] for c, names in CLASS_SOURCES.items()}


def _variant(src: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A random crop (60-100% of each side), maybe mirrored, with jittered brightness."""
    w, h = src.size
    cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    img = src.crop((x, y, x + cw, y + ch)).resize(SIZE_PX, Image.BILINEAR)
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return ImageEnhance.Brightness(img).enhance(float(rng.uniform(0.8, 1.2)))


def make_sample(out_dir: Path, images: int = 400, seed: int = 0) -> Path:
    """Write ``images`` JPEGs of 500x375 into out_dir/{train,validation,test}/{cat,other}/ (an
    even share per class: one fewer for an odd count), and what was made in its RECORD_NAME."""
    rng = np.random.default_rng(seed)
    sources = _sources()
    per_class = images // len(sources)
    for cls, photos in sources.items():
        counts = [int(per_class * share) for _, share in SPLIT_SHARES]
        counts[0] += per_class - sum(counts)
        n = 0
        for (split, _), count in zip(SPLIT_SHARES, counts, strict=True):
            folder = out_dir / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for _ in range(count):
                photo = photos[n % len(photos)]
                _variant(photo, rng).save(folder / f"{cls}.{n:04d}.jpg", quality=90)
                n += 1
    used = {c: min(len(names), per_class) for c, names in CLASS_SOURCES.items()}  # photos[n % len(photos)]
    record = {"images": per_class * len(sources), "photographs": used, "seed": seed}
    (out_dir / RECORD_NAME).write_text(json.dumps(record))
    return out_dir


def sample_words(record: dict) -> str:
    """``cropped from 6 source photographs (cat: 1, other: 5); every split holds crops of the same
    photographs``: what a sample's images are, from its record."""
    photos = record.get("photographs") or {}
    per_class = ", ".join(f"{c}: {n}" for c, n in photos.items())
    return (f"cropped from {plural(sum(photos.values()), 'source photograph')} ({per_class}); every split "
            "holds crops of the same photographs")


def read_record(data_dir: Path) -> dict:
    return json.loads((Path(data_dir) / RECORD_NAME).read_text())


def sample_note(data_dir: str | Path) -> str:
    """``sample data: ...`` when DATA (a local folder) was made by ``convoy sample``, else ""."""
    if storage.is_url(str(data_dir)):
        return ""  # a store's DATA is not one convoy sample wrote
    try:
        record = read_record(Path(data_dir))
        return f"sample data: {plural(int(record['images']), 'image')} {sample_words(record)}"
    except (OSError, ValueError, TypeError, AttributeError, KeyError):  # none, or not one this wrote
        return ""
