"""Where the ViT MAE's training step goes, at mask ratio 0.75 and 0: wall time against device time.

    python bench/profile_mae.py                 # CPU, the run_all CPU size
    python bench/profile_mae.py --gpu 0         # the run_all GPU size (ViT-B, batch 64, bf16 autocast)
    python bench/profile_mae.py --gpu 0 --compile   # the same model under torch.compile (TRAIN.COMPILE)
    python bench/profile_mae.py --gpu 0 --trainer   # the step alone against the same step through the trainer
    python bench/profile_mae.py --size gpu --batch 8 --rows 0   # ViT-B at 224x224 (MAE's own size) on the CPU
    python bench/profile_mae.py --amp off                        # in float32 (TRAIN.AMP off)

For each mask ratio: the median wall milliseconds of a step (forward, masked loss, backward, AdamW), then
one profiled block of steps: device kernel milliseconds per step, kernel launches per step and the
heaviest operators. On a GPU, a wall time well above the kernel time means the host, launching
kernels one by one, sets the pace: then hiding tokens from the encoder saves little, and fusing
kernels (torch.compile) is what helps. The model and batch are run_all's 2D ViT MAE case, alone in
this process (no loader, no trainer). Nothing here asserts a time.

With --trainer, no profile: the step alone is timed beside the same step through the trainer (the
workflow's compute_loss, the trainer's optimizer and autocast; synthetic images, loader workers as a run
has them), in one process, fresh and after two real epochs, and the real epoch's step too. Where the
step is bound by the host (the ViT MAE at mask ratio 0.75 on an H200), this tells a cost of the
trainer's path from one of the process's state (live workers, the host's speed).
"""
import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # the profiler's own start/stop lines still go to stderr
import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(1, str(HERE))

import _cases  # noqa: E402  (run_all's cases)
from biapy.config import load_config  # noqa: E402
from biapy.engine.losses import masked_reconstruction_loss  # noqa: E402
from biapy.engine.optimizers import AdamW  # noqa: E402
from biapy.engine.precision import autocast, precision_name, resolve_amp  # noqa: E402
from biapy.models import build_model  # noqa: E402

LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", help="CUDA device index (default: CPU)")
    ap.add_argument("--compile", action="store_true", help="wrap the model in torch.compile first")
    ap.add_argument("--batch", type=int, help="patches per step (default: the run_all case's)")
    ap.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "off"),
                    help="TRAIN.AMP: the precision of the steps (default auto, as a run's)")
    ap.add_argument("--size", choices=("cpu", "gpu"),
                    help="the run_all case's CPU or GPU size (model, patch, batch) on any device (default: the device's)")
    ap.add_argument("--steps", type=int, default=5, help="steps per timed block (default 5)")
    ap.add_argument("--rows", type=int, default=8, help="operators listed per ratio (default 8; 0: none)")
    ap.add_argument("--trainer", action="store_true",
                    help="time the step alone and through the trainer, fresh and after two real epochs (no profile)")
    args = ap.parse_args()
    device = torch.device(f"cuda:{args.gpu}" if args.gpu is not None else "cpu")
    cuda = device.type == "cuda"
    size = dict(_cases.CASES["2d_mae"][args.size or ("gpu" if cuda else "cpu")])
    size["batch"] = args.batch or size["batch"]
    cfg = load_config(_cases.case_config("2d_mae", size, Path("unused"), 1, str(device)))
    torch.manual_seed(0)
    vit = build_model(cfg).to(device).train()
    model = torch.compile(vit) if args.compile else vit
    opt = AdamW(vit.parameters(), lr=1e-4)
    x = torch.randn(size["batch"], 1, *size["patch"], device=device)
    ssl = cfg.PROBLEM.SELF_SUPERVISED
    amp = resolve_amp(args.amp, device)[0]  # auto: bf16 on a recent GPU, an AMX or a Zen 4+ CPU, as a run's
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def step():
        with autocast(device, amp):
            pred, mask = model(x)
            loss = masked_reconstruction_loss(pred, x, mask, vit.token_size, ssl.NORM_PIX_LOSS,
                                              ssl.LOSS_ON_MASKED_ONLY)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def block(n, fn=step):
        sync()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        sync()
        return (time.perf_counter() - t0) / n * 1000

    if args.trainer:
        return through_trainer(args, size, device, vit, step, block)

    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    print(f"2D ViT MAE, {tuple(size['patch'])} x {size['batch']}, {device}"
          f"{' (' + torch.cuda.get_device_name(device) + ')' if cuda else ''}, torch {torch.__version__}"
          f"{', torch.compile' if args.compile else ''}, {precision_name(amp)}", flush=True)
    walls = {}
    for ratio in (0.75, 0.0):
        vit.mask_ratio = ratio
        block(3)  # warm-up (and, with --compile, the compilation for this ratio)
        walls[ratio] = statistics.median(block(args.steps) for _ in range(3))
        with profile(activities=activities) as prof:
            block(args.steps)
        events = prof.key_averages()
        kernels = sum(e.self_device_time_total for e in prof.events()) / 1000 / args.steps
        launches = sum(e.count for e in events if e.key in LAUNCHES) / args.steps
        line = f"mask ratio {ratio}: wall {walls[ratio]:.1f} ms/step"
        if cuda:
            line += f", device kernels {kernels:.1f} ms/step, {launches:.0f} kernel launches/step"
        print(line, flush=True)
        if args.rows:
            sort = "self_device_time_total" if cuda else "self_cpu_time_total"
            print(events.table(sort_by=sort, row_limit=args.rows, max_name_column_width=50), flush=True)
    print(f"wall ratio 0.75 / 0: {walls[0.75] / walls[0.0]:.3f}")


def through_trainer(args, size, device, alone_vit, alone, block):
    """The step alone (this script's model) against the same step through the trainer, in one process."""
    from biapy.engine.trainer import _unwrap
    from biapy.runner import setup_logging

    setup_logging(is_main=False)
    tmp = Path(tempfile.mkdtemp(prefix="profile_mae_"))
    cfg, wf, trainer = _cases.case_trainer("2d_mae", size, tmp / "data", args.steps * 4, str(device),
                                            overrides={"TRAIN.AMP": args.amp})  # the precision of `alone`
    vits = (alone_vit, _unwrap(trainer.model))
    # The images on the device as in `alone`; the sample indices stay on the host, as the loader gives them:
    # compute_loss reads one to seed the masks, and from the device that read would wait for the GPU each step.
    x, indices = next(iter(wf.train_loader))
    batch = (x.to(device), indices)

    def through():
        with trainer._autocast():
            loss, _ = wf.compute_loss(batch, train=True)
        loss.backward()
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)

    def line(label):
        cells = []
        for ratio in (0.75, 0.0):
            for vit in vits:
                vit.mask_ratio = ratio
            for fn in (alone, through):
                block(3, fn)
            times = [statistics.median(block(args.steps, fn) for _ in range(3)) for fn in (alone, through)]
            cells.append(f"ratio {ratio}: alone {times[0]:.1f}, through the trainer {times[1]:.1f}")
        print(f"{label}: " + "; ".join(cells) + " ms/step", flush=True)

    print(f"2D ViT MAE, {tuple(size['patch'])} x {size['batch']}, {device}, torch {torch.__version__}, "
          f"{cfg.SYSTEM.NUM_WORKERS} loader workers, {torch.get_num_threads()} threads", flush=True)
    try:
        line("fresh")
        for vit in vits:
            vit.mask_ratio = cfg.MODEL.MAE_MASK_RATIO
        trainer.epochs = 2
        for epoch in range(2):
            t0 = time.perf_counter()
            trainer._train_epoch(epoch)
            real = (time.perf_counter() - t0) / len(wf.train_loader) * 1000
            trainer._validate(epoch)
        print(f"the trainer's second real epoch (mask ratio {cfg.MODEL.MAE_MASK_RATIO}): {real:.1f} ms/step", flush=True)
        line("after two real epochs")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
