"""Crappify pretext data: degrade images (noise, then down- and up-sampling) and keep the copies.

The copies live in SSL_SOURCE_DIR with a `manifest.json` recording the parameters and each source
file's size and modification time; they are reused only while all of these match, so changing
NOISE or RESIZING_FACTOR (or editing an image) rebuilds them instead of silently training on stale
data. The noise of each file is seeded by (SYSTEM.SEED, file name): rebuilding gives the same copies.
"""
import json
import logging
import os
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from biapy.data.io import check_finite, read_image, write_image
from biapy.errors import DataError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
_VERSION = 1  # bump when the degradation itself changes, so old copies are rebuilt


def crappify(img, noise, resizing_factor, ndim, rng):
    """Degraded copy of a channel-last image (same shape and dtype).

    Gaussian noise of std `noise * max(img)` (none when noise == 0), clipped to the image's own
    [min, max]; then every spatial axis (Z too) is linearly down-sampled to round(size / sqrt(factor))
    and linearly up-sampled back.
    """
    img = np.asarray(img)
    x = img.astype(np.float32)
    lo, hi = float(x.min()), float(x.max())
    if noise > 0:
        noise_map = rng.standard_normal(x.shape, dtype=np.float32)
        noise_map *= np.float32(noise * hi)
        x += noise_map
        np.clip(x, lo, hi, out=x)
    spatial = img.shape[:ndim]
    small = tuple(max(1, int(round(s / np.sqrt(resizing_factor)))) for s in spatial)
    if small != spatial:
        mode = "bilinear" if ndim == 2 else "trilinear"
        t = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 0)))[None]
        t = F.interpolate(t, size=small, mode=mode, align_corners=False)
        t = F.interpolate(t, size=spatial, mode=mode, align_corners=False)
        x = np.moveaxis(t[0].numpy(), 0, -1)
    if np.issubdtype(img.dtype, np.integer):
        info = np.iinfo(img.dtype)
        x = np.clip(np.rint(x), info.min, info.max)
    return x.astype(img.dtype)


def _file_seed(seed, name):
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(name.encode())])


def _source_entry(path):
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def prepare_ssl_source(src_files, dst_dir, noise, resizing_factor, ndim, seed):
    """Degraded copies of `src_files` in `dst_dir` (same names), rebuilt unless the manifest matches.

    Returns the degraded paths aligned with `src_files`. Files are written atomically and the
    manifest last, so an interrupted build is redone on the next run.
    """
    dst_dir = Path(dst_dir)
    src_files = [Path(p) for p in src_files]
    names = [p.name for p in src_files]
    if len(set(names)) != len(names):
        raise DataError(f"{dst_dir}: two source images share a file name; degraded copies need unique names")
    params = {"version": _VERSION, "noise": float(noise), "resizing_factor": float(resizing_factor),
              "ndim": int(ndim), "seed": int(seed)}
    old = _read_manifest(dst_dir / MANIFEST)
    same_params = old is not None and old.get("params") == params
    old_files = old.get("files", {}) if same_params else {}
    todo, reasons = [], set()
    for src in src_files:
        entry = old_files.get(src.name)
        current = _source_entry(src)
        if entry is None:
            reasons.add("new source file(s)")
        elif {k: entry.get(k) for k in current} != current:
            reasons.add("source file(s) changed")
        elif not (dst_dir / entry["output"]).is_file():
            reasons.add("degraded file(s) missing")
        else:
            continue
        todo.append(src)
    if old is not None and not same_params:
        changed = [f"{k} {old.get('params', {}).get(k)} -> {v}" for k, v in params.items()
                   if old.get("params", {}).get(k) != v]
        log.info("Rebuilding degraded copies in %s: parameters changed (%s)", dst_dir, ", ".join(changed))
    elif old is None and dst_dir.exists() and any(dst_dir.iterdir()):
        log.info("Rebuilding degraded copies in %s: no valid %s found", dst_dir, MANIFEST)
    elif todo and old is not None:
        log.info("Updating %d degraded copies in %s: %s", len(todo), dst_dir, ", ".join(sorted(reasons)))
    elif todo:
        log.info("Creating %d degraded copies in %s", len(todo), dst_dir)
    files = dict(old_files)
    for src in todo:
        img = read_image(src, ndim)
        check_finite(img, src)  # named here: degrading NaN/Inf pixels would only spread them
        out = crappify(img, noise, resizing_factor, ndim, _file_seed(seed, src.name))
        written = write_image(dst_dir / src.name, out, ndim)
        files[src.name] = dict(_source_entry(src), output=written.name)
    if todo or not same_params:
        _write_manifest(dst_dir / MANIFEST, {"params": params, "files": files})
    return [dst_dir / files[n]["output"] for n in names]


def _read_manifest(path):
    try:
        data = json.loads(Path(path).read_text())
        return data if isinstance(data, dict) and isinstance(data.get("files"), dict) else None
    except (OSError, ValueError):
        return None


def _write_manifest(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp{os.getpid()}-{path.name}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)
