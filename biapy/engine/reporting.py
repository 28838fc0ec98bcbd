"""What the trainer shows and writes each epoch (rank 0): the summary line, train logs, TensorBoard, charts."""
import logging

from biapy.utils.charts import HistoryCharts, plot_model
from biapy.utils.tensorboard import TensorBoard
from biapy.utils.train_log import write_train_log

log = logging.getLogger(__name__)


def describe_model(model, job, is_main, architecture) -> None:
    """Model summary with parameter counts in the log, and model_plot_<job id>.png in the charts."""
    if not is_main:
        return
    from biapy.models.summary import count_parameters, model_summary
    log.info("Model %s (%s): %s parameters (%s trainable)\n%s", architecture, type(model).__name__,
             f"{count_parameters(model):,}",
             f"{count_parameters(model, trainable_only=True):,}", model_summary(model))
    try:
        plot_model(model, job.charts / f"model_plot_{job.id}.png")
    except Exception as err:  # a chart must never stop training
        log.warning("Could not draw the model plot: %s", err)


def summary_line(record, epochs, is_best) -> str:
    parts = [f"Epoch {record['epoch']}/{epochs}", f"train {record['train_loss']:.4f}"]
    if record.get("val_loss") is not None:
        parts.append(f"val {record['val_loss']:.4f}")
    # Fixed decimals, as the losses: '.4g' had printed psnr 12.66, then 6.208, then 12.9.
    parts += [f"{name} {value:.4f}" if abs(value) < 1e5 else f"{name} {value:.4g}"
              for name, value in (record.get("metrics") or {}).items()]
    parts += [f"lr {record['lr']:.1e}", f"{record['seconds']:.1f}s"]
    if is_best:
        parts.append("*best")
    return "  ".join(parts)


class EpochReporter:
    """Every output is a no-op off rank 0."""

    def __init__(self, cfg, job, is_main):
        self.cfg, self.job, self.is_main = cfg, job, is_main
        self.tb = TensorBoard(job.tensorboard, enabled=is_main)
        self.train_log = job.train_logs / f"{job.id}_train_log.jsonl"
        self._charted = -1  # history length when the charts were last drawn
        self._charts = HistoryCharts(job.charts, job.id)

    def epoch_end(self, record, history, is_best) -> None:
        if not self.is_main:
            return
        log.info(summary_line(record, self.cfg.TRAIN.EPOCHS, is_best))
        write_train_log(self.train_log, history)
        step = record["epoch"]  # 1-based, as in the summary line and checkpoint names
        self.tb.add_scalar("loss/train", record["train_loss"], step)
        self.tb.add_scalar("loss/val", record.get("val_loss"), step)
        self.tb.add_scalar("lr", record["lr"], step)
        self.tb.add_scalars(record.get("metrics") or {}, step, prefix="metrics/")
        self.tb.flush()
        freq = self.cfg.LOG.CHART_CREATION_FREQ
        if freq > 0 and step % freq == 0:
            self.charts(history)

    def charts(self, history) -> None:
        if not self.is_main or len(history) == self._charted:
            return
        self._charted = len(history)
        try:
            self._charts.draw(history)
        except Exception as err:  # a chart must never stop training
            log.warning("Could not draw the training charts: %s", err)

    def close(self, history) -> None:
        if self.is_main:
            if history:
                write_train_log(self.train_log, history)
            self.charts(history)
        self.tb.close()
