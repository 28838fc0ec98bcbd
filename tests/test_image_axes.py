"""biapy.data.image_axes: round trips per axis layout, ImageJ and tifffile axes, the channel axis of files without
axis names, stacks and time series refused by name, TIFF headers (tifffile's callable series, read again once
changed)."""
import os

import numpy as np
import pytest
import tifffile

from biapy.data.image_writing import write_image
from biapy.data.io import image_shape, open_image_lazy, read_image
from biapy.data.lazy_images import LazyTiff
from biapy.errors import DataError

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


def test_dimensionality_mismatch_names_file(tmp_path):
    path = write_image(tmp_path / "stack.tif", np.zeros((4, 8, 8, 1), np.uint8), 3)
    with pytest.raises(DataError, match="stack.tif.*3D"):
        read_image(path, 2)


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
