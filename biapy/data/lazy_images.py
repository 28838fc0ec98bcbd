"""Images read a region at a time, never whole: `LazyTiff` (an uncompressed, contiguous TIFF, through small memory
maps) and `LazyStore` (a chunked array: HDF5, Zarr, or a compressed TIFF through tifffile's Zarr store), sliced in
canonical (spatial..., c) order like numpy arrays; `biapy.data.io.open_image_lazy` opens the one a file allows.
And slabs: an image cut along its first axis into parts of about so many voxels, read (or written) one at a time.
"""
from __future__ import annotations

import itertools
import mmap
import os
from pathlib import Path

import numpy as np

from biapy.data.image_formats import error_summary
from biapy.errors import DataError


# ------------------------------------------------------------------------------------------
# Slabs
# ------------------------------------------------------------------------------------------
def slab_depth(shape, voxels, min_depth=1):
    """Rows of the first axis of `shape` that hold about `voxels` voxels (at least `min_depth`, and 1):
    how much of a lazily opened volume is read at a time."""
    return max(1, min_depth, voxels // max(1, int(np.prod(shape[1:]))))


def slab_ranges(shape, voxels, min_depth=1):
    """(start, stop) ranges along the first axis of `shape`, each `slab_depth` rows."""
    depth = slab_depth(shape, voxels, min_depth)
    return [(a, min(shape[0], a + depth)) for a in range(0, shape[0], depth)]


def iter_slabs(img, voxels):
    """A numpy image whole, a lazy one as numpy slabs (z slices, or rows of a 2D image) of about `voxels` voxels,
    in order."""
    if isinstance(img, np.ndarray):
        yield np.asarray(img)
        return
    for a, b in slab_ranges(img.shape, voxels):
        yield np.asarray(img[a:b])


# ------------------------------------------------------------------------------------------
# Region reads
# ------------------------------------------------------------------------------------------
def full_key(key, ndim):
    """A numpy key as a tuple of one index per axis (Ellipsis and missing trailing axes as whole slices)."""
    key = key if isinstance(key, tuple) else (key,)
    if Ellipsis in key:
        i = key.index(Ellipsis)
        key = key[:i] + (slice(None),) * (ndim - len(key) + 1) + key[i + 1:]
    if len(key) > ndim:
        raise IndexError(f"too many indices: {len(key)} for an image of {ndim} axes")
    return key + (slice(None),) * (ndim - len(key))


def _index_box(key, shape):
    """A numpy key of ints, slices and one Ellipsis over `shape` as per-axis (start, stop) bounds and the
    same key relative to that box: `a[key] == a[box][local]`."""
    bounds, local = [], []
    for k, n in zip(full_key(key, len(shape)), shape):
        if isinstance(k, slice):
            r = range(*k.indices(n))
            lo = min(r[0], r[-1]) if r else 0
            bounds.append((lo, max(r[0], r[-1]) + 1 if r else 0))
            stop = r.stop - lo
            local.append(slice(r.start - lo, stop if stop >= 0 else None, r.step) if r else slice(0, 0))
        elif isinstance(k, (int, np.integer)):
            if not -n <= k < n:
                raise IndexError(f"index {k} is out of bounds for an axis of size {n}")
            k = int(k) % n
            bounds.append((k, k + 1))
            local.append(0)
        else:
            raise TypeError(f"lazy images take ints, slices and Ellipsis, got {k!r}")
    return bounds, tuple(local)


def _mapped_copy(fh, start, shape, dtype, inner):
    """A copy of `[:, *inner]` of the C-order array of `shape` and `dtype` at byte `start` of the open file,
    through a map of just those bytes, unmapped on return."""
    aligned = start - start % mmap.ALLOCATIONGRANULARITY
    nbytes = int(np.prod(shape)) * dtype.itemsize
    with mmap.mmap(fh.fileno(), nbytes + start - aligned, offset=aligned, access=mmap.ACCESS_READ) as mm:
        view = None
        try:
            view = np.frombuffer(mm, dtype, count=nbytes // dtype.itemsize, offset=start - aligned)
            region = view.reshape(shape)[(slice(None),) + inner].copy()
        finally:  # the map closes only once no array points into it: a Ctrl-C here had become a BufferError
            del view
    return region


class LazyTiff:
    """An uncompressed, contiguous TIFF read region by region: `.shape`, `.dtype`, numpy slicing.

    A region is copied out of small memory maps, one "row" at a time (the region along one axis,
    whole along the later ones), each unmapped before the next. Mapping the whole file instead let
    the kernel map its page cache in large folios (up to 2 MB each) wherever a patch touched it:
    one 32x64x64 patch of a volume of 1024x1024-pixel slices had ~70 MB resident while it was
    copied. Plain reads of the same rows keep memory flat but copy the whole rows: 13x slower.
    """

    # Largest row mapped at once, so at most this much of the file is resident for a read.
    MAP_BYTES = 4 << 20

    def __init__(self, path, plan, stored_dtype, offset):
        self.path, self._plan, self._stored, self._offset = Path(path), plan, stored_dtype, offset
        self.dtype = stored_dtype.newbyteorder("=")
        self.shape = plan.shape
        self._count = int(np.prod(plan.full_shape))
        if offset + self._count * stored_dtype.itemsize > os.path.getsize(path):
            raise DataError(f"{path}: file is truncated (expected {self._count} pixels of {self.dtype})")

    @property
    def ndim(self):
        return len(self.shape)

    def __getitem__(self, key) -> np.ndarray:
        bounds, local = _index_box(key, self.shape)
        region = self._read_box(self._plan.to_stored(bounds, (0, 1)))  # dropped axes have size 1
        return np.array(self._plan.apply(region, region.shape)[local], dtype=self.dtype, order="C")

    def _read_box(self, box) -> np.ndarray:
        """The stored-order box [(start, stop) per stored axis] of the file, in the stored dtype."""
        shape = self._plan.full_shape
        out = np.empty([b - a for a, b in box], self._stored)
        if out.size == 0:
            return out
        # Rows run along the first axis k whose row (box along k, whole along the later axes) fits in
        # MAP_BYTES; there is one row per index of the axes before k.
        strides = [int(np.prod(shape[i + 1:], dtype=np.int64)) * self._stored.itemsize for i in range(len(shape))]
        k = next((i for i in range(len(shape)) if (box[i][1] - box[i][0]) * strides[i] <= self.MAP_BYTES),
                 len(shape) - 1)
        chunk = box[k][1] - box[k][0]  # indices of axis k per map: the whole row
        if k > 0 and all(box[i] == (0, shape[i]) for i in range(k, len(shape))):
            # Whole along axis k and after (a band of full rows, say): consecutive rows of axis k - 1 lie end to
            # end in the file, so one map takes as many as fit in MAP_BYTES (a map per image row had taken the
            # 2D test phase's scoring 1.5x longer).
            k -= 1
            chunk = max(1, self.MAP_BYTES // strides[k])
        inner = tuple(slice(a, b) for a, b in box[k + 1:])
        try:
            with open(self.path, "rb") as fh:
                for index in itertools.product(*(range(a, b) for a, b in box[:k])):
                    at = self._offset + sum(i * st for i, st in zip(index, strides))
                    target = tuple(i - a for i, (a, _) in zip(index, box))
                    for lo in range(box[k][0], box[k][1], chunk):
                        hi = min(lo + chunk, box[k][1])
                        rows = (hi - lo,) + tuple(shape[k + 1:])
                        part = target + (slice(lo - box[k][0], hi - box[k][0]),)
                        out[part] = _mapped_copy(fh, at + lo * strides[k], rows, self._stored, inner)
        except (OSError, ValueError) as e:  # replaced, truncated or removed since it was opened (mmap: ValueError)
            raise DataError(f"{self.path}: cannot read image ({error_summary(e)}); was the file changed during the run?"
                            ) from None
        return out

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self[...], dtype=dtype)

    def __repr__(self):
        return f"LazyTiff({self.path.name}, shape={self.shape}, dtype={self.dtype})"


class LazyStore:
    """Region reads from a chunked array (HDF5, Zarr, or a compressed TIFF through tifffile's Zarr
    store); keys are slices (and Ellipsis) in canonical (spatial..., c) order."""

    def __init__(self, path, plan, opener):
        self.path, self._plan, self._opener = Path(path), plan, opener
        arr = opener()
        if tuple(arr.shape) != plan.full_shape:
            raise ValueError(f"{path}: store shape {arr.shape} differs from {plan.full_shape}")
        self.shape, self.dtype = plan.shape, np.dtype(arr.dtype)

    @property
    def ndim(self):
        return len(self.shape)

    def chunk_rows(self):
        """Rows (first canonical axis) of one stored chunk: 1 for an unchunked (contiguous HDF5) array."""
        chunks = getattr(self._opener(), "chunks", None)
        return chunks[self._plan.keep[self._plan.order[0]]] if chunks else 1

    def __getitem__(self, key):
        key = full_key(key, len(self.shape))
        if not all(isinstance(k, slice) for k in key):
            raise TypeError(f"{type(self).__name__} takes slices only, got {key!r}")
        plan = self._plan
        stored = plan.to_stored(key, 0)  # dropped singleton axes are indexed away
        region = np.asarray(self._opener()[tuple(stored)]).transpose(plan.order)
        return region[..., None][..., key[-1]] if plan.add_channel else region

