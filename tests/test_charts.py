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
