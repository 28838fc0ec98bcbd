"""Patch datasets for training and validation, and the shared-memory arrays that carry their in-memory pixels to
DataLoader workers (the train/validation split they are made from is `biapy.data.splits`).

A `PatchDataset` keeps each image's raw pixels (in memory) or only its file layout (lazy,
`in_memory=False`: each item reads just its patch from disk) plus per-image normalization
statistics measured once at construction. An item is cut, normalized by the image's affine map
and augmented; everything random about it comes from a numpy Generator seeded by
(seed, epoch, index), so an item is the same in any worker, in memory or lazy, and in a resumed run.

The epoch lives in a shared-memory tensor: `set_epoch` in the main process reaches persistent
DataLoader workers too. Per-image tables are numpy arrays fixed at construction (nothing grows).

In-memory pixels reach DataLoader workers without a copy each: forked workers share them copy-on-write, and a
worker started by spawn (macOS, Windows) or forkserver (Linux from Python 3.14), which gets the dataset pickled,
maps them from shared memory (`SharedArrays`) where it had unpickled a whole copy of every image of its own.

An item may stand for a band of its image (`Band` of `biapy.data.splits`: rows lo..hi-1 of one spatial axis): the
dataset then sees that band as the whole image (its shape, statistics, patch starts and reflections), so none of
its patches reads a pixel outside it.
"""
import logging
import multiprocessing.context
import operator
import os
from collections import namedtuple

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from biapy.data.io import check_finite, open_image_lazy, read_image
from biapy.data.lazy_images import full_key
from biapy.data.normalization import pixel_sample
from biapy.data.patches import axis_starts, extract_patch
from biapy.errors import DataError

log = logging.getLogger(__name__)

TARGET_MODES = ("same", "image", "label")

# One record per image: `path` (input file), `target` (its target file or None), `shape` (spatial..., c),
# `stats` (the normalizer's statistics of the input image, used for input and 'image' target), `band` (the `Band`
# of the files that is the image here, or None: all of it); `shape` and `stats` are the band's.
Source = namedtuple("Source", "path target shape stats band", defaults=(None,))


def is_integer_valued(arr):
    if np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_:
        return True
    return bool(np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)))


def _tensor(a, dtype):
    """A C-ordered tensor of `a`. A flip along a length-1 axis (ZFLIP of a one-slice patch) leaves a negative
    stride that numpy still counts as contiguous, so it makes no copy, and torch refuses it."""
    a = np.ascontiguousarray(a, dtype=dtype)
    return torch.from_numpy(a.copy() if any(s < 0 for s in a.strides) else a)


def banded(img, band):
    """The `band` of a channel-last image (numpy or lazy): the image itself when `band` is None. A numpy image's
    band is a copy (a view would keep the whole image alive, in the training and the validation dataset both);
    a lazy one's is a `_BandView`, still read region by region."""
    if band is None:
        return img
    if isinstance(img, np.ndarray):
        return img[(slice(None),) * band.axis + (slice(band.lo, band.hi),)].copy()
    return _BandView(img, band)


class _BandView:
    """Rows lo..hi-1 along one spatial axis of a lazily read image (`LazyTiff`, `LazyStore`), sliced as an image
    of its own: keys are shifted into the band, so only the regions asked for are read."""

    def __init__(self, img, band):
        self._img, self.band = img, band
        shape = list(img.shape)
        shape[band.axis] = band.hi - band.lo
        self.shape, self.dtype = tuple(shape), img.dtype

    @property
    def ndim(self):
        return len(self.shape)

    def __getitem__(self, key):
        key = list(full_key(key, len(self.shape)))
        axis, n, lo = self.band.axis, self.shape[self.band.axis], self.band.lo
        k = key[axis]
        if isinstance(k, slice):
            start, stop, step = k.indices(n)
            if step < 0:
                raise TypeError(f"{type(self).__name__} takes increasing slices only, got {k!r}")
            key[axis] = slice(lo + start, lo + max(start, stop), step)
        else:
            i = operator.index(k)
            if not -n <= i < n:
                raise IndexError(f"index {i} out of a band of {n} rows")
            key[axis] = lo + i % n
        return self._img[tuple(key)]


# Where the shared-memory buffer of `SharedArrays` lives on Linux: a tmpfs that Docker makes 64 MB by default,
# where a buffer larger than its free space would end the process with SIGBUS as its pages are written.
SHM_DIR = "/dev/shm"
SHM_SPARE = 1 << 28  # left free there for the workers' batches, which travel through it too (at most half of it)


class SharedArrays:
    """numpy arrays (None and non-array entries kept as they are) copied into one shared-memory buffer, each now a
    numpy view of it. Pickled for a process being started (multiprocessing's pickler: torch's reductions), the
    buffer travels as a handle that the child maps, not as its bytes. An array of Python objects cannot live in
    raw bytes: it stays as it is (`layouts` None), pickled whole.

    One buffer for all, where a tensor each would hold a file descriptor per image in every process (thousands of
    2D images exceed the open-file limit). Torch's default Linux strategy unlinks the segment as it is made, and
    its 'file_system' one (macOS's) has its manager remove it once no process holds it: nothing is left in
    /dev/shm when the job ends, fails or is killed."""

    ALIGN = 64

    def __init__(self, lists):
        layouts, total = [], 0
        for arrays in lists:
            layout = []
            for a in arrays:
                if _shareable(a):
                    total = -(-total // self.ALIGN) * self.ALIGN
                    # The dtype itself, not its .str: a structured dtype's string ('|V5') loses its fields.
                    layout.append((a.dtype, tuple(a.shape), total))
                    total += a.nbytes
                else:
                    layout.append(None)
            layouts.append(layout)
        self.layouts, self.nbytes = layouts, total
        self.buffer = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(max(total, 1)))
        for arrays, views in zip(lists, self.views()):
            for i, view in enumerate(views):
                if view is not None:
                    view[...] = arrays[i]
                    arrays[i] = view  # the original is freed here, one image at a time: no second copy at once

    def views(self):
        """Per list, its arrays as numpy views of the buffer (None where an entry was not shared)."""
        base = self.buffer.numpy()
        return [[None if entry is None else
                 base[entry[2]:entry[2] + _nbytes(entry)].view(entry[0]).reshape(entry[1])
                 for entry in layout] for layout in self.layouts]

    def without_shared(self, lists):
        """`lists` with None in place of each shared entry: what still travels by value."""
        return [[None if entry is not None else a for a, entry in zip(arrays, layout)]
                for arrays, layout in zip(lists, self.layouts)]


def _shareable(a):
    return isinstance(a, np.ndarray) and not a.dtype.hasobject


def _nbytes(entry):
    dtype, shape, _ = entry
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def _array_bytes(lists):
    return sum(a.nbytes for arrays in lists for a in arrays if _shareable(a))


def _shm_free():
    """Free bytes of the shared-memory filesystem, None where there is none to ask (not Linux)."""
    if not os.path.isdir(SHM_DIR):
        return None
    st = os.statvfs(SHM_DIR)
    return st.f_bavail * st.f_frsize


def _shm_room(nbytes):
    """Whether `nbytes` fit the shared-memory filesystem's free space with a spare left for batches: SHM_SPARE,
    or half of it where it is small (Docker's 64 MB, where a spare larger than all of it refused every dataset)."""
    free = _shm_free()
    if free is None:
        return True
    return nbytes + min(SHM_SPARE, free // 2) <= free


def being_sent_to_new_process():
    """Whether an object is being pickled for a process being started (spawn, forkserver): its
    pickler then takes torch's shared-memory handles. A forked worker pickles nothing."""
    return multiprocessing.context.get_spawning_popen() is not None


class PatchDataset(Dataset):
    """Patches of `inputs` (and `targets`); `regions`: one `Band` or None (the whole image) per input, its target
    cut the same way."""

    def __init__(self, inputs, targets, ndim, patch, normalizer, target_mode, in_memory=True,
                 random_patches=True, patches_per_image=-1, overlap=None, padding=None, augmentor=None,
                 seed=0, reflect_to_complete=True, progress=None, regions=None):
        if target_mode not in TARGET_MODES:
            raise ValueError(f"target_mode must be one of {TARGET_MODES}, not {target_mode!r}")
        inputs = list(inputs)
        targets = list(targets) if targets is not None and target_mode != "same" else [None] * len(inputs)
        if len(targets) != len(inputs):
            raise DataError(f"{len(inputs)} input images but {len(targets)} targets")
        regions = list(regions) if regions is not None else [None] * len(inputs)
        if len(regions) != len(inputs):
            raise ValueError(f"{len(inputs)} input images but {len(regions)} regions")
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
        self._shared = None  # the `SharedArrays` of the in-memory pixels once a worker needed them; False: refused
        self._images, self._targets, sources, counts, grids = [], [], [], [], []
        pairs = zip(inputs, targets, regions)
        if progress:  # a bar labelled so, on a terminal: thousands of images take a while to read and measure
            pairs = tqdm(pairs, total=len(inputs), desc=progress, unit="image", disable=None, leave=False)
        for path, target, band in pairs:
            img = read_image(path, ndim) if self.in_memory else open_image_lazy(path, ndim)
            # The target first: a degraded input is made from it, and its name is the one the user knows.
            target_data = self._open_target(target, img, path) if target is not None else None
            # From here on the band is the image: its statistics, its patches, reflected at its own borders.
            img, target_data = banded(img, band), banded(target_data, band) if target_data is not None else None
            sample = pixel_sample(img)
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
            sources.append(Source(path, target, tuple(img.shape), stats, band))
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
            if not is_integer_valued(pixel_sample(data)):
                raise DataError(f"{target}: labels must be integer class ids, found non-integer values")
        else:
            if tuple(data.shape) != tuple(img.shape):
                raise DataError(f"{target}: shape {tuple(data.shape)} differs from its input {path} {tuple(img.shape)}")
            check_finite(pixel_sample(data), target)
        return data

    # ------------------------------------------------------------------ pickling (worker processes)
    def __getstate__(self):
        shared = being_sent_to_new_process() and self._share_arrays()
        state = self.__dict__.copy()
        if shared:
            # The pixels go as the buffer's handle; the worker rebuilds its views of them (`__setstate__`).
            state["_images"], state["_targets"] = self._shared.without_shared((self._images, self._targets))
        else:
            state["_shared"] = None  # a plain pickle carries the pixels themselves
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        if self._shared:
            for arrays, views in zip((self._images, self._targets), self._shared.views()):
                for i, view in enumerate(views):
                    if view is not None:
                        arrays[i] = view

    def _share_arrays(self):
        """Move the in-memory pixels into shared memory, once (later workers map the same buffer); False where
        they stay where they are (none, no room in /dev/shm, or no shared memory here): each worker then
        unpickles a copy, as before."""
        if self._shared is not None:
            return bool(self._shared)
        self._shared = False  # said once, not again for every worker
        lists = (self._images, self._targets)
        nbytes = _array_bytes(lists)
        if nbytes == 0:
            return False
        if not _shm_room(nbytes):
            log.warning("%.0f MB of in-memory images do not fit the free space of %s (%.0f MB free, part of it kept "
                        "for batches): each data-loading worker holds a copy of them instead (a container's "
                        "--shm-size can make room)", nbytes / 1e6, SHM_DIR, (_shm_free() or 0) / 1e6)
            return False
        try:
            self._shared = SharedArrays(lists)
        except (RuntimeError, OSError) as exc:
            log.warning("in-memory images could not be put in shared memory (%s): each data-loading worker holds "
                        "a copy of them", exc)
            return False
        return True

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
        return [(src.target, pixel_sample(labels)) for src, labels in zip(self.sources, self._targets)
                if labels is not None]

    # ------------------------------------------------------------------ whole images
    def image(self, i):
        """Input image `i` as opened (its band, where `sources[i].band` names one): a numpy array, or a lazy one
        (read region by region) when not in memory. `sources[i].stats` normalizes it as its patches are."""
        return self._images[i]
