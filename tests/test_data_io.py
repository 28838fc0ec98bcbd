"""biapy.data.io: round trips per format and axis layout, axes metadata, lazy access, bad files."""
import os

import numpy as np
import pytest
import tifffile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from skimage import io as skio

from biapy.data.io import (LazyTiff, check_consistent_channels, check_finite, image_shape, iter_slabs, list_images,
                           open_image_lazy, read_image, write_image)
from biapy.errors import ConfigError, DataError

CASES = [  # (ndim, shape (spatial..., c), dtype, axes expected in the file)
    (2, (13, 17, 1), np.uint8, "YX"),
    (2, (13, 17, 3), np.uint8, "CYX"),
    (2, (13, 17, 5), np.uint16, "CYX"),
    (3, (5, 13, 17, 1), np.uint16, "ZYX"),
    (3, (5, 13, 17, 2), np.float32, "ZCYX"),
    (3, (5, 13, 17, 2), np.int32, "ZCYX"),  # not an ImageJ dtype: shaped TIFF, same axes
]


@pytest.mark.parametrize("ndim,shape,dtype,axes", CASES)
def test_tiff_round_trip_keeps_values_dtype_and_axes(tmp_path, ndim, shape, dtype, axes):
    a = (np.random.default_rng(0).random(shape) * 200).astype(dtype)
    path = write_image(tmp_path / "a.tif", a, ndim)
    b = read_image(path, ndim)
    assert b.dtype == dtype and b.shape == shape
    np.testing.assert_array_equal(a, b)
    with tifffile.TiffFile(path) as tif:
        assert tif.series[0].axes == axes
        assert tif.is_imagej == (dtype in (np.uint8, np.uint16, np.float32))
    assert image_shape(path, ndim) == shape
    lazy = open_image_lazy(path, ndim)
    assert isinstance(lazy, LazyTiff) and lazy.shape == shape
    region = tuple(slice(1, 4) for _ in range(ndim))
    np.testing.assert_array_equal(lazy[region], a[region])


class _NewSeries:
    """One series as tifffile 2026.11 gives it: shape and axes as configured, no get_shape/get_axes."""

    def __init__(self, series, squeeze):
        self._series, self.shape, self.axes = series, series.get_shape(squeeze), series.get_axes(squeeze)

    def __getattr__(self, name):
        if name in ("get_shape", "get_axes"):
            raise AttributeError(name)
        return getattr(self._series, name)


class _CallableSeries(list):
    """tifffile 2026.11's `TiffFile.series`: default (squeezed) series, unsqueezed ones when called with
    squeeze=False (built here from an older tifffile's series)."""

    def __init__(self, series):
        super().__init__(_NewSeries(s, None) for s in series)
        self._series = series

    def __call__(self, squeeze=None):
        return [_NewSeries(s, squeeze) for s in self._series]


@pytest.mark.parametrize("ndim,shape,dtype,axes", CASES)
def test_headers_read_with_tifffiles_callable_series(tmp_path, monkeypatch, ndim, shape, dtype, axes):
    a = (np.random.default_rng(0).random(shape) * 200).astype(dtype)
    path = write_image(tmp_path / "a.tif", a, ndim)
    if not hasattr(tifffile.TiffPageSeries, "get_shape"):  # this tifffile is already the new one
        assert image_shape(path, ndim) == shape
        return
    series = tifffile.TiffFile.__dict__["series"]  # a cached_property in those releases
    monkeypatch.setattr(tifffile.TiffFile, "series", property(lambda tif: _CallableSeries(series.func(tif))))
    assert image_shape(path, ndim) == shape
    np.testing.assert_array_equal(read_image(path, ndim), a)
    np.testing.assert_array_equal(open_image_lazy(path, ndim)[...], a)


def test_a_tiff_that_tifffile_reads_only_in_part_is_refused(tmp_path, monkeypatch):
    """tifffile 2026.11 zero-fills truncated or empty segments and missing pages, and says so only in an ERROR
    record of its logger (a damaged file had trained silently); emulated here on whatever tifffile is installed,
    with tifffile's logger set up as a run sets it (quiet)."""
    import logging

    from biapy.runner import setup_logging
    path = write_image(tmp_path / "a.tif", np.ones((8, 9, 1), np.uint8), 2)
    asarray = tifffile.TiffPageSeries.asarray

    def partial(self, *args, **kwargs):
        logging.getLogger("tifffile").error("<tifffile.FileHandle 'a.tif'> segments with zero byte count and "
                                            "nonzero offset are treated as empty")
        return asarray(self, *args, **kwargs)

    setup_logging(is_main=True)
    np.testing.assert_array_equal(read_image(path, 2), np.ones((8, 9, 1), np.uint8))  # an intact file reads
    monkeypatch.setattr(tifffile.TiffPageSeries, "asarray", partial)
    with pytest.raises(DataError, match=r"a\.tif: damaged TIFF, read only in part \(tifffile: .*zero byte count"):
        read_image(path, 2)


def test_float64_and_bool_are_converted(tmp_path):
    path = write_image(tmp_path / "f.tif", np.full((4, 5, 1), 0.5), 2)
    assert read_image(path, 2).dtype == np.float32
    path = write_image(tmp_path / "b.tif", np.ones((4, 5), bool), 2)
    b = read_image(path, 2)
    assert b.dtype == np.uint8 and b.shape == (4, 5, 1) and b.min() == 1


def test_imagej_hyperstack_in_fiji_order_is_read_as_zyxc(tmp_path):
    zcyx = np.random.default_rng(1).integers(0, 1000, (4, 3, 6, 7), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "h.tif", zcyx[None], imagej=True, metadata={"axes": "TZCYX"})
    b = read_image(tmp_path / "h.tif", 3)
    np.testing.assert_array_equal(b, np.moveaxis(zcyx, 1, -1))


def test_plain_tiff_without_axes_uses_channel_last(tmp_path):
    a = np.arange(6 * 7 * 2, dtype=np.uint16).reshape(6, 7, 2)
    tifffile.imwrite(tmp_path / "p.tif", a)
    np.testing.assert_array_equal(read_image(tmp_path / "p.tif", 2), a)
    stack = np.arange(3 * 6 * 7, dtype=np.uint8).reshape(3, 6, 7)
    tifffile.imwrite(tmp_path / "s.tif", stack)
    np.testing.assert_array_equal(read_image(tmp_path / "s.tif", 3), stack[..., None])


def test_png_and_jpg(tmp_path):
    rgb = np.random.default_rng(2).integers(0, 255, (16, 18, 3), dtype=np.uint8)
    grey = rgb[..., 0]
    skio.imsave(tmp_path / "rgb.png", rgb, check_contrast=False)
    skio.imsave(tmp_path / "grey.png", grey, check_contrast=False)
    np.testing.assert_array_equal(read_image(tmp_path / "rgb.png", 2), rgb)
    np.testing.assert_array_equal(read_image(tmp_path / "grey.png", 2), grey[..., None])
    smooth = np.tile(np.linspace(0, 250, 18, dtype=np.uint8), (16, 1))
    Image.fromarray(smooth).save(tmp_path / "s.jpg", quality=95)
    b = read_image(tmp_path / "s.jpg", 2)
    assert b.shape == (16, 18, 1) and np.abs(b[..., 0].astype(int) - smooth).max() <= 6
    # write_image keeps PNG for data PNG can hold, else writes a TIFF beside it
    assert write_image(tmp_path / "out.png", rgb, 2).suffix == ".png"
    assert write_image(tmp_path / "out2.png", rgb.astype(np.float32), 2).name == "out2.tif"
    # 4 channels (RGBA, or a CMYK JPEG as read): PNG holds them, JPEG does not (crappify's copy of one had failed)
    four = np.concatenate([rgb, rgb[..., :1]], axis=-1)
    assert write_image(tmp_path / "out4.png", four, 2).suffix == ".png"
    out = write_image(tmp_path / "out4.jpg", four, 2)
    assert out.name == "out4.png"
    np.testing.assert_array_equal(read_image(out, 2), four)
    # JPEG is lossy: label maps and crappified copies asked for as .jpg are written losslessly beside it
    labels = np.random.default_rng(3).integers(0, 3, (16, 18, 1), dtype=np.uint8)
    for name in ("labels.jpg", "labels2.jpeg"):
        out = write_image(tmp_path / name, labels, 2)
        assert out.suffix == ".png" and not (tmp_path / name).exists()
        np.testing.assert_array_equal(read_image(out, 2), labels)
    # PIL writes uint16 PNGs in grey only: RGB uint16 goes to a TIFF
    assert write_image(tmp_path / "g16.png", labels.astype(np.uint16) * 1000, 2).suffix == ".png"
    out = write_image(tmp_path / "rgb16.png", rgb.astype(np.uint16) * 200, 2)
    assert out.name == "rgb16.tif"
    np.testing.assert_array_equal(read_image(out, 2), rgb.astype(np.uint16) * 200)
    with pytest.raises(DataError, match="rgb.png"):
        read_image(tmp_path / "rgb.png", 3)


def test_list_images_sorted_skips_hidden_and_others(tmp_path):
    for name in ("b.tif", "a.png", ".hidden.tif", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.name for p in list_images(tmp_path, "DATA.TRAIN.PATH")] == ["a.png", "b.tif"]


def test_list_images_errors_name_key_and_folder(tmp_path):
    with pytest.raises(ConfigError, match="DATA.TRAIN.PATH.*nope"):
        list_images(tmp_path / "nope", "DATA.TRAIN.PATH")
    with pytest.raises(ConfigError, match="DATA.VAL.PATH"):
        list_images("", "DATA.VAL.PATH")
    with pytest.raises(DataError, match="DATA.TEST.PATH.*no images"):
        list_images(tmp_path, "DATA.TEST.PATH")


def test_unreadable_and_truncated_files_name_the_file(tmp_path):
    (tmp_path / "junk.tif").write_bytes(b"not a tiff at all")
    with pytest.raises(DataError, match="junk.tif"):
        read_image(tmp_path / "junk.tif", 2)
    path = write_image(tmp_path / "t.tif", np.ones((3, 40, 40, 1), np.uint16), 3)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    for fn in (read_image, open_image_lazy):
        with pytest.raises(DataError, match="t.tif"):
            fn(path, 3)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DataError, match="bad.png") as refused:
        read_image(tmp_path / "bad.png", 2)
    # The reader's first line only: imageio appends lines of plugins to install, beside the point for a broken PNG.
    assert "\n" not in str(refused.value) and "pip install" not in str(refused.value)


def test_dimensionality_mismatch_names_file(tmp_path):
    path = write_image(tmp_path / "stack.tif", np.zeros((4, 8, 8, 1), np.uint8), 3)
    with pytest.raises(DataError, match="stack.tif.*3D"):
        read_image(path, 2)


def test_mixed_channels_name_the_first_different_file(tmp_path):
    write_image(tmp_path / "a.tif", np.zeros((8, 8, 1), np.uint8), 2)
    write_image(tmp_path / "b.tif", np.zeros((8, 8, 1), np.uint8), 2)
    write_image(tmp_path / "c.tif", np.zeros((8, 8, 3), np.uint8), 2)
    files = list_images(tmp_path, "DATA.TRAIN.PATH")
    check_consistent_channels(files[:2], 2, "DATA.TRAIN.PATH")
    with pytest.raises(DataError, match="DATA.TRAIN.PATH.*c.tif.*3 channel"):
        check_consistent_channels(files, 2, "DATA.TRAIN.PATH")


def test_check_finite(tmp_path):
    img = np.ones((4, 4, 1), np.float32)
    check_finite(img, "ok.tif")
    img[1, 1] = np.nan
    with pytest.raises(DataError, match="nan.tif"):
        check_finite(img, "nan.tif")


def test_compressed_tiff_falls_back_to_full_read(tmp_path):
    a = np.arange(2 * 9 * 9, dtype=np.uint16).reshape(2, 9, 9)
    tifffile.imwrite(tmp_path / "z.tif", a, compression="zlib", imagej=True, metadata={"axes": "ZYX"})
    lazy = open_image_lazy(tmp_path / "z.tif", 3)
    assert isinstance(lazy, np.ndarray)
    np.testing.assert_array_equal(lazy[..., 0], a)


def test_lzw_tiffs_as_image_programs_save_them_are_read(tmp_path):
    """LZW (PIL's and many microscope programs' TIFF compression) needs imagecodecs, a requirement."""
    from PIL import Image

    a = np.random.default_rng(0).integers(0, 255, (20, 30), dtype=np.uint8)
    Image.fromarray(a).save(tmp_path / "lzw.tif", compression="tiff_lzw")
    stack = np.arange(3 * 8 * 8, dtype=np.uint16).reshape(3, 8, 8)
    tifffile.imwrite(tmp_path / "lzw3d.tif", stack, compression="lzw", imagej=True, metadata={"axes": "ZYX"})
    np.testing.assert_array_equal(read_image(tmp_path / "lzw.tif", 2)[..., 0], a)
    np.testing.assert_array_equal(open_image_lazy(tmp_path / "lzw3d.tif", 3)[..., 0], stack)


def test_write_is_atomic_and_leaves_no_temp(tmp_path):
    write_image(tmp_path / "sub" / "x.tif", np.zeros((4, 4, 1), np.uint8), 2)
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["x.tif"]


def test_lazy_regions_of_an_imagej_hyperstack(tmp_path):
    tzcyx = np.random.default_rng(3).integers(0, 60000, (1, 5, 2, 9, 11), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "h.tif", tzcyx, imagej=True, metadata={"axes": "TZCYX"})
    want = np.moveaxis(tzcyx[0], 1, -1)
    lazy = open_image_lazy(tmp_path / "h.tif", 3)
    assert lazy.shape == (5, 9, 11, 2) and lazy.dtype == np.uint16
    np.testing.assert_array_equal(lazy[1:4, 2:7, 3:9], want[1:4, 2:7, 3:9])
    np.testing.assert_array_equal(lazy[::2, ::3, ::2], want[::2, ::3, ::2])
    np.testing.assert_array_equal(np.asarray(lazy), want)


LAYOUTS = {  # stored array shape, how it is written, canonical (spatial..., c) view of it
    "ZYX": ((6, 9, 11), {"imagej": True, "metadata": {"axes": "ZYX"}}, lambda a: a[..., None]),
    "TZCYX": ((1, 6, 2, 9, 11), {"imagej": True, "metadata": {"axes": "TZCYX"}},
              lambda a: np.moveaxis(a[0], 1, -1)),
    "YXS": ((9, 11, 3), {"photometric": "rgb"}, lambda a: a),
}


def _lazy_key(draw, shape):
    key = []
    for n in shape:
        kind = draw(st.sampled_from(["int", "slice", "all"]))
        if kind == "int":
            key.append(draw(st.integers(-n, n - 1)))
        elif kind == "slice":
            bound = st.none() | st.integers(-n - 2, n + 2)
            key.append(slice(draw(bound), draw(bound), draw(st.sampled_from([None, 1, 2, 3, -1, -2]))))
        else:
            key.append(slice(None))
    if draw(st.booleans()):  # an Ellipsis standing for some of the trailing axes
        cut = draw(st.integers(0, len(key)))
        key = key[:cut] + [Ellipsis]
    return tuple(key)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), layout=st.sampled_from(sorted(LAYOUTS)), map_bytes=st.sampled_from([0, 64, 1 << 22]))
def test_lazy_tiff_regions_equal_numpy_for_any_key_and_read_split(tmp_path, monkeypatch, data, layout, map_bytes):
    """Region reads (ints, steps, negative steps, Ellipsis; mapped as whole slices, rows or single runs of
    bytes, as MAP_BYTES allows) return what numpy's indexing of the image read whole returns."""
    stored_shape, kwargs, canonical = LAYOUTS[layout]
    path = tmp_path / f"{layout}.tif"
    if not path.exists():
        arr = np.arange(np.prod(stored_shape), dtype=np.uint16).reshape(stored_shape)
        tifffile.imwrite(path, arr, **kwargs)
    want = canonical(tifffile.imread(path).reshape(stored_shape))
    lazy = open_image_lazy(path, 3 if len(want.shape) == 4 else 2)
    assert isinstance(lazy, LazyTiff) and lazy.shape == want.shape
    monkeypatch.setattr(LazyTiff, "MAP_BYTES", map_bytes)
    key = _lazy_key(data.draw, want.shape)
    got = lazy[key]
    assert got.dtype == want.dtype and got.flags.c_contiguous
    np.testing.assert_array_equal(got, want[key])


def test_lazy_tiff_maps_at_most_map_bytes_of_the_file_at_once(tmp_path, monkeypatch):
    """A whole-file map let the kernel make a patch's large page-cache folios resident (~70 MB per patch);
    every map must stay within MAP_BYTES (plus page alignment) and be closed before the next one opens."""
    import mmap as mmap_module

    vol = np.random.default_rng(5).integers(0, 60000, (6, 64, 128, 1), dtype=np.uint16)  # 16 KB slices
    lazy = open_image_lazy(write_image(tmp_path / "v.tif", vol, 3), 3)
    monkeypatch.setattr(LazyTiff, "MAP_BYTES", 8192)  # a 20-row run of a slice (5 KB) fits, a slice does not
    real, sizes, open_maps = mmap_module.mmap, [], []

    class CountingMap(real):
        def __init__(self, fileno, length, *args, **kwargs):
            sizes.append(length)
            assert not open_maps, "a map was opened while another was still open"
            open_maps.append(self)

        def __exit__(self, *exc):
            open_maps.remove(self)
            return super().__exit__(*exc)

    monkeypatch.setattr(mmap_module, "mmap", CountingMap)
    np.testing.assert_array_equal(lazy[1:5, 10:30, 7:50], vol[1:5, 10:30, 7:50])
    assert len(sizes) == 4 and max(sizes) <= 8192 + mmap_module.ALLOCATIONGRANULARITY  # one 20-row map per slice
    assert not open_maps


def test_lazy_tiff_refuses_keys_it_cannot_read_by_region(tmp_path):
    path = write_image(tmp_path / "a.tif", np.zeros((4, 5, 6, 1), np.uint16), 3)
    lazy = open_image_lazy(path, 3)
    with pytest.raises(IndexError, match="index 4 is out of bounds"):
        lazy[4]
    with pytest.raises(IndexError, match="too many indices"):
        lazy[0, 0, 0, 0, 0]
    with pytest.raises(TypeError, match="ints, slices and Ellipsis"):
        lazy[[0, 1]]


def test_lazy_store_maps_canonical_slices_to_stored_axes(tmp_path):
    from biapy.data.io import LazyStore, _named_plan

    stored = np.random.default_rng(4).random((1, 4, 3, 6, 7, 1))  # TZCYXS, as tifffile's unsqueezed store
    plan = _named_plan(stored.shape, "TZCYXS", 3, "x.tif")
    store = LazyStore("x.tif", plan, lambda: stored)
    want = np.moveaxis(stored[0, :, :, :, :, 0], 1, -1)
    assert store.shape == want.shape
    np.testing.assert_array_equal(store[1:3, 2:5, 0:4], want[1:3, 2:5, 0:4])
    np.testing.assert_array_equal(store[...], want)


def test_optional_formats_explain_the_missing_package(tmp_path):
    try:
        import nibabel  # noqa: F401
    except ImportError:
        (tmp_path / "v.nii.gz").write_bytes(b"x")
        with pytest.raises(DataError, match="v.nii.gz.*nibabel"):
            read_image(tmp_path / "v.nii.gz", 3)
    with pytest.raises(DataError, match="notes.txt.*unsupported"):
        (tmp_path / "notes.txt").write_text("x")
        read_image(tmp_path / "notes.txt", 2)


@pytest.mark.parametrize("stored, ndim, channel_axis", [
    ((3, 40, 52), 2, 0),      # tifffile's default writer stores it as planar RGB (axes SYX)
    ((2, 40, 52), 2, 0),      # no samples axis: a first axis of at most 3 is channels, as BiaPy reads it
    ((40, 52, 2), 2, 2),
    ((40, 52, 5), 2, 2),
    ((2, 5, 40, 52), 3, 0),   # CZYX
    ((5, 3, 40, 52), 3, 1),   # ZCYX: tifffile's samples axis S
    ((5, 40, 52, 2), 3, 3),
    ((3, 40, 52), 3, None),   # a 3-slice volume without channels stays a volume
])
def test_tiffs_without_axis_names_find_their_channel_axis(tmp_path, stored, ndim, channel_axis):
    arr = np.arange(np.prod(stored)).reshape(stored).astype(np.uint16)
    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, arr)
    want = arr[..., None] if channel_axis is None else np.moveaxis(arr, channel_axis, -1)
    np.testing.assert_array_equal(read_image(path, ndim), want)
    assert image_shape(path, ndim) == want.shape
    np.testing.assert_array_equal(np.asarray(open_image_lazy(path, ndim)[:]), want)


def test_output_stems_and_their_collisions(tmp_path):
    from biapy.data.io import check_unique_stems, image_stem

    assert [image_stem(n) for n in ("a.tif", "a.ome.tif", "cell.v0.tif", "b.nii.gz", "c.PNG")] == \
        ["a", "a", "cell.v0", "b", "c"]
    check_unique_stems([tmp_path / "cell.v0.tif", tmp_path / "cell.v1.tif"], "DATA.TEST.PATH")
    with pytest.raises(DataError, match=r"DATA.TEST.PATH: cell.png and cell.tif would write the same output"):
        check_unique_stems([tmp_path / "cell.png", tmp_path / "cell.tif"], "DATA.TEST.PATH")


def test_fixed_clip_values_for_more_channels_than_the_image_has():
    from biapy.data.normalization import Normalizer

    norm = Normalizer("zero_mean_unit_variance", clip=True, lower_value=(10.0, 20.0))
    with pytest.raises(DataError, match=r"PERC_CLIP.LOWER_VALUE holds 2 channel value\(s\) but the image has 1"):
        norm.stats(np.zeros((8, 8, 1), np.float32))


def test_unnamed_page_sequence_follows_the_rule_for_files_without_axis_names(tmp_path):
    """A TIFF of pages written one by one without metadata: tifffile calls its page axis 'I', a guess, not a name.
    A volume in 3D; in 2D, up to 3 pages are channels and more no longer 5 channels (whose hint had been to set
    the patch's channels to 5, training on slices as channels) but a stack that needs PROBLEM.NDIM 3D."""
    path = tmp_path / "pages.tif"
    with tifffile.TiffWriter(path) as tw:
        for k in range(5):
            tw.write(np.full((12, 10), k, np.uint16), metadata=None)
    volume = read_image(path, 3)
    assert volume.shape == (5, 12, 10, 1) and volume[:, 0, 0, 0].tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(DataError, match=r"pages\.tif: 5 pages of 12x10 pixels without axis names: a stack of slices "
                                        r"needs PROBLEM\.NDIM 3D"):
        read_image(path, 2)
    three = tmp_path / "three.tif"  # up to 3 pages: channels, in 2D (as BiaPy reads such a file)
    with tifffile.TiffWriter(three) as tw:
        for k in range(3):
            tw.write(np.full((12, 10), k, np.uint16), metadata=None)
    assert read_image(three, 2).shape == (12, 10, 3) and read_image(three, 2)[0, 0].tolist() == [0, 1, 2]
    assert read_image(three, 3).shape == (3, 12, 10, 1)
    with pytest.raises(DataError, match="needs PROBLEM.NDIM 3D"):
        image_shape(path, 2)
    rgb_pages = tmp_path / "rgb_pages.tif"  # pages of RGB samples: the samples stay channels
    tifffile.imwrite(rgb_pages, np.arange(4 * 6 * 5 * 3, dtype=np.uint8).reshape(4, 6, 5, 3), metadata=None)
    assert read_image(rgb_pages, 3).shape == (4, 6, 5, 3)


def test_a_volume_truncated_while_open_lazily_is_a_data_error_naming_it(tmp_path):
    """Training from disk (IN_MEMORY False) reads through memory maps: a file cut short during the run had raised
    numpy's 'mmap length is greater than file size' with a traceback."""
    vol = np.arange(6 * 40 * 50, dtype=np.uint16).reshape(6, 40, 50, 1)
    path = write_image(tmp_path / "vol.tif", vol, 3)
    lazy = open_image_lazy(path, 3)
    np.testing.assert_array_equal(lazy[4:6, :10], vol[4:6, :10])
    with open(path, "r+b") as fh:
        fh.truncate(5000)
    with pytest.raises(DataError, match=r"vol\.tif: cannot read image \(.*\); was the file changed during the run\?"):
        lazy[4:6, :10]


@pytest.mark.parametrize("mode, ext", [("L", "png"), ("L", "jpg"), ("LA", "png"), ("RGB", "png"), ("RGB", "jpg"),
                                       ("RGBA", "png"), ("I;16", "png"), ("1", "png"), ("P", "png"),
                                       ("CMYK", "jpg")])
def test_png_shape_from_its_header_is_the_shape_read(tmp_path, mode, ext, monkeypatch):
    """PNG shapes come from the header (decoding whole took 16-57x as long, twice per image before training), and
    agree with the pixels read; palette PNGs, converted on reading, and JPEGs are decoded."""
    path = tmp_path / f"im.{ext}"
    Image.fromarray(np.random.default_rng(0).integers(0, 200, (21, 33), dtype=np.uint8)).convert(mode).save(path)
    expected = read_image(path, 2).shape
    decoded = []
    imread = skio.imread
    monkeypatch.setattr(skio, "imread", lambda *a, **k: decoded.append(1) or imread(*a, **k))
    assert image_shape(path, 2) == expected
    assert bool(decoded) == (ext == "jpg" or mode == "P")


def test_a_damaged_png_is_found_by_its_shape_check(tmp_path):
    """The header alone had passed a PNG cut short: a test image so damaged had stopped the run after training."""
    path = tmp_path / "cut.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 200, (64, 64), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(DataError, match="cut.png: cannot read image"):
        image_shape(path, 2)


def test_a_tiff_header_is_read_again_once_the_file_changes(tmp_path):
    """Another file of the same size put in place with the first one's time (cp -p, rsync -a) is read again."""
    path = write_image(tmp_path / "a.tif", np.zeros((8, 9, 2), np.uint8), 2)
    assert image_shape(path, 2) == (8, 9, 2)
    st = path.stat()
    other = write_image(tmp_path / "b.tif", np.zeros((9, 8, 2), np.uint8), 2)
    assert other.stat().st_size == st.st_size
    os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(other, path)
    assert path.stat().st_mtime_ns == st.st_mtime_ns and image_shape(path, 2) == (9, 8, 2)
    np.testing.assert_array_equal(read_image(path, 2), np.zeros((9, 8, 2), np.uint8))


def test_ctrl_c_during_a_lazy_read_stays_a_keyboard_interrupt(tmp_path, monkeypatch):
    """Interrupted while an array pointed into the map, closing the map had raised BufferError in its place."""
    path = write_image(tmp_path / "v.tif", np.zeros((4, 16, 16, 1), np.uint16), 3)
    lazy = open_image_lazy(path, 3)
    assert isinstance(lazy, LazyTiff)
    frombuffer = np.frombuffer

    class Interrupted:
        def __init__(self, *args, **kwargs):
            self.array = frombuffer(*args, **kwargs)  # points into the map

        @staticmethod
        def reshape(*args):  # as a Ctrl-C inside numpy's copy: no frame of its own holds the array
            raise KeyboardInterrupt

    monkeypatch.setattr(np, "frombuffer", Interrupted)
    with pytest.raises(KeyboardInterrupt):
        lazy[1:3]


def test_images_over_pillows_pixel_limit_are_read_and_the_limit_is_kept(tmp_path, monkeypatch):
    """Pillow's guard against decompression bombs had refused the user's own PNGs over 179 M pixels (a 20000x20000
    one), when read and when its shape was read; it is lifted for this tool's reads only."""
    a = np.random.default_rng(0).integers(0, 200, (16, 18), dtype=np.uint8)  # 288 pixels
    Image.fromarray(a).save(tmp_path / "big.png")
    Image.fromarray(a).save(tmp_path / "big.jpg", quality=95)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # over twice the limit: an error
    decoded = []
    imread = skio.imread
    monkeypatch.setattr(skio, "imread", lambda *args, **kw: decoded.append(1) or imread(*args, **kw))
    assert image_shape(tmp_path / "big.png", 2) == (16, 18, 1) and not decoded  # from the header
    np.testing.assert_array_equal(read_image(tmp_path / "big.png", 2)[..., 0], a)
    assert read_image(tmp_path / "big.jpg", 2).shape == (16, 18, 1)
    assert Image.MAX_IMAGE_PIXELS == 100
    with pytest.raises(Image.DecompressionBombError):
        Image.open(tmp_path / "big.png")  # other code keeps the limit


def test_iter_slabs_reads_a_lazy_2d_image_by_rows(tmp_path):
    """A lazy 2D image is read a slab of rows at a time (crappify's value range), not whole."""
    a = np.arange(30 * 7 * 2, dtype=np.uint16).reshape(30, 7, 2)
    lazy = open_image_lazy(write_image(tmp_path / "a.tif", a, 2), 2)
    slabs = list(iter_slabs(lazy, 7 * 2 * 4))
    assert [len(s) for s in slabs] == [4] * 7 + [2]
    np.testing.assert_array_equal(np.concatenate(slabs), a)


def test_a_time_series_is_named_as_such(tmp_path):
    """ImageJ's TZYX had been 'cannot map axes TZCYXS … (T=3 left)', which says neither what it is nor what to do."""
    path = tmp_path / "movie.tif"
    tifffile.imwrite(path, np.zeros((3, 8, 16, 16), np.uint8), imagej=True, metadata={"axes": "TZYX"})
    with pytest.raises(DataError, match=r"movie.tif: has a T axis of 3 time points besides its Z axis of 8 slices .*"
                                        r"expected one 3D image per file: save each time point as a file of its own"):
        read_image(path, 3)
    flat = tmp_path / "flat.tif"
    tifffile.imwrite(flat, np.zeros((3, 16, 16), np.uint8), imagej=True, metadata={"axes": "TYX"})
    with pytest.raises(DataError, match=r"flat.tif: has a T axis of 3 time points .*expected one 2D image per file"):
        read_image(flat, 2)


def _written_calibration(path):
    """(X, Y pixels per unit, ResolutionUnit, unit, z spacing) of a TIFF, as tifffile reads them."""
    with tifffile.TiffFile(path) as tif:
        page, meta = tif.pages[0], tif.imagej_metadata or {}
        return (tuple(round(r, 6) for r in page.resolution), int(page.resolutionunit), meta.get("unit"),
                meta.get("spacing"))


def write_calibrated(path, array, kind):
    """A calibrated input: 'imagej' (0.325 um pixels, 2D, or 0.2 um pixels and 1.5 um slices in 3D), 'ome'
    (an OME-TIFF of 0.2 um pixels, 1.5 um slices in 3D)."""
    axes = "ZYX" if array.ndim == 3 else "YX"
    if kind == "ome":
        sizes = {"PhysicalSizeX": 0.2, "PhysicalSizeY": 0.2, **({"PhysicalSizeZ": 1.5} if array.ndim == 3 else {})}
        tifffile.imwrite(path, array, photometric="minisblack", metadata={"axes": axes, **sizes})
    elif array.ndim == 2:
        tifffile.imwrite(path, array, imagej=True, resolution=((40, 13), (40, 13)),
                         metadata={"axes": axes, "unit": "um"})
    else:
        tifffile.imwrite(path, array, imagej=True, resolution=((5, 1), (5, 1)),
                         metadata={"axes": axes, "unit": "um", "spacing": 1.5})
    return path


# What an ImageJ output of each input holds: pixels per unit, ResolutionUnit NONE, unit, z spacing.
EXPECTED_CALIBRATION = {("imagej", 2): ((40 / 13, 40 / 13), "um", None), ("imagej", 3): ((5.0, 5.0), "um", 1.5),
                        ("ome", 2): ((5.0, 5.0), "um", None), ("ome", 3): ((5.0, 5.0), "um", 1.5)}


def expected_calibration(kind, ndim):
    res, unit, spacing = EXPECTED_CALIBRATION[kind, ndim]
    return tuple(round(r, 6) for r in res), 1, unit, spacing


@pytest.mark.parametrize("kind", ["imagej", "ome"])
@pytest.mark.parametrize("ndim", [2, 3])
def test_outputs_keep_the_calibration_of_their_input(tmp_path, kind, ndim):
    """The pixel size, unit and z spacing of an ImageJ or OME input are written into an output (an ImageJ
    hyperstack, as Fiji opens it calibrated), whole or slice by slice; an .ome.tif output keeps its name."""
    from biapy.data.io import tiff_calibration, write_image_slices

    shape = (3, 6, 5) if ndim == 3 else (6, 5)
    src = write_calibrated(tmp_path / f"in.{'ome.' if kind == 'ome' else ''}tif",
                           np.arange(np.prod(shape), dtype=np.uint16).reshape(shape), kind)
    calibration = tiff_calibration(src)
    want = expected_calibration(kind, ndim)
    for dtype in (np.float32, np.uint8):
        out = write_image(tmp_path / f"out_{np.dtype(dtype).name}.ome.tif", np.zeros(shape + (2,), dtype), ndim,
                          calibration=calibration)
        assert out.name.endswith(".ome.tif") and tifffile.TiffFile(out).is_imagej
        assert _written_calibration(out) == want
    if ndim == 3:
        out = write_image_slices(tmp_path / "slices.tif", (np.zeros(shape[1:] + (1,), np.float32) for _ in range(3)),
                                 shape + (1,), np.float32, calibration=calibration)
        assert _written_calibration(out) == want
    # Uncalibrated inputs (and non-TIFFs) have none; writing none gives tifffile's default, 1 pixel per unit.
    write_image(tmp_path / "plain.tif", np.zeros(shape + (1,), np.uint8), ndim)
    assert tiff_calibration(tmp_path / "plain.tif") is None
    assert _written_calibration(tmp_path / "plain.tif")[:1] == ((1.0, 1.0),)


def _whole_array_reference(path, arr, ndim, calibration):
    """What write_image wrote before it went through `image_rows_writer`: tifffile (or PIL) given the whole array."""
    if arr.ndim == ndim:
        arr = arr[..., None]
    arr = arr.astype({np.dtype(bool): np.uint8, np.dtype(np.float64): np.float32}.get(arr.dtype, arr.dtype))
    c = arr.shape[-1]
    if path.suffix == ".png":
        Image.fromarray(arr[..., 0] if c == 1 else arr).save(path, format="PNG")
        return
    axes = ("ZYX" if ndim == 3 else "YX") if c == 1 else ("ZCYX" if ndim == 3 else "CYX")
    metadata, extra = {"axes": axes}, {}
    if calibration:
        metadata["unit"] = calibration["unit"]
        extra = {"resolution": calibration["resolution"], "resolutionunit": calibration["resolutionunit"]}
        if ndim == 3:
            metadata["spacing"] = calibration["spacing"]
    tifffile.imwrite(path, arr[..., 0] if c == 1 else np.moveaxis(arr, -1, -3),
                     imagej=arr.dtype in (np.uint8, np.uint16, np.float32), metadata=metadata,
                     photometric="minisblack", **extra)


@pytest.mark.parametrize("ndim, shape", [(2, (13, 11)), (2, (13, 11, 1)), (2, (13, 11, 2)), (2, (13, 11, 3)),
                                         (3, (4, 13, 11)), (3, (4, 13, 11, 1)), (3, (4, 13, 11, 3))])
@pytest.mark.parametrize("calibrated", [False, True])
def test_write_image_writes_the_bytes_of_the_whole_array_written_at_once(tmp_path, ndim, shape, calibrated):
    """write_image goes through the band writer: the same file, byte for byte, as tifffile (PIL for a PNG) writing
    the whole array with the same arguments, for every dtype it takes (ImageJ's and the others), a .png, .jpg
    (-> .png) or .png path that needs a .tif, and a path without an image extension (-> .tif)."""
    calibration = {"resolution": ((40, 13), (40, 13)), "resolutionunit": 1, "unit": "um", "spacing": 1.5} \
        if calibrated else None
    values = np.random.default_rng(3).random(shape) * 200
    for dtype in (np.uint8, np.uint16, np.float32, np.float64, np.int8, np.int16, np.int32, np.uint32, bool):
        arr = values.astype(dtype)
        for ext in (".tif", ".png", ".jpg", ""):
            name = f"{np.dtype(dtype).name}{ext}"
            written = write_image(tmp_path / "new" / name, arr, ndim, calibration)
            channels = 1 if len(shape) == ndim else shape[-1]
            png = ext in (".png", ".jpg") and ndim == 2 and ((arr.dtype in (np.uint8, bool) and channels in (1, 3))
                                                            or (arr.dtype == np.uint16 and channels == 1))
            assert written.name == (f"{np.dtype(dtype).name}.png" if png else f"{np.dtype(dtype).name}.tif")
            want = tmp_path / "old" / written.name
            want.parent.mkdir(exist_ok=True)
            _whole_array_reference(want, arr, ndim, None if png else calibration)
            assert written.read_bytes() == want.read_bytes(), (written.name, shape)


@pytest.mark.parametrize("ndim, shape", [(2, (13, 11, 3)), (3, (4, 13, 11, 2))])
def test_a_large_image_is_written_a_band_at_a_time_as_the_same_file(tmp_path, monkeypatch, ndim, shape):
    """Above _Rows.BAND_BYTES write_image converts and reorders the array a band at a time (a 3D image with
    channels had been copied whole to be reordered): the file is the same."""
    from biapy.data import io

    arr = np.random.default_rng(4).random(shape)  # float64: converted to float32 on writing
    monkeypatch.setattr(io._Rows, "BAND_BYTES", arr[0].size * 4 * 2)  # bands of 2 rows (z slices in 3D)
    bands = []
    real_write = io._Rows.write
    monkeypatch.setattr(io._Rows, "write", lambda self, band: (bands.append(len(band)), real_write(self, band)))
    written = write_image(tmp_path / "a.tif", arr, ndim)
    _whole_array_reference(tmp_path / "b.tif", arr, ndim, None)
    assert bands == [2] * (shape[0] // 2) + [1] * (shape[0] % 2)
    assert written.read_bytes() == (tmp_path / "b.tif").read_bytes()


def test_a_big_endian_array_is_written_as_the_same_values_in_the_machines_order(tmp_path):
    """It had become a big-endian TIFF without ImageJ metadata (with one channel; one with several, a little-endian
    ImageJ one): now the file of the same values in the machine's order."""
    arr = np.arange(2 * 6 * 5, dtype=np.uint16).reshape(6, 5, 2)
    for c in (1, 2):
        big = write_image(tmp_path / f"big{c}.tif", arr[..., :c].astype(">u2"), 2)
        native = write_image(tmp_path / f"native{c}.tif", arr[..., :c], 2)
        assert big.read_bytes() == native.read_bytes() and tifffile.TiffFile(big).is_imagej


def test_a_failed_write_names_the_file_and_keeps_the_one_it_would_replace(tmp_path, monkeypatch):
    from biapy.data import io
    from biapy.errors import BiapyError

    path = write_image(tmp_path / "x.tif", np.ones((4, 5), np.uint8), 2)
    before = path.read_bytes()

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(io, "_write_tiff", full_disk)
    with pytest.raises(BiapyError, match=r"x\.tif: cannot write \(No space left on device\)$"):
        write_image(path, np.zeros((4, 5), np.uint8), 2)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["x.tif"]
    (tmp_path / "file").write_text("")
    with pytest.raises(BiapyError, match=r"cannot write"):
        write_image(tmp_path / "file" / "y.png", np.zeros((4, 5), np.uint8), 2)
    with pytest.raises(ValueError, match=r"write_image: array of shape \(4, 5, 6, 7\) is not a 2D channel-last"):
        write_image(tmp_path / "z.tif", np.zeros((4, 5, 6, 7), np.uint8), 2)
