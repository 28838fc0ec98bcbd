"""Helpers for bench/compare_biapy.py: the BiaPy 3.7.1 peer and the shared job plumbing.

Kept apart so the comparison script reads as the experiment; nothing here imports our package
(BiaPy's package is also called `biapy`, so the peer always runs in its own interpreter, from a
working directory outside this repository and with PYTHONPATH unset).
"""
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

BIAPY_VERSION = "3.7.1"
# BiaPy's CLI is `biapy --config ...`; `python -m biapy` does not exist in 3.7.1 (no __main__),
# so we call its console-script entry point through -c. No --gpu = CPU (SYSTEM.DEVICE 'cpu').
PEER_LAUNCH = "import sys; from biapy import main; sys.argv[0] = 'biapy'; sys.exit(main())"


def ensure_peer_venv(venv_dir):
    """Python of a venv with BiaPy 3.7.1, made (with --system-site-packages, so torch is shared) if absent."""
    venv_dir = Path(venv_dir).resolve()  # pip runs with the venv as its working directory
    py = venv_dir / "bin" / "python"
    if py.exists() and peer_version(py) == BIAPY_VERSION:
        return py
    print(f"[peer] creating {venv_dir} and installing biapy=={BIAPY_VERSION} (a few minutes, once)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv_dir)], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "-q", f"biapy=={BIAPY_VERSION}"], check=True,
                   cwd=str(venv_dir))
    return py


def peer_version(py):
    """biapy.__version__ in that interpreter, or None (no biapy, or not a Python)."""
    r = subprocess.run([str(py), "-c", "import biapy; print(biapy.__version__)"], capture_output=True, text=True,
                       cwd="/", env=clean_env())
    return r.stdout.strip().splitlines()[-1] if r.returncode == 0 and r.stdout.strip() else None


def clean_env():
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env["PYTHONUNBUFFERED"] = "1"  # lines arrive when printed, so arrival times mark phases
    env["PYTHONWARNINGS"] = "ignore"
    return env


def cpu_busy_seconds():
    """Seconds of CPU time the whole machine has spent busy since boot (all cores, from /proc/stat)."""
    try:
        f = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    except OSError:
        return None
    idle = f[3] + (f[4] if len(f) > 4 else 0)
    return (sum(f[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds():
    import resource
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def wait_for_quiet(max_wait, busy_fraction=0.25, window=3.0):
    """Wait (up to max_wait s) until the machine's CPUs are less than busy_fraction busy over a window.

    The bench machine may be shared: another process spinning on the same cores slows both tools by
    large, random factors. Returns the busy fraction seen last."""
    ncpu = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    deadline = time.time() + max_wait
    while True:
        b0 = cpu_busy_seconds()
        if b0 is None:
            return None
        time.sleep(window)
        frac = (cpu_busy_seconds() - b0) / (window * ncpu)
        if frac < busy_fraction or time.time() >= deadline:
            return frac


def run_timed(cmd, cwd, log_path, timeout):
    """Run cmd, stamping each output line (stdout+stderr) with its arrival time from process start.

    Returns (rc, wall_seconds, lines [(t, text)], t0_epoch, other_cpu, job_cpu) where t0_epoch is time.time() at
    start, for converting file modification times into the same clock, and other_cpu the CPU seconds
    used meanwhile by everything else on the machine, job_cpu the job's own CPU seconds (user+sys).
    """
    lines = []
    busy0, child0 = cpu_busy_seconds(), children_cpu_seconds()
    t0_epoch = time.time()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=str(cwd), env=clean_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace", bufsize=1)

    def pump():
        for raw in proc.stdout:
            t = time.perf_counter() - t0
            for part in raw.replace("\r", "\n").splitlines():  # tqdm bars end with \r
                if part.strip():
                    lines.append((t, part))

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = proc.wait()
        lines.append((time.perf_counter() - t0, f"[bench] killed after {timeout}s"))
    wall = time.perf_counter() - t0
    reader.join(timeout=10)
    # CPU seconds spent by processes other than the job during it (noise indicator)
    job_cpu = children_cpu_seconds() - child0
    other = None if busy0 is None else max(0.0, (cpu_busy_seconds() - busy0) - job_cpu)
    Path(log_path).write_text("".join(f"{t:9.3f}  {s}\n" for t, s in lines))
    return rc, wall, lines, t0_epoch, other, job_cpu


def first_time(lines, pattern, last=False):
    rx = re.compile(pattern)
    hits = [t for t, s in lines if rx.search(s)]
    if not hits:
        return None
    return hits[-1] if last else hits[0]


def median_epoch_seconds(lines, pattern):
    rx = re.compile(pattern)
    scale = {"s": 1.0, "m": 60.0, "h": 3600.0}
    vals = [float(m.group(1)) * scale.get(m.group(2) if rx.groups > 1 and m.group(2) else "s", 1.0)
            for _, s in lines for m in [rx.search(s)] if m]
    return float(np.median(vals)) if vals else None


# ------------------------------------------------------------------ BiaPy specifics
# Best settings for BiaPy on this kind of machine, each measured or read from its source:
PEER_SETTINGS = {
    # 3.7.1 computes workers as max(0, cpus - main_threads - 1) = 0 on 2 cores; 0 measured best.
    "SYSTEM.NUM_WORKERS": 0,
    # all cores for torch's intra-op threads (BiaPy uses min(4, NUM_CPUS) main threads).
    "SYSTEM.NUM_CPUS": -1,
    # train/val patches cropped once and held in RAM (no per-step disk reads).
    "DATA.TRAIN.IN_MEMORY": True,
    "DATA.VAL.IN_MEMORY": True,
    "DATA.TEST.IN_MEMORY": True,
    # SSL ignores FULL_IMG in 3.7.1 (only semantic/instance/detection implement it; a run with it
    # gave identical patch-merged outputs), so it stays at the default.
    "TEST.FULL_IMG": False,
    # Only PSNR is compared: BiaPy's default SSL train metrics (psnr, mae, mse, ssim) are computed on
    # every training step, so asking for psnr alone spares it that work. Given to both tools.
    "TRAIN.METRICS": ["psnr"],
    "TEST.METRICS": ["psnr"],
}

# Log markers (lines BiaPy 3.7.1 prints; its SSL workflow in engine/self_supervised.py + base_workflow.py)
PEER_MARKS = {
    "train_start": r"Start training in epoch",
    "train_end": r"Finished Training",
    "test_end": r"FINISHED JOB",
    "epoch_time": r"\[Time\] ([0-9.]+)([smh])\b",  # e.g. "[Time] 3.1s 3.1s/9.4s", "[Time] 1.8m ..."
}


def peer_command(peer_python, config, result_dir, name, run_id):
    return [str(peer_python), "-c", PEER_LAUNCH, "--config", str(config), "--result_dir", str(result_dir),
            "--name", name, "--run_id", str(run_id)]


def peer_reported_psnr(lines, job_results):
    """BiaPy's own test PSNR: per-image rows in test_results_metrics.csv, or its summary line."""
    csv = Path(job_results) / "test_results_metrics.csv"
    v = csv_mean(csv, "psnr")
    if v is not None:
        return v
    for _, s in lines:
        m = re.search(r"Test PSNR \(merge patches\): ([0-9.]+)", s)
        if m:
            return float(m.group(1))
    return None


def csv_mean(path, column):
    path = Path(path)
    if not path.exists():
        return None
    rows = path.read_text().strip().splitlines()
    if len(rows) < 2:
        return None
    head = [h.strip().lower() for h in rows[0].split(",")]
    if column not in head:
        return None
    k = head.index(column)
    vals = []
    for r in rows[1:]:
        cells = r.split(",")
        try:
            vals.append(float(cells[k]))
        except (ValueError, IndexError):
            pass
    return float(np.mean(vals)) if vals else None


# ------------------------------------------------------------------ images and PSNR
def read_grey(path):
    import tifffile
    a = np.asarray(tifffile.imread(str(path)))
    a = np.squeeze(a)
    if a.ndim != 2:
        raise ValueError(f"{path}: expected one 2D grey image, got shape {a.shape}")
    return a.astype(np.float64)


def psnr(pred, ref, data_range=255.0):
    mse = float(np.mean((pred - ref) ** 2))
    return 100.0 if mse == 0 else 10.0 * np.log10(data_range ** 2 / mse)


def folder_psnr(pred_dir, ref_dir, names):
    """Mean PSNR (data range 255, whole image) of pred_dir/<name> against ref_dir/<name>; None if any is missing."""
    vals = []
    for n in names:
        cand = [Path(pred_dir) / n] + sorted(Path(pred_dir).glob(Path(n).stem + "*.tif*"))
        found = next((c for c in cand if c.exists()), None)
        if found is None:
            return None
        vals.append(psnr(read_grey(found), read_grey(Path(ref_dir) / n)))
    return float(np.mean(vals))


# ------------------------------------------------------------------ YAML
def to_yaml(tree, indent=0):
    """Plain YAML the way BiaPy templates write it: tuples as '(a, b)' (yacs literal_evals them)."""
    out = []
    for k, v in tree.items():
        pad = "  " * indent
        if isinstance(v, dict):
            out.append(f"{pad}{k}:")
            out.append(to_yaml(v, indent + 1))
        else:
            out.append(f"{pad}{k}: {_scalar(v)}")
    return "\n".join(out)


def _scalar(v):
    if isinstance(v, bool):
        return "True" if v else "False"
    if isinstance(v, tuple):
        return "(" + ", ".join(_scalar(x) for x in v) + ")"
    if isinstance(v, list):
        return "[" + ", ".join(_scalar(x) for x in v) + "]"
    if isinstance(v, str):
        return f"'{v}'" if v == "" or v.lower() in ("true", "false", "none") else v
    return repr(v)


def set_key(tree, dotted, value):
    node = tree
    parts = dotted.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
