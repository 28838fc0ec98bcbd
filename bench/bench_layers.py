"""Training step and inference time of the U-Net per normalization, against torch's instance norm.

    python bench/bench_layers.py            # 2D [16..256] 8x64x64 and 3D [16..128] 2x32x64x64, CPU
    python bench/bench_layers.py --rounds 12 --gpu 0

Variants: each MODEL.NORMALIZATION ('bn', 'in', 'gn', 'none'), and 'in' with torch's own
nn.InstanceNorm2d/3d(affine=True), which this project's instance norm replaces. Each variant is the same U-Net in
channels-last with the same weights, input and AdamW; the variants take turns (a few steps each,
for several rounds), so a slow spell of a shared machine hits them all alike. Prints the median
training step (forward, backward, AdamW) and no-grad forward per variant, and their ratio to the
default.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import biapy.models.blocks as blocks  # noqa: E402
from biapy.engine.optimizers import AdamW  # noqa: E402
from biapy.models.layout import to_channels_last  # noqa: E402
from biapy.models.unet import UNet  # noqa: E402

CASES = {2: {"batch": (8, 1, 64, 64), "maps": [16, 32, 64, 128, 256]},
         3: {"batch": (2, 1, 32, 64, 64), "maps": [16, 32, 64, 128]}}


def build(ndim, norm, device, torch_instance_norm=False):
    saved = blocks.InstanceNorm
    if torch_instance_norm:
        cls = nn.InstanceNorm3d if ndim == 3 else nn.InstanceNorm2d
        blocks.InstanceNorm = lambda c: cls(c, affine=True)
    try:
        torch.manual_seed(0)
        model = UNet(ndim, 1, 1, CASES[ndim]["maps"], norm=norm)
    finally:
        blocks.InstanceNorm = saved
    return to_channels_last(model.to(device), ndim)  # as a job runs it (TRAIN.CHANNELS_LAST)


def run(ndim, device, rounds, steps):
    case = CASES[ndim]
    variants = {"bn": build(ndim, "bn", device), "in": build(ndim, "in", device),
                "gn": build(ndim, "gn", device), "none": build(ndim, "none", device),
                "in, torch's": build(ndim, "in", device, torch_instance_norm=True)}
    torch.manual_seed(1)
    # One channel: .contiguous(memory_format=...) would leave these plain; the model's hook restrides x.
    x = torch.randn(*case["batch"], device=device)
    y = torch.randn(*case["batch"], device=device)
    opts = {k: AdamW(m.parameters(), lr=1e-3) for k, m in variants.items()}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def train_step(k):
        model = variants[k].train()
        loss = (model(x) - y).abs().mean()
        loss.backward()
        opts[k].step()
        opts[k].zero_grad()

    @torch.no_grad()
    def forward(k):
        variants[k].eval()(x)

    def timed(fn, k):
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            fn(k)
        sync()
        return (time.perf_counter() - t0) / steps * 1000

    for k in variants:  # warm-up: allocations, kernel choices
        for _ in range(2):
            train_step(k)
            forward(k)
    times = {k: ([], []) for k in variants}
    for _ in range(rounds):
        for k in variants:
            times[k][0].append(timed(train_step, k))
            times[k][1].append(timed(forward, k))
    med = {k: (statistics.median(a), statistics.median(b)) for k, (a, b) in times.items()}
    base = med["bn"]
    print(f"\n{ndim}D U-Net {case['maps']}, batch {tuple(case['batch'])}, {rounds} rounds of {steps} steps")
    print(f"{'variant':<16} {'step ms':>8} {'vs bn':>6} {'infer ms':>9} {'vs bn':>6}")
    for k, (s, f) in med.items():
        print(f"{k:<16} {s:8.1f} {s / base[0]:6.2f} {f:9.1f} {f / base[1]:6.2f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3, help="steps per variant per round")
    ap.add_argument("--gpu", type=int, help="CUDA device index (default: CPU)")
    ap.add_argument("--ndim", type=int, choices=(2, 3), nargs="*", default=[2, 3])
    args = ap.parse_args()
    device = torch.device(f"cuda:{args.gpu}" if args.gpu is not None else "cpu")
    print(f"torch {torch.__version__}, {device}, {torch.get_num_threads()} CPU thread(s)")
    for ndim in args.ndim:
        run(ndim, device, args.rounds, args.steps)


if __name__ == "__main__":
    main()
