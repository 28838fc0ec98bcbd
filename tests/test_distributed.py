"""Two CPU processes under torchrun (gloo): one results tree, a rank-0 checkpoint that loads."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from biapy.config.load import plain_tree
from biapy.job import Job
from tests.conftest import tiny_config

ROOT = Path(__file__).parents[1]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_on_cpu(data2d, tmp_path):
    cfg = tiny_config(data2d, 2, TRAIN={"EPOCHS": 2, "BATCH_SIZE": 2})
    path = tmp_path / "dist.yaml"
    path.write_text(yaml.safe_dump(plain_tree(cfg)))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", str(ROOT / "main.py"), "--config", str(path),
           "--result_dir", str(tmp_path / "out"), "--name", "dist", "--run_id", "1", "--dist_backend", "gloo"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    job = Job(tmp_path / "out", "dist", 1)
    assert sorted(p.name for p in (tmp_path / "out" / "dist" / "results").iterdir()) == ["dist_1"]
    state = torch.load(job.checkpoint("best"), map_location="cpu", weights_only=True)
    assert "model" in state and state["model"]
    log = next(job.train_logs.glob("*.jsonl")).read_text().splitlines()
    assert len(log) == 2 and all(json.loads(line)["train_loss"] > 0 for line in log)
    assert len(list(job.per_image.iterdir())) == len(list(data2d["test"][0].iterdir()))
    # Only rank 0 prints the per-epoch summary.
    assert done.stdout.count("Epoch 1/2  train") == 1
    assert "Epoch" not in done.stderr  # the log is on stdout (errors and progress bars on stderr)
