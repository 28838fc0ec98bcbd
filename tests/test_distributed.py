"""Two CPU processes under torchrun (gloo): one results tree, a rank-0 checkpoint that loads."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
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


def _torchrun(cfg, tmp_path, name):
    """Job NAME (run 1) of `cfg` in two CPU processes under torchrun, results in tmp_path/out."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(plain_tree(cfg)))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", str(ROOT / "main.py"), "--config", str(path),
           "--result_dir", str(tmp_path / "out"), "--name", name, "--run_id", "1", "--dist_backend", "gloo"]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_torchrun_two_processes_on_cpu(data2d, tmp_path):
    done = _torchrun(tiny_config(data2d, 2, TRAIN={"EPOCHS": 2, "BATCH_SIZE": 2}), tmp_path, "dist")
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
    assert "Grad strides do not match" not in done.stderr  # DDP's warning: a gradient's layout is its weight's


def test_a_vit_mae_under_torchrun_reduces_its_gradients_without_copies(data2d, tmp_path):
    """The MAE's masks come in as noise drawn by the workflow (DDP passes it through), and every gradient has its
    weight's strides: DDP had warned about the one-channel patch embedding's and copied it every step."""
    from tests.test_e2e_masking import MAE_MODEL

    cfg = tiny_config(data2d, 2, PROBLEM={"SELF_SUPERVISED": {"PRETEXT_TASK": "masking"}}, MODEL=dict(MAE_MODEL),
                      TRAIN={"EPOCHS": 1, "BATCH_SIZE": 2}, TEST={"ENABLE": False})
    done = _torchrun(cfg, tmp_path, "mae")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Grad strides do not match" not in done.stderr
    log = next(Job(tmp_path / "out", "mae", 1).train_logs.glob("*.jsonl")).read_text().splitlines()
    assert len(log) == 1 and json.loads(log[0])["train_loss"] > 0


def test_a_failure_on_one_process_stops_the_job_with_its_error_and_no_hang(data2d, tmp_path):
    """The second test image (rank 1's share) holds a NaN: rank 1 fails alone while rank 0 waits to gather
    the metrics. Rank 1 must exit at once with its error (no barrier at cleanup), and rank 0 stop too."""
    from biapy.data.image_writing import write_image
    from biapy.data.io import read_image

    test_dir = tmp_path / "test"
    test_dir.mkdir()
    for i, src in enumerate(sorted(data2d["test"][0].iterdir())):
        img = read_image(src, 2).astype(np.float32)
        if i == 1:
            img[2, 3, 0] = np.nan
        write_image(test_dir / src.name, img, 2)
    cfg = tiny_config(data2d, 2, TRAIN={"EPOCHS": 1, "BATCH_SIZE": 2}, DATA={"TEST": {"PATH": str(test_dir)}})
    done = _torchrun(cfg, tmp_path, "fail")  # a hang would run into the 600 s timeout (gloo's own is 30 min)
    assert done.returncode != 0
    errors = [ln for ln in done.stderr.splitlines() if ln.startswith("ERROR:")]
    assert any(ln.startswith("ERROR: [rank 1] ") and "NaN" in ln for ln in errors), done.stderr[-3000:]
    # Rank 0 stops on its lost peer or on torchrun's SIGTERM, whichever comes first; either way it does not
    # advise running the same command again, which would fail the same way.
    assert "run the same command again" not in done.stderr
    assert "Traceback (most recent call last):\n  File \"" + str(ROOT) not in done.stderr  # no traceback of ours
    assert not (Job(tmp_path / "out", "fail", 1).per_image).exists()  # nothing half-written in per_image/


def test_activation_checkpointing_under_ddp_trains_the_same_weights(data2d, tmp_path):
    """The recomputation runs its own backward inside DDP's: every weight's gradient must still be reduced once."""
    weights = []
    for on in (False, True):
        cfg = tiny_config(data2d, 2, TRAIN={"EPOCHS": 1, "BATCH_SIZE": 2},
                          MODEL={"ACTIVATION_CHECKPOINTING": on, "DROPOUT_VALUES": [0.0, 0.1, 0.2]},
                          TEST={"ENABLE": False})
        done = _torchrun(cfg, tmp_path, f"ckpt{int(on)}")
        assert done.returncode == 0, done.stderr[-3000:]
        state = torch.load(Job(tmp_path / "out", f"ckpt{int(on)}", 1).checkpoint("last"), map_location="cpu",
                           weights_only=True)
        weights.append(state["model"])
    plain, recomputed = weights
    assert plain.keys() == recomputed.keys()
    for k in plain:
        torch.testing.assert_close(recomputed[k], plain[k], rtol=1e-4, atol=1e-6, msg=k)


def test_nccl_without_a_gpu_is_refused_in_one_line_naming_the_flag(monkeypatch):
    from biapy.engine.distributed import init_distributed
    from biapy.errors import ConfigError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for key, value in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError, match=r"^--dist_backend nccl: NCCL needs GPUs"):
        init_distributed("nccl")


def test_world_size_without_torchrun_is_refused_in_one_line(monkeypatch):
    """WORLD_SIZE left in the environment, no torchrun: torch's rendezvous traceback before."""
    from biapy.engine.distributed import init_distributed
    from biapy.errors import ConfigError

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(ConfigError, match=r"^WORLD_SIZE=2 is set but MASTER_ADDR and MASTER_PORT not: .*torch.distributed.run"):
        init_distributed("gloo")


def test_a_validation_set_smaller_than_the_job_leaves_a_rank_without_patches_and_no_hang(data2d, tmp_path):
    """One validation patch for two processes: rank 1's share is empty (no sample is repeated to fill it, so
    none counts twice), yet it takes part in the sums over ranks, and the job ends."""
    from biapy.data.image_writing import write_image
    from biapy.data.synthetic import nuclei_image

    val = tmp_path / "val"
    write_image(val / "only.tif", nuclei_image((32, 32), n_nuclei=3, radius=(3, 6), seed=5)[0], 2)
    cfg = tiny_config(data2d, 2, TRAIN={"EPOCHS": 1, "BATCH_SIZE": 2})
    cfg["DATA"]["VAL"] = {"FROM_TRAIN": False, "PATH": str(val)}
    done = _torchrun(cfg, tmp_path, "oneval")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "1 validation image(s), 1 patches" in done.stdout
    record = json.loads(next(Job(tmp_path / "out", "oneval", 1).train_logs.glob("*.jsonl")).read_text().splitlines()[0])
    assert record["val_loss"] > 0


def test_the_validation_loss_under_two_processes_is_that_of_the_saved_model_in_one(data2d, tmp_path):
    """Each process validates its share of the patches (none twice) with rank 0's batch-norm statistics, the
    model rank 0 saves: the logged loss is the one a single process gets from the checkpoint. DDP had left
    each rank its own statistics of its last batches, and the sampler repeated a patch to even the shares."""
    from biapy.config import check_config, finalize, load_config
    from biapy.engine.checkpoint import load_checkpoint
    from biapy.engine.distributed import init_distributed
    from biapy.engine.trainer import Trainer
    from biapy.workflows import get_workflow

    cfg = tiny_config(data2d, 2, TRAIN={"EPOCHS": 1, "BATCH_SIZE": 2})
    done = _torchrun(cfg, tmp_path, "valsum")
    assert done.returncode == 0, done.stderr[-3000:]
    job = Job(tmp_path / "out", "valsum", 1)
    logged = json.loads(next(job.train_logs.glob("*.jsonl")).read_text().splitlines()[0])["val_loss"]
    one = finalize(load_config(cfg), Job(tmp_path / "one", "valsum", 1))
    check_config(one)
    wf = get_workflow(one)(one, Job(tmp_path / "one", "valsum", 1), init_distributed("gloo"), torch.device("cpu"))
    wf.prepare_training()
    wf.model.load_state_dict(load_checkpoint(job.checkpoint("last"))["model"])
    trainer = Trainer(wf)
    trainer._apply_freeze(0)
    assert trainer._validate(0)[0] == pytest.approx(logged, rel=1e-5)


def test_ranks_wait_for_each_other_longer_than_torchs_default(monkeypatch):
    """A rank waiting while rank 0 built the copies, or predicted a large test volume, had been stopped by
    torch's default timeout (30 min for gloo, 10 for NCCL) with a traceback."""
    from datetime import timedelta

    from biapy.engine import distributed

    seen = {}
    monkeypatch.setattr(distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.tdist, "init_process_group", lambda **kw: seen.update(kw))
    for key, value in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "localhost",
                       "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(key, value)
    info = distributed.init_distributed("gloo")
    assert info.enabled and info.rank == 1 and not info.is_main
    assert seen["timeout"] >= timedelta(hours=24) and seen["backend"] == "gloo"


def test_too_few_patches_for_a_batch_per_process_says_how_the_batch_was_counted(data2d, tmp_path):
    """Under two processes each takes a whole batch a step: the error had read 'BATCH_SIZE: 2 is larger than the
    3 training patches', which one process trains on."""
    from biapy.config import check_config, finalize, load_config
    from biapy.engine.distributed import DistInfo
    from biapy.errors import DataError
    from biapy.workflows import get_workflow

    cfg = tiny_config(data2d, 2, TRAIN={"EPOCHS": 1, "BATCH_SIZE": 2},
                      DATA={"TRAIN": {"PATCHES_PER_IMAGE": 1}})  # 3 images to train on, 3 patches
    cfg = load_config(cfg)
    check_config(cfg)
    job = Job(tmp_path, "few", 1)
    cfg = finalize(cfg, job)
    two = DistInfo(rank=0, world_size=2, enabled=True)
    with pytest.raises(DataError, match=r"^TRAIN.BATCH_SIZE: 2 x 2 processes = 4 is larger than the 3 training"):
        get_workflow(cfg)(cfg, job, two, torch.device("cpu")).prepare_training()
