"""Image-quality scores of reconstructions: per batch during training, per whole image at test."""
import numpy as np
import torch

from biapy.engine import metrics as M


def _data_range(target):
    return float(max(target.max() - target.min(), 1e-6))


def _score(name, pred, target, data_range, mask=None):
    """One metric on (B, C, *spatial) tensors; `mask` (B, 1, *spatial) 1 = pixels to score."""
    if mask is not None:
        keep = mask.expand_as(pred) > 0.5
        if not keep.any():
            return float("nan")
        diff = (pred - target)[keep]
        mse = float((diff ** 2).mean())
        if name == "mae":
            return float(diff.abs().mean())
        if name == "mse":
            return mse
        if name == "psnr":
            return float(M.psnr_from_mse(mse, data_range))
        if name == "ssim":
            ssim_map = M.ssim(pred, target, data_range=data_range, reduction="none")
            return float(ssim_map[keep].mean())
    if name == "psnr":
        return float(M.psnr(pred, target, data_range=data_range))
    if name == "ssim":
        return float(M.ssim(pred, target, data_range=data_range))
    if name == "mae":
        return float(M.mae(pred, target))
    if name == "mse":
        return float(M.mse(pred, target))
    raise ValueError(name)


def image_scores(pred, target, names, ndim, prefix="", mask=None):
    """Scores of one whole image in input units; arrays are channel-last (spatial..., C)."""
    to_t = lambda a: torch.from_numpy(np.ascontiguousarray(np.moveaxis(np.asarray(a, np.float32), -1, 0)))[None]
    p, t = to_t(pred), to_t(target)
    m = to_t(mask) if mask is not None else None
    rng = _data_range(target)
    return {f"{prefix}{name}": _score(name, p, t, rng, m) for name in names}


def batch_image_metrics(pred, target, names):
    """Validation metrics of one batch as {name: (sum, count)} for the trainer to average."""
    pred, target = pred.detach().float(), target.detach().float()
    rng = _data_range(target)
    n = pred.shape[0]
    return {name: (_score(name, pred, target, float(rng)) * n, n) for name in names}
