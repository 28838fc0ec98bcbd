"""Errors the user can act on. `main.py` prints them as one line and exits with `exit_code`.

Anything else that escapes is a bug: it is shown with a traceback.
"""
import reprlib
from pathlib import Path

# Values as error messages show them: cut short, so that a long list or string keeps the message one short line.
_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxtuple, _SHORT.maxdict = 3, 8, 8, 4
_SHORT.maxstring = _SHORT.maxother = 80
_SHORT.maxlong = 20


def shown(value) -> str:
    """repr(value), cut short for an error message (a list or tuple keeps its brackets)."""
    return _SHORT.repr(value)


def named_few(names, limit=5) -> str:
    """'a.tif, b.tif, +3 more': a message's or log line's share of a long list of file names (or of other names
    without a '/', such as tensor names)."""
    names = [Path(n).name for n in names]
    more = f", +{len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def first_line(err, limit=200) -> str:
    """An exception's first line (its type's name when it has no text), cut at `limit` characters: what a one-line
    error quotes of a library's message."""
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:limit]


class BiapyError(Exception):
    """A problem with the user's input or environment, explained in one line."""

    exit_code = 1


class ConfigError(BiapyError):
    """The configuration is wrong: a key, a type, a value or a path it names."""

    exit_code = 2


class DataError(BiapyError):
    """An image or label file cannot be used as it is."""

    exit_code = 3


class CheckpointError(BiapyError):
    """A checkpoint is missing, corrupt or does not fit the model."""

    exit_code = 4


class TrainingError(BiapyError):
    """Training cannot go on (non-finite loss, ...); the last good checkpoint is kept."""

    exit_code = 5


class AgreedStop(KeyboardInterrupt):
    """Every rank stops here together after a signal, the last checkpoint saved: a clean end, unlike a failure."""
