"""keep_freed_memory: a step that allocates and frees the same large buffers stops page-faulting.
drop_gpu_library_pages: a CUDA build's library pages leave RSS and torch still computes the same."""
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


DROP_PROBE = textwrap.dedent("""
    import json, torch
    from biapy.utils.memory import drop_gpu_library_pages, gpu_library_mappings

    def rss():
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmRSS"))

    torch.manual_seed(0)
    conv, x = torch.nn.Conv2d(3, 5, 3), torch.randn(2, 3, 16, 16)
    expected = conv(x).detach()
    resident, before = sum(m.rss for m in gpu_library_mappings()), rss()
    released = drop_gpu_library_pages()
    after = rss()
    print(json.dumps({"cuda_build": torch.version.cuda is not None, "resident": resident, "released": released,
                      "rss_drop": before - after, "same": bool(torch.equal(conv(x), expected)),
                      "left": sum(m.rss for m in gpu_library_mappings())}))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
def test_gpu_library_pages_leave_rss_and_torch_still_computes():
    import json
    out = json.loads(subprocess.run([sys.executable, "-c", DROP_PROBE], capture_output=True, text=True,
                                    check=True).stdout)
    assert out["same"]
    if not out["cuda_build"]:  # a CPU-only torch maps no CUDA library: nothing to release
        assert out["resident"] == out["released"] == 0
        return
    assert out["resident"] > 20 * 2 ** 20  # measured: ~150 MB of torch 2.14's CUDA libraries at import
    assert out["released"] > out["resident"] / 2  # measured: 136 of 155 MB (writable and relocated pages stay)
    assert out["rss_drop"] > 0.8 * out["released"]
    # The CPU convolution after the release maps a few of those pages back (0.15 MB under Python 3.11, 1.1 MB under
    # 3.13), not the hundred-odd MB released.
    assert out["left"] <= out["resident"] - out["released"] + 4 * 2 ** 20


@pytest.mark.parametrize("path,is_gpu", [
    ("/venv/lib/python3.11/site-packages/nvidia/cu13/lib/libcublasLt.so.13", True),
    ("/venv/lib/python3.11/site-packages/torch/lib/libtorch_cuda.so", True),
    ("/opt/conda/lib/libcudnn_ops.so.9", True),
    ("/home/nvidia/venv/lib/python3.11/site-packages/torch/lib/libtorch_cpu.so", False),  # a user named nvidia
    ("/usr/lib/x86_64-linux-gnu/libc.so.6", False)])
def test_only_cuda_libraries_are_released(path, is_gpu):
    from biapy.utils.memory import _GPU_LIBRARY
    assert bool(_GPU_LIBRARY.search(path)) == is_gpu


def test_mapped_files_with_non_ascii_paths_are_read_under_any_locale(tmp_path):
    """/proc/self/smaps names every mapped file: under the C locale one named 'données' had stopped the job."""
    if not os.path.exists("/proc/self/smaps"):
        pytest.skip("Linux only")
    data = tmp_path / "données.bin"
    data.write_bytes(b"\0" * 4096)
    code = ("import mmap, sys; fh = open(sys.argv[1], 'rb'); m = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)\n"
            "from biapy.utils.memory import gpu_library_mappings; print(type(gpu_library_mappings()).__name__)")
    env = dict(os.environ, LC_ALL="C", LANG="C", PYTHONUTF8="0", PYTHONCOERCECLOCALE="0")
    done = subprocess.run([sys.executable, "-c", code, str(data)], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "list"
