"""Training charts (loss and each validation metric per epoch) and a parameters-per-module plot.

Figures are built with matplotlib's object API and its Agg canvas directly: no pyplot state, no GUI
backend, nothing to close. Fixed margins instead of tight_layout, which measured as half the cost
of a chart redrawn during training. Each figure is written atomically.
"""
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

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


def plot_history(history, charts_dir, job_id) -> list:
    """`{job_id}_loss.png` (train and val loss) and `{job_id}_<metric>.png` per validation metric."""
    if not history:
        return []
    written = []
    fig, ax = _axes((6, 4))
    for key, label in (("train_loss", "train"), ("val_loss", "validation")):
        x, y = _series(history, lambda r, k=key: r.get(k))
        if x:
            ax.plot(x, y, marker="o" if len(x) < 30 else None, label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title(f"{job_id}: loss")
    ax.legend()
    ax.grid(alpha=0.3)
    path = charts_dir / f"{job_id}_loss.png"
    _save(fig, path)
    written.append(path)
    names = sorted({n for r in history for n in (r.get("metrics") or {})})
    for name in names:
        x, y = _series(history, lambda r, n=name: (r.get("metrics") or {}).get(n))
        if not x:
            continue
        fig, ax = _axes((6, 4))
        ax.plot(x, y, marker="o" if len(x) < 30 else None, color="tab:green")
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.set_title(f"{job_id}: validation {name}")
        ax.grid(alpha=0.3)
        path = charts_dir / f"{job_id}_{name.replace('/', '_')}.png"
        _save(fig, path)
        written.append(path)
    return written


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
    ax.set_xlabel("parameters")
    ax.set_title(f"{type(model).__name__}: {total:,} parameters")
    _save(fig, path)
