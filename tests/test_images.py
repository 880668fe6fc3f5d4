"""Decoding: the same pixels as keras.utils.load_img, and a reason for every unusable file."""

from __future__ import annotations

import numpy as np
import pytest

from convoy.shared.images import BadImage, load_pixels
from tests.conftest import skip_or_fail
from tests.imagegen import make_odd_images, pattern


def test_pixels_equal_keras_load_img(tmp_path):
    import keras

    rng = np.random.default_rng(0)
    for i, size in enumerate([(500, 375), (37, 90)]):
        path = tmp_path / f"img{i}.jpg"
        pattern("stripes", 64, rng).resize(size).save(path)
        ref = keras.utils.img_to_array(keras.utils.load_img(path, target_size=(150, 150), interpolation="bilinear"))
        np.testing.assert_array_equal(load_pixels(path, 150).astype(np.float32), ref)


def test_each_kind_of_odd_file(tmp_path):
    expected = make_odd_images(tmp_path)
    for name, reason in expected.items():
        if reason is None:
            pixels = load_pixels(tmp_path / name, 32)
            assert pixels.shape == (32, 32, 3) and pixels.dtype == np.uint8, name
        else:
            with pytest.raises(BadImage, match=reason):
                load_pixels(tmp_path / name, 32)


def test_sixteen_bit_png_keeps_its_range(tmp_path):
    expected = make_odd_images(tmp_path)
    assert expected["deep16.png"] is None
    deep, grey = load_pixels(tmp_path / "deep16.png", 48), load_pixels(tmp_path / "grey.png", 48)
    assert np.abs(deep.astype(int) - grey.astype(int)).max() <= 1


def test_deleted_file_has_a_reason(tmp_path):
    with pytest.raises(BadImage, match="deleted after the scan"):
        load_pixels(tmp_path / "gone.png", 32)


def test_unreadable_file_has_a_reason():
    """Root reads everything, so a forked child drops to `nobody`, as a worker without rights."""
    import os
    import shutil
    import tempfile

    if os.geteuid() != 0:
        skip_or_fail("needs root to switch to another user")
    folder = tempfile.mkdtemp(prefix="convoy-perm-", dir="/tmp")
    try:
        os.chmod(folder, 0o755)
        path = os.path.join(folder, "locked.png")
        pattern("blobs", 16, np.random.default_rng(0)).save(path)
        os.chmod(path, 0)
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: drop privileges, try, report, leave without cleanup handlers
            os.close(read_end)
            try:
                os.setgid(65534)
                os.setuid(65534)
                load_pixels(path, 32)
                message = "decoded"
            except BadImage as exc:
                message = str(exc)
            except BaseException as exc:  # anything else is reported to the parent as text
                message = f"unexpected {exc!r}"
            os.write(write_end, message.encode())
            os._exit(0)
        os.close(write_end)
        os.waitpid(pid, 0)
        with os.fdopen(read_end) as fh:
            assert "permission denied" in fh.read()
    finally:
        shutil.rmtree(folder)
