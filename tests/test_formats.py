"""Features out as Parquet and NumPy (``--format``), read back with plain pyarrow and numpy, and a
FAISS index built from the npy layout as autofaiss would; inputs as WebDataset tars and Parquet
files of image bytes, equal to the same images in a folder."""

from __future__ import annotations

import json
import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.conftest import convoy

FAST = ["--input-size", "32", "--weights", "none", "--seed", "3", "--no-train"]


def _run(cluster, data, out, *extra: str, env: dict | None = None) -> dict:
    proc = convoy("run", str(data), "--out", str(out), "--json", *FAST, *extra,
                  env={**(cluster.env if cluster else {}), **(env or {})})
    assert proc.returncode == 0, proc.stderr[-3000:] + (cluster.logs() if cluster else "")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _h5(path) -> dict:
    with h5py.File(path) as f:
        return {"features": f["features"][()], "labels": f["labels"][()], "paths": f["paths"].asstr()[()].tolist()}


def test_parquet_and_npy_outputs_hold_the_hdf5_features_and_faiss_indexes_them(cluster, images_tree, tmp_path):
    import faiss

    out = tmp_path / "out"
    summary = _run(cluster, images_tree, out, "--shard-size", "5", "--format", "npy,parquet,hdf5")
    train = _h5(summary["features"]["train"])
    # Parquet: a split's folder is one dataset; three lines of pyarrow.
    table = pq.read_table(out / "parquet" / "train")
    emb = np.stack(table["embedding"].to_numpy(zero_copy_only=False))
    assert table.column_names == ["key", "source", "label", "split", "embedding"]
    assert table["source"].to_pylist() == train["paths"] and set(table["split"].to_pylist()) == {"train"}
    assert table["key"].to_pylist()[0] == train["paths"][0].rsplit(".", 1)[0]
    assert table["label"].to_pylist() == train["labels"].tolist()
    np.testing.assert_array_equal(emb, train["features"].reshape(len(emb), -1))
    meta = json.loads(table.schema.metadata[b"convoy"])
    assert meta["feature_shape"] == list(train["features"].shape[1:]) and meta["layer"] == "block5_pool"
    # npy: clip-retrieval's layout, parts numbered like its own, metadata row for row.
    base = out / "npy" / "train"
    assert sorted(p.name for p in (base / "img_emb").iterdir()) == ["img_emb_0.npy", "img_emb_1.npy", "img_emb_2.npy"]
    parts = [np.load(base / "img_emb" / f"img_emb_{n}.npy") for n in range(3)]
    metas = [pq.read_table(base / "metadata" / f"metadata_{n}.parquet") for n in range(3)]
    np.testing.assert_array_equal(np.concatenate(parts), emb)
    assert sum((m["source"].to_pylist() for m in metas), []) == train["paths"]
    # autofaiss's way: every img_emb_N.npy in N order, into a flat L2 index (a row finds itself).
    index = faiss.IndexFlatL2(parts[0].shape[1])
    for part in parts:
        index.add(np.ascontiguousarray(part, dtype=np.float32))
    assert index.ntotal == len(train["paths"])
    _, found = index.search(np.ascontiguousarray(parts[1][:1], dtype=np.float32), 1)
    assert metas[1]["source"][0].as_py() == train["paths"][int(found[0, 0])]
    assert not list(out.rglob(".*.tmp-*"))


def test_a_format_asked_for_on_resume_is_made_from_the_finished_shards(cluster, images_tree, tmp_path):
    out = tmp_path / "out"
    first = _run(cluster, images_tree, out, "--shard-size", "10")
    assert not (out / "parquet").exists() and not (out / "npy").exists()
    again = _run(cluster, images_tree, out, "--shard-size", "10", "--format", "parquet,npy")
    assert again["reused_shards"] == first["shards"]  # nothing extracted twice
    table = pq.read_table(out / "parquet" / "test")
    np.testing.assert_array_equal(np.stack(table["embedding"].to_numpy(zero_copy_only=False)),
                                  _h5(again["features"]["test"])["features"].reshape(table.num_rows, -1))
    assert np.load(out / "npy" / "validation" / "img_emb" / "img_emb_0.npy").shape[0] == 4


@pytest.mark.parametrize("value", ["csv", "", "parquet,,hdf5x"])
def test_a_bad_format_is_a_usage_error_that_creates_nothing(images_tree, tmp_path, value):
    proc = convoy("run", str(images_tree), "--out", str(tmp_path / "out"), "--format", value, *FAST)
    assert proc.returncode == 2 and "--format" in proc.stderr and "hdf5, parquet, npy" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
