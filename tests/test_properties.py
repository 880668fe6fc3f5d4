"""Property-based: whatever the folder tree, every accepted file lands in exactly one shard,
merged rows come out in sorted path order, and the manifest round-trips."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import h5py
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from convoy.orchestrator.jobs import make_shards
from convoy.orchestrator.scan import scan_data
from convoy.shared.features import ShardResult, merge_split, write_shard
from convoy.shared.job import JobSpec, ModelConfig
from convoy.shared.manifest import read_manifest, spec_and_shards, write_manifest

NAME = st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="/\\\x00."),
               min_size=1, max_size=12).filter(lambda s: s.strip() == s and not s.startswith("-"))
EXT = st.sampled_from([".jpg", ".JPEG", ".png", ".Gif", ".bmp", ".webp", ".txt", ""])
FILE = st.tuples(st.lists(NAME, min_size=0, max_size=2), NAME, EXT, st.integers(0, 3))


def _build(root: Path, layout: str, classes: list[str], files: list[tuple]) -> set[str]:
    """Write the tree; return the relative paths the scan must accept."""
    expected = set()
    splits = ["train", "validation", "test"] if layout == "splits" else [""]
    for i, (dirs, stem, ext, content) in enumerate(files):
        split = splits[i % len(splits)]
        parts = [split] if split else []
        parts += [classes[i % len(classes)], *dirs, f"{stem}{ext}"]
        path = root.joinpath(*parts)
        if path.exists() or any(root.joinpath(*parts[:k]).is_file() for k in range(1, len(parts))):
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(bytes([content]) * 8)  # duplicates by content are common on purpose
        if ext.lower() in {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp"}:
            expected.add("/".join(parts))
    return expected


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layout=st.sampled_from(["splits", "classes"]), classes=st.lists(NAME, min_size=1, max_size=3, unique=True),
       files=st.lists(FILE, min_size=1, max_size=25), shard_size=st.integers(1, 7))
def test_every_accepted_file_lands_in_exactly_one_shard(layout, classes, files, shard_size):
    root = Path(tempfile.mkdtemp())
    try:
        if layout == "splits":
            classes = [c for c in classes if c not in ("train", "validation", "test")] or ["x"]
        expected = _build(root, layout, classes, files)
        if not expected:
            return
        scan = scan_data(root)
        shards = make_shards(scan, shard_size)
        placed = [e[0] for entries in shards.values() for e in entries]
        assert sorted(placed) == sorted(expected)
        assert len(placed) == len(set(placed))
        assert all(0 < len(entries) <= shard_size for entries in shards.values())
        for split, entries in scan.splits.items():
            in_order = [e[0] for sid, es in shards.items() if sid.startswith(split + "/") for e in es]
            assert in_order == sorted(in_order)
            assert all(scan.class_names[label] == path.split("/")[1 if layout == "splits" else 0]
                       for path, label in entries)
        _check_merge_order(root / "_out", shards)
        _check_manifest_round_trip(root / "_out", scan, shards)
    finally:
        shutil.rmtree(root)


def _check_merge_order(out: Path, shards: dict[str, list[list]]) -> None:
    for split in {sid.split("/")[0] for sid in shards}:
        files = []
        for sid, entries in shards.items():
            if sid.startswith(split + "/"):
                n = len(entries)
                result = ShardResult(np.zeros((n, 1, 1, 1), np.float32), np.array([e[1] for e in entries]),
                                     [e[0] for e in entries])
                path = out / "features" / split / f"shard-{sid.split('/')[1]}.h5"
                write_shard(path, result, {"fingerprint": sid})
                files.append(path)
        merged = merge_split(out / "features" / f"{split}.h5", files, {})
        with h5py.File(merged) as f:
            rows = f["paths"].asstr()[()].tolist()
        assert rows == sorted(rows)


def _check_manifest_round_trip(out: Path, scan, shards) -> None:
    model = ModelConfig(layer="block5_pool", input_size_px=32, preprocess="vgg16", weights="none",
                        weights_path="/w.h5", weights_sha256="0" * 64, batch_size=2, dtype="float32")
    spec = JobSpec(job_id="j", data_dir=str(scan.data_dir), out_dir=str(out), model=model,
                   class_names=scan.class_names, shard_ids=list(shards), options={"scan_skipped": scan.skipped})
    write_manifest(spec, shards)
    back_spec, back_shards = spec_and_shards(read_manifest(out))
    assert back_spec == spec and back_shards == shards
    assert not [n for n in os.listdir(out) if n.startswith(".")]
