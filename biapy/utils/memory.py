"""Keep freed heap memory in the process instead of handing it back to the OS after every step.

glibc serves blocks above a threshold (128 KB, adapting up to 32 MB) with fresh mmap pages and
returns freed heap tops to the OS, so a CPU training step that allocates its activations anew
each time pays thousands of page faults (about 7,000 per step for the 2D U-Net of
bench/compare_biapy.py, ~9% of the step). Raising the mmap and trim thresholds lets the
allocator reuse the same pages. The price is fragmentation: the heap is sized by the first steps'
peak plus holes, and memory freed after the peak stays resident until exit. Measured on the 3D masked
U-Net of bench/run_all.py (24 steps, twice each): peak RSS 1089 against 1037 MB, job 34.6 against 37.9 s.
Whoever sets glibc's malloc thresholds in the environment (MALLOC_MMAP_THRESHOLD_=8388608, say, to
trade speed for memory) keeps them: mallopt would silently override those variables.
"""
import ctypes
import ctypes.util
import logging
import os
import sys

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 * 2 ** 20  # glibc's ceiling on 64-bit systems
_TRIM_THRESHOLD = 2 ** 30
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")


def _set_by_user() -> str:
    """The environment variable through which the user tuned glibc's malloc thresholds, or ''."""
    for name in _USER_SETTINGS:
        if name in os.environ:
            return name
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    return "GLIBC_TUNABLES" if any(t in tunables for t in ("malloc.mmap_", "malloc.trim_", "malloc.top_pad")) else ""


def keep_freed_memory() -> bool:
    """Tune glibc's malloc for reuse; True when applied (False on other C libraries and systems, and where the
    environment already sets the thresholds)."""
    if not sys.platform.startswith("linux"):
        return False
    user = _set_by_user()
    if user:
        log.debug("malloc thresholds left as %s sets them", user)
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) == 1 and mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1
    log.debug("malloc thresholds %s", "raised" if ok else "unchanged")
    return ok
