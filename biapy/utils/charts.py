"""Training charts (loss and each validation metric per epoch) and a parameters-per-module plot.

Figures are built with matplotlib's object API and its Agg canvas directly: no pyplot state, no GUI
backend, nothing to close. Fixed margins instead of tight_layout, which measured as half the cost
of a chart redrawn during training. Each figure is written atomically.
"""
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter, MaxNLocator

from biapy.utils.files import atomic_path

_MARGINS = {"left": 0.14, "right": 0.97, "bottom": 0.13, "top": 0.91}


def _axes(size, margins=_MARGINS):
    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    fig.subplots_adjust(**margins)
    return fig, fig.add_subplot()


def _save(fig, path):
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def _series(history, getter):
    pts = [(r["epoch"], getter(r)) for r in history]
    return [e for e, v in pts if v is not None], [v for e, v in pts if v is not None]


class HistoryCharts:
    """`{job_id}_loss.png` (train and val loss) and `{job_id}_<metric>.png` per validation metric, redrawn
    as epochs accumulate.

    Each figure and line is made once; a redraw replaces the lines' data, so axis ticks and text are
    reused: loss and one metric chart take about 100 instead of 150 ms here, which a job of short
    epochs pays every LOG.CHART_CREATION_FREQ epochs. The PNGs are the same pixels as fresh figures.
    """

    def __init__(self, charts_dir, job_id):
        self.charts_dir, self.job_id = Path(charts_dir), job_id
        self._figures = {}  # file stem -> (figure, axes, {series label: line})

    def draw(self, history) -> list:
        """Paths written; a chart whose series have no value yet is skipped."""
        if not history:
            return []
        charts = [("loss", "loss", "loss", [("train", lambda r: r.get("train_loss")),
                                            ("validation", lambda r: r.get("val_loss"))], {})]
        names = sorted({n for r in history for n in (r.get("metrics") or {})})
        charts += [(name.replace("/", "_"), name, f"validation {name}",
                    [(name, lambda r, n=name: (r.get("metrics") or {}).get(n))], {"color": "tab:green"})
                   for name in names]
        written = []
        for stem, ylabel, title, series, style in charts:
            points = {label: _series(history, getter) for label, getter in series}
            points = {label: xy for label, xy in points.items() if xy[0]}
            if points:
                written.append(self._redraw(stem, ylabel, title, points, style, legend=len(series) > 1))
        return written

    def _redraw(self, stem, ylabel, title, points, style, legend):
        if stem not in self._figures:
            fig, ax = _axes((6, 4))
            ax.set_xlabel("epoch")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{self.job_id}: {title}", y=1.0)  # a fixed position skips a layout pass per redraw
            ax.grid(alpha=0.3)
            self._figures[stem] = (fig, ax, {})
        fig, ax, lines = self._figures[stem]
        for label, (x, y) in points.items():
            if label not in lines:  # a series appears once it has values (validation may start later)
                lines[label] = ax.plot(x, y, label=label, **style)[0]
            lines[label].set_data(x, y)
            lines[label].set_marker("o" if len(x) < 30 else "None")
        if legend:  # remade: its handles are copies of the lines' style when it was made
            ax.legend()
        ax.relim()
        ax.autoscale_view()
        path = self.charts_dir / f"{self.job_id}_{stem}.png"
        _save(fig, path)
        return path


def plot_model(model, path) -> None:
    """Horizontal bar chart of the parameter count of each top-level submodule."""
    rows = [(name, sum(p.numel() for p in child.parameters())) for name, child in model.named_children()]
    own = sum(p.numel() for p in model.parameters(recurse=False))
    if own:
        rows.append(("(own)", own))
    rows = rows or [(type(model).__name__, sum(p.numel() for p in model.parameters()))]
    total = sum(n for _, n in rows)
    height = 1 + 0.4 * len(rows)
    fig, ax = _axes((6, height), {"left": 0.2, "right": 0.85, "bottom": 0.7 / height, "top": 1 - 0.45 / height})
    ax.barh([r[0] for r in rows][::-1], [r[1] for r in rows][::-1], color="tab:blue")
    for i, (_, n) in enumerate(rows[::-1]):
        ax.text(n, i, f" {n:,}", va="center", fontsize=8)
    # Room right of the longest bar for its count; few ticks, as 100k or 1M, so their labels never run together.
    ax.set_xlim(0, max(n for _, n in rows) * 1.35 or 1)
    ax.xaxis.set_major_locator(MaxNLocator(4))
    ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    ax.set_xlabel("parameters")
    ax.set_title(f"{type(model).__name__}: {total:,} parameters")
    _save(fig, path)
