"""biapy.data.crappify: degradation keeps shape/dtype, is seeded, and the SSL source manifest logic."""
import json
import logging

import numpy as np
import pytest

from biapy.data.crappify import MANIFEST, crappify, prepare_ssl_source
from biapy.data.io import read_image, write_image


def _smooth(shape, dtype=np.uint8, channels=1):
    grids = np.meshgrid(*[np.linspace(0, 3, s) for s in shape], indexing="ij")
    img = (np.sin(sum(grids)) + 1) * 100
    return np.repeat(img[..., None], channels, -1).astype(dtype)


@pytest.mark.parametrize("ndim,shape,channels,dtype", [
    (2, (31, 27), 1, np.uint8), (2, (20, 22), 3, np.uint16), (3, (7, 15, 13), 2, np.float32)])
def test_shape_dtype_and_range_kept(ndim, shape, channels, dtype):
    img = _smooth(shape, dtype, channels)
    out = crappify(img, 0.2, 4, ndim, np.random.default_rng(0))
    assert out.shape == img.shape and out.dtype == img.dtype
    assert out.min() >= img.min() and out.max() <= img.max()
    assert not np.array_equal(out, img)


def test_no_noise_only_resamples_and_factor_one_is_identity():
    img = _smooth((32, 32), np.float32)
    np.testing.assert_array_equal(crappify(img, 0, 1, 2, np.random.default_rng(0)), img)
    out = crappify(img, 0, 4, 2, np.random.default_rng(0))
    assert 0 < np.abs(out - img).max() < 10  # smooth image: blurred a little


def test_z_axis_is_resampled_too():
    img = np.zeros((8, 8, 8, 1), np.float32)
    img[3] = 100  # one bright slice spreads over z after down- and up-sampling
    out = crappify(img, 0, 4, 3, np.random.default_rng(0))
    assert out[2].max() > 0 or out[4].max() > 0


def test_same_rng_same_result():
    img = _smooth((16, 16))
    a = crappify(img, 0.3, 2, 2, np.random.default_rng(5))
    b = crappify(img, 0.3, 2, 2, np.random.default_rng(5))
    np.testing.assert_array_equal(a, b)


def _sources(tmp_path, n=2):
    src = tmp_path / "src"
    files = [write_image(src / f"im{i}.tif", _smooth((20, 24)) + i, 2) for i in range(n)]
    return files, tmp_path / "ssl"


def test_prepare_writes_copies_and_manifest(tmp_path):
    files, dst = _sources(tmp_path)
    out = prepare_ssl_source(files, dst, 0.1, 4, 2, seed=3)
    assert [p.name for p in out] == [p.name for p in files]
    for src, deg in zip(files, out):
        a, b = read_image(src, 2), read_image(deg, 2)
        assert a.shape == b.shape and a.dtype == b.dtype and not np.array_equal(a, b)
    manifest = json.loads((dst / MANIFEST).read_text())
    assert manifest["params"]["noise"] == 0.1 and manifest["params"]["resizing_factor"] == 4
    assert set(manifest["files"]) == {"im0.tif", "im1.tif"}
    assert {"size", "mtime_ns"} <= set(manifest["files"]["im0.tif"])
    # same seed, rebuilt elsewhere: identical copies (noise seeded by seed and file name)
    again = prepare_ssl_source(files, tmp_path / "ssl2", 0.1, 4, 2, seed=3)
    np.testing.assert_array_equal(read_image(out[0], 2), read_image(again[0], 2))
    assert not np.array_equal(read_image(out[0], 2), read_image(out[1], 2) - 1)


def test_reused_when_unchanged_rebuilt_when_params_or_sources_change(tmp_path, caplog):
    files, dst = _sources(tmp_path)
    out = prepare_ssl_source(files, dst, 0.1, 4, 2, seed=0)
    stamp = out[0].stat().st_mtime_ns
    prepare_ssl_source(files, dst, 0.1, 4, 2, seed=0)
    assert out[0].stat().st_mtime_ns == stamp  # reused
    with caplog.at_level(logging.INFO, logger="biapy.data.crappify"):
        prepare_ssl_source(files, dst, 0.2, 4, 2, seed=0)
    assert "noise 0.1 -> 0.2" in caplog.text
    assert json.loads((dst / MANIFEST).read_text())["params"]["noise"] == 0.2
    before = read_image(out[1], 2)
    write_image(files[1], _smooth((20, 24)) // 2, 2)  # edit one source
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="biapy.data.crappify"):
        prepare_ssl_source(files, dst, 0.2, 4, 2, seed=0)
    assert "changed" in caplog.text
    assert not np.array_equal(before, read_image(out[1], 2))
    out[0].unlink()  # a deleted copy is rebuilt
    prepare_ssl_source(files, dst, 0.2, 4, 2, seed=0)
    assert out[0].is_file()
