"""A ``.keras`` file is a zip archive: its directory is checked before Keras reads any member.

Keras reads ``config.json`` whole into memory and parses it, and reads or extracts the weights;
its own guard only refuses members past 4 GiB. A 2 MB archive holding gigabytes of zeros would
take a worker's memory with it. Python's zipfile never returns more bytes than a member declares,
so the declared sizes checked here are what Keras can be made to read.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

from convoy.shared.errors import HDF5Refused, ModelError
from convoy.shared.memory import mb

#: Uncompressed size of every member together. VGG16 with its ImageNet top is ~530 MB; every
#: backbone Convoy builds, with a classifier on top, is well under this.
MAX_TOTAL_BYTES = 2 * 2**30
#: A model is config.json, metadata.json, model.weights.h5 and maybe a few assets.
MAX_ENTRIES = 1000
#: The JSON members are read whole and parsed, which takes several times their size.
MAX_JSON_BYTES = 64 * 2**20
#: Keras stores members uncompressed (ratio ~1); a member past MIN_RATIO_BYTES that expands more
#: than this (Keras's own threshold for its 4 GiB guard) is a bomb, not a recompressed model.
MAX_RATIO = 100
MIN_RATIO_BYTES = 2**20


def check_keras_archive(path: str | Path, what: str = "model file") -> None:
    """ModelError with the reason when ``path`` is not a zip archive, is too large to load, or holds
    HDF5 weights that point outside it (checked in that order: the bounds before any member is read)."""
    from convoy.shared import hdf5

    why = _refusal(Path(path))
    if why:
        raise ModelError(f"{what} {path} is refused: {why}")
    try:
        hdf5.check_for_keras(path, what)
    except HDF5Refused as exc:
        raise ModelError(str(exc)) from None


def _refusal(path: Path) -> str | None:
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError):
        raise ModelError(f"model file {path} does not load as a Keras model (it is not a zip archive, as "
                         ".keras files are); pass a file saved with model.save('x.keras')") from None
    if len(members) > MAX_ENTRIES:
        return f"it holds {len(members)} members, more than the {MAX_ENTRIES} a Keras model may have"
    total = sum(m.file_size for m in members)
    if total > MAX_TOTAL_BYTES:
        return f"it unpacks to {mb(total)}, more than the {mb(MAX_TOTAL_BYTES)} a model may take"
    for m in members:
        if m.filename.endswith(".json") and m.file_size > MAX_JSON_BYTES:
            return f"its {m.filename} unpacks to {mb(m.file_size)}, more than {mb(MAX_JSON_BYTES)}"
        if m.file_size > MIN_RATIO_BYTES and m.file_size > MAX_RATIO * max(m.compress_size, 1):
            return (f"its {m.filename} unpacks to {mb(m.file_size)} from {m.compress_size} bytes "
                    f"(over {MAX_RATIO}:1, a decompression bomb)")
    return None
