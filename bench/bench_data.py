"""Data pipeline benchmark: patch throughput and peak memory, images in memory vs read lazily.

Writes one synthetic 3D uint16 TIFF (>= 2 GB by default; `--small` for a quick run) slice by
slice through tifffile.memmap, so making it never holds the volume in memory. Then, for
DATA.TRAIN.IN_MEMORY True and False, a fresh subprocess builds a `PatchDataset` on it (timing the
construction: decoding or mapping, plus the normalization statistics) and draws random training
patches as the trainer would, reporting patches/s and the process's peak resident memory.
A third subprocess makes the crappify pretext's degraded copy of the volume (noise, down- and
up-sampling), which is streamed slab by slab from disk to disk, and reports its time and peak memory.
The lazy mode and the degraded copy are expected to stay under 1 GB whatever the file size (exit
status 1 otherwise).
Timings are printed, never asserted. The file is read from the page cache after being written,
so the figures show the pipeline's own cost rather than the disk's. Temporary data is deleted.

    python bench/bench_data.py            # 2 GiB volume, about a minute or two
    python bench/bench_data.py --small    # 64 MiB volume, seconds
"""
import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
LAZY_LIMIT_MB = 1024


def make_volume(path, shape, seed=0):
    """Fluorescence-like uint16 stack written one z slice at a time into a memory-mapped ImageJ TIFF."""
    import tifffile

    rng = np.random.default_rng(seed)
    z, y, x = shape
    yy, xx = np.meshgrid(np.arange(y, dtype=np.float32), np.arange(x, dtype=np.float32), indexing="ij")
    base = 2000 + 1500 * np.sin(yy / 37.0) * np.cos(xx / 53.0)
    noise = rng.integers(0, 400, size=(8, y, x), dtype=np.uint16)  # recycled: generating noise is the slow part
    with warnings.catch_warnings():  # above 4 GB tifffile notes that ImageJ files hold one page per slice
        warnings.filterwarnings("ignore", message=".*truncating ImageJ file")
        mm = tifffile.memmap(path, shape=shape, dtype=np.uint16, imagej=True, metadata={"axes": "ZYX"})
    for k in range(z):
        mm[k] = (base * (1 + 0.3 * np.sin(k / 29.0))).astype(np.uint16) + noise[k % 8]
    mm.flush()
    del mm


def _hwm_mb():
    """Peak resident memory of this process (VmHWM: reset by exec, unlike ru_maxrss, which a child
    inherits from the parent it was forked from)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def crappify_worker(args):
    """The crappify pretext's degraded copy of the volume, made in this process: seconds, peak RSS."""
    import torch

    from biapy.data.crappify import prepare_ssl_source

    base_mb = _hwm_mb()
    t0 = time.perf_counter()
    prepare_ssl_source([args.path], Path(args.path).parent / "ssl", 0.2, 4, 3, seed=0)
    print(json.dumps({"seconds": time.perf_counter() - t0, "peak_rss_mb": _hwm_mb(), "import_rss_mb": base_mb,
                      "threads": torch.get_num_threads()}))


def worker(args):
    """One measurement in this process: construction time, patches/s, peak RSS."""
    import torch

    from biapy.data.datasets import PatchDataset
    from biapy.data.normalization import Normalizer

    torch.set_num_threads(1)
    base_mb = _hwm_mb()  # after imports (torch alone is large)
    t0 = time.perf_counter()
    ds = PatchDataset([args.path], [args.path], 3, tuple(args.patch), Normalizer("zero_mean_unit_variance"),
                      "same", in_memory=bool(args.in_memory), patches_per_image=args.patches, seed=0)
    built = time.perf_counter() - t0
    ds[0]  # warm-up (first mapping, imports)
    order = np.random.default_rng(1).permutation(len(ds))
    t0 = time.perf_counter()
    for i in order:
        ds[int(i)]
    elapsed = time.perf_counter() - t0
    peak_mb = _hwm_mb()
    print(json.dumps({"in_memory": bool(args.in_memory), "build_s": built, "patches": len(order),
                      "patches_per_s": len(order) / elapsed, "ms_per_patch": 1000 * elapsed / len(order),
                      "peak_rss_mb": peak_mb, "import_rss_mb": base_mb}))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--small", action="store_true", help="64 MiB volume instead of 2 GiB (quick check)")
    p.add_argument("--shape", type=int, nargs=3, help="volume shape z y x (overrides the default size)")
    p.add_argument("--patch", type=int, nargs=3, default=(32, 128, 128), help="patch z y x")
    p.add_argument("--patches", type=int, default=300, help="random patches drawn per mode")
    p.add_argument("--workdir", default=None, help="where the temporary volume goes (default: system temp)")
    p.add_argument("--keep", action="store_true", help="keep the temporary volume")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    p.add_argument("--in-memory", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--crappify", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return crappify_worker(args) if args.crappify else worker(args)

    shape = tuple(args.shape) if args.shape else ((64, 512, 1024) if args.small else (1024, 1024, 1024))
    tmp = Path(tempfile.mkdtemp(prefix="bench_data_", dir=args.workdir))
    path = tmp / "volume.tif"
    status = 0
    try:
        t0 = time.perf_counter()
        make_volume(path, shape)
        size_gb = path.stat().st_size / 1e9
        print(f"volume {shape} uint16: {size_gb:.2f} GB written in {time.perf_counter() - t0:.1f} s ({path})")
        rows = []
        for extra in (["--in-memory", "1"], ["--in-memory", "0"], ["--crappify"]):
            cmd = [sys.executable, __file__, "--worker", "--path", str(path), *extra,
                   "--patches", str(args.patches), "--patch", *map(str, args.patch)]
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if out.returncode != 0:
                print(out.stderr, file=sys.stderr)
                return 2
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        crap = rows.pop()
        print(f"\npatch {tuple(args.patch)}, {args.patches} random patches, zero_mean_unit_variance, 1 thread")
        print(f"{'IN_MEMORY':<10} {'build s':>8} {'patches/s':>10} {'ms/patch':>9} {'peak RSS MB':>12} "
              f"{'after imports MB':>17}")
        for r in rows:
            print(f"{str(r['in_memory']):<10} {r['build_s']:>8.2f} {r['patches_per_s']:>10.1f} "
                  f"{r['ms_per_patch']:>9.2f} {r['peak_rss_mb']:>12.0f} {r['import_rss_mb']:>17.0f}")
        lazy = rows[1]["peak_rss_mb"]
        verdict = "OK" if lazy < LAZY_LIMIT_MB else "EXCEEDED"
        print(f"lazy peak RSS {lazy:.0f} MB vs limit {LAZY_LIMIT_MB} MB: {verdict}")
        status = status or int(lazy >= LAZY_LIMIT_MB)
        print(f"\ncrappify (NOISE 0.2, RESIZING_FACTOR 4, {crap['threads']} threads): degraded copy of the volume in "
              f"{crap['seconds']:.1f} s ({size_gb * 1000 / crap['seconds']:.0f} MB/s), peak RSS "
              f"{crap['peak_rss_mb']:.0f} MB ({crap['import_rss_mb']:.0f} after imports) vs limit {LAZY_LIMIT_MB} MB: "
              + ("OK" if crap["peak_rss_mb"] < LAZY_LIMIT_MB else "EXCEEDED"))
        status = status or int(crap["peak_rss_mb"] >= LAZY_LIMIT_MB)
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
