"""Parameter counts and a short per-module table for logs and reports."""
from torch import nn


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def model_summary(model: nn.Module) -> str:
    """One row per top-level submodule (name, type, parameters, trainable), then the total."""
    rows = [("module", "type", "params", "trainable")]
    for name, child in model.named_children():
        rows.append((name, type(child).__name__, f"{count_parameters(child):,}",
                     f"{count_parameters(child, trainable_only=True):,}"))
    own = sum(p.numel() for p in model.parameters(recurse=False))
    if own:
        rows.append(("(own)", "Parameter", f"{own:,}", ""))
    rows.append(("total", type(model).__name__, f"{count_parameters(model):,}",
                 f"{count_parameters(model, trainable_only=True):,}"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]

    def fmt(row):
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    lines = [fmt(r) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.insert(len(lines) - 1, "-" * len(lines[0]))
    return "\n".join(lines)
