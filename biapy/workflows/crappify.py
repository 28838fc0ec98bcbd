"""Crappify pretext task: learn to restore images degraded by noise and down/up-sampling."""
import logging
from pathlib import Path

import numpy as np

from biapy.data.crappify import prepare_ssl_source
from biapy.data.image_axes import tiff_calibration
from biapy.data.io import list_images
from biapy.engine.distributed import main_first
from biapy.engine.losses import build_loss
from biapy.errors import DataError
from biapy.workflows.base import Workflow
from biapy.workflows.scoring import image_scores

log = logging.getLogger(__name__)


class CrappifyWorkflow(Workflow):
    target_mode = "image"
    # The degraded input is scored too, so users see what the model gained.
    table_groups = {"restored": "", "degraded input": "input_"}

    def __init__(self, cfg, job, dist, device):
        super().__init__(cfg, job, dist, device)
        self.loss_fn = build_loss(cfg)

    def input_target_files(self, split):
        """Degraded copies (built once, rebuilt when parameters or sources change) and the originals."""
        node = self.cfg.DATA[split.upper()]
        key = f"DATA.{split.upper()}.PATH"
        originals = list_images(node.PATH, key)
        if split != "train":  # before any degraded copy is made (prepare_training checked the training images)
            self._check_channels(originals, key)
        ssl = self.cfg.PROBLEM.SELF_SUPERVISED
        copies = Path(node.SSL_SOURCE_DIR)
        with main_first(self.dist):
            try:
                degraded = prepare_ssl_source(originals, copies, ssl.NOISE, ssl.RESIZING_FACTOR, self.ndim,
                                              self.cfg.SYSTEM.SEED, key)
            except OSError as err:
                if not (err.filename and Path(err.filename).is_relative_to(copies)):
                    raise  # not the copy folder (a source image, say): its own message
                raise DataError(f"DATA.{split.upper()}.SSL_SOURCE_DIR: cannot write the degraded copies in {copies} "
                                f"({err.strerror or err}); expected a writable folder (by default it is the image "
                                "folder's name + '_ssl_source', beside it)") from None
        if split == "test":
            return originals, degraded
        return degraded, originals

    def compute_loss(self, batch, train):
        x, y = self.to_device(batch)
        pred = self.model(x)
        return self.loss_fn(pred, y), (pred, y)

    def batch_metrics(self, batch, outputs):
        from biapy.workflows.scoring import batch_image_metrics
        pred, y = outputs
        return batch_image_metrics(pred, y, self.cfg.TRAIN.METRICS)

    def finish_prediction(self, source, degraded, stats, slabs):
        restored = (self.normalizer.denormalize(np.moveaxis(slab.float().cpu().numpy(), 0, -1), stats)
                    for _, slab in slabs)
        shape = tuple(degraded.shape[:-1]) + (self.channels,)
        written = self.write_slabs(self.per_image / Path(source).name, restored, shape, np.float32,
                                   tiff_calibration(source))
        if not self.cfg.DATA.TEST.LOAD_GT:
            return None
        # Scored from the files, in float32 a slab at a time for 3D images (image_scores).
        original, restored = self.open_image(source), self.open_image(written)
        row = {"file": Path(source).name}
        row.update(image_scores(restored, original, self.cfg.TEST.METRICS, self.ndim))
        row.update(image_scores(degraded, original, self.cfg.TEST.METRICS, self.ndim, prefix="input_"))
        return row

    def metric_table_title(self):
        return "Test metrics against the original images (mean)"
