"""Finding and reading images as channel-last numpy arrays: (y, x, c) in 2D, (z, y, x, c) in 3D.

Listing a folder's images and the output stems named after them; reading an image whole (`read_image`), its shape
from the header where the format allows (`image_shape`), or only the regions sliced from it (`open_image_lazy`,
which opens the readers of `biapy.data.lazy_images` where the file allows); the checks of what was read (channels,
finite values). How a TIFF's axes become channel-last is `biapy.data.image_axes`; writing is
`biapy.data.image_writing`.
PNG/JPEG go through scikit-image; NIfTI (nibabel), HDF5 (h5py) and Zarr (zarr) are optional
extras imported only when such a file is met (arrays in them are read as channel-last).
"""
from __future__ import annotations

import functools
import logging
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from biapy.data.image_axes import plain_plan, refusing_damage, tiff_header
from biapy.data.image_formats import (CHUNKED_EXTS, IMAGE_EXTS, PLAIN_EXTS, TIFF_EXTS, check_ndim, error_summary,
                                      image_suffix)
from biapy.data.lazy_images import LazyStore, LazyTiff
from biapy.errors import ConfigError, DataError

log = logging.getLogger(__name__)


def image_stem(path) -> str:
    """The file name without its image extension ('a.ome.tif' -> 'a', 'cell.v0.tif' -> 'cell.v0')."""
    name = Path(path).name
    ext = image_suffix(name)
    stem = name[: len(name) - len(ext)] if ext else name
    return stem[:-4] if stem.lower().endswith(".ome") else stem


def check_unique_stems(paths, key: str) -> None:
    """Outputs are named after their input's stem: 'cell.png' and 'cell.tif' would overwrite each other, and so
    would 'Cell.tif' and 'cell.tif' where results go to a disk that ignores case (macOS and Windows, by default)."""
    seen = {}
    for path in paths:
        other = seen.setdefault(image_stem(path).casefold(), path)
        if other is not path:
            case = "" if image_stem(other) == image_stem(path) else ", names that differ only in case, one file on " \
                "macOS and Windows"
            raise DataError(f"{key}: {Path(other).name} and {Path(path).name} would write the same output files "
                            f"('{image_stem(path)}'{case}); rename one of them")


def list_images(folder, key: str) -> list[Path]:
    """Supported images of `folder` sorted by name (hidden files skipped)."""
    if not folder or not Path(folder).is_dir():
        raise ConfigError(f"{key}: folder '{folder}' does not exist (expected a folder of images)")
    folder = Path(folder)
    try:
        files = sorted((p for p in folder.iterdir() if not p.name.startswith(".") and image_suffix(p) in IMAGE_EXTS),
                       key=lambda p: p.name)
    except OSError as err:
        raise DataError(f"{key}: cannot list folder '{folder}' ({err.strerror or err})") from None
    if not files:
        raise DataError(f"{key}: no images in '{folder}' (expected files ending in {', '.join(IMAGE_EXTS)})")
    return files


def _exists(path):
    if not Path(path).exists():
        raise DataError(f"{path}: file not found")


# ------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------
def read_image(path, ndim: int) -> np.ndarray:
    """The whole image, channel-last, dtype kept. DataError naming the file if unusable."""
    check_ndim(ndim)
    _exists(path)
    path, ext = Path(path), image_suffix(path)
    if ext not in IMAGE_EXTS:
        raise DataError(f"{path}: unsupported file type '{ext}' (expected one of {', '.join(IMAGE_EXTS)})")
    if ext in PLAIN_EXTS and ndim == 3:
        raise DataError(f"{path}: {ext} holds 2D images but PROBLEM.NDIM is 3D (use a TIFF stack)")
    try:
        if ext in TIFF_EXTS:
            import tifffile

            plan = tiff_header(path, ndim)[0]
            with refusing_damage(path), tifffile.TiffFile(path) as tif:
                arr = tif.series[0].asarray()
        elif ext in PLAIN_EXTS:
            from skimage import io as skio

            with _no_pixel_limit():
                arr = np.asarray(skio.imread(path))
            plan = plain_plan(arr.shape, 2, path)
        elif ext in CHUNKED_EXTS:
            arr = np.asarray(_open_chunked(path)[...])
            plan = plain_plan(arr.shape, ndim, path, guess=True)
        else:
            arr = _read_nifti(path, ndim)
            plan = plain_plan(arr.shape, ndim, path)
        _check_pixel_type(path, arr.dtype)
        return np.ascontiguousarray(plan.apply(arr))
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{path}: cannot read image ({error_summary(e)})") from None


_LIFTED = {"readers": 0, "limit": None}  # Pillow's pixel limit while lifted
_LIFTED_LOCK = threading.Lock()


@contextmanager
def _no_pixel_limit():
    """Pillow's limit lifted while this tool reads a PNG/JPEG: its guard against decompression bombs had refused
    the user's own images over 179 M pixels (a 20000x20000 PNG). Restored once the last reader is done, so reads
    in other threads neither keep the limit lifted nor restore it under one still reading."""
    from PIL import Image

    with _LIFTED_LOCK:
        if _LIFTED["readers"] == 0:
            _LIFTED["limit"], Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        _LIFTED["readers"] += 1
    try:
        yield
    finally:
        with _LIFTED_LOCK:
            _LIFTED["readers"] -= 1
            if _LIFTED["readers"] == 0:
                Image.MAX_IMAGE_PIXELS = _LIFTED["limit"]


def _check_pixel_type(path, dtype):
    """Numbers a network can take: complex pixels (an FFT, say) or structured/text data are refused by name."""
    if np.dtype(dtype).kind not in "biuf":
        raise DataError(f"{path}: pixels of type {np.dtype(dtype)} (expected real numbers: integers, floats or "
                        "booleans)")


def _read_nifti(path, ndim):
    try:
        import nibabel
    except ImportError:
        raise DataError(f"{path}: reading NIfTI needs the optional package nibabel (pip install nibabel)") from None
    arr = np.asanyarray(nibabel.load(str(path)).dataobj)
    if arr.ndim not in (ndim, ndim + 1):
        raise DataError(f"{path}: NIfTI array of shape {arr.shape} does not fit a {ndim}D image")
    return arr.transpose(tuple(reversed(range(ndim))) + tuple(range(ndim, arr.ndim)))  # x,y,z -> z,y,x


def _open_chunked(path):
    """The array of a Zarr store or the first dataset of an HDF5 file, unread (sliceable)."""
    if image_suffix(path) == ".zarr":
        try:
            import zarr
        except ImportError:
            raise DataError(f"{path}: reading Zarr needs the optional package zarr (pip install zarr)") from None
        z = zarr.open(str(path), mode="r")
        return z if hasattr(z, "shape") else next(iter(z.array_values()))
    try:
        import h5py
    except ImportError:
        raise DataError(f"{path}: reading HDF5 needs the optional package h5py (pip install h5py)") from None
    f = h5py.File(path, "r")
    names = []
    f.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
    if not names:
        raise DataError(f"{path}: HDF5 file holds no dataset")
    return f[names[0]]


def image_shape(path, ndim: int) -> tuple:
    """(spatial..., c) of an image, from its header where the format allows."""
    check_ndim(ndim)
    _exists(path)
    ext = image_suffix(path)
    if ext in TIFF_EXTS:
        return tiff_header(path, ndim)[0].shape
    if ext in CHUNKED_EXTS:
        try:
            return plain_plan(_open_chunked(path).shape, ndim, path, guess=True).shape
        except DataError:
            raise
        except Exception as e:
            raise DataError(f"{path}: cannot read image ({error_summary(e)})") from None
    if ext == ".png" and ndim == 2:
        shape = _png_header_shape(path)
        if shape is not None:
            return plain_plan(shape, 2, path).shape
    return read_image(path, ndim).shape


# PIL modes of a PNG whose pixels skimage's imread returns as they are: mode -> channels (1: no channel axis). Others
# (palette, CMYK, ...) are converted on reading, so their shape is read from the pixels.
_PNG_MODE_CHANNELS = {"1": 1, "L": 1, "I": 1, "I;16": 1, "I;16B": 1, "I;16L": 1, "F": 1, "LA": 2, "RGB": 3,
                      "RGBA": 4}


def _png_header_shape(path):
    """A PNG's array shape from its header, its chunks' checksums verified (a damaged file is still found before
    training), or None: decoding it whole took 16-57x as long (1.5 ms for a 256² one, twice per image before
    training). A JPEG is decoded: its header alone does not tell a file cut short."""
    from PIL import Image

    try:
        with _no_pixel_limit(), Image.open(path) as im:
            channels = _PNG_MODE_CHANNELS.get(im.mode)
            if channels is None or getattr(im, "n_frames", 1) != 1:
                return None
            width, height = im.size
            im.verify()
    except Exception:  # damaged or unusual: read_image says why, or reads it
        return None
    return (height, width) if channels == 1 else (height, width, channels)


def check_consistent_channels(paths, ndim: int, key: str) -> int:
    """Channel count shared by all `paths`; DataError naming the first file that differs."""
    first = None
    for p in paths:
        c = image_shape(p, ndim)[-1]
        if first is None:
            first = (p, c)
        elif c != first[1]:
            many = max((p, c), first, key=lambda f: f[1])
            hint = ""
            if many[1] > MANY_CHANNELS:
                hint = f"; {many[0]} may be a stack of slices without axis names: {NO_AXES}"
            raise DataError(f"{key}: {p} has {c} channel(s) but {first[0]} has {first[1]} (all images must match)"
                            f"{hint}")
    return first[1] if first else 0


# Why a file reads as many channels: what the channel checks say when they see more than MANY_CHANNELS.
MANY_CHANNELS = 8
NO_AXES = ("a file without axis names reads as (z,) y, x, channels; if it is a stack of slices or holds its "
           "channels elsewhere, save it with ImageJ or OME axes")


def count_non_finite(arr) -> int:
    """NaN/Inf pixels of a numpy array (0 for integer images)."""
    if not np.issubdtype(arr.dtype, np.floating):
        return 0
    # One float64 sum is cheap and is NaN/Inf whenever a pixel is; only then count them (finite pixels near 1e308
    # may overflow it too: no warning, the count tells).
    with np.errstate(over="ignore", invalid="ignore"):
        total = np.add.reduce(arr, axis=None, dtype=np.float64)
    if np.isfinite(total):
        return 0
    return int(arr.size - np.count_nonzero(np.isfinite(arr)))


def non_finite_error(path, bad) -> DataError:
    return DataError(f"{path}: {bad} pixel(s) are NaN or Inf (expected finite values)")


FLOAT32_MAX = float(np.finfo(np.float32).max)  # patches and degraded copies are computed in float32


def beyond_float32_error(path, peak) -> DataError:
    """For finite pixels (float64) that float32, in which this tool computes, would turn into Inf."""
    where = f"{path}: " if path else ""
    return DataError(f"{where}pixel values up to {peak:.3g} in magnitude are too large to normalize (overflow); "
                     "expected values below about 3.4e38 (float32's range, in which patches are normalized; rescale "
                     "the image)")


def check_finite(img, path) -> None:
    """DataError naming `path` if a float image holds NaN or Inf pixels."""
    bad = count_non_finite(np.asarray(img))
    if bad:
        raise non_finite_error(path, bad)


def check_computable(region, where) -> None:
    """`check_finite`, and float64 pixels within float32's range, in which patches are normalized: a region read
    for prediction, where a large or lazy image's statistics came from a sample that may have missed them."""
    check_finite(region, where)
    if region.dtype == np.float64 and region.size:
        peak = float(np.abs(region).max())
        if peak > FLOAT32_MAX:
            raise beyond_float32_error(where, peak)


# ------------------------------------------------------------------------------------------
# Lazy opening
# ------------------------------------------------------------------------------------------
def open_image_lazy(path, ndim: int):
    """Array-like image reading only the regions sliced from it.

    `LazyTiff` (region reads through small maps) for uncompressed contiguous TIFFs; `LazyStore` for HDF5/Zarr and,
    when zarr is installed, for compressed/tiled TIFFs; otherwise (PNG/JPEG, NIfTI, compressed
    TIFF without zarr) the image read whole, as a numpy array.
    """
    check_ndim(ndim)
    _exists(path)
    ext = image_suffix(path)
    if ext in TIFF_EXTS:
        plan, stored, offset = tiff_header(path, ndim)
        _check_pixel_type(path, stored)
        if offset is not None:
            return LazyTiff(path, plan, stored, offset)
        if _has_zarr():
            try:
                return LazyStore(path, plan, functools.partial(_tiff_zarr, path))
            except Exception as e:  # an unusual layout: reading whole still works
                log.debug("%s: no Zarr view (%s)", path, e)
    elif ext in CHUNKED_EXTS:
        try:
            arr = _open_chunked(path)
            _check_pixel_type(path, arr.dtype)
            plan = plain_plan(arr.shape, ndim, path, guess=True)
            return LazyStore(path, plan, functools.partial(_open_chunked, path))
        except DataError:
            raise
        except Exception as e:
            raise DataError(f"{path}: cannot read image ({error_summary(e)})") from None
    return read_image(path, ndim)


def open_image_rows(path, ndim: int):
    """`open_image_lazy` for reading a slab of the first axis at a time (the test phase), but a 2D image whose one
    chunk spans all its rows (a single-strip compressed TIFF, say), which each slab read would decode whole, is
    read whole once."""
    img = open_image_lazy(path, ndim)
    if ndim == 2 and isinstance(img, LazyStore) and img.chunk_rows() >= img.shape[0]:
        return read_image(path, ndim)
    return img


def _tiff_zarr(path):
    import tifffile
    import zarr

    z = zarr.open(tifffile.imread(path, aszarr=True, squeeze=False), mode="r")
    return z if hasattr(z, "shape") else z[0]


def _has_zarr() -> bool:
    try:
        import zarr  # noqa: F401
    except ImportError:
        return False
    return True
