"""Test-phase memory: how much the prediction, writing and scoring of one test image adds to a job's memory,
for crappify and masking, at two image sizes (and the test phase's seconds).

Each measurement runs in its own process: a tiny U-Net is trained for one epoch on small synthetic
images, then the test phase predicts, writes and scores one uint16 image: a 3D volume of Z x 256 x 256
(`--depths`), or with `--ndim 2` a 2D image of S x S (`--sizes`). The peak resident memory (VmHWM) is
reset when the test phase starts (/proc/self/clear_refs), so the figure is the test phase's own: peak
minus resident memory at its start. The difference between the two sizes gives the cost per extra
voxel, the fixed part aside. Linux only (VmHWM reset). Nothing is asserted.

    python bench/bench_test_memory.py              # depths 64 and 128, about a minute
    python bench/bench_test_memory.py --depths 32 64
    python bench/bench_test_memory.py --ndim 2     # 4096^2 and 8192^2
"""
import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _status_mb(key):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def worker(task, ndim, size):
    """One job; prints the test phase's peak above its starting resident memory."""
    import biapy.workflows.base as base
    from biapy import BiaPy
    from biapy.data.image_writing import write_image

    root = Path(tempfile.mkdtemp(prefix="bench_test_memory_"))
    test_shape = (size, 256, 256) if ndim == 3 else (size, size)
    train_shape = (16, 64, 64) if ndim == 3 else (256, 256)
    for split, n, shape in (("train", 2, train_shape), ("test", 1, test_shape)):
        for i in range(n):
            img = _image(shape, 20 if split == "train" else size, i)
            write_image(root / split / f"{split}_{i}.tif", img, ndim)
            del img
    measured = {}
    test = base.Workflow.test

    def measured_test(self, *args, **kwargs):
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets VmHWM to the current resident memory
        start, t0 = _status_mb("VmRSS"), time.perf_counter()
        test(self, *args, **kwargs)
        measured.update(start_mb=start, peak_mb=_status_mb("VmHWM"), seconds=time.perf_counter() - t0)

    base.Workflow.test = measured_test
    cfg = {
        "PROBLEM": {"NDIM": f"{ndim}D", "SELF_SUPERVISED": {"PRETEXT_TASK": task}},
        "SYSTEM": {"NUM_WORKERS": 0, "SEED": 0},
        "DATA": {"PATCH_SIZE": (16, 32, 32, 1) if ndim == 3 else (128, 128, 1), "TRAIN": {"PATH": str(root / "train")},
                 "VAL": {"SPLIT_TRAIN": 0.5}, "TEST": {"PATH": str(root / "test")}},
        "MODEL": {"ARCHITECTURE": "unet", "FEATURE_MAPS": [4, 8, 16], "DROPOUT_VALUES": [0.0] * 3,
                  **({"Z_DOWN": [1, 2]} if ndim == 3 else {})},
        "TRAIN": {"EPOCHS": 1, "BATCH_SIZE": 2},
        "TEST": {"METRICS": ["psnr", "ssim", "mae", "mse"]},
    }
    try:
        BiaPy(cfg, result_dir=root / "out", name="m", run_id=1).run_job()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps({"task": task, "shape": "x".join(map(str, test_shape)), "voxels": int(np.prod(test_shape)),
                      **measured}))


def _image(shape, count, seed):
    """A uint16 synthetic image (channel-last); a 2D one tiled from one 512^2 image of 20 nuclei (whole: slow)."""
    from biapy.data.synthetic import nuclei_image

    tile = shape if len(shape) == 3 else tuple(min(s, 512) for s in shape)
    img, _ = nuclei_image(tile, count if len(shape) == 3 else 20, seed=seed)
    img = (img.astype(np.float32) / max(float(img.max()), 1e-6) * 3000).astype(np.uint16)
    reps = [-(-s // t) for s, t in zip(shape, tile)] + [1]
    return np.tile(img, reps)[tuple(slice(0, s) for s in shape)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ndim", type=int, choices=(2, 3), default=3, help="3D volumes (default) or 2D images")
    ap.add_argument("--depths", type=int, nargs=2, default=(64, 128), help="3D: two test-volume depths (Z)")
    ap.add_argument("--sizes", type=int, nargs=2, default=(4096, 8192), help="2D: two test-image sizes (S x S)")
    ap.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker[0], int(args.worker[1]), int(args.worker[2]))
    rows = []
    for task in ("crappify", "masking"):
        for size in args.depths if args.ndim == 3 else args.sizes:
            out = subprocess.run([sys.executable, __file__, "--worker", task, str(args.ndim), str(size)],
                                 capture_output=True, text=True, cwd=ROOT)
            if out.returncode != 0:
                print(out.stderr[-3000:], file=sys.stderr)
                return 1
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"\n{'task':<9} {'test image':>15} {'voxels':>9} {'test phase MB':>14} {'test phase s':>13}")
    for r in rows:
        print(f"{r['task']:<9} {r['shape']:>15} {r['voxels'] / 1e6:>8.1f}M "
              f"{r['peak_mb'] - r['start_mb']:>14.0f} {r['seconds']:>13.1f}")
    for task in ("crappify", "masking"):
        small, big = [r for r in rows if r["task"] == task]
        extra = (big["peak_mb"] - big["start_mb"]) - (small["peak_mb"] - small["start_mb"])
        print(f"{task}: {extra * 2 ** 20 / (big['voxels'] - small['voxels']):.1f} bytes per extra test voxel")
    return 0


if __name__ == "__main__":
    sys.exit(main())
