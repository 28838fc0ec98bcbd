"""Patch datasets for training and validation, and the whole-image train/validation split.

A `PatchDataset` keeps each image's raw pixels (in memory) or only its file layout (lazy,
`in_memory=False`: each item reads just its patch from disk) plus per-image normalization
statistics measured once at construction. An item is cut, normalized by the image's affine map
and augmented; everything random about it comes from a numpy Generator seeded by
(seed, epoch, index), so an item is the same in any worker, in memory or lazy, and in a resumed run.

The epoch lives in a shared-memory tensor: `set_epoch` in the main process reaches persistent
DataLoader workers too. Per-image tables are numpy arrays fixed at construction (nothing grows).
"""
import logging
from collections import namedtuple

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from biapy.data.io import check_finite, open_image_lazy, read_image
from biapy.data.normalization import _sample
from biapy.data.patches import axis_starts, extract_patch
from biapy.errors import ConfigError, DataError

log = logging.getLogger(__name__)

TARGET_MODES = ("same", "image", "label")

# One record per image: `path` (input file), `target` (its target file or None), `shape` (spatial..., c),
# `stats` (the normalizer's statistics of the input image, used for input and 'image' target).
Source = namedtuple("Source", "path target shape stats")


def split_train_val(items, fraction, random=True, seed=0):
    """(train, val) lists of whole items, at least one each; `random` picks val items by `seed`."""
    items = list(items)
    n = len(items)
    if not 0 < float(fraction) < 1:
        raise ConfigError(f"DATA.VAL.SPLIT_TRAIN: {fraction} must be a fraction between 0 and 1")
    if n < 2:
        raise ConfigError(f"DATA.VAL.SPLIT_TRAIN: {n} training image(s) cannot be split into training and "
                          "validation (need at least 2); add images or set DATA.VAL.FROM_TRAIN False with VAL.PATH")
    n_val = min(max(1, int(round(n * float(fraction)))), n - 1)
    order = np.random.default_rng(seed).permutation(n) if random else np.arange(n)
    val = set(order[n - n_val:].tolist())
    return [x for i, x in enumerate(items) if i not in val], [x for i, x in enumerate(items) if i in val]


def is_integer_valued(arr):
    if np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_:
        return True
    return bool(np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)))


def _tensor(a, dtype):
    """A C-ordered tensor of `a`. A flip along a length-1 axis (ZFLIP of a one-slice patch) leaves a negative
    stride that numpy still counts as contiguous, so it makes no copy, and torch refuses it."""
    a = np.ascontiguousarray(a, dtype=dtype)
    return torch.from_numpy(a.copy() if any(s < 0 for s in a.strides) else a)


class PatchDataset(Dataset):
    def __init__(self, inputs, targets, ndim, patch, normalizer, target_mode, in_memory=True,
                 random_patches=True, patches_per_image=-1, overlap=None, padding=None, augmentor=None,
                 seed=0, reflect_to_complete=True, progress=None):
        if target_mode not in TARGET_MODES:
            raise ValueError(f"target_mode must be one of {TARGET_MODES}, not {target_mode!r}")
        inputs = list(inputs)
        targets = list(targets) if targets is not None and target_mode != "same" else [None] * len(inputs)
        if len(targets) != len(inputs):
            raise DataError(f"{len(inputs)} input images but {len(targets)} targets")
        self.ndim, self.patch = int(ndim), tuple(int(p) for p in patch[: int(ndim)])
        channels = int(patch[-1]) if len(patch) == self.ndim + 1 else None  # DATA.PATCH_SIZE form
        first = None
        self.normalizer, self.target_mode, self.in_memory = normalizer, target_mode, bool(in_memory)
        self.random_patches, self.augmentor, self.seed = bool(random_patches), augmentor, int(seed)
        zeros = tuple(0 for _ in self.patch)
        self.overlap = tuple(overlap) if overlap else zeros
        self.padding = tuple(padding) if padding else zeros
        if self.random_patches:
            self.overlap, self.padding = zeros, zeros
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()
        self._images, self._targets, sources, counts, grids = [], [], [], [], []
        pairs = zip(inputs, targets)
        if progress:  # a bar labelled so, on a terminal: thousands of images take a while to read and measure
            pairs = tqdm(pairs, total=len(inputs), desc=progress, unit="image", disable=None, leave=False)
        for path, target in pairs:
            img = read_image(path, ndim) if self.in_memory else open_image_lazy(path, ndim)
            # The target first: a degraded input is made from it, and its name is the one the user knows.
            target_data = self._open_target(target, img, path) if target is not None else None
            sample = _sample(img)
            check_finite(sample, path)
            try:
                stats = normalizer.stats(sample)
            except DataError as exc:
                raise DataError(f"{path}: {exc}") from None
            spatial = tuple(img.shape[:-1])
            if channels is None:
                channels, first = img.shape[-1], path
            if img.shape[-1] != channels:
                origin = f"as {first}" if first is not None else "as DATA.PATCH_SIZE asks"
                raise DataError(f"{path}: has {img.shape[-1]} channel(s), expected {channels} {origin}")
            if any(s < p for s, p in zip(spatial, self.patch)) and not reflect_to_complete:
                known = target if self.target_mode == "image" else path  # crappify: the original, not its copy
                raise DataError(f"{known}: image of shape {spatial} is smaller than DATA.PATCH_SIZE {self.patch}; "
                                "use a smaller patch or set DATA.REFLECT_TO_COMPLETE_SHAPE True")
            self._images.append(img)
            self._targets.append(target_data)
            sources.append(Source(path, target, tuple(img.shape), stats))
            per_axis = [np.asarray(axis_starts(s, p, o, d), dtype=np.int64)
                        for s, p, o, d in zip(spatial, self.patch, self.overlap, self.padding)]
            grids.append(per_axis)
            counts.append(int(np.prod([len(a) for a in per_axis])))
        if not sources:
            raise DataError("no images to cut patches from")
        whole = 0 if self.in_memory else sum(isinstance(img, np.ndarray) for img in self._images)
        if whole:  # IN_MEMORY False was asked for memory's sake: say where it could not be had
            log.info("%d of %d images cannot be read a region at a time (compressed TIFF without zarr installed, "
                     "PNG/JPEG, NIfTI): held in memory whole", whole, len(self._images))
        self.sources = sources
        self._grids = grids
        per_image = np.asarray(counts, dtype=np.int64)
        if self.random_patches and int(patches_per_image) > 0:
            per_image = np.full(len(counts), int(patches_per_image), dtype=np.int64)
        self._offsets = np.concatenate([[0], np.cumsum(per_image)])

    def _open_target(self, target, img, path):
        data = read_image(target, self.ndim) if self.in_memory else open_image_lazy(target, self.ndim)
        if self.target_mode == "label":
            if tuple(data.shape[:-1]) != tuple(img.shape[:-1]) or data.shape[-1] != 1:
                raise DataError(f"{target}: label shape {tuple(data.shape)} does not match its image {path} "
                                f"{tuple(img.shape[:-1]) + (1,)}")
            if not is_integer_valued(_sample(data)):
                raise DataError(f"{target}: labels must be integer class ids, found non-integer values")
        else:
            if tuple(data.shape) != tuple(img.shape):
                raise DataError(f"{target}: shape {tuple(data.shape)} differs from its input {path} {tuple(img.shape)}")
            check_finite(_sample(data), target)
        return data

    # ------------------------------------------------------------------ indexing
    def __len__(self):
        return int(self._offsets[-1])

    def set_epoch(self, epoch):
        """Fresh random crops for `epoch` (seen by DataLoader workers, persistent ones included)."""
        self._epoch[0] = int(epoch)

    @property
    def epoch(self):
        return int(self._epoch[0])

    def _locate(self, index, rng):
        i = int(np.searchsorted(self._offsets, index, side="right")) - 1
        spatial = self.sources[i].shape[:-1]
        if self.random_patches:
            start = tuple(int(rng.integers(0, max(s - p, 0) + 1)) for s, p in zip(spatial, self.patch))
        else:
            grid = self._grids[i]
            local = np.unravel_index(index - int(self._offsets[i]), [len(a) for a in grid])
            start = tuple(int(a[k]) for a, k in zip(grid, local))
        return i, start

    def __getitem__(self, index):
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(index)
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, self.epoch, index])
        i, start = self._locate(index, rng)
        stats = self.sources[i].stats
        x = self.normalizer.normalize(extract_patch(self._images[i], start, self.patch), stats)
        y = None
        if self.target_mode == "image":
            y = self.normalizer.normalize(extract_patch(self._targets[i], start, self.patch), stats)
        elif self.target_mode == "label":
            y = extract_patch(self._targets[i], start, self.patch)[..., 0]
        if self.augmentor is not None and self.augmentor.enabled:
            x, y = self.augmentor(x, y, rng, y_is_label=self.target_mode == "label")
        x = _tensor(np.moveaxis(x, -1, 0), np.float32)
        if self.target_mode == "same":
            # Masking: the input is its own target, which the workflow takes from x. The target slot holds the
            # sample's index instead (validation masks are drawn from it), where a second copy of x cost every
            # batch a second collate, shared-memory transfer, pinning and GPU copy (13 MB a step for the ViT
            # MAE at 64 x 224^2).
            return x, torch.tensor(index)
        if self.target_mode == "label":
            return x, _tensor(y, np.int64)
        return x, _tensor(np.moveaxis(y, -1, 0), np.float32)

    def label_samples(self):
        """[(label file, its pixels)] of the targets in 'label' mode (a lazily opened one: a bounded sample)."""
        return [(src.target, _sample(labels)) for src, labels in zip(self.sources, self._targets)
                if labels is not None]

    # ------------------------------------------------------------------ whole images
    def image(self, i):
        """Input image `i` as opened: a numpy array, or a lazy one (read region by region) when not in memory.
        `sources[i].stats` normalizes it as its patches are."""
        return self._images[i]
