"""Image-quality scores of reconstructions: per batch during training, per whole image at test."""
import numpy as np
import torch
import torch.nn.functional as F

from biapy.data.lazy_images import iter_slabs, slab_ranges
from biapy.data.patches import extract_patch
from biapy.engine import metrics as M

_SLAB_VOXELS = 1 << 21  # test images are scored about this many pixels at a time (~90 bytes each)


def _span_or_level(lo, hi):
    """A data range from min and max (floats, or tensors of one per sample): max - min, or for a constant image
    (range 0) its level (1 for zeros): a floor of 1e-6 made a restoration off by 3e-6 read -10 dB."""
    lo, hi = torch.as_tensor(lo, dtype=torch.float64), torch.as_tensor(hi, dtype=torch.float64)
    span, level = hi - lo, torch.maximum(hi.abs(), lo.abs()).clamp_min(1.0)  # floats: no unsigned wrap-around
    return torch.where(span > 1e-6 * level, span, level)


def _data_range(target):
    """The data range of a numpy array, or of a lazy 3D image read a slab at a time (`_span_or_level`)."""
    if isinstance(target, np.ndarray) or torch.is_tensor(target):
        lo, hi = float(target.min()), float(target.max())
    else:
        lo, hi = np.inf, -np.inf
        for part in iter_slabs(target, _SLAB_VOXELS):
            lo, hi = min(lo, float(part.min())), max(hi, float(part.max()))
    return float(_span_or_level(lo, hi))


def image_scores(pred, target, names, ndim, prefix="", mask=None):
    """Scores of one whole `ndim`-D image in input units; arrays are channel-last (spatial..., C), numpy or,
    in 3D, lazy (read a slab at a time); `mask` (spatial..., 1), 1 = the pixels to score.

    The image is scored a slab of rows (z slices in 3D) at a time, SSIM reading its window's halo around
    each slab, so the memory needed is that of a slab, not of the ~15 image-sized temporaries SSIM makes
    (a 4096^2 2D image scored whole had peaked 1.8 GB above the job); sums over the slabs give the
    whole-image values.
    """
    if len(pred.shape) != ndim + 1:
        raise ValueError(f"image_scores: a {ndim}D image is (spatial..., C), got shape {tuple(pred.shape)}")
    scores = _slab_scores(pred, target, names, _data_range(target), mask)
    return {f"{prefix}{name}": scores[name] for name in names}


def _tensor(a):
    """Channel-last array -> float32 (1, C, *spatial) tensor."""
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(np.asarray(a, np.float32), -1, 0)))[None]


def _slab_scores(pred, target, names, rng, mask):
    """Whole-image psnr/ssim/mae/mse of channel-last arrays from slabs of the first axis, ~_SLAB_VOXELS each."""
    unknown = [n for n in names if n not in ("psnr", "ssim", "mae", "mse")]
    if unknown:
        raise ValueError(unknown[0])
    spatial = tuple(pred.shape[:-1])
    win = M.ssim_window(spatial)
    half, half_rest = win[0] // 2, [w // 2 for w in win[1:]]
    rng_t = torch.tensor([rng], dtype=torch.float32)
    sq = ab = ssim_sum = 0.0
    n_err = n_ssim = 0
    for a, b in slab_ranges(pred.shape, _SLAB_VOXELS, min_depth=win[0]):  # at least a window deep: halos cost at most 2x
        # Read once with the SSIM window's halo below the slab (the valid map needs it).
        stop = min(spatial[0], b + 2 * half) if "ssim" in names and mask is None else b
        p_halo, t_halo = _tensor(pred[a:stop]), _tensor(target[a:stop])
        p, t = p_halo[:, :, :b - a], t_halo[:, :, :b - a]
        keep = None if mask is None else _tensor(mask[a:b]).expand_as(p) > 0.5
        diff = (p - t).double() if keep is None else (p - t)[keep].double()
        sq, ab, n_err = sq + float((diff ** 2).sum()), ab + float(diff.abs().sum()), n_err + diff.numel()
        if "ssim" not in names:
            continue
        if keep is None:  # the valid map, as M.ssim's mean: rows whose whole window lies in the image
            end = min(b, spatial[0] - 2 * half)
            if end > a:
                rows = slice(0, end + 2 * half - a)
                ssim_map = M.ssim_valid_map(p_halo[:, :, rows], t_halo[:, :, rows], rng_t, win)
                ssim_sum, n_ssim = ssim_sum + float(ssim_map.double().sum()), n_ssim + ssim_map.numel()
        else:  # the full map with mirrored borders, as M.ssim(reduction='none'), at the kept pixels
            # The slab with its halo, mirrored at the image's ends (read as its span only when lazy).
            start, size = (a - half,) + (0,) * (len(spatial) - 1), (b - a + 2 * half,) + spatial[1:]
            xs, ys = _tensor(extract_patch(pred, start, size)), _tensor(extract_patch(target, start, size))
            if any(half_rest):
                pad = [h for h in reversed(half_rest) for _ in range(2)] + [0, 0]  # F.pad lists the last axis first
                xs, ys = F.pad(xs, pad, mode="reflect"), F.pad(ys, pad, mode="reflect")
            kept = M.ssim_valid_map(xs, ys, rng_t, win)[keep]
            ssim_sum, n_ssim = ssim_sum + float(kept.double().sum()), n_ssim + kept.numel()
    if n_err == 0:  # nothing to score (an empty mask)
        return dict.fromkeys(names, float("nan"))
    mse = sq / n_err
    values = {"mse": mse, "mae": ab / n_err, "psnr": float(M.psnr_from_mse(mse, rng))}
    if "ssim" in names:
        values["ssim"] = ssim_sum / n_ssim if n_ssim else float("nan")
    return values


def batch_image_metrics(pred, target, names):
    """Validation metrics of one batch as {name: (sum, count)} for the trainer to average (sums stay on the
    device). Each patch is scored with its own data range, as the test phase scores each image: one range over
    the batch had made the figures change with TRAIN.BATCH_SIZE (PSNR 38.2 dB in batches of 8, 29.6 of 1)."""
    pred, target = pred.detach().float(), target.detach().float()
    flat = target.reshape(target.shape[0], -1)
    rng = _span_or_level(flat.amin(1), flat.amax(1)).to(pred.device)
    sums = {"psnr": lambda: M.psnr(pred, target, data_range=rng, reduction="sum"),
            "ssim": lambda: M.ssim(pred, target, data_range=rng, reduction="sum"),
            "mae": lambda: M.mae(pred, target, reduction="sum"),
            "mse": lambda: M.mse(pred, target, reduction="sum")}
    return {name: (sums[name](), pred.shape[0]) for name in names}
