"""Test results: per-image rows gathered from all ranks, a CSV, and a printed table of means."""
import csv
import io
import logging

import numpy as np

from biapy.utils.files import atomic_write_text

log = logging.getLogger(__name__)


def gather_rows(rows, dist):
    """Every rank's rows on rank 0 (others get [])."""
    if dist.world_size == 1:
        return rows
    import torch.distributed as tdist
    everyone = [None] * dist.world_size
    tdist.all_gather_object(everyone, rows)
    return [r for part in everyone for r in part] if dist.is_main else []


def write_metrics_csv(path, rows):
    columns = list(rows[0])
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_text(path, buf.getvalue())


def _numeric(rows):
    return [k for k, v in rows[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]


def mean_columns(rows):
    """Per-column means over the images that have a value (NaN: e.g. no hidden pixel in a small image)."""
    means = {}
    for k in _numeric(rows):
        values = [r[k] for r in rows if not np.isnan(r[k])]
        means[k] = float(np.mean(values)) if values else float("nan")
    return means


def skipped_note(rows):
    """One line naming the columns some images had no value for, or '' when every image has all."""
    missing = {k: sum(bool(np.isnan(r[k])) for r in rows) for k in _numeric(rows)}
    missing = {k: n for k, n in missing.items() if n}
    if not missing:
        return ""
    by_count = {}
    for k, n in missing.items():
        by_count.setdefault(n, []).append(k)
    return "Means over the images with a value; " + "; ".join(
        f"{n} image(s) have none for {', '.join(keys)}" for n, keys in by_count.items())


def _cell(value) -> str:
    """12 characters with at least one space before the number: fixed-point, or scientific where fixed-point
    would not leave that space (|value| >= 1e5, e.g. the MSE of uint16 images) or would show only zeros."""
    if np.isfinite(value) and value != 0 and not 1e-3 <= abs(value) < 1e5:
        return f"{value:>12.4e}"
    return f"{value:>12.4f}"


def format_table(means, title, groups=None):
    """A fixed-width table of mean metrics. `groups` maps a row label to a column prefix, e.g.
    {'restored': '', 'degraded input': 'input_'} prints one row per group over the same metrics."""
    groups = groups or {"mean": ""}
    prefixes = [p for p in groups.values() if p]
    metrics = [k for k in means if not any(k.startswith(p) for p in prefixes)]
    width = max(len(label) for label in groups) + 2
    lines = [title, " " * width + "".join(f"{m:>12}" for m in metrics)]
    for label, prefix in groups.items():
        cells = "".join(_cell(means[prefix + m]) if prefix + m in means else f"{'-':>12}" for m in metrics)
        lines.append(f"{label:<{width}}{cells}")
    return "\n".join(lines)


def print_metrics_table(rows, title, groups=None):
    text = format_table(mean_columns(rows), f"{title} over {len(rows)} image(s)", groups)
    note = skipped_note(rows)
    text += f"\n{note}" if note else ""
    log.info("%s", text)
    return text
