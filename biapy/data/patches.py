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


def _reflect_pad(x, before, after):
    """Pad the spatial axes of (C, *spatial) by reflection, any amount (gathers with folded indices)."""
    for axis, (b, a) in enumerate(zip(before, after), start=1):
        if b or a:
            idx = torch.from_numpy(reflect_indices(-b, x.shape[axis] + b + a, x.shape[axis])).to(x.device)
            x = x.index_select(axis, idx)
    return x


def predict_whole(img, predict_fn, patch, overlap=None, padding=None, batch_size=1):
    """Network output over a whole (C, *spatial) tensor from overlapping patches, smoothly blended.

    `predict_fn(batch (B, C, *patch)) -> (B, C_out, *patch)`; the result is (C_out, *spatial),
    float32, accumulated on the input's device. Patches that leave the image read it mirrored, one
    patch at a time, and only their part inside the image is accumulated; the grid is a product of
    per-axis starts and the window is separable, so the summed weights are a product of per-axis
    sums: beside the output, no other image-sized buffer is needed.
    """
    patch = tuple(int(p) for p in patch)
    overlap, padding = _check(patch, overlap, padding)
    spatial = tuple(img.shape[1:])
    if len(spatial) != len(patch):
        raise ConfigError(f"DATA.PATCH_SIZE: patch {patch} does not fit an image of spatial shape {spatial}")
    batch_size = max(1, int(batch_size))
    axes = [axis_starts(s, p, o, d) for s, p, o, d in zip(spatial, patch, overlap, padding)]
    window = blend_window(patch, padding, img.device)
    sums = []  # per axis: the summed 1-D windows of every start, over the image's pixels
    for n, p, d, starts in zip(spatial, patch, padding, axes):
        w1 = blend_window((p,), (d,), img.device)
        total = torch.zeros(n, dtype=torch.float32, device=img.device)
        for st in starts:
            lo, hi = max(0, -st), min(p, n - st)
            total[st + lo:st + hi] += w1[lo:hi]
        sums.append(total)
    starts = list(itertools.product(*axes))
    acc = None
    for k in range(0, len(starts), batch_size):
        chunk = starts[k:k + batch_size]
        batch = torch.stack([_take_patch(img, st, patch) for st in chunk])
        out = predict_fn(batch)
        if tuple(out.shape[2:]) != patch or out.shape[0] != len(chunk):
            raise ValueError(f"predict_fn returned {tuple(out.shape)} for a batch of {tuple(batch.shape)}")
        out = out.float() * window
        if acc is None:
            acc = torch.zeros((out.shape[1],) + spatial, dtype=torch.float32, device=img.device)
        for st, o in zip(chunk, out):
            kept = [(max(0, -s), min(p, n - s)) for s, p, n in zip(st, patch, spatial)]
            acc[(slice(None),) + tuple(slice(s + lo, s + hi) for s, (lo, hi) in zip(st, kept))] += \
                o[(slice(None),) + tuple(slice(lo, hi) for lo, hi in kept)]
    for axis, total in enumerate(sums):  # in place, one axis at a time: no weight-sized temporary
        shape = [1] * acc.dim()
        shape[axis + 1] = -1
        acc /= total.reshape(shape)
    return acc


def _take_patch(img, start, patch):
    """The (C, *patch) region of a (C, *spatial) tensor at `start`, mirrored where it leaves the image."""
    gathers = []
    for axis, (s, p, n) in enumerate(zip(start, patch, img.shape[1:]), start=1):
        if 0 <= s and s + p <= n:
            img = img.narrow(axis, s, p)
        else:  # narrowed to the mirrored pixels' span first, so the gather copies no more than the patch
            idx = reflect_indices(s, p, n)
            lo = int(idx.min())
            img = img.narrow(axis, lo, int(idx.max()) + 1 - lo)
            gathers.append((axis, torch.from_numpy(idx - lo).to(img.device)))
    for axis, idx in gathers:
        img = img.index_select(axis, idx)
    return img


def predict_full(img, predict_fn, divisor):
    """Network output over a whole (C, *spatial) tensor in one forward pass (TEST.FULL_IMG).

    Each spatial axis is mirrored up to the next multiple of `divisor` (what the network's pooling
    needs) and the output is cropped back: (C_out, *spatial).
    """
    spatial = tuple(img.shape[1:])
    after = [(-s) % int(d) for s, d in zip(spatial, divisor)]
    out = predict_fn(_reflect_pad(img, [0] * len(spatial), after)[None])[0]
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
