"""keep_freed_memory: a step that allocates and frees the same large buffers stops page-faulting."""
import os
import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent("""
    import ctypes, resource, sys
    from biapy.utils.memory import keep_freed_memory
    applied = keep_freed_memory() if sys.argv[1] == "1" else False
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    SIZE = 4 << 20

    def step():  # like a training step: many activations alive at once, all freed at the end
        blocks = [libc.malloc(SIZE) for _ in range(16)]
        for b in blocks:
            ctypes.memset(b, 1, SIZE)
        for b in blocks:
            libc.free(b)
    step(), step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        step()
    print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")



def _faults(apply, env=None):
    out = subprocess.run([sys.executable, "-c", PROBE, "1" if apply else "0"], capture_output=True, text=True,
                         check=True, env=env)
    applied, faults = out.stdout.split()
    return applied == "True", int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_keep_freed_memory_removes_page_faults_of_repeated_allocations():
    _, plain = _faults(False)
    applied, tuned = _faults(True)
    if not applied:
        pytest.skip("this C library has no mallopt")
    assert plain > 10 * 8000  # 64 MB of fresh pages per step: ~16,000 faults
    assert tuned < plain / 100  # measured: 163,520 vs 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
@pytest.mark.parametrize("name,value", [("MALLOC_MMAP_THRESHOLD_", "131072"),
                                        ("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=131072")])
def test_thresholds_set_in_the_environment_are_kept(name, value):
    applied, faults = _faults(True, env={**os.environ, name: value})
    assert not applied
    assert faults > 10 * 8000  # the user's 128 KB threshold stands: every 4 MB block is a fresh map
