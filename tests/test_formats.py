"""Features out as Parquet and NumPy (``--format``), read back with plain pyarrow and numpy, and a
FAISS index built from the npy layout as autofaiss would; inputs as WebDataset tars and Parquet
files of image bytes, equal to the same images in a folder."""

from __future__ import annotations

import io
import json
import os
import signal
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest

from convoy.shared.jobstore import JobStore, connect
from tests.conftest import convoy, submit_watched, wait_final, wait_until
from tests.imagegen import make_tree
from tests.s3server import s3, start_s3  # noqa: F401 - the fixture

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
    splits = ("train", "validation", "test")
    assert summary["embeddings"] == {"parquet": {s: str(out / "parquet" / s) for s in splits},
                                     "npy": {s: str(out / "npy" / s / "img_emb") for s in splits}}
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


@pytest.mark.slow  # six seconds; the formats' writing is covered by the test above
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

def test_brace_patterns_and_keys():
    from convoy.shared.embeddings import key_of
    from convoy.shared.storage import expand_braces

    assert expand_braces("s3://b/p/{00008..00011}.tar") == [f"s3://b/p/{n:05d}.tar" for n in range(8, 12)]
    assert expand_braces("d/{a,b}-{1..2}.tar") == ["d/a-1.tar", "d/a-2.tar", "d/b-1.tar", "d/b-2.tar"]
    assert key_of("00001.tar#a/b.seg.png") == "a/b" and key_of("train/cats/1.jpg") == "train/cats/1"
    assert key_of("part.parquet#17") == "17"


def test_tars_the_webdataset_package_writes_are_read_as_it_reads_them(loose, tmp_path):
    """Shards from ``webdataset.ShardWriter`` (as img2dataset writes them) read by Convoy give
    the samples ``webdataset.WebDataset`` itself yields: the same keys, images and labels."""
    wds = pytest.importorskip("webdataset")
    from convoy.shared.settings import Settings
    from convoy.workers.samples import read_samples

    files = sorted(loose.rglob("*.jpg"))
    with wds.ShardWriter(str(tmp_path / "%05d.tar"), maxcount=5, verbose=0) as sink:
        for path in files:
            sink.write({"__key__": path.relative_to(loose).with_suffix("").as_posix(), "jpg": path.read_bytes(),
                        "cls": int(path.parent.name == "stripes"), "json": {"label": path.parent.name}})
    theirs = [(s["__key__"], s["jpg"], int(s["cls"])) for s in
              wds.WebDataset(str(tmp_path / "{00000..00001}.tar"), shardshuffle=False)]
    ours = [(s.key, s.data, s.label) for n in range(2)
            for s in read_samples("webdataset", f"{n:05d}.tar", 0, tmp_path / f"{n:05d}.tar", {}, ["blobs", "stripes"],
                                  Settings(data_roots=(tmp_path,)))]
    assert ours == theirs and len(ours) == len(files)


def test_a_truncated_tar_keeps_the_samples_before_the_cut_and_names_where(loose, tmp_path):
    from convoy.shared.settings import Settings
    from convoy.workers.samples import read_samples

    whole = make_tars(loose, tmp_path / "wds", per_tar=8)[0].read_bytes()
    cut = tmp_path / "cut" / "00000.tar"
    cut.parent.mkdir()
    cut.write_bytes(whole[: len(whole) * 2 // 3])  # in the middle of some member
    samples = list(read_samples("webdataset", "00000.tar", 0, cut, {}, ["blobs", "stripes"],
                                Settings(data_roots=(cut.parent,))))
    good, bad = [s for s in samples if s.data], [s for s in samples if s.reason]
    assert 3 <= len(good) < 8 and [s.label for s in good] == [0] * min(4, len(good)) + [1] * (len(good) - 4)
    assert len(bad) == 1 and "truncated" in bad[0].reason and bad[0].source.startswith("00000.tar#")

def test_a_member_over_the_workers_one_image_share_is_skipped_unread(loose, tmp_path):
    from convoy.shared import memory
    from convoy.shared.settings import Settings
    from convoy.workers.samples import read_samples

    jpeg = next(loose.rglob("*.jpg")).read_bytes()
    path = tmp_path / "big" / "00000.tar"
    path.parent.mkdir()
    with tarfile.open(path, "w") as tar:
        _member(tar, "a.jpg", jpeg)
        _member(tar, "a.cls", b"0")
        _member(tar, "b.jpg", jpeg + b"\0" * (4 * len(jpeg)))  # a JPEG with a long tail: 5x the size
        _member(tar, "b.cls", b"1")
        _member(tar, "c.jpg", jpeg)
        _member(tar, "c.cls", b"1")
    memory.set_image_limit(int(len(jpeg) * 3 / memory.IMAGE_SHARE))  # one image may take 3x a.jpg
    try:
        samples = list(read_samples("webdataset", "00000.tar", 0, path, {}, ["blobs", "stripes"],
                                    Settings(data_roots=(path.parent,))))
    finally:
        memory.set_image_limit(0)
    assert [(s.key, s.data is not None) for s in samples] == [("a", True), ("b", False), ("c", True)]
    assert samples[1].source == "00000.tar#b.jpg" and "out of memory budget: member b.jpg" in samples[1].reason


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
                _member(tar, f"{key}.json", json.dumps({"label": path.parent.name, "split": _split_of(key)}).encode())
    if bad:
        good = files[0].read_bytes()
        with tarfile.open(out / f"{len(groups):05d}.tar", "w") as tar:
            for key, data in (("bad/text", b"not an image at all"), ("bad/half", good[: len(good) // 2])):
                _member(tar, f"{key}.jpg", data)
                _member(tar, f"{key}.cls", b"0")
            _member(tar, "bad/lonely.json", b'{"label": "blobs"}')
            _member(tar, "bad/elsewhere.cls", b"0")
            _member(tar, "bad/elsewhere.jpg", good)
            _member(tar, "bad/elsewhere.json", b'{"label": "blobs", "split": "holdout"}')
    return sorted(out.glob("*.tar"))


def _split_of(key: str) -> str:
    """The split folder a test image came from (train/blobs/img-000), else all."""
    first = key.split("/")[0]
    return first if first in ("train", "validation", "test") else "all"


@pytest.fixture(scope="module")
def loose(tmp_path_factory) -> Path:
    """DATA/{blobs,stripes}/img-NNN.jpg: 4 JPEGs per class."""
    return make_tree(tmp_path_factory.mktemp("loose") / "data", {"": 4}, splits=("",), fmt="jpg")


def test_webdataset_tars_one_shard_each_bad_members_skipped_by_name(cluster, loose, tmp_path):
    make_tars(loose, tmp_path / "wds", per_tar=3, bad=True)
    out = tmp_path / "out"
    summary = _run(cluster, tmp_path / "wds", out, "--classes", "blobs,stripes", "--format", "parquet")
    assert summary["images"] == 9 and summary["shards"] == 4  # 3 tars of images, one of bad members (and one good)
    state = JobStore(connect(cluster.url)).status(summary["job_id"])
    assert state["images_total"] == state["images_done"] == "12"  # each tar's samples, counted as it was read
    reasons = {s["path"]: s["reason"] for s in summary["skipped"]}
    assert set(reasons) == {"00003.tar#bad/text.jpg", "00003.tar#bad/half.jpg", "00003.tar#bad/lonely"}, reasons
    assert "not an image" in reasons["00003.tar#bad/text.jpg"]
    assert "truncated" in reasons["00003.tar#bad/half.jpg"] or "corrupt" in reasons["00003.tar#bad/half.jpg"]
    assert "no image" in reasons["00003.tar#bad/lonely"] and "bad/lonely.json" in reasons["00003.tar#bad/lonely"]
    table = pq.read_table(out / "parquet" / "all")
    assert table["source"].to_pylist()[:2] == ["00000.tar#blobs/img-000.jpg", "00000.tar#blobs/img-001.jpg"]
    assert table["key"].to_pylist()[0] == "blobs/img-000"
    assert table["label"].to_pylist() == [0] * 4 + [1] * 4 + [0]
    assert _h5(summary["features"]["all"])["paths"] == table["source"].to_pylist()


@pytest.mark.slow  # the store test names tars by pattern too
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
                        (["--split", "nope"], "--split"),
                        (["--split", "train", "--split-field", "split"], "not both")):
        proc = convoy("run", str(tmp_path / "wds"), "--out", str(tmp_path / "out"), *FAST, *args)
        assert proc.returncode == 2 and words in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
    proc = convoy("run", str(tmp_path / "wds" / "{00000..00002}.tar"), "--out", str(tmp_path / "out"), *FAST)
    assert proc.returncode == 2 and "00002.tar does not exist (1 of the 3 files" in proc.stderr, proc.stderr
    proc = convoy("run", str(loose), "--out", str(tmp_path / "out"), *FAST, "--label-field", "label")
    assert proc.returncode == 2 and "--label-field reads WebDataset" in proc.stderr, proc.stderr


@pytest.mark.slow  # a dozen seconds of fault and recovery
def test_a_worker_process_killed_mid_tar_leaves_every_image_once(private, tmp_path):
    """Invariant: every sample of every tar is in the merged file once, in tar order, after the
    process extracting a tar was SIGKILLed with part of that tar decoded."""
    images = make_tree(tmp_path / "loose", {"": 10}, splits=("",), size_px=48, fmt="jpg")
    make_tars(images, tmp_path / "wds", per_tar=10)
    private.start("k1", extra_env={"CONVOY_FAULTS": "mid-decode=delay:0.15"})
    out = tmp_path / "out"
    job = submit_watched(private.url, str(tmp_path / "wds"), "--out", str(out), "--input-size", "32",
                         "--weights", "none", "--batch-size", "1", "--format", "parquet")
    shard, state = wait_until(lambda: _running(private.store, job), 120, "a tar under way")
    os.kill(int(state["pid"]), signal.SIGKILL)
    final = wait_final(private.store, job)
    assert final["status"] == "done", (final, private.logs())
    assert int(private.store.shard_states(job)[shard]["deliveries"]) >= 2
    expected = [f"{n:05d}.tar#{p.relative_to(images).with_suffix('.jpg').as_posix()}"
                for n, p in ((i // 10, p) for i, p in enumerate(sorted(images.rglob("*.jpg"))))]
    assert _h5(out / "features" / "all.h5")["paths"] == expected
    assert pq.read_table(out / "parquet" / "all")["source"].to_pylist() == expected


def _running(store, job: str):
    """A tar being extracted with two samples done (its shard and state), or None."""
    for shard, state in store.shard_states(job).items():
        if state.get("state") == "running" and state.get("pid") and int(state.get("done", 0)) >= 2:
            return shard, state
    return None


@pytest.mark.slow  # most of a minute: three embedded runs and one on the cluster
def test_tars_by_prefix_and_brace_pattern_and_parquet_bytes_on_a_store_outputs_there(cluster, s3, loose, tmp_path):  # noqa: F811
    """Tars on the S3 server, read by prefix (one listing) and by brace pattern (none), outputs
    written there and read back with plain pyarrow: equal to the same tars in a folder, and the
    second run, naming the same tars by pattern, reuses every finished tar. Parquet image bytes
    there give the same embeddings."""
    import s3fs

    tars = make_tars(loose, tmp_path / "wds", per_tar=3)
    s3.bucket("wds")
    s3.upload_tree(tmp_path / "wds", "s3://wds/shards")
    env = {**s3.env, "XDG_CACHE_HOME": str(tmp_path / "cache"), "CONVOY_STATE_DIR": str(tmp_path / "state")}
    store_args = ("--workers", "1", "--classes", "blobs,stripes", "--format", "parquet,npy")
    first = _run(None, "s3://wds/shards", "s3://wds/out", *store_args, env=env)
    assert first["images"] == 8 and first["shards"] == len(tars) == 3
    requests = s3.log.read_text().splitlines()
    assert len([line for line in requests if "list-type=2&prefix=shards" in line]) == 1  # the scan's one listing
    before = len(requests)
    again = _run(None, f"s3://wds/shards/{{00000..{len(tars) - 1:05d}}}.tar", "s3://wds/out", *store_args, env=env)
    assert again["reused_shards"] == 3 and again["extracted_images"] == 0, again
    listings = [line for line in s3.log.read_text().splitlines()[before:] if "list-type=2&prefix=shards" in line]
    assert not listings, listings
    local = _run(cluster, tmp_path / "wds", tmp_path / "out", "--classes", "blobs,stripes")
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3.endpoint}, key=env["AWS_ACCESS_KEY_ID"],
                           secret=env["AWS_SECRET_ACCESS_KEY"])
    table = pq.read_table("wds/out/parquet/all", filesystem=fs)
    want = _h5(local["features"]["all"])
    assert table["source"].to_pylist() == want["paths"]
    np.testing.assert_array_equal(np.stack(table["embedding"].to_numpy(zero_copy_only=False)),
                                  want["features"].reshape(8, -1))
    with fs.open("wds/out/npy/all/img_emb/img_emb_2.npy", "rb") as fh:
        np.testing.assert_array_equal(np.load(fh), want["features"][6:].reshape(2, -1))
    # Parquet image bytes on the store too: row groups read in ranges, the same features.
    make_parquet(loose, tmp_path / "pq" / "a.parquet", rows_per_group=3)
    s3.upload_tree(tmp_path / "pq", "s3://wds/pq")
    rows = _run(None, "s3://wds/pq", "s3://wds/pq-out", "--workers", "1", "--image-column", "jpg",
                "--label-column", "label", "--format", "parquet", env=env)
    assert rows["shards"] == 3 and rows["images"] == 8
    got = pq.read_table("wds/pq-out/parquet/all", filesystem=fs)
    assert got["key"].to_pylist() == table["key"].to_pylist() and got["label"] == table["label"]
    assert got["embedding"] == table["embedding"]


# --- Parquet of image bytes ------------------------------------------------------------------

def make_parquet(images: Path, path: Path, rows_per_group: int, bad: bool = False) -> Path:
    """A Parquet file as img2dataset's parquet output holds images: ``key``, ``jpg`` (the bytes),
    ``label`` (the class name); ``bad``: rows with no bytes and with bytes of no image."""
    import pyarrow as pa

    files = sorted(images.rglob("*.jpg"))
    keys = [p.relative_to(images).with_suffix("").as_posix() for p in files]
    rows = {"key": keys, "jpg": [p.read_bytes() for p in files], "label": [p.parent.name for p in files],
            "split": [_split_of(k) for k in keys]}
    if bad:
        rows = {"key": [*rows["key"], "bad/none", "bad/text"], "jpg": [*rows["jpg"], None, b"no image"],
                "label": [*rows["label"], "blobs", "stripes"], "split": [*rows["split"], "holdout", "all"]}
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(rows), path, row_group_size=rows_per_group)
    return path


def test_parquet_image_bytes_one_shard_per_row_group_labels_from_a_column(cluster, loose, tmp_path):
    data = make_parquet(loose, tmp_path / "pq" / "part-00000.parquet", rows_per_group=4, bad=True)
    summary = _run(cluster, data, tmp_path / "out", "--image-column", "jpg", "--label-column", "label",
                   "--split", "test", "--format", "npy")
    assert summary["images"] == 8 and summary["shards"] == 3  # 10 rows in row groups of 4
    state = JobStore(connect(cluster.url)).status(summary["job_id"])
    assert state["images_total"] == state["images_done"] == "10"  # the rows, counted from the footer
    reasons = {s["path"]: s["reason"] for s in summary["skipped"]}
    assert "no image bytes in column 'jpg'" in reasons["part-00000.parquet#8"]
    assert "not an image" in reasons["part-00000.parquet#9"]
    got = _h5(summary["features"]["test"])
    assert got["paths"][:2] == ["part-00000.parquet#0", "part-00000.parquet#1"]
    assert got["labels"].tolist() == [0] * 4 + [1] * 4  # class names from the column, sorted
    meta = pq.read_table(tmp_path / "out" / "npy" / "test" / "metadata" / "metadata_0.parquet")
    assert meta["key"].to_pylist() == [f"blobs/img-{i:03d}" for i in range(4)]


def test_a_hugging_face_image_column_is_read_too(loose, tmp_path):
    """Hugging Face datasets store an Image feature as a struct {bytes, path}."""
    import pyarrow as pa

    from convoy.shared.settings import Settings
    from convoy.workers.samples import read_samples

    files = sorted(loose.rglob("*.jpg"))[:3]
    path = tmp_path / "hf.parquet"
    pq.write_table(pa.table({"image": [{"bytes": p.read_bytes(), "path": p.name} for p in files]}), path)
    samples = list(read_samples("parquet", "hf.parquet", 0, path, {"image_column": "image"}, [],
                                Settings(data_roots=(tmp_path,))))
    assert [s.data for s in samples] == [p.read_bytes() for p in files] and [s.key for s in samples] == ["0", "1", "2"]


def test_parquet_options_are_checked_at_the_edge(loose, tmp_path):
    data = make_parquet(loose, tmp_path / "pq" / "a.parquet", rows_per_group=4)
    for args, words in ((["--image-column", "png"], "no column 'png' (--image-column)"),
                        (["--image-column", "jpg", "--label-column", "class"], "no column 'class'"),
                        (["--image-column", "jpg", "--label-field", "x"], "--label-field does not apply")):
        proc = convoy("run", str(data), "--out", str(tmp_path / "out"), *FAST, *args)
        assert proc.returncode == 2 and words in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


# --- fidelity ----------------------------------------------------------------------------------

@pytest.mark.parametrize("decode", ["exact", pytest.param("fast", marks=pytest.mark.slow)])
def test_a_folder_a_tar_and_parquet_bytes_give_the_same_features_bit_for_bit(cluster, tmp_path, decode):
    """The same JPEGs (large enough that ``fast`` decodes them shrunk) as loose files, WebDataset
    tars and Parquet bytes: the same pixels through the one decoder, so equal features."""
    images = make_tree(tmp_path / "loose", {"": 3}, splits=("",), size_px=80, fmt="jpg")
    make_tars(images, tmp_path / "wds", per_tar=4)
    make_parquet(images, tmp_path / "pq" / "a.parquet", rows_per_group=2)
    args = ("--decode", decode, "--pooling", "avg", "--format", "parquet")
    runs = {"folder": (images,), "tar": (tmp_path / "wds",),
            "parquet": (tmp_path / "pq", "--image-column", "jpg", "--label-column", "label")}
    with ThreadPoolExecutor(3) as pool:  # three jobs on the cluster at once: a third of the wait
        list(pool.map(lambda kv: _run(cluster, kv[1][0], tmp_path / kv[0], *args, *kv[1][1:]), runs.items()))
    tables = {name: pq.read_table(tmp_path / name / "parquet" / "all").sort_by("key") for name in runs}
    keys = tables["folder"]["key"].to_pylist()
    assert len(keys) == 6 and all(t["key"].to_pylist() == keys for t in tables.values())
    emb = {name: np.stack(t["embedding"].to_numpy(zero_copy_only=False)) for name, t in tables.items()}
    assert np.array_equal(emb["folder"], emb["tar"]) and np.array_equal(emb["folder"], emb["parquet"])
    assert tables["folder"]["label"].to_pylist() == tables["parquet"]["label"].to_pylist()


@pytest.mark.slow  # a dozen seconds: training and Grad-CAM
def test_training_grad_cam_and_report_from_tars_with_parquet_asked_for(cluster, tmp_path):
    """A labelled WebDataset job trains (its one split held out), draws Grad-CAM maps of test
    samples read back out of their tars, and reports; asked for Parquet, it keeps the HDF5
    shard files training reads."""
    images = make_tree(tmp_path / "loose", {"": 8}, splits=("",), fmt="jpg")
    make_tars(images, tmp_path / "wds", per_tar=6)
    out = tmp_path / "out"
    proc = convoy("run", str(tmp_path / "wds"), "--out", str(out), "--json", "--input-size", "32", "--weights", "none",
                  "--classes", "blobs,stripes", "--format", "parquet", "--epochs", "1", "--cam", "2", env=cluster.env)
    assert proc.returncode == 0, proc.stderr[-3000:] + cluster.logs()
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["cam"]["rows"] == 2, summary["cam"]
    with h5py.File(summary["cam"]["heatmaps"]) as f:
        assert all(".tar#" in p for p in f["paths"].asstr()[()]), f["paths"][()]
    assert (out / "model" / "full_model.keras").exists() and pq.read_table(out / "parquet" / "all").num_rows == 16
    report = convoy("report", str(out), check=True).stdout.strip()
    page = (out / "report.html").read_text()
    assert report.endswith("report.html") and ".tar#" in page and "webdataset" in page and "hdf5, parquet" in page


@pytest.mark.slow  # a dozen seconds: two runs
def test_split_field_of_webdataset_json_and_of_a_parquet_column(cluster, tmp_path):
    """Each sample's split from its .json (a tar is a shard of each split, keeping its own) or
    from a Parquet column (a row group is a shard of each split it holds): the same rows per
    split both ways; a sample naming no split is reported once."""
    images = make_tree(tmp_path / "loose", {"train": 3, "validation": 1, "test": 1}, fmt="jpg")
    make_tars(images, tmp_path / "wds", per_tar=4, bad=True)
    make_parquet(images, tmp_path / "pq" / "a.parquet", rows_per_group=4, bad=True)
    tars = _run(cluster, tmp_path / "wds", tmp_path / "o1", "--split-field", "split", "--classes", "blobs,stripes")
    rows = _run(cluster, tmp_path / "pq", tmp_path / "o2", "--split-field", "split", "--image-column", "jpg",
                "--label-column", "label")
    assert tars["shards"] == 3 * 4 and tars["images"] == rows["images"] == 10
    assert [s["path"] for s in tars["skipped"]].count("00003.tar#bad/elsewhere.json") == 1, tars["skipped"]
    assert "'holdout'" in {s["path"]: s["reason"] for s in rows["skipped"]}["a.parquet#10"]
    for split, n in (("train", 6), ("validation", 2), ("test", 2)):
        a, b = _h5(tars["features"][split]), _h5(rows["features"][split])
        assert len(a["paths"]) == n and all(p.split("#")[1].startswith(split + "/") for p in a["paths"])
        assert np.array_equal(a["features"], b["features"]) and a["labels"].tolist() == b["labels"].tolist()
