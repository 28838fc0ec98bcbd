"""Linear probe: do a pretrained U-Net encoder's features tell the labeled class apart better than a random one's?

1. Pretrain a U-Net on bench_finetune.py's synthetic unlabeled images with each of --pretexts, through the BiaPy
   API and with bench_finetune's pretraining options (or take checkpoints the tool made: --checkpoint).
2. Probe each encoder, --random randomly initialised ones (seeds 0..N-1, the tool's own initialisation) and, with
   --supervised-epochs, one trained with the labels (bench_finetune's scratch arm, the ceiling of the probe): a
   per-pixel logistic regression on the encoder's features (each level upsampled to the image, concatenated),
   fitted on one labeled image, scored by foreground Dice on the --test labeled images. No fine-tuning noise.
3. Print one table: per encoder the probe Dice with every level, with the two deepest and with the first; the
   cosine of each encoder convolution to its initial weights (min-max; 1 = unchanged) and the largest
   relative distance |w - w0| / |w0|. Random rows give mean, sd and range over their seeds.

    python bench/bench_probe.py              # textured task, 96x96, crappify and masking: ~3 min on 2 CPU cores
    python bench/bench_probe.py --checkpoint out/pre/checkpoints/pre_1-checkpoint-best.pth --size 192
    python bench/bench_probe.py --quick      # a smoke run, under a minute

The features are taken in training mode (each image normalised by its own batch statistics), so a random
encoder's untrained running statistics do not count against it.
"""
import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_finetune import add_data_options, check_sets, make_data, pretraining, segmentation  # noqa: E402
from biapy import BiaPy  # noqa: E402
from biapy.config.load import load_config  # noqa: E402
from biapy.data.io import read_image  # noqa: E402
from biapy.errors import ConfigError  # noqa: E402
from biapy.models import build_model  # noqa: E402

LEVEL_SETS = ("all", "deepest two", "first")
PROBE_PIXELS = 20000  # pixels of the labeled image the regression is fitted on (a random sample)


def load_images(folder):
    return [np.asarray(read_image(p, 2))[..., 0].astype(np.float32) for p in sorted(Path(folder).glob("*.tif"))]


def model_config(cfg_dict):
    """The parts of a run's config that decide the network and its initial weights (no paths)."""
    keep = {"MODEL": cfg_dict["MODEL"], "PROBLEM": {"TYPE": cfg_dict["PROBLEM"]["TYPE"],
                                                    "NDIM": cfg_dict["PROBLEM"]["NDIM"]},
            "DATA": {"PATCH_SIZE": cfg_dict["DATA"]["PATCH_SIZE"]}, "SYSTEM": {"SEED": cfg_dict["SYSTEM"]["SEED"]}}
    return load_config(keep)


def initial_model(cfg, seed):
    """The network as the tool builds it before training (its workflow seeds torch with SYSTEM.SEED first)."""
    torch.manual_seed(seed)
    return build_model(cfg)


def checkpoint_encoder(path):
    """(trained encoder, the encoder it started from) of a checkpoint the tool wrote."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if "config" not in state or "model" not in state:
        raise ConfigError(f"--checkpoint {path}: no 'config' and 'model' in it; expected a checkpoint this tool wrote")
    cfg = model_config(yaml.safe_load(state["config"]))
    if cfg.MODEL.ARCHITECTURE not in ("unet", "resunet") or cfg.PROBLEM.NDIM != "2D":
        raise ConfigError(f"--checkpoint {path}: MODEL.ARCHITECTURE {cfg.MODEL.ARCHITECTURE} in "
                          f"{cfg.PROBLEM.NDIM}; expected a 2D unet or resunet")
    model = initial_model(cfg, cfg.SYSTEM.SEED)
    start = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    weights = {k.removeprefix("module."): v for k, v in state["model"].items()}
    model.encoder.load_state_dict({k[len("encoder."):]: v for k, v in weights.items() if k.startswith("encoder.")})
    return model.encoder, start, cfg


def drift(encoder, start):
    """(min, max) cosine of each convolution's weights to their initial values, largest relative distance."""
    cosines, distances = [], []
    for name, w in encoder.state_dict().items():
        if name.endswith("weight") and w.dim() >= 3:  # convolutions, not norms
            a, b = start[name].flatten().double(), w.flatten().double()
            cosines.append(float(a @ b / (a.norm() * b.norm())))
            distances.append(float((b - a).norm() / a.norm()))
    return min(cosines), max(cosines), max(distances)


def features(encoder, image, levels):
    """(pixels, channels): the chosen levels' feature maps upsampled bilinearly to the image."""
    x = torch.from_numpy((image - image.mean()) / (image.std() + 1e-6))[None, None]
    encoder.train()
    with torch.no_grad():
        maps = encoder(x)
    picked = [F.interpolate(maps[i], size=image.shape, mode="bilinear", align_corners=False) for i in levels]
    stacked = torch.cat(picked, 1)[0]
    return stacked.reshape(stacked.shape[0], -1).T


def level_indices(name, depth):
    return {"all": list(range(depth)), "deepest two": [depth - 2, depth - 1], "first": [0]}[name]


def fit_probe(x, y, seed=0):
    """Weights, bias, feature mean and sd of an L2-regularised logistic regression (L-BFGS)."""
    pick = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:PROBE_PIXELS]
    x, y = x[pick], y[pick]
    mean, sd = x.mean(0), x.std(0) + 1e-6
    xn = (x - mean) / sd
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(xn @ w + b, y) + 1e-3 * (w ** 2).sum()
        loss.backward()
        return loss
    opt.step(closure)
    return w.detach(), b.detach(), mean, sd


def probe_dice(encoder, data, levels):
    """Mean foreground Dice on the test images of the probe fitted on the first labeled image."""
    train_x, train_y, test_x, test_y = data
    w, b, mean, sd = fit_probe(features(encoder, train_x, levels), torch.from_numpy(train_y.reshape(-1)).float())
    dices = []
    for image, labels in zip(test_x, test_y):
        predicted = (((features(encoder, image, levels) - mean) / sd) @ w + b).numpy() > 0
        truth = labels.reshape(-1) > 0
        dices.append(2 * (predicted & truth).sum() / max(predicted.sum() + truth.sum(), 1))
    return float(np.mean(dices))


def probe_row(encoder, data, depth):
    return [probe_dice(encoder, data, level_indices(name, depth)) for name in LEVEL_SETS]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_options(p)
    p.set_defaults(task="textured", size=96, pretrain_epochs=40, pretrain_patches=16, pretrain_schedule="warmupcosine")
    p.add_argument("--pretexts", nargs="*", choices=["crappify", "masking"], default=["crappify", "masking"],
                   help="pretrain once with each (none: probe only --checkpoint files); overrides --pretext")
    p.add_argument("--checkpoint", action="append", default=[], type=Path,
                   help="also probe this checkpoint of the tool (a 2D U-Net; images are made at --size); repeatable")
    p.add_argument("--random", type=int, default=8, help="randomly initialised encoders to probe (seeds 0..N-1)")
    p.add_argument("--supervised-epochs", type=int, default=25,
                   help="also probe a U-Net trained this many epochs with the labels (bench_finetune's scratch arm); "
                        "0 = skip")
    p.add_argument("--quick", action="store_true", help="a smoke run: tiny data, 2 epochs, 2 random encoders")
    args = p.parse_args(argv)
    if args.quick:
        args.unlabeled, args.test, args.size, args.pretrain_epochs = 6, 2, 96, 2
        args.random, args.supervised_epochs = 2, min(args.supervised_epochs, 2)
    if args.random < 1:
        p.error(f"--random: {args.random}; expected at least 1 (the probe is judged against random encoders)")
    args.pretrain_overrides = check_sets(p, args.pretrain_set, "--pretrain-set")
    return args


def trained_encoders(args, f, out):
    """[(label, checkpoint, seconds)] of the pretrainings, the supervised reference and --checkpoint files."""
    runs = []
    for pretext in args.pretexts:
        args.pretext = pretext
        cfg, overrides = pretraining(args, f)
        t0 = time.perf_counter()
        job = BiaPy(cfg, result_dir=out, name=f"pretrain_{pretext}", run_id=1, overrides=overrides).run_job()
        runs.append((f"{pretext}, {args.pretrain_epochs} epochs", job.checkpoint("best"), time.perf_counter() - t0))
    if args.supervised_epochs:
        args.finetune_lr, args.freeze_epochs = 2e-3, 0
        t0 = time.perf_counter()
        job = BiaPy(segmentation(args, f, None, 0, args.supervised_epochs), result_dir=out, name="supervised",
                    run_id=1).run_job()
        runs.append((f"trained with labels, {args.supervised_epochs} epochs", job.checkpoint("best"),
                     time.perf_counter() - t0))
    runs += [(str(path), path, 0.0) for path in args.checkpoint]
    return runs


def print_table(args, random_rows, rows):
    print()
    print(f"Linear probe on {args.task} images of {args.size}x{args.size} (photons {args.photons:g}): fitted on 1 "
          f"labeled image, Dice on {args.test}; pretraining on {args.unlabeled} unlabeled images, "
          f"{'grid' if args.pretrain_patches == -1 else args.pretrain_patches} patches per image and epoch, "
          f"{args.pretrain_schedule} LR")
    head = "".join(f"{name:>27}" for name in LEVEL_SETS)
    print(f"{'encoder':<44}{head}  {'conv cosine to init':>20}{'rel. distance':>14}{'s':>6}")
    cells = []
    for column in zip(*random_rows):
        spread = statistics.stdev(column) if len(column) > 1 else 0.0
        cells.append(f"{statistics.mean(column):.3f}+-{spread:.3f} ({min(column):.2f}-{max(column):.2f})")
    print(f"{f'random init, {len(random_rows)} seeds':<44}" + "".join(f"{c:>27}" for c in cells) + f"{'1':>22}")
    for label, scores, (lo, hi, dist), secs in rows:
        print(f"{label if len(label) <= 43 else '...' + label[-40:]:<44}" + "".join(f"{s:>27.3f}" for s in scores)
              + f"  {f'{lo:.3f}-{hi:.3f}':>20}{dist:>14.3f}{secs:>6.0f}")
    print("random best per column: " + ", ".join(f"{max(c):.3f}" for c in zip(*random_rows)))


def main():
    args = parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_probe_"))
    try:
        f = make_data(work / "data", args.unlabeled, 2, args.test, args.size, args.photons, args.task)
        data = (load_images(f["few_x"])[0], load_images(f["few_y"])[0], load_images(f["test_x"]),
                load_images(f["test_y"]))
        rows, configs = [], []
        for label, path, secs in trained_encoders(args, f, work / "out"):
            encoder, start, cfg = checkpoint_encoder(path)
            rows.append((label, probe_row(encoder, data, len(cfg.MODEL.FEATURE_MAPS)), drift(encoder, start), secs))
            configs.append(cfg)
        # random encoders of the first network probed (bench_finetune's U-Net when nothing was)
        cfg = configs[0] if configs else model_config(pretraining(args, f)[0])
        random_rows = [probe_row(initial_model(cfg, seed).encoder, data, len(cfg.MODEL.FEATURE_MAPS))
                       for seed in range(args.random)]
        print_table(args, random_rows, rows)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
