"""The workflow base: what every problem shares (data splits, loaders, training, whole-image test).

A subclass says what the network sees and learns (`input_target_files`, `compute_loss`,
`predict_patches`) and how a whole prediction is turned into a saved file and scores
(`finish_prediction`). The training loop itself lives in `biapy.engine.trainer`.
"""
import logging
import shutil
from abc import ABC, abstractmethod
from functools import partial
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from biapy.config import ndim_of
from biapy.data.augmentation import Augmentor
from biapy.data.datasets import PatchDataset, banded
from biapy.data.image_writing import image_rows_writer, write_image
from biapy.data.io import (MANY_CHANNELS, NO_AXES, check_computable, check_consistent_channels, check_unique_stems,
                           image_shape, list_images, open_image_lazy, open_image_rows, read_image)
from biapy.data.normalization import Normalizer
from biapy.data.patches import assemble, predict_augmented, predict_full, predict_slabs
from biapy.data.splits import describe_bands, shared_files, split_names, split_record, validation_split
from biapy.engine.distributed import barrier
from biapy.engine.loaders import make_loader
from biapy.engine.precision import autocast, resolve_amp
from biapy.errors import DataError, named_few
from biapy.models import build_model, required_divisor
from biapy.models.layout import apply_layout
from biapy.utils.files import replace_folder
from biapy.utils.transfer import queue_to_device
from biapy.workflows.report import gather_rows, print_metrics_table, write_metrics_csv

log = logging.getLogger(__name__)


class Workflow(ABC):
    target_mode = "image"  # PatchDataset target: 'image', 'same' or 'label'
    table_groups = None  # rows of the printed test table: {label: column prefix}
    test_amp = None  # autocast dtype of test inference (TRAIN.AMP) or None; set by __init__

    def __init__(self, cfg, job, dist, device):
        self.cfg, self.job, self.dist, self.device = cfg, job, dist, device
        self.ndim = ndim_of(cfg)
        self.patch = tuple(cfg.DATA.PATCH_SIZE[:-1])
        self.channels = cfg.DATA.PATCH_SIZE[-1]
        self.normalizer = Normalizer.from_cfg(cfg)
        torch.manual_seed(cfg.SYSTEM.SEED)  # the model starts identical on every rank
        self.model = apply_layout(build_model(cfg).to(device), cfg)
        self.train_loader = self.val_loader = None
        self.train_dataset = self.val_dataset = None
        self.on_ready = None  # called once by `ready()` (the runner's config copies, on a re-run)
        self._aug_samples_due = False  # set by run(), written by ready(): a refused run writes none
        self.per_image = job.per_image  # where test outputs go; a staging folder while the test phase runs
        self.test_amp = resolve_amp(cfg.TRAIN.AMP, torch.device(device), warn=False)[0]  # the trainer warns

    # ---------------------------------------------------------------- data
    def input_target_files(self, split):
        """(inputs, targets) file lists of 'train', 'val' (when not from train) or 'test'."""
        key = f"DATA.{split.upper()}.PATH"
        files = list_images(self.cfg.DATA[split.upper()].PATH, key)
        return files, files

    def _check_channels(self, files, key):
        found = check_consistent_channels(files, self.ndim, key)
        if found != self.channels:
            patch = tuple(self.cfg.DATA.PATCH_SIZE)
            if found > MANY_CHANNELS:  # most likely a file without axis names whose last axis is not channels
                raise DataError(f"{files[0]}: reads as {found} channels, where DATA.PATCH_SIZE {patch} asks for "
                                f"{self.channels}. {NO_AXES[0].upper()}{NO_AXES[1:]}; if it has {found} channels, set "
                                f"DATA.PATCH_SIZE's last value to {found}")
            if key != "DATA.TRAIN.PATH":  # the model's channels are fixed by its training: these images are off
                trained = " and the training images" if self.cfg.TRAIN.ENABLE else ""
                raise DataError(f"{files[0]}: has {found} channel(s) but DATA.PATCH_SIZE {patch}{trained} have "
                                f"{self.channels}; expected {key} images of {self.channels} channel(s)")
            raise DataError(f"{files[0]}: has {found} channel(s) but DATA.PATCH_SIZE {patch} asks for {self.channels}; "
                            f"set its last value to {found}")

    def _check_patch_fits_images(self, files, key):
        """Stop when every training image is smaller than the patch along an axis: each patch would be mostly
        padding, which is a mistake (e.g. 2D images with PROBLEM.NDIM 3D), not data worth learning from."""
        shapes = [image_shape(f, self.ndim)[:-1] for f in files]
        for axis, (name, size) in enumerate(zip("zyx"[-self.ndim:], self.patch)):
            biggest = max(range(len(files)), key=lambda i: shapes[i][axis])
            if shapes[biggest][axis] < size:
                hint = " (2D images while PROBLEM.NDIM is 3D?)" if name == "z" and shapes[biggest][axis] == 1 else ""
                raise DataError(f"{key}: every image is smaller than DATA.PATCH_SIZE {self.patch} along {name}; the "
                                f"largest, {files[biggest]}, has {shapes[biggest][axis]}{hint}. Use a smaller patch")

    def _dataset(self, inputs, targets, split, augment, regions=None):
        d = self.cfg.DATA
        node = d.TRAIN if split == "train" else d.VAL
        random_patches = d.TRAIN.EXTRACT_RANDOM_PATCH if split == "train" else False
        return PatchDataset(
            inputs, targets, self.ndim, self.patch, self.normalizer, self.target_mode,
            in_memory=node.IN_MEMORY, random_patches=random_patches,
            patches_per_image=d.TRAIN.PATCHES_PER_IMAGE if split == "train" else -1,
            overlap=tuple(node.OVERLAP), padding=tuple(node.PADDING),
            augmentor=Augmentor(self.cfg.AUGMENTOR, self.ndim) if augment else None,
            seed=self.cfg.SYSTEM.SEED + self.dist.rank, reflect_to_complete=d.REFLECT_TO_COMPLETE_SHAPE,
            progress=f"Reading {split} images" if self.dist.is_main else None, regions=regions)

    def prepare_training(self):
        cfg = self.cfg
        # The files the user gave, checked before anything is made from them (crappify's degraded copies: a
        # refused run has not spent minutes degrading a large dataset, and the error names the user's file).
        given = list_images(cfg.DATA.TRAIN.PATH, "DATA.TRAIN.PATH")
        self._check_channels(given, "DATA.TRAIN.PATH")
        self._check_patch_fits_images(given, "DATA.TRAIN.PATH")
        # The split of the user's files (in the order of `inputs`), refused here when there are too few of them
        # (or, for a single image cut into a training and a validation band, when it is too short).
        split = validation_split(cfg, given) if cfg.DATA.VAL.FROM_TRAIN else None
        if split is None:
            shared = shared_files(given, list_images(cfg.DATA.VAL.PATH, "DATA.VAL.PATH"))
            if shared:  # validation on training images measures memory, not generalization
                log.warning("DATA.VAL.PATH: %d validation image(s) are also training images (%s); the validation "
                            "loss will not show overfitting", len(shared), named_few(shared))
        inputs, targets = self.input_target_files("train")
        regions = val_regions = None  # one Band per image (input and target cut alike), or whole images
        if split is not None:
            val_inputs, val_targets = [inputs[i] for i in split.val], [targets[i] for i in split.val]
            inputs, targets = [inputs[i] for i in split.train], [targets[i] for i in split.train]
            val_names = split_names(given, split, self.ndim)
            if split.bands is not None:  # one image: a band at its end validates, the rows before it train
                regions, val_regions = [split.bands[0]], [split.bands[1]]
        else:
            val_inputs, val_targets = self.input_target_files("val")
            self._check_channels(val_inputs, "DATA.VAL.PATH")
            val_names = val_targets if self.target_mode == "image" else val_inputs  # crappify: the originals
        self.val_split = split_record([Path(p).name for p in val_names])  # checkpoints keep it (resume)
        if val_regions is not None:
            log.info("%s", describe_bands(given[0], split.bands, self.ndim))
        else:
            log.info("Validation images: %s", named_few(val_names))
        if cfg.DATA.NORMALIZATION.TYPE == "custom":
            self._fit_custom_normalization(targets if self.target_mode == "image" else inputs, regions)
        self.train_dataset = self._dataset(inputs, targets, "train", cfg.AUGMENTOR.ENABLE, regions)
        self.val_dataset = self._dataset(val_inputs, val_targets, "val", False, val_regions)
        n_train = len(self.train_dataset)
        needed = cfg.TRAIN.BATCH_SIZE * self.dist.world_size  # each process takes a whole batch per step
        if n_train < needed:
            batches = (f"{cfg.TRAIN.BATCH_SIZE} x {self.dist.world_size} processes = {needed}"
                       if self.dist.world_size > 1 else str(needed))
            raise DataError(f"TRAIN.BATCH_SIZE: {batches} is larger than the {n_train} training "
                            f"patches per epoch ({len(inputs)} image(s)); lower it or add images")
        common = {"dist": self.dist, "num_workers": cfg.SYSTEM.NUM_WORKERS, "seed": cfg.SYSTEM.SEED,
                  "pin_memory": bool(cfg.SYSTEM.PIN_MEM) and str(self.device).startswith("cuda")}
        batch = cfg.TRAIN.BATCH_SIZE
        self.train_loader = make_loader(self.train_dataset, batch, shuffle=True, drop_last=True, **common)
        # As many persistent workers as training: with the in-memory pixels shared (`SharedArrays`), a worker's own
        # memory is the interpreter and torch (~285 MB spawned, ~10 MB forked, measured), while fewer workers risk a
        # slower validation and non-persistent ones a spawn's seconds every epoch.
        self.val_loader = make_loader(self.val_dataset, batch, shuffle=False, drop_last=False, **common)
        log.info("Data: %d training image(s), %d patches/epoch; %d validation image(s), %d patches",
                 len(inputs), n_train, len(val_inputs), len(self.val_dataset))

    def _fit_custom_normalization(self, files, regions=None):
        """Dataset mean/std from the training images (lazily opened ones measured on a bounded sample, as
        their per-image statistics are; their training band only, where `regions` gives one); saved beside the
        checkpoints for test time."""
        read = read_image if self.cfg.DATA.TRAIN.IN_MEMORY else open_image_lazy
        regions = regions if regions is not None else [None] * len(files)
        self.normalizer.fit(banded(read(f, self.ndim), band) for f, band in zip(files, regions))
        if self.dist.is_main:
            self.normalizer.save(self.job.checkpoint_dir)

    def _write_aug_samples(self):
        ds = self.train_dataset
        count = min(self.cfg.AUGMENTOR.AUG_NUM_SAMPLES, len(ds))
        ds.set_epoch(0)
        for i in range(count):
            x, y = ds[i]
            write_image(self.job.aug / f"aug_{i:03d}_x.tif", _channel_last(x), self.ndim)
            if self.target_mode != "same":
                y = y[None] if y.ndim == self.ndim else y
                y = _channel_last(y)
                if self.target_mode == "label":  # int64 class ids: Fiji opens no 64-bit TIFF
                    y = y.astype(np.uint8 if y.max(initial=0) < 256 else np.uint16)
                write_image(self.job.aug / f"aug_{i:03d}_y.tif", y, self.ndim)

    # ---------------------------------------------------------------- training hooks
    def to_device(self, batch):
        """(images, targets) on the device. In 'same' mode the targets are the batch's sample indices, which stay on
        the host: they seed masking's masks, and read back from a GPU they would wait for it every step."""
        x, y = batch
        if self.target_mode != "same":
            y = y.to(self.device, non_blocking=True)
        return x.to(self.device, non_blocking=True), y

    @abstractmethod
    def compute_loss(self, batch, train):
        """(loss, outputs) of one batch; the trainer sets train/eval mode and autocast."""

    def batch_metrics(self, batch, outputs):
        return {}

    def on_epoch_end(self, epoch, tb, final=False):
        """Extra per-epoch outputs (rank 0; `final` once after training); nothing by default."""

    def checkpoint_extras(self):
        return {"normalization": self.normalizer.state()}

    def restore_extras(self, extras, checkpoint):
        """What `checkpoint_extras` saved, back from the `checkpoint` the test phase loaded. Without training in
        this run, 'custom' normalization takes that checkpoint's mean/std (else the .npy files beside it)."""
        if not self.cfg.TRAIN.ENABLE:
            self.normalizer.load(Path(checkpoint).parent, (extras or {}).get("normalization"), checkpoint)

    # ---------------------------------------------------------------- run
    def run(self):
        from biapy.engine.resume import load_for_test
        from biapy.models.folding import fold_batch_norm

        test_files = None
        if self.cfg.TRAIN.ENABLE:
            from biapy.engine.trainer import Trainer  # its charts import matplotlib (0.65 s) for training only

            self.prepare_training()
            if self.cfg.TEST.ENABLE:
                test_files = self.check_test_inputs()
            # Written once the inputs passed their checks and the checkpoint (if any) was accepted (`ready`): a
            # refused run leaves no folder behind.
            aug = self.cfg.AUGMENTOR
            self._aug_samples_due = self.dist.is_main and aug.ENABLE and aug.AUG_SAMPLES
            Trainer(self).fit()
        if self.cfg.TEST.ENABLE:
            load_for_test(self)
            fold_batch_norm(self.model)  # the test phase only predicts: one pass less per activation
            self.test(test_files)

    def ready(self):
        """The data passed its checks and the run's checkpoint (if any) was accepted: from here on the job
        does its work, so a re-run may now replace what describes the run (`on_ready`, called once)."""
        callback, self.on_ready = self.on_ready, None
        if callback is not None:
            callback()
        if self._aug_samples_due:
            self._aug_samples_due = False
            self._write_aug_samples()

    def check_test_inputs(self):
        """(sources, inputs) of the test phase, listed and their headers read: run before training too, so that
        a bad test folder stops the job then rather than after the last epoch."""
        sources, inputs = self.input_target_files("test")
        check_unique_stems(sources, "DATA.TEST.PATH")
        self._check_channels(inputs, "DATA.TEST.PATH")
        return sources, inputs

    # ---------------------------------------------------------------- test
    def open_image(self, path):
        """A test image or a saved prediction, opened to be read a slab of rows (z slices in 3D) at a time where
        the format allows (`open_image_rows`), else whole."""
        return open_image_rows(path, self.ndim)

    @torch.no_grad()
    def predict_slabs(self, image, stats, path):
        """The network output over a whole channel-last image (numpy or lazy), streamed along its first
        spatial axis: `(row0, slab (C_out, rows, *rest))` in order. The input is read, checked and
        normalized a slab at a time; stitched patches, or one pass with TEST.FULL_IMG; TEST.AUGMENTATION
        averages each forward over flipped/turned views."""
        self.model.eval()
        cfg, t = self.cfg, self.cfg.DATA.TEST
        predict = self.predict_batch
        if cfg.TEST.AUGMENTATION:
            predict = partial(predict_augmented, self.predict_batch)

        def read(lo, hi):
            region = np.asarray(image[lo:hi])
            check_computable(region, f"{path} (rows {lo}..{hi - 1})")
            x = self.normalizer.normalize(region, stats)
            return queue_to_device(torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 0))), self.device)

        spatial = tuple(image.shape[:-1])
        if cfg.TEST.FULL_IMG:
            yield 0, predict_full(read(0, spatial[0]), predict, required_divisor(cfg))
            return
        yield from predict_slabs(read, spatial, predict, self.patch, tuple(t.OVERLAP), tuple(t.PADDING),
                                 cfg.TEST.BATCH_SIZE, self.device)

    def predict_image(self, image, stats, path):
        """The whole network output (C_out, spatial...) of a channel-last image, as one tensor."""
        return assemble(self.predict_slabs(image, stats, path), tuple(image.shape[:-1]), self.device)

    def predict_batch(self, batch):
        """`predict_patches` in the precision training ran in (TRAIN.AMP): bf16 took the 3D U-Net's
        forward 2.7x faster on an AMX CPU; the output is back in float32 before it is blended."""
        with autocast(torch.device(self.device), self.test_amp):
            return self.predict_patches(batch).float()

    def predict_patches(self, batch):
        return self.model(batch)

    def write_slabs(self, path, slabs, shape, dtype, calibration=None):
        """Write channel-last slabs (rows, *rest, C) as one image of `shape`, slab by slab into the file: never
        whole in memory (`image_rows_writer`). `calibration`: the source's (`tiff_calibration`). Returns the path
        written."""
        with image_rows_writer(path, shape, dtype, self.ndim, calibration) as out:
            for slab in slabs:
                out.write(slab)
        return out.path

    def test(self, files=None):
        """Predict, write and score every test image. Outputs go to a staging folder that replaces per_image/
        only when all images succeeded: a failed re-run leaves the run's outputs and metrics as they were.
        `files`: what `check_test_inputs` returned before training, so the checks do not run twice."""
        sources, inputs = files or self.check_test_inputs()
        staging = self.job.results / ".per_image.partial"
        if self.dist.is_main:
            shutil.rmtree(staging, ignore_errors=True)  # left by a killed run
        barrier()
        self.per_image = staging
        try:
            rows = self._test_images(sources, inputs)
        except BaseException:
            if self.dist.is_main:
                shutil.rmtree(staging, ignore_errors=True)
            raise
        finally:
            self.per_image = self.job.per_image
        if self.dist.is_main:
            self.ready()
            staging.mkdir(parents=True, exist_ok=True)  # no output file at all: per_image/ still ends up empty
            replace_folder(staging, self.job.per_image)
            if rows:
                rows.sort(key=lambda r: r["file"])
                write_metrics_csv(self.job.metrics_csv, rows)
                print_metrics_table(rows, self.metric_table_title(), self.table_groups)
        log.info("Test outputs in %s", self.job.per_image)

    def _test_images(self, sources, inputs):
        """This rank's share of the test images predicted and written to `self.per_image`; every rank's rows."""
        cfg = self.cfg
        mine = list(range(self.dist.rank, len(sources), self.dist.world_size))
        rows = []
        # DATA.TEST.IN_MEMORY: every test image of this rank read up front, as BiaPy does, or each when
        # its turn comes (opened lazily where the format allows, and predicted, written and scored a slab at a time).
        loaded = {i: read_image(inputs[i], self.ndim) for i in mine} if cfg.DATA.TEST.IN_MEMORY else {}
        # disable=None: tqdm draws no bar when stderr is not a terminal, so log files stay clean.
        bar = tqdm(mine, desc="Test", unit="image", disable=None if self.dist.is_main else True, leave=False)
        for i in bar:
            image = loaded.pop(i) if i in loaded else self.open_image(inputs[i])
            try:
                stats = self.normalizer.stats(image)
            except DataError as exc:  # e.g. NaN pixels: the message must name the file
                raise DataError(f"{inputs[i]}: {exc}") from None
            row = self.finish_prediction(sources[i], image, stats, self.predict_slabs(image, stats, inputs[i]))
            if row is not None:
                rows.append(row)
        return gather_rows(rows, self.dist)

    def metric_table_title(self):
        return "Test metrics (mean over images)"

    @abstractmethod
    def finish_prediction(self, source, image, stats, slabs):
        """Save the prediction of `source` from the `predict_slabs` stream; return its metrics row (or None)."""


def _channel_last(t):
    a = t.detach().cpu().numpy() if torch.is_tensor(t) else np.asarray(t)
    return np.moveaxis(a, 0, -1)

