"""Writing files so that a crash never leaves a half-written one behind."""
import os
import shutil
import zlib
from contextlib import contextmanager
from glob import escape as glob_escape
from pathlib import Path


@contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; on success it replaces `path` in one step."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path, os.getpid())
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def remove_stale_temporaries(path):
    """Remove the temporary files `atomic_path` left beside `path` from processes that no longer run (a run
    killed while it wrote): a checkpoint's are hundreds of MB, and their process-id names never recur. Only
    for files one process of this machine writes at a time (a run's checkpoints)."""
    path = Path(path)
    _remove_if_stale(path.parent.glob(f"{glob_escape(_temporary(path, '').name)}*"))


def remove_stale_temporaries_under(folder, every=False):
    """The same for every file under `folder` (a run's results, at its start). `every`: also those of processes
    that run, for a folder whose writers take turns under a lock this process holds (crappify's copies, whose
    temporaries from a killed build, beside the user's images by default, can be gigabytes)."""
    if Path(folder).is_dir():
        _remove_if_stale(Path(folder).rglob(".*.tmp*"), every)


def _remove_if_stale(paths, every=False):
    for tmp in paths:
        pid = tmp.name.rpartition(".tmp")[2]
        if pid.isdigit() and int(pid) != os.getpid() and (every or not _running(int(pid))) and tmp.is_file():
            tmp.unlink(missing_ok=True)


def _temporary(path, pid):
    """The temporary file `atomic_path` writes for `path` in process `pid`. A name near the 255-byte limit is
    shortened (its start and a checksum of the whole): with the extra bytes, it had failed as 'too long'."""
    name = path.name
    if len(os.fsencode(name)) > 200:  # cut in bytes: 64 characters may be 256 of them
        name = f"{os.fsdecode(os.fsencode(name)[:64])}~{zlib.crc32(os.fsencode(name)):08x}"
    return path.with_name(f".{name}.tmp{pid}")


def _running(pid) -> bool:
    if os.name == "nt":
        return _running_windows(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: it runs
        return True
    return True


_ERROR_INVALID_PARAMETER = 87  # OpenProcess's answer for a process ID that is not in use


def _running_windows(pid) -> bool:
    """os.kill(pid, 0) there sends CTRL_C_EVENT: it never looks `pid` up (every killed run's temporaries were
    kept) and may interrupt the console's processes. Asks for the process itself instead."""
    import _winapi

    try:
        handle = _winapi.OpenProcess(_winapi.SYNCHRONIZE, False, pid)
    except OSError as err:  # access denied: another user's process, which runs
        return getattr(err, "winerror", None) != _ERROR_INVALID_PARAMETER
    try:
        return _winapi.WaitForSingleObject(handle, 0) == _winapi.WAIT_TIMEOUT  # else it has exited
    finally:
        _winapi.CloseHandle(handle)


def utf8_text(text) -> str:
    """`text` writable as UTF-8: a file name that is not UTF-8 (Latin-1 from an old share, held by Python as
    escapes) shows its odd bytes as U+FFFD; writing it as it was had stopped the run at its CSV or TensorBoard."""
    return os.fsencode(text).decode("utf-8", "replace")


def atomic_write_text(path, text):
    # newline="": written as given; Windows' text mode made the "\r\n" of a CSV "\r\r\n" (blank rows).
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as fh:
        fh.write(utf8_text(text))


def replace_folder(new, dst):
    """Put folder `new` in the place of `dst` by renames: `dst` is never a mix of old and new files."""
    new, dst = Path(new), Path(dst)
    old = dst.with_name(f".{dst.name}.old{os.getpid()}")
    if dst.exists():
        os.replace(dst, old)
    os.replace(new, dst)
    shutil.rmtree(old, ignore_errors=True)
