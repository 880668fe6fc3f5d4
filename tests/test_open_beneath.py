"""Open, then check what was opened: files and folders below a root never through a symlink
(shared/paths.py), with both ways of doing it (openat2, and the O_NOFOLLOW walk it falls back on);
and the same, against real workers, while a writer swaps files for symlinks."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import h5py
import numpy as np
import pytest

from convoy.shared import paths, storage
from convoy.shared.errors import OutsideRoots
from convoy.shared.images import BadImage
from convoy.shared.settings import Settings
from tests import test_threats
from tests.conftest import wait_final
from tests.imagegen import make_flat
from tests.test_threats import _forge_extraction, _weights

WAYS = [pytest.param(False, id="openat2"), pytest.param(True, id="walk")]


@pytest.fixture()
def tree(tmp_path):
    """root/a/b/file, a secret outside, and every kind of symlink to it."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "a" / "b").mkdir(parents=True)
    outside.mkdir()
    (root / "a" / "b" / "file").write_bytes(b"inside")
    (outside / "secret").write_bytes(b"secret")
    (root / "a" / "last").symlink_to(outside / "secret")  # absolute, at the last component
    (root / "a" / "near").symlink_to("b/file")  # relative, pointing inside the root
    (root / "middle").symlink_to(outside)  # at a middle component
    (root / "a" / "up").symlink_to("../../outside/secret")
    return root


def _read(fd: int) -> bytes:
    with os.fdopen(fd, "rb") as fh:
        return fh.read()


@pytest.mark.parametrize("walk", WAYS)
def test_opens_a_real_file_and_refuses_every_symlink_and_way_out(tree, walk):
    if not walk and not paths._openat2_usable:
        pytest.skip("this kernel (or its seccomp filter) has no openat2: the walk is all there is")
    assert _read(paths.open_beneath(tree, "a/b/file", walk=walk)) == b"inside"
    for rel in ("a/last", "a/near", "middle/secret", "a/up"):
        with pytest.raises(OSError) as caught:
            paths.open_beneath(tree, rel, walk=walk)
        assert caught.value.errno == errno.ELOOP, rel
        assert paths.refusal(caught.value, "data root") == "a symlink below the data root: refused"
    for rel in ("../outside/secret", "a/../../outside/secret", "/etc/hostname"):
        with pytest.raises(OSError) as caught:
            paths.open_beneath(tree, rel, walk=walk)
        assert caught.value.errno == errno.EXDEV, rel
    with pytest.raises(FileNotFoundError):
        paths.open_beneath(tree, "a/missing", walk=walk)


def test_images_are_opened_beneath_their_root_and_checked(tree):
    settings = Settings(data_roots=(tree,))
    with paths.open_image(tree / "a" / "b" / "file", settings) as fh:
        assert fh.read() == b"inside"
    reasons = {}
    os.mkfifo(tree / "pipe")  # opened without blocking, then refused for what it is
    for name in ("a/last", "a/near", "middle/secret", "pipe", "a/b", "a/missing", "../outside/secret"):
        with pytest.raises(BadImage) as caught, paths.open_image(tree / name, settings):
            pass
        reasons[name] = str(caught.value)
    assert reasons == {
        "a/last": "a symlink below the data root: refused", "a/near": "a symlink below the data root: refused",
        "middle/secret": "a symlink below the data root: refused",
        "pipe": "not a regular file (a folder, pipe or device): refused",
        "a/b": "not a regular file (a folder, pipe or device): refused",
        "a/missing": "file not found (deleted after the scan?)",
        "../outside/secret": paths.OUTSIDE_DATA}
    # Without roots, the operator allowed anywhere: a symlink is followed, what it opens is checked.
    with paths.open_image(tree / "a" / "last", Settings()) as fh:
        assert fh.read() == b"secret"


def test_a_root_reached_through_a_symlink_above_it_still_opens(tmp_path, tree):
    (tmp_path / "alias").symlink_to(tree)
    with paths.open_image(tmp_path / "alias" / "a" / "b" / "file", Settings(data_roots=(tree,))) as fh:
        assert fh.read() == b"inside"


def test_output_folders_are_made_without_following_symlinks(tmp_path):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    with storage.writes_confined_to(out):
        storage.write_bytes(out / "features" / "train" / "shard-00000.h5", b"rows")
        assert (out / "features" / "train" / "shard-00000.h5").read_bytes() == b"rows"
        (out / "pixels").symlink_to(elsewhere)
        (out / "model").mkdir()
        (out / "model" / "deep").symlink_to(elsewhere)
        for final in (out / "pixels" / "x.h5", out / "model" / "deep" / "sub" / "y.json"):
            with pytest.raises(OutsideRoots, match="a symlink below the output directory: refused"):
                storage.write_bytes(final, b"escape")
    assert not list(elsewhere.iterdir())
    assert not [p for p in out.rglob(".*tmp-*")]  # no temporary left behind either
    # Outside a step (the CLI writing its user's own files) a symlinked folder is followed as before.
    storage.write_bytes(out / "pixels" / "mine.txt", b"ok")
    assert (elsewhere / "mine.txt").read_bytes() == b"ok"


# --- against real workers ------------------------------------------------------------------

confined = test_threats.confined  # the fixture: a worker confined to allowed/ and outs/
MAGENTA = (255, 0, 255)
SYMLINK = "a symlink below the data root: refused"


def _swap(targets: list[Path], secret: Path, stop: threading.Event) -> None:
    """Swap each target, in a loop, with a symlink to ``secret``: renameat2(RENAME_EXCHANGE), one
    system call, so the name always exists and flips every few microseconds; every target ends
    as its real file."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    pairs = []
    for target in targets:
        target.with_suffix(".link").symlink_to(secret)
        pairs.append((os.fsencode(target), os.fsencode(target.with_suffix(".link"))))
    flips = 0
    while not stop.is_set() or flips % 2:
        for name, other in pairs:
            assert libc.renameat2(-100, name, -100, other, 2) == 0, os.strerror(ctypes.get_errno())  # AT_FDCWD
        flips += 1


def test_a_writer_swapping_checked_files_for_symlinks_gets_no_outside_pixels_into_out(confined):
    """The audit's race: 40 images, 10 of them swapped for a symlink to an outside image in a loop
    while a real worker extracts them with --cache-pixels. No outside pixel reaches OUT/pixels or
    the features, and an image caught as a symlink is skipped with its reason: the shard is done."""
    from PIL import Image

    private, allowed, outs, elsewhere = confined
    weights = _weights(private, allowed, outs)
    data = make_flat(allowed / "data", 40, size_px=32)
    secret = elsewhere / "secret.png"
    Image.new("RGB", (32, 32), MAGENTA).save(secret)
    (data / "static.jpg").symlink_to(secret)
    entries = [[f"img-{i:03d}.jpg", -1] for i in range(40)] + [["static.jpg", -1]]
    stop = threading.Event()
    swapper = threading.Thread(target=lambda: _swap([data / f"img-{i:03d}.jpg" for i in range(40)],
                                                     secret, stop), daemon=True)
    swapper.start()
    try:
        job = _forge_extraction(private, data, outs / "race", entries, weights, {"cache_pixels": True})
        final = wait_final(private.store, job)
    finally:
        stop.set()
        swapper.join(timeout=30)
    assert final["status"] == "done", (final, private.logs())
    skipped = {s["path"]: s["reason"] for s in private.store.step(job, "all/00000")["skipped"]}
    (cache,) = (outs / "race" / "pixels").glob("*.h5")
    with h5py.File(cache) as f:
        pixels = f["pixels"][()]
    assert not (pixels == np.array(MAGENTA, np.uint8)).all(axis=(1, 2, 3)).any(), "outside pixels in OUT/pixels"
    with h5py.File(outs / "race" / "features" / "all.h5") as f:
        rows = f["paths"].asstr()[()].tolist()
    assert len(rows) + len(skipped) == 41 and len(pixels) == len(rows)
    assert skipped["static.jpg"] == SYMLINK and set(skipped.values()) == {SYMLINK}, skipped


def test_a_symlinked_folder_inside_out_is_refused_and_nothing_is_written_through_it(confined):
    """OUT inside the roots, OUT/features (then OUT/pixels, with --cache-pixels) a symlink outside:
    the step fails with the reason and nothing lands outside."""
    private, allowed, outs, elsewhere = confined
    weights = _weights(private, allowed, outs)
    data = make_flat(allowed / "data", 2, size_px=32)
    for folder, options in (("features", {}), ("pixels", {"cache_pixels": True})):
        out = outs / f"link-{folder}"
        out.mkdir()
        (out / folder).symlink_to(elsewhere)
        job = _forge_extraction(private, data, out, [["img-000.jpg", -1], ["img-001.jpg", -1]], weights, options)
        final = wait_final(private.store, job)
        assert final["status"] == "failed", final
        assert f"output folder {out / folder}: a symlink below the output directory: refused" in final["error"], final
    assert not list(elsewhere.iterdir())


def test_private_copies_not_made_again_for_a_day_are_pruned_when_another_is_made(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    settings = Settings(data_roots=(tmp_path,), output_roots=(tmp_path,))
    first, second = tmp_path / "a.weights.h5", tmp_path / "b.weights.h5"
    first.write_bytes(b"a" * 1000)
    second.write_bytes(b"b" * 1000)
    old, _ = paths.opened_copy(first, settings, "weights file")
    two_days_ago = old.stat().st_mtime - 2 * paths.COPY_KEEP_S
    os.utime(old.parent, (two_days_ago, two_days_ago))
    stray = old.parent.parent / ".copy-left-by-a-kill"
    stray.write_bytes(b"x")
    os.utime(stray, (two_days_ago, two_days_ago))
    new, _ = paths.opened_copy(second, settings, "weights file")
    assert new.is_file() and not old.parent.exists() and not stray.exists()
    again, _ = paths.opened_copy(first, settings, "weights file")  # pruned: copied again, not lost
    assert again == old and again.read_bytes() == first.read_bytes()
