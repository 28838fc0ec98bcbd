"""Semantic segmentation: the downstream task a pretrained encoder is meant to help."""
import logging
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch

from biapy.data.datasets import is_integer_valued
from biapy.data.io import image_rows_writer, image_shape, image_stem, list_images, tiff_calibration
from biapy.data.normalization import _sample
from biapy.engine import metrics as M
from biapy.engine.losses import build_loss
from biapy.errors import DataError
from biapy.workflows.base import Workflow

log = logging.getLogger(__name__)


PROBABILITIES = "_probabilities"  # the stem suffix of TEST.SAVE_PROBABILITIES' files


class SegmentationWorkflow(Workflow):
    target_mode = "label"

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
            hint = ("; unlabelled pixels? Set LOSS.IGNORE_INDEX to their value. A binary mask saved as 0/255? Save "
                    "it as 0/1" if high == 255 and self.ignore != 255 else "")
            raise DataError(f"{where}: holds class id {high if high >= self.n_classes else low} but "
                            f"MODEL.N_CLASSES is {self.n_classes} (ids must be 0..{self.n_classes - 1}{hint})")

    def prepare_training(self):
        super().prepare_training()
        for ds in (self.train_dataset, self.val_dataset):
            for path, sample in ds.label_samples():
                self._check_ids(path, sample)

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
            for label, image in zip(sources, inputs):
                shape, want = image_shape(label, self.ndim), image_shape(image, self.ndim)[:-1] + (1,)
                if tuple(shape) != tuple(want):
                    raise DataError(f"{label}: label shape {tuple(shape)} does not match its image {image} {want}")
                self._check_label_values(label, self.open_image(label))
        return sources, inputs

    def _check_label_values(self, path, labels):
        """Integer ids in 0..N_CLASSES-1, on a bounded sample of a large (lazily read) label image; the test
        phase checks every slab it scores again."""
        sample = _sample(labels)
        if not is_integer_valued(sample):
            raise DataError(f"{path}: labels must be integer class ids, found non-integer values")
        self._check_ids(path, sample)

    def compute_loss(self, batch, train):
        # Exact on every patch used, on the CPU batch (no device sync): lazily read labels were checked on a
        # sample only when opened.
        where = "a training patch of DATA.TRAIN.GT_PATH" if train else "a validation patch of DATA.VAL.GT_PATH"
        self._check_ids(where, batch[1])
        x, y = self.to_device(batch)
        logits = self.model(x)
        return self.loss_fn(logits, y), (logits, y)

    def batch_metrics(self, batch, outputs):
        logits, y = outputs
        pred = logits.argmax(1)
        out = {}
        n = y.shape[0]
        for name in self.cfg.TRAIN.METRICS:
            fn = M.iou_per_class if name == "iou" else M.dice_per_class
            out[name] = (float(self._foreground_mean(fn(pred, y, self.n_classes, self.ignore))) * n, n)
        return out

    def _foreground_mean(self, per_class):
        """Mean over classes, leaving out PROBLEM.SEMANTIC_SEG.IGNORE_CLASS_ID; NaN (absent) classes skipped."""
        values = torch.as_tensor(per_class, dtype=torch.float64)
        ignore = self.cfg.PROBLEM.SEMANTIC_SEG.IGNORE_CLASS_ID
        if 0 <= ignore < len(values):
            values = torch.cat([values[:ignore], values[ignore + 1:]])
        values = values[~torch.isnan(values)]
        return float(values.mean()) if len(values) else float("nan")

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
                    self._check_label_values(label_source, part)
                    truth = torch.from_numpy(part.astype(np.int64))
                    c = M.intersection_union(pred[None], truth[None], self.n_classes, self.ignore)
                    counts = c if counts is None else tuple(a + b for a, b in zip(counts, c))
        if gt is None:
            return None
        inter, union, sizes = counts
        row = {"file": name}
        for metric in self.cfg.TEST.METRICS:
            per_class = M.iou_from_counts(inter, union) if metric == "iou" else M.dice_from_counts(inter, sizes)
            row[metric] = self._foreground_mean(per_class)
            for c, value in enumerate(per_class):
                row[f"{metric}_class{c}"] = float(value)
        return row

    def metric_table_title(self):
        return "Test segmentation metrics (mean over images)"
