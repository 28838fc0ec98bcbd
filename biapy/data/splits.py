"""The train/validation split of DATA.TRAIN.PATH's images: whole images (a share, or k folds), or, for a single
training image, a band of it (`band_split`); the names a split's validation set goes by (`validation_names`, a
band's `band_name`), what a checkpoint keeps of them (`split_record`), and the log lines that say them.
"""
import hashlib
import math
from collections import namedtuple
from pathlib import Path

import numpy as np

from biapy.config.checks import ndim_of
from biapy.data.io import image_shape, list_images
from biapy.errors import ConfigError, DataError

# Rows lo..hi-1 (half-open) of spatial axis `axis` (0: the first, z in 3D) of an image.
Band = namedtuple("Band", "axis lo hi")

# What `validation_split` returns: `train` and `val` index lists of the training files, and `bands`, None for whole
# images, else (training Band, validation Band) of the one image both lists hold.
Split = namedtuple("Split", "train val bands")


def split_train_val(items, fraction, random=True, seed=0):
    """(train, val) lists of whole items, at least one each; `random` picks val items by `seed`. As BiaPy
    (sklearn's train_test_split) the validation share is ceil(n * fraction)."""
    items = list(items)
    n = len(items)
    if not 0 < float(fraction) < 1:
        raise ConfigError(f"DATA.VAL.SPLIT_TRAIN: {fraction} must be a fraction between 0 and 1")
    if n < 2:
        raise ConfigError(f"DATA.VAL.SPLIT_TRAIN: {n} item(s) cannot be split into training and validation "
                          "(need at least 2)")
    n_val = _share(n, fraction)
    val = set(_order(n, random, seed)[n - n_val:].tolist())
    return [x for i, x in enumerate(items) if i not in val], [x for i, x in enumerate(items) if i in val]


def _share(n, fraction):
    """The validation share of `n` images (or rows): ceil(n * fraction), at least 1, at most n - 1."""
    # Rounded first: 0.1 * 30 is 3.0000000000000004 in floating point, which must not take a fourth.
    return min(max(1, math.ceil(round(n * float(fraction), 9))), n - 1)


def split_fold(items, nfold, fold, random=True, seed=0):
    """(train, val) lists for k-fold cross-validation: the items (shuffled by `seed` when `random`) cut into
    `nfold` disjoint folds of sizes differing by at most one that together cover every item; `fold` (1-based,
    as BiaPy's DATA.VAL.CROSS_VAL_FOLD) is the validation one."""
    items = list(items)
    if not 1 <= int(fold) <= int(nfold) <= len(items):
        raise ConfigError(f"DATA.VAL.CROSS_VAL_FOLD: fold {fold} of {nfold} over {len(items)} item(s); expected "
                          "1 <= CROSS_VAL_FOLD <= CROSS_VAL_NFOLD <= the number of items")
    val = set(np.array_split(_order(len(items), random, seed), int(nfold))[int(fold) - 1].tolist())
    return [x for i, x in enumerate(items) if i not in val], [x for i, x in enumerate(items) if i in val]


def _order(n, random, seed):
    return np.random.default_rng(seed).permutation(n) if random else np.arange(n)


def validation_split(cfg, files) -> Split:
    """The `Split` of `files`, DATA.TRAIN.PATH's images, under the DATA.VAL keys (FROM_TRAIN): k-fold with
    CROSS_VAL (whole images), else the SPLIT_TRAIN share: of the images, or of the rows of the only one
    (`band_split`, its shape read from the file's header). DataError when they are too few or it is too short,
    raised before anything (crappify's degraded copies) is made from them."""
    v, n = cfg.DATA.VAL, len(files)
    idx = list(range(n))
    if v.CROSS_VAL:
        if n < v.CROSS_VAL_NFOLD:
            raise DataError(f"DATA.TRAIN.PATH: {n} image(s) in {cfg.DATA.TRAIN.PATH} cannot make "
                            f"DATA.VAL.CROSS_VAL_NFOLD {v.CROSS_VAL_NFOLD} folds of whole images; add images or "
                            "lower CROSS_VAL_NFOLD")
        return Split(*split_fold(idx, v.CROSS_VAL_NFOLD, v.CROSS_VAL_FOLD, v.RANDOM, cfg.SYSTEM.SEED), None)
    if n == 1:
        shape = image_shape(files[0], ndim_of(cfg))[:-1]
        return Split([0], [0], band_split(files[0], shape, tuple(cfg.DATA.PATCH_SIZE[:-1]), v.SPLIT_TRAIN))
    return Split(*split_train_val(idx, v.SPLIT_TRAIN, v.RANDOM, cfg.SYSTEM.SEED), None)


def band_split(path, spatial, patch, fraction):
    """(training Band, validation Band) of a single training image of `spatial` shape: validation takes the last
    ceil(length * `fraction`) rows (as `split_train_val` counts images) of its first spatial axis, training the
    rows before them. In 3D that axis is z where both parts hold a `patch` along z, else y (z slices are often
    few); in 2D it is y. DataError naming `path`, its length and the length needed when neither side would hold a
    patch along the cut axis."""
    axes = (0, 1) if len(spatial) == 3 else (0,)
    for axis in axes:
        n, p = int(spatial[axis]), int(patch[axis])
        n_val = _share(n, fraction)
        if min(n - n_val, n_val) >= p:
            return Band(axis, 0, n - n_val), Band(axis, n - n_val, n)
    names = _axis_names(len(spatial))
    ask = [f"{spatial[a]} along {names[a]} (needs {_shortest(int(patch[a]), fraction)})" for a in reversed(axes)]
    raise DataError(f"{path}: the only training image, so validation is the last DATA.VAL.SPLIT_TRAIN {fraction} of "
                    f"its rows, which needs DATA.PATCH_SIZE {tuple(patch)} to fit on both sides of the cut; it has "
                    f"{' and '.join(ask)}. Change SPLIT_TRAIN, use a smaller patch, add images, or set "
                    "DATA.VAL.FROM_TRAIN False with DATA.VAL.PATH")


def _shortest(p, fraction):
    """The shortest length whose validation share and the rest before it both hold `p` rows (both grow with it)."""
    f = float(fraction)
    n = max(2 * p, int((p - 1) / f) - 2, int(p / (1 - f)) - 2)
    while min(_share(n, f), n - _share(n, f)) < p:
        n += 1
    return n


def _axis_names(ndim):
    return "zyx"[-ndim:]


def band_name(name, band, ndim) -> str:
    """'vol.tif z 896..1023': a band of an image by its file name, axis and rows (first..last)."""
    return f"{Path(name).name} {_axis_names(ndim)[band.axis]} {band.lo}..{band.hi - 1}"


def describe_bands(name, bands, ndim) -> str:
    """The log line of a band split: 'Validation: rows 896..1023 of vol.tif (z), training: rows 0..895'."""
    train, val = bands
    return (f"Validation: rows {val.lo}..{val.hi - 1} of {Path(name).name} ({_axis_names(ndim)[val.axis]}), "
            f"training: rows {train.lo}..{train.hi - 1}")


def validation_names(cfg, train_files=None) -> list:
    """Sorted file names of the validation images `cfg` picks, or the `band_name` of the band of the only training
    image: listed (and a header read), no pixels. `train_files`: DATA.TRAIN.PATH's listing when the caller has it."""
    if not cfg.DATA.VAL.FROM_TRAIN:
        return sorted(p.name for p in list_images(cfg.DATA.VAL.PATH, "DATA.VAL.PATH"))
    files = train_files if train_files is not None else list_images(cfg.DATA.TRAIN.PATH, "DATA.TRAIN.PATH")
    return sorted(split_names(files, validation_split(cfg, files), ndim_of(cfg)))


def split_names(files, split, ndim) -> list:
    """The file names of `split`'s validation images among `files`, or the `band_name` of the validation band."""
    if split.bands is not None:
        return [band_name(files[0], split.bands[1], ndim)]
    return [Path(files[i]).name for i in split.val]


def split_record(names) -> dict:
    """What a checkpoint keeps of its validation set (plain values): the image count and a digest of the sorted
    names (`validation_names`: a band's name holds its rows), so that a resumed run can tell whether it would
    validate on other images or rows."""
    # surrogateescape: a file name that is not UTF-8 reaches Python with surrogates that plain encode() refuses
    digest = hashlib.sha1("\n".join(sorted(names)).encode("utf-8", "surrogateescape")).hexdigest()
    return {"count": len(names), "digest": digest}


def shared_files(train_files, val_files) -> list:
    """The validation files that are also training files (the same file by its resolved path)."""
    train = {Path(f).resolve() for f in train_files}
    return [f for f in val_files if Path(f).resolve() in train]
