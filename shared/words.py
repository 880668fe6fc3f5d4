"""Numbers in sentences: "1 image", "2 images", "1 class", "3 shards"."""

from __future__ import annotations

_IRREGULAR = {"class": "classes", "batch": "batches", "was": "were"}


def plural(n: int, noun: str) -> str:
    """``n`` and the noun, singular for exactly one."""
    return f"{n} {noun if n == 1 else _IRREGULAR.get(noun, noun + 's')}"
