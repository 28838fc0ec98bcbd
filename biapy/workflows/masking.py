"""Masking pretext task: hide part of the input and learn to reconstruct it.

Two families share this workflow: the ViT masked autoencoder (`mae`, which masks tokens
itself) and masked CNNs (`unet`/`resunet`, whose input blocks are zeroed here). Both produce
a reconstruction and a mask with the one convention of `biapy.models.masking`: 1 = hidden.
"""
import logging
import math
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch

from biapy.data.image_axes import tiff_calibration
from biapy.data.image_writing import image_rows_writer, write_image
from biapy.data.io import image_stem, list_images
from biapy.data.patches import full_image_input, grid_starts
from biapy.engine.losses import denormalize_tokens, masked_reconstruction_loss
from biapy.engine.metrics import scored_mean
from biapy.models import required_divisor
from biapy.models.masking import block_mask, token_noise
from biapy.workflows.base import Workflow
from biapy.workflows.border_views import BorderViews
from biapy.workflows.scoring import batch_image_metrics, image_scores

log = logging.getLogger(__name__)


# MAE_checks show a larger image as a centred crop of at most this many voxels (1024², 64x128x128): at 16.8 M,
# each check of a 2048² image had taken ~10 s, against an epoch's 1.4-3.6 s.
_CHECK_VOXELS = 1 << 20


def check_region(spatial, patch, budget):
    """The region of an image that MAE_checks show, as slices: all of it up to `budget` voxels, else a
    centred crop, its relatively longest axis (in patches; on ties the longer) halved, never below the
    patch, until it fits."""
    size = list(spatial)
    while int(np.prod(size)) > budget:
        axis = max(range(len(size)), key=lambda i: (size[i] / min(patch[i], spatial[i]), size[i]))
        smaller = max(min(patch[axis], spatial[axis]), size[axis] // 2)
        if smaller == size[axis]:
            break
        size[axis] = smaller
    return tuple(slice((n - s) // 2, (n - s) // 2 + s) for n, s in zip(spatial, size))


def _unique_names(stems):
    """File-name stems made unique (cell.png and cell.tif): a repeated one gets its index, never a name in use."""
    names, used = [], set()
    for i, stem in enumerate(stems):
        name = stem
        if stems.count(stem) > 1:
            name = f"{stem}_{i}"
        while name in used or (name != stem and name in stems):
            name += f"_{i}"
        used.add(name)
        names.append(name)
    return names


class MaskingWorkflow(Workflow):
    target_mode = "same"
    table_groups = {"all pixels": "", "hidden pixels": "hidden_"}
    _border_views = None  # predict_slabs: the inputs of the image it goes over (BorderViews)

    def __init__(self, cfg, job, dist, device):
        super().__init__(cfg, job, dist, device)
        self.is_vit = cfg.MODEL.ARCHITECTURE == "mae"
        ssl = cfg.PROBLEM.SELF_SUPERVISED
        self.token_size = cfg.MODEL.VIT_TOKEN_SIZE if self.is_vit else ssl.MASK_BLOCK_SIZE
        self.ratio = cfg.MODEL.MAE_MASK_RATIO
        self._mask_generator = None  # test masks: set per image by predict_slabs
        self._checked_epoch = None  # the epoch whose MAE_checks were written last

    def input_target_files(self, split):
        files = list_images(self.cfg.DATA[split.upper()].PATH, f"DATA.{split.upper()}.PATH")
        return files, files

    def masked_forward(self, x, generator=None):
        """(reconstruction, mask) of a normalized batch; mask is (B, 1, *spatial), 1 = hidden."""
        if self.is_vit:
            if self.cfg.MODEL.MAE_MASK_TYPE == "grid":
                return self.model(x)
            # Drawn here, outside the model: TRAIN.COMPILE's graph cannot take a generator.
            tokens = math.prod(s // self.token_size for s in x.shape[2:])
            return self.model(x, noise=token_noise(x.shape[0], tokens, generator, x.device))
        mask = block_mask(x.shape[0], tuple(x.shape[2:]), self.token_size, self.ratio, generator, x.device)
        return self.model(x * (1 - mask)), mask

    def validation_generators(self, indices):
        """One CPU generator per validation patch (`indices`: the batch's sample indices, a host tensor), seeded by
        SYSTEM.SEED and the patch's index: the same masks every epoch, whatever the batch size or number of
        processes. With fresh masks, the validation loss had moved with the masks' luck more than with the model,
        and so had the best checkpoint and early stopping."""
        seed = int(self.cfg.SYSTEM.SEED) * 1_000_003
        return [torch.Generator().manual_seed((seed + int(i)) % 2 ** 63) for i in indices.tolist()]

    def training_generator(self, indices, device):
        """The training masks of one batch: a generator seeded by SYSTEM.SEED, the epoch and the batch's first
        sample (each sample is in one batch of one process per epoch). From the global RNG, seeded alike on
        every process for identical starting weights, every process had drawn the same masks; and these are
        the same again when an interrupted run resumes at that step."""
        state = np.random.SeedSequence([int(self.cfg.SYSTEM.SEED), self.train_dataset.epoch, int(indices[0])])
        return torch.Generator(device).manual_seed(int(state.generate_state(1, np.uint64)[0]) >> 1)

    def compute_loss(self, batch, train):
        x, indices = self.to_device(batch)  # 'same' mode: the sample indices, on the host
        generator = self.training_generator(indices, x.device) if train else \
            self.validation_generators(indices)
        pred, mask = self.masked_forward(x, generator)
        ssl = self.cfg.PROBLEM.SELF_SUPERVISED
        loss = masked_reconstruction_loss(pred, x, mask, self.token_size, ssl.NORM_PIX_LOSS,
                                          ssl.LOSS_ON_MASKED_ONLY, kind=self._loss_kind())
        return loss, (pred, x, mask)

    def in_image_units(self, pred, x, mask):
        """With NORM_PIX_LOSS the network predicts per-token normalized pixels; outputs, metrics and MAE_checks
        map them back with the statistics of visible tokens only (`denormalize_tokens`): a hidden token's own
        mean/std would hand its scores what the network never saw. Without it, `pred` is in the input's units."""
        if not self.cfg.PROBLEM.SELF_SUPERVISED.NORM_PIX_LOSS:
            return pred
        return denormalize_tokens(pred, x, self.token_size, mask)

    def _loss_kind(self):
        return "mae" if self.cfg.LOSS.TYPE == "MAE" else "mse"

    def batch_metrics(self, batch, outputs):
        pred, x, mask = outputs
        pred = self.in_image_units(pred.detach(), x, mask)
        # Hidden pixels are what the network had to invent; score them (visible ones are near-copies). Summed
        # under the mask on the device: selecting them, or reading the sum back, would wait for a GPU each batch.
        hidden = mask.expand_as(pred) > 0.5
        out = batch_image_metrics(pred, x, self.cfg.TRAIN.METRICS)
        squares = torch.where(hidden, (pred.detach().float() - x.float()) ** 2, 0.0).sum(dtype=torch.float64)
        count = hidden.sum(dtype=torch.float64)
        out["hidden_mse"] = scored_mean(squares / count.clamp_min(1), x.shape[0], count > 0)
        return out

    # ------------------------------------------------------------ whole images
    def predict_slabs(self, image, stats, path):
        # One mask generator per image, seeded, drawn patch after patch: the masks of an image depend on the
        # seed and the patch grid only, not on TEST.BATCH_SIZE (a generator re-seeded per batch repeated them).
        # A CPU one: its numbers run in sequence whatever the batch, where CUDA's depend on each draw's shape.
        self._mask_generator = torch.Generator().manual_seed(self.cfg.SYSTEM.SEED)
        spatial, t = tuple(image.shape[:-1]), self.cfg.DATA.TEST
        if self.cfg.TEST.FULL_IMG:  # one input: the image, mirrored at its ends up to the network's divisor
            views = BorderViews([(0,) * len(spatial)], full_image_input(spatial, required_divisor(self.cfg)),
                                (0,) * len(spatial), spatial)
        else:
            views = BorderViews(grid_starts(spatial, self.patch, tuple(t.OVERLAP), tuple(t.PADDING)), self.patch,
                                tuple(t.PADDING), spatial)
        self._border_views = views
        try:
            yield from super().predict_slabs(image, stats, path)
        finally:
            views.closed = True  # later batches are not from this image

    @property
    def seen_through_border(self):
        """Pixels of the last image predict_slabs went over that an input saw as a visible mirror copy beyond the
        border (`BorderViews`): the stitched 'seen' channel holds each input's part inside the image only."""
        return self._border_views.marked()

    def _drop_seen_through_border(self, hidden, row0=0):
        """`hidden` (channel-last: the image predict_slabs went over, or its rows from `row0`) without the pixels
        seen as mirror copies."""
        hidden[..., 0][self.seen_through_border[row0:row0 + len(hidden)]] = 0

    def predict_patches(self, batch):
        pred, mask = self.masked_forward(batch, self._mask_generator)
        if self._border_views is not None:
            self._border_views.note(mask)
        # The extra channel is 1 where the patch saw the pixel: blended, it stays exactly 0 only where no
        # patch that weighs on the pixel saw it (a sum of zeros), whatever the weights.
        return torch.cat([self.in_image_units(pred, batch, mask).float(), 1 - mask.float()], dim=1)

    def split_output(self, output, stats):
        """Stitched (C+1, spatial...) -> reconstruction in input units and hidden mask, channel-last. Hidden
        means hidden in every patch that covers the pixel (blended 'seen' channel exactly 0): where overlapping
        patches disagree, part of the blended reconstruction comes from a patch that saw the pixel, so it is
        not scored as hidden, however small that patch's weight there (its window's corner: ~1e-4 in 2D)."""
        out = np.moveaxis(output.float().cpu().numpy(), 0, -1)
        recon = self.normalizer.denormalize(out[..., : self.channels], stats).astype(np.float32)
        hidden = (out[..., self.channels:] == 0).astype(np.float32)
        return recon, hidden

    def finish_prediction(self, source, image, stats, slabs):
        spatial, name = tuple(image.shape[:-1]), Path(source).name
        scored = self.cfg.DATA.TEST.LOAD_GT
        # The hidden mask, for the scores, goes to a file beside the outputs a slab at a time (not 1 byte a pixel
        # held), removed once scored.
        hidden_path = self.per_image / f".{image_stem(name)}_hidden.tif"
        try:
            with ExitStack() as stack:
                hidden = stack.enter_context(image_rows_writer(hidden_path, spatial + (1,), np.uint8, self.ndim)) \
                    if scored else None

                def reconstruction():
                    for row0, slab in slabs:
                        recon, hid = self.split_output(slab, stats)
                        if hidden is not None:  # final for these rows: later patches mark only rows they predict
                            self._drop_seen_through_border(hid, row0)
                            hidden.write(hid > 0.5)
                        yield recon

                written = self.write_slabs(self.per_image / name, reconstruction(), spatial + (self.channels,),
                                           np.float32, tiff_calibration(source))
            if not scored:
                return None
            recon, original = self.open_image(written), image  # a reconstruction's ground truth is its input
            row = {"file": name}
            row.update(image_scores(recon, original, self.cfg.TEST.METRICS, self.ndim))
            row.update(image_scores(recon, original, self.cfg.TEST.METRICS, self.ndim, prefix="hidden_",
                                    mask=self.open_image(hidden_path)))
            return row
        finally:
            hidden_path.unlink(missing_ok=True)

    def metric_table_title(self):
        return "Test reconstruction against the original images (mean)"

    # ------------------------------------------------------------ MAE_checks
    def on_epoch_end(self, epoch, tb, final=False):
        freq = self.cfg.LOG.RECONSTRUCTION_FREQ
        due = final or (freq != -1 and (epoch + 1) % freq == 0)
        if not due or self.val_dataset is None or self.cfg.LOG.RECONSTRUCTION_NUM_SAMPLES == 0:
            return
        if final and self._checked_epoch == epoch:
            return  # the last epoch's panels were written at its end already
        self._checked_epoch = epoch
        self.write_mae_checks(epoch, tb)

    def write_mae_checks(self, epoch, tb):
        """Original, masked, reconstruction and reconstruction+visible for a fixed set of validation images
        (a centred crop of those above _CHECK_VOXELS, read alone from a lazily opened one)."""
        count = min(self.cfg.LOG.RECONSTRUCTION_NUM_SAMPLES, len(self.val_dataset.sources))
        was_training = self.model.training
        names = _unique_names([image_stem(src.path) for src in self.val_dataset.sources[:count]])
        for i, src in enumerate(self.val_dataset.sources[:count]):
            path, image = Path(src.path), self.val_dataset.image(i)
            image = np.asarray(image[check_region(tuple(image.shape[:-1]), self.patch, _CHECK_VOXELS)])
            recon, hidden = self.split_output(self.predict_image(image, src.stats, path), src.stats)
            self._drop_seen_through_border(hidden)
            original = image.astype(np.float32)
            panels = {
                "original": original,
                "masked": original * (1 - hidden),
                "reconstruction": recon,
                "reconstruction_and_visible": recon * hidden + original * (1 - hidden),
            }
            stem = names[i]
            for name, panel in panels.items():
                write_image(self.job.mae_checks / f"{stem}_{name}.tif", panel.astype(np.float32), self.ndim)
            if tb is not None:
                # Step = 1-based epoch, as the scalars, the summary line and checkpoint names count.
                tb.add_images(f"reconstruction/{stem}", list(panels.values()), epoch + 1, ndim=self.ndim)
        self.model.train(was_training)
