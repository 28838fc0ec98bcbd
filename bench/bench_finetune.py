"""Does self-supervised pretraining help segmentation with few labels? Prints both Dice scores.

1. Pretrain a U-Net with crappify (or masking, --pretext masking) on all training images (no labels used).
2. Fine-tune it for semantic segmentation on only --labeled images with labels (a quarter of them, at
   least one, held out for validation).
3. Train the same U-Net from scratch on the same labeled images, same epochs, same seed.
Both are scored on the same labeled test images (Dice and IoU of the foreground). With --seeds N, steps
2 and 3 are repeated for seeds 0..N-1 (one pretraining), and the gain is given per seed and on average
(with its sd and standard error); with several --finetune-epochs, once per length.

    python bench/bench_finetune.py                # synthetic nuclei made offline, ~5 min on 2 CPU cores
    python bench/bench_finetune.py --photons 4 --seeds 3   # noisy images (low photon counts), 3 seeds
    python bench/bench_finetune.py --pretrain-patches 16 --pretrain-schedule warmupcosine \\
        --pretrain-set PROBLEM.SELF_SUPERVISED.MASK_BLOCK_SIZE=16 --pretext masking --finetune-epochs 5 10 25
    python bench/bench_finetune.py --preset textured-long  # where pretraining helps (bench/README.md), ~8 min
    python bench/bench_finetune.py --preset textured-long --size 192 --finetune-epochs 25   # 192x192: a smaller, less steady gain
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
from biapy.data.image_writing import write_image  # noqa: E402
from biapy.data.splits import split_train_val  # noqa: E402
from biapy.data.synthetic import nuclei_image  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from _overrides import parse_override  # noqa: E402


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


def segmentation(args, f, checkpoint=None, seed=0, epochs=None):
    """Config of one segmentation arm: fine-tuned from `checkpoint`, or from scratch when it is None."""
    cfg = merge(common(seed), {
        "PROBLEM": {"TYPE": "SEMANTIC_SEG", "NDIM": "2D"},
        "DATA": {"PATCH_SIZE": (64, 64, 1), "VAL": {"SPLIT_TRAIN": VAL_SPLIT},
                 # Few labeled images: more random patches per image and epoch (same for both arms).
                 "TRAIN": {"PATH": str(f["few_x"]), "GT_PATH": str(f["few_y"]), "PATCHES_PER_IMAGE": 16},
                 "TEST": {"PATH": str(f["test_x"]), "GT_PATH": str(f["test_y"]), "LOAD_GT": True}},
        "MODEL": {"N_CLASSES": 2, "LOAD_CHECKPOINT": checkpoint is not None, "SKIP_UNMATCHED_LAYERS": True,
                  "FREEZE_ENCODER_EPOCHS": args.freeze_epochs if checkpoint is not None else 0},
        "LOSS": {"TYPE": "CE_DICE"},
        "TRAIN": {"EPOCHS": epochs or args.finetune_epochs, "LR": args.finetune_lr},
    })
    cfg["MODEL"].update({"ARCHITECTURE": "unet", "FEATURE_MAPS": [16, 32, 64, 128], "DROPOUT_VALUES": [0.0] * 4})
    if checkpoint is not None:
        cfg["PATHS"] = {"CHECKPOINT_FILE": str(checkpoint)}
    return cfg


def mean_scores(job):
    with open(job.metrics_csv) as fh:
        rows = list(csv.DictReader(fh))
    return {k: sum(float(r[k]) for r in rows) / len(rows) for k in ("dice", "iou")}


def add_data_options(p):
    """Options of the synthetic data and of the pretraining; bench_probe.py takes the same ones."""
    p.add_argument("--unlabeled", type=int, default=16, help="images for pretraining (labels unused)")
    p.add_argument("--test", type=int, default=4)
    p.add_argument("--size", type=int, default=192)
    p.add_argument("--photons", type=float, default=60.0,
                   help="photon count at full brightness of the synthetic images (lower = noisier)")
    p.add_argument("--task", choices=["nuclei", "textured"], default="nuclei",
                   help="nuclei: bright blobs are foreground; textured: only striped objects are, smooth ones of the "
                        "same brightness are background")
    p.add_argument("--pretext", choices=["crappify", "masking"], default="crappify",
                   help="pretext task of the pretraining (masking: the U-Net with hidden blocks)")
    p.add_argument("--pretrain-epochs", type=int, default=40)
    p.add_argument("--pretrain-patches", type=int, default=-1,
                   help="DATA.TRAIN.PATCHES_PER_IMAGE of the pretraining: random 64x64 patches per image and epoch "
                        "(-1: as many as a grid holds, 9 of a 192x192 image; more = more updates per epoch)")
    p.add_argument("--pretrain-schedule", choices=["constant", "warmupcosine"], default="constant",
                   help="LR schedule of the pretraining (warmupcosine: 5%% warm-up, then cosine decay to 0)")
    p.add_argument("--pretrain-set", action="append", default=[], metavar="KEY=VALUE",
                   help="change a key of the pretraining's config (VALUE read as YAML), e.g. "
                        "PROBLEM.SELF_SUPERVISED.MASK_BLOCK_SIZE=16; may be repeated")


def check_sets(p, items, option):
    """KEY=VALUE items of `option` -> the tool's KEY VALUE overrides; an unknown key or a bad value stops the parser."""
    pairs = []
    for item in items:
        parse_override(item, lambda message: p.error(message.replace("--set", option, 1)))
        key, _, text = item.partition("=")
        pairs += [key, text]
    return pairs


def pretraining(args, f):
    """Config and KEY VALUE overrides of the self-supervised pretraining on the unlabeled images."""
    cfg = merge(common(), {
        "PROBLEM": {"TYPE": "SELF_SUPERVISED", "NDIM": "2D", "SELF_SUPERVISED": {"PRETEXT_TASK": args.pretext}},
        "DATA": {"PATCH_SIZE": (64, 64, 1), "VAL": {"SPLIT_TRAIN": VAL_SPLIT},
                 "TRAIN": {"PATH": str(f["all_x"]), "PATCHES_PER_IMAGE": args.pretrain_patches}},
        "TRAIN": {"EPOCHS": args.pretrain_epochs},
        "TEST": {"ENABLE": False},
    })
    if args.pretrain_schedule == "warmupcosine":
        cfg["TRAIN"]["LR_SCHEDULER"] = {"NAME": "warmupcosine", "WARMUP_COSINE_DECAY_EPOCHS": 0.05}
    return cfg, args.pretrain_overrides


# --preset NAME: option defaults of a measured regime (options given on the command line still win)
PRESETS = {
    "noisy-early": dict(task="nuclei", size=96, photons=1.0, labeled=2, pretext="crappify", pretrain_epochs=100,
                        pretrain_patches=16, pretrain_schedule="warmupcosine", finetune_epochs=[2, 5, 10, 25],
                        seeds=10),
    "textured-long": dict(task="textured", size=96, labeled=2, pretext="crappify", pretrain_epochs=100,
                          pretrain_patches=16, pretrain_schedule="warmupcosine", finetune_epochs=[10, 25, 50],
                          seeds=10),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_options(p)
    p.add_argument("--labeled", type=int, default=2, help="labeled images for fine-tuning")
    p.add_argument("--finetune-epochs", type=int, nargs="+", default=[25],
                   help="fine-tuning epochs (16 patches of the one training image each, 2 updates); several values: "
                        "both arms are trained once per value and scored after it")
    p.add_argument("--finetune-lr", type=float, default=2e-3, help="learning rate of both segmentation arms")
    p.add_argument("--freeze-epochs", type=int, default=0,
                   help="MODEL.FREEZE_ENCODER_EPOCHS of the pretrained arm (the scratch arm has nothing to keep)")
    p.add_argument("--finetune-set", action="append", default=[], metavar="KEY=VALUE",
                   help="change a key of both segmentation arms' config (VALUE read as YAML); may be repeated")
    p.add_argument("--seeds", type=int, default=1, help="fine-tune and scratch runs per arm (seeds 0..N-1)")
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="option defaults of a measured regime (bench/README.md). Both: 96x96 images, 2,400 pretraining "
                        "updates (crappify, 16 patches per image, warm-up + cosine), 10 seeds. noisy-early: nuclei "
                        "at 1 photon, Dice after 2, 5, 10 and 25 fine-tuning epochs; textured-long: --task "
                        "textured, Dice after 10, 25 and 50")
    p.add_argument("--quick", action="store_true", help="tiny run to check the script")
    args = p.parse_args(argv)
    if args.preset:  # the preset's values, then again whatever the command line gave
        p.set_defaults(**PRESETS[args.preset])
        args = p.parse_args(argv)
    if args.quick:
        args.unlabeled, args.labeled, args.test, args.size = 6, 2, 2, 96
        args.pretrain_epochs, args.finetune_epochs = 2, [2]
    args.pretrain_overrides = check_sets(p, args.pretrain_set, "--pretrain-set")
    args.finetune_overrides = check_sets(p, args.finetune_set, "--finetune-set")
    return args


def run_arms(args, f, out, checkpoint):
    """[(epochs, seed, pretrained scores, scratch scores)] for every fine-tuning length and seed."""
    rows = []
    for epochs in args.finetune_epochs:
        for seed in range(args.seeds):
            arms = {}
            for arm, start in (("finetuned", checkpoint), ("scratch", None)):
                job = BiaPy(segmentation(args, f, start, seed, epochs), result_dir=out, name=f"{arm}_e{epochs}",
                            run_id=seed + 1, overrides=args.finetune_overrides).run_job()
                arms[arm] = mean_scores(job)
            rows.append((epochs, seed, arms["finetuned"], arms["scratch"]))
    return rows


def print_table(args, rows, t_pre, t_ft):
    n_val = len(split_train_val(range(args.labeled), VAL_SPLIT)[1])
    print()
    print(f"Segmentation on {args.labeled} labeled image(s) of {args.size}x{args.size} ({args.labeled - n_val} "
          f"trained on, {n_val} for validation), task {args.task}, photons {args.photons:g}, LR {args.finetune_lr:g} "
          f"(pretrained encoder frozen for {args.freeze_epochs} epochs), {args.test} test image(s); pretraining: "
          f"{args.pretext} on {args.unlabeled} unlabeled images, {args.pretrain_epochs} epochs ({t_pre:.0f} s); "
          f"fine-tuning both arms of every seed and length took {t_ft:.0f} s")
    if args.pretrain_set or args.finetune_set or args.pretrain_patches != -1 or args.pretrain_schedule != "constant":
        print(f"pretraining: {args.pretrain_patches} patches per image and epoch, {args.pretrain_schedule} LR"
              + "".join(f", {item}" for item in args.pretrain_set)
              + ("; both arms: " + ", ".join(args.finetune_set) if args.finetune_set else ""))
    print(f"{'epochs':>6}{'seed':>5}  {'pretrained Dice':>15}{'scratch Dice':>14}{'gain':>9}  "
          f"{'pretrained IoU':>14}{'scratch IoU':>13}")
    for epochs, seed, a, b in rows:
        print(f"{epochs:>6}{seed:>5}  {a['dice']:15.4f}{b['dice']:14.4f}{a['dice'] - b['dice']:+9.4f}  "
              f"{a['iou']:14.4f}{b['iou']:13.4f}")
    for epochs in args.finetune_epochs:
        mine = [(a["dice"], b["dice"]) for e, _, a, b in rows if e == epochs]
        gains = [a - b for a, b in mine]
        spread = (f", sd {statistics.stdev(gains):.4f}, standard error {statistics.stdev(gains) / len(gains) ** 0.5:.4f}"
                  if len(gains) > 1 else "")
        print(f"{epochs:>6} mean {statistics.mean(a for a, _ in mine):15.4f}{statistics.mean(b for _, b in mine):14.4f}"
              f"{statistics.mean(gains):+9.4f}   (n {len(gains)}, gain from {min(gains):+.4f} to {max(gains):+.4f}"
              f"{spread})")


def main():
    args = parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_finetune_"))
    try:
        f = make_data(work / "data", args.unlabeled, args.labeled, args.test, args.size, args.photons, args.task)
        out = work / "out"
        t0 = time.perf_counter()
        cfg, overrides = pretraining(args, f)
        ssl = BiaPy(cfg, result_dir=out, name="pretrain", run_id=1, overrides=overrides).run_job()
        t_pre = time.perf_counter() - t0
        t0 = time.perf_counter()
        rows = run_arms(args, f, out, ssl.checkpoint("best"))
        print_table(args, rows, t_pre, time.perf_counter() - t0)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
