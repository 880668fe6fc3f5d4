"""Features out as Parquet and NumPy (``--format``), read back with plain pyarrow and numpy, and a
FAISS index built from the npy layout as autofaiss would; inputs as WebDataset tars and Parquet
files of image bytes, equal to the same images in a folder."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.conftest import convoy
from tests.imagegen import make_tree

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


# --- WebDataset tars -----------------------------------------------------------------------

def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_tars(images: Path, out: Path, per_tar: int, bad: bool = False) -> list[Path]:
    """WebDataset shards of a DATA/{class}/*.jpg folder, as img2dataset and ``webdataset.ShardWriter``
    write them: ``<class>/<stem>.jpg`` with ``.cls`` (its class index) and ``.json`` ({"label":
    class name}); ``bad``: a last tar of a non-image, a truncated JPEG and a sample with no image."""
    files = sorted(images.rglob("*.jpg"))
    classes = sorted({p.parent.name for p in files})
    out.mkdir(parents=True, exist_ok=True)
    groups = [files[lo : lo + per_tar] for lo in range(0, len(files), per_tar)]
    for n, group in enumerate(groups):
        with tarfile.open(out / f"{n:05d}.tar", "w") as tar:
            for path in group:
                key = path.relative_to(images).with_suffix("").as_posix()
                _member(tar, f"{key}.jpg", path.read_bytes())
                _member(tar, f"{key}.cls", str(classes.index(path.parent.name)).encode())
                _member(tar, f"{key}.json", json.dumps({"label": path.parent.name}).encode())
    if bad:
        good = files[0].read_bytes()
        with tarfile.open(out / f"{len(groups):05d}.tar", "w") as tar:
            for key, data in (("bad/text", b"not an image at all"), ("bad/half", good[: len(good) // 2])):
                _member(tar, f"{key}.jpg", data)
                _member(tar, f"{key}.cls", b"0")
            _member(tar, "bad/lonely.json", b'{"label": "blobs"}')
    return sorted(out.glob("*.tar"))


@pytest.fixture(scope="module")
def loose(tmp_path_factory) -> Path:
    """DATA/{blobs,stripes}/img-NNN.jpg: 4 JPEGs per class."""
    return make_tree(tmp_path_factory.mktemp("loose") / "data", {"": 4}, splits=("",), fmt="jpg")


def test_webdataset_tars_one_shard_each_bad_members_skipped_by_name(cluster, loose, tmp_path):
    make_tars(loose, tmp_path / "wds", per_tar=3, bad=True)
    out = tmp_path / "out"
    summary = _run(cluster, tmp_path / "wds", out, "--classes", "blobs,stripes", "--format", "parquet")
    assert summary["images"] == 8 and summary["shards"] == 4  # 3 tars of images, one of bad members
    reasons = {s["path"]: s["reason"] for s in summary["skipped"]}
    assert set(reasons) == {"00003.tar#bad/text.jpg", "00003.tar#bad/half.jpg", "00003.tar#bad/lonely"}, reasons
    assert "not an image" in reasons["00003.tar#bad/text.jpg"]
    assert "truncated" in reasons["00003.tar#bad/half.jpg"] or "corrupt" in reasons["00003.tar#bad/half.jpg"]
    assert "no image" in reasons["00003.tar#bad/lonely"] and "bad/lonely.json" in reasons["00003.tar#bad/lonely"]
    table = pq.read_table(out / "parquet" / "all")
    assert table["source"].to_pylist()[:2] == ["00000.tar#blobs/img-000.jpg", "00000.tar#blobs/img-001.jpg"]
    assert table["key"].to_pylist()[0] == "blobs/img-000"
    assert table["label"].to_pylist() == [0] * 4 + [1] * 4
    assert _h5(summary["features"]["all"])["paths"] == table["source"].to_pylist()


def test_webdataset_brace_pattern_json_label_field_and_split(cluster, loose, tmp_path):
    make_tars(loose, tmp_path / "wds", per_tar=5)
    summary = _run(cluster, str(tmp_path / "wds" / "{00000..00001}.tar"), tmp_path / "out",
                   "--label-field", "label", "--classes", "stripes,blobs", "--split", "train")
    got = _h5(summary["features"]["train"])
    assert summary["shards"] == 2 and len(got["paths"]) == 8
    assert got["labels"].tolist() == [1] * 4 + [0] * 4  # names looked up in --classes' order


def test_webdataset_options_are_checked_at_the_edge(loose, tmp_path):
    make_tars(loose, tmp_path / "wds", per_tar=5)
    for args, words in ((["--label-column", "x"], "--label-column does not apply"),
                        (["--classes", "a,a"], "--classes"),
                        (["--split", "nope"], "--split")):
        proc = convoy("run", str(tmp_path / "wds"), "--out", str(tmp_path / "out"), *FAST, *args)
        assert proc.returncode == 2 and words in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
    proc = convoy("run", str(loose), "--out", str(tmp_path / "out"), *FAST, "--label-field", "label")
    assert proc.returncode == 2 and "--label-field reads WebDataset" in proc.stderr, proc.stderr
