"""Patch grids, patch extraction with reflection, and whole-image prediction by blended patches.

Grid semantics (per spatial axis): a patch of size p with PADDING d keeps its central
p - 2d pixels (the d pixels at each border are context, discarded when stitching); neighbouring
kept regions overlap by OVERLAP of their size; the first kept region starts at pixel 0 and the
last one is shifted back to end exactly at the image border, so the image is covered with no
partial patch. Where a patch leaves the image the image is mirrored ('reflect', as np.pad).

Stitching weights each patch by a separable smooth window (sin^2 with a floor, so pixels at a
patch's edge, which at the image border are seen by one patch only, still get weight) and
divides by the summed weights: an identity network returns the image exactly, and overlapping
predictions fade into each other without seams.
"""
import itertools

import numpy as np
import torch

from biapy.errors import ConfigError

WINDOW_FLOOR = 1e-2


def _per_axis(value, n, default, name):
    if value is None:
        return (default,) * n
    values = tuple(value) if isinstance(value, (tuple, list)) else (value,) * n
    if len(values) == 1:
        values = values * n
    if len(values) != n:
        raise ConfigError(f"{name}: {tuple(values)} needs {n} values, one per spatial axis")
    return values


def _check(patch, overlap, padding):
    n = len(patch)
    overlap = _per_axis(overlap, n, 0.0, "OVERLAP")
    padding = _per_axis(padding, n, 0, "PADDING")
    for o in overlap:
        if not 0 <= float(o) < 1:
            raise ConfigError(f"OVERLAP: {tuple(overlap)} must be fractions in [0, 1)")
    for p, d in zip(patch, padding):
        if int(d) < 0 or p - 2 * int(d) < 1:
            raise ConfigError(f"PADDING: {tuple(padding)} leaves nothing of patch {tuple(patch)} "
                              "(each value must be below half the patch side)")
    return tuple(float(o) for o in overlap), tuple(int(d) for d in padding)


def axis_starts(size, p, overlap=0.0, pad=0):
    """Patch starts along one axis (may be negative or run past the image: reflected there)."""
    valid = p - 2 * pad
    if size <= valid:
        return [-pad]
    step = max(1, int(valid * (1 - overlap)))
    last = size - valid - pad
    return list(range(-pad, last, step)) + [last]


def grid_starts(spatial_shape, patch, overlap=None, padding=None):
    """Start of every patch of the grid over an image of `spatial_shape`, as tuples (C order)."""
    overlap, padding = _check(tuple(patch), overlap, padding)
    axes = [axis_starts(s, p, o, d) for s, p, o, d in zip(spatial_shape, patch, overlap, padding)]
    return list(itertools.product(*axes))


def reflect_indices(start, length, size):
    """Indices start..start+length-1 folded into [0, size) by reflection (numpy 'reflect' mode)."""
    idx = np.arange(start, start + length)
    if size == 1:
        return np.zeros(length, dtype=np.int64)
    period = 2 * (size - 1)
    idx = np.mod(idx, period)
    return np.where(idx < size, idx, period - idx)


def extract_patch(img, start, patch):
    """(patch..., c) region of a channel-last image (numpy or lazy) starting at `start`, reflect-padded.

    A lazy image is sliced once, to the bounding box of the pixels needed, so only that is read.
    """
    inside = all(0 <= s and s + p <= n for s, p, n in zip(start, patch, img.shape))
    if inside:
        # A contiguous copy: later float casts of a strided view (inner axis of 1 channel) are ~5x slower.
        return np.ascontiguousarray(img[tuple(slice(s, s + p) for s, p in zip(start, patch))])
    index = [reflect_indices(s, p, n) for s, p, n in zip(start, patch, img.shape)]
    box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in index)
    region = np.asarray(img[box])
    local = [i - b.start for i, b in zip(index, box)]
    return region[np.ix_(*local)]  # trailing (channel) axis kept whole


def blend_window(patch, padding, device=None):
    """Separable sin^2 window over the kept centre of a patch (floored), 0 on its padding border."""
    w = None
    for p, d in zip(patch, padding):
        valid = p - 2 * d
        i = torch.arange(valid, dtype=torch.float32, device=device)
        axis = torch.zeros(p, dtype=torch.float32, device=device)
        axis[d:d + valid] = torch.sin(np.pi * (i + 0.5) / valid).pow(2).clamp_min(WINDOW_FLOOR)
        w = axis if w is None else w[..., None] * axis
    return w


def predict_whole(img, predict_fn, patch, overlap=None, padding=None, batch_size=1):
    """Network output over a whole (C, *spatial) tensor from overlapping patches, smoothly blended.

    `predict_fn(batch (B, C, *patch)) -> (B, C_out, *patch)`; the result is (C_out, *spatial),
    float32, on the input's device: the slabs of `predict_slabs` put together.
    """
    slabs = predict_slabs(lambda lo, hi: img[:, lo:hi], tuple(img.shape[1:]), predict_fn, patch, overlap,
                          padding, batch_size, img.device)
    return assemble(slabs, tuple(img.shape[1:]), img.device)


def assemble(slabs, spatial, device=None):
    """One (C, *spatial) float32 tensor from `(row0, slab)` pieces along the first spatial axis."""
    out = None
    for row0, slab in slabs:
        if out is None:
            out = torch.empty((slab.shape[0],) + tuple(spatial), dtype=torch.float32, device=device)
        out[:, row0:row0 + slab.shape[1]] = slab
    return out


def predict_slabs(read, spatial, predict_fn, patch, overlap=None, padding=None, batch_size=1, device=None):
    """Blended patch prediction of an image streamed along its first spatial axis.

    `read(lo, hi)` returns the network input of rows lo..hi-1 of that axis as a (C, hi-lo, *rest)
    tensor; the rows are read as the patch grid reaches them, and each is read once. Yields
    `(row0, slab)`, slab (C_out, rows, *rest) float32, in order, as soon as no later patch can
    change it: besides the network's batches, memory holds about a patch's depth of input and
    output rows, whatever the image's size. The values are those of one pass over the whole image.

    Patches that leave the image read it mirrored, and only their part inside the image is
    accumulated. The grid is a product of per-axis starts and the window is separable, so the
    summed weights are a product of per-axis sums: no weight image is needed.
    """
    patch, spatial = tuple(int(p) for p in patch), tuple(int(s) for s in spatial)
    overlap, padding = _check(patch, overlap, padding)
    if len(spatial) != len(patch):
        raise ConfigError(f"DATA.PATCH_SIZE: patch {patch} does not fit an image of spatial shape {spatial}")
    batch_size = max(1, int(batch_size))
    axes = [axis_starts(s, p, o, d) for s, p, o, d in zip(spatial, patch, overlap, padding)]
    window = blend_window(patch, padding, device)
    sums = []  # per axis: the summed 1-D windows of every start, over the image's pixels
    for n, p, d, starts in zip(spatial, patch, padding, axes):
        w1 = blend_window((p,), (d,), device)
        total = torch.zeros(n, dtype=torch.float32, device=device)
        for st in starts:
            lo, hi = max(0, -st), min(p, n - st)
            total[st + lo:st + hi] += w1[lo:hi]
        sums.append(total)
    starts = list(itertools.product(*axes))
    rows = _RowCache(read, spatial, patch, axes)
    # per axis: each start's kept part of a patch, as (slice of the image, slice of the patch)
    kept = [{s: (slice(s + max(0, -s), s + min(p, n - s)), slice(max(0, -s), min(p, n - s))) for s in starts_}
            for starts_, p, n in zip(axes, patch, spatial)]
    acc, acc0 = None, 0  # output rows acc0.. being summed
    for k in range(0, len(starts), batch_size):
        chunk = starts[k:k + batch_size]
        batch = torch.stack([rows.patch(st) for st in chunk])
        out = predict_fn(batch)
        if tuple(out.shape[2:]) != patch or out.shape[0] != len(chunk):
            raise ValueError(f"predict_fn returned {tuple(out.shape)} for a batch of {tuple(batch.shape)}")
        out = out.float() * window
        for st, o in zip(chunk, out):
            parts = [axis[s] for axis, s in zip(kept, st)]
            rows_in, rows_of_patch = parts[0]
            if acc is None or rows_in.stop > acc0 + acc.shape[1]:
                acc = _grow(acc, o.shape[0], rows_in.stop - acc0, spatial[1:], device)
            region = (slice(None), slice(rows_in.start - acc0, rows_in.stop - acc0)) + tuple(i for i, _ in parts[1:])
            acc[region].add_(o[(slice(None), rows_of_patch) + tuple(q for _, q in parts[1:])])
        # Rows before the next patch's first row get nothing more.
        done = spatial[0] if k + batch_size >= len(starts) else max(acc0, starts[k + batch_size][0])
        if done > acc0:
            slab, acc = acc[:, :done - acc0], acc[:, done - acc0:]
            yield acc0, _divide(slab, [sums[0][acc0:done], *sums[1:]])
            acc0 = done


def _grow(acc, channels, length, rest, device):
    """The accumulator extended with zero rows to `length` rows (a fresh, compact buffer)."""
    fresh = torch.zeros((channels, length) + tuple(rest), dtype=torch.float32, device=device)
    if acc is not None:
        fresh[:, :acc.shape[1]] = acc
    return fresh


def _divide(slab, sums):
    """Blended sums -> mean, in place, one axis at a time (no weight-sized temporary)."""
    for axis, total in enumerate(sums):
        shape = [1] * slab.dim()
        shape[axis + 1] = -1
        slab /= total.reshape(shape)
    return slab


class _RowCache:
    """The input rows the current patches need, read through `read(lo, hi)`. Patches come in grid
    order, so the first row a patch needs never decreases: rows before it are dropped, and each row
    is read once. The patches of one grid row (one start on the first axis) are views of one block,
    mirrored once over every start of the other axes: gathering each patch on its own had cost the
    ViT MAE's stitching a tenth of its forward passes."""

    def __init__(self, read, spatial, patch, axes):
        self.read, self.size, self.patch_shape = read, spatial[0], tuple(patch)
        self.rows, self.lo = None, 0
        self.extent = [(min(starts), max(starts) + p) for starts, p in zip(axes[1:], patch[1:])]
        self.block, self.block_row = None, None

    def _span(self, lo, hi):
        """Input rows lo..hi-1 as (C, hi-lo, *rest)."""
        if self.rows is None or not self.lo <= lo <= self.lo + self.rows.shape[1]:
            self.rows, self.lo = self.read(lo, hi), lo
        else:
            self.rows, self.lo = self.rows[:, lo - self.lo:], lo
            have = lo + self.rows.shape[1]
            if hi > have:
                self.rows = torch.cat([self.rows, self.read(have, hi)], dim=1)
        return self.rows[:, :hi - lo]

    def patch(self, start):
        """The (C, *patch) input at `start`, mirrored where it leaves the image (a view)."""
        if start[0] != self.block_row:
            self.block, self.block_row = self._grid_row(start[0]), start[0]
        view = self.block
        for axis, (s, (lo, _), p) in enumerate(zip(start[1:], self.extent, self.patch_shape[1:]), start=2):
            view = view.narrow(axis, s - lo, p)
        return view

    def _grid_row(self, start0):
        """(C, patch rows, *extent): the input under every patch that starts at row `start0`."""
        p0 = self.patch_shape[0]
        idx = reflect_indices(start0, p0, self.size)
        lo = int(idx.min())
        span = self._span(lo, int(idx.max()) + 1)
        return _take_patch(span, (start0 - lo,) + tuple(lo for lo, _ in self.extent),
                           (p0,) + tuple(hi - lo for lo, hi in self.extent))


def _take_patch(img, start, patch):
    """The (C, *patch) region of a (C, *spatial) tensor at `start`, mirrored where it leaves the image."""
    mirrored = []
    for axis, (s, p, n) in enumerate(zip(start, patch, img.shape[1:]), start=1):
        if 0 <= s and s + p <= n:
            img = img.narrow(axis, s, p)
        else:  # after the plain narrowing, so the copies hold no more than the patch
            mirrored.append((axis, s, p))
    for axis, s, p in mirrored:
        img = _mirror(img, axis, s, p)
    return img


def _mirror(img, axis, start, length):
    """Indices start..start+length-1 of `img` along `axis`, mirrored at its ends (`reflect_indices`), put
    together from narrowed and flipped runs: index_select along the last axis took 6-10x longer, and no
    index array has to reach the device."""
    idx = reflect_indices(start, length, img.shape[axis])
    if img.shape[axis] == 1:
        return img.expand(*img.shape[:axis], length, *img.shape[axis + 1:])
    steps = np.diff(idx)
    cuts = [0, *(np.flatnonzero(steps[1:] != steps[:-1]) + 2).tolist(), length]
    pieces = []
    for a, b in zip(cuts[:-1], cuts[1:]):
        piece = img.narrow(axis, int(min(idx[a], idx[b - 1])), b - a)
        pieces.append(piece.flip(axis) if b - a > 1 and idx[a] > idx[a + 1] else piece)
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, axis)


def full_image_input(spatial, divisor):
    """The shape TEST.FULL_IMG feeds the network for an image of `spatial` shape: each axis mirrored at its end
    up to the next multiple of `divisor` (what the network's pooling needs)."""
    return tuple(s + (-s) % int(d) for s, d in zip(spatial, divisor))


def predict_full(img, predict_fn, divisor):
    """Network output over a whole (C, *spatial) tensor in one forward pass (TEST.FULL_IMG): the input of
    `full_image_input`'s shape, the output cropped back to (C_out, *spatial)."""
    spatial = tuple(img.shape[1:])
    out = predict_fn(_take_patch(img, (0,) * len(spatial), full_image_input(spatial, divisor))[None])[0]
    return out[(slice(None),) + tuple(slice(0, s) for s in spatial)]


def _views(square):
    """The flips and quarter turns of the last two axes kept by TEST.AUGMENTATION: all 8 when Y == X,
    else the 4 that keep the shape. Each is (quarter turns, flip X afterwards)."""
    turns = (0, 1, 2, 3) if square else (0, 2)
    return [(k, flip) for k in turns for flip in (False, True)]


def predict_augmented(predict_fn, batch):
    """Mean of `predict_fn` over flipped and rotated copies of a (B, C, *spatial) batch, each output
    turned back (test-time augmentation). In 3D the views turn the Y-X plane, as BiaPy does."""
    y, x = batch.ndim - 2, batch.ndim - 1
    views = _views(batch.shape[y] == batch.shape[x])
    total = None
    for k, flip in views:
        view = torch.rot90(batch, k, dims=(y, x))
        out = predict_fn(view.flip(x) if flip else view).float()
        out = torch.rot90(out.flip(x) if flip else out, -k, dims=(y, x))
        total = out if total is None else total + out
    return total / len(views)
