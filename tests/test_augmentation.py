"""biapy.data.augmentation: alignment of input and target, label integrity, intensity on input only."""
import numpy as np
import pytest

from biapy.config.defaults import get_defaults
from biapy.data.augmentation import GEOMETRIC, INTENSITY, Augmentor


def _cfg(*names, prob=1.0):
    cfg = get_defaults().AUGMENTOR
    cfg.ENABLE, cfg.DA_PROB = True, prob
    for n in names:
        cfg[n] = True
    return cfg


def _ramp(shape):
    """An image whose every pixel value tells its position, and labels derived from it."""
    x = np.arange(np.prod(shape), dtype=np.float32).reshape(shape + (1,)) / np.prod(shape)
    return x, (x[..., 0] * 4).astype(np.int64)


def test_enabled():
    assert not Augmentor(get_defaults().AUGMENTOR, 2).enabled
    assert not Augmentor(_cfg(), 2).enabled  # on, but nothing chosen
    assert not Augmentor(_cfg("ZFLIP"), 2).enabled  # no z in 2D
    assert Augmentor(_cfg("HFLIP"), 2).enabled


@pytest.mark.parametrize("ndim,shape", [(2, (12, 12)), (2, (10, 14)), (3, (6, 10, 10))])
def test_geometric_moves_image_and_labels_together(ndim, shape):
    aug = Augmentor(_cfg("VFLIP", "HFLIP", "ZFLIP", "ROT90"), ndim)
    x, y = _ramp(shape)
    for seed in range(6):
        xa, ya = aug(x, y, np.random.default_rng(seed), y_is_label=True)
        assert xa.shape == x.shape and ya.shape == y.shape
        np.testing.assert_array_equal((xa[..., 0] * 4).astype(np.int64), ya)


def test_random_rotation_keeps_labels_integer_with_the_same_values():
    aug = Augmentor(_cfg("RANDOM_ROT"), 2)
    x = np.random.default_rng(0).random((24, 24, 2)).astype(np.float32)
    y = np.zeros((24, 24), np.int64)
    y[4:12, 6:20], y[14:20, 3:9] = 1, 2
    xa, ya = aug(x, y, np.random.default_rng(1), y_is_label=True)
    assert xa.shape == x.shape and ya.dtype == np.int64 and set(np.unique(ya)) == {0, 1, 2}
    # an image target rotates like the input (linear interpolation both)
    xb, yb = aug(x, x.copy(), np.random.default_rng(1), y_is_label=False)
    np.testing.assert_allclose(xb, yb)


@pytest.mark.parametrize("name", INTENSITY)
def test_intensity_touches_the_input_only(name):
    aug = Augmentor(_cfg(name), 3)
    x = np.random.default_rng(2).random((4, 8, 8, 2)).astype(np.float32)
    y = x.copy()
    xa, ya = aug(x, y, np.random.default_rng(3), y_is_label=False)
    assert xa.shape == x.shape and xa.dtype == np.float32 and np.isfinite(xa).all()
    assert not np.allclose(xa, x)
    np.testing.assert_array_equal(ya, x)


def test_probability_zero_and_reproducibility():
    names = GEOMETRIC + INTENSITY
    x, y = _ramp((8, 8))
    xa, ya = Augmentor(_cfg(*names, prob=0.0), 2)(x, y, np.random.default_rng(0), True)
    np.testing.assert_array_equal(xa, x)
    aug = Augmentor(_cfg(*names, prob=0.5), 2)
    a = aug(x, y, np.random.default_rng(7), True)
    b = aug(x, y, np.random.default_rng(7), True)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_scipy_is_imported_only_for_the_transforms_that_need_it():
    """scipy.ndimage costs ~0.25 s of every job's start; flips and intensity changes do without it."""
    import subprocess
    import sys

    code = ("import sys, numpy as np; import biapy.workflows.crappify, biapy.workflows.masking, biapy.engine.trainer\n"
            "from biapy.config.defaults import get_defaults\n"
            "from biapy.data.augmentation import Augmentor\n"
            "cfg = get_defaults().AUGMENTOR; cfg.ENABLE, cfg.DA_PROB, cfg.HFLIP, cfg.BRIGHTNESS = True, 1.0, True, True\n"
            "Augmentor(cfg, 2)(np.zeros((8, 8, 1), np.float32), None, np.random.default_rng(0))\n"
            "before = 'scipy' in sys.modules\n"
            "cfg.G_BLUR = True\n"
            "Augmentor(cfg, 2)(np.zeros((8, 8, 1), np.float32), None, np.random.default_rng(0))\n"
            "print(before, 'scipy.ndimage' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True"]


def test_own_probability_of_a_transform_wins_over_da_prob():
    """BiaPy 3.7's per-transform keys (VFLIP_PROB, ...): -1 (the default) falls back to DA_PROB."""
    x, _ = _ramp((8, 8))
    flipped = np.flip(x, 0)
    never = _cfg("VFLIP", prob=1.0)
    never.VFLIP_PROB = 0.0
    assert not Augmentor(never, 2).enabled
    always = _cfg("VFLIP", "HFLIP", prob=0.0)
    always.VFLIP_PROB = 1.0  # HFLIP keeps DA_PROB 0: only the flip along y happens
    aug = Augmentor(always, 2)
    for seed in range(5):
        np.testing.assert_array_equal(aug(x, None, np.random.default_rng(seed))[0], flipped)
    some = _cfg("VFLIP", prob=1.0)
    some.VFLIP_PROB = 0.3
    hits = sum(np.array_equal(Augmentor(some, 2)(x, None, np.random.default_rng(s))[0], flipped) for s in range(400))
    assert 80 < hits < 160
