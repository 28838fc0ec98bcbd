"""keep_freed_memory: a step that allocates and frees the same large buffers stops page-faulting."""
import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent("""
    import resource, sys
    import torch
    from biapy.utils.memory import keep_freed_memory
    applied = keep_freed_memory() if sys.argv[1] == "1" else False
    def step():  # like a training step: many activations alive at once, all freed at the end
        live = [torch.ones(2 ** 20) for _ in range(16)]  # 16 x 4 MB
        del live
    step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        step()
    print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def _faults(apply):
    out = subprocess.run([sys.executable, "-c", PROBE, "1" if apply else "0"], capture_output=True, text=True,
                         check=True)
    applied, faults = out.stdout.split()
    return applied == "True", int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_keep_freed_memory_removes_page_faults_of_repeated_allocations():
    _, plain = _faults(False)
    applied, tuned = _faults(True)
    if not applied:
        pytest.skip("this C library has no mallopt")
    assert plain > 10 * 8000  # 64 MB of fresh pages per step: ~16,000 faults
    assert tuned < plain / 5  # measured: ~160,000 vs ~7,000 (a one-off heap growth)
