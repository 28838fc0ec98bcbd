"""Training charts: a figure redrawn as epochs accumulate looks exactly like one drawn fresh."""
import numpy as np
from skimage.io import imread

from biapy.utils.charts import HistoryCharts


def history(n, val_from=1):
    return [{"epoch": e, "train_loss": 1.0 / e, "val_loss": 1.2 / e if e >= val_from else None,
             "metrics": {"psnr": 20 + 0.3 * e} if e >= val_from else {}} for e in range(1, n + 1)]


def test_redrawn_charts_equal_fresh_ones_and_follow_the_history(tmp_path):
    grown = HistoryCharts(tmp_path / "grown", "job_1")
    first = grown.draw(history(3, val_from=3))
    assert [p.name for p in first] == ["job_1_loss.png", "job_1_psnr.png"]
    early = imread(first[0])
    written = grown.draw(history(40, val_from=3))  # past 30 epochs the markers go
    fresh = HistoryCharts(tmp_path / "fresh", "job_1").draw(history(40, val_from=3))
    assert [p.name for p in written] == [p.name for p in fresh]
    for a, b in zip(written, fresh):
        assert np.array_equal(imread(a), imread(b)), a.name
    assert not np.array_equal(imread(written[0]), early)

    fig, ax, lines = grown._figures["loss"]
    x, y = lines["validation"].get_data()
    assert list(x) == list(range(3, 41)) and np.allclose(y, [1.2 / e for e in range(3, 41)])
    assert lines["train"].get_marker() == "None"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["train", "validation"]
    assert ax.get_ylim()[1] >= 1.0 and ax.get_xlim()[1] >= 40


def test_no_chart_without_values(tmp_path):
    assert HistoryCharts(tmp_path, "j").draw([]) == []
    only_train = [{"epoch": 1, "train_loss": 0.5, "val_loss": None, "metrics": {}}]
    assert [p.name for p in HistoryCharts(tmp_path, "j").draw(only_train)] == ["j_loss.png"]


def test_epoch_line_prints_metrics_with_fixed_decimals():
    """'.4g' had printed psnr 12.66, then 6.208, then 12.9 from one epoch to the next."""
    from biapy.engine.reporting import summary_line

    record = {"epoch": 3, "train_loss": 0.51234, "val_loss": 0.4, "lr": 1e-3, "seconds": 1.26,
              "metrics": {"psnr": 12.9, "ssim": 0.70701, "mse": 1234567.0}}
    assert summary_line(record, 10, True) == ("Epoch 3/10  train 0.5123  val 0.4000  psnr 12.9000  ssim 0.7070  "
                                              "mse 1.235e+06  lr 1.0e-03  1.3s  *best")


def test_tensorboard_panels_scale_each_channel_on_its_own():
    """A bright stain, a dim one and an empty one: one scale for all had shown the dim one black (max 0.006);
    two channels, or more than three, had shown the first alone."""
    from biapy.utils.tensorboard import to_panel

    ramp = np.linspace(0, 1, 20 * 16, dtype=np.float32).reshape(20, 16)
    img = np.stack([200 + ramp * 55000, 77 + ramp * 232, np.zeros_like(ramp)], -1)
    panel = to_panel(img, 2)
    assert panel.shape == (20, 16, 3)
    np.testing.assert_allclose(panel[..., :2].max(axis=(0, 1)), 1)
    np.testing.assert_allclose(panel[..., 2], 0)
    np.testing.assert_allclose(panel[..., 1], ramp, atol=1e-5)
    two = to_panel(img[..., :2], 2)
    np.testing.assert_allclose(two[..., :2], panel[..., :2])
    np.testing.assert_allclose(two[..., 2], 0)
    five = to_panel(np.concatenate([img, img[..., :2]], -1), 2)
    np.testing.assert_allclose(five, panel)
    grey = to_panel(np.stack([ramp] * 4)[..., None] * 7, 3)  # 3D, one channel: the middle slice in grey
    np.testing.assert_allclose(grey, np.repeat(ramp[..., None], 3, -1), atol=1e-6)
    nan = img.copy()
    nan[..., 1] = np.nan
    assert np.isfinite(to_panel(nan, 2)).all()


def test_large_images_become_previews_of_at_most_512_pixels_a_side():
    """Full-size panels of a 2048² check image had added 18 MB to the TensorBoard file at every check."""
    from biapy.utils.tensorboard import PANEL_SIDE, to_panel

    big = np.zeros((2048, 1300, 1), np.float32)
    big[:1024] = 1  # top half bright: block means keep the halves apart
    panel = to_panel(big, 2)
    assert PANEL_SIDE == 512 and panel.shape == (512, 325, 3)
    assert panel[:256].min() == 1 and panel[256:].max() == 0
    assert to_panel(np.zeros((4, 513, 100, 2)), 3).shape == (256, 50, 3)
    assert to_panel(np.zeros((4096, 3, 1)), 2).shape == (512, 1, 3)  # thinner than a block: it had not reshaped
