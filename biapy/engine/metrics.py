"""Image and label metrics on torch tensors (B, C, *spatial), 2D and 3D, and a rank-aware averager.

Every function accepts non-contiguous inputs (e.g. RGB views) and never returns -inf/NaN for
images: PSNR of identical images is capped at `PSNR_CAP` dB. Segmentation scores return NaN
only for a class absent from both prediction and labels (callers skip those).
"""
import math

import torch
import torch.nn.functional as F

PSNR_CAP = 100.0


def _per_sample(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (B, N); reshape (not view) so non-contiguous inputs work."""
    return x.reshape(x.shape[0], -1)


def _reduce(values: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return values.mean()
    if reduction == "sum":
        return values.sum()
    if reduction in ("none", "per_sample"):
        return values
    raise ValueError(f"reduction must be 'mean', 'sum', 'per_sample' or 'none', got {reduction!r}")


def _data_range(target: torch.Tensor, data_range) -> torch.Tensor:
    """Per-sample range (B,): the given value, or the target's max - min (normalized data has no fixed range)."""
    if data_range is None:
        flat = _per_sample(target.detach().float())
        rng = flat.amax(1) - flat.amin(1)
    else:
        rng = torch.as_tensor(data_range, dtype=torch.float32, device=target.device).reshape(-1)
        rng = rng.expand(target.shape[0])
    return rng.clamp_min(1e-8)


def _diff(pred, target) -> torch.Tensor:
    """pred - target in float64 (B, N): squares and sums of huge pixel values (1e20 and up) stay finite."""
    return _per_sample(pred.float() - target.float()).double()


def mse(pred, target, reduction="mean"):
    """Mean squared error (float64); 'none'/'per_sample' -> one value per sample (B,)."""
    return _reduce((_diff(pred, target) ** 2).mean(1), reduction)


def mae(pred, target, reduction="mean"):
    """Mean absolute error (float64); 'none'/'per_sample' -> one value per sample (B,)."""
    return _reduce(_diff(pred, target).abs().mean(1), reduction)


def psnr_from_mse(mse_value, data_range):
    """10*log10(range^2 / mse), capped at PSNR_CAP; float in -> float out, tensor in -> tensor out."""
    if torch.is_tensor(mse_value):
        rng2 = torch.as_tensor(data_range, dtype=torch.float32, device=mse_value.device).clamp_min(1e-8) ** 2
        floor = rng2 * 10.0 ** (-PSNR_CAP / 10.0)
        return 10.0 * torch.log10(rng2 / torch.maximum(mse_value.float(), floor))
    rng2 = max(float(data_range), 1e-8) ** 2
    value = float(mse_value)
    if math.isnan(value):  # NaN outputs: `not value > 0` had scored them as the cap
        return math.nan
    if value <= 0:  # identical images -> the cap
        return PSNR_CAP
    return min(PSNR_CAP, 10.0 * math.log10(rng2 / value))


def psnr(pred, target, data_range=None, reduction="mean"):
    """PSNR per sample (capped at PSNR_CAP), then reduced; data_range None = target's max - min per sample."""
    err = mse(pred, target, reduction="none")
    rng2 = _data_range(target, data_range).double() ** 2
    floor = rng2 * 10.0 ** (-PSNR_CAP / 10.0)
    values = 10.0 * torch.log10(rng2 / torch.maximum(err, floor))
    return _reduce(values, reduction)


def _gaussian_weights(size: int, sigma: float) -> list:
    """A normalized 1-D Gaussian of `size` taps as Python floats: the blur reads no weights back from a GPU."""
    taps = [math.exp(-((i - (size - 1) / 2.0) ** 2) / (2 * sigma ** 2)) for i in range(size)]
    total = sum(taps)
    return [t / total for t in taps]


def _blur(x: torch.Tensor, kernels) -> torch.Tensor:
    """Separable 'valid' Gaussian filter, one list of weights per spatial axis, per channel.

    A weighted sum of the shifted views along each axis: the grouped convolution it replaces runs on torch's
    slow reference kernel on a CPU (SSIM had taken 55-80% of a test phase; this is ~6x faster there)."""
    for axis, weights in enumerate(kernels, start=2):
        if len(weights) == 1:  # a one-pixel window (an axis of 1 or 2 pixels): nothing to average
            continue
        length = x.shape[axis] - len(weights) + 1
        out = x.narrow(axis, 0, length) * weights[0]
        for i in range(1, len(weights)):
            out.add_(x.narrow(axis, i, length), alpha=weights[i])
        x = out
    return x


def ssim_window(spatial, win_size=11) -> tuple:
    """The odd Gaussian window SSIM uses on an image of this spatial shape, per axis: `win_size`, shrunk on an
    axis too short for it only. A 3D stack of one or two slices is then scored slice by slice, as 2D images;
    shrunk on every axis, its 1-pixel window had compared single pixels' brightness, and a few slices had
    narrowed the window in y and x too."""
    sizes = [min(win_size, n) for n in spatial]
    return tuple(w if w % 2 else max(w - 1, 1) for w in sizes)


def ssim_valid_map(x, y, rng, win, sigma=1.5):
    """SSIM map of float (B, C, *spatial) tensors where the whole window fits ('valid': each spatial
    axis shrinks by its window's size - 1); `win` the window per axis (`ssim_window`), `rng` (B,) data ranges.

    Computed on (v - offset) / range, one offset per sample (the target's mean): the same SSIM, but
    the variances E[v^2] - mu^2 do not cancel away in float32 on bright or offset images (uint16 near
    60000, floats near 1e6) and huge values do not overflow. The luminance term adds the offset back.
    """
    kernels = [_gaussian_weights(w, sigma) for w in win]
    shape = (-1,) + (1,) * (x.dim() - 1)
    rng = rng.to(x.dtype).reshape(shape)
    offset = y.detach().mean(dim=tuple(range(1, y.dim())), keepdim=True, dtype=torch.float64).to(x.dtype)
    x, y = (x - offset) / rng, (y - offset) / rng
    c1, c2 = 0.01 ** 2, 0.03 ** 2  # (K * range)^2 in units of the range
    mu_x, mu_y = _blur(x, kernels), _blur(y, kernels)
    sxx = _blur(x * x, kernels) - mu_x ** 2
    syy = _blur(y * y, kernels) - mu_y ** 2
    sxy = _blur(x * y, kernels) - mu_x * mu_y
    lum_x, lum_y = mu_x + offset / rng, mu_y + offset / rng
    num = (2 * lum_x * lum_y + c1) * (2 * sxy + c2)
    den = (lum_x ** 2 + lum_y ** 2 + c1) * (sxx + syy + c2)
    return num / den


def ssim(pred, target, data_range=None, reduction="mean", win_size=11, sigma=1.5):
    """Structural similarity (Wang et al. 2004) with a Gaussian window, 2D or 3D, differentiable.

    The window shrinks (odd size) on an axis too short for it, e.g. a thin 3D stack's z. Computed in float32.
    reduction 'none' -> the SSIM map (B, C, *spatial) of the input's shape (borders from reflect
    padding); 'per_sample' -> (B,); 'mean' -> scalar. Means use only the interior (valid) part of
    the map, as skimage does, so 'mean' equals the mean of the cropped 'none' map.
    """
    if pred.shape != target.shape:
        raise ValueError(f"ssim: shapes differ, {tuple(pred.shape)} vs {tuple(target.shape)}")
    if pred.dim() not in (4, 5):
        raise ValueError(f"ssim expects (B,C,y,x) or (B,C,z,y,x), got shape {tuple(pred.shape)}")
    x, y = pred.float(), target.float()
    win = ssim_window(x.shape[2:], win_size)
    if reduction == "none" and max(win) > 1:
        pad = [w // 2 for w in reversed(win) for _ in range(2)]  # F.pad lists the last axis first
        x, y = F.pad(x, pad, mode="reflect"), F.pad(y, pad, mode="reflect")
    ssim_map = ssim_valid_map(x, y, _data_range(target, data_range), win, sigma)
    if reduction == "none":
        return ssim_map
    return _reduce(_per_sample(ssim_map).mean(1), reduction)


def _labels(t: torch.Tensor) -> torch.Tensor:
    """Accept (B,*spatial) or (B,1,*spatial) integer labels."""
    return t[:, 0] if t.dim() >= 4 and t.shape[1] == 1 else t


def intersection_union(pred_labels, labels, n_classes, ignore_index=-1):
    """Per-class (intersection, union, pred_count + label_count) as float64 tensors (n_classes,).

    Sums of these over a dataset give dataset-level IoU/Dice. Labels outside [0, n_classes), and pixels
    labelled `ignore_index` (LOSS.IGNORE_INDEX: unlabelled), are left out.
    """
    p = _labels(pred_labels).reshape(-1).long()
    t = _labels(labels).reshape(-1).long()
    if p.numel() != t.numel():
        raise ValueError(f"label shapes differ: {tuple(pred_labels.shape)} vs {tuple(labels.shape)}")
    valid = (t >= 0) & (t < n_classes) & (p >= 0) & (p < n_classes) & (t != ignore_index)
    # Counted by adding 1 per valid pixel at its (label, prediction) cell: selecting the valid pixels first, or
    # bincount's output size, would read a count back from a GPU (a wait at every validation batch).
    cell = torch.where(valid, t * n_classes + p, torch.zeros_like(t))
    conf = torch.zeros(n_classes * n_classes, dtype=torch.float64, device=t.device).index_add_(0, cell, valid.double())
    conf = conf.reshape(n_classes, n_classes)
    inter = conf.diagonal()
    sizes = conf.sum(0) + conf.sum(1)
    return inter, sizes - inter, sizes


def iou_per_class(pred_labels, labels, n_classes, ignore_index=-1):
    """IoU per class (n_classes,) float tensor; NaN for a class absent from both prediction and labels."""
    inter, union, _ = intersection_union(pred_labels, labels, n_classes, ignore_index)
    return iou_from_counts(inter, union)


def dice_per_class(pred_labels, labels, n_classes, ignore_index=-1):
    """Dice per class (n_classes,) float tensor; NaN for a class absent from both prediction and labels."""
    inter, _, sizes = intersection_union(pred_labels, labels, n_classes, ignore_index)
    return dice_from_counts(inter, sizes)


def iou_from_counts(inter, union):
    """IoU per class from (summed) `intersection_union` counts; NaN where the union is empty."""
    return torch.where(union > 0, inter / union.clamp_min(1), torch.full_like(inter, float("nan"))).float()


def dice_from_counts(inter, sizes):
    """Dice per class from (summed) `intersection_union` counts; NaN where both sizes are 0."""
    return torch.where(sizes > 0, 2 * inter / sizes.clamp_min(1), torch.full_like(inter, float("nan"))).float()


def scored_mean(mean, n, scored):
    """A batch's `(sum, count)` for MetricAverager from its `mean` over `n` samples, as device tensors: where
    `scored` (a bool tensor) is False, nothing in the batch was to be scored and it counts for nothing, decided
    on the device rather than by reading the count back (a wait for a GPU at every batch)."""
    return torch.where(scored, mean, 0.0) * n, scored.double() * n


class MetricAverager:
    """Running count-weighted means of named values, reducible across ranks.

    Totals and counts may be tensors: they are kept on their device (no host sync per batch) until result().
    """

    def __init__(self):
        self.sums: dict = {}
        self.counts: dict = {}

    def update(self, name: str, total, count) -> None:
        """Add `total` (a sum over `count` items; each a float or a tensor) to `name`."""
        total, count = (v.detach().double() if torch.is_tensor(v) else float(v) for v in (total, count))
        self.sums[name] = self.sums.get(name, 0.0) + total
        self.counts[name] = self.counts.get(name, 0.0) + count

    def update_many(self, values: dict) -> None:
        """`{name: (sum, count)}` as returned by a workflow's batch_metrics; NaN values are skipped."""
        for name, (total, count) in values.items():
            if not torch.is_tensor(total) and (total is None or math.isnan(float(total))):
                continue
            self.update(name, total, count)

    def _plain(self) -> None:
        self.sums = {n: float(s) for n, s in self.sums.items()}
        self.counts = {n: float(c) for n, c in self.counts.items()}

    def all_reduce(self, device="cpu") -> None:
        """Sum every value over ranks (no-op without an initialized process group).

        Every rank must hold the same names; a name missing on one rank is added with 0/0.
        """
        import torch.distributed as dist
        self._plain()
        if not (dist.is_available() and dist.is_initialized()):
            return
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, sorted(self.sums))
        names = sorted(set().union(*gathered))
        buf = torch.tensor([[self.sums.get(n, 0.0), self.counts.get(n, 0.0)] for n in names],
                           dtype=torch.float64, device=device).reshape(-1, 2)
        dist.all_reduce(buf)
        for n, (s, c) in zip(names, buf.tolist()):
            self.sums[n], self.counts[n] = s, c

    def result(self) -> dict:
        """Mean per name as floats; names that never received a count are left out."""
        self._plain()
        return {n: s / self.counts[n] for n, s in self.sums.items() if self.counts[n]}
