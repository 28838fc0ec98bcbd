"""biapy.data.lazy_images: region reads equal numpy's indexing, maps of at most MAP_BYTES, keys refused, files
changed or interrupted under a lazy read, slabs."""
import numpy as np
import pytest
import tifffile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from biapy.data.image_writing import write_image
from biapy.data.io import open_image_lazy
from biapy.data.lazy_images import LazyTiff, iter_slabs
from biapy.errors import DataError


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
    from biapy.data.image_axes import _named_plan
    from biapy.data.lazy_images import LazyStore

    stored = np.random.default_rng(4).random((1, 4, 3, 6, 7, 1))  # TZCYXS, as tifffile's unsqueezed store
    plan = _named_plan(stored.shape, "TZCYXS", 3, "x.tif")
    store = LazyStore("x.tif", plan, lambda: stored)
    want = np.moveaxis(stored[0, :, :, :, :, 0], 1, -1)
    assert store.shape == want.shape
    np.testing.assert_array_equal(store[1:3, 2:5, 0:4], want[1:3, 2:5, 0:4])
    np.testing.assert_array_equal(store[...], want)


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


def test_iter_slabs_reads_a_lazy_2d_image_by_rows(tmp_path):
    """A lazy 2D image is read a slab of rows at a time (crappify's value range), not whole."""
    a = np.arange(30 * 7 * 2, dtype=np.uint16).reshape(30, 7, 2)
    lazy = open_image_lazy(write_image(tmp_path / "a.tif", a, 2), 2)
    slabs = list(iter_slabs(lazy, 7 * 2 * 4))
    assert [len(s) for s in slabs] == [4] * 7 + [2]
    np.testing.assert_array_equal(np.concatenate(slabs), a)
