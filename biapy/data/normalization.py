"""Intensity normalization, per channel, as one affine map `x * scale + offset` per image.

Every DATA.NORMALIZATION.TYPE reduces to that map, so a patch is normalized as cheaply as a whole
image (datasets keep raw pixels and normalize each patch), and `denormalize` is its exact inverse:
- 'div': divide 8- and 16-bit integers by their type's maximum (uint8 255, uint16 65535), other types
  as BiaPy 3.7.1 does, per channel: by 1 up to 1, else by 255 or 65535 as the channel's maximum fits;
- 'scale_range': per-image min/max to [0, 1];
- 'zero_mean_unit_variance': per-image mean/std, or the fixed ZERO_MEAN_UNIT_VAR.MEAN_VAL/STD_VAL where set
  (as BiaPy 3.7 does);
- 'custom': one mean/std for the whole training set (`fit`, or MEAN_VAL/STD_VAL), saved beside the
  checkpoints as normalization_{mean,std}_value.npy so test time uses the same.
PERC_CLIP clips each image first (percentiles per image and channel, or fixed values); statistics
are measured on the clipped values. A floor on std/range keeps constant images finite. A channel of 0s
and 1s only is neither clipped nor normalized (but by 'custom'), as in BiaPy 3.7.1.
"""
import logging
from pathlib import Path

import numpy as np

from biapy.data.io import FLOAT32_MAX, beyond_float32_error
from biapy.errors import ConfigError, DataError, shown
from biapy.utils.files import atomic_path

log = logging.getLogger(__name__)

TYPES = ("zero_mean_unit_variance", "div", "scale_range", "custom")
FIXED_STATS_TYPES = ("zero_mean_unit_variance", "custom")  # the types that read ZERO_MEAN_UNIT_VAR.MEAN_VAL/STD_VAL
SAMPLE_BUDGET = 1 << 23  # pixels measured on a lazily opened image (strided along every spatial axis)
MEAN_FILE, STD_FILE = "normalization_mean_value.npy", "normalization_std_value.npy"


def _read_saved(path):
    try:
        return np.atleast_1d(np.load(path)).astype(np.float64)
    except FileNotFoundError:
        raise DataError(f"{path}: not found; 'custom' normalization needs the mean/std saved by training "
                        "(in the checkpoint or beside it), or ZERO_MEAN_UNIT_VAR.MEAN_VAL/STD_VAL") from None
    except Exception as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None


def _floor(spread, level):
    """std/range below which an image counts as constant: relative to its level, never 0."""
    return np.maximum(spread, 1e-6 * np.maximum(np.abs(level), 1.0))


def _given(values):
    """Per-channel values from a config list; None when it holds the [-1] 'not set' marker."""
    v = np.atleast_1d(np.asarray(values, dtype=np.float64))
    return None if v.size == 0 or np.all(v == -1) else v


def _steps(shape, budget):
    """One stride for every spatial axis so that at most `budget` pixels remain, and not many fewer.

    At most, so that a sample measured again (the dataset checks its sample, then takes statistics of it)
    is kept whole: one 0.02% over the budget had been halved, and training saw other statistics than test.
    """
    n = float(np.prod(shape, dtype=np.float64))
    if n <= budget:
        return 1
    step = max(1, int(np.ceil((n / budget) ** (1.0 / len(shape)))))
    while np.prod([-(-s // step) for s in shape], dtype=np.float64) > budget:
        step += 1
    return step


def pixel_sample(img, budget=SAMPLE_BUDGET):
    """(n, c) pixels to measure an image on: all of them, or above `budget` pixels a sample of about that many,
    taken the same way from an array in memory and from a lazily read file (so IN_MEMORY changes nothing).

    The sample takes every step-th slice (row in 2D) of the first axis and, within it, every step-th pixel of
    the others, from an offset that cycles through 0..step-1 from one slice to the next: a fixed offset would
    see only even rows of an interlaced image, say. One slice of a lazily read file is held at a time.
    """
    c = img.shape[-1]
    step = _steps(img.shape[:-1], budget)
    if step == 1:
        return np.asarray(img[...]).reshape(-1, c)
    parts = []
    for k, i in enumerate(range(0, img.shape[0], step)):
        shift = k % step
        if i + shift >= img.shape[0]:
            break
        rest = (slice(shift, None, step),) * (len(img.shape) - 2)
        parts.append(np.asarray(img[(slice(i + shift, i + shift + 1),) + rest]).reshape(-1, c))
    return np.concatenate(parts)


def _listed(values):
    """A `_given` value as plain floats, [-1.0] (the config's own 'not set' marker) for None."""
    return [-1.0] if values is None else [float(v) for v in values]


def _shown(values):
    return ", ".join(f"{v:.6g}" for v in np.atleast_1d(values))


def _chunks(flat, size=1 << 22):
    """Views of (n, c) pixels in blocks, so float64 temporaries stay small on huge images."""
    rows = max(1, size // max(1, flat.shape[1]))
    for k in range(0, flat.shape[0], rows):
        yield flat[k:k + rows]


def _moments(flat, lo, hi):
    """Per-channel (min, max, mean, std) of (n, c) pixels, clipped to [lo, hi], in float64 blocks."""
    c = flat.shape[1]
    mn, mx = np.full(c, np.inf), np.full(c, -np.inf)
    n, total, squares, shift = 0, np.zeros(c), np.zeros(c), None
    for block in _chunks(flat):
        b = block.astype(np.float64)
        if lo is not None or hi is not None:
            np.clip(b, lo, hi, out=b)
        mn, mx = np.minimum(mn, b.min(axis=0)), np.maximum(mx, b.max(axis=0))
        if shift is None:  # sums around a first estimate keep precision on bright, flat images
            shift = b.mean(axis=0)
        b -= shift
        total += b.sum(axis=0)
        squares += np.einsum("ij,ij->j", b, b)
        n += b.shape[0]
    mean = total / n
    std = np.sqrt(np.maximum(squares / n - mean ** 2, 0.0))
    return mn, mx, mean + shift, std


def _measured(flat, lo, hi):
    """`_moments` of pixels that can be normalized: DataError for NaN or Inf pixels (not clipped away), or finite
    ones beyond float32's range (1e300 had overflowed the squares, then been called NaN or Inf)."""
    with np.errstate(over="ignore", invalid="ignore"):  # values out of range are refused below, by name
        mn, mx, mean, std = _moments(flat, lo, hi)
    if np.isfinite(mn).all() and np.isfinite(mx).all():
        peak = max(np.abs(mn).max(), np.abs(mx).max())
        if peak > FLOAT32_MAX:  # patches are normalized in float32: such a pixel becomes Inf there, then NaN
            raise beyond_float32_error(None, peak)
    if not (np.isfinite(mean).all() and np.isfinite(std).all()):
        raise DataError("pixel values are NaN or Inf (expected finite values)")
    return mn, mx, mean, std


def _div_by(dtype, channel_max):
    """What 'div' divides each channel by: an 8- or 16-bit integer type's maximum (255, 65535: the same for every
    image of a dataset), else as BiaPy 3.7.1 does for every type, channel by channel: 1 for a channel whose
    maximum is at most 1, 255 for one up to 255, else 65535. By its type's maximum an int32 image had been divided
    by 2^31 - 1 (inputs below 2e-6), and by the brightest channel's rule a float channel in [0, 1] beside one up
    to 200 had been divided by 255."""
    channel_max = np.asarray(channel_max, dtype=np.float64)
    if np.issubdtype(dtype, np.integer) and np.dtype(dtype).itemsize <= 2:
        return np.full(channel_max.shape, float(np.iinfo(dtype).max))
    return np.where(channel_max <= 1, 1.0, np.where(channel_max <= 255, 255.0, 65535.0))


def _binary_channels(flat):
    """Per channel of (n, c) pixels: whether it holds only 0 and 1 (a mask given as a channel, say). BiaPy 3.7.1
    neither clips nor normalizes such a channel, under every type, and neither does this tool (but 'custom')."""
    if flat.dtype == np.bool_:
        return np.ones(flat.shape[1], dtype=bool)
    within = (flat.min(axis=0) >= 0) & (flat.max(axis=0) <= 1)
    if np.issubdtype(flat.dtype, np.integer):
        return within
    for c in np.flatnonzero(within):  # floats in [0, 1]: are they all 0 or 1?
        within[c] = all(bool(np.all((b[:, c] == 0) | (b[:, c] == 1))) for b in _chunks(flat))
    return within


class Normalizer:
    def __init__(self, kind="zero_mean_unit_variance", clip=False, lower_perc=-1.0, upper_perc=-1.0,
                 lower_value=(-1.0,), upper_value=(-1.0,), mean=(-1.0,), std=(-1.0,)):
        if kind not in TYPES:
            raise ConfigError(f"DATA.NORMALIZATION.TYPE: '{kind}' is not one of {', '.join(TYPES)}")
        self.kind, self.clip = kind, bool(clip)
        self.lower_perc, self.upper_perc = float(lower_perc), float(upper_perc)
        self.lower_value, self.upper_value = _given(lower_value), _given(upper_value)
        for name, p in (("LOWER_PERC", self.lower_perc), ("UPPER_PERC", self.upper_perc)):
            if p != -1 and not 0 <= p <= 100:
                raise ConfigError(f"DATA.NORMALIZATION.PERC_CLIP.{name}: {p} is not a percentile in [0, 100]")
        self.given_mean, self.given_std = _given(mean), _given(std)
        self.mean, self.std = self.given_mean, self.given_std

    @classmethod
    def from_cfg(cls, cfg):
        """From DATA.NORMALIZATION.*."""
        n = cfg.DATA.NORMALIZATION
        pc, z = n.PERC_CLIP, n.ZERO_MEAN_UNIT_VAR
        return cls(n.TYPE, pc.ENABLE, pc.LOWER_PERC, pc.UPPER_PERC, pc.LOWER_VALUE, pc.UPPER_VALUE,
                   z.MEAN_VAL, z.STD_VAL)

    def settings(self):
        """{'TYPE': ..., 'PERC_CLIP.ENABLE': ..., ...}: the DATA.NORMALIZATION sub-keys this normalizer's output
        depends on, in config order, as plain values that compare equal when they act alike (floats; [-1.0] for
        'not set'). The clip bounds only with clipping on, a fixed clip value only where its percentile is -1,
        MEAN_VAL/STD_VAL only for the types that read them: what `_clip_bounds` and `_affine` read, kept beside
        them so that a checkpoint's settings are compared (checkpoint.normalization_differences) as they act."""
        out = {"TYPE": self.kind, "PERC_CLIP.ENABLE": self.clip}
        if self.clip:
            for side, perc, value in (("LOWER", self.lower_perc, self.lower_value),
                                      ("UPPER", self.upper_perc, self.upper_value)):
                out[f"PERC_CLIP.{side}_PERC"] = perc
                if perc == -1:
                    out[f"PERC_CLIP.{side}_VALUE"] = _listed(value)
        if self.kind in FIXED_STATS_TYPES:
            out["ZERO_MEAN_UNIT_VAR.MEAN_VAL"] = _listed(self.given_mean)
            out["ZERO_MEAN_UNIT_VAR.STD_VAL"] = _listed(self.given_std)
        return out

    # ------------------------------------------------------------------ statistics
    def _clip_bounds(self, flat):
        """(lo, hi) per channel, or None each, for (n, c) pixels (percentiles of at most ~16M of them)."""
        if not self.clip:
            return None, None
        c = flat.shape[-1]
        lo = hi = None
        if self.lower_perc != -1 or self.upper_perc != -1:
            some = flat[:: max(1, flat.shape[0] // (1 << 24))]
            if some.dtype == np.bool_:  # numpy's percentile subtracts, which bool refuses
                some = some.view(np.uint8)
            if self.lower_perc != -1:
                lo = np.percentile(some, self.lower_perc, axis=0)
            if self.upper_perc != -1:
                hi = np.percentile(some, self.upper_perc, axis=0)
        for name, given in (("LOWER_VALUE", self.lower_value), ("UPPER_VALUE", self.upper_value)):
            if given is not None and len(given) not in (1, c):
                raise DataError(f"DATA.NORMALIZATION.PERC_CLIP.{name} holds {len(given)} channel value(s) but the "
                                f"image has {c} channel(s); expected 1 or {c}")
        if lo is None and self.lower_value is not None:
            lo = np.broadcast_to(self.lower_value, (c,)).astype(np.float64)
        if hi is None and self.upper_value is not None:
            hi = np.broadcast_to(self.upper_value, (c,)).astype(np.float64)
        # A percentile against a fixed value can cross it. Equal bounds are a channel that is one value between
        # the percentiles (an empty stain, say): already constant there, it is clipped to that value, no error.
        if lo is not None and hi is not None and np.any(lo > hi):
            raise DataError(f"DATA.NORMALIZATION.PERC_CLIP: the lower bound {_shown(lo)} is above the upper "
                            f"bound {_shown(hi)} here, so every pixel would be clipped to one value; expected "
                            "LOWER_PERC/LOWER_VALUE below UPPER_PERC/UPPER_VALUE in input units")
        return lo, hi

    def stats(self, img):
        """Per-channel statistics of one image (numpy, or lazy: a bounded sample), channel-last.

        Holds the raw moments and the affine map `scale`/`offset` (plus clip bounds `lo`/`hi`).
        """
        flat = pixel_sample(img)
        with np.errstate(over="ignore", invalid="ignore"):  # percentiles of values near 1e308: `_measured` says
            lo, hi = self._clip_bounds(flat)
        binary = _binary_channels(flat) if self.kind != "custom" else np.zeros(flat.shape[1], dtype=bool)
        if binary.any():  # kept as they are: no clipping bound may fall between 0 and 1
            lo = None if lo is None else np.where(binary, 0.0, lo)
            hi = None if hi is None else np.where(binary, 1.0, hi)
        mn, mx, mean, std = _measured(flat, lo, hi)
        out = {"min": mn, "max": mx, "mean": mean, "std": std, "lo": lo, "hi": hi, "dtype": str(flat.dtype)}
        scale, offset = self._affine(out, flat.dtype)
        out["scale"], out["offset"] = np.where(binary, 1.0, scale), np.where(binary, 0.0, offset)
        return out

    def _affine(self, st, dtype):
        c = len(st["mean"])
        if self.kind == "div":
            return 1.0 / _div_by(dtype, st["max"]), np.zeros(c)
        if self.kind == "scale_range":
            scale = 1.0 / _floor(st["max"] - st["min"], st["max"])
            return scale, -st["min"] * scale
        if self.kind == "zero_mean_unit_variance":  # MEAN_VAL/STD_VAL, where given, are fixed values (BiaPy 3.7)
            mean = st["mean"] if self.given_mean is None else np.broadcast_to(self.given_mean, (c,))
            std = st["std"] if self.given_std is None else np.broadcast_to(self.given_std, (c,))
        else:
            if self.mean is None or self.std is None:
                raise DataError("DATA.NORMALIZATION.TYPE 'custom': no dataset mean/std yet; train first (they are "
                                f"saved as {MEAN_FILE}/{STD_FILE} beside the checkpoints) or set "
                                "ZERO_MEAN_UNIT_VAR.MEAN_VAL and STD_VAL")
            for v in (self.mean, self.std):
                if len(v) not in (1, c):
                    raise DataError(f"'custom' normalization holds {len(v)} channel value(s) "
                                    f"but the image has {c} channel(s)")
            mean, std = np.broadcast_to(self.mean, (c,)), np.broadcast_to(self.std, (c,))
        scale = 1.0 / _floor(std, mean)
        return scale, -mean * scale

    # ------------------------------------------------------------------ apply
    def normalize(self, img, stats):
        """float32 normalized copy of a channel-last numpy image (or patch) with the statistics of its image."""
        # One fresh float32 array, then in place: every extra patch-sized temporary costs page faults.
        x = np.array(img, dtype=np.float32)
        if stats["lo"] is not None or stats["hi"] is not None:
            lo = -np.inf if stats["lo"] is None else stats["lo"]
            hi = np.inf if stats["hi"] is None else stats["hi"]
            np.clip(x, lo, hi, out=x, casting="unsafe")
        # (x - centre) * scale rather than x * scale + offset: on a bright image (uint16 near 60000, floats near
        # 1e6) the product and the offset are both large and their sum cancels to float32's coarse steps there.
        # The centre goes in two float32 parts, so its own rounding (0.06 near 1e6) does not shift the result.
        scale = np.asarray(stats["scale"], dtype=np.float64)
        centre = -np.asarray(stats["offset"], dtype=np.float64) / scale
        high = centre.astype(np.float32)
        x -= high
        x -= (centre - high).astype(np.float32)
        x *= scale.astype(np.float32)
        return x

    def denormalize(self, img, stats):
        """Back to input units: channel-last numpy, or a torch tensor laid out (C, *spatial)."""
        scale, offset = stats["scale"], stats["offset"]
        try:
            import torch
        except ImportError:  # pragma: no cover - torch is a requirement
            torch = None
        if torch is not None and torch.is_tensor(img):
            shape = (-1,) + (1,) * (img.dim() - 1)
            s = torch.as_tensor(scale, dtype=torch.float32, device=img.device).reshape(shape)
            o = torch.as_tensor(offset, dtype=torch.float32, device=img.device).reshape(shape)
            return (img.float() - o) / s
        x = np.array(img, dtype=np.float32)  # one copy, then in place (a whole test volume is large)
        x -= offset.astype(np.float32)
        x /= scale.astype(np.float32)
        return x

    # ------------------------------------------------------------------ 'custom'
    def fit(self, images):
        """Dataset mean/std per channel over all pixels of `images` (after clipping); MEAN_VAL/STD_VAL win."""
        if self.kind != "custom":
            return
        total = sums = squares = None
        for img in images:
            flat = pixel_sample(img)
            with np.errstate(over="ignore", invalid="ignore"):
                bounds = self._clip_bounds(flat)
            try:
                _, _, mean, std = _measured(flat, *bounds)
            except DataError:
                # NaN, Inf or too large: no dataset values (none saved), and the image is refused by its name when
                # the datasets measure it (`stats`), as the images come here unnamed.
                self.mean, self.std = self.given_mean, self.given_std
                return
            n = int(np.prod(img.shape[:-1]))  # a sample's moments stand for all of its image's pixels
            if total is None:
                total, sums, squares = 0, np.zeros_like(mean), np.zeros_like(mean)
            # Pooled moments: each image's variance around its own mean keeps precision.
            squares += n * (std ** 2 + mean ** 2)
            sums += n * mean
            total += n
        if total is None:
            raise DataError("DATA.NORMALIZATION.TYPE 'custom': no training images to measure mean/std on")
        mean = sums / total
        std = np.sqrt(np.maximum(squares / total - mean ** 2, 0.0))
        self.mean = self.given_mean if self.given_mean is not None else mean
        self.std = self.given_std if self.given_std is not None else std
        log.info("Custom normalization: mean %s, std %s", np.round(self.mean, 4), np.round(self.std, 4))

    def save(self, folder):
        """Write normalization_{mean,std}_value.npy into `folder` (atomically); 'custom' only."""
        if self.kind != "custom" or self.mean is None or self.std is None:
            return
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name, value in ((MEAN_FILE, self.mean), (STD_FILE, self.std)):
            with atomic_path(folder / name) as tmp, open(tmp, "wb") as fh:
                np.save(fh, np.asarray(value, dtype=np.float64))

    def load(self, folder, saved=None, checkpoint=None):
        """The dataset mean/std ('custom') to test with. Per value, the first found: given in the config, in
        `saved` (the `state()` stored in `checkpoint`, the one being tested), in `folder`'s .npy files. Loaded
        values must be finite, stds positive: a NaN mean had made every output NaN, scored as PSNR 100."""
        if self.kind != "custom":
            return
        saved = saved if isinstance(saved, dict) and saved.get("type") == "custom" else {}
        loaded = []
        for name, key, given in ((MEAN_FILE, "mean", self.given_mean), (STD_FILE, "std", self.given_std)):
            if given is not None:  # check_config has checked the config's values
                loaded.append(given)
                continue
            if saved.get(key) is not None:
                where = f"{checkpoint or 'the checkpoint'}: its normalization {key}"
                try:
                    value = np.atleast_1d(np.asarray(saved[key], dtype=np.float64))
                except (TypeError, ValueError):
                    raise DataError(f"{where} {shown(saved[key])} is not a list of numbers") from None
            else:
                where = Path(folder) / name
                value = _read_saved(where)
            if not (np.all(np.isfinite(value)) and (key == "mean" or np.all(value > 0))):
                raise DataError(f"{where} holds {shown(value.tolist())}; expected finite values"
                                f"{', all above 0' if key == 'std' else ''}, as training saves them")
            loaded.append(value)
        self.mean, self.std = loaded

    def state(self):
        """Plain values for checkpoints."""
        as_list = (lambda v: None if v is None else [float(x) for x in np.atleast_1d(v)])
        return {"type": self.kind, "mean": as_list(self.mean), "std": as_list(self.std)}

