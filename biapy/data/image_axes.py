"""How a stored image's axes become channel-last, (y, x, c) in 2D and (z, y, x, c) in 3D, and what else is read from a
TIFF's header: its calibration (pixel size, unit, z spacing).

TIFF is the main format. Its axes are mapped to the canonical layout by one `_AxesPlan`, which
serves full reads, header-only shape queries and lazy region reads alike:
- ImageJ hyperstacks (TZCYXS) and tifffile files with an 'axes' entry: axes honoured by name;
- tifffile 'shaped' files without axes (`tifffile.imwrite(array)`): the stored array is taken as
  channel-last, (y, x[, c]) / (z, y, x[, c]), except, as BiaPy reads them, when its first axis has at
  most 3 values and its last more: then the first axis holds the channels (see `plain_plan`); one
  page of colour samples (Y, X, S) is a 2D image, refused in 3D (`_refuse_colour_image_as_volume`);
- other TIFFs: tifffile's axes guess (pages I/Q become Z in 3D, C in 2D; samples S are channels).
Arrays of the other formats (PNG/JPEG, NIfTI, HDF5, Zarr) are mapped by `plain_plan`. A TIFF's header is read once
per version of the file (`tiff_header`).
"""
from __future__ import annotations

import functools
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np

from biapy.data.image_formats import TIFF_EXTS, error_summary, image_suffix
from biapy.errors import DataError

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------
# Axis mapping
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _AxesPlan:
    """How a stored array of `full_shape` becomes channel-last: drop singleton axes, transpose, add C."""

    full_shape: tuple
    keep: tuple  # stored axes kept (the others have size 1)
    order: tuple  # canonical axis j = kept axis order[j]
    add_channel: bool

    @property
    def shape(self) -> tuple:
        shp = tuple(self.full_shape[self.keep[i]] for i in self.order)
        return shp + (1,) if self.add_channel else shp

    def apply(self, arr, shape=None):
        """Canonical view of `arr`, an array of stored-order `shape` (default: the whole image's, which any
        array of as many elements may stand for, such as tifffile's squeezed one); no copy."""
        shape = self.full_shape if shape is None else shape
        arr = arr.reshape(tuple(shape[i] for i in self.keep)).transpose(self.order)
        return arr[..., None] if self.add_channel else arr

    def to_stored(self, per_axis, dropped):
        """Values given per canonical axis placed at their stored axes, `dropped` at the axes the plan drops."""
        stored = [dropped] * len(self.full_shape)
        for j, axis in enumerate(self.order):
            stored[self.keep[axis]] = per_axis[j]
        return stored


def _not_empty(shape, path):
    if 0 in shape:
        raise DataError(f"{path}: image of shape {shape} holds no pixels (expected at least one along every axis)")


def plain_plan(shape, ndim, path, guess=None) -> _AxesPlan:
    """Arrays stored without axis names: (z,) y, x (, c), leading singleton axes ignored.

    `guess` (files that may not hold channels last: TIFF, Zarr/HDF5): the channel axis is the samples axis S
    of the writer's guess (tifffile's axes, `guess` as a string) where it has one; else, as BiaPy reads such
    files, the first axis when it has at most 3 values and the last more.
    """
    shape = tuple(int(s) for s in shape)
    _not_empty(shape, path)
    lead = 0
    while len(shape) - lead > ndim + 1 and shape[lead] == 1:
        lead += 1
    n = len(shape) - lead
    if n not in (ndim, ndim + 1):
        stack = "; a stack of slices needs PROBLEM.NDIM 3D" if ndim == 2 and n == 4 else ""  # z, y, x, c
        raise DataError(f"{path}: array of shape {shape} does not fit a {ndim}D image (expected "
                        f"{'(z, y, x[, c])' if ndim == 3 else '(y, x[, c])'}){stack}")
    keep = tuple(range(lead, len(shape)))
    channel = n - 1
    if n == ndim + 1 and guess is not None:
        axes = guess if isinstance(guess, str) and len(guess) == len(shape) else ""
        if axes.find("S") >= lead:
            channel = axes.index("S") - lead
        elif shape[lead] <= 3 < shape[-1]:
            channel = 0
    order = tuple(i for i in range(n) if i != channel) + (channel,)
    return _AxesPlan(shape, keep, order, n == ndim)


def _two_d_image_in_3d(path, shape, channels, stored) -> DataError:
    """The error for a 2D image with channels given to a 3D job, naming what to set either way."""
    return DataError(f"{path}: looks like a 2D image with {channels} channels (Y, X, C: {stored}, shape "
                     f"{tuple(shape)}) but PROBLEM.NDIM is 3D; for 2D images set PROBLEM.NDIM 2D and DATA.PATCH_SIZE "
                     f"(y, x, {channels}); if it is a volume of {channels} slices, save it with its slices first, "
                     f"({channels}, Y, X), or with ImageJ axes ZYX")


def _refuse_colour_image_as_volume(shape, axes, path):
    """A one-page TIFF of colour samples (Y, X, S: an RGB image that `tifffile.imwrite` saved without axis names)
    in a 3D job: read as (z, y, x) its samples became 3 pixels of x, and the job stopped on a channel count or a
    patch too wide for x (said of the wrong axis), or trained on that. A file whose axes are named Y, X and C (or S)
    alone is refused so by `_named_plan` (ImageJ's name a Z of 1: a one-slice volume)."""
    lead = 0
    while lead < len(shape) - 3 and shape[lead] == 1:
        lead += 1
    if len(axes) == len(shape) and axes[lead:] == "YXS" and shape[-1] > 1:
        raise _two_d_image_in_3d(path, shape[lead:], shape[-1], "colour samples without axis names")


def _named_plan(shape, axes, ndim, path) -> _AxesPlan:
    shape, axes = tuple(int(s) for s in shape), axes.upper()
    _not_empty(shape, path)
    if len(axes) != len(shape) or "Y" not in axes or "X" not in axes:
        raise DataError(f"{path}: cannot interpret stored axes '{axes}' of shape {shape}")
    # Singleton axes go, except Y/X and Z in 3D (a one-slice volume stays a volume).
    keep = [i for i, (a, s) in enumerate(zip(axes, shape)) if s > 1 or a in "YX" or (a == "Z" and ndim == 3)]
    rest = [i for i in keep if axes[i] not in "YX"]
    roles = {"Y": axes.index("Y"), "X": axes.index("X")}

    def take(letters, before_y=False):
        for i in rest:
            if axes[i] in letters or (letters == "?" and axes[i] not in "ZTCS"):
                if not before_y or i < roles["Y"]:
                    rest.remove(i)
                    return i
        return None

    if ndim == 3:
        z = take("Z")
        for letters, before in (("T", False), ("?", False), ("S", True)):  # unlabelled stacks
            z = take(letters, before) if z is None else z
        if z is None:
            if len(rest) == 1 and axes[rest[0]] in "CS":  # Y, X and channels: a 2D image
                raise _two_d_image_in_3d(path, shape, shape[rest[0]], f"stored axes '{axes}'")
            raise DataError(f"{path}: no Z axis (stored axes '{axes}', shape {shape}) but PROBLEM.NDIM is 3D")
        roles["Z"] = z
    else:
        for i in rest:
            if axes[i] == "Z":
                raise DataError(f"{path}: has a Z axis of {shape[i]} slices (a 3D stack) but PROBLEM.NDIM is 2D")
            if axes[i] == "T":
                raise DataError(f"{path}: has a T axis of {shape[i]} time points (stored axes '{axes}', shape "
                                f"{shape}); expected one 2D image per file: save each time point as a file of its own")
    c = take("C")
    c = take("S") if c is None else c
    c = take("?") if c is None else c
    if c is not None:
        roles["C"] = c
    if rest:
        t = next((i for i in rest if axes[i] == "T"), None)
        if t is not None:  # a time series of volumes (ImageJ's TZYX)
            raise DataError(f"{path}: has a T axis of {shape[t]} time points besides its Z axis of "
                            f"{shape[roles['Z']]} slices (stored axes '{axes}', shape {shape}); expected one "
                            f"{ndim}D image per file: save each time point as a file of its own")
        extra = ", ".join(f"{axes[i]}={shape[i]}" for i in rest)
        raise DataError(f"{path}: cannot map axes '{axes}' {shape} to a {ndim}D image with channels ({extra} left)")
    order = tuple(keep.index(roles[a]) for a in "ZYXC" if a in roles)
    return _AxesPlan(shape, tuple(keep), order, "C" not in roles)


# ------------------------------------------------------------------------------------------
# TIFF header and calibration
# ------------------------------------------------------------------------------------------
class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.ERROR)
        self.records = []

    def emit(self, record):
        self.records.append(record)


@contextmanager
def refusing_damage(path):
    """Refuse a TIFF that tifffile reads only in part. It zero-fills truncated or empty segments and missing
    pages instead of raising, and says so only in an ERROR record of its logger (its convention: the data may
    be wrong or incomplete; releases before 2023.8.12, below requirements.txt's floor, logged a warning);
    training on it would pass silently."""
    tiff_log, seen = logging.getLogger("tifffile"), _Records()
    tiff_log.addHandler(seen)
    try:
        yield
    finally:
        tiff_log.removeHandler(seen)
    if seen.records:
        said = seen.records[0].getMessage().splitlines()[0]
        raise DataError(f"{path}: damaged TIFF, read only in part (tifffile: {said})")


def _unsqueezed_series(tif):
    """The first series with its length-1 axes kept, whose shape and axes match the stored bytes.

    tifffile 2026.11 replaced `series[0].get_shape(False)` by calling the series list with
    squeeze=False; older releases (this project accepts 2023.7.10 on) only have the former."""
    if callable(tif.series):
        return tif.series(squeeze=False)[0]
    series = tif.series[0]
    return SimpleNamespace(shape=series.get_shape(False), axes=series.get_axes(False), dtype=series.dtype,
                           dataoffset=series.dataoffset, kind=series.kind)


def tiff_header(path, ndim):
    """(plan, stored dtype with byte order, data offset or None) from the TIFF header only, read once per version
    of the file: the checks before training and the dataset each asked for it (18,000 TIFF opens for 3000 images
    had taken half of a start-up)."""
    st = os.stat(path)  # a version: its inode, size and times (a copy kept its time with cp -p, not its ctime)
    return _read_tiff_header(str(path), ndim, (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))


@functools.lru_cache(maxsize=1 << 14)
def _read_tiff_header(path, ndim, version):
    import tifffile

    try:
        with refusing_damage(path), tifffile.TiffFile(path) as tif:
            series = _unsqueezed_series(tif)
            shape, axes, kind = series.shape, series.axes, series.kind
            shaped = tif.shaped_metadata[0] if tif.is_shaped and tif.shaped_metadata else None
            dtype = np.dtype(series.dtype).newbyteorder(tif.byteorder)
            offset = series.dataoffset
    except DataError:
        raise
    except Exception as e:  # tifffile raises many types for broken files
        raise DataError(f"{path}: cannot read TIFF ({error_summary(e)})") from None
    # Axes that are tifffile's guesses, not the writer's names: a page sequence ('generic': I for its pages, as
    # for channels as for slices), one page ('uniform'), tifffile's own array without axes (Q).
    if kind in ("generic", "uniform") or (shaped is not None and "axes" not in shaped and not tif.is_imagej):
        if kind == "generic" and axes.endswith("S") and shape[-1] == 1:  # grey pages: no samples axis to read
            shape, axes = shape[:-1], axes[:-1]
        if kind == "generic" and ndim == 2 and axes.startswith("I") and len(shape) == 3 and shape[0] > 3:
            raise DataError(f"{path}: {shape[0]} pages of {shape[1]}x{shape[2]} pixels without axis names: a stack "
                            "of slices needs PROBLEM.NDIM 3D (up to 3 pages read as channels)")
        if ndim == 3:
            _refuse_colour_image_as_volume(shape, axes, path)
        plan = plain_plan(shape, ndim, path, guess=axes)
    else:
        plan = _named_plan(shape, axes, ndim, path)
    return plan, dtype, offset


def tiff_calibration(path):
    """The physical calibration of a TIFF, from its header, as `write_image(..., calibration=)` takes it, or None
    (not a TIFF, unreadable, or uncalibrated: resolution 1/1 and no unit). A dict of `resolution` (X, Y pixels per
    unit, each a (numerator, denominator) pair or a float), `resolutionunit` (the TIFF ResolutionUnit code),
    `unit` (ImageJ's, e.g. 'um'; None when only ResolutionUnit names one) and `spacing` (the z step, or None),
    taken from the first page's X/YResolution and ResolutionUnit and the ImageJ (or tifffile) metadata, or from
    the OME-XML PhysicalSizeX/Y/Z of an OME-TIFF."""
    if image_suffix(path) not in TIFF_EXTS:
        return None
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            if tif.is_ome and tif.ome_metadata:
                return _ome_calibration(tif.ome_metadata)
            tags = tif.pages[0].tags
            xres, yres, resunit = tags.valueof(282), tags.valueof(283), tags.valueof(296, default=2)
            meta = tif.imagej_metadata if tif.is_imagej else (tif.shaped_metadata[0] if tif.is_shaped and
                                                              tif.shaped_metadata else None)
    except Exception as e:  # calibration is kept where it can be read; reading the pixels has its own errors
        log.debug("%s: no calibration read (%s)", path, e)
        return None
    meta = meta if isinstance(meta, dict) else {}
    unit, spacing = meta.get("unit"), meta.get("spacing")
    unit = str(unit) if unit not in (None, "", "pixel", "pixels") else None
    spacing = float(spacing) if isinstance(spacing, (int, float)) and spacing > 0 else None
    resolution = None
    if xres is not None and yres is not None and all(_ratio(r) > 0 for r in (xres, yres)):
        resolution = (tuple(int(v) for v in xres) if isinstance(xres, tuple) else float(xres),
                      tuple(int(v) for v in yres) if isinstance(yres, tuple) else float(yres))
    if unit is None and (resolution is None or all(_ratio(r) == 1 for r in resolution)):
        return None
    return {"resolution": resolution, "resolutionunit": int(resunit), "unit": unit, "spacing": spacing}


def _ratio(r):
    try:
        return r[0] / r[1] if isinstance(r, tuple) else float(r)
    except (TypeError, ValueError, ZeroDivisionError, IndexError):
        return 0.0


def _ome_calibration(xml):
    """`tiff_calibration` from OME-XML: the first image's PhysicalSizeX/Y/Z (in their units, micrometres by
    default), in ImageJ's form."""
    from xml.etree import ElementTree

    pixels = next((e for e in ElementTree.fromstring(xml).iter() if e.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None:
        return None

    def size(axis):
        try:
            value = float(pixels.get(f"PhysicalSize{axis}"))
        except (TypeError, ValueError):
            return None
        return value if value > 0 else None

    x, y, z = size("X"), size("Y"), size("Z")
    if x is None and y is None and z is None:
        return None
    x, y = x or y, y or x
    unit = pixels.get("PhysicalSizeXUnit") or pixels.get("PhysicalSizeYUnit") or "\u00b5m"
    return {"resolution": (1 / x, 1 / y) if x else None, "resolutionunit": 1, "unit": unit, "spacing": z}
