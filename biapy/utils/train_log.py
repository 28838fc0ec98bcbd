"""Per-epoch training records as JSON lines (one object per epoch), easy to read with pandas or jq."""
import json
import math

from biapy.utils.files import atomic_write_text


def _clean(value):
    """NaN/inf are not JSON: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_train_log(path, history) -> None:
    """Rewrite the whole log from `history` (list of epoch dicts), atomically.

    Rewriting rather than appending keeps the file identical to the checkpoint's history after a resume.
    """
    text = "".join(json.dumps(_clean(record), sort_keys=False) + "\n" for record in history)
    atomic_write_text(path, text)

