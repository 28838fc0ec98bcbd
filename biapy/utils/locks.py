"""Advisory file locks between processes: fcntl.flock on POSIX, msvcrt.locking on Windows. The OS lets go of a
lock when its process ends, however it ends (kill -9 too).

`lock` waits for (or tries) the lock of an open file; `try_lock_path` takes the lock of a path at once, or says
who holds it."""
import errno
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

_HOLDER_BYTES = 4096  # more than the holder's line ever takes


def lock(fh, wait=True) -> bool:
    """Lock the open file `fh` (a file object or descriptor) until it is closed: wait for it or, wait=False,
    raise BlockingIOError at once when another open file holds it. False where no lock can be taken (no fcntl
    nor msvcrt, or a file system without locks, as some network shares): the caller goes on unguarded."""
    try:
        import fcntl  # here, not at the top: tests emulate Windows by hiding it
    except ImportError:
        fcntl = None
    if fcntl is not None:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            raise
        except OSError:
            return False
    try:
        import msvcrt  # Windows
    except ImportError:
        return False
    return _lock_windows(msvcrt, fh if isinstance(fh, int) else fh.fileno(), wait)


def _lock_windows(msvcrt, fd, wait) -> bool:
    # Byte 0 (beyond the end of the file is allowed); Windows then refuses others to read that byte.
    while True:  # LK_LOCK gives up after 10 s (EDEADLOCK); the holder may keep it for minutes or days
        try:
            msvcrt.locking(fd, msvcrt.LK_LOCK if wait else msvcrt.LK_NBLCK, 1)
            return True
        except OSError as err:
            if not wait and err.errno == errno.EACCES:  # LK_NBLCK's word for 'held'
                raise BlockingIOError(errno.EWOULDBLOCK, "the file is locked by another process") from None
            if not (wait and err.errno == errno.EDEADLOCK):
                return False


class LockBusy(Exception):
    """Another process holds the lock of `path`; `holder`: its pid, host and start time as it wrote them ({} when
    it had not written them yet)."""

    def __init__(self, path, holder):
        super().__init__(f"{path} is locked by another process")
        self.path, self.holder = path, holder


@dataclass
class HeldLock:
    """The lock of `path`, held through the open descriptor `fd`. `made`: this process made the file. `locked`:
    False on a file system without locks, where nothing is held."""
    path: Path
    fd: int
    made: bool
    locked: bool

    def release(self, remove=False):
        """Let go of the lock, emptied of this process's details (a run kept byte-identical when a later one
        failed); remove=True: the file too, unlinked while still held, so a process that opened it meanwhile
        finds the path gone (`try_lock_path`) instead of running beside the next one to make it."""
        _HELD.discard(self.fd)
        removed = remove and _unlinked(self.path)
        try:
            if self.locked and not removed:
                os.ftruncate(self.fd, 0)
        finally:
            os.close(self.fd)
        if remove and not removed:
            _unlinked(self.path)  # Windows refuses to unlink an open file; one another process opens now stays


def try_lock_path(path) -> HeldLock:
    """The lock of the file `path` (made if missing), taken without waiting, this process's pid, host and start
    time written in it; LockBusy when another process holds it."""
    path = Path(path)
    while True:
        fd, made = _open_or_make(path)
        if fd is None:
            continue  # unlinked between seeing it and opening it
        try:
            held = _try_lock_fd(path, fd, made)
        except BaseException:
            os.close(fd)
            raise
        if held is not None:
            return held
        os.close(fd)


def _try_lock_fd(path, fd, made):
    """A HeldLock of `fd`, or None when the lock taken is that of a file the path no longer names: its holder had
    unlinked it while this process was opening it, and a third may have made and locked the new one."""
    try:
        locked = lock(fd, wait=False)
    except BlockingIOError:
        raise LockBusy(path, _read_holder(fd)) from None
    if locked and not _names(path, fd):
        return None
    if locked:
        _write_holder(fd)
        _HELD.add(fd)
    return HeldLock(path, fd, made, locked)


def _open_or_make(path):
    """(descriptor, made), or (None, False) when the file vanished between the two opens."""
    flags = os.O_RDWR | getattr(os, "O_BINARY", 0)
    try:
        return os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o644), True
    except FileExistsError:
        pass
    try:
        return os.open(path, flags), False
    except FileNotFoundError:
        return None, False


def _names(path, fd) -> bool:
    """Whether `path` still names the file open as `fd`. Windows cannot unlink a file another process has open,
    so there it always does (and its file IDs from a path and from a handle need not compare equal)."""
    if os.name == "nt":
        return True
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)


def _write_holder(fd):
    # After byte 0, which Windows keeps others from reading while it is locked.
    since = time.strftime("%Y-%m-%d %H:%M:%S")
    line = b"\n" + json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": since}).encode() + b"\n"
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, line)
    os.ftruncate(fd, len(line))


def _read_holder(fd) -> dict:
    try:
        os.lseek(fd, 1, os.SEEK_SET)
        holder = json.loads(os.read(fd, _HOLDER_BYTES))
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):  # not written yet (it has just taken the lock), or by another program
        return {}


def _unlinked(path) -> bool:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError:
        return False
    return True


# Descriptors of the locks this process holds. A forked child (a DataLoader worker) shares each one's lock, which
# then outlived the run while the child lived on: for seconds after kill -9, a worker kept refusing the next run.
_HELD = set()


def _close_held_in_child():
    for fd in _HELD:
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_held_in_child)
