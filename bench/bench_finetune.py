"""Does self-supervised pretraining help segmentation with few labels? Prints both Dice scores.

1. Pretrain a U-Net with crappify (or masking, --pretext masking) on all training images (no labels used).
2. Fine-tune it for semantic segmentation on only --labeled images with labels (a quarter of them, at
   least one, held out for validation).
3. Train the same U-Net from scratch on the same labeled images, same epochs, same seed.
Both are scored on the same labeled test images (Dice and IoU of the foreground). With --seeds N, steps
2 and 3 are repeated for seeds 0..N-1 (one pretraining), and the gain is given per seed and on average.

    python bench/bench_finetune.py                # synthetic nuclei made offline, ~5 min on 2 CPU cores
    python bench/bench_finetune.py --photons 4 --seeds 3   # noisy images (low photon counts), 3 seeds
    python bench/bench_finetune.py --quick        # a smoke run
"""
import argparse
import csv
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from biapy import BiaPy  # noqa: E402
from biapy.data.datasets import split_train_val  # noqa: E402
from biapy.data.io import write_image  # noqa: E402
from biapy.data.synthetic import nuclei_image  # noqa: E402


VAL_SPLIT = 0.25  # validation share of every job here (when fine-tuning: of the labeled images, at least one)


def textured_image(shape, n_objects, seed, photons):
    """Bright objects of which only the textured ones (striped at random angles) are labeled 1; smooth ones of
    the same brightness are background. Intensity alone cannot tell them apart, unlike `nuclei_image`."""
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij")
    signal = np.zeros(shape, np.float32)
    labels = np.zeros(shape, np.uint8)
    for _ in range(n_objects):
        cy, cx = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
        ry, rx = rng.uniform(5, 10), rng.uniform(5, 10)
        inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
        level = rng.uniform(0.45, 0.9)
        textured = rng.random() < 0.5
        if textured:  # stripes of period 3-5 pixels; their mean brightness matches the smooth objects'
            angle, period = rng.uniform(0, np.pi), rng.uniform(3, 5)
            phase = (np.cos(angle) * yy + np.sin(angle) * xx) * 2 * np.pi / period
            pattern = level * (1.0 + 0.6 * np.sign(np.sin(phase)))
        else:
            pattern = np.full(shape, level, np.float32)
        signal = np.where(inside, pattern, signal)  # a later object covers an earlier one, label included
        labels = np.where(inside, np.uint8(textured), labels)
    clean = ndimage.gaussian_filter(signal, sigma=0.7) * 0.6 + 0.05
    counts = rng.poisson(clean * photons).astype(np.float32) / photons
    return np.clip(counts * 200.0, 0, 255).astype(np.uint8)[..., None], labels


def make_image(task, size, seed, photons):
    if task == "textured":
        return textured_image((size, size), 30, seed, photons)
    return nuclei_image((size, size), 35, seed=seed, photons=photons)


def make_data(root, n_unlabeled, n_labeled, n_test, size, photons, task="nuclei", seed=7):
    """Unlabeled pool (all train images), a few labeled ones (a subset), and labeled test images."""
    folders = {k: root / k for k in ("all_x", "few_x", "few_y", "test_x", "test_y")}
    for i in range(n_unlabeled):
        img, lab = make_image(task, size, seed + i, photons)
        write_image(folders["all_x"] / f"img_{i:03d}.tif", img, 2)
        if i < n_labeled:
            write_image(folders["few_x"] / f"img_{i:03d}.tif", img, 2)
            write_image(folders["few_y"] / f"img_{i:03d}.tif", lab[..., None], 2)
    for i in range(n_test):
        img, lab = make_image(task, size, seed + 1000 + i, photons)
        write_image(folders["test_x"] / f"t_{i:03d}.tif", img, 2)
        write_image(folders["test_y"] / f"t_{i:03d}.tif", lab[..., None], 2)
    return folders


def common(seed=0):
    return {
        "SYSTEM": {"NUM_WORKERS": 0, "SEED": seed},
        "PROBLEM": {"NDIM": "2D"},
        "DATA": {"PATCH_SIZE": (64, 64, 1), "VAL": {"SPLIT_TRAIN": VAL_SPLIT}},
        "MODEL": {"ARCHITECTURE": "unet", "FEATURE_MAPS": [16, 32, 64, 128], "DROPOUT_VALUES": [0.0] * 4},
        "TRAIN": {"OPTIMIZER": "ADAMW", "LR": 2e-3, "BATCH_SIZE": 8},
        "AUGMENTOR": {"ENABLE": True, "VFLIP": True, "HFLIP": True, "ROT90": True},
        "LOG": {"CHART_CREATION_FREQ": 1000},
    }


def merge(base, extra):
    out = {k: dict(v) for k, v in base.items()}
    for section, values in extra.items():
        out.setdefault(section, {}).update(values)
    return out


def segmentation(args, f, checkpoint=None, seed=0):
    cfg = merge(common(seed), {
        "PROBLEM": {"TYPE": "SEMANTIC_SEG", "NDIM": "2D"},
        "DATA": {"PATCH_SIZE": (64, 64, 1), "VAL": {"SPLIT_TRAIN": VAL_SPLIT},
                 # Few labeled images: more random patches per image and epoch (same for both arms).
                 "TRAIN": {"PATH": str(f["few_x"]), "GT_PATH": str(f["few_y"]), "PATCHES_PER_IMAGE": 16},
                 "TEST": {"PATH": str(f["test_x"]), "GT_PATH": str(f["test_y"]), "LOAD_GT": True}},
        "MODEL": {"N_CLASSES": 2, "LOAD_CHECKPOINT": checkpoint is not None, "SKIP_UNMATCHED_LAYERS": True,
                  "FREEZE_ENCODER_EPOCHS": args.freeze_epochs if checkpoint is not None else 0},
        "LOSS": {"TYPE": "CE_DICE"},
        "TRAIN": {"EPOCHS": args.finetune_epochs, "LR": args.finetune_lr},
    })
    cfg["MODEL"].update({"ARCHITECTURE": "unet", "FEATURE_MAPS": [16, 32, 64, 128], "DROPOUT_VALUES": [0.0] * 4})
    if checkpoint is not None:
        cfg["PATHS"] = {"CHECKPOINT_FILE": str(checkpoint)}
    return cfg


def mean_scores(job):
    with open(job.metrics_csv) as fh:
        rows = list(csv.DictReader(fh))
    return {k: sum(float(r[k]) for r in rows) / len(rows) for k in ("dice", "iou")}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--unlabeled", type=int, default=16, help="images for pretraining (labels unused)")
    p.add_argument("--labeled", type=int, default=2, help="labeled images for fine-tuning")
    p.add_argument("--test", type=int, default=4)
    p.add_argument("--size", type=int, default=192)
    p.add_argument("--pretrain-epochs", type=int, default=40)
    p.add_argument("--finetune-epochs", type=int, default=25)
    p.add_argument("--photons", type=float, default=60.0,
                   help="photon count at full brightness of the synthetic images (lower = noisier)")
    p.add_argument("--finetune-lr", type=float, default=2e-3, help="learning rate of both segmentation arms")
    p.add_argument("--freeze-epochs", type=int, default=0,
                   help="MODEL.FREEZE_ENCODER_EPOCHS of the pretrained arm (the scratch arm has nothing to keep)")
    p.add_argument("--task", choices=["nuclei", "textured"], default="nuclei",
                   help="nuclei: bright blobs are foreground; textured: only striped objects are, smooth ones of the "
                        "same brightness are background")
    p.add_argument("--pretext", choices=["crappify", "masking"], default="crappify",
                   help="pretext task of the pretraining (masking: the U-Net with hidden blocks)")
    p.add_argument("--seeds", type=int, default=1, help="fine-tune and scratch runs per arm (seeds 0..N-1)")
    p.add_argument("--quick", action="store_true", help="tiny run to check the script")
    args = p.parse_args()
    if args.quick:
        args.unlabeled, args.labeled, args.test, args.size = 6, 2, 2, 96
        args.pretrain_epochs, args.finetune_epochs = 2, 2
    work = Path(tempfile.mkdtemp(prefix="bench_finetune_"))
    try:
        f = make_data(work / "data", args.unlabeled, args.labeled, args.test, args.size, args.photons, args.task)
        out = work / "out"
        t0 = time.perf_counter()
        pre = merge(common(), {
            "PROBLEM": {"TYPE": "SELF_SUPERVISED", "NDIM": "2D", "SELF_SUPERVISED": {"PRETEXT_TASK": args.pretext}},
            "DATA": {"PATCH_SIZE": (64, 64, 1), "VAL": {"SPLIT_TRAIN": VAL_SPLIT},
                     "TRAIN": {"PATH": str(f["all_x"])}},
            "TRAIN": {"EPOCHS": args.pretrain_epochs},
            "TEST": {"ENABLE": False},
        })
        ssl = BiaPy(pre, result_dir=out, name="pretrain", run_id=1).run_job()
        t_pre = time.perf_counter() - t0
        t0 = time.perf_counter()
        rows = []
        for seed in range(args.seeds):
            tuned = BiaPy(segmentation(args, f, ssl.checkpoint("best"), seed), result_dir=out, name="finetuned",
                          run_id=seed + 1).run_job()
            scratch = BiaPy(segmentation(args, f, seed=seed), result_dir=out, name="scratch",
                            run_id=seed + 1).run_job()
            rows.append((seed, mean_scores(tuned), mean_scores(scratch)))
        t_ft = (time.perf_counter() - t0) / max(1, args.seeds)
        n_val = len(split_train_val(range(args.labeled), VAL_SPLIT)[1])
        print()
        print(f"Segmentation on {args.labeled} labeled image(s) of {args.size}x{args.size} ({args.labeled - n_val} "
              f"trained on, {n_val} for validation), task {args.task}, photons {args.photons:g}, {args.finetune_epochs} epochs "
              f"at LR {args.finetune_lr:g} (pretrained encoder frozen for {args.freeze_epochs}), "
              f"{args.test} test image(s); pretraining: {args.pretext} on {args.unlabeled} unlabeled images, "
              f"{args.pretrain_epochs} epochs ({t_pre:.0f} s); both arms of a seed take {t_ft:.0f} s")
        print(f"{'seed':>4}  {'pretrained Dice':>15}{'scratch Dice':>14}{'gain':>9}  {'pretrained IoU':>14}{'scratch IoU':>13}")
        for seed, a, b in rows:
            print(f"{seed:>4}  {a['dice']:15.4f}{b['dice']:14.4f}{a['dice'] - b['dice']:+9.4f}  "
                  f"{a['iou']:14.4f}{b['iou']:13.4f}")
        gains = [a["dice"] - b["dice"] for _, a, b in rows]
        mean = statistics.mean
        print(f"mean  {mean(a['dice'] for _, a, _ in rows):15.4f}{mean(b['dice'] for _, _, b in rows):14.4f}"
              f"{mean(gains):+9.4f}   (gain from {min(gains):+.4f} to {max(gains):+.4f})")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
