"""The training loop with a tiny model and a minimal workflow that follows the hooks."""
import json
import os
import signal

import pytest
import torch
from torch import nn

from biapy.engine.checkpoint import load_checkpoint
from biapy.engine.trainer import Trainer
from biapy.errors import TrainingError
from tests.fake_workflow import FakeWorkflow, TinyNet, assert_same, make_cfg, weights

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


def test_fit_writes_checkpoints_logs_charts_tensorboard(tmp_path):
    cfg = make_cfg(**{"MODEL.SAVE_CKPT_FREQ": 2, "LOG.CHART_CREATION_FREQ": 2})
    wf = FakeWorkflow(cfg, tmp_path)
    history = Trainer(wf).fit()
    job = wf.job
    assert [r["epoch"] for r in history] == [1, 2, 3, 4]
    for which in ("best", "last", 2, 4):
        assert job.checkpoint(which).is_file()
    assert not job.checkpoint(1).exists()
    state = torch.load(job.checkpoint("last"), weights_only=True)
    for key in ("model", "optimizer", "scheduler", "scaler", "epoch", "best_val", "bad_epochs", "history", "rng",
                "config", "metadata", "extras"):
        assert key in state
    assert state["epoch"] == 4 and "TRAIN:" in state["config"] and state["metadata"]["ndim"] == 2
    lines = [json.loads(x) for x in (job.train_logs / "job_1_train_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3, 4]
    assert {"train_loss", "val_loss", "metrics", "lr", "seconds"} <= set(lines[0]) and "mae" in lines[0]["metrics"]
    for name in ("job_1_loss.png", "job_1_mae.png", "model_plot_job_1.png"):
        assert (job.charts / name).stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(job.tensorboard))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"loss/train", "loss/val", "lr", "metrics/mae"} <= set(tags)
    assert len(acc.Scalars("loss/train")) == 4
    assert "reconstruction/x" in acc.Tags()["images"]
    assert wf.epoch_calls == [(0, False), (1, False), (2, False), (3, False), (3, True)]
    assert wf.model is not None and isinstance(wf.model, TinyNet)
    # A finished run is not trained again.
    wf2 = FakeWorkflow(cfg, tmp_path)
    assert len(Trainer(wf2).fit()) == 4 and wf2.steps == 0


def test_nonfinite_loss_raises_and_keeps_last_good_checkpoint(tmp_path):
    cfg = make_cfg()
    wf = FakeWorkflow(cfg, tmp_path, nan_at=6)  # epoch 2, step 2
    with pytest.raises(TrainingError, match=r"epoch 2, step 2; the last good checkpoint .*checkpoint-last.pth is kept"):
        Trainer(wf).fit()
    state = load_checkpoint(wf.job.checkpoint("last"))
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_nonfinite_loss_in_first_epoch_says_no_checkpoint_exists(tmp_path):
    wf = FakeWorkflow(make_cfg(), tmp_path, nan_at=2)
    with pytest.raises(TrainingError, match=r"epoch 1, step 2; no checkpoint was saved yet"):
        Trainer(wf).fit()
    assert not wf.job.checkpoint("last").exists()


def test_early_stopping(tmp_path):
    cfg = make_cfg(PATIENCE=2, EPOCHS=10)
    wf = FakeWorkflow(cfg, tmp_path, val_losses=[1.0, 0.5, 0.6, 0.7, 0.4, 0.3, 0.2, 0.1, 0.1, 0.1])
    history = Trainer(wf).fit()
    assert len(history) == 4  # best at epoch 2 (index 1), two worse epochs -> stop
    state = load_checkpoint(wf.job.checkpoint("best"))
    assert state["epoch"] == 2 and state["best_val"] == pytest.approx(0.5)
    assert load_checkpoint(wf.job.checkpoint("last"))["stopped_early"] is True


@pytest.mark.parametrize("clip", [0.0, 1e-3])
def test_gradient_clip_norm_bounds_the_update(tmp_path, clip):
    """One SGD update of LR 1 moves the weights by the gradient: by at most GRADIENT_CLIP_NORM when set."""
    cfg = make_cfg(OPTIMIZER="SGD", W_DECAY=0.0, LR=1.0, EPOCHS=1, GRADIENT_CLIP_NORM=clip, AMP="off")
    wf = FakeWorkflow(cfg, tmp_path, n=3)
    before = torch.cat([p.detach().flatten().clone() for p in wf.model.parameters()])
    Trainer(wf).fit()
    moved = float((torch.cat([p.detach().flatten() for p in wf.model.parameters()]) - before).norm())
    assert moved == pytest.approx(clip, rel=1e-3) if clip else moved > 0.01


def test_a_non_finite_validation_loss_stops_with_the_epoch_and_what_to_do(tmp_path):
    wf = FakeWorkflow(make_cfg(EPOCHS=3), tmp_path, val_losses=[0.5, float("inf"), 0.4])
    with pytest.raises(TrainingError, match=r"validation loss became inf at epoch 2; the last good checkpoint .*"
                                            r"job_1-checkpoint-last.pth is kept. Lower TRAIN.LR"):
        Trainer(wf).fit()
    assert load_checkpoint(wf.job.checkpoint("last"))["epoch"] == 1


@pytest.mark.parametrize("links", [True, False])
def test_best_and_numbered_checkpoints_are_links_to_that_epochs_last(tmp_path, monkeypatch, links):
    """Written once, linked (or, without hard links on the file system, copied); replacing 'last' leaves them."""
    if not links:
        def no_links(src, dst):
            raise OSError("no hard links here")
        monkeypatch.setattr(os, "link", no_links)
    wf = FakeWorkflow(make_cfg(EPOCHS=3, **{"MODEL.SAVE_CKPT_FREQ": 1}), tmp_path, val_losses=[0.5, 0.6, 0.4])
    Trainer(wf).fit()
    ckpt = wf.job.checkpoint
    assert [load_checkpoint(ckpt(e))["epoch"] for e in (1, 2, 3)] == [1, 2, 3]
    assert ckpt("last").read_bytes() == ckpt("best").read_bytes() == ckpt(3).read_bytes()
    assert ckpt("last").samefile(ckpt("best")) is links and ckpt("last").samefile(ckpt(3)) is links
    assert not ckpt(2).samefile(ckpt(3))


def test_accumulation_equals_big_batch_for_sgd(tmp_path):
    common = {"OPTIMIZER": "SGD", "W_DECAY": 0.0, "EPOCHS": 1, "AMP": "off"}

    def run(batch, accum, sub):
        cfg = make_cfg(BATCH_SIZE=batch, ACCUM_ITER=accum, **common)
        torch.manual_seed(0)
        model = nn.Conv2d(1, 1, 3, padding=1)
        wf = FakeWorkflow(cfg, tmp_path / sub, model=model)
        Trainer(wf).fit()
        return weights(model)

    big, small = run(6, 1, "big"), run(3, 2, "small")
    for k in big:
        torch.testing.assert_close(big[k], small[k], rtol=1e-5, atol=1e-6)


def test_the_epoch_record_shows_the_learning_rate_its_last_update_used(tmp_path):
    cfg = make_cfg(EPOCHS=2, **{"LR_SCHEDULER.NAME": "warmupcosine", "LR_SCHEDULER.WARMUP_COSINE_DECAY_EPOCHS": 1.0})
    trainer = Trainer(FakeWorkflow(cfg, tmp_path))  # 4 updates per epoch
    history = trainer.fit()
    assert history[1]["lr"] == pytest.approx(trainer.scheduler.lr_at(7)) and history[1]["lr"] > 0  # not lr_at(8) = 0


def test_workers_prepare_the_next_epoch_while_one_validates_and_train_the_same(tmp_path):
    cfg = make_cfg()
    plain = FakeWorkflow(cfg, tmp_path / "a")
    plain_history = Trainer(plain).fit()
    wf = FakeWorkflow(cfg, tmp_path / "b", workers=1)
    trainer = Trainer(wf)
    started = []
    validate = trainer._validate

    def validate_and_look(epoch):
        ready = trainer._next_batches
        started.append(None if ready is None else ready[0])
        return validate(epoch)

    trainer._validate = validate_and_look
    history = trainer.fit()
    # Every epoch but the last had its successor's batches under way when its validation began.
    assert started == [1, 2, 3, None]
    assert trainer._next_batches is None
    assert [r["train_loss"] for r in history] == [r["train_loss"] for r in plain_history]
    assert_same(weights(plain.model), weights(wf.model))
    trainer._validate = validate  # no cycle left: the loader's worker ends with this test, not at interpreter exit


def test_a_signal_delivered_twice_under_torchrun_is_one_request(monkeypatch):
    """Slurm signals every process and torchrun's agent forwards the signal to each again: a copy of the
    same signal within the window must not turn the saving stop into an unsaved one. A single process,
    or another signal, or the same one later, still stops at once."""
    from biapy.engine.trainer import StopRequest

    single = StopRequest()
    single._handle(signal.SIGTERM, None)
    with pytest.raises(KeyboardInterrupt):
        single._handle(signal.SIGTERM, None)
    job = StopRequest(duplicate_window_s=2.0)
    job._handle(signal.SIGTERM, None)
    job._handle(signal.SIGTERM, None)  # the forwarded copy
    assert job.requested
    with pytest.raises(KeyboardInterrupt):
        job._handle(signal.SIGINT, None)
    import biapy.engine.trainer as trainer_module

    clock = [100.0]
    monkeypatch.setattr(trainer_module.time, "monotonic", lambda: clock[0])
    late = StopRequest(duplicate_window_s=2.0)
    late._handle(signal.SIGTERM, None)
    clock[0] += 1.9
    late._handle(signal.SIGTERM, None)  # within the window: the same request
    clock[0] += 0.2  # 2.1 s after the first
    with pytest.raises(KeyboardInterrupt):
        late._handle(signal.SIGTERM, None)


def test_the_duplicate_window_applies_under_torchrun_whatever_its_process_count(tmp_path, monkeypatch):
    """torchrun's agent forwards signals with one process too (WORLD_SIZE 1, no process group here)."""
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert Trainer(FakeWorkflow(make_cfg(), tmp_path / "a")).stop.window == 0
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    assert Trainer(FakeWorkflow(make_cfg(), tmp_path / "b")).stop.window > 0
