"""A SummaryWriter wrapper that is a no-op off rank 0 and turns channel-last images into panels."""
import logging
import warnings

import numpy as np

from biapy.utils.files import utf8_text

log = logging.getLogger(__name__)

PANEL_SIDE = 512  # panels are previews (MAE_checks/ holds the full images): a 2048² check had added 18 MB per image


def to_panel(array, ndim) -> np.ndarray:
    """Channel-last image -> (H, W, 3) float in [0, 1], at most PANEL_SIDE pixels a side: middle z slice in 3D;
    one channel grey, else its first three as red, green (and blue), each scaled to its own min-max: with one
    scale for all, a dim stain beside a bright one showed black, and two channels, or more than three, showed
    the first alone."""
    a = np.asarray(array, dtype=np.float32)
    if a.ndim == ndim:  # no channel axis
        a = a[..., None]
    if ndim == 3:
        a = a[a.shape[0] // 2]
    a = a[..., :3]
    step = -(-max(a.shape[:2]) // PANEL_SIDE)
    if step > 1:  # block means of step x step pixels (no more than a thin image's side; partial blocks dropped)
        sy, sx = min(step, a.shape[0]), min(step, a.shape[1])
        h, w = a.shape[0] // sy, a.shape[1] // sx
        a = a[:h * sy, :w * sx].reshape(h, sy, w, sx, -1).mean(axis=(1, 3))
    with warnings.catch_warnings(), np.errstate(all="ignore"):  # an all-NaN channel: NaN bounds, shown black
        warnings.simplefilter("ignore", RuntimeWarning)
        lo, hi = np.nanmin(a, axis=(0, 1)), np.nanmax(a, axis=(0, 1))
        span = np.where(hi > lo, hi - lo, np.inf)
        a = np.nan_to_num((a - lo) / span, nan=0.0)
    if a.shape[-1] == 1:
        return np.repeat(a, 3, axis=-1)
    return np.concatenate([a, np.zeros(a.shape[:2] + (3 - a.shape[-1],), np.float32)], axis=-1)


class TensorBoard:
    """Scalars and images under `log_dir`; every method does nothing when `enabled` is False."""

    def __init__(self, log_dir, enabled=True):
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(log_dir=str(log_dir))

    @property
    def enabled(self) -> bool:
        return self.writer is not None

    def add_scalar(self, tag, value, step) -> None:
        if self.writer is not None and value is not None:
            self.writer.add_scalar(tag, float(value), step)

    def add_scalars(self, values: dict, step, prefix="") -> None:
        for name, value in values.items():
            self.add_scalar(f"{prefix}{name}", value, step)

    def add_images(self, tag, arrays, step, ndim=2) -> None:
        """A row of channel-last images (2D or 3D) shown side by side, each min-max scaled."""
        if self.writer is None or not arrays:
            return
        tag = utf8_text(tag)  # tags are UTF-8, and a file name may not be
        panels = [to_panel(a, ndim) for a in arrays]
        if len({p.shape for p in panels}) == 1:
            self.writer.add_images(tag, np.stack(panels), step, dataformats="NHWC")
        else:
            for i, panel in enumerate(panels):
                self.writer.add_image(f"{tag}/{i}", panel, step, dataformats="HWC")

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
