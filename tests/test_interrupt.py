"""A real `python main.py` process stopped by SIGINT, then SIGTERM, resumes to the end.

(tests/test_trainer.py and tests/test_resume.py cover the signal handling in-process; this is the whole program: exit code 130,
no traceback, a loadable last checkpoint, and the same command finishing the run.)
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from biapy.config.load import plain_tree
from biapy.job import Job
from tests.conftest import make_dataset, tiny_config

ROOT = Path(__file__).parents[1]
EPOCHS = 6


def _wait_for(predicate, proc, timeout=180):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"run ended (exit {proc.returncode}) before it could be interrupted:\n{err[-3000:]}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("timed out waiting for the run")


def _interrupt(command, sig, ready, env, whole_group=False):
    """(exit code, the log on stdout and the error lines on stderr, joined). `whole_group`: the signal goes to
    every process of the run, loader workers too, as a terminal's Ctrl-C or Slurm's SIGTERM at a time limit."""
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=whole_group)
    try:
        _wait_for(ready, proc)
        if whole_group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, out + err


def test_signals_save_a_checkpoint_exit_130_and_the_same_command_resumes(tmp_path):
    data = make_dataset(tmp_path / "data", 2)
    cfg = tiny_config(data, 2, TRAIN={"EPOCHS": EPOCHS}, TEST={"ENABLE": False},
                      DATA={"TRAIN": {"PATCHES_PER_IMAGE": 2}}, SYSTEM={"NUM_CPUS": 1},
                      LOG={"CHART_CREATION_FREQ": 100})  # 3 steps per epoch: short, yet signals land mid-epoch
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(plain_tree(cfg)))
    command = [sys.executable, str(ROOT / "main.py"), "--config", str(path), "--result_dir", str(tmp_path / "out"),
               "--name", "sig", "--run_id", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    job = Job(tmp_path / "out", "sig", 1)
    last = job.checkpoint("last")

    # SIGINT once the first epoch's checkpoint exists.
    code, err = _interrupt(command, signal.SIGINT, last.exists, env)
    assert code == 130, err[-3000:]
    assert "Traceback" not in err and "run the same command again to resume" in err
    first = torch.load(last, map_location="cpu", weights_only=True)
    assert 1 <= first["epoch"] < EPOCHS and first["model"]
    assert not [p for p in job.checkpoint_dir.iterdir() if p.name.startswith(".")]  # no temporary files left

    # The same command resumes; SIGTERM once it has saved a newer checkpoint.
    mtime = last.stat().st_mtime_ns
    code, err = _interrupt(command, signal.SIGTERM, lambda: last.stat().st_mtime_ns != mtime, env)
    assert code == 130, err[-3000:]
    assert "Resuming" in err and "Traceback" not in err
    second = torch.load(last, map_location="cpu", weights_only=True)
    assert (second["epoch"], second["step_in_epoch"]) > (first["epoch"], first["step_in_epoch"])

    # And once more, to the end.
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    log = [json.loads(line) for line in (job.train_logs / f"{job.id}_train_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == list(range(1, EPOCHS + 1))
    assert all(r["train_loss"] == r["train_loss"] for r in log)  # no NaN
    final = torch.load(last, map_location="cpu", weights_only=True)
    assert final["epoch"] == EPOCHS and job.checkpoint("best").is_file()


def test_signals_to_the_whole_job_with_loader_workers_stop_it_as_to_the_main_process(tmp_path):
    data = make_dataset(tmp_path / "data", 2)
    cfg = tiny_config(data, 2, TRAIN={"EPOCHS": 50}, TEST={"ENABLE": False}, SYSTEM={"NUM_CPUS": 1, "NUM_WORKERS": 1},
                      LOG={"CHART_CREATION_FREQ": 100})
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(plain_tree(cfg)))
    command = [sys.executable, str(ROOT / "main.py"), "--config", str(path), "--result_dir", str(tmp_path / "out"),
               "--name", "grp", "--run_id", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    last = Job(tmp_path / "out", "grp", 1).checkpoint("last")
    for sig in (signal.SIGINT, signal.SIGTERM):
        mtime = last.stat().st_mtime_ns if last.exists() else None
        code, err = _interrupt(command, sig, lambda: last.exists() and last.stat().st_mtime_ns != mtime, env,
                               whole_group=True)
        assert code == 130, err[-3000:]
        assert "Traceback" not in err and "killed by signal" not in err, err[-3000:]
        assert err.count(f"{signal.Signals(sig).name} received") == 1  # the main process's line, once
