"""biapy.data.crappify: degradation keeps shape/dtype, is seeded, and the SSL source manifest logic."""
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import tifffile

import biapy.data.crappify as crappify_module
from biapy.data.crappify import MANIFEST, copies_folder, crappify, prepare_ssl_source
from biapy.data.image_writing import write_image, write_image_slices
from biapy.data.io import open_image_lazy, read_image
from biapy.errors import DataError


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


@pytest.mark.parametrize("ndim,shape", [(2, (64, 60)), (3, (9, 40, 36))])
def test_a_boolean_mask_is_degraded_into_float_values_between_0_and_1(tmp_path, ndim, shape):
    """Noise and resampling put a mask's pixels between 0 and 1: the copy is float32 (a cast back to bool had made
    99.99% of a mask with 7.5% True pixels True), in memory and written to the copies folder (3D: slab by slab)."""
    mask = np.zeros(shape + (1,), bool)
    mask[(slice(None),) * (ndim - 2) + (slice(20, 32), slice(10, 26))] = True
    out = crappify(mask, 0.1, 4, ndim, np.random.default_rng(0))
    assert out.dtype == np.float32 and out.shape == mask.shape
    assert 0 <= out.min() and out.max() <= 1
    assert 0.5 < float(out[mask].mean()) and 0.01 < float(out[~mask].mean()) < 0.1  # blurred, noisy, still a mask
    src = tmp_path / "src" / "mask.tif"
    src.parent.mkdir()
    tifffile.imwrite(src, mask[..., 0])  # a boolean TIFF (write_image would store it as uint8)
    assert read_image(src, ndim).dtype == np.bool_
    copy = read_image(prepare_ssl_source([src], tmp_path / "ssl", 0.1, 4, ndim, seed=0)[0], ndim)
    assert copy.dtype == np.float32 and 0 <= copy.min() and copy.max() <= 1
    assert 0.5 < float(copy[mask].mean()) and 0.01 < float(copy[~mask].mean()) < 0.1


def test_each_channel_gets_noise_at_its_own_level_and_stays_in_its_own_range():
    """A bright stain, a dim one and an empty one: noise at the bright one's level (0.2 x 55000) had buried the
    dim channel (correlation with its original -0.001) and made the empty one noise (mean 4419)."""
    rng = np.random.default_rng(0)
    smooth = _smooth((48, 40), np.float32)[..., 0] / 200  # 0..1, smooth
    img = np.stack([200 + smooth * 55000, 77 + smooth * 232, np.zeros_like(smooth)], -1).astype(np.uint16)
    out = crappify(img, 0.2, 1, 2, rng)  # factor 1: noise and clipping only
    for c in range(3):
        assert img[..., c].min() <= out[..., c].min() and out[..., c].max() <= img[..., c].max()
    assert not out[..., 2].any()
    dim = np.corrcoef(img[..., 1].ravel(), out[..., 1].ravel())[0, 1]
    assert dim > 0.6
    noise = (out.astype(float) - img).std(axis=(0, 1))
    assert 0.05 < noise[1] / noise[0] / (232 / 55000) < 2  # each channel's noise scales with its own level


def test_no_noise_only_resamples_and_factor_one_is_identity():
    img = _smooth((32, 32), np.float32)
    np.testing.assert_array_equal(crappify(img, 0, 1, 2, np.random.default_rng(0)), img)
    out = crappify(img, 0, 4, 2, np.random.default_rng(0))
    assert 0 < np.abs(out - img).max() < 25  # smooth image: blurred a little (corners: ~2 pixels' step each way)


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
    assert {p.parent for p in out} == {dst / "noise0.1_factor4_seed3"}
    manifest = json.loads((out[0].parent / MANIFEST).read_text())
    assert manifest["params"]["noise"] == 0.1 and manifest["params"]["resizing_factor"] == 4
    assert set(manifest["files"]) == {"im0.tif", "im1.tif"}
    assert {"size", "mtime_ns"} <= set(manifest["files"]["im0.tif"])
    # same seed, rebuilt elsewhere: identical copies (noise seeded by seed and source path)
    again = prepare_ssl_source(files, tmp_path / "ssl2", 0.1, 4, 2, seed=3)
    np.testing.assert_array_equal(read_image(out[0], 2), read_image(again[0], 2))
    assert not np.array_equal(read_image(out[0], 2), read_image(out[1], 2) - 1)


def test_copies_of_jpeg_sources_are_written_losslessly(tmp_path):
    """A JPEG copy added a third degradation no key controls (4169 of 6300 pixels off by up to 5)."""
    from PIL import Image

    src = tmp_path / "src" / "cells.jpg"
    src.parent.mkdir()
    Image.fromarray(_smooth((60, 70))[..., 0]).save(src, quality=95)
    out = prepare_ssl_source([src], tmp_path / "ssl", 0.2, 4, 2, seed=0)[0]
    assert out.name == "cells.png"
    img = read_image(src, 2)
    expected = next(crappify_module.degraded_slices(img, 0.2, 4, 2, crappify_module._file_seed(0, src),
                                                    crappify_module.value_range(img, src)))
    np.testing.assert_array_equal(read_image(out, 2), expected)
    assert prepare_ssl_source([src], tmp_path / "ssl", 0.2, 4, 2, seed=0)[0] == out  # the manifest finds it


def test_reused_when_unchanged_rebuilt_when_sources_change_kept_apart_per_parameters(tmp_path, caplog):
    files, dst = _sources(tmp_path)
    first = prepare_ssl_source(files, dst, 0.1, 4, 2, seed=0)
    stamp, copy = first[0].stat().st_mtime_ns, first[0].read_bytes()
    prepare_ssl_source(files, dst, 0.1, 4, 2, seed=0)
    assert first[0].stat().st_mtime_ns == stamp  # reused
    # Other NOISE or SYSTEM.SEED (a sweep run in parallel): copies of their own, the first run's left as they were
    # (rebuilt in place, they had been read by a run still training or testing on the first ones).
    out = prepare_ssl_source(files, dst, 0.2, 4, 2, seed=0)
    seeded = prepare_ssl_source(files, dst, 0.2, 4, 2, seed=1)
    assert len({first[0].parent, out[0].parent, seeded[0].parent}) == 3
    assert first[0].read_bytes() == copy and first[0].stat().st_mtime_ns == stamp
    assert json.loads((out[0].parent / MANIFEST).read_text())["params"]["noise"] == 0.2
    assert out[0].read_bytes() != seeded[0].read_bytes()  # SYSTEM.SEED draws other noise
    manifest = json.loads((out[0].parent / MANIFEST).read_text())
    manifest["params"]["version"] -= 1  # copies of an older degradation
    (out[0].parent / MANIFEST).write_text(json.dumps(manifest))
    with caplog.at_level(logging.INFO, logger="biapy.data.crappify"):
        prepare_ssl_source(files, dst, 0.2, 4, 2, seed=0)
    assert f"parameters changed (version {crappify_module._VERSION - 1} -> {crappify_module._VERSION})" in caplog.text
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
    good = out[0].read_bytes()
    out[0].write_bytes(b"damaged" * 10)  # a damaged copy too (it had stopped every later run)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="biapy.data.crappify"):
        prepare_ssl_source(files, dst, 0.2, 4, 2, seed=0)
    assert "degraded file(s) changed" in caplog.text and out[0].read_bytes() == good


def test_two_sources_with_one_file_name_or_stem_are_refused(tmp_path):
    """'x.jpg' and 'x.png' both have the copy 'x.png': training had paired one image with the other's copy."""
    a = write_image(tmp_path / "one" / "im.tif", _smooth((20, 24)), 2)
    b = write_image(tmp_path / "two" / "im.tif", _smooth((20, 24)), 2)
    with pytest.raises(DataError, match="im.tif and im.tif would write the same output files"):
        prepare_ssl_source([a, b], tmp_path / "ssl", 0.1, 4, 2, seed=0)
    from PIL import Image
    for name in ("x.jpg", "x.png"):
        Image.fromarray(_smooth((20, 24))[..., 0]).save(tmp_path / "one" / name)
    with pytest.raises(DataError, match="x.jpg and x.png would write the same output files"):
        prepare_ssl_source([tmp_path / "one" / "x.jpg", tmp_path / "one" / "x.png"], tmp_path / "ssl", 0.1, 4, 2,
                           seed=0)
    assert not (tmp_path / "ssl").exists()


def test_current_copies_are_used_from_a_folder_this_job_cannot_write(tmp_path, monkeypatch):
    """A read-only share, or another user's folder: its copies serve while they are current (the lock file had
    stopped the run), and only stale ones are an error."""
    files, dst = _sources(tmp_path)
    made = prepare_ssl_source(files, dst, 0.1, 4, 2, seed=0)

    def read_only(path, mode="r", *args, **kwargs):
        if "w" in mode:
            raise PermissionError(13, "Permission denied", str(path))
        return open(path, mode, *args, **kwargs)
    monkeypatch.setattr(crappify_module, "open", read_only, raising=False)
    assert prepare_ssl_source(files, dst, 0.1, 4, 2, seed=0) == made
    write_image(files[0], _smooth((20, 24)) // 2, 2)  # a source changed: its copy would need a rebuild
    with pytest.raises(PermissionError):
        prepare_ssl_source(files, dst, 0.1, 4, 2, seed=0)
    with pytest.raises(PermissionError):  # other parameters: no copies there
        prepare_ssl_source(files, dst, 0.2, 4, 2, seed=0)


def test_a_file_name_that_is_not_utf8_seeds_its_noise_by_its_bytes():
    latin1 = b"caf\xe9.tif".decode("utf-8", "surrogateescape")  # how Python holds a Latin-1 name

    def first(name):
        return crappify_module._file_seed(0, Path("/data") / name).random()

    assert first(latin1) == first(latin1) != first("cafe.tif")


def test_noise_is_seeded_per_file(tmp_path):
    """Two identical images under different names get different noise (one draw for both would repeat it)."""
    src = tmp_path / "src"
    files = [write_image(src / name, _smooth((20, 24)), 2) for name in ("a.tif", "b.tif")]
    a, b = prepare_ssl_source(files, tmp_path / "ssl", 0.1, 1, 2, seed=0)
    assert not np.array_equal(read_image(a, 2), read_image(b, 2))


def test_a_test_image_named_as_a_training_image_gets_noise_of_its_own(tmp_path):
    """train/x/img.tif and test/x/img.tif (BiaPy's layout) had had the same noise, the one training learnt to
    remove. A folder's copies do not depend on the job that builds them, a test-only run or a training one."""
    img = _smooth((32, 40))
    train, test = (write_image(tmp_path / split / "x" / "img.tif", img, 2) for split in ("train", "test"))
    copy = {src: read_image(prepare_ssl_source([src], src.parent.parent / "ssl", 0.2, 1, 2, seed=0)[0], 2)
            for src in (train, test)}
    noise = [c.astype(np.float64) - img for c in copy.values()]
    assert abs(np.corrcoef(noise[0].ravel(), noise[1].ravel())[0, 1]) < 0.2
    for key in ("DATA.TRAIN.PATH", "DATA.TEST.PATH"):
        again = prepare_ssl_source([test], tmp_path / key, 0.2, 1, 2, seed=0, key=key)[0]
        np.testing.assert_array_equal(read_image(again, 2), copy[test])


def _whole_image_reference(img, noise, factor, ndim, rng):
    """The degradation computed on the whole image at once: noise and clip, then BiaPy 3.7.1's resampling
    (skimage's resize to int(size / sqrt(factor)) and back, order 1, mode 'reflect', no anti-aliasing)."""
    from skimage.transform import resize

    x = img.astype(np.float32)
    lo, hi = float(x.min()), float(x.max())
    if noise > 0:
        x = np.clip(x + rng.standard_normal(x.shape, dtype=np.float32) * np.float32(noise * hi), lo, hi)
    spatial = img.shape[:ndim]
    small = tuple(max(1, int(s / np.sqrt(factor))) for s in spatial)
    for size in (small, spatial):
        x = resize(x, size + img.shape[ndim:], order=1, mode="reflect", clip=True, preserve_range=True,
                   anti_aliasing=False)
    if np.issubdtype(img.dtype, np.integer):
        x = np.clip(np.rint(x), np.iinfo(img.dtype).min, np.iinfo(img.dtype).max)
    return x.astype(img.dtype)


@pytest.mark.parametrize("ndim,shape,channels,dtype,factor", [
    (2, (31, 27), 1, np.uint8, 4), (2, (20, 22), 3, np.uint16, 9), (2, (16, 16), 1, np.float32, 2),
    (2, (19, 23), 1, np.float32, 3), (3, (7, 15, 13), 2, np.float32, 4), (3, (12, 10, 9), 1, np.float32, 9),
    (3, (1, 12, 12), 1, np.float32, 4), (3, (9, 8, 8), 1, np.float32, 16), (3, (19, 21, 20), 1, np.uint16, 4)])
def test_slice_by_slice_equals_biapys_whole_image_resize(ndim, shape, channels, dtype, factor):
    """BiaPy's sizes (int, not round: 19 slices -> 9 at factor 4) and its mirrored borders (torch's clamped
    ones had changed the up-sampled border rows by up to 10 of 200)."""
    img = _smooth(shape, dtype, channels) + np.arange(np.prod(shape[:ndim])).reshape(shape[:ndim] + (1,)).astype(dtype) % 7
    ours = crappify(img, 0.2, factor, ndim, np.random.default_rng(1))
    ref = _whole_image_reference(img, 0.2, factor, ndim, np.random.default_rng(1))
    diff = np.abs(ours.astype(np.float64) - ref)
    if np.issubdtype(dtype, np.integer):  # float rounding moves a value at a half by one grey level, rarely
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01
    else:
        assert diff.max() <= 1e-5 * float(img.max())


@pytest.mark.parametrize("shape,channels,dtype,factor", [
    ((37, 29), 1, np.uint8, 4), ((23, 31), 3, np.uint16, 9), ((30, 26), 1, np.float32, 2),
    ((26, 30), 3, np.float32, 3)])
def test_a_2d_image_degraded_in_bands_of_rows_equals_it_degraded_whole(monkeypatch, shape, channels, dtype, factor):
    """Bands of any height, their borders anywhere, give the copy of the whole image bit for bit (one noise draw, the
    same resampling of every pixel), and that copy is BiaPy's whole-image one."""
    img = _smooth(shape, dtype, channels) + np.arange(np.prod(shape)).reshape(shape + (1,)).astype(dtype) % 7
    whole = crappify(img, 0.2, factor, 2, np.random.default_rng(1))  # one band
    for rows in (1, 2, 3, 7):
        monkeypatch.setattr(crappify_module, "_BAND_VALUES", rows * shape[1] * channels)
        np.testing.assert_array_equal(crappify(img, 0.2, factor, 2, np.random.default_rng(1)), whole)
    diff = np.abs(whole.astype(np.float64) - _whole_image_reference(img, 0.2, factor, 2, np.random.default_rng(1)))
    assert diff.max() <= (1 if np.issubdtype(dtype, np.integer) else 1e-5 * float(img.max()))
    assert (diff > 0).mean() < 0.01 or not np.issubdtype(dtype, np.integer)


@pytest.mark.parametrize("channels", [1, 3])
def test_a_2d_image_is_degraded_within_little_more_than_its_own_size(tmp_path, monkeypatch, channels):
    """A 2D image is read (an uncompressed TIFF lazily) and degraded a band of rows at a time into its copy: whole,
    its float32 temporaries had taken 7-19x the image (a 400 MB one peaked 5.9 GB)."""
    import tracemalloc

    img = (_smooth((400, 500), np.uint8, channels) // 2 + np.arange(400 * 500 * channels).reshape(400, 500, channels) % 13
           ).astype(np.uint8)
    src = write_image(tmp_path / "src" / "big.tif", img, 2)
    for name in ("_BAND_VALUES", "_SLAB_VOXELS"):  # bands of 2 rows, small beside the image as in a large one
        monkeypatch.setattr(crappify_module, name, 2 * 500 * channels)
    expected = crappify(img, 0.2, 4, 2, crappify_module._file_seed(0, src))
    prepare_ssl_source([src], tmp_path / "warm", 0.2, 4, 2, seed=0)  # fills the caches (taps, TIFF header)
    tracemalloc.start()  # numpy's arrays are traced (torch's are not)
    try:
        crappify(img, 0.2, 4, 2, crappify_module._file_seed(0, src))
        in_memory = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        copy = prepare_ssl_source([src], tmp_path / "ssl", 0.2, 4, 2, seed=0)[0]
        from_disk = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    # The copy and a few bands (1.4-1.8x here, with Python's own objects); whole, 8-13x. From disk, the source is
    # read a band at a time too: held whole beside its copy, it would make 2x alone.
    assert in_memory < 2 * img.nbytes and from_disk < 2 * img.nbytes
    np.testing.assert_array_equal(read_image(copy, 2), expected)


def test_volume_is_degraded_from_disk_slab_by_slab_as_in_memory(tmp_path, monkeypatch):
    img = (_smooth((23, 18, 20), np.uint16) * 50 + np.arange(23 * 18 * 20).reshape(23, 18, 20, 1) % 11).astype(np.uint16)
    src = write_image(tmp_path / "src" / "vol.tif", img, 3)
    monkeypatch.setattr(crappify_module, "_SLAB_VOXELS", 18 * 20 * 3)  # 3-slice slabs: many reads
    seen = []
    lazy_open = crappify_module.open_image_lazy

    def spy(path, ndim):
        seen.append(type(lazy_open(path, ndim)).__name__)
        return lazy_open(path, ndim)
    monkeypatch.setattr(crappify_module, "open_image_lazy", spy)
    out = prepare_ssl_source([src], tmp_path / "ssl", 0.2, 4, 3, seed=7)
    assert seen == ["LazyTiff"]  # the volume was never read whole
    expected = crappify(img, 0.2, 4, 3, crappify_module._file_seed(7, src))
    np.testing.assert_array_equal(read_image(out[0], 3), expected)
    assert type(open_image_lazy(out[0], 3)).__name__ == "LazyTiff"  # the copy can be read lazily too


def test_non_finite_pixels_are_counted_across_slabs(tmp_path, monkeypatch):
    img = np.ones((6, 4, 4, 1), np.float32)
    img[0, 0, 0], img[5, 3, 3] = np.nan, np.inf
    src = write_image(tmp_path / "vol.tif", img, 3)
    monkeypatch.setattr(crappify_module, "_SLAB_VOXELS", 16)  # one slice per slab
    with pytest.raises(DataError, match=r"vol.tif: 2 pixel\(s\) are NaN or Inf"):
        prepare_ssl_source([src], tmp_path / "ssl", 0.1, 4, 3, seed=0)
    assert not list((tmp_path / "ssl").rglob("vol.tif"))


def test_write_image_slices_round_trip_and_refuses_a_wrong_count(tmp_path):
    vol = np.random.default_rng(0).integers(0, 60000, (5, 6, 7, 2)).astype(np.uint16)
    path = write_image_slices(tmp_path / "v.tif", iter(vol), vol.shape, vol.dtype)
    np.testing.assert_array_equal(read_image(path, 3), vol)
    with pytest.raises(ValueError, match="4 slices, expected 5"):
        write_image_slices(tmp_path / "w.tif", iter(vol[:4]), vol.shape, vol.dtype)
    assert not list(tmp_path.glob("*w.tif*"))  # no partial file left behind


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="advisory file locks: POSIX")
def test_jobs_sharing_the_copies_folder_take_turns(tmp_path):
    """Two jobs with other NOISE building at once left one's manifest beside the other's copies; a build waits
    for the folder's lock."""
    import fcntl
    import threading

    src = tmp_path / "src"
    write_image(src / "a.tif", np.random.default_rng(0).integers(0, 255, (32, 32)).astype(np.uint8), 2)
    dst = copies_folder(tmp_path / "dst", 0.2, 2, 0)
    dst.mkdir(parents=True)
    done = threading.Event()
    with open(dst / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another job is building
        worker = threading.Thread(target=lambda: (prepare_ssl_source([src / "a.tif"], tmp_path / "dst", 0.2, 2, 2, 0),
                                                  done.set()))
        worker.start()
        assert not done.wait(0.5)  # waits for the lock
    worker.join(30)
    assert done.is_set() and json.loads((dst / MANIFEST).read_text())["params"]["noise"] == 0.2


def test_an_original_beyond_float32_is_refused_by_its_own_name(tmp_path):
    """Finite float64 pixels near 1e300 had made a copy of Inf and NaN (an overflow warning, then an error naming
    the copy in the _ssl_source folder, not the user's file)."""
    src = tmp_path / "src" / "huge.tif"
    src.parent.mkdir()
    tifffile.imwrite(src, (_smooth((20, 24))[..., 0] / 200.0 * 1e306).astype(np.float64))  # its sum overflows too
    with pytest.raises(DataError, match=r"src/huge.tif: pixel values up to 9.95e\+305 in magnitude are too large"):
        prepare_ssl_source([src], tmp_path / "ssl", 0.1, 4, 2, seed=0)
    assert not list((tmp_path / "ssl").rglob("huge.tif"))


def test_the_same_data_moved_elsewhere_gets_the_same_copies(tmp_path):
    """Noise had been seeded by the absolute path: the same data in another folder (a cluster's scratch, a
    temporary folder) pretrained on other noise, with the same config and seed."""
    img = _smooth((32, 40))
    copies = []
    for root in ("home/me/data", "scratch/job7/data"):
        src = write_image(tmp_path / root / "train" / "x" / "img.tif", img, 2)
        copies.append(read_image(prepare_ssl_source([src], tmp_path / root / "ssl", 0.2, 1, 2, seed=0)[0], 2))
    np.testing.assert_array_equal(copies[0], copies[1])
    assert not np.array_equal(copies[0], img)
