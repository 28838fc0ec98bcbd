"""Process memory on the CPU: keep freed heap memory for reuse; drop the CUDA libraries' pages when no GPU is used.

keep_freed_memory: glibc serves blocks above a threshold (128 KB, adapting up to 32 MB) with fresh mmap pages and
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
import re
import sys
from typing import NamedTuple

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


def _libc_function(name, argtypes, restype):
    """The C library's function `name`, typed; None where the library or the function is missing."""
    try:
        fn = getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = argtypes, restype
    return fn


def keep_freed_memory() -> bool:
    """Tune glibc's malloc for reuse; True when applied (False on other C libraries and systems, and where the
    environment already sets the thresholds)."""
    if not sys.platform.startswith("linux"):
        return False
    user = _set_by_user()
    if user:
        log.debug("malloc thresholds left as %s sets them", user)
        return False
    mallopt = _libc_function("mallopt", [ctypes.c_int, ctypes.c_int], ctypes.c_int)
    if mallopt is None:  # musl and others have no mallopt
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) == 1 and mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1
    log.debug("malloc thresholds %s", "raised" if ok else "unchanged")
    return ok


# The CUDA libraries a CUDA build of torch loads at import: pip's nvidia-* wheels, or by name (conda, system).
_GPU_LIBRARY = re.compile(r"/site-packages/nvidia/.*\.so|/lib(torch_cuda|c10_cuda|cudnn|cublas|cudart|nccl|nvrtc|"
                          r"nvJitLink|cusparse|cufft|curand|cusolver|cupti|nvshmem)[^/]*\.so")
_MAPPING = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S+) \S+ \S+ \S+\s*(.*)$")
_MADV_DONTNEED = 4


class Mapping(NamedTuple):
    start: int
    end: int
    writable: bool
    rss: int  # bytes resident
    anonymous: int  # bytes of private (copy-on-write or never file-backed) pages


def gpu_library_mappings():
    """This process's mappings of CUDA libraries, as [Mapping] (Linux; [] elsewhere)."""
    try:
        with open("/proc/self/smaps", encoding="utf-8", errors="replace") as fh:  # any locale, any mapped path
            lines = fh.read().splitlines()
    except OSError:
        return []
    maps, cur = [], None
    for line in lines:
        m = _MAPPING.match(line)
        if m:
            cur = None
            if _GPU_LIBRARY.search(m.group(4)):
                cur = [int(m.group(1), 16), int(m.group(2), 16), "w" in m.group(3), 0, 0]
                maps.append(cur)
        elif cur is not None and line.startswith(("Rss:", "Anonymous:")):
            cur[3 if line.startswith("Rss:") else 4] = int(line.split()[1]) * 1024
    return [Mapping(*m) for m in maps]


def drop_gpu_library_pages() -> int:
    """On a run without a GPU, take the CUDA libraries' resident pages out of this process; bytes released.

    A CUDA build of torch (pip's default on Linux) touches ~140 MB of its CUDA libraries' code and read-only
    data while it loads them, GPU or not, and they stay counted in RSS. Only read-only mappings without
    private (copy-on-write) pages are released, so nothing they hold differs from the file: MADV_DONTNEED
    unmaps them, the page cache keeps them, and a later touch maps them back without reading the disk.
    """
    maps = [m for m in gpu_library_mappings() if not m.writable and m.rss and not m.anonymous]
    if not maps:
        return 0
    madvise = _libc_function("madvise", [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int)
    if madvise is None:
        return 0
    released = sum(m.rss for m in maps if madvise(m.start, m.end - m.start, _MADV_DONTNEED) == 0)
    log.debug("released %.0f MB of CUDA library pages (no GPU in use)", released / 2 ** 20)
    return released


def tune_process_memory(device) -> None:
    """What a job (and a benchmark standing in for one) does to its process's memory before its first step."""
    keep_freed_memory()
    if device.type == "cpu":
        drop_gpu_library_pages()
