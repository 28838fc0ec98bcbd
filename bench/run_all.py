"""The performance suite: one table of training, data-wait, inference and memory figures, with targets.

    python bench/run_all.py                # four cases + out-of-core training, ~10 min on 2 CPU cores
    python bench/run_all.py --quick        # small sizes and few steps: checks the script in ~1 min
    python bench/run_all.py --gpu 0        # on a GPU (bigger, GPU-sized cases; GPU memory reported)
    python bench/run_all.py --only 2d_crappify 2d_mae   # some cases (--only ooc: the out-of-core line alone)

Cases (each in its own process, so peak memory is its own): 2D crappify U-Net, 3D crappify U-Net,
2D ViT MAE and 3D masked U-Net, built from this project's config and run by its own trainer and
workflows on synthetic images written to a temp dir. Per case:

  bare step    the model's forward + loss + backward + optimizer step (+ zero_grad) on one batch
               already on the device: the limit any training loop can reach.
  real step    one training epoch of the real trainer (loader, crops, augmentation, loss read-back,
               progress bar), divided by its steps: the second of two epochs in a row, so its first
               batches were prepared during a validation pass, as in a run. Target: real / bare <= 1.10.
  data wait    share of the real epoch spent waiting for the next batch from the loader.
  val          seconds of the validation pass after each epoch (reported, not part of the step).
  inference    voxels/s of whole-image stitched prediction (Workflow.predict_image: normalization, patch
               grid, batched forward passes, blending) against the same number of bare forward
               passes on batches already on the device. Target: stitched / bare <= 1.20.
  peak memory  VmHWM of the case's process (RSS); on a GPU also torch.cuda.max_memory_allocated.
Bare and real blocks alternate (--repeats times) and medians are reported, which keeps a noisy
machine from favouring either side. The MAE line compares bare steps of the same ViT at mask ratio
0.75 and 0 (target: under half). The out-of-core line trains the 3D masked U-Net through the normal
job runner on a >= 4 GB uint16 volume read lazily (DATA.TRAIN.IN_MEMORY False); target: peak RSS
under 1 GB; --torch-python runs that line a second time under another interpreter (e.g. one with the
CPU-only torch build, whose import takes ~280 MB less than the CUDA build's, ~145 MB once a CPU job
has released the CUDA libraries' read-only pages). Nothing here asserts a
time; the exit status is 0 unless a case fails to run.
"""
import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from _overrides import parse_override  # noqa: E402
from bench_data import _hwm_mb as hwm_mb, make_volume  # noqa: E402  (peak RSS; the big synthetic volume)
from _cases import CASES, QUICK, case_trainer, write_images  # noqa: E402

TARGETS = {"step": 1.10, "infer": 1.20, "mae": 0.5, "ooc_mb": 1024}
OOC_PATCH, OOC_BATCH = (32, 64, 64), 2  # as the 3D masked U-Net case




# ---------------------------------------------------------------------------------------------- helpers
def machine(device):
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    text = (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"Python {platform.python_version()}")
    if device.startswith("cuda"):
        text += f", GPU {torch.cuda.get_device_name(torch.device(device))}"
    malloc = [f"{k}={v}" for k, v in os.environ.items() if k.startswith("MALLOC_") or k == "GLIBC_TUNABLES"]
    if malloc:  # they shape every figure; the job runner keeps thresholds set here (biapy/utils/memory.py)
        text += ", " + " ".join(sorted(malloc))
    try:
        load = os.getloadavg()[0]
        text += f", load average {load:.2f} at start"
    except OSError:
        pass
    return text


class TimedLoader:
    """The trainer's loader with the time spent waiting in `next()` added up."""

    def __init__(self, loader):
        self.loader, self.wait = loader, 0.0

    def __getattr__(self, name):  # sampler, dataset, ... (set_epoch reads them)
        return getattr(self.loader, name)

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        return self._timed(iter(self.loader))  # iter() now, as the trainer expects: workers start on the first batches

    def _timed(self, it):
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            finally:
                self.wait += time.perf_counter() - t0
            yield batch


# ---------------------------------------------------------------------------------------------- one case
def _refuse(message):
    raise SystemExit(message)


def run_case(args):
    import torch

    from biapy.data.io import read_image
    from biapy.data.patches import grid_starts
    from biapy.engine.precision import describe_amp, precision_name
    from biapy.engine.trainer import _unwrap
    from biapy.models.folding import fold_batch_norm
    from biapy.runner import setup_logging

    setup_logging(is_main=False)  # warnings only: the parent prints the table
    device = args.device
    spec = CASES[args.case]
    size = dict(spec["gpu" if device.startswith("cuda") else "cpu"])
    if args.quick:
        size.update(QUICK[args.case])
    ndim = spec["ndim"]
    data = Path(args.workdir) / "data"
    write_images(data / "test", size["image"], 1, ndim, seed=30)
    steps = args.steps or (3 if args.quick else size.get("steps", 12))
    overrides = dict(parse_override(item, _refuse) for item in args.set)
    cfg, wf, trainer = case_trainer(args.case, size, data, steps, device, args.workers, overrides)
    loader = wf.train_loader = TimedLoader(wf.train_loader)
    steps = len(loader)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    x, y = next(iter(loader.loader))
    # Where the workflow puts them: a masking batch's sample indices stay on the host (they seed its masks; read
    # back from a GPU, they had made the bare step wait for it every step).
    batch = wf.to_device((x, y))

    def bare(n):
        model = trainer.model
        model.train()
        wf.model = trainer.train_model
        opt = trainer.optimizer
        sync()
        t0 = time.perf_counter()
        for _ in range(n):
            with trainer._autocast():
                loss, _ = wf.compute_loss(batch, train=True)
            (trainer.scaler.scale(loss) if trainer.scaler else loss).backward()
            if trainer.scaler:
                trainer.scaler.step(opt)
                trainer.scaler.update()
            else:
                opt.step()
            opt.zero_grad(set_to_none=True)
        sync()
        return (time.perf_counter() - t0) / n

    def epoch_pass(epoch):
        loader.wait = 0.0
        sync()
        t0 = time.perf_counter()
        trainer._train_epoch(epoch)
        sync()
        total = time.perf_counter() - t0
        t1 = time.perf_counter()
        trainer._validate(epoch)
        sync()
        return total / steps, loader.wait / total, time.perf_counter() - t1

    def real(epoch):
        # With loader workers the trainer starts an epoch's first batches while the previous epoch validates.
        # The epoch after a bare block had that block's time too; the next one had a validation pass only,
        # as in a run (which also saves and logs in that gap): it is the one reported. It is also the
        # trainer's last, so no next epoch is started: the workers stay idle through the bare blocks and the
        # inference timing, which they would otherwise share the cores with.
        trainer.epochs = epoch + 2
        epoch_pass(epoch)
        return epoch_pass(epoch + 1)

    # Warm-up: first calls allocate, pick kernels, fill caches (and compile when TRAIN.COMPILE is on).
    bare(2)
    real(0)
    bares, reals, waits, vals = [], [], [], []
    for r in range(args.repeats):
        bares.append(bare(steps))
        step_s, wait, val_s = real(2 * r + 2)
        reals.append(step_s)
        waits.append(wait)
        vals.append(val_s)

    out = {"case": args.case, "title": spec["title"], "steps": steps, "batch": size["batch"],
           "patch": list(size["patch"]), "bare_s": statistics.median(bares), "real_s": statistics.median(reals),
           "wait": statistics.median(waits), "val_s": statistics.median(vals), "workers": cfg.SYSTEM.NUM_WORKERS}
    out["patches_per_s"] = size["batch"] / out["real_s"]

    out["precision"] = describe_amp(cfg.TRAIN.AMP, torch.device(device))
    if args.case == "2d_mae":  # the encoder sees only visible tokens: compare with nothing hidden
        vit = _unwrap(trainer.model)

        def mask_ratios():
            vit.mask_ratio = 0.0
            bare(2)
            full = statistics.median(bare(steps) for _ in range(args.repeats))
            vit.mask_ratio = 0.75
            masked = statistics.median(bare(steps) for _ in range(args.repeats))
            return masked, full

        out["mae_s"] = {precision_name(trainer.amp_dtype): mask_ratios()}
        if trainer.amp_dtype is not None:  # the same in float32: fixed costs weigh differently there
            amp, trainer.amp_dtype, scaler, trainer.scaler = trainer.amp_dtype, None, trainer.scaler, None
            out["mae_s"][precision_name(None)] = mask_ratios()
            trainer.amp_dtype, trainer.scaler = amp, scaler

    # Whole-image inference: stitched prediction vs the bare forward passes it needs, with the model the
    # test phase predicts with (batch norm folded into the convolutions).
    wf.model = trainer.eval_model
    fold_batch_norm(trainer.model)
    test_file = sorted((data / "test").iterdir())[0]
    image = read_image(test_file, ndim)
    stats = wf.normalizer.stats(image)
    t = cfg.DATA.TEST
    n_patches = len(grid_starts(image.shape[:-1], size["patch"], tuple(t.OVERLAP), tuple(t.PADDING)))
    bs = cfg.TEST.BATCH_SIZE
    probe = torch.randn((bs, 1) + tuple(size["patch"]), device=device)

    def stitched():
        sync()
        t0 = time.perf_counter()
        wf.predict_image(image, stats, test_file)
        sync()
        return time.perf_counter() - t0

    @torch.no_grad()
    def forward_only():
        sync()
        t0 = time.perf_counter()
        for k in range(0, n_patches, bs):
            wf.predict_batch(probe[: min(bs, n_patches - k)])
        sync()
        return time.perf_counter() - t0

    stitched(), forward_only()  # warm-up
    st, fw = [], []
    for _ in range(args.repeats):
        st.append(stitched())
        fw.append(forward_only())
    out.update({"voxels": int(np.prod(image.shape[:-1])), "n_patches": n_patches,
                "stitched_s": statistics.median(st), "forward_s": statistics.median(fw)})
    out["voxels_per_s"] = out["voxels"] / out["stitched_s"]
    out["rss_mb"] = hwm_mb()
    if device.startswith("cuda"):
        out["gpu_mb"] = torch.cuda.max_memory_allocated(torch.device(device)) / 2 ** 20
    print("RESULT " + json.dumps(out))


# ---------------------------------------------------------------------------------------------- out of core
def run_ooc(args):
    """Train the 3D masked U-Net through the job runner on the volume in args.workdir; report peak RSS.

    The volume is written by the parent: writing it through a memory map would leave every page of it
    counted in this process's peak RSS.
    """
    import torch  # first, so its own share of the peak is known

    torch_mb = hwm_mb()
    from biapy import BiaPy
    from biapy.runner import setup_logging
    from biapy.utils.memory import gpu_library_mappings

    def gpu_lib_mb():
        return sum(m.rss for m in gpu_library_mappings()) / 2 ** 20

    gpu_lib_import = gpu_lib_mb()

    tmp = Path(args.workdir)
    volume = tmp / "train" / "volume.tif"
    batch, steps = OOC_BATCH, (args.steps or (3 if args.quick else 8))
    cfg = {
        "SYSTEM": {"SEED": 0},
        "PROBLEM": {"TYPE": "SELF_SUPERVISED", "NDIM": "3D",
                    "SELF_SUPERVISED": {"PRETEXT_TASK": "masking", "MASK_BLOCK_SIZE": 8}},
        "DATA": {"PATCH_SIZE": OOC_PATCH + (1,), "NORMALIZATION": {"TYPE": "zero_mean_unit_variance"},
                 "TRAIN": {"PATH": str(tmp / "train"), "IN_MEMORY": args.in_memory,
                           "PATCHES_PER_IMAGE": steps * batch},
                 "VAL": {"FROM_TRAIN": False, "PATH": str(tmp / "val"), "IN_MEMORY": args.in_memory}},
        "MODEL": {"ARCHITECTURE": "unet", "FEATURE_MAPS": [16, 32, 64, 128], "DROPOUT_VALUES": [0.0] * 4,
                  "Z_DOWN": [1, 2, 2], "MAE_MASK_RATIO": 0.6},
        "TRAIN": {"EPOCHS": 1, "BATCH_SIZE": batch, "OPTIMIZER": "ADAMW", "LR": 1e-3},
        "AUGMENTOR": {"ENABLE": True, "VFLIP": True, "HFLIP": True, "ZFLIP": True},
        "TEST": {"ENABLE": False},
    }
    gpu = args.device.split(":")[1] if args.device.startswith("cuda") else None
    setup_logging(is_main=False)
    t0 = time.perf_counter()
    BiaPy(cfg, result_dir=tmp / f"results_{os.getpid()}", name="ooc", run_id=1, gpu=gpu).run_job()
    print("RESULT " + json.dumps({"case": "ooc", "size_gb": volume.stat().st_size / 1e9, "steps": steps,
                                  "in_memory": args.in_memory, "job_s": time.perf_counter() - t0,
                                  "rss_mb": hwm_mb(), "torch_mb": torch_mb, "torch": torch.__version__,
                                  "gpu_lib_mb": [gpu_lib_import, gpu_lib_mb()],
                                  "torch_cuda_build": torch.version.cuda is not None}))


def out_of_core(args):
    """Peak RSS of training on a >= 4 GB volume read lazily, and of the same job on a small in-memory one.

    With --torch-python, each volume is trained on a second time under that interpreter (another torch
    build, e.g. the CPU-only one), on the same files. Returns {"main": {label: result}, "other": {...}}.
    """
    pythons = {"main": sys.executable, **({"other": args.torch_python} if args.torch_python else {})}
    results = {key: {} for key in pythons}
    for label, shape, in_memory in (("big", (64, 256, 512) if args.quick else (2048, 1024, 1024), False),
                                    ("baseline", (64, 256, 256), True)):
        work = Path(tempfile.mkdtemp(prefix=f"bench_ooc_{label}_", dir=args.workdir))
        try:
            t0 = time.perf_counter()
            for folder in ("train", "val"):
                (work / folder).mkdir()
            make_volume(work / "train" / "volume.tif", shape)
            make_volume(work / "val" / "volume.tif", (64, 256, 256), seed=1)
            print(f"[bench] out of core: {label} volume {shape} written in {time.perf_counter() - t0:.0f} s",
                  flush=True)
            for key, python in pythons.items():
                r = child(args, "ooc", extra=["--in-memory"] if in_memory else [], work=work, python=python)
                if r is None:
                    return None
                r["shape"] = shape
                results[key][label] = r
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return results


# ---------------------------------------------------------------------------------------------- parent
def child(args, mode, case=None, extra=(), work=None, python=sys.executable):
    """Run one measurement in a fresh process (its own peak memory); returns its RESULT dict or None."""
    own_work = work is None
    work = work or Path(tempfile.mkdtemp(prefix=f"bench_{case or mode}_", dir=args.workdir))
    cmd = [python, __file__, "--child", mode, "--workdir", str(work), "--device", args.device,
           "--repeats", str(args.repeats), *extra]
    if args.steps:
        cmd += ["--steps", str(args.steps)]
    cmd += ["--workers", str(args.workers)]
    for item in args.set:
        cmd += ["--set", item]
    if case:
        cmd += ["--case", case]
    if args.quick:
        cmd.append("--quick")
    print(f"[bench] {case or mode}{' (in memory)' if extra else ''}"
          f"{'' if python == sys.executable else ' under ' + str(python)} ...", flush=True)
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    finally:
        if own_work:
            shutil.rmtree(work, ignore_errors=True)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        print(out.stdout[-2000:], out.stderr[-4000:], sep="\n", file=sys.stderr)
        return None
    return json.loads(lines[-1][len("RESULT "):])


def verdict(value, target, below=True):
    ok = value <= target if below else value >= target
    return "ok" if ok else "MISSED"


def print_rows(rows, gpu):
    head = (f"{'case':<19} {'patch x batch':<17} {'patches/s':>9} {'bare ms':>8} {'real ms':>8} "
            f"{'real/bare':>9} {'data wait':>9} {'val s':>6} {'infer Mvox/s':>12} {'stitch/bare':>11} "
            f"{'peak RSS MB':>11}" + (f" {'GPU MB':>7}" if gpu else ""))
    print(head)
    print("-" * len(head))
    for r in rows:
        shape = "x".join(map(str, r["patch"])) + f" x {r['batch']}"
        step_ratio = r["real_s"] / r["bare_s"]
        inf_ratio = r["stitched_s"] / r["forward_s"]
        print(f"{r['title']:<19} {shape:<17} {r['patches_per_s']:>9.1f} {1000 * r['bare_s']:>8.1f} "
              f"{1000 * r['real_s']:>8.1f} {step_ratio:>9.3f} {100 * r['wait']:>8.1f}% {r['val_s']:>6.2f} "
              f"{r['voxels_per_s'] / 1e6:>12.2f} {inf_ratio:>11.3f} {r['rss_mb']:>11.0f}"
              + (f" {r['gpu_mb']:>7.0f}" if gpu else ""))


def print_ooc(big, base):
    patch = "x".join(map(str, OOC_PATCH))
    build = "a CPU-only build"
    if big["torch_cuda_build"]:
        at_import, after = big["gpu_lib_mb"]
        build = (f"a CUDA build, which maps its CUDA libraries even when no GPU is used: {at_import:.0f} MB of "
                 f"their pages at import, {after:.0f} MB left after the job, whose runner releases the read-only "
                 "ones on a CPU")
    print(f"  Out of core: 3D masked U-Net (patch {patch}, batch {OOC_BATCH}) trained {big['steps']} steps on a "
          f"{big['size_gb']:.2f} GB volume {tuple(big['shape'])} with IN_MEMORY False: peak RSS "
          f"{big['rss_mb']:.0f} MB (target < {TARGETS['ooc_mb']} MB): {verdict(big['rss_mb'], TARGETS['ooc_mb'])};\n"
          f"  {'':<13}the same job on a {base['size_gb'] * 1000:.0f} MB volume held in memory: {base['rss_mb']:.0f} MB;\n"
          f"  {'':<13}import torch alone: {big['torch_mb']:.0f} MB (torch {big['torch']}, {build})")


def print_table(rows, ooc, device, started, asked_workers=-1):
    gpu = device.startswith("cuda")
    print(f"\nMachine: {started}")
    if rows:
        print_rows(rows, gpu)
    print("\nAgainst the targets:")
    for r in rows:
        step_ratio = r["real_s"] / r["bare_s"]
        inf_ratio = r["stitched_s"] / r["forward_s"]
        print(f"  {r['title']:<19} real step {step_ratio:.3f}x bare (target <= {TARGETS['step']:.2f}): "
              f"{verdict(step_ratio, TARGETS['step'])};  stitched inference {inf_ratio:.3f}x bare forwards over "
              f"{r['n_patches']} patches (target <= {TARGETS['infer']:.2f}): {verdict(inf_ratio, TARGETS['infer'])}")
        for precision, (masked, full) in r.get("mae_s", {}).items():
            print(f"  {'':<19} MAE step at mask ratio 0.75 vs 0, {precision}: {1000 * masked:.1f} / {1000 * full:.1f} "
                  f"ms = {masked / full:.3f} (target < {TARGETS['mae']}): {verdict(masked / full, TARGETS['mae'])}")
    for runs in (ooc or {}).values():  # the running interpreter's first
        print_ooc(runs["big"], runs["baseline"])
    if not rows:
        return
    workers = sorted({r["workers"] for r in rows})
    blocks = ", ".join(sorted({str(r["steps"]) for r in rows}))
    how = "auto" if asked_workers == -1 else "--workers"
    print(f"\nLoader workers: {', '.join(map(str, workers))} (SYSTEM.NUM_WORKERS {how}); medians of {blocks}-step "
          "blocks; data made by the script (synthetic nuclei).")
    print(f"Precision: {', '.join(sorted({r['precision'] for r in rows}))}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--gpu", help="GPU index (default: CPU)")
    ap.add_argument("--only", nargs="+", choices=[*CASES, "ooc"],
                    help="run only these cases ('ooc': the out-of-core training)")
    ap.add_argument("--skip-ooc", action="store_true", help="skip the >= 4 GB out-of-core training")
    ap.add_argument("--quick", action="store_true", help="small sizes, few steps (tests the script)")
    ap.add_argument("--steps", type=int, default=None,
                    help="training steps per timed block (default 12; 6 for 3D cases on a CPU, 48 for 2D "
                         "crappify on a GPU; quick 3)")
    ap.add_argument("--repeats", type=int, default=None, help="alternating bare/real blocks (default 3, quick 1)")
    ap.add_argument("--workers", type=int, default=-1,
                    help="SYSTEM.NUM_WORKERS for the four cases (default -1: automatic, as a run)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="change a key of the four cases' config; VALUE is read as YAML and must have the key's type "
                         "(e.g. TRAIN.COMPILE=True)")
    ap.add_argument("--workdir", help="where temporary data goes (default: system temp)")
    ap.add_argument("--torch-python", metavar="PYTHON",
                    help="also run the out-of-core line under this interpreter (another torch build, e.g. the "
                         "CPU-only one; bench/README.md says how to make one)")
    ap.add_argument("--child", choices=["case", "ooc"], help=argparse.SUPPRESS)
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--device", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--in-memory", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.repeats = args.repeats or (1 if args.quick else 3)
    if args.workdir and not args.child:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
    for item in args.set:
        parse_override(item, ap.error)  # an unknown key or a bad value ends here, before any case runs
    if args.torch_python:
        if args.skip_ooc or (args.only and "ooc" not in args.only):
            ap.error("--torch-python only applies to the out-of-core line, which --skip-ooc or --only leaves out")
        if not (os.path.isfile(args.torch_python) and os.access(args.torch_python, os.X_OK)):
            ap.error(f"--torch-python {args.torch_python}: not an executable Python interpreter")
        # children run from the repository root; a venv's python is a symlink: no resolve()
        args.torch_python = os.path.abspath(args.torch_python)
    if args.device is None:
        args.device = f"cuda:{args.gpu}" if args.gpu is not None else "cpu"
    if args.child == "case":
        return run_case(args)
    if args.child == "ooc":
        return run_ooc(args)

    started = machine(args.device)
    print(f"[bench] {started}", flush=True)
    rows, failed = [], []
    for name in [c for c in args.only or CASES if c != "ooc"]:
        r = child(args, "case", name)
        (rows.append(r) if r else failed.append(name))
    ooc = None
    if not args.skip_ooc and (not args.only or "ooc" in args.only):
        ooc = out_of_core(args)
        if ooc is None:
            failed.append("out-of-core")
    print_table(rows, ooc, args.device, started, args.workers)
    if args.set:
        print(f"Config overrides: {', '.join(args.set)}")
    if args.quick:
        print("--quick: smoke-test sizes and steps, to check the script; its verdicts say nothing of the targets")
    if failed:
        print(f"\nFailed to run: {', '.join(failed)} (see the errors above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
