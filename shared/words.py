"""Numbers in sentences ("1 image", "2 images", "1 class", "3 shards"), and a job's weights as
every output words them."""

from __future__ import annotations

_IRREGULAR = {"class": "classes", "batch": "batches", "was": "were"}


def plural(n: int, noun: str) -> str:
    """``n`` and the noun, singular for exactly one."""
    return f"{n} {noun if n == 1 else _IRREGULAR.get(noun, noun + 's')}"


def weights_words(weights: str, seed: int | None = None) -> str:
    """A job's weights as every output says them: ``imagenet``, ``random (seed 0)``, or the
    weights file's name (``--weights`` as given: imagenet, none, a path or a store URL)."""
    if weights == "none":
        return f"random (seed {0 if seed is None else seed})"
    if weights == "imagenet":
        return "imagenet"
    return weights.rstrip("/").rsplit("/", 1)[-1] or weights


def weights_note(weights: str, seed: int | None = None) -> str:
    """What a reader must know of features made with these weights ("" when nothing): random
    weights make a working pipeline, not a meaningful classifier or heatmap."""
    if weights != "none":
        return ""
    return f"random weights (seed {0 if seed is None else seed}): features carry no ImageNet knowledge"


def job_weights(spec) -> tuple[str, str]:
    """(words, note) of a job's weights, from its JobSpec or its spec as JSON (``manifest["spec"]``):
    the seed is the job's ``--seed``."""
    if isinstance(spec, dict):
        weights, options = (spec.get("model") or {}).get("weights", ""), spec.get("options") or {}
    else:
        weights, options = spec.model.weights, spec.options
    try:
        seed = int(options.get("seed"))
    except (TypeError, ValueError):  # none given (or a hand-made spec's odd one): the default
        seed = None
    return weights_words(str(weights), seed), weights_note(str(weights), seed)
