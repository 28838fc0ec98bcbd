"""Derive the values a run needs from a checked config, before any work is done.

`finalize` is the one place where "-1 = automatic" and paths are resolved: the cores and worker processes
(shared among torchrun's processes, `cores_per_process`), the default loss and metrics, crappify's copy
folders (`ssl_copy_dir`) and the paths of the results tree.
"""
import os
from pathlib import Path

from biapy.errors import ConfigError, shown

# The metrics of each problem: what TRAIN/TEST.METRICS may name (checks.py), and TEST.METRICS's default.
METRICS = {
    "SELF_SUPERVISED": ("psnr", "ssim", "mae", "mse"),
    "SEMANTIC_SEG": ("iou", "dice"),
}
DEFAULT_LOSS = {"SELF_SUPERVISED": "MAE", "SEMANTIC_SEG": "CE"}
# Training metrics are cheap ones; SSIM is left to the test phase by default.
DEFAULT_TRAIN_METRICS = {"SELF_SUPERVISED": ["psnr"], "SEMANTIC_SEG": ["iou"]}


def ssl_copy_dir(data, split):
    """Crappify's copy folder of a split: its SSL_SOURCE_DIR, else '<PATH>_ssl_source' beside the images
    (validation split off the training images: the training one)."""
    if data[split].SSL_SOURCE_DIR:
        return data[split].SSL_SOURCE_DIR
    if split == "VAL" and data.VAL.FROM_TRAIN:
        return ssl_copy_dir(data, "TRAIN")
    if not data[split].PATH:
        return ""
    path = Path(data[split].PATH)
    if path.name in ("", ".."):  # '.' or '..': named after the folder itself, not put inside it as '_ssl_source'
        path = Path(os.path.abspath(path))
    return str(path.parent / f"{path.name}_ssl_source")


def env_process_count(name):
    """A process count torchrun puts in the environment; unset or empty = None."""
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    if not value.isdigit():
        raise ConfigError(f"environment variable {name}={shown(value)} is not a process count (expected a whole "
                          "number, as torchrun sets it)")
    return int(value)


def cores_per_process(num_cpus: int) -> int:
    """SYSTEM.NUM_CPUS shared among the job's processes on this machine: torchrun's LOCAL_WORLD_SIZE (its
    WORLD_SIZE counts every machine's processes); a launcher that sets only WORLD_SIZE is taken to run them
    all here (too few threads rather than too many). A single process (no WORLD_SIZE above 1) keeps them all."""
    world = env_process_count("WORLD_SIZE") or 1
    if world <= 1:
        return max(1, num_cpus)
    return max(1, num_cpus // max(1, env_process_count("LOCAL_WORLD_SIZE") or world))


def finalize(cfg, job):
    """Fill in derived values: paths of the results tree, automatic counts, default metrics."""
    cfg.defrost()
    # The cores this process may run on: a Slurm or taskset allotment, not the whole machine's count.
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if cfg.SYSTEM.NUM_CPUS == -1 or cfg.SYSTEM.NUM_CPUS > cpus:
        cfg.SYSTEM.NUM_CPUS = cpus
    share = cores_per_process(cfg.SYSTEM.NUM_CPUS)
    if cfg.SYSTEM.NUM_WORKERS == -1:
        # With 1-2 cores a process's worker processes only compete with its model for them.
        cfg.SYSTEM.NUM_WORKERS = 0 if share <= 2 else min(share - 1, 4)
    cfg.SYSTEM.NUM_WORKERS = min(cfg.SYSTEM.NUM_WORKERS, cpus)  # more only adds processes (BiaPy templates ask 5)
    problem = cfg.PROBLEM.TYPE
    if not cfg.LOSS.TYPE:
        masking = problem == "SELF_SUPERVISED" and cfg.PROBLEM.SELF_SUPERVISED.PRETEXT_TASK == "masking"
        cfg.LOSS.TYPE = "MSE" if masking else DEFAULT_LOSS[problem]  # MSE as in the MAE paper
    if not cfg.LOSS.WEIGHTS:
        cfg.LOSS.WEIGHTS = [0.5, 0.5]
    cfg.TRAIN.METRICS = [m.lower() for m in cfg.TRAIN.METRICS] or list(DEFAULT_TRAIN_METRICS[problem])
    cfg.TEST.METRICS = [m.lower() for m in cfg.TEST.METRICS] or list(METRICS[problem])
    if cfg.TEST.BATCH_SIZE == -1:
        cfg.TEST.BATCH_SIZE = cfg.TRAIN.BATCH_SIZE
    if problem == "SELF_SUPERVISED" and cfg.PROBLEM.SELF_SUPERVISED.PRETEXT_TASK == "crappify":
        for split in ("TRAIN", "VAL", "TEST"):
            cfg.DATA[split].SSL_SOURCE_DIR = ssl_copy_dir(cfg.DATA, split)
    p = cfg.PATHS
    p.CHECKPOINT = str(job.checkpoint_dir)
    p.RESULT_DIR = str(job.results)
    p.PER_IMAGE = str(job.per_image)
    p.CHARTS = str(job.charts)
    p.DA_SAMPLES = str(job.aug)
    p.MAE_OUT_DIR = str(job.mae_checks)
    p.TRAIN_LOGS = str(job.train_logs)
    p.TEST_METRICS_FILE = str(job.metrics_csv)
    cfg.LOG.TENSORBOARD_LOG_DIR = str(job.tensorboard)
    cfg.freeze()
    return cfg
