"""Scanning and sharding: layouts, labels, sorted order, ignored and unusable names."""

from __future__ import annotations

import os

import pytest

from convoy.orchestrator.jobs import make_shards
from convoy.orchestrator.scan import scan_data
from convoy.shared.errors import DataError
from tests.imagegen import make_flat, make_tree


def test_seed_layout_gives_three_splits_and_sorted_classes(tmp_path):
    make_tree(tmp_path, {"train": 3, "validation": 2, "test": 1})
    (tmp_path / "train" / "notes.txt").write_text("not an image")
    (tmp_path / "train" / "blobs" / "README").write_text("ignored")
    scan = scan_data(tmp_path)
    assert scan.layout == "splits"
    assert scan.class_names == ["blobs", "stripes"]
    assert list(scan.splits) == ["train", "validation", "test"]
    assert [len(v) for v in scan.splits.values()] == [6, 4, 2]
    assert scan.ignored == 2
    train = scan.splits["train"]
    assert [p for p, _ in train] == sorted(p for p, _ in train)
    assert {tuple(e) for e in train[:3]} == {(f"train/blobs/img-{i:03d}.png", 0) for i in range(3)}


def test_class_layout_is_one_split_named_all(tmp_path):
    make_tree(tmp_path, {"": 2}, splits=("",))
    scan = scan_data(tmp_path)
    assert scan.layout == "classes" and list(scan.splits) == ["all"]
    assert [label for _, label in scan.splits["all"]] == [0, 0, 1, 1]


def test_flat_folder_is_unlabelled(tmp_path):
    make_flat(tmp_path, 3)
    scan = scan_data(tmp_path)
    assert scan.layout == "flat" and scan.class_names == []
    assert all(label == -1 for _, label in scan.splits["all"])


def test_extensions_any_case_and_nested_folders(tmp_path):
    make_flat(tmp_path / "a" / "deep", 2)
    os.rename(tmp_path / "a" / "deep" / "img-000.jpg", tmp_path / "a" / "deep" / "IMG-000.JPEG")
    scan = scan_data(tmp_path)
    assert [p for p, _ in scan.splits["all"]] == ["a/deep/IMG-000.JPEG", "a/deep/img-001.jpg"]


def test_non_utf8_name_is_skipped_with_reason(tmp_path):
    make_flat(tmp_path, 1)
    raw = os.path.join(os.fsencode(tmp_path), b"bad-\xff.jpg")
    with open(raw, "wb") as fh:
        fh.write((tmp_path / "img-000.jpg").read_bytes())
    scan = scan_data(tmp_path)
    assert len(scan.splits["all"]) == 1
    assert scan.skipped and "not valid UTF-8" in scan.skipped[0]["reason"]


@pytest.mark.parametrize("make", ["missing", "empty", "file", "no-images"])
def test_unusable_data_dir_says_what_to_do(tmp_path, make):
    target = tmp_path / "data"
    if make == "empty":
        target.mkdir()
    elif make == "file":
        target.write_text("x")
    elif make == "no-images":
        target.mkdir()
        (target / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="expected DATA/"):
        scan_data(target)


def test_shards_cover_every_image_once_in_order(tmp_path):
    make_tree(tmp_path, {"train": 7, "validation": 2, "test": 2})
    scan = scan_data(tmp_path)
    shards = make_shards(scan, 4)
    assert list(shards)[:4] == ["train/00000", "train/00001", "train/00002", "train/00003"]
    for split, entries in scan.splits.items():
        joined = [e for sid, es in shards.items() if sid.startswith(split + "/") for e in es]
        assert joined == entries


def test_shards_are_fixed_blocks_of_each_split_whatever_the_workers(tmp_path):
    """The plan is the inputs and --shard-size only: no worker count, no shrinking tail."""
    make_tree(tmp_path, {"train": 7, "validation": 2, "test": 3})
    shards = make_shards(scan_data(tmp_path), 4)
    assert {sid: len(entries) for sid, entries in shards.items()} == {
        "train/00000": 4, "train/00001": 4, "train/00002": 4, "train/00003": 2,
        "validation/00000": 4, "test/00000": 4, "test/00001": 2}
