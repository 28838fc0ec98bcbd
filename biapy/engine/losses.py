"""Training losses: `build_loss(cfg)` for LOSS.TYPE and the masked-reconstruction loss of masking SSL.

Image losses take (pred, target) float (B, C, *spatial); segmentation losses take logits
(B, K, *spatial) and int64 labels (B, *spatial) or (B, 1, *spatial), with LOSS.IGNORE_INDEX pixels left out
and LOSS.CLASS_WEIGHTS applied. All return a scalar tensor.
"""
from functools import partial

import torch
import torch.nn.functional as F

from biapy.engine.metrics import ssim
from biapy.errors import ConfigError
from biapy.utils.transfer import made_once_per_device, queue_to_device


def _labels(target: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    if target.dim() == pred.dim() and target.shape[1] == 1:
        target = target[:, 0]
    return target.long()


def _ssim_loss(pred, target):
    return 1.0 - ssim(pred, target)


def _mae(pred, target):
    return F.l1_loss(pred.float(), target.float())


def _mse(pred, target):
    return F.mse_loss(pred.float(), target.float())


def _valid_labels(target, logits, ignore_index):
    """(labels with ignored pixels set to 0, valid mask or None): LOSS.IGNORE_INDEX marks unlabelled pixels."""
    labels = _labels(target, logits)
    if ignore_index < 0:
        return labels, None
    valid = labels != ignore_index
    return torch.where(valid, labels, torch.zeros_like(labels)), valid


@made_once_per_device
def _weights(values, dtype, device):
    """LOSS.CLASS_WEIGHTS as a tensor on the loss's device, made once (not copied to a GPU every step)."""
    return queue_to_device(torch.tensor(values, dtype=dtype), device)


def cross_entropy(logits, target, ignore_index=-1, class_weights=None):
    """Mean cross-entropy over labelled pixels, each weighted by its class's weight when given (torch's weighted
    mean); 0 for a batch without a labelled pixel (torch's would be NaN, 0/0)."""
    labels, valid = _valid_labels(target, logits, ignore_index)
    per_pixel = F.cross_entropy(logits.float(), labels, reduction="none")
    share = torch.ones_like(per_pixel) if class_weights is None else \
        _weights(tuple(class_weights), per_pixel.dtype, device=per_pixel.device)[labels]
    if valid is not None:
        share = share * valid
    return (per_pixel * share).sum() / share.sum().clamp_min(1e-12)


def soft_dice_loss(logits, target, eps=1.0, ignore_index=-1, class_weights=None):
    """1 - mean over classes (weighted by `class_weights` when given) of the soft Dice between softmax(logits)
    and one-hot labels, over labelled pixels only."""
    labels, valid = _valid_labels(target, logits, ignore_index)
    probs = logits.float().softmax(1)
    onehot = F.one_hot(labels, logits.shape[1]).movedim(-1, 1).to(probs.dtype)
    if valid is not None:
        keep = valid.unsqueeze(1).to(probs.dtype)
        probs, onehot = probs * keep, onehot * keep
    dims = (0,) + tuple(range(2, probs.dim()))
    inter = (probs * onehot).sum(dims)
    sizes = probs.sum(dims) + onehot.sum(dims)
    dice = (2 * inter + eps) / (sizes + eps)
    if class_weights is None:
        return 1.0 - dice.mean()
    w = _weights(tuple(class_weights), dice.dtype, device=dice.device)
    return 1.0 - (dice * w).sum() / w.sum()


def _weighted(first, second, w):
    w0, w1 = float(w[0]), float(w[1])

    def loss(pred, target):
        return w0 * first(pred, target) + w1 * second(pred, target)
    return loss


def build_loss(cfg):
    """LOSS.TYPE -> callable(pred, target) -> scalar tensor (LOSS.WEIGHTS for the two-term losses)."""
    kind = str(cfg.LOSS.TYPE).upper()  # BiaPy's list forms were read as one name (config.load)
    weights = list(cfg.LOSS.WEIGHTS) or [0.5, 0.5]
    labels = {"ignore_index": int(cfg.LOSS.IGNORE_INDEX),
              "class_weights": list(cfg.LOSS.CLASS_WEIGHTS) if cfg.LOSS.CLASS_REBALANCE == "manual" else None}
    _ce = partial(cross_entropy, **labels)
    _dice = partial(soft_dice_loss, **labels)
    table = {
        "MAE": _mae,
        "MSE": _mse,
        "SSIM": _ssim_loss,
        "W_MAE_SSIM": _weighted(_mae, _ssim_loss, weights),
        "W_MSE_SSIM": _weighted(_mse, _ssim_loss, weights),
        "CE": _ce,
        "DICE": _dice,
        "CE_DICE": _weighted(_ce, _dice, weights),
    }
    if kind not in table:
        raise ConfigError(f"LOSS.TYPE: {cfg.LOSS.TYPE!r} is not a known loss; expected one of {', '.join(table)}")
    return table[kind]


def _as_tuple(token_size, nsp):
    return tuple(token_size) if isinstance(token_size, (tuple, list)) else (int(token_size),) * nsp


def _expand(stat: torch.Tensor, token, spatial):
    """Token-grid statistics back to pixel resolution, cropped to the image."""
    for axis, t in enumerate(token):
        stat = stat.repeat_interleave(t, dim=2 + axis)
    return stat[(slice(None), slice(None)) + tuple(slice(0, s) for s in spatial)]


def token_moments(x: torch.Tensor, token_size, eps=1e-6):
    """Per token (token_size pixels per side, all channels): (mean, std) at pixel resolution, as MAE's
    norm_pix: unbiased variance plus eps under the root; a last partial token uses the pixels it holds."""
    x = x.float()
    spatial = x.shape[2:]
    # Clipped to a shorter axis, as block_mask clips its blocks (a 3D patch thinner than MASK_BLOCK_SIZE).
    token = tuple(min(t, s) for t, s in zip(_as_tuple(token_size, len(spatial)), spatial))
    pool = F.avg_pool2d if len(spatial) == 2 else F.avg_pool3d
    kw = dict(kernel_size=token, stride=token, ceil_mode=True, divisor_override=1)
    s1 = pool(x.sum(1, keepdim=True), **kw)
    s2 = pool((x * x).sum(1, keepdim=True), **kw)
    n = pool(torch.ones_like(x[:, :1]), **kw) * x.shape[1]
    mean = s1 / n
    var = ((s2 - s1 * mean) / (n - 1).clamp_min(1)).clamp_min(0)
    return _expand(mean, token, spatial), _expand((var + eps).sqrt(), token, spatial)


def normalize_tokens(target: torch.Tensor, token_size) -> torch.Tensor:
    """Each token of `target` to zero mean, unit variance (MAE norm_pix targets)."""
    mean, std = token_moments(target, token_size)
    return (target.float() - mean) / std


def denormalize_tokens(pred: torch.Tensor, reference: torch.Tensor, token_size, mask=None) -> torch.Tensor:
    """A norm_pix prediction back in the units of `reference`: each visible token with its own mean/std; with
    `mask` (B, 1, *spatial), 1 = hidden, each hidden token with the average mean/std of the sample's visible
    tokens, so that outputs and scores of hidden pixels use nothing the network did not see."""
    mean, std = token_moments(reference, token_size)
    if mask is not None:
        hidden = mask.float()
        visible = 1 - hidden
        dims = tuple(range(1, mean.dim()))
        count = visible.sum(dims, keepdim=True).clamp_min(1)
        mean = mean * visible + (mean * visible).sum(dims, keepdim=True) / count * hidden
        std = std * visible + (std * visible).sum(dims, keepdim=True) / count * hidden
    return pred.float() * std + mean


def masked_reconstruction_loss(pred, target, mask, token_size, norm_pix=False, on_masked_only=True, kind="mse"):
    """Reconstruction loss of masking SSL; mask (B,1,*spatial) with 1 = hidden.

    on_masked_only: mean over hidden pixels (and channels) only, as MAE; else over every pixel.
    norm_pix: the target is normalized per token first (`normalize_tokens`).
    """
    if norm_pix:
        target = normalize_tokens(target, token_size)
    diff = pred.float() - target.float()
    err = diff * diff if kind == "mse" else diff.abs()
    if not on_masked_only:
        return err.mean()
    m = mask.to(err.dtype)
    hidden = m.sum() * err.shape[1]
    return (err * m).sum() / hidden.clamp_min(1.0)
