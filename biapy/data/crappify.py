"""Crappify pretext data: degrade images (noise, then down- and up-sampling) and keep the copies.

The copies live in SSL_SOURCE_DIR, one folder per (NOISE, RESIZING_FACTOR, SYSTEM.SEED), each with a
`manifest.json` recording the parameters and each source file's size and modification time; they are
reused only while all of these match, so editing an image (or a new version of the degradation) rebuilds
them instead of silently training on stale data. The noise of each file is seeded by (SYSTEM.SEED, the last
three parts of the file's path): rebuilding gives the same copies, whichever job builds them and wherever the
data is, and a test image named as a training image gets noise of its own.
"""
import functools
import json
import logging
import math
import os
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from biapy.data.image_axes import tiff_calibration
from biapy.data.image_writing import write_image, write_image_slices
from biapy.data.io import (FLOAT32_MAX, beyond_float32_error, check_unique_stems, count_non_finite, non_finite_error,
                           open_image_lazy)
from biapy.data.lazy_images import iter_slabs, slab_depth
from biapy.utils.files import atomic_write_text, remove_stale_temporaries_under
from biapy.utils.locks import lock

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
_VERSION = 7  # bump when the degradation changes, so old copies are rebuilt (5: noise per path; 6: 2D in bands;
# 7: noise by the path's last three parts)
_SLAB_VOXELS = 1 << 23  # voxels read from a lazy source per access (~16 MB of uint16)
_BAND_VALUES = 1 << 18  # values of a 2D image degraded at a time (1 MB per float32 temporary)


def degraded_dtype(dtype):
    """The pixel type of a degraded copy: the image's own, float32 for a boolean image. Noise and resampling put
    its pixels between 0 and 1, which a cast back to bool had turned True (99.99% of a mask's pixels)."""
    return np.dtype(np.float32) if np.dtype(dtype) == np.bool_ else np.dtype(dtype)


def crappify(img, noise, resizing_factor, ndim, rng):
    """Degraded copy of a channel-last image held in memory (same shape, `degraded_dtype`); see degraded_slices."""
    img = np.asarray(img)
    slices = list(degraded_slices(img, noise, resizing_factor, ndim, rng, value_range(img)))
    return np.stack(slices) if ndim == 3 else slices[0]


def degraded_slices(img, noise, resizing_factor, ndim, rng, bounds):
    """The degraded image, yielded one (Y, X, C) z slice at a time (a 2D image is a single slice, computed a
    band of rows at a time by `_degraded_plane`).

    Gaussian noise of std `noise * hi` (none when noise == 0), clipped to `bounds` = (lo, hi), the
    image's own range, per channel (`value_range`): at the brightest channel's level, noise had buried a dim
    stain beside it (correlation with the original -0.001) and turned an empty one into noise. Then every
    spatial axis (Z too) is linearly down-sampled to int(size / sqrt(factor)) and linearly up-sampled back,
    as BiaPy's crappify does (skimage's resize, order 1, mode 'reflect', no anti-aliasing; `_linear_taps`),
    and integers are rounded to the nearest (BiaPy truncates: half a grey level darker on average). Linear
    resampling is separable, so Y and X are resampled per slice and Z between slices: a few slices are in
    memory at a time, whatever the volume's size. `img` may be a lazy image (open_image_lazy); noise is drawn
    slice after slice, the same numbers a single draw over the whole image gives.
    """
    if ndim == 2:
        yield _degraded_plane(img, noise, resizing_factor, rng, bounds)
        return
    lo, hi = bounds
    shape = tuple(img.shape)
    n_z, plane, dtype = shape[0], shape[1:3], degraded_dtype(img.dtype)
    small_z, *small_plane = (max(1, int(s / math.sqrt(resizing_factor))) for s in shape[:3])
    down, up = _linear_taps(n_z, small_z), _linear_taps(small_z, n_z)
    needed = {i for i0, i1, _ in down for i in (i0, i1)}
    source = _SlabReader(img)
    reduced, reduced_next, smalls = {}, 0, {}

    def reduced_slice(z):  # input slice z: noisy, clipped, down-sampled in Y and X
        nonlocal reduced_next
        while reduced_next <= z:
            k = reduced_next
            reduced_next += 1
            noise_map = rng.standard_normal(shape[1:], dtype=np.float32) if noise > 0 else None
            if k not in needed:  # the noise is drawn all the same: later slices get the same numbers
                continue
            reduced[k] = _resize_plane(_noised(np.array(source[k], dtype=np.float32), noise_map, noise, lo, hi),
                                       small_plane)
        return reduced[z]

    def small_slice(k):
        if k not in smalls:
            i0, i1, w = down[k]
            smalls[k] = _lerp(reduced_slice(i0), reduced_slice(i1) if i1 != i0 else None, w)
            for z in [z for z in reduced if z < i0]:  # later small slices start at i0 or after
                del reduced[z]
        return smalls[k]

    for j in range(n_z):
        k0, k1, w = up[j]
        low = small_slice(k0)
        x = _resize_plane(_lerp(low, small_slice(k1) if k1 != k0 else None, w), plane)
        for k in [k for k in smalls if k < k0 - 1]:  # the last output slices mirror back to k0 - 1
            del smalls[k]
        yield _as_degraded(x, dtype)


def _noised(x, noise_map, noise, lo, hi):
    """float32 pixels `x` plus `noise_map` (standard normal, or None for no noise) scaled to `noise * hi`, clipped
    to the image's range (lo, hi); in place."""
    if noise_map is not None:
        noise_map *= np.float32(noise * hi)
        x += noise_map
        np.clip(x, lo, hi, out=x)
    return x


def _as_degraded(x, dtype):
    """Degraded float32 pixels in the copy's type: integers rounded to the nearest and kept in the type's range.
    Not in place: `x` may be a slice the 3D path keeps for the next ones (`_lerp` at weight 0 returns it)."""
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        x = np.clip(np.rint(x), info.min, info.max)
    return x.astype(dtype, copy=False)


def _degraded_plane(img, noise, resizing_factor, rng, bounds):
    """The degraded copy of a 2D (Y, X, C) image (`degraded_slices`), computed a band of rows at a time into the
    output array: whole, its float32 temporaries had taken 7-19x the image (5.9 GB for a 400 MB one).

    Each step is separable and local along Y: input rows are read (`img` may be lazy), noised, clipped and
    down-sampled along X in order (noise drawn band after band: the numbers of one whole draw), kept only while a
    later band needs them, then each band of output rows is made from the down-sampled rows its taps reach. Every
    value is computed by the same numpy expression whatever the band size, so bands change no bit of the copy."""
    lo, hi = bounds
    (n_y, n_x, n_c), dtype = img.shape, degraded_dtype(img.dtype)
    small_y, small_x = (max(1, int(s / math.sqrt(resizing_factor))) for s in (n_y, n_x))
    down, up = _linear_taps(n_y, small_y), _linear_taps(small_y, n_y)
    step = max(1, _BAND_VALUES // (n_x * n_c))
    bands = [(a, min(n_y, a + step)) for a in range(0, n_y, step)]
    smalls = [_reach(up[a:b]) for a, b in bands]  # the small rows each band is made of
    inputs = [_reach(down[k0:k1]) for k0, k1 in smalls]  # and the input rows those are made of
    keep = [min((i0 for i0, _ in inputs[k + 1:]), default=n_y) for k in range(len(inputs))]  # later bands' first row
    out = np.empty(img.shape, dtype)
    rows, first = np.empty((0, small_x, n_c), np.float32), 0  # input rows first.. reduced (noisy, clipped, X down)
    for (a, b), (k0, k1), (_, i1), drop in zip(bands, smalls, inputs, keep):
        if i1 > first + len(rows):
            x = np.array(img[first + len(rows):i1], dtype=np.float32)
            x = _noised(x, rng.standard_normal(x.shape, dtype=np.float32) if noise > 0 else None, noise, lo, hi)
            rows = np.concatenate([rows, x if small_x == n_x else _resample(x, _linear_taps(n_x, small_x), 1)])
            del x
        small = _resample(rows, [(p - first, q - first, w) for p, q, w in down[k0:k1]], 0)
        x = _resample(small, [(p - k0, q - k0, w) for p, q, w in up[a:b]], 0)
        if small_x != n_x:
            x = _resample(x, _linear_taps(small_x, n_x), 1)
        out[a:b] = _as_degraded(x, dtype)
        rows, first = rows[drop - first:], drop  # rows no later band reads
    return out


def _reach(taps):
    """(first, last + 1) of the input indices of `taps`."""
    return min(t[0] for t in taps), max(t[1] for t in taps) + 1


def value_range(img, path=None):
    """Per-channel (min, max) of a channel-last image, in memory or lazy (read in slabs), as float32 arrays
    (C,); a DataError naming `path` if a float image holds NaN or Inf pixels (degrading them would only
    spread them)."""
    channels = img.shape[-1]
    lo, hi, bad = np.full(channels, np.inf), np.full(channels, -np.inf), 0
    for slab in iter_slabs(img, _SLAB_VOXELS):
        n = count_non_finite(slab)
        if n:  # counted over every slab, so the message gives the file's total
            bad += n
        elif slab.size:
            pixels = slab.reshape(-1, channels)
            lo, hi = np.minimum(lo, pixels.min(0)), np.maximum(hi, pixels.max(0))
    if bad:
        raise non_finite_error(path or "image", bad)
    bounds = np.abs(np.r_[lo, hi])
    peak = float(bounds[np.isfinite(bounds)].max(initial=0.0))
    if peak > FLOAT32_MAX:  # the copy is computed and written in float32: its pixels would be Inf, then NaN
        raise beyond_float32_error(path or "image", peak)
    return lo.astype(np.float32), hi.astype(np.float32)


class _SlabReader:
    """z slices of a 3D image, read a slab at a time (chunked stores read whole chunks anyway)."""

    def __init__(self, img):
        self.img = img
        self.depth = img.shape[0] if isinstance(img, np.ndarray) else slab_depth(img.shape, _SLAB_VOXELS)
        self.start, self.slab = None, None

    def __getitem__(self, z):
        if self.start is None or not self.start <= z < self.start + len(self.slab):
            self.start = z
            self.slab = np.asarray(self.img[z:z + self.depth])
        return self.slab[z - self.start]


def _linear_taps(n_in, n_out):
    """Per output index (i0, i1, w): linear interpolation from n_in to n_out samples (`_linear_plan`)."""
    return _linear_plan(n_in, n_out)[0]


@functools.lru_cache(maxsize=64)  # the same few sizes for every slice of a volume
def _linear_plan(n_in, n_out):
    """(taps, mirrored): per output index (i0, i1, w), linear interpolation from n_in to n_out samples at
    source (dst + 0.5) * n_in / n_out - 0.5, mirrored about the end samples where it falls outside them, as
    skimage's resize (scipy's zoom, grid mode, 'mirror') computes it; and the output indices so mirrored.
    Clamping there instead (torch's align_corners=False) had changed the border rows of an up-sampled copy
    from BiaPy's."""
    if n_in == n_out:
        return tuple((d, d, np.float32(0)) for d in range(n_in)), ()
    scale, last = n_in / n_out, n_in - 1
    taps, mirrored = [], []
    for d in range(n_out):
        src = (d + 0.5) * scale - 0.5
        if not 0 <= src <= last:
            mirrored.append(d)
            src = abs(src)
            if src > last:
                src = max(2 * last - src, 0.0)
        i0 = min(int(src), last)
        taps.append((i0, min(i0 + 1, last), np.float32(src - i0)))
    return tuple(taps), tuple(mirrored)


def _lerp(a, b, w):
    return a if b is None or w == 0 else a * (1 - w) + b * w


def _resize_plane(x, size):
    """Linear resize of a (Y, X, C) float32 slice to `size` (y, x), as `_linear_taps` computes it.

    torch's bilinear resize (align_corners=False) takes the same taps but where they fall outside the
    image, which it clamps: its result is kept but for those rows and columns, computed again. In numpy
    alone, the volume of bench_data.py had been degraded in 1.33x the time."""
    if tuple(x.shape[:2]) == tuple(size):
        return x
    t = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 0)))[None]
    out = np.moveaxis(F.interpolate(t, size=tuple(size), mode="bilinear", align_corners=False)[0].numpy(), 0, -1)
    plans = [_linear_plan(n, m) for n, m in zip(x.shape[:2], size)]
    for axis, (taps, mirrored) in enumerate(plans):
        if mirrored:
            # Those rows (columns): along this axis from their mirrored taps, then along the other one.
            part = _resample(x, [taps[d] for d in mirrored], axis)
            out[(slice(None),) * axis + (list(mirrored),)] = _resample(part, plans[1 - axis][0], 1 - axis)
    return out


def _resample(x, taps, axis):
    """`x` linearly resampled along `axis` at `taps` ((i0, i1, w) per output index)."""
    i0, i1, w = (np.array(v) for v in zip(*taps))
    w = w.reshape((-1,) + (1,) * (x.ndim - 1 - axis))
    low, out = np.take(x, i0, axis), np.take(x, i1, axis)
    out -= low  # in place: low + (high - low) * w with two temporaries, not four
    out *= w
    out += low
    return out


def _file_seed(seed, path):
    """The noise generator of one source file, by the last three parts of its path (folder/folder/name): by its
    name alone, test/x/img.tif had had the noise of train/x/img.tif, which training had learnt to remove
    (correlation 0.86); by its absolute path, the same data moved or copied elsewhere (a cluster's scratch, a
    temporary folder) pretrained on other noise, so the same config and seed gave another model."""
    where = Path(path).resolve().parts[-3:]
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(os.fsencode(os.path.join(*where)))])


def _file_stamp(path):
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def copies_folder(dst_dir, noise, resizing_factor, seed) -> Path:
    """The folder of the degraded copies made with these parameters, inside SSL_SOURCE_DIR: runs with other
    ones (a seed sweep run in parallel, say) keep copies of their own. In one shared folder, a run rebuilt the
    copies another was still training or testing on, and that one's scores came from the wrong copies."""
    return Path(dst_dir) / f"noise{float(noise):g}_factor{float(resizing_factor):g}_seed{int(seed)}"


def prepare_ssl_source(src_files, dst_dir, noise, resizing_factor, ndim, seed, key=None):
    """Degraded copies of `src_files` (same names) in `copies_folder(dst_dir, ...)`, rebuilt unless its
    manifest matches. `key`: the config key of the sources, for errors (else the copies' folder).

    Returns the degraded paths aligned with `src_files`. Files are written atomically and the
    manifest last, so an interrupted build is redone on the next run.
    """
    dst_dir = copies_folder(dst_dir, noise, resizing_factor, seed)
    src_files = [Path(p) for p in src_files]
    names = [p.name for p in src_files]
    # Copies are named after their source's stem: 'x.jpg' and 'x.png' had both had the copy 'x.png'.
    check_unique_stems(src_files, key or str(dst_dir))
    params = {"version": _VERSION, "noise": float(noise), "resizing_factor": float(resizing_factor),
              "ndim": int(ndim), "seed": int(seed)}
    # Jobs sharing the folder take turns: two builds with other NOISE at once left the manifest of one
    # beside the copies of the other, and later jobs trusted it.
    try:
        dst_dir.mkdir(parents=True, exist_ok=True)
        lock_fh = open(dst_dir / ".lock", "w")
    except OSError:
        # A folder this job cannot write (a read-only share, another user's): its copies serve while current.
        old, old_files, todo, _ = _stale_sources(src_files, dst_dir, params)
        if old is None or todo:
            raise
        return [dst_dir / old_files[n]["output"] for n in names]
    with lock_fh:
        locked = lock(lock_fh)  # waits while another job builds here
        return _prepare_locked(src_files, names, dst_dir, params, noise, resizing_factor, ndim, seed, locked)


def _why_stale(src, entry, dst_dir):
    """Why the manifest's `entry` for `src` does not hold its current copy, or None when it does."""
    if entry is None:
        return "new source file(s)"
    current = _file_stamp(src)
    if {k: entry.get(k) for k in current} != current:
        return "source file(s) changed"
    if not (dst_dir / entry["output"]).is_file():
        return "degraded file(s) missing"
    if entry.get("copy") not in (None, _file_stamp(dst_dir / entry["output"])):
        return "degraded file(s) changed"  # overwritten or damaged: it had stopped every later run
    return None


def _stale_sources(src_files, dst_dir, params):
    """(manifest or None, its entries if made with `params` else {}, the sources whose copy must be made, why)."""
    old = _read_manifest(dst_dir / MANIFEST)
    old_files = old.get("files", {}) if old is not None and old.get("params") == params else {}
    todo, reasons = [], set()
    for src in src_files:
        reason = _why_stale(src, old_files.get(src.name), dst_dir)
        if reason:
            reasons.add(reason)
            todo.append(src)
    return old, old_files, todo, reasons


def _prepare_locked(src_files, names, dst_dir, params, noise, resizing_factor, ndim, seed, locked):
    # A killed build's temporaries. Unlocked, another job may be writing here: only those of ended processes.
    remove_stale_temporaries_under(dst_dir, every=locked)
    old, old_files, todo, reasons = _stale_sources(src_files, dst_dir, params)
    same_params = old is not None and old.get("params") == params
    if old is not None and not same_params:
        changed = [f"{k} {old.get('params', {}).get(k)} -> {v}" for k, v in params.items()
                   if old.get("params", {}).get(k) != v]
        log.info("Rebuilding degraded copies in %s: parameters changed (%s)", dst_dir, ", ".join(changed))
    elif old is None and any(f.name != ".lock" for f in dst_dir.iterdir()):
        log.info("Rebuilding degraded copies in %s: no valid %s found", dst_dir, MANIFEST)
    elif todo and old is not None:
        log.info("Updating %s in %s: %s", _copies(len(todo)), dst_dir, ", ".join(sorted(reasons)))
    elif todo:
        log.info("Creating %s in %s", _copies(len(todo)), dst_dir)
    files = dict(old_files)
    for src in tqdm(todo, desc="Degrading", unit="image", disable=None, leave=False):
        img = open_image_lazy(src, ndim)  # an uncompressed TIFF is read a slab (2D: band of rows) at a time
        slices = degraded_slices(img, noise, resizing_factor, ndim, _file_seed(seed, src),
                                 value_range(img, src))
        calibration = tiff_calibration(src)  # the copy keeps its source's pixel size (same shape)
        if ndim == 2:
            written = write_image(dst_dir / src.name, next(slices), ndim, calibration)
        else:
            written = write_image_slices(dst_dir / src.name, slices, img.shape, degraded_dtype(img.dtype),
                                         calibration)
        files[src.name] = dict(_file_stamp(src), output=written.name, copy=_file_stamp(written))
    if todo or not same_params:
        _write_manifest(dst_dir / MANIFEST, {"params": params, "files": files})
    return [dst_dir / files[n]["output"] for n in names]


def _copies(n):
    return f"{n} degraded {'copy' if n == 1 else 'copies'}"


def _read_manifest(path):
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return data if isinstance(data, dict) and isinstance(data.get("files"), dict) else None
    except (OSError, ValueError):
        return None


def _write_manifest(path, data):
    atomic_write_text(path, json.dumps(data, indent=1, sort_keys=True))
