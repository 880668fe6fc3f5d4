"""The HDF5 contract: atomic shard files, virtual merged files, materialized copies."""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest

from convoy.shared.features import ShardResult, materialize, merge_split, read_attrs, shard_fingerprint, write_shard


def _result(n: int, start: int) -> ShardResult:
    feats = np.arange(n * 2 * 2 * 3, dtype=np.float32).reshape(n, 2, 2, 3) + start
    return ShardResult(feats, np.arange(n) % 2, [f"img-{start + i:03d}.png" for i in range(n)],
                       skipped=[(f"bad-{start}.png", "not an image")])


def _shards(tmp_path):
    files = []
    for i, n in enumerate((3, 0, 2)):
        path = tmp_path / "out" / "features" / "all" / f"shard-{i:05d}.h5"
        write_shard(path, _result(n, 10 * i), {"fingerprint": f"fp{i}", "layer": "block5_pool"})
        files.append(path)
    return files


def test_shard_file_is_whole_and_leaves_no_temporary(tmp_path):
    files = _shards(tmp_path)
    assert shard_fingerprint(files[0]) == "fp0"
    assert sorted(p.name for p in files[0].parent.iterdir()) == [f.name for f in files]


def test_failed_write_leaves_no_final_file(tmp_path):
    final = tmp_path / "shard-00000.h5"
    bad = ShardResult(np.zeros((1, 2, 2, 3), np.float32), np.zeros(1), ["a"], [])
    with pytest.raises(TypeError):
        write_shard(final, bad, {"oops": object()})
    assert list(tmp_path.iterdir()) == []


def test_truncated_shard_is_not_current(tmp_path):
    files = _shards(tmp_path)
    data = files[0].read_bytes()
    files[0].write_bytes(data[: len(data) // 2])
    assert shard_fingerprint(files[0]) is None


def test_merge_is_virtual_ordered_and_survives_a_move(tmp_path):
    files = _shards(tmp_path)
    merged = merge_split(tmp_path / "out" / "features" / "all.h5", files, {"layer": "block5_pool"})
    shutil.move(tmp_path / "out", tmp_path / "moved")
    with h5py.File(tmp_path / "moved" / "features" / "all.h5") as f:
        assert f["features"].is_virtual
        assert f["features"].shape == (5, 2, 2, 3)
        assert f["paths"].asstr()[()].tolist() == ["img-000.png", "img-001.png", "img-002.png",
                                                 "img-020.png", "img-021.png"]
        np.testing.assert_array_equal(f["features"][3], _result(2, 20).features[0])
        assert f["skipped_paths"].asstr()[()].tolist() == ["bad-0.png", "bad-10.png", "bad-20.png"]
    assert merged.name == "all.h5"
    assert read_attrs(tmp_path / "moved" / "features" / "all.h5")["layer"] == "block5_pool"


def test_materialize_makes_a_self_contained_copy(tmp_path):
    files = _shards(tmp_path)
    merged = merge_split(tmp_path / "out" / "features" / "all.h5", files, {"layer": "block5_pool"})
    with h5py.File(merged) as f:
        before = f["features"][()]
    materialize(merged)
    shutil.rmtree(files[0].parent)
    with h5py.File(merged) as f:
        assert not f["features"].is_virtual
        np.testing.assert_array_equal(f["features"][()], before)
        assert f.attrs["layer"] == "block5_pool"
