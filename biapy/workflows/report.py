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


def mean_columns(rows):
    numeric = [k for k, v in rows[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return {k: float(np.mean([r[k] for r in rows])) for k in numeric}


def format_table(means, title, groups=None):
    """A fixed-width table of mean metrics. `groups` maps a row label to a column prefix, e.g.
    {'restored': '', 'degraded input': 'input_'} prints one row per group over the same metrics."""
    groups = groups or {"mean": ""}
    prefixes = [p for p in groups.values() if p]
    metrics = [k for k in means if not any(k.startswith(p) for p in prefixes)]
    width = max(len(label) for label in groups) + 2
    lines = [title, " " * width + "".join(f"{m:>12}" for m in metrics)]
    for label, prefix in groups.items():
        cells = "".join(f"{means[prefix + m]:>12.4f}" if prefix + m in means else f"{'-':>12}" for m in metrics)
        lines.append(f"{label:<{width}}{cells}")
    return "\n".join(lines)


def print_metrics_table(rows, title, groups=None):
    text = format_table(mean_columns(rows), f"{title} over {len(rows)} image(s)", groups)
    log.info("\n%s", text)
    return text
