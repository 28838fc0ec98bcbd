"""Semantic segmentation: the downstream task a pretrained encoder is meant to help."""
import logging
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch

from biapy.data.datasets import is_integer_valued
from biapy.data.image_axes import tiff_calibration
from biapy.data.image_writing import image_rows_writer
from biapy.data.io import image_shape, image_stem, list_images
from biapy.data.normalization import pixel_sample
from biapy.engine import metrics as M
from biapy.engine.losses import build_loss
from biapy.errors import DataError
from biapy.utils.transfer import queue_to_device
from biapy.workflows.base import Workflow

log = logging.getLogger(__name__)


PROBABILITIES = "_probabilities"  # the stem suffix of TEST.SAVE_PROBABILITIES' files
FOREGROUND_255 = 255  # the foreground of a binary mask as ImageJ/Fiji saves it (background 0)


class SegmentationWorkflow(Workflow):
    target_mode = "label"
    # The label sets ('training': DATA.TRAIN/VAL.GT_PATH, 'test': DATA.TEST.GT_PATH) of 0/255 binary masks, read as
    # classes 0 and 1 (`_label_set_checked`).
    binary_masks = frozenset()

    def __init__(self, cfg, job, dist, device):
        super().__init__(cfg, job, dist, device)
        self.n_classes = cfg.MODEL.N_CLASSES
        self.ignore = int(cfg.LOSS.IGNORE_INDEX)  # unlabelled pixels: -1 = none
        self.loss_fn = build_loss(cfg)

    def input_target_files(self, split):
        node = self.cfg.DATA[split.upper()]
        key = f"DATA.{split.upper()}"
        images = list_images(node.PATH, f"{key}.PATH")
        if split == "test" and not self.cfg.DATA.TEST.LOAD_GT:
            return images, images
        labels = list_images(node.GT_PATH, f"{key}.GT_PATH")
        by_name = {p.name: p for p in labels}
        missing = [p.name for p in images if p.name not in by_name]
        if missing:
            raise DataError(f"{key}.GT_PATH: no label file for image {missing[0]} in {node.GT_PATH} "
                            "(labels must have the same file names as their images)")
        matched = [by_name[p.name] for p in images]
        return (matched, images) if split == "test" else (images, matched)

    def _check_ids(self, where, labels):
        """A class id outside [0, N_CLASSES) (other than LOSS.IGNORE_INDEX) would stop the loss with an index
        error (a device assert on GPU), or, at test, drop those pixels from the scores without a word."""
        values = (labels[labels != self.ignore] if self.ignore >= 0 else labels).reshape(-1)  # numpy or torch
        if len(values) == 0:
            return
        low, high = int(values.min()), int(values.max())
        if low < 0 or high >= self.n_classes:
            hint = ""
            if high == FOREGROUND_255:  # (IGNORE_INDEX 255 left it out above)
                hint = ("; unlabelled pixels? Set LOSS.IGNORE_INDEX to their value. A 0/255 binary mask reads as 0/1 "
                        + ("only when it holds no other value" if self._reads_255_as_foreground() else
                           "unless LOSS.IGNORE_INDEX is 1"))
            raise DataError(f"{where}: holds class id {high if high >= self.n_classes else low} but "
                            f"MODEL.N_CLASSES is {self.n_classes} (ids must be 0..{self.n_classes - 1}{hint})")

    def _reads_255_as_foreground(self):
        """Whether a label file of 0 and 255 alone may read as classes 0 and 1, as BiaPy reads it. Not when 255 is a
        class id (MODEL.N_CLASSES above 255), nor when LOSS.IGNORE_INDEX is 255, which takes precedence (255 then
        marks unlabelled pixels, as the user said), or 1 (the foreground would be ignored)."""
        return self.n_classes <= FOREGROUND_255 and self.ignore not in (1, FOREGROUND_255)

    def _label_kind(self, path, sample):
        """'0/255' (a binary mask to read as 0/1), 'ids' (class ids besides 0, checked) or 'background' (0 and
        IGNORE_INDEX alone: either) of a label file from its sample."""
        labelled = sample[(sample != 0) & (sample != self.ignore)] if self.ignore >= 0 else sample[sample != 0]
        if labelled.size and self._reads_255_as_foreground() and labelled.min() == labelled.max() == FOREGROUND_255:
            return "0/255"
        self._check_ids(path, sample)
        return "ids" if labelled.size else "background"

    def _label_set_checked(self, label_set, key, samples):
        """Check the (label file, its sample) pairs of a label set and decide how it reads: its 0/255 binary masks
        as classes 0 and 1 (one log line), unless another file of the set holds class ids (refused: a patch does
        not say which file it comes from, so the set is read one way, as BiaPy decides per dataset; BiaPy would
        divide the 0/1 files by 255 too). A file of 0, 1 and 255 is no binary mask: 255 is refused as a class id."""
        first, counts, holds_255 = {}, {"0/255": 0, "ids": 0, "background": 0}, False
        for path, sample in samples:
            kind = self._label_kind(path, sample)
            first.setdefault(kind, path)
            counts[kind] += 1
            holds_255 = holds_255 or (kind == "background" and bool((sample == FOREGROUND_255).any()))
        if counts["0/255"] and counts["ids"]:
            raise DataError(f"{key}: {Path(first['0/255']).name} is a binary mask of 0 and 255 but "
                            f"{Path(first['ids']).name} holds other class ids; save every label file alike (class "
                            "ids, or 0/255 binary masks, which read as 0 and 1)")
        if counts["0/255"]:
            log.info("%s: %d of %d label files are binary masks of 0 and 255, read as classes 0 and 1", key,
                     counts["0/255"], sum(counts.values()))
            self.binary_masks = self.binary_masks | {label_set}
        else:
            self.binary_masks = self.binary_masks - {label_set}
            if holds_255 and not counts["ids"] and self.ignore == FOREGROUND_255:
                log.warning("%s: the label files hold 0 and 255 alone and LOSS.IGNORE_INDEX is 255, so 255 marks "
                            "unlabelled pixels and every labelled one is class 0; for 0/255 binary masks (255 the "
                            "foreground) set LOSS.IGNORE_INDEX -1", key)

    def _class_ids(self, where, labels, label_set):
        """The class ids of a patch or slab of labels (an int64 tensor) of `label_set`, checked: a 0/255 binary
        mask's 255 as 1. Each one is checked whole: a lazily read file's was decided on a sample."""
        if label_set in self.binary_masks:
            stray = (labels != 0) & (labels != FOREGROUND_255)
            if self.ignore >= 0:
                stray &= labels != self.ignore
            if stray.any():
                also = f" and LOSS.IGNORE_INDEX {self.ignore}" if self.ignore >= 0 else ""
                raise DataError(f"{where}: holds value {int(labels[stray][0])} but its label files are binary masks "
                                f"of 0 and 255 (read as classes 0 and 1), expected 0 and 255{also} alone")
            labels = torch.where(labels == FOREGROUND_255, 1, labels)
        self._check_ids(where, labels)
        return labels

    def prepare_training(self):
        super().prepare_training()
        key = "DATA.TRAIN.GT_PATH" if self.cfg.DATA.VAL.FROM_TRAIN else "DATA.TRAIN.GT_PATH and DATA.VAL.GT_PATH"
        self._label_set_checked("training", key, (pair for ds in (self.train_dataset, self.val_dataset)
                                                   for pair in ds.label_samples()))

    def check_test_inputs(self):
        """Test labels too: one channel and their image's size, read from the headers before training."""
        sources, inputs = super().check_test_inputs()
        if self.cfg.TEST.SAVE_PROBABILITIES:  # 'x_probabilities.tif' is also where x's probabilities go
            stems = {image_stem(p): p for p in sources}
            for stem, path in stems.items():
                if f"{stem}{PROBABILITIES}" in stems:
                    raise DataError(f"DATA.TEST.PATH: the probabilities of {Path(path).name} (TEST.SAVE_PROBABILITIES) "
                                    f"would replace the output of {Path(stems[stem + PROBABILITIES]).name}; rename "
                                    "one of them")
        if self.cfg.DATA.TEST.LOAD_GT:
            self._label_set_checked("test", "DATA.TEST.GT_PATH", self._test_label_samples(sources, inputs))
        return sources, inputs

    def _test_label_samples(self, sources, inputs):
        """(label file, a bounded sample of its integer values) of each test label file, its shape checked."""
        for label, image in zip(sources, inputs):
            shape, want = image_shape(label, self.ndim), image_shape(image, self.ndim)[:-1] + (1,)
            if tuple(shape) != tuple(want):
                raise DataError(f"{label}: label shape {tuple(shape)} does not match its image {image} {want}")
            sample = pixel_sample(self.open_image(label))
            self._check_integer_valued(label, sample)
            yield label, sample

    @staticmethod
    def _check_integer_valued(path, labels):
        if not is_integer_valued(labels):
            raise DataError(f"{path}: labels must be integer class ids, found non-integer values")

    def compute_loss(self, batch, train):
        # Exact on every patch used, on the CPU batch (no device sync): lazily read labels were checked on a
        # sample only when opened.
        where = "a training patch of DATA.TRAIN.GT_PATH" if train else "a validation patch of DATA.VAL.GT_PATH"
        labels = self._class_ids(where, batch[1], "training")
        x = batch[0].to(self.device, non_blocking=True)
        # Through pinned memory: a 0/255 mask's class ids are a new tensor in ordinary memory, and a copy from there
        # to a GPU waits for the work queued before it, every step.
        y = queue_to_device(labels, self.device)
        logits = self.model(x)
        return self.loss_fn(logits, y), (logits, y)

    def batch_metrics(self, batch, outputs):
        logits, y = outputs
        pred = logits.argmax(1)
        out = {}
        n = y.shape[0]
        for name in self.cfg.TRAIN.METRICS:
            fn = M.iou_per_class if name == "iou" else M.dice_per_class
            mean = self._foreground_mean(fn(pred, y, self.n_classes, self.ignore))
            out[name] = M.scored_mean(mean, n, ~torch.isnan(mean))  # NaN: no class to score in this batch
        return out

    def _foreground_mean(self, per_class):
        """Mean over classes, leaving out PROBLEM.SEMANTIC_SEG.IGNORE_CLASS_ID; NaN (absent) classes skipped, NaN
        when none is left. A float64 scalar tensor where `per_class` is."""
        values = torch.as_tensor(per_class, dtype=torch.float64)
        ignore = self.cfg.PROBLEM.SEMANTIC_SEG.IGNORE_CLASS_ID
        if 0 <= ignore < len(values):
            values = torch.cat([values[:ignore], values[ignore + 1:]])
        present = ~torch.isnan(values)
        return torch.where(present, values, 0.0).sum() / present.sum()  # 0 / 0: NaN

    def predict_patches(self, batch):
        return torch.softmax(self.model(batch).float(), dim=1)

    def finish_prediction(self, label_source, image, stats, slabs):
        spatial = tuple(image.shape[:-1])
        # `label_source` is the label file when ground truth is loaded, else the image itself.
        name = Path(label_source).name
        gt = self.open_image(label_source) if self.cfg.DATA.TEST.LOAD_GT else None  # shape: check_test_inputs
        # The test image (its label file has its name): the mask and probabilities keep its calibration.
        calibration = tiff_calibration(Path(self.cfg.DATA.TEST.PATH) / name)
        counts = None  # per-class (intersection, union, sizes), summed over the slabs
        with ExitStack() as outputs:  # the mask and probabilities written slab by slab, never whole
            labels = outputs.enter_context(image_rows_writer(
                self.per_image / name, spatial + (1,), np.uint8 if self.n_classes < 256 else np.uint16, self.ndim,
                calibration))
            probabilities = None
            if self.cfg.TEST.SAVE_PROBABILITIES:
                probabilities = outputs.enter_context(image_rows_writer(
                    self.per_image / f"{image_stem(name)}{PROBABILITIES}.tif", spatial + (self.n_classes,), np.float32,
                    self.ndim, calibration))
            for row0, slab in slabs:
                probs = slab.float().cpu()
                pred = probs.argmax(0)
                labels.write(pred.numpy()[..., None])
                if probabilities is not None:
                    probabilities.write(np.moveaxis(probs.numpy(), 0, -1))
                if gt is not None:
                    part = np.asarray(gt[row0:row0 + pred.shape[0]])[..., 0]
                    self._check_integer_valued(label_source, part)
                    truth = self._class_ids(label_source, torch.from_numpy(part.astype(np.int64)), "test")
                    c = M.intersection_union(pred[None], truth[None], self.n_classes, self.ignore)
                    counts = c if counts is None else tuple(a + b for a, b in zip(counts, c))
        if gt is None:
            return None
        inter, union, sizes = counts
        row = {"file": name}
        for metric in self.cfg.TEST.METRICS:
            per_class = M.iou_from_counts(inter, union) if metric == "iou" else M.dice_from_counts(inter, sizes)
            row[metric] = float(self._foreground_mean(per_class))
            for c, value in enumerate(per_class):
                row[f"{metric}_class{c}"] = float(value)
        return row

    def metric_table_title(self):
        return "Test segmentation metrics (mean over images)"
