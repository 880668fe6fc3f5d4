"""HDF5 files that point elsewhere (external storage, external links, virtual datasets onto files
outside) are refused wherever Convoy reads one, before any of their data is read: a user who
writes into OUT cannot have a worker copy another file into it."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest

from convoy.shared import hdf5
from convoy.shared.errors import HDF5Refused, ModelError, WeightsError
from convoy.shared.features import (
    ShardResult,
    merge_split,
    open_features,
    read_shard_summary,
    shard_fingerprint,
    write_shard,
)
from convoy.shared.heatmaps import CamRows, read_rows, write_rows
from convoy.shared.job import sha256_file
from tests.conftest import convoy, send_all, wait_final
from tests.imagegen import make_flat

SECRET = b"AWS_SECRET_ACCESS_KEY=planted-secret-0123456789"
KINDS = ["external", "external-link", "virtual", "none"]
REASONS = {"external": "stored in an external file", "external-link": "is an external link",
           "virtual": "is virtual|not a file beside it"}


@pytest.fixture()
def outside(tmp_path) -> tuple[Path, Path]:
    """A secret file outside OUT, and an HDF5 file outside OUT whose ``data`` holds it."""
    where = tmp_path / "elsewhere"
    where.mkdir()
    secret = where / "secret"
    secret.write_bytes(SECRET * 200)
    h5 = where / "outside.h5"
    with h5py.File(h5, "w") as f:
        f["data"] = np.frombuffer(secret.read_bytes()[:4096], np.uint8)
    return secret, h5


def plant(path: Path, dataset: str, kind: str, secret: Path | str, outside_h5: Path | None = None) -> None:
    """Replace ``dataset`` of a file Convoy wrote with a pointer of ``kind``, same shape and type."""
    with h5py.File(path, "a") as f:
        shape, dtype = f[dataset].shape, f[dataset].dtype
        if kind == "none":
            return
        del f[dataset]
        if kind == "external":
            f.create_dataset(dataset, shape=shape, dtype=dtype, external=[(str(secret), 0, h5py.h5f.UNLIMITED)])
        elif kind == "external-link":
            with h5py.File(outside_h5, "a") as o:
                o.require_dataset(dataset, shape=shape, dtype=dtype)
            f[dataset] = h5py.ExternalLink(str(outside_h5), dataset)
        else:
            with h5py.File(outside_h5, "a") as o:
                o.require_dataset(dataset, shape=shape, dtype=dtype)
            layout = h5py.VirtualLayout(shape=shape, dtype=dtype)
            layout[...] = h5py.VirtualSource(str(outside_h5), dataset, shape=shape)
            f.create_virtual_dataset(dataset, layout)


# --- each place Convoy reads an HDF5 file, through its own reader ------------------------------

def _shard(path: Path) -> None:
    result = ShardResult(np.ones((2, 1, 1, 4), np.float32), np.array([0, 1]), ["a.jpg", "b.jpg"])
    write_shard(path, result, {"fingerprint": "fp", "layer": "block5_pool"})


def _pixel_cache(out: Path) -> tuple[Path, str, object]:
    from convoy.workers import pixel_cache

    path = out / "pixels" / "key.h5"
    pixel_cache.write(path, np.zeros((2, 4, 4, 3), np.uint8), [0, 1], [(1, 1), (2, 2)])
    return path, "pixels", lambda: pixel_cache.read(path)


def _shard_file(out: Path) -> tuple[Path, str, object]:
    path = out / "features" / "all" / "shard-00000.h5"
    _shard(path)
    return path, "features", lambda: read_shard_summary(path)


def _merged_file(out: Path) -> tuple[Path, str, object]:
    _shard(out / "features" / "all" / "shard-00000.h5")
    path = merge_split(out / "features" / "all.h5", [out / "features" / "all" / "shard-00000.h5"], {})

    def read():
        from convoy.shared import trainset

        with open_features(out, "all") as f:
            f["features"][()]
        split = trainset.SplitRows(path, np.arange(2), np.array([0, 1]), ["a.jpg", "b.jpg"])
        return trainset.read_features(split)
    return path, "features", read


def _heatmaps(out: Path) -> tuple[Path, str, object]:
    path = out / "cam" / "heatmaps.h5"
    n = np.zeros(1)
    write_rows(path, CamRows(np.zeros((1, 2, 2), np.float32), ["a.jpg"], n, n, n, n, [""], n, ["o.png"], ["a.png"]),
               {"layer": "block5_conv3"})
    return path, "heatmaps", lambda: read_rows(path)


def _weights(out: Path) -> tuple[Path, str, object]:
    from convoy.orchestrator.weights import check_loads

    path = out / "weights" / "vgg16-random-seed0.weights.h5"
    path.parent.mkdir(parents=True)
    with h5py.File(path, "w") as f:
        f["layers/block1_conv1/vars/0"] = np.zeros((3, 3, 3, 64), np.float32)
    return path, "layers/block1_conv1/vars/0", lambda: check_loads("vgg16", path, "sha", None)


def _keras_member(out: Path) -> tuple[Path, str, object]:
    """A ``.keras`` archive's weights member: planted in the HDF5 file before it is zipped."""
    from convoy.shared.gradcam import load_model

    member = out / "model.weights.h5"
    with h5py.File(member, "w") as f:
        f["layers/dense/vars/0"] = np.zeros((4, 2), np.float32)
    path = out / "model" / "full_model.keras"
    path.parent.mkdir(parents=True)

    def read():
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("config.json", json.dumps({"class_name": "Sequential"}))
            z.write(member, "model.weights.h5")
        return load_model(path)
    return member, "layers/dense/vars/0", read


PLACES = {"pixel-cache": _pixel_cache, "shard": _shard_file, "merged": _merged_file, "heatmaps": _heatmaps,
          "weights": _weights, "keras-archive": _keras_member}


@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize("kind", KINDS)
def test_every_reader_refuses_a_planted_pointer_before_reading(place, kind, outside, tmp_path):
    """Each reader on a file Convoy wrote, then with one dataset turned into a pointer of ``kind``:
    the pointer is refused with its reason before anything is read through it (a pixel cache or a
    shard is treated as absent, so it is made again)."""
    secret, outside_h5 = outside
    out = tmp_path / "out"
    out.mkdir()
    path, dataset, read = PLACES[place](out)
    plant(path, dataset, kind, secret, outside_h5)
    if kind == "none":  # the file as Convoy wrote it passes (Keras itself is not run on toy weights)
        if place in ("weights", "keras-archive"):
            hdf5.check_for_keras(path, "weights file")
        else:
            assert read() is not None
        return
    if place == "pixel-cache":
        assert read() is None
        return
    if place == "shard":
        assert shard_fingerprint(path) is None
    with pytest.raises((HDF5Refused, WeightsError, ModelError), match=REASONS[kind]) as err:
        read()
    assert "refused" in str(err.value) and SECRET.decode() not in str(err.value)


@pytest.mark.parametrize("source", ["../elsewhere/outside.h5", "symlink", "no-mark", "absolute", "all/missing.h5"])
def test_a_merged_files_virtual_dataset_reads_only_shards_convoy_wrote_beside_it(source, outside, tmp_path):
    """The merged file's own virtual dataset is allowed, onto files under its folder that carry
    Convoy's fingerprint; a source outside (by ``..``, a symlink, an absolute name), without the
    fingerprint, or missing (HDF5 would then look in the working folder) is refused."""
    secret, outside_h5 = outside
    features = tmp_path / "out" / "features"
    shard = features / "all" / "shard-00000.h5"
    _shard(shard)
    merged = merge_split(features / "all.h5", [shard], {})
    with hdf5.open_read(merged, "merged", virtual=True) as f:  # Convoy's own: it reads
        assert f["features"].shape == (2, 1, 1, 4)
    (tmp_path / "out" / "elsewhere").symlink_to(outside_h5.parent)
    with h5py.File(outside_h5, "a") as o:
        o.create_dataset("features", data=np.zeros((2, 1, 1, 4), np.float32))
    names = {"symlink": "all/link.h5", "no-mark": "all/plain.h5", "absolute": str(outside_h5)}
    name = names.get(source, source)
    (features / "all" / "link.h5").symlink_to(outside_h5)
    with h5py.File(features / "all" / "plain.h5", "w") as plain:
        plain.create_dataset("features", data=np.zeros((2, 1, 1, 4), np.float32))
    with h5py.File(merged, "a") as f:
        del f["features"]
        layout = h5py.VirtualLayout(shape=(2, 1, 1, 4), dtype=np.float32)
        layout[...] = h5py.VirtualSource(name, "features", shape=(2, 1, 1, 4))
        f.create_virtual_dataset("features", layout)
    with pytest.raises(HDF5Refused, match="refused"):
        hdf5.open_read(merged, "merged", virtual=True)
    with pytest.raises(HDF5Refused, match="is virtual"):  # where no virtual dataset belongs
        hdf5.open_read(merged, "merged")


def test_an_open_file_is_checked_and_read_by_its_descriptor(outside, tmp_path):
    """An already-open file (as a safe open hands it over) is checked and read as that very file,
    a merged file's virtual dataset included (resolved beside the file, not the working folder)."""
    secret, outside_h5 = outside
    features = tmp_path / "out" / "features"
    shard = features / "all" / "shard-00000.h5"
    _shard(shard)
    merged = merge_split(features / "all.h5", [shard], {})
    with open(merged, "rb") as fh, hdf5.open_read(fh, "merged", virtual=True) as f:
        np.testing.assert_array_equal(f["features"][()], np.ones((2, 1, 1, 4), np.float32))
    plant(shard, "labels", "external", secret)
    with open(merged, "rb") as fh, pytest.raises(HDF5Refused, match="external file"):
        hdf5.open_read(fh, "merged", virtual=True)  # a source that points elsewhere fails its merged file


# --- the workers ----------------------------------------------------------------------------------

def _run(cluster, data: Path, out: Path, *extra: str) -> dict:
    proc = convoy("run", str(data), "--out", str(out), "--json", "--input-size", "32", "--no-train",
                  "--shard-size", "1", "--cache-pixels", *extra, env=cluster.env)
    assert proc.returncode == 0, proc.stderr[-3000:] + cluster.logs()
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _everything_under(folder: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink())


@pytest.fixture(scope="module")
def clean(cluster, tmp_path_factory) -> tuple[Path, Path]:
    """Four images extracted with --cache-pixels, one shard each: (DATA, OUT) as Convoy wrote them."""
    root = tmp_path_factory.mktemp("pointers")
    data = make_flat(root / "data", 4, size_px=32)
    _run(cluster, data, root / "clean", "--weights", "none", "--seed", "0")
    return data, root / "clean"


def test_planted_pixel_caches_and_shards_are_decoded_again_and_nothing_leaks(cluster, clean, outside, tmp_path):
    """The headline case: OUT/pixels/<key>.h5 (and the shard file a rerun would reuse) with its
    data in a secret file, in /proc/self/environ, behind an external link, or a virtual dataset
    onto a file outside. Every one is refused with its reason, the images are decoded again, the
    features are those of a clean run, and neither the secret nor the worker's environment reaches
    OUT."""
    secret, outside_h5 = outside
    data, clean_out = clean
    weights = next((clean_out / "weights").glob("*.weights.h5"))  # the same fingerprints below
    out = tmp_path / "out"
    kinds = [("external", secret), ("external", "/proc/self/environ"), ("external-link", secret),
             ("virtual", secret)]
    caches = sorted((clean_out / "pixels").glob("*.h5"))
    shards = sorted((clean_out / "features" / "all").glob("shard-*.h5"))
    assert len(caches) == len(shards) == len(kinds)
    for (kind, target), cache, shard in zip(kinds, caches, shards, strict=True):
        for src, dataset in ((cache, "pixels"), (shard, "features")):
            planted = out / src.relative_to(clean_out)
            planted.parent.mkdir(parents=True, exist_ok=True)
            planted.write_bytes(src.read_bytes())
            plant(planted, dataset, kind, target, outside_h5)
    summary = _run(cluster, data, out, "--weights", str(weights))
    assert summary["extract_timings"]["decoded"] == 4  # no shard reused, no cached pixel served
    with open_features(clean_out, "all") as a, open_features(out, "all") as b:
        assert a["paths"].asstr()[()].tolist() == b["paths"].asstr()[()].tolist()
        np.testing.assert_array_equal(a["features"][()], b["features"][()])
    for path in [*(out / "pixels").glob("*.h5"), *(out / "features" / "all").glob("*.h5")]:
        hdf5.open_read(path, "rewritten").close()  # Convoy's own again
    written = _everything_under(out)
    assert SECRET not in written and b"CONVOY_BROKER_URL" not in written
    logs = "".join(p.read_text(errors="replace") for p in cluster.log_dir.glob("*.log"))
    for reason in ("stored in an external file ('/proc/self/environ')", "is an external link", "is virtual"):
        assert f"pixel cache {out}" in logs and reason in logs, reason


def test_a_forged_job_with_weights_that_point_elsewhere_fails_with_the_reason(cluster, clean, outside, tmp_path):
    """Real weights with one variable stored in a secret file, under the very hash the job records:
    the worker refuses them before Keras opens them (Keras would load the secret as weights); the
    job fails with the reason and nothing reaches OUT."""
    from convoy.shared.job import JobSpec, ModelConfig, new_job_id
    from convoy.shared.jobstore import JobStore, connect

    secret, _ = outside
    data, clean_out = clean
    weights = tmp_path / "w.weights.h5"
    weights.write_bytes(next((clean_out / "weights").glob("*.weights.h5")).read_bytes())
    with h5py.File(weights, "r") as f:
        sizes = []
        f.visititems(lambda name, obj: sizes.append((obj.nbytes, name)) if isinstance(obj, h5py.Dataset) else None)
    plant(weights, min(sizes)[1], "external", secret)  # a bias: the secret file covers it whole
    model = ModelConfig(layer="block5_pool", input_size_px=32, preprocess="vgg16", weights=str(weights),
                        weights_path=str(weights), weights_sha256=sha256_file(weights), batch_size=2,
                        dtype="float32")
    out = tmp_path / "out"
    spec = JobSpec(job_id=new_job_id(), data_dir=str(data), out_dir=str(out), model=model, class_names=[],
                   shard_ids=["all/00000"])
    store = JobStore(connect(cluster.url))
    send_all(cluster.url, store.create(spec, {"all/00000": [["img-000.jpg", -1], ["img-001.jpg", -1]]}, ttl_s=3600))
    state = wait_final(store, spec.job_id)
    assert state["status"] == "failed", state
    assert "stored in an external file" in state.get("error", ""), state
    assert not out.exists() or SECRET not in _everything_under(out)


def test_a_step_opens_hdf5_below_its_out_without_following_a_symlink(tmp_path):
    """A file under OUT that is a symlink to plain HDF5 data elsewhere is refused, not read: the
    step's reads below OUT go through the same no-symlink open as its writes."""
    from convoy.shared import storage

    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    (out / "pixels").mkdir(parents=True)
    elsewhere.mkdir()
    with h5py.File(elsewhere / "data.h5", "w") as f:
        f["pixels"] = np.arange(4)
    (out / "pixels" / "k.h5").symlink_to(elsewhere / "data.h5")
    with h5py.File(out / "pixels" / "real.h5", "w") as f:
        f["pixels"] = np.arange(3)
    with storage.writes_confined_to(out):
        with pytest.raises(HDF5Refused, match="symlink"):
            hdf5.open_read(out / "pixels" / "k.h5", "pixel cache")
        with hdf5.open_read(out / "pixels" / "real.h5", "pixel cache") as f:
            assert f["pixels"][()].tolist() == [0, 1, 2]
    with hdf5.open_read(out / "pixels" / "k.h5", "pixel cache") as f:  # outside a step: as before
        assert len(f["pixels"]) == 4
