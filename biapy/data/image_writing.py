"""Writing channel-last images, (y, x, c) in 2D and (z, y, x, c) in 3D: whole (`write_image`), a volume from its z
slices (`write_image_slices`) or band by band along the first axis (`image_rows_writer`), each the same file: a TIFF
with ImageJ axes (and the source's calibration, `biapy.data.image_axes.tiff_calibration`), or a PNG where it holds
the data.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import numpy as np

from biapy.data.image_formats import PLAIN_EXTS, TIFF_EXTS, check_ndim, image_suffix
from biapy.data.lazy_images import slab_ranges
from biapy.errors import BiapyError
from biapy.utils.files import atomic_path

_IMAGEJ_DTYPES = (np.uint8, np.uint16, np.float32)  # what ImageJ opens natively


def write_image(path, array, ndim: int, calibration=None) -> Path:
    """Write a channel-last image atomically; returns the path written.

    TIFF with ImageJ axes (YX/YXC/ZYX/ZYXC stored in Fiji's order, so Fiji shows channels and
    slices right); dtypes ImageJ lacks get tifffile's axes metadata instead. float64 -> float32,
    bool -> uint8, any byte order -> the machine's. A .png path holds 2D uint8 grey/RGB/RGBA or uint16 grey data;
    anything else asked of it is written as a .tif beside it rather than silently losing values. JPEG is lossy (a
    label map read back had gained a class), so a .jpg/.jpeg path is written as .png, or .tif, beside it.
    `calibration` (`tiff_calibration` of the source image) is written into a TIFF: its pixel size, unit and z
    spacing. Written through `image_rows_writer`, so a whole image and one written band by band are the same file.
    """
    check_ndim(ndim)
    path, arr = Path(path), np.asarray(array)
    if arr.ndim == ndim:
        arr = arr[..., None]
    if arr.ndim != ndim + 1:
        raise ValueError(f"write_image: array of shape {arr.shape} is not a {ndim}D channel-last image")
    with image_rows_writer(path, arr.shape, arr.dtype, ndim, calibration) as out:
        out.write_all(arr)
    return out.path


def write_image_slices(path, slices, shape, dtype, calibration=None) -> Path:
    """Write a 3D channel-last (Z, Y, X, C) image as a TIFF from an iterator of its (Y, X, C) z slices,
    so the whole image never has to be in memory; atomic, as write_image (`calibration` too)."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != 4:
        raise ValueError(f"write_image_slices: shape {shape} is not a 3D channel-last (Z, Y, X, C) shape")
    with image_rows_writer(path, shape, dtype, 3, calibration) as out:
        n = 0
        for sl in slices:
            if sl.shape != shape[1:]:
                raise ValueError(f"write_image_slices: slice of shape {sl.shape}, expected {shape[1:]}")
            n += 1
            out.write(np.asarray(sl)[None])
        if n != shape[0]:
            raise ValueError(f"write_image_slices: {n} slices, expected {shape[0]}")
    return out.path


@contextmanager
def image_rows_writer(path, shape, dtype, ndim: int, calibration=None):
    """Write a channel-last image of `shape` band by band along its first axis (rows in 2D, z slices in 3D),
    so that it is never whole in memory: yields a `_Rows` whose `write(band)` takes the next band, from the top.

    The file is the one `write_image` writes (the same bytes): the TIFF's header is written first, its pixels
    left as a hole that each band fills at its place. A PNG (small by nature) is assembled and written at the end.
    The file replaces `path` (`.path`, as write_image names it) atomically, once every row was written."""
    check_ndim(ndim)
    shape, dtype, path = tuple(int(s) for s in shape), _storable(dtype), Path(path)
    if len(shape) != ndim + 1:
        raise ValueError(f"image_rows_writer: shape {shape} is not a {ndim}D channel-last shape")
    png = _png_path(path, shape, dtype, ndim)
    rows = _Rows(png or _tiff_path(path), shape, dtype, ndim, png=bool(png))
    in_body = False  # an error of the caller's own (reading its input, say) passes through as it is
    try:
        with atomic_path(rows.path) as tmp:
            if not png:
                rows.open(tmp, _write_tiff(tmp, None, shape, dtype, ndim, calibration)[0])
            try:
                in_body = True
                yield rows
                in_body = False
            finally:
                rows.close()
            if rows.done != shape[0]:
                raise ValueError(f"{rows.path}: {rows.done} of {shape[0]} rows written")
            if png:
                _write_png(tmp, rows.whole)
    except OSError as err:
        if in_body:
            raise
        raise _write_error(rows.path, err) from None


class _Rows:
    """What `image_rows_writer` yields: `write(band)` puts the next band of rows at its place in the file;
    `write_all(image)` the whole image at once."""

    BAND_BYTES = 64 << 20  # `write_all` converts and reorders (3D channels) a band of about this much at a time

    def __init__(self, path, shape, dtype, ndim, png=False):
        self.path, self.shape, self.dtype, self.ndim, self.png = path, shape, dtype, ndim, png
        self.done, self.whole, self._fh, self._offset = 0, None, None, 0

    def open(self, tmp, offset):
        self._fh, self._offset = open(tmp, "r+b"), offset

    def close(self):
        if self._fh is not None:
            self._fh.close()

    def write_all(self, image):
        """The whole image (nothing written before): a PNG keeps it as given, no copy, until the file is written on
        closing; a TIFF takes it a band at a time, so that a dtype conversion or the reordering of 3D channels
        never copies all of it at once."""
        image = np.asarray(image)
        if self.png and self.done == 0 and image.shape == self.shape:
            self.whole, self.done = image.astype(self.dtype, copy=False), self.shape[0]
            return
        for lo, hi in slab_ranges(image.shape, max(1, self.BAND_BYTES // self.dtype.itemsize)):
            self.write(image[lo:hi])

    def write(self, band):
        band, n = np.asarray(band), len(band)
        if band.shape[1:] != self.shape[1:] or self.done + n > self.shape[0]:
            raise ValueError(f"{self.path}: rows {self.done}..{self.done + n - 1} of shape {band.shape[1:]} do not "
                             f"fit an image of shape {self.shape}")
        if self.png:  # assembled here, written whole on closing
            if self.whole is None:
                self.whole = np.empty(self.shape, self.dtype)
            self.whole[self.done:self.done + n] = band
            self.done += n
            return
        # The pixels are stored in _tiff_order: (Z, [C,] Y, X), a band one run of bytes; a 2D image with channels
        # as one page per channel (C, Y, X), a band one run per page.
        planar = self.ndim == 2 and self.shape[-1] > 1
        row = int(np.prod(self.shape[1:])) * self.dtype.itemsize // (self.shape[-1] if planar else 1)
        pixels = _tiff_order(band.astype(self.dtype, copy=False))
        try:
            for k, run in enumerate(pixels if planar else pixels[None]):
                self._fh.seek(self._offset + (k * self.shape[0] + self.done) * row)
                self._fh.write(np.ascontiguousarray(run).data)
        except OSError as err:
            raise _write_error(self.path, err) from None
        self.done += n


def _png_path(path, shape, dtype, ndim):
    """Where write_image puts a channel-last image of `shape` and `dtype` as a PNG, or None (a TIFF): a .png/.jpg
    path holding what PIL writes to PNG (2D uint8 grey/RGB/RGBA, uint16 grey)."""
    ext = image_suffix(path)
    if ext not in PLAIN_EXTS or ndim != 2:
        return None
    if (dtype == np.uint8 and shape[-1] in (1, 3, 4)) or (dtype == np.uint16 and shape[-1] == 1):
        return path.with_name(path.name[: -len(ext)] + ".png")
    return None


def _write_png(tmp, arr):
    from PIL import Image

    Image.fromarray(np.ascontiguousarray(arr[..., 0] if arr.shape[-1] == 1 else arr)).save(tmp, format="PNG")


def _storable(dtype) -> np.dtype:
    """The dtype an image is written with: bool -> uint8, float64/float16 -> float32, in the machine's byte order
    (a big-endian uint16 array is an ImageJ file of uint16 as any other)."""
    dtype = np.dtype(dtype).newbyteorder("=")
    if dtype == bool:
        return np.dtype(np.uint8)
    return np.dtype(np.float32) if dtype in (np.float64, np.float16) else dtype


def _tiff_path(path):
    ext = image_suffix(path)
    if ext in TIFF_EXTS:
        return path
    return path.with_name(path.name[: -len(ext)] + ".tif" if ext else path.name + ".tif")


def _tiff_order(arr):
    """Channel-last pixels in ImageJ's order (channels in front of Y), the channel axis dropped when single."""
    return arr[..., 0] if arr.shape[-1] == 1 else np.moveaxis(arr, -1, -3)


def _write_error(path, err):
    # numpy reports a full disk as a short write, without an errno: "589824 requested and 36528 written".
    short = "; is the disk full?" if err.errno is None and "written" in str(err) else ""
    return BiapyError(f"{path}: cannot write ({err.strerror or err}){short}")


def _write_tiff(tmp, data, shape, dtype, ndim, calibration=None):
    """`data`: pixels in _tiff_order, as one array, an iterator of parts in file order, or None (the header
    alone, the pixels a hole to fill: returns their (offset, bytes) in the file); `shape`
    the channel-last shape; `calibration` as `tiff_calibration` gives it (X/YResolution and ResolutionUnit,
    the unit and z spacing in the ImageJ metadata). Above 4 GB an ImageJ file keeps one page header and
    contiguous pixels, as ImageJ itself writes them (tifffile says so with a warning, silenced here)."""
    import warnings

    import tifffile

    c = shape[-1]
    spatial = tuple(shape[:-1])
    axes = ("ZYX" if ndim == 3 else "YX") if c == 1 else ("ZCYX" if ndim == 3 else "CYX")
    stored = spatial if c == 1 else spatial[:-2] + (c,) + spatial[-2:]
    metadata, resolution = {"axes": axes}, {}
    if calibration:
        if calibration.get("resolution") is not None:
            resolution = {"resolution": tuple(calibration["resolution"]),
                          "resolutionunit": calibration.get("resolutionunit") or 1}
        if calibration.get("unit"):  # ImageJ's description is ASCII: 'µm' as 'um', as ImageJ reads it
            unit = str(calibration["unit"]).replace("\u00b5", "u").replace("\u03bc", "u")
            metadata["unit"] = unit.encode("ascii", "backslashreplace").decode("ascii")
        if ndim == 3 and calibration.get("spacing"):
            metadata["spacing"] = float(calibration["spacing"])
    with open(tmp, "wb") as fh, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*truncating ImageJ file")
        return tifffile.imwrite(fh, data, shape=stored, dtype=dtype, imagej=np.dtype(dtype) in _IMAGEJ_DTYPES,
                                metadata=metadata, photometric="minisblack", returnoffset=data is None, **resolution)
