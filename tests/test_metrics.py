"""Metrics on known inputs: PSNR cap, SSIM against skimage, 3D/RGB inputs, IoU/Dice, the averager."""
import math

import numpy as np
import pytest
import torch

from biapy.engine import metrics as M


def test_mse_mae_psnr_known_values():
    a = torch.zeros(2, 1, 4, 4)
    b = torch.full((2, 1, 4, 4), 0.5)
    assert float(M.mse(a, b)) == pytest.approx(0.25)
    assert float(M.mae(a, b)) == pytest.approx(0.5)
    assert float(M.psnr(b, a, data_range=1.0)) == pytest.approx(10 * math.log10(1 / 0.25), rel=1e-5)
    assert M.psnr_from_mse(0.25, 1.0) == pytest.approx(10 * math.log10(4))
    assert M.mse(a, b, reduction="none").shape == (2,)


def test_psnr_takes_each_samples_own_range():
    """Without data_range, each target's max - min: a dim sample beside a bright one keeps its own PSNR."""
    target = torch.stack([torch.linspace(0, 1, 16), torch.linspace(0, 100, 16)]).reshape(2, 1, 4, 4)
    pred = target + torch.tensor([0.01, 1.0]).reshape(2, 1, 1, 1)
    each = [float(M.psnr(pred[i:i + 1], target[i:i + 1])) for i in range(2)]
    assert each == pytest.approx([40.0, 40.0], rel=1e-4)  # 10 log10(range^2 / (range/100)^2)
    assert float(M.psnr(pred, target)) == pytest.approx(40.0, rel=1e-4)


def test_psnr_identical_is_capped_never_inf():
    x = torch.rand(2, 1, 6, 16, 16)
    assert float(M.psnr(x, x)) == M.PSNR_CAP
    assert M.psnr_from_mse(0.0, 1.0) == M.PSNR_CAP
    assert float(M.psnr_from_mse(torch.tensor(0.0), 1.0)) == pytest.approx(M.PSNR_CAP)
    flat = torch.zeros(1, 1, 4, 4)  # constant target: range 0 must not give -inf/NaN
    assert math.isfinite(float(M.psnr(flat + 1, flat)))


def test_psnr_of_nan_outputs_is_nan_not_the_cap():
    """An all-NaN prediction had read PSNR 100 in the test table (`not mse > 0` is true for NaN)."""
    assert math.isnan(M.psnr_from_mse(float("nan"), 1.0))
    assert math.isnan(float(M.psnr_from_mse(torch.tensor(float("nan")), 1.0)))
    assert math.isnan(float(M.psnr(torch.full((1, 1, 4, 4), float("nan")), torch.rand(1, 1, 4, 4))))


def test_ssim_matches_skimage_2d():
    from skimage.metrics import structural_similarity
    rng = np.random.default_rng(0)
    x = rng.random((40, 40)).astype(np.float32)
    y = (x + 0.2 * rng.random((40, 40))).astype(np.float32)
    ref = structural_similarity(x, y, data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    ours = M.ssim(torch.from_numpy(x)[None, None], torch.from_numpy(y)[None, None], data_range=1.0)
    assert float(ours) == pytest.approx(ref, abs=1e-4)


def test_ssim_3d_small_patch_rgb_noncontiguous_and_map():
    x = torch.rand(2, 1, 3, 16, 16)  # z = 3 < window: the window shrinks
    assert float(M.ssim(x, x)) == pytest.approx(1.0, abs=1e-5)
    assert float(M.ssim(x, x * 0.5 + 0.2)) < 1
    rgb = torch.rand(1, 20, 20, 3).permute(0, 3, 1, 2)  # channel-last view, non-contiguous
    assert not rgb.is_contiguous()
    assert float(M.ssim(rgb, rgb)) == pytest.approx(1.0, abs=1e-5)
    assert float(M.psnr(rgb, rgb.contiguous() * 0.9)) > 0
    ssim_map = M.ssim(rgb, rgb * 0.9, reduction="none")
    assert ssim_map.shape == rgb.shape
    assert M.ssim(x, x, reduction="per_sample").shape == (2,)


@pytest.mark.parametrize("depth", [1, 2])
def test_a_stack_of_one_or_two_slices_has_the_ssim_of_its_slices(depth):
    """The window shrinks on the short axis only: z gets a 1-slice window and y, x keep their 11 pixels, so the
    stack scores the mean of its slices' 2D SSIM (skimage's). Shrunk on every axis, the 1-pixel window had
    compared pixels' brightness only (0.83 where the slice's SSIM was 0.19)."""
    from skimage.metrics import structural_similarity
    from biapy.workflows.scoring import image_scores

    rng = np.random.default_rng(depth)
    gt = rng.random((depth, 41, 37)).astype(np.float32)
    pred = (gt + 0.3 * rng.random(gt.shape)).astype(np.float32)
    rng_ = float(gt.max() - gt.min())
    slices = [structural_similarity(p, g, data_range=rng_, gaussian_weights=True, sigma=1.5,
                                    use_sample_covariance=False) for p, g in zip(pred, gt)]
    ours = image_scores(pred[..., None], gt[..., None], ["ssim"], 3)["ssim"]
    assert ours == pytest.approx(float(np.mean(slices)), abs=1e-4)
    assert M.ssim_window(gt.shape) == (1, 11, 11)
    volume = float(M.ssim(torch.from_numpy(pred)[None, None], torch.from_numpy(gt)[None, None], data_range=rng_))
    assert volume == pytest.approx(float(np.mean(slices)), abs=1e-4)
    ssim_map = M.ssim(torch.from_numpy(pred)[None, None], torch.from_numpy(gt)[None, None], reduction="none")
    assert ssim_map.shape == (1, 1) + gt.shape
    hidden = np.ones(gt.shape + (1,), np.float32)  # the masked path's full map, averaged over every voxel
    assert image_scores(pred[..., None], gt[..., None], ["ssim"], 3, mask=hidden)["ssim"] == \
        pytest.approx(float(ssim_map.double().mean()), abs=1e-5)
    assert M.ssim_window((5, 64, 8)) == (5, 11, 7)  # a few slices narrow z alone; an even side rounds down


def test_ssim_is_differentiable():
    x = torch.rand(1, 1, 16, 16, requires_grad=True)
    (1 - M.ssim(x, torch.rand(1, 1, 16, 16))).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_unlabelled_pixels_are_left_out_of_iou_and_dice():
    pred = torch.tensor([[0, 1, 1, 2, 2, 0]])
    labels_in_range = torch.tensor([[0, 1, 2, 2, 2, 1]])  # an ignored value may be a class id as well
    torch.testing.assert_close(M.dice_per_class(pred, labels_in_range, 3, ignore_index=2),
                               M.dice_per_class(pred[:, [0, 1, 5]], labels_in_range[:, [0, 1, 5]], 3), equal_nan=True)


def test_iou_dice_per_class_with_absent_class():
    pred = torch.tensor([[[0, 1], [1, 1]]])
    gt = torch.tensor([[[0, 1], [0, 1]]])
    iou = M.iou_per_class(pred, gt, 3)
    dice = M.dice_per_class(pred, gt, 3)
    assert iou[0] == pytest.approx(0.5) and iou[1] == pytest.approx(2 / 3) and math.isnan(iou[2])
    assert dice[0] == pytest.approx(2 / 3) and dice[1] == pytest.approx(0.8) and math.isnan(dice[2])
    assert torch.equal(M.iou_per_class(gt[:, None], gt, 2), torch.ones(2))  # (B,1,...) labels accepted


def test_intersection_union_counts_every_labelled_pixel_once():
    """Against a count pixel by pixel: labels and predictions out of range, and unlabelled pixels, are left out."""
    rng = np.random.default_rng(0)
    t = torch.from_numpy(rng.integers(-1, 5, (3, 17, 19)))  # -1 and 4 outside 4 classes; 3 unlabelled below
    p = torch.from_numpy(rng.integers(0, 5, (3, 17, 19)))
    conf = np.zeros((4, 4))
    for a, b in zip(t.reshape(-1).tolist(), p.reshape(-1).tolist()):
        if 0 <= a < 4 and 0 <= b < 4 and a != 3:
            conf[a, b] += 1
    inter, union, sizes = M.intersection_union(p, t, 4, ignore_index=3)
    np.testing.assert_array_equal(inter.numpy(), np.diag(conf))
    np.testing.assert_array_equal(sizes.numpy(), conf.sum(0) + conf.sum(1))
    np.testing.assert_array_equal(union.numpy(), conf.sum(0) + conf.sum(1) - np.diag(conf))
    assert inter.dtype == torch.float64 and inter[3] == 0 and sizes[3] > 0  # 3: unlabelled, still predicted


def test_metric_averager_weights_by_count():
    avg = M.MetricAverager()
    avg.update("psnr", 30.0 * 2, 2)
    avg.update("psnr", torch.tensor(20.0), 1)
    avg.update_many({"mae": (1.0, 4), "skip": (float("nan"), 1)})
    # Counts may stay on the device too; a name whose counts are all 0 (nothing scored) is left out.
    avg.update_many({"mae": (torch.tensor(3.0), torch.tensor(4.0)), "empty": (torch.tensor(0.0), torch.tensor(0.0))})
    avg.all_reduce()  # no process group: no-op
    assert avg.result() == pytest.approx({"psnr": 80 / 3, "mae": 0.5})


def _whole_image_scores(pred, target, data_range, mask=None):
    """The scores of (1, C, *spatial) tensors computed on the whole image at once (`mask`: 1 = scored)."""
    if mask is None:
        return {"psnr": float(M.psnr(pred, target, data_range=data_range)),
                "ssim": float(M.ssim(pred, target, data_range=data_range)),
                "mae": float(M.mae(pred, target)), "mse": float(M.mse(pred, target))}
    keep = mask.expand_as(pred) > 0.5
    diff = (pred - target)[keep].double()
    mse = float((diff ** 2).mean())
    ssim_map = M.ssim(pred, target, data_range=data_range, reduction="none")
    return {"psnr": M.psnr_from_mse(mse, data_range), "ssim": float(ssim_map[keep].double().mean()),
            "mae": float(diff.abs().mean()), "mse": mse}


@pytest.mark.parametrize("shape", [(23, 17, 19, 1), (6, 20, 18, 2), (13, 12, 12, 1), (45, 31, 1), (30, 26, 3)])
@pytest.mark.parametrize("masked", [False, True])
def test_scores_by_slab_equal_the_whole_image(shape, masked, monkeypatch):
    """3D and 2D images are scored a slab of rows at a time (a 4096^2 2D image scored whole had peaked 1.8 GB)."""
    from biapy.workflows import scoring

    rng = np.random.default_rng(0)
    target = rng.random(shape).astype(np.float32) * 100
    noise_std = np.linspace(1, 40, shape[0]).reshape((-1,) + (1,) * (len(shape) - 1))  # the score changes along
    pred = (target + rng.normal(0, 1, shape) * noise_std).astype(np.float32)  # the first axis: slabs must not overlap
    mask = (rng.random(shape[:-1] + (1,)) > 0.6).astype(np.float32) if masked else None
    names = ["psnr", "ssim", "mae", "mse"]
    whole = _whole_image_scores(scoring._tensor(pred), scoring._tensor(target), scoring._data_range(target),
                                scoring._tensor(mask) if masked else None)
    monkeypatch.setattr(scoring, "_SLAB_VOXELS", int(np.prod(shape[1:])) * 4)  # 4-row slabs (11 with SSIM's window)
    seen = []
    monkeypatch.setattr(scoring, "_tensor", lambda a, tensor=scoring._tensor: seen.append(a.shape[0]) or tensor(a))
    by_slab = scoring.image_scores(pred, target, names, len(shape) - 1, mask=mask)
    assert max(seen) < shape[0] or shape[0] <= 2 * 11  # never the whole image when it is several slabs deep
    for n in names:
        assert by_slab[n] == pytest.approx(whole[n], rel=1e-5), n


@pytest.mark.parametrize("offset, span, dtype", [(0, 400, np.uint16), (60000, 400, np.uint16), (1e6, 10, np.float32)])
def test_test_ssim_is_exact_on_bright_and_offset_images(offset, span, dtype):
    """E[x^2] - mu^2 in float32 cancels away on a signal riding on a large offset; SSIM must match skimage's
    float64 value wherever the image sits."""
    from scipy.ndimage import gaussian_filter
    from skimage.metrics import structural_similarity

    from biapy.workflows.scoring import image_scores

    rng = np.random.default_rng(0)
    base = gaussian_filter(rng.random((64, 64)), 3)
    base = (base - base.min()) / np.ptp(base)
    gt = (base * span + offset).astype(dtype)
    pred = (gt.astype(np.float64) + rng.normal(0, span / 40, gt.shape)).astype(np.float32)
    ref = structural_similarity(gt.astype(np.float64), pred.astype(np.float64), data_range=float(np.ptp(gt)),
                                gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    ours = image_scores(pred[..., None], gt[..., None], ["ssim"], 2)["ssim"]
    assert ours == pytest.approx(ref, abs=2e-3)


def test_huge_pixel_values_give_finite_scores_in_2d_3d_and_under_a_mask():
    from biapy.workflows.scoring import image_scores

    rng = np.random.default_rng(1)
    names = ["psnr", "ssim", "mae", "mse"]
    for shape, ndim in (((40, 40), 2), ((12, 30, 30), 3)):
        gt = (1e30 + rng.random(shape) * 1e30).astype(np.float32)[..., None]
        pred = (gt * 1.01).astype(np.float32)
        for mask in (None, (rng.random(gt.shape) > 0.5).astype(np.float32)):
            scores = image_scores(pred, gt, names, ndim, mask=mask)
            assert all(math.isfinite(v) for v in scores.values()), scores
            assert 30 < scores["psnr"] < 60 and 0.9 < scores["ssim"] <= 1


def test_the_metrics_table_skips_missing_values_and_fits_big_numbers():
    from biapy.workflows.report import format_table, mean_columns, skipped_note

    rows = [{"file": "a", "psnr": 20.0, "hidden_psnr": 10.0, "mse": 2.5e56},
            {"file": "b", "psnr": 30.0, "hidden_psnr": float("nan"), "mse": 1.5e56}]
    means = mean_columns(rows)
    assert means == {"psnr": 25.0, "hidden_psnr": 10.0, "mse": 2e56}
    assert skipped_note(rows) == "Means over the images with a value; 1 image(s) have none for hidden_psnr"
    assert skipped_note(rows[:1]) == ""
    table = format_table({"psnr": 25.0, "mse": 2e56, "mae": 0.0001}, "T")
    assert table.splitlines()[2] == "mean       25.0000  2.0000e+56  1.0000e-04"
    # uint16 images: an MAE in the thousands and an MSE in the millions stay two columns, also when negative
    row = format_table({"mae": 1806.8289, "mse": 7682127.3902, "d": -123456.1234, "e": -99999.5}, "T").splitlines()[2]
    assert row.split()[1:] == ["1806.8289", "7.6821e+06", "-1.2346e+05", "-99999.5000"]


@pytest.mark.parametrize("level", [7.0, 0.0])
def test_a_near_perfect_restoration_of_a_constant_image_scores_high(level):
    """Its range is 0: scored against its level (1 for zeros), where a 1e-6 floor gave PSNR -10 dB, SSIM 0.001."""
    from biapy.workflows.scoring import image_scores

    target = np.full((9, 37, 41, 1), level, np.float32)
    pred = target + np.float32(3e-6)
    scores = image_scores(pred, target, ["psnr", "ssim", "mse"], 3)
    assert scores["psnr"] > 90 and scores["ssim"] > 0.99 and scores["mse"] < 1e-10
    varied = target + np.random.default_rng(0).random(target.shape).astype(np.float32)  # a real range is kept
    assert image_scores(varied, varied, ["psnr"], 3)["psnr"] > 90


def test_validation_scores_do_not_depend_on_the_batch_size():
    """Each validation patch is scored with its own data range, as each test image: one range per batch had given
    PSNR 38.2 dB in batches of 8 and 29.6 dB in batches of 1 for the same predictions."""
    from biapy.workflows.scoring import batch_image_metrics, image_scores

    gen = torch.Generator().manual_seed(0)
    target = torch.rand(8, 2, 24, 24, generator=gen) * torch.tensor([1, 0.2] * 4).reshape(8, 1, 1, 1)
    target[5] = 3.0  # a constant patch: scored against its level, as at test
    pred = target + 0.02 * torch.randn(target.shape, generator=gen)
    names = ["psnr", "ssim", "mae", "mse"]
    results = []
    for batch in (8, 4, 2, 1):
        averager = M.MetricAverager()
        for i in range(0, 8, batch):
            averager.update_many(batch_image_metrics(pred[i:i + batch], target[i:i + batch], names))
        results.append(averager.result())
    each = [image_scores(p.permute(1, 2, 0).numpy(), t.permute(1, 2, 0).numpy(), names, 2) for p, t in zip(pred, target)]
    for name in names:
        expected = float(np.mean([scores[name] for scores in each]))
        assert [r[name] for r in results] == pytest.approx([expected] * 4, rel=1e-4), name
