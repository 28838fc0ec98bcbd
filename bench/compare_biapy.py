"""BiaPy 3.7.1 vs this project: the same 2D crappify U-Net job, same data, same YAML, timed end to end.

    python bench/compare_biapy.py                     # 5- and 40-epoch jobs, both tools
    python bench/compare_biapy.py --quick             # tiny smoke test of the script (1 and 2 epochs)
    python bench/compare_biapy.py --peer-python /path/to/venv/bin/python --repeats 3

What is measured, for each job length (short, long):
  whole job  time.perf_counter() around the subprocess (interpreter start to exit).
  training   arrival time of the first line after data and model are ready, to the end of the last
             epoch. BiaPy: its "Start training in epoch" line to its "Finished Training" line. Ours: the
             "Data: N training image(s)" line (logged just before the trainer starts) to its "Test weights:"
             line.
  test       end of training to the end of the test phase (loading the best checkpoint, reading the test
             images, patch prediction and stitching, writing outputs and metrics). BiaPy: "Finished
             Training" to "FINISHED JOB"; ours: its "Test weights:" line (logged when the test phase has
             loaded the best checkpoint; fallback: the last write of NAME_ID-checkpoint-last.pth, saved at
             the end of every epoch) to its "Test outputs in" line.
  epoch      median seconds of one epoch (train + validation) as each tool prints it per epoch.
  PSNR       computed here, the same way for both: whole restored test image as saved in per_image/
             vs the original test image, data range 255, mean over test images. Each tool's own reported
             PSNR is printed beside it (BiaPy's torchmetrics PSNR infers the range from the target).
Lines are time-stamped as they arrive (PYTHONUNBUFFERED=1); each job's stamped log is kept in the work dir.
Every job starts from a fresh copy of the data, so both tools pay for crappifying it.
"""
import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(ROOT))  # biapy.config, to check --set keys
import _peer as P  # noqa: E402
from _overrides import parse_override  # noqa: E402

OURS_MARKS = {
    "train_start": r"Data: \d+ training image",   # logged just before the trainer starts
    "train_end": r"Test weights: ",              # first line of the test phase (after the trainer's final work)
    "test_end": r"Test outputs in",
    "epoch_time": r"Epoch \d+/\d+ .*\s([0-9.]+)s(\s+\*best)?\s*$",
}


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs-short", type=int, default=5)
    ap.add_argument("--epochs-long", type=int, default=40)
    ap.add_argument("--quick", action="store_true", help="tiny run (1 and 2 epochs, small data) to test the script")
    ap.add_argument("--skip-peer", action="store_true", help="do not run BiaPy")
    ap.add_argument("--skip-ours", action="store_true", help="do not run this project")
    ap.add_argument("--peer-python", help="python of an environment with biapy==3.7.1 "
                                          "(default: create bench/.peer_venv and pip install it there)")
    ap.add_argument("--repeats", type=int, default=1, help="runs per tool and length; medians are reported")
    ap.add_argument("--workdir", help="where data, configs, results and logs go (default: a new temp dir)")
    ap.add_argument("--quiet-wait", type=float, default=300,
                    help="before each job, wait up to this many seconds for the machine to be idle (< 25%% busy)")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per job before it is killed")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="change a key (of this project's config) in the YAML both tools get; VALUE is read as YAML, "
                         "e.g. MODEL.NORMALIZATION=in")
    args = ap.parse_args()
    if args.peer_python and not args.skip_peer:
        # absolute (the peer runs from another directory) but not resolved: a venv's python is a symlink
        args.peer_python = os.path.abspath(args.peer_python)
        if not (os.path.isfile(args.peer_python) and os.access(args.peer_python, os.X_OK)):
            ap.error(f"--peer-python {args.peer_python}: not an executable Python interpreter "
                     "(leave it out to create bench/.peer_venv)")
        version = P.peer_version(args.peer_python)
        if version != P.BIAPY_VERSION:
            ap.error(f"--peer-python {args.peer_python}: biapy.__version__ there is {version!r}, "
                     f"expected {P.BIAPY_VERSION!r}")
    args.overrides = {}
    for item in args.set:
        key, value = parse_override(item, ap.error)
        args.overrides[key] = value
    return args


# ------------------------------------------------------------------ data and config
def make_data(dst, n_train, n_test, size):
    """Synthetic nuclei images from our generator, loaded by file path (no import of our package)."""
    import importlib.util
    import tifffile

    spec = importlib.util.spec_from_file_location("_synthetic", ROOT / "biapy" / "data" / "synthetic.py")
    syn = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(syn)
    nuclei = max(8, int(60 * (size / 256) ** 2))
    for split, n, base in (("train", n_train, 1000), ("test", n_test, 2000)):
        (dst / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img, _ = syn.nuclei_image((size, size), nuclei, seed=base + i)
            tifffile.imwrite(dst / split / f"{split}_{i:03d}.tif", img[..., 0])  # 2D grey uint8 (y, x)


def shared_config(epochs, data_dir, overrides=None):
    """The one YAML both tools get (only the data paths differ, each tool has its own copy)."""
    t = {}
    for k, v in {
        "SYSTEM.SEED": 0,
        "PROBLEM.TYPE": "SELF_SUPERVISED",
        "PROBLEM.NDIM": "2D",
        "PROBLEM.SELF_SUPERVISED.PRETEXT_TASK": "crappify",
        "PROBLEM.SELF_SUPERVISED.RESIZING_FACTOR": 4,
        "PROBLEM.SELF_SUPERVISED.NOISE": 0.2,
        "DATA.PATCH_SIZE": (64, 64, 1),
        "DATA.NORMALIZATION.TYPE": "zero_mean_unit_variance",
        "DATA.TRAIN.PATH": str(data_dir / "train"),
        "DATA.VAL.FROM_TRAIN": True,
        "DATA.VAL.SPLIT_TRAIN": 0.2,
        "DATA.TEST.PATH": str(data_dir / "test"),
        "DATA.TEST.LOAD_GT": True,
        "DATA.TEST.OVERLAP": (0, 0),
        "DATA.TEST.PADDING": (8, 8),
        "AUGMENTOR.ENABLE": False,
        "MODEL.ARCHITECTURE": "unet",
        "MODEL.FEATURE_MAPS": [16, 32, 64, 128, 256],
        "MODEL.DROPOUT_VALUES": [0.0, 0.0, 0.0, 0.0, 0.0],
        # Spelled out: the defaults differ (BiaPy 3.7.1 'in', ours 'bn'). Batch norm is BiaPy's faster
        # and better choice here too (12-epoch jobs: whole 37.2 s, median of 4 runs, vs 39.4 s with 'in',
        # PSNR 23.07 vs 22.75 dB), so both tools train the same network at BiaPy's best.
        "MODEL.NORMALIZATION": "bn",
        "LOSS.TYPE": "MAE",
        "TRAIN.ENABLE": True,
        "TRAIN.OPTIMIZER": "ADAMW",
        "TRAIN.LR": 0.001,
        "TRAIN.W_DECAY": 0.02,
        "TRAIN.BATCH_SIZE": 8,
        "TRAIN.EPOCHS": epochs,
        "TRAIN.PATIENCE": -1,
        "TRAIN.LR_SCHEDULER.NAME": "",
        "TEST.ENABLE": True,
        **P.PEER_SETTINGS,
        **(overrides or {}),
    }.items():
        P.set_key(t, k, v)
    return t


# ------------------------------------------------------------------ one job
def run_job(tool, epochs, rep, work, src_data, peer_python, timeout, quiet_wait, overrides):
    name = f"{tool}_e{epochs}_r{rep}"
    jdir = work / name
    shutil.rmtree(jdir, ignore_errors=True)
    data = jdir / "data"
    shutil.copytree(src_data, data)
    cfg = jdir / f"{name}.yaml"
    shared = shared_config(epochs, data, overrides)
    cfg.write_text(P.to_yaml(shared) + "\n")
    results = jdir / "results"
    busy = P.wait_for_quiet(quiet_wait)
    if tool == "biapy":
        cwd = jdir / "cwd"  # outside the repo: `import biapy` must find BiaPy's package
        cwd.mkdir()
        cmd = P.peer_command(peer_python, cfg, results, name, 1)
    else:
        cwd = ROOT
        cmd = [sys.executable, str(ROOT / "main.py"), "--config", str(cfg), "--result_dir", str(results),
               "--name", name, "--run_id", "1"]
    print(f"[run] {name}: {' '.join(cmd[:1] + cmd[3:] if tool == 'biapy' else cmd)}  (machine busy before: {_pct(busy)})", flush=True)
    rc, wall, lines, t0_epoch, other, job_cpu = P.run_timed(cmd, cwd, jdir / "stamped.log", timeout)
    job_results = results / name / "results" / f"{name}_1"
    r = {"tool": tool, "epochs": epochs, "rc": rc, "whole": wall, "other_cpu": other, "job_cpu": job_cpu, "log": jdir / "stamped.log"}
    if tool == "biapy":
        m = P.PEER_MARKS
        ts, te, tt = (P.first_time(lines, m["train_start"]), P.first_time(lines, m["train_end"], last=True),
                      P.first_time(lines, m["test_end"], last=True))
        r["reported_psnr"] = P.peer_reported_psnr(lines, job_results)
    else:
        ts = P.first_time(lines, OURS_MARKS["train_start"])
        te = P.first_time(lines, OURS_MARKS["train_end"])
        last_ckpt = results / name / "checkpoints" / f"{name}_1-checkpoint-last.pth"
        if te is None and last_ckpt.exists():  # fallback: the last per-epoch checkpoint write
            te = last_ckpt.stat().st_mtime - t0_epoch
        tt = P.first_time(lines, OURS_MARKS["test_end"], last=True)
        r["reported_psnr"] = P.csv_mean(job_results / "test_results_metrics.csv", "psnr")
    marks = P.PEER_MARKS if tool == "biapy" else OURS_MARKS
    r["epoch_s"] = P.median_epoch_seconds(lines, marks["epoch_time"])
    r["startup"] = ts
    r["train"] = te - ts if ts is not None and te is not None else None
    r["test"] = tt - te if tt is not None and te is not None else None
    names = sorted(p.name for p in (src_data / "test").iterdir())
    r["psnr"] = P.folder_psnr(job_results / "per_image", src_data / "test", names) if rc == 0 else None
    copies = data / "test_ssl_source"  # BiaPy's degraded copies; ours are in a folder per parameters there
    if tool != "biapy":
        from biapy.data.crappify import copies_folder

        ssl = shared["PROBLEM"]["SELF_SUPERVISED"]
        copies = copies_folder(copies, ssl["NOISE"], ssl["RESIZING_FACTOR"], shared["SYSTEM"]["SEED"])
    r["input_psnr"] = P.folder_psnr(copies, src_data / "test", names)
    if rc != 0:
        tail = "\n".join(s for _, s in lines[-15:])
        print(f"[run] {name} FAILED (exit {rc}); last lines:\n{tail}\nfull log: {jdir / 'stamped.log'}", flush=True)
    else:
        print(f"[run] {name}: whole {wall:.1f}s, train {_f(r['train'])}s, test {_f(r['test'])}s, "
              f"PSNR {_f(r['psnr'], 2)} dB, other processes' CPU meanwhile {_f(other)}s", flush=True)
    return r


def _pct(v):
    return "n/a" if v is None else f"{100 * v:.0f}%"


def _f(v, nd=1):
    return "n/a" if v is None else f"{v:.{nd}f}"


def median(rs, key):
    vals = [r[key] for r in rs if r.get(key) is not None and r["rc"] == 0]
    return statistics.median(vals) if vals else None


# ------------------------------------------------------------------ report
def machine_text():
    import torch

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    dev = f"cuda ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "cpu"
    return (f"{cpus} CPU core(s) usable ({os.cpu_count()} present, {platform.processor() or platform.machine()}), "
            f"torch {torch.__version__}, device used by both tools: cpu, cuda present: {dev != 'cpu'}, "
            f"Python {platform.python_version()}, {platform.system()} {platform.release()}")


def report(results, lengths, quick, overrides):
    print("\n" + "=" * 100)
    norm = overrides.get("MODEL.NORMALIZATION", "bn")
    print(f"BiaPy 3.7.1 vs ours: 2D crappify U-Net [16,32,64,128,256], MODEL.NORMALIZATION {norm}, patch 64x64x1, "
          "batch 8, ADAMW lr 1e-3, no scheduler, no augmentation")
    if overrides:
        print("Changed with --set:", ", ".join(f"{k}={v}" for k, v in overrides.items()))
    print("Machine:", machine_text())
    print("BiaPy settings (also in the shared YAML):",
          ", ".join(f"{k}={v}" for k, v in P.PEER_SETTINGS.items()), "| CPU (no --gpu)")
    import torch

    from biapy.config.load import coerce
    from biapy.engine.precision import describe_amp
    amp = coerce("TRAIN.AMP", overrides.get("TRAIN.AMP", "auto"), "auto")  # as the job reads it: YAML's off too
    print(f"Precision: ours {describe_amp(amp, torch.device('cpu'))}; BiaPy 3.7.1 float32 (it has no "
          "mixed-precision option)")
    print("Times in seconds (medians over repeats); PSNR in dB, computed here on saved whole test images "
          "(range 255) [tool's own value in brackets]")
    hdr = (f"{'epochs':>6} {'tool':<6} {'whole':>8} {'startup':>8} {'train':>8} {'epoch':>6} {'test':>7} {'PSNR':>16} "
           f"{'input':>6} {'cpu':>6} {'other':>6}")
    print(hdr)
    print("-" * len(hdr))
    verdict = []
    for e in lengths:
        row = {}
        for tool in ("biapy", "ours"):
            rs = [r for r in results if r["tool"] == tool and r["epochs"] == e]
            if not rs:
                continue
            ok = [r for r in rs if r["rc"] == 0]
            row[tool] = {k: median(rs, k) for k in ("whole", "startup", "train", "epoch_s", "test", "psnr", "reported_psnr",
                                                    "input_psnr", "job_cpu", "other_cpu")}
            m = row[tool]
            status = "" if len(ok) == len(rs) else f"  ({len(rs) - len(ok)} failed, exit {rs[-1]['rc']})"
            print(f"{e:>6} {tool:<6} {_f(m['whole']):>8} {_f(m['startup']):>8} {_f(m['train']):>8} "
                  f"{_f(m['epoch_s'], 2):>6} {_f(m['test']):>7} {_f(m['psnr'], 2):>7} [{_f(m['reported_psnr'], 2):>6}] "
                  f"{_f(m['input_psnr'], 2):>6} {_f(m['job_cpu']):>6} {_f(m['other_cpu']):>6}{status}")
        if "biapy" in row and "ours" in row:
            b, o = row["biapy"], row["ours"]
            ratio = {k: (b[k] / o[k] if b[k] and o[k] else None) for k in ("whole", "train", "test")}
            ratio["epoch"] = b["epoch_s"] / o["epoch_s"] if b["epoch_s"] and o["epoch_s"] else None
            dpsnr = o["psnr"] - b["psnr"] if o["psnr"] is not None and b["psnr"] is not None else None
            print(f"{e:>6} {'ratio':<6} {_f(ratio['whole'], 2):>8} {'':>8} {_f(ratio['train'], 2):>8} "
                  f"{_f(ratio['epoch'], 2):>6} {_f(ratio['test'], 2):>7}   BiaPy/ours; PSNR ours - BiaPy = {_f(dpsnr, 2)} dB")
            ncpu = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
            noisy = any(x["other_cpu"] is not None and x["whole"] and x["other_cpu"] > 0.1 * x["whole"] * ncpu
                        for x in (b, o))
            ok = ratio["whole"] is not None and ratio["whole"] >= 2.0 and dpsnr is not None and dpsnr >= -0.1
            verdict.append(f"{e} epochs: whole-job {_f(ratio['whole'], 2)}x, PSNR {_f(dpsnr, 2)} dB -> "
                           f"{'MET' if ok else 'NOT MET'}"
                           + ("  (UNRELIABLE: other processes used the CPUs during the jobs; rerun when idle)"
                              if noisy else ""))
    print("-" * len(hdr))
    print("startup = process start to training start (imports, config, crappifying, data loading, model build);"
          " input = PSNR of the degraded test input each tool made;\n"
          "cpu = the job's own CPU seconds (user+sys); other = CPU seconds used by other processes on the machine during the job (well above 0 = timings "
          "disturbed; rerun on a quiet machine)")
    if verdict:
        print("Target (whole job >= 2x faster, PSNR no worse than BiaPy's - 0.1 dB):")
        for v in verdict:
            print("  " + v)
    if quick:
        print("(--quick: tiny data and epochs, a smoke test of this script, not a benchmark)")


def main():
    args = parse_args()
    if args.quick:
        lengths, n_train, n_test, size = [1, 2], 4, 1, 128
    else:
        lengths, n_train, n_test, size = [args.epochs_short, args.epochs_long], 8, 2, 256
    work = Path(args.workdir or tempfile.mkdtemp(prefix="compare_biapy_")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    src = work / "source_data"
    shutil.rmtree(src, ignore_errors=True)
    make_data(src, n_train, n_test, size)
    print(f"[bench] work dir {work}: {n_train} train + {n_test} test {size}x{size} uint8 images", flush=True)
    peer_python = None
    if not args.skip_peer:
        peer_python = (Path(args.peer_python) if args.peer_python
                       else P.ensure_peer_venv(HERE / ".peer_venv"))
    results = []
    for e in lengths:
        for rep in range(args.repeats):
            if not args.skip_peer:
                results.append(run_job("biapy", e, rep, work, src, peer_python, args.timeout, args.quiet_wait,
                                                args.overrides))
            if not args.skip_ours:
                results.append(run_job("ours", e, rep, work, src, None, args.timeout, args.quiet_wait,
                                                args.overrides))
    report(results, lengths, args.quick, args.overrides)
    return 0 if all(r["rc"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
