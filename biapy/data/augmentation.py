"""Data augmentation of training patches (numpy, channel-last, already normalized).

Each enabled transform is applied with its own probability (<NAME>_PROB, BiaPy 3.7's keys) or else
DA_PROB (older BiaPy's one probability for all), drawing from the item's own
Generator (so augmentation is reproducible per (seed, epoch, index)). Geometric transforms move
input and target together (labels by nearest neighbour, so they stay integer class ids);
intensity transforms touch the input only. Geometric ones come first, intensity ones after.
"""
import numpy as np

GEOMETRIC = ("VFLIP", "HFLIP", "ZFLIP", "ROT90", "RANDOM_ROT")
INTENSITY = ("BRIGHTNESS", "CONTRAST", "GAMMA_CONTRAST", "GAUSSIAN_NOISE", "G_BLUR")
# BiaPy 3.7's key for each transform's own probability (-1: DA_PROB), spelt out so a search finds its reader.
PROB_KEYS = {"VFLIP": "VFLIP_PROB", "HFLIP": "HFLIP_PROB", "ZFLIP": "ZFLIP_PROB", "ROT90": "ROT90_PROB",
             "RANDOM_ROT": "RANDOM_ROT_PROB", "BRIGHTNESS": "BRIGHTNESS_PROB", "CONTRAST": "CONTRAST_PROB",
             "GAMMA_CONTRAST": "GAMMA_CONTRAST_PROB", "GAUSSIAN_NOISE": "GAUSSIAN_NOISE_PROB", "G_BLUR": "G_BLUR_PROB"}


class Augmentor:
    def __init__(self, aug_cfg, ndim):
        self.cfg, self.ndim = aug_cfg, int(ndim)
        shared = float(aug_cfg.DA_PROB)
        own = {name: float(aug_cfg.get(key, -1)) for name, key in PROB_KEYS.items()}
        self.probs = {name: shared if p == -1 else p for name, p in own.items()}
        self.active = [name for name in GEOMETRIC + INTENSITY
                       if bool(aug_cfg.get(name, False)) and not (name == "ZFLIP" and self.ndim == 2)]

    @property
    def enabled(self):
        """True when augmentation is on and at least one chosen transform can happen."""
        return bool(self.cfg.ENABLE) and any(self.probs[name] > 0 for name in self.active)

    def __call__(self, x, y, rng, y_is_label=False):
        """(x, y) augmented; x is (*spatial, c) float, y the same layout, (*spatial) labels, or None."""
        if not self.enabled:
            return x, y
        y_ax, x_ax = self.ndim - 2, self.ndim - 1
        for name in self.active:
            if rng.random() >= self.probs[name]:
                continue
            if name in ("VFLIP", "HFLIP", "ZFLIP"):
                axis = {"VFLIP": y_ax, "HFLIP": x_ax, "ZFLIP": 0}[name]
                x, y = np.flip(x, axis), None if y is None else np.flip(y, axis)
            elif name == "ROT90":
                square = x.shape[y_ax] == x.shape[x_ax]
                k = int(rng.integers(1, 4)) if square else 2  # a quarter turn would change a non-square shape
                x = np.rot90(x, k, axes=(y_ax, x_ax))
                y = None if y is None else np.rot90(y, k, axes=(y_ax, x_ax))
            elif name == "RANDOM_ROT":
                from scipy import ndimage  # imported on first use: scipy.ndimage adds ~0.25 s to every job's start
                angle = float(rng.uniform(*self.cfg.RANDOM_ROT_RANGE))
                x = ndimage.rotate(x, angle, axes=(y_ax, x_ax), reshape=False, order=1, mode="reflect")
                if y is not None:
                    y = ndimage.rotate(y, angle, axes=(y_ax, x_ax), reshape=False, order=0 if y_is_label else 1,
                                       mode="reflect")
            else:
                x = self._intensity(name, np.asarray(x, dtype=np.float32), rng)
        return x, y

    def _intensity(self, name, x, rng):
        c = self.cfg
        if name == "BRIGHTNESS":
            return x + np.float32(rng.uniform(*c.BRIGHTNESS_FACTOR) * max(float(x.max() - x.min()), 1e-6))
        if name == "CONTRAST":
            mean = x.mean()
            return (x - mean) * np.float32(1 + rng.uniform(*c.CONTRAST_FACTOR)) + mean
        if name == "GAMMA_CONTRAST":
            # Normalized values can be negative: apply the curve on the patch's [0, 1] range and map back.
            lo, hi = float(x.min()), float(x.max())
            if hi - lo < 1e-6:
                return x
            unit = (x - lo) / (hi - lo)
            return (np.power(unit, np.float32(rng.uniform(*c.GC_GAMMA))) * (hi - lo) + lo).astype(np.float32)
        if name == "GAUSSIAN_NOISE":
            noise = rng.normal(c.GAUSSIAN_NOISE_MEAN, np.sqrt(c.GAUSSIAN_NOISE_VAR), size=x.shape)
            return x + noise.astype(np.float32)
        # G_BLUR: spatial axes only, channels kept apart.
        from scipy import ndimage

        sigma = float(rng.uniform(*c.G_SIGMA))
        return ndimage.gaussian_filter(x, sigma=(sigma,) * self.ndim + (0,))
