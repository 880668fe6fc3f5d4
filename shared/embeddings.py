"""The Parquet and NumPy outputs (``--format parquet``, ``--format npy``): a shard's features as
the tools downstream read them, written beside its HDF5 shard file, whole or not at all.

- ``OUT/parquet/<split>/shard-NNNNN.parquet``: columns ``key``, ``source`` (a path relative to
  DATA, or ``tar#member``, or ``file.parquet#row``), ``label``, ``split`` and ``embedding``, a
  fixed-size list of the features flattened (the layer's shape is in the schema metadata,
  ``convoy`` holding JSON: ``feature_shape``, model, layer, fingerprint...). A split's folder is
  a Parquet dataset: ``pyarrow.parquet.read_table("OUT/parquet/train")``.
- ``OUT/npy/<split>/img_emb/img_emb_N.npy`` (N rows by D) and
  ``OUT/npy/<split>/metadata/metadata_N.parquet`` (the same columns less ``embedding``, row for
  row): clip-retrieval's layout, which autofaiss indexes as it is.

Each file is built in memory and written by :func:`convoy.shared.storage.write_bytes` (a
temporary file renamed, or one upload). Its fingerprint is the HDF5 shard's: a file from another
run, or one a killed worker never wrote, is written again on resume.
"""

from __future__ import annotations

import io
import json
import posixpath

import numpy as np

from convoy.shared import storage
from convoy.shared.errors import StoreError
from convoy.shared.storage import Location

#: The schema metadata key holding how the features were made (JSON).
META_KEY = b"convoy"


def key_of(source: str) -> str:
    """A row's key: its source without the container and the file ending (``00001.tar#a/b.jpg``
    gives ``a/b``, ``train/cats/1.jpg`` gives ``train/cats/1``), as WebDataset names samples."""
    inner = source.rsplit("#", 1)[-1]
    folder, base = posixpath.split(inner)
    return posixpath.join(folder, base.split(".", 1)[0]) if "." in base[1:] else inner


def parquet_file(out_dir: str, shard: str) -> Location:
    split, index = shard.split("/")
    return storage.join(storage.at(out_dir), "parquet", split, f"shard-{index}.parquet")


def npy_files(out_dir: str, shard: str) -> tuple[Location, Location]:
    """The embeddings and the metadata of a shard in clip-retrieval's layout (N: the shard's
    index, unpadded, as clip-retrieval numbers its parts)."""
    split, index = shard.split("/")
    base = storage.join(storage.at(out_dir), "npy", split)
    n = int(index)
    return (storage.join(base, "img_emb", f"img_emb_{n}.npy"),
            storage.join(base, "metadata", f"metadata_{n}.parquet"))


def output_folders(out_dir: str, formats: list[str], splits: list[str]) -> dict[str, dict[str, str]]:
    """Where each split's ``parquet`` and ``npy`` outputs are: format -> split -> folder."""
    base = storage.at(out_dir)
    folders = {"parquet": lambda s: storage.join(base, "parquet", s),
               "npy": lambda s: storage.join(base, "npy", s, "img_emb")}
    return {f: {s: str(folders[f](s)) for s in splits} for f in formats if f in folders}


def _table(sources: list[str], labels: np.ndarray, split: str, keys: list[str] | None = None):
    import pyarrow as pa

    return pa.table({
        "key": pa.array(keys if keys is not None else [key_of(s) for s in sources], pa.string()),
        "source": pa.array(sources, pa.string()),
        "label": pa.array(np.asarray(labels, np.int64), pa.int64()),
        "split": pa.array([split] * len(sources), pa.string()),
    })


def _parquet_bytes(table, meta: dict) -> bytes:
    import pyarrow.parquet as pq

    table = table.replace_schema_metadata({META_KEY: json.dumps(meta, sort_keys=True).encode()})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def write_outputs(out_dir: str, shard: str, formats: list[str], result, attrs: dict) -> None:
    """Write the shard's ``parquet`` and ``npy`` outputs that ``formats`` asks for, from
    ``result`` (a :class:`convoy.shared.features.ShardResult`); ``attrs``: the HDF5 shard's
    attributes, fingerprint included."""
    import pyarrow as pa

    feats = np.asarray(result.features)
    flat = feats.reshape(len(feats), int(np.prod(feats.shape[1:])))  # -1 cannot size an empty shard
    meta = {**attrs, "feature_shape": list(feats.shape[1:])}
    split = shard.split("/")[0]
    table = _table(result.paths, result.labels, split, getattr(result, "keys", None))
    if "parquet" in formats:
        values = pa.array(flat.reshape(-1), pa.from_numpy_dtype(flat.dtype))
        column = pa.FixedSizeListArray.from_arrays(values, flat.shape[1])
        storage.write_bytes(parquet_file(out_dir, shard),
                            _parquet_bytes(table.append_column("embedding", column), meta))
    if "npy" in formats:
        emb, metadata = npy_files(out_dir, shard)
        buf = io.BytesIO()
        np.save(buf, flat)
        storage.write_bytes(emb, buf.getvalue())
        storage.write_bytes(metadata, _parquet_bytes(table, meta))  # last: it holds the fingerprint


def _fingerprint(loc: Location) -> str | None:
    import pyarrow.parquet as pq

    try:
        with storage.open_read(loc) as fh:
            meta = pq.read_schema(fh).metadata or {}
    except (OSError, StoreError, ValueError):
        return None
    try:
        return json.loads(meta.get(META_KEY, b"{}")).get("fingerprint")
    except ValueError:
        return None


def missing_outputs(out_dir: str, shard: str, formats: list[str], fingerprint: str) -> list[str]:
    """The formats of ``formats`` whose file for ``shard`` is absent or from another run (read
    from the Parquet footer only); an ``npy`` output is current when its metadata file is (it is
    written after the embeddings)."""
    checks = {"parquet": lambda: parquet_file(out_dir, shard), "npy": lambda: npy_files(out_dir, shard)[1]}
    return [f for f in formats if f in checks and _fingerprint(checks[f]()) != fingerprint]
