"""biapy.data.normalization: every type round-trips, constant images stay finite, clipping, custom fit/save/load."""
import re

import numpy as np
import pytest
import torch

from biapy.config.defaults import get_defaults
from biapy.data.image_writing import write_image
from biapy.data.io import open_image_lazy
from biapy.data.normalization import MEAN_FILE, STD_FILE, Normalizer
from biapy.errors import CheckpointError, ConfigError, DataError

TYPES = ["zero_mean_unit_variance", "div", "scale_range", "custom"]


def _img(dtype=np.uint16, shape=(12, 10, 2), seed=0):
    rng = np.random.default_rng(seed)
    top = 255 if dtype == np.uint8 else 4000
    return (rng.random(shape) * top).astype(dtype)


def _normalizer(kind, **kw):
    n = Normalizer(kind, **kw)
    if kind == "custom":
        n.fit([_img(), _img(seed=1)])
    return n


@pytest.mark.parametrize("kind", TYPES)
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_round_trip_every_type(kind, dtype):
    img = _img(dtype)
    n = _normalizer(kind)
    st = n.stats(img)
    x = n.normalize(img, st)
    assert x.dtype == np.float32 and x.shape == img.shape and np.isfinite(x).all()
    np.testing.assert_allclose(n.denormalize(x, st), img.astype(np.float32), rtol=1e-5, atol=1e-2)
    t = torch.from_numpy(np.moveaxis(x, -1, 0).copy())
    back = n.denormalize(t, st)
    np.testing.assert_allclose(np.moveaxis(back.numpy(), 0, -1), img, rtol=1e-5, atol=1e-2)


def test_expected_values_per_type():
    img = _img(np.uint16)
    z = Normalizer("zero_mean_unit_variance")
    x = z.normalize(img, z.stats(img))
    np.testing.assert_allclose(x.reshape(-1, 2).mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(x.reshape(-1, 2).std(0), 1, atol=1e-3)
    d = Normalizer("div")
    np.testing.assert_allclose(d.normalize(img, d.stats(img)), img / 65535.0, rtol=1e-6)
    u8 = _img(np.uint8)
    np.testing.assert_allclose(d.normalize(u8, d.stats(u8)), u8 / 255.0, rtol=1e-6)
    f = np.full((4, 4, 1), 0.5, np.float32)
    np.testing.assert_allclose(d.normalize(f, d.stats(f)), f)  # float max <= 1: left as is
    for dtype, top, by in ((np.float32, 4000, 65535), (np.float32, 200, 255), (np.int32, 4000, 65535),
                           (np.int64, 250, 255), (np.int16, 4000, 32767)):
        # Wider integers and floats as BiaPy: 255 or 65535 by the image's maximum (an int32 image had been divided
        # by 2^31 - 1, a float one by its own maximum); 8/16-bit integers by their type's maximum.
        other = np.linspace(0, top, 16).astype(dtype).reshape(4, 4, 1)
        np.testing.assert_allclose(d.normalize(other, d.stats(other)), other / by, rtol=1e-6, err_msg=str(dtype))
    s = Normalizer("scale_range")
    x = s.normalize(img, s.stats(img))
    np.testing.assert_allclose(x.reshape(-1, 2).min(0), 0, atol=1e-6)
    np.testing.assert_allclose(x.reshape(-1, 2).max(0), 1, atol=1e-6)


def test_div_picks_each_channels_divisor_as_biapy():
    """Floats and wider integers: 1, 255 or 65535 by each channel's own maximum. By the brightest channel's, a
    float channel in [0, 1] beside one up to 200 had been divided by 255 (BiaPy leaves it as it is)."""
    rng = np.random.default_rng(0)
    img = np.stack([rng.random((16, 16)) * 0.9, rng.random((16, 16)) * 200, rng.random((16, 16)) * 3000], -1)
    d = Normalizer("div")
    for dtype, by in ((np.float32, (1, 255, 65535)), (np.int32, (1, 255, 65535))):
        x = img.astype(dtype)
        if dtype == np.int32:  # at most 1 and not only 0/1: BiaPy's normalize_image, which casts to float first, keeps it
            x[..., 0] = rng.integers(-40, 2, (16, 16))
        np.testing.assert_allclose(d.normalize(x, d.stats(x)), x / np.array(by, np.float32), rtol=1e-6)
    u16 = img.astype(np.uint16)  # 8- and 16-bit integers: their type's maximum, every channel
    np.testing.assert_allclose(d.normalize(u16, d.stats(u16)), u16 / 65535.0, rtol=1e-6)


@pytest.mark.parametrize("kind", TYPES[:3])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_a_channel_of_zeros_and_ones_is_kept_as_it_is(kind, dtype):
    """BiaPy 3.7.1 neither clips nor normalizes a 0/1 channel (a mask given as input): 'div' had divided a uint8 one
    by 255, and the others had moved it with each image's share of ones."""
    rng = np.random.default_rng(1)
    mask = (rng.random((30, 40)) > 0.97).astype(dtype)  # 3% ones: a 1-99 percentile clip would erase them
    img = np.stack([(rng.random((30, 40)) * 200).astype(dtype), mask], -1)
    norm = Normalizer(kind, True, lower_perc=1, upper_perc=99)
    st = norm.stats(img)
    out = norm.normalize(img, st)
    np.testing.assert_array_equal(out[..., 1], mask)
    assert np.ptp(out[..., 0]) > 0 and out[..., 0].max() < 2  # the other channel is clipped and normalized
    np.testing.assert_array_equal(norm.denormalize(out, st)[..., 1], mask)


def test_custom_normalizes_a_channel_of_zeros_and_ones_with_the_dataset_values():
    mask = np.zeros((10, 10, 1), np.uint8)
    mask[:3] = 1
    c = Normalizer("custom", mean=(0.5,), std=(0.25,))
    np.testing.assert_allclose(c.normalize(mask, c.stats(mask)), (mask - 0.5) / 0.25)


@pytest.mark.parametrize("kind", TYPES)
def test_constant_image_is_finite(kind):
    img = np.full((8, 8, 2), 1000, np.uint16)
    n = _normalizer(kind)
    x = n.normalize(img, n.stats(img))
    assert np.isfinite(x).all()
    np.testing.assert_allclose(n.denormalize(x, n.stats(img)), img, rtol=1e-5)


def test_percentile_and_fixed_clipping():
    img = np.arange(101, dtype=np.float32).reshape(101, 1, 1) * np.ones((1, 3, 1), np.float32)
    n = Normalizer("scale_range", clip=True, lower_perc=10, upper_perc=90)
    st = n.stats(img)
    np.testing.assert_allclose([st["lo"][0], st["hi"][0]], [10, 90])
    x = n.normalize(img, st)
    assert x.min() == 0 and x.max() == 1 and (x[:10] == 0).all()
    f = Normalizer("scale_range", clip=True, lower_value=[20.0], upper_value=[50.0])
    x = f.normalize(img, f.stats(img))
    assert x[20, 0, 0] == 0 and x[50, 0, 0] == 1 and x[100, 0, 0] == 1


def test_custom_uses_given_or_fitted_values(tmp_path):
    a, b = _img(seed=0), _img(seed=1)
    n = Normalizer("custom")
    n.fit([a, b])
    both = np.concatenate([a, b]).reshape(-1, 2).astype(np.float64)
    np.testing.assert_allclose(n.mean, both.mean(0), rtol=1e-9)
    np.testing.assert_allclose(n.std, both.std(0), rtol=1e-6)
    n.save(tmp_path)
    assert (tmp_path / MEAN_FILE).is_file() and (tmp_path / STD_FILE).is_file()
    m = Normalizer("custom")
    m.load(tmp_path)
    np.testing.assert_allclose(m.mean, n.mean)
    x = m.normalize(a, m.stats(a))
    np.testing.assert_allclose(x, (a - n.mean) / n.std, rtol=1e-4, atol=1e-4)
    given = Normalizer("custom", mean=[100.0], std=[10.0])
    given.fit([a])
    np.testing.assert_allclose(given.normalize(a, given.stats(a)), (a - 100.0) / 10.0, rtol=1e-5)
    with pytest.raises(DataError, match="2 channel"):
        m.stats(np.zeros((4, 4, 3), np.uint8))
    with pytest.raises((DataError, CheckpointError), match=MEAN_FILE):
        Normalizer("custom").load(tmp_path / "empty")
    # To test: the config's values first, then the checkpoint's, then the .npy files beside it.
    saved = {"type": "custom", "mean": [5.0, 6.0], "std": [2.0, 3.0]}
    from_ckpt = Normalizer("custom")
    from_ckpt.load(tmp_path, saved=saved)
    np.testing.assert_array_equal(np.r_[from_ckpt.mean, from_ckpt.std], [5, 6, 2, 3])
    mixed = Normalizer("custom", mean=[100.0])
    mixed.load(tmp_path, saved=saved)
    np.testing.assert_array_equal(np.r_[mixed.mean, mixed.std], [100, 2, 3])
    other = Normalizer("custom")
    other.load(tmp_path, saved={"type": "div"})  # a checkpoint of another type holds none: the files
    np.testing.assert_allclose(other.mean, n.mean)


def test_custom_fit_on_lazy_images_reads_a_sample_weighted_by_image_size(tmp_path, monkeypatch):
    """A lazily opened volume is measured on its strided sample, never read whole, and weighs in the pooled
    mean by its own pixel count, not by the sample's."""
    import biapy.data.normalization as normalization
    from biapy.data.image_writing import write_image
    from biapy.data.io import open_image_lazy

    rng = np.random.default_rng(0)
    big = rng.normal(100, 5, (16, 32, 32, 1)).astype(np.float32)  # 16384 voxels
    small = rng.normal(10, 1, (2, 8, 8, 1)).astype(np.float32)    # 128 voxels
    write_image(tmp_path / "big.tif", big, 3)
    write_image(tmp_path / "small.tif", small, 3)
    monkeypatch.setattr(normalization, "SAMPLE_BUDGET", 1024)
    monkeypatch.setattr(normalization.pixel_sample, "__defaults__", (1024,))
    lazy = [open_image_lazy(tmp_path / name, 3) for name in ("big.tif", "small.tif")]
    n = Normalizer("custom")
    n.fit(lazy)
    expected = (big.mean() * big[..., 0].size + small.mean() * small[..., 0].size) / (big[..., 0].size + 128)
    assert n.mean[0] == pytest.approx(expected, rel=0.01)  # weighting by sample size gives about 86


def test_from_cfg_and_bad_type():
    cfg = get_defaults()
    cfg.DATA.NORMALIZATION.TYPE = "scale_range"
    assert Normalizer.from_cfg(cfg).kind == "scale_range"
    with pytest.raises(ConfigError, match="DATA.NORMALIZATION.TYPE"):
        Normalizer("nope")


def test_nan_image_is_rejected():
    img = np.ones((4, 4, 1), np.float32)
    img[0, 0] = np.nan
    with pytest.raises(DataError, match="NaN"):
        Normalizer().stats(img)


def test_lazy_stats_use_a_bounded_sample(tmp_path):
    img = _img(np.uint16, (6, 20, 24, 1))
    path = write_image(tmp_path / "v.tif", img, 3)
    n = Normalizer()
    full, lazy = n.stats(img), n.stats(open_image_lazy(path, 3))
    np.testing.assert_allclose(lazy["mean"], full["mean"])  # small: the sample is the whole image
    import biapy.data.normalization as norm

    sampled = norm.pixel_sample(open_image_lazy(path, 3), budget=500)
    step = norm._steps(img.shape[:-1], 500)
    assert step > 1 and sampled.shape[1] == 1 and 100 < len(sampled) <= 500
    # The same pixels from the array in memory: IN_MEMORY True and False measure an image alike.
    np.testing.assert_array_equal(sampled, norm.pixel_sample(img, budget=500))
    # Slices 0, step + 1, 2 * step + 2, ... (offset cycling), each strided from that offset on the other axes.
    k = 1
    np.testing.assert_array_equal(sampled[len(img[0, ::step, ::step].reshape(-1)):][:len(img[0, k::step, k::step].reshape(-1))],
                                  img[step + k, k::step, k::step].reshape(-1, 1))


def test_a_percentile_above_a_fixed_upper_value_is_refused():
    """The config cannot compare a percentile with a value: the image can. Every pixel had become one value."""
    img = np.arange(100, dtype=np.uint8).reshape(10, 10, 1)
    with pytest.raises(DataError, match=r"PERC_CLIP: the lower bound 89.1 is above the upper bound 10 here"):
        Normalizer("zero_mean_unit_variance", True, lower_perc=90, upper_value=[10.0]).stats(img)
    ok = Normalizer("zero_mean_unit_variance", True, lower_perc=5, upper_value=[90.0]).stats(img)
    assert ok["lo"][0] == pytest.approx(4.95) and ok["hi"][0] == 90


@pytest.mark.parametrize("kind", TYPES[:3])
def test_percentile_clipping_of_an_image_with_a_constant_channel(kind):
    """A missing stain (a channel of zeros) beside a real one: its percentiles are equal, which had stopped the run
    as if LOWER_PERC were above UPPER_PERC. The constant channel stays finite, the other is clipped as asked."""
    rng = np.random.default_rng(0)
    img = np.stack([rng.integers(0, 60000, (40, 50)), np.full((40, 50), 7)], -1).astype(np.uint16)
    norm = Normalizer(kind, True, lower_perc=1, upper_perc=99)
    st = norm.stats(img)
    assert st["lo"][1] == st["hi"][1] == 7
    assert st["lo"][0] == pytest.approx(np.percentile(img[..., 0], 1))
    out = norm.normalize(img, st)
    assert np.isfinite(out).all() and np.ptp(out[..., 1]) == 0 and np.ptp(out[..., 0]) > 0


def test_percentile_clipping_of_a_boolean_image():
    img = np.random.default_rng(0).random((50, 60, 1)) > 0.5
    st = Normalizer("zero_mean_unit_variance", True, 1, 99).stats(img)
    assert st["lo"][0] == 0 and st["hi"][0] == 1 and st["mean"][0] == pytest.approx(img.mean())


def test_a_sample_measured_again_is_kept_whole(monkeypatch):
    """The dataset checks an image's sample and takes statistics of that sample; the test phase takes them of
    the image. A sample just over the budget (2049 x 4095 pixels for 8 Mi, of 4097 x 8190) had been sampled
    again, halved."""
    import biapy.data.normalization as norm

    budget = 2 ** 23 // 1024  # the same proportions, 1024 times smaller
    monkeypatch.setattr(norm.pixel_sample, "__defaults__", (budget,))
    img = np.random.default_rng(0).gamma(2, 500, (129, 254, 1)).astype(np.uint16)  # 65 x 127 > budget at step 2
    img[::2, ::2] += 1  # pixels a coarser sample than needed misses
    sample = norm.pixel_sample(img)
    assert budget // 4 < len(sample) <= budget
    assert len(norm.pixel_sample(sample)) == len(sample)
    n = Normalizer("zero_mean_unit_variance", True, 1, 99.8)
    training, test = n.stats(sample), n.stats(img)
    for key in ("mean", "std", "lo", "hi", "scale", "offset"):
        np.testing.assert_array_equal(training[key], test[key])


@pytest.mark.parametrize("kind", ["zero_mean_unit_variance", "scale_range"])
def test_images_above_the_sample_budget_are_measured_alike_in_memory_and_lazily(tmp_path, monkeypatch, kind):
    """An interlaced image (odd rows 300 brighter): a sample of even rows only had put its mean 150 off."""
    import biapy.data.normalization as norm

    monkeypatch.setattr(norm.pixel_sample, "__defaults__", (4096,))
    rng = np.random.default_rng(0)
    img = (rng.normal(1000, 20, (160, 200, 1)) + 300 * (np.arange(160) % 2)[:, None, None]).astype(np.uint16)
    path = write_image(tmp_path / "interlaced.tif", img, 2)
    n = Normalizer(kind)
    in_memory, lazy = n.stats(img), n.stats(open_image_lazy(path, 2))
    for key in ("mean", "std", "min", "max", "scale", "offset"):
        np.testing.assert_array_equal(in_memory[key], lazy[key])
    assert in_memory["mean"][0] == pytest.approx(img.mean(), abs=5)
    assert in_memory["std"][0] == pytest.approx(img.std(), rel=0.02)


@pytest.mark.parametrize("kind", ["zero_mean_unit_variance", "scale_range"])
def test_bright_images_normalize_to_float32_precision(kind):
    """x * scale + offset cancelled two numbers near 1e6 in float32 (errors of 0.05 std)."""
    rng = np.random.default_rng(0)
    img = (1e6 + rng.standard_normal((40, 50, 1))).astype(np.float32)
    n = Normalizer(kind)
    stats = n.stats(img)
    exact = (img.astype(np.float64) * stats["scale"] + stats["offset"])
    assert np.abs(n.normalize(img, stats) - exact).max() < 1e-3


def test_zero_mean_unit_variance_takes_the_fixed_values_where_given():
    """BiaPy 3.7 reads ZERO_MEAN_UNIT_VAR.MEAN_VAL/STD_VAL with this type too: a YAML setting them had been
    normalized per image here, silently."""
    img = np.random.default_rng(0).integers(0, 255, (20, 30, 2)).astype(np.uint8)
    both = Normalizer("zero_mean_unit_variance", mean=[60.0], std=[40.0, 20.0])
    np.testing.assert_allclose(both.normalize(img, both.stats(img)), (img - 60.0) / np.array([40.0, 20.0]),
                               rtol=1e-5, atol=1e-5)
    mean_only = Normalizer("zero_mean_unit_variance", mean=[60.0])
    expected = (img - 60.0) / img.reshape(-1, 2).std(0)
    np.testing.assert_allclose(mean_only.normalize(img, mean_only.stats(img)), expected, rtol=1e-4, atol=1e-4)
    cfg = get_defaults()
    cfg.DATA.NORMALIZATION.ZERO_MEAN_UNIT_VAR.MEAN_VAL = [60.0]
    assert Normalizer.from_cfg(cfg).given_mean.tolist() == [60.0]


@pytest.mark.parametrize("mean,std,bad", [([float("nan")], [1.0], "mean"), ([0.0], [-5.0], "std"),
                                          ([0.0], [float("inf")], "std"), (["a"], [1.0], "mean")])
def test_custom_values_loaded_for_testing_must_be_finite_and_stds_positive(tmp_path, mean, std, bad):
    """A NaN mean in the checkpoint or beside it had made every test output NaN (scored PSNR 100); a negative
    std, which the config check refuses, had been taken from a file."""
    with pytest.raises(DataError, match=rf"model\.pth: its normalization {bad} .*(expected finite|not a list)"):
        Normalizer("custom").load(tmp_path, {"type": "custom", "mean": mean, "std": std}, tmp_path / "model.pth")
    if bad == "mean" and mean == ["a"]:
        return
    np.save(tmp_path / MEAN_FILE, np.array(mean))
    np.save(tmp_path / STD_FILE, np.array(std))
    with pytest.raises(DataError, match=rf"{STD_FILE if bad == 'std' else MEAN_FILE} holds .*expected finite"):
        Normalizer("custom").load(tmp_path)


@pytest.mark.parametrize("kind", TYPES)
@pytest.mark.parametrize("peak", [1e300, -1e300, 1e39])
def test_pixel_values_beyond_float32_are_refused_without_overflow_warnings(kind, peak):
    """float64 pixels near 1e300 had overflowed the squares (four RuntimeWarnings), then been called NaN or Inf;
    up to 1e154 they had passed, and become Inf, then NaN, in the float32 patch."""
    import warnings

    img = peak * np.random.default_rng(0).random((12, 10, 2))
    img[3, 4, 1] = peak
    n = _normalizer(kind, **({"mean": [-1.0], "std": [-1.0]} if kind == "custom" else {}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        n.fit([img])
        assert kind != "custom" or n.mean is None  # no dataset values (nor files) from such an image
        n.mean, n.std = np.zeros(2), np.ones(2)
        with pytest.raises(DataError, match=rf"^pixel values up to {re.escape(f'{abs(peak):.3g}')} in magnitude are too large to "
                                            r"normalize \(overflow\); expected values below about 3.4e38"):
            n.stats(img)


@pytest.mark.parametrize("kind", TYPES)
def test_the_largest_float32_values_still_normalize(kind):
    img = 3e38 * np.random.default_rng(1).random((12, 10, 2))
    n = _normalizer(kind)
    n.fit([img])
    x = n.normalize(img, n.stats(img))
    assert np.isfinite(x).all()


def test_a_pixel_beyond_float32_that_the_sample_missed_is_refused_where_it_is_predicted():
    """Statistics come from a sample of a large (or lazy) image: a float64 pixel of 1e300 outside it had been
    predicted as Inf and scored, with only an overflow warning."""
    from biapy.workflows.crappify import CrappifyWorkflow

    wf = object.__new__(CrappifyWorkflow)
    wf.cfg, wf.device, wf.patch, wf.normalizer = get_defaults(), torch.device("cpu"), (32, 32), Normalizer("div")
    wf.cfg.DATA.TEST.OVERLAP, wf.cfg.DATA.TEST.PADDING = (0.0, 0.0), (0, 0)
    wf.model = torch.nn.Identity()
    image = np.random.default_rng(0).random((96, 64, 1))
    stats = wf.normalizer.stats(image)  # measured before the pixel: as a sample that does not hold it
    image[70, 5, 0] = 1e300
    with pytest.raises(DataError, match=r"^image.tif \(rows 64..95\): pixel values up to 1e\+300 in magnitude are "
                                        r"too large to normalize"):
        wf.predict_image(image, stats, "image.tif")


def test_fixed_clip_values_for_more_channels_than_the_image_has():
    norm = Normalizer("zero_mean_unit_variance", clip=True, lower_value=(10.0, 20.0))
    with pytest.raises(DataError, match=r"PERC_CLIP.LOWER_VALUE holds 2 channel value\(s\) but the image has 1"):
        norm.stats(np.zeros((8, 8, 1), np.float32))
