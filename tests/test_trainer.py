"""The training loop with a tiny model and a minimal workflow that follows the hooks."""
import json
import os
import signal

import numpy as np
import pytest
import torch
from torch import nn

from biapy.config.defaults import get_defaults
from biapy.engine.checkpoint import load_checkpoint
from biapy.engine.distributed import DistInfo
from biapy.engine.loaders import make_loader, release_workers
from biapy.engine.resume import load_for_test
from biapy.engine.trainer import Trainer
from biapy.errors import CheckpointError, ConfigError, TrainingError
from biapy.job import Job


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors run fastest on one thread (and do not fight other test processes for cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class TinyNet(nn.Module):
    def __init__(self, out=1):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.3))
        self.head = nn.Conv2d(4, out, 1)

    def forward(self, x):
        return self.head(self.encoder(x))


class EpochData(torch.utils.data.Dataset):
    """Fresh noise per (seed, epoch, index), like PatchDataset's random crops."""

    def __init__(self, n=12, seed=0):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(self.seed * 10_000 + self.epoch * 100 + i)
        x = torch.rand(1, 8, 8, generator=g)
        return x, x.flip(-1) * 0.5


class SharedEpochData(EpochData):
    """EpochData whose epoch reaches persistent worker processes (shared memory, as PatchDataset's)."""

    def __init__(self, n=12, seed=0):
        super().__init__(n, seed)
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch):
        self._epoch[0] = epoch

    @property
    def epoch(self):
        return int(self._epoch[0])

    @epoch.setter
    def epoch(self, value):
        pass  # EpochData.__init__ sets it; the shared tensor is the one copy


class FakeWorkflow:
    def __init__(self, cfg, tmp_path, n=12, model=None, stop_at_epoch=None, val_losses=None, nan_at=None,
                 sigint_at=None, workers=0):
        self.cfg, self.job, self.dist, self.device = cfg, Job(tmp_path, "job", 1), DistInfo(), torch.device("cpu")
        torch.manual_seed(cfg.SYSTEM.SEED)
        self.model = model or TinyNet()
        data = SharedEpochData(n) if workers else EpochData(n)
        self.train_loader = make_loader(data, cfg.TRAIN.BATCH_SIZE, True, self.dist, workers, cfg.SYSTEM.SEED, True)
        self.val_loader = make_loader(EpochData(4, seed=9), 2, False, self.dist, 0, cfg.SYSTEM.SEED, False)
        self.stop_at_epoch, self.val_losses, self.nan_at, self.sigint_at = stop_at_epoch, val_losses, nan_at, sigint_at
        self.epoch_calls, self.steps, self.epoch = [], 0, 0

    def compute_loss(self, batch, train):
        x, y = batch
        pred = self.model(x)
        loss = nn.functional.mse_loss(pred, y.expand_as(pred))
        if train:
            self.steps += 1
            if self.nan_at is not None and self.steps == self.nan_at:
                loss = loss * float("nan")
            if self.sigint_at is not None and self.steps == self.sigint_at:
                os.kill(os.getpid(), signal.SIGINT)
        elif self.val_losses is not None:
            loss = loss * 0 + self.val_losses[len(self.epoch_calls)]
        return loss, (pred, y)

    def batch_metrics(self, batch, outputs):
        pred, y = outputs
        return {"mae": (float((pred - y).abs().mean()) * len(y), len(y))}

    def on_epoch_end(self, epoch, tb, final=False):
        self.epoch_calls.append((epoch, final))
        if tb is not None and final:
            volume = np.random.default_rng(0).random((4, 8, 8, 1))
            tb.add_images("reconstruction/x", [volume, volume * 2], epoch, ndim=3)
        if self.stop_at_epoch is not None and epoch == self.stop_at_epoch and not final:
            raise KeyboardInterrupt

    def checkpoint_extras(self):
        return {"normalization": {"type": "zero_mean_unit_variance"}}


def make_cfg(**train):
    cfg = get_defaults()
    cfg.TRAIN.EPOCHS = 4
    cfg.TRAIN.BATCH_SIZE = 3
    cfg.TRAIN.LR = 1e-2
    cfg.TRAIN.METRICS = ["mae"]
    cfg.LOG.CHART_CREATION_FREQ = 100  # charts only at the end (matplotlib is the slow part)
    for key, value in train.items():  # "KEY" -> TRAIN.KEY; "SECTION.KEY" from the root when SECTION is one
        parts = key.split(".")
        node = cfg if parts[0] in cfg else cfg.TRAIN
        for part in parts[:-1]:
            node = node[part]
        setattr(node, parts[-1], value)
    return cfg


def weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


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


def test_resume_after_interrupt_equals_straight_run(tmp_path):
    cfg = make_cfg()
    straight = FakeWorkflow(cfg, tmp_path / "a")
    Trainer(straight).fit()
    interrupted = FakeWorkflow(cfg, tmp_path / "b", stop_at_epoch=1)
    with pytest.raises(KeyboardInterrupt):
        Trainer(interrupted).fit()
    assert load_checkpoint(interrupted.job.checkpoint("last"))["epoch"] == 2
    resumed = FakeWorkflow(cfg, tmp_path / "b")
    history = Trainer(resumed).fit()
    assert [r["epoch"] for r in history] == [1, 2, 3, 4]
    assert_same(weights(straight.model), weights(resumed.model))


def test_sigint_mid_epoch_saves_and_resumes_exactly(tmp_path):
    cfg = make_cfg(ACCUM_ITER=2, **{"LR_SCHEDULER.NAME": "warmupcosine",
                                    "LR_SCHEDULER.WARMUP_COSINE_DECAY_EPOCHS": 1.0})
    straight = FakeWorkflow(cfg, tmp_path / "a")
    Trainer(straight).fit()
    before = signal.getsignal(signal.SIGINT)
    wf = FakeWorkflow(cfg, tmp_path / "b", sigint_at=5)  # 4 steps/epoch: epoch 2, step 1 (its update ends at step 2)
    with pytest.raises(KeyboardInterrupt):
        Trainer(wf).fit()
    assert signal.getsignal(signal.SIGINT) is before
    state = load_checkpoint(wf.job.checkpoint("last"))
    assert (state["epoch"], state["step_in_epoch"]) == (1, 2)
    resumed = FakeWorkflow(cfg, tmp_path / "b")
    history = Trainer(resumed).fit()
    assert resumed.steps == 2 + 4 * 2
    assert_same(weights(straight.model), weights(resumed.model))
    assert history[1]["train_loss"] == pytest.approx(Trainer(FakeWorkflow(cfg, tmp_path / "a")).fit()[1]["train_loss"])


def test_resume_with_another_batch_size_restarts_the_epoch_and_continues_the_lr_schedule(tmp_path, caplog):
    sched = {"LR_SCHEDULER.NAME": "warmupcosine", "LR_SCHEDULER.WARMUP_COSINE_DECAY_EPOCHS": 1.0}
    wf = FakeWorkflow(make_cfg(BATCH_SIZE=2, **sched), tmp_path / "b", sigint_at=8)  # 6 steps/epoch: epoch 2, step 2
    with pytest.raises(KeyboardInterrupt):
        Trainer(wf).fit()
    assert load_checkpoint(wf.job.checkpoint("last"))["scheduler"]["step"] == 8
    bigger = make_cfg(BATCH_SIZE=4, **sched)  # 3 steps/epoch, 12 updates in all
    straight = Trainer(FakeWorkflow(bigger, tmp_path / "a")).fit()
    resumed = FakeWorkflow(bigger, tmp_path / "b")
    with caplog.at_level("WARNING"):
        history = Trainer(resumed).fit()
    assert "stopped at step 2 of 6, but an epoch here has 3 steps on 1 process(es): epoch 2 restarts" in caplog.text
    assert resumed.steps == 3 * 3
    # Epochs 2-4 use the updates 3..11 of this layout's schedule, as a run at this batch size from the start.
    assert [r["lr"] for r in history[1:]] == pytest.approx([r["lr"] for r in straight[1:]])
    assert min(r["lr"] for r in history) > 0


@pytest.mark.parametrize("before, after, n, stop_at", [({"BATCH_SIZE": 2}, {"BATCH_SIZE": 2, "ACCUM_ITER": 2}, 12, 8),
                                                     ({"BATCH_SIZE": 4}, {"BATCH_SIZE": 5}, 15, 5)])
def test_resume_with_another_update_layout_but_the_same_step_count_restarts_the_epoch(tmp_path, caplog, before,
                                                                                       after, n, stop_at):
    """ACCUM_ITER 1 -> 2 keeps the steps per epoch but halves the updates: the saved update count lay past this
    layout's last one (a learning rate of 0 for the rest of the run). BATCH_SIZE 4 -> 5 on 15 patches keeps 3
    steps an epoch, but step 2 of one layout is not step 2 of the other."""
    sched = {"LR_SCHEDULER.NAME": "warmupcosine", "LR_SCHEDULER.WARMUP_COSINE_DECAY_EPOCHS": 1.0}
    wf = FakeWorkflow(make_cfg(**before, **sched), tmp_path / "b", n=n, sigint_at=stop_at)  # in epoch 2
    with pytest.raises(KeyboardInterrupt):
        Trainer(wf).fit()
    other = make_cfg(**after, **sched)
    straight = Trainer(FakeWorkflow(other, tmp_path / "a", n=n)).fit()
    resumed = FakeWorkflow(other, tmp_path / "b", n=n)
    with caplog.at_level("WARNING"):
        history = Trainer(resumed).fit()
    assert "epoch 2 restarts from its first step" in caplog.text
    assert [r["lr"] for r in history[1:]] == pytest.approx([r["lr"] for r in straight[1:]])
    assert min(r["lr"] for r in history) > 0


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


def test_early_stopping_resumed_stops_where_the_straight_run_stops(tmp_path):
    """Patience counts survive an interrupt (a resumed run had counted its bad epochs from 0 and trained on), and a
    run that stopped early is finished: run again, it trains no further."""
    losses = [1.0, 0.5, 0.6, 0.7, 0.4, 0.3, 0.2, 0.1, 0.1, 0.1]
    cfg = make_cfg(PATIENCE=2, EPOCHS=10)
    interrupted = FakeWorkflow(cfg, tmp_path, val_losses=losses, stop_at_epoch=2)
    with pytest.raises(KeyboardInterrupt):
        Trainer(interrupted).fit()
    assert load_checkpoint(interrupted.job.checkpoint("last"))["bad_epochs"] == 1
    resumed = FakeWorkflow(cfg, tmp_path, val_losses=losses[3:])
    assert len(Trainer(resumed).fit()) == 4  # as test_early_stopping's straight run
    again = FakeWorkflow(cfg, tmp_path, val_losses=losses[4:])
    assert len(Trainer(again).fit()) == 4 and again.steps == 0


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


def test_starting_weights_skip_unmatched_and_freeze(tmp_path, caplog):
    cfg = make_cfg(EPOCHS=1)
    src = FakeWorkflow(cfg, tmp_path / "src")
    Trainer(src).fit()
    ckpt = src.job.checkpoint("best")
    cfg2 = make_cfg(EPOCHS=2, **{"MODEL.LOAD_CHECKPOINT": True, "MODEL.FREEZE_ENCODER_EPOCHS": 1})
    cfg2.PATHS.CHECKPOINT_FILE = str(ckpt)
    with pytest.raises(CheckpointError, match="head.weight"):
        Trainer(FakeWorkflow(cfg2, tmp_path / "dst", model=TinyNet(out=2))).fit()
    cfg2.MODEL.SKIP_UNMATCHED_LAYERS = True
    wf = FakeWorkflow(cfg2, tmp_path / "dst", model=TinyNet(out=2))
    trainer = Trainer(wf)
    loaded = load_checkpoint(ckpt)["model"]
    seen = {}
    original = trainer._train_epoch

    def spy(epoch):
        seen[epoch] = weights(wf.model.encoder)
        return original(epoch)

    trainer._train_epoch = spy
    with caplog.at_level("INFO", logger="biapy"):
        trainer.fit()
    # The model table counts the frozen encoder as not trainable: only the head's 4 * 2 + 2 parameters.
    assert any("parameters (10 trainable)" in r.getMessage() for r in caplog.records)
    assert torch.equal(seen[0]["0.weight"], loaded["encoder.0.weight"])
    assert torch.equal(seen[1]["0.weight"], loaded["encoder.0.weight"])  # frozen during epoch 1
    # A frozen encoder is a fixed feature extractor: its BatchNorm statistics do not drift either.
    assert torch.equal(seen[1]["1.running_mean"], loaded["encoder.1.running_mean"])
    assert torch.equal(seen[1]["1.running_var"], loaded["encoder.1.running_var"])
    assert not torch.equal(wf.model.encoder[1].running_mean, loaded["encoder.1.running_mean"])  # epoch 2 trains it
    assert not torch.equal(wf.model.encoder[0].weight, loaded["encoder.0.weight"])  # trained in epoch 2
    assert str(wf.job.results) in (tmp_path / "src" / "job" / "derived_models.log").read_text()


def test_continuing_with_another_optimizer_is_a_one_line_error(tmp_path):
    src = FakeWorkflow(make_cfg(EPOCHS=1, OPTIMIZER="SGD"), tmp_path / "src")
    Trainer(src).fit()
    cfg = make_cfg(EPOCHS=2, OPTIMIZER="ADAMW", **{"MODEL.LOAD_CHECKPOINT": True,
                                                   "MODEL.LOAD_CHECKPOINT_ONLY_WEIGHTS": False})
    cfg.PATHS.CHECKPOINT_FILE = str(src.job.checkpoint("last"))
    with pytest.raises(CheckpointError, match=r"TRAIN\.OPTIMIZER .*momentum_buffer.*AdamW keeps") as err:
        Trainer(FakeWorkflow(cfg, tmp_path / "dst")).fit()
    assert "\n" not in str(err.value)


def test_load_for_test(tmp_path):
    cfg = make_cfg(EPOCHS=1)
    wf = FakeWorkflow(cfg, tmp_path)
    with pytest.raises(CheckpointError, match="checkpoint-best"):
        load_for_test(wf)
    Trainer(wf).fit()
    fresh = FakeWorkflow(cfg, tmp_path, model=TinyNet())
    nn.init.zeros_(fresh.model.head.weight)
    assert load_for_test(fresh) == wf.job.checkpoint("best")
    assert_same(weights(fresh.model), weights(wf.model))
    cfg.MODEL.LOAD_CHECKPOINT_EPOCH = "last_on_train"
    assert load_for_test(fresh) == wf.job.checkpoint("last")
    cfg.MODEL.LOAD_CHECKPOINT_EPOCH = "best_on_val"
    cfg.TRAIN.ENABLE = False
    cfg.MODEL.LOAD_CHECKPOINT = True
    cfg.PATHS.CHECKPOINT_FILE = str(tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match="missing.pth"):
        load_for_test(FakeWorkflow(cfg, tmp_path))


def test_pinned_memory_only_when_asked_and_on_a_gpu(data2d, tmp_path, monkeypatch):
    import biapy.workflows.base as base
    from biapy import BiaPy
    from tests.conftest import tiny_config

    assert make_loader(EpochData(4), 2, False, None, pin_memory=True).pin_memory
    assert not make_loader(EpochData(4), 2, False, None).pin_memory
    asked = []
    real = base.make_loader
    monkeypatch.setattr(base, "make_loader", lambda *a, **k: asked.append(k["pin_memory"]) or real(*a, **k))
    cfg = tiny_config(data2d, 2, SYSTEM={"PIN_MEM": True}, TRAIN={"EPOCHS": 1}, TEST={"ENABLE": False})
    BiaPy(cfg, result_dir=tmp_path, name="p", run_id=1).run_job()
    assert asked == [False, False]  # PIN_MEM on, but this job runs on the CPU: nothing to pin for


def test_continuing_a_checkpoint_that_already_holds_all_epochs_is_a_one_line_error(tmp_path):
    """Nothing would be trained or saved, and the test phase would find no checkpoint of this job."""
    src = FakeWorkflow(make_cfg(EPOCHS=2), tmp_path / "src")
    Trainer(src).fit()
    cfg = make_cfg(EPOCHS=2, **{"MODEL.LOAD_CHECKPOINT": True, "MODEL.LOAD_CHECKPOINT_ONLY_WEIGHTS": False})
    cfg.PATHS.CHECKPOINT_FILE = str(src.job.checkpoint("last"))
    dst = FakeWorkflow(cfg, tmp_path / "dst")
    with pytest.raises(ConfigError, match=r"TRAIN\.EPOCHS: 2, but .*checkpoint-last\.pth already holds 2 epoch") as err:
        Trainer(dst).fit()
    assert "\n" not in str(err.value)
    assert not dst.job.checkpoint_dir.exists() or not any(dst.job.checkpoint_dir.iterdir())
    cfg.TRAIN.EPOCHS = 3
    Trainer(FakeWorkflow(cfg, tmp_path / "dst")).fit()
    assert FakeWorkflow(cfg, tmp_path / "dst").job.checkpoint("last").is_file()


def test_a_mid_epoch_checkpoint_of_another_epoch_length_restarts_that_epoch(tmp_path, caplog):
    """Stopped at step 5 of 4-step epochs, resumed where an epoch has 2 steps (TRAIN.BATCH_SIZE or the number of
    processes changed): the saved position means nothing here, so that epoch restarts instead of crashing."""
    cfg = make_cfg()
    wf = FakeWorkflow(cfg, tmp_path, sigint_at=7)  # epoch 2, step 3 of 4
    with pytest.raises(KeyboardInterrupt):
        Trainer(wf).fit()
    state = load_checkpoint(wf.job.checkpoint("last"))
    assert (state["epoch"], state["step_in_epoch"], state["epoch_steps"], state["world_size"]) == (1, 3, 4, 1)
    shorter = FakeWorkflow(cfg, tmp_path, n=6)  # 2 steps per epoch: step 3 does not exist
    history = Trainer(shorter).fit()
    assert [r["epoch"] for r in history] == [1, 2, 3, 4]
    assert shorter.steps == 3 * 2  # epochs 2, 3 and 4, whole
    assert "stopped at step 3 of 4, but an epoch here has 2 steps" in caplog.text


def test_continuing_another_runs_checkpoint_keeps_a_best_checkpoint_of_its_own(tmp_path):
    src = FakeWorkflow(make_cfg(EPOCHS=2), tmp_path / "src", val_losses=[0.001, 0.0001])
    Trainer(src).fit()
    cfg = make_cfg(EPOCHS=4, **{"MODEL.LOAD_CHECKPOINT": True, "MODEL.LOAD_CHECKPOINT_ONLY_WEIGHTS": False})
    cfg.PATHS.CHECKPOINT_FILE = str(src.job.checkpoint("last"))
    dst = FakeWorkflow(cfg, tmp_path / "dst", val_losses=[0.5, 0.7])  # worse than the source's best
    history = Trainer(dst).fit()
    assert [r["epoch"] for r in history] == [1, 2, 3, 4]
    assert dst.job.checkpoint("best").is_file()
    assert load_checkpoint(dst.job.checkpoint("best"))["epoch"] == 3  # this run's best (0.5), not the source's


def test_weights_whose_layouts_coincide_get_plain_strides():
    """A 1x1x1 head after channels_last_3d has strides DDP compares literally against its plain gradient."""
    from biapy.engine.trainer import _standard_strides_where_equivalent

    model = nn.Sequential(nn.Conv3d(2, 8, 3), nn.Conv3d(8, 1, 1)).to(memory_format=torch.channels_last_3d)
    big_before = model[0].weight.stride()
    _standard_strides_where_equivalent(model)
    assert model[1].weight.stride() == (8, 1, 1, 1, 1)
    assert model[0].weight.stride() == big_before  # a real channels-last weight keeps its layout
    out = model(torch.rand(1, 2, 4, 4, 4).contiguous(memory_format=torch.channels_last_3d))
    out.sum().backward()
    assert model[1].weight.grad.stride() == model[1].weight.stride()


class WiderKernelNet(TinyNet):
    """TinyNet whose first convolution is 5x5: a 3x3 checkpoint fills all but that kernel."""

    def __init__(self):
        super().__init__()
        self.encoder[0] = nn.Conv2d(1, 4, 5, padding=2)


def test_freezing_encoder_tensors_the_checkpoint_did_not_fill_is_refused(tmp_path):
    """A ViT of another token size (or a U-Net of another depth) kept its patch embedding random and frozen
    while the log said 'Encoder frozen until epoch 2'."""
    src = FakeWorkflow(make_cfg(EPOCHS=1), tmp_path / "src")
    Trainer(src).fit()
    cfg = make_cfg(EPOCHS=2, **{"MODEL.LOAD_CHECKPOINT": True, "MODEL.SKIP_UNMATCHED_LAYERS": True,
                                "MODEL.FREEZE_ENCODER_EPOCHS": 1})
    cfg.PATHS.CHECKPOINT_FILE = str(src.job.checkpoint("best"))
    with pytest.raises(ConfigError, match=r"FREEZE_ENCODER_EPOCHS: 1 encoder tensor\(s\) were not loaded from "
                                          r"job_1-checkpoint-best.pth .*\(encoder.0.weight\).*FREEZE_ENCODER_EPOCHS 0"):
        Trainer(FakeWorkflow(cfg, tmp_path / "dst", model=WiderKernelNet())).fit()
    cfg.MODEL.FREEZE_ENCODER_EPOCHS = 0  # not frozen: the random kernel trains
    Trainer(FakeWorkflow(cfg, tmp_path / "dst2", model=WiderKernelNet())).fit()


class DeeperKernelNet(WiderKernelNet):
    """WiderKernelNet with two more encoder convolutions: five encoder tensors no TinyNet checkpoint fills."""

    def __init__(self):
        super().__init__()
        self.encoder.append(nn.Conv2d(4, 4, 3, padding=1))
        self.encoder.append(nn.Conv2d(4, 4, 3, padding=1))


def test_the_tensors_a_checkpoint_left_random_are_named_a_few_then_counted_on_one_line(tmp_path):
    src = FakeWorkflow(make_cfg(EPOCHS=1), tmp_path / "src")
    Trainer(src).fit()
    cfg = make_cfg(EPOCHS=2, **{"MODEL.LOAD_CHECKPOINT": True, "MODEL.SKIP_UNMATCHED_LAYERS": True,
                                "MODEL.FREEZE_ENCODER_EPOCHS": 1})
    cfg.PATHS.CHECKPOINT_FILE = str(src.job.checkpoint("best"))
    with pytest.raises(ConfigError) as err:
        Trainer(FakeWorkflow(cfg, tmp_path / "dst", model=DeeperKernelNet())).fit()
    assert "5 encoder tensor(s) were not loaded from job_1-checkpoint-best.pth and keep their random initial values " \
           "(encoder.0.weight, encoder.4.weight, encoder.4.bias, +2 more), so freezing" in str(err.value)
    assert "\n" not in str(err.value)
    src.cfg.MODEL.SKIP_UNMATCHED_LAYERS = True  # loads what fits, then refuses to test the rest
    with pytest.raises(CheckpointError) as err:
        load_for_test(FakeWorkflow(src.cfg, tmp_path / "src", model=DeeperKernelNet()))
    assert "5 tensor(s) of the model are not in it (encoder.0.weight, encoder.4.weight, encoder.4.bias, " \
           "encoder.5.weight, +1 more), so the test would score untrained layers" in str(err.value)


def test_freezing_an_encoder_that_no_checkpoint_filled_is_warned_about(tmp_path, caplog):
    Trainer(FakeWorkflow(make_cfg(EPOCHS=1, **{"MODEL.FREEZE_ENCODER_EPOCHS": 1}), tmp_path)).fit()
    assert "the frozen encoder keeps its random initial weights" in caplog.text


def test_the_epoch_record_shows_the_learning_rate_its_last_update_used(tmp_path):
    cfg = make_cfg(EPOCHS=2, **{"LR_SCHEDULER.NAME": "warmupcosine", "LR_SCHEDULER.WARMUP_COSINE_DECAY_EPOCHS": 1.0})
    trainer = Trainer(FakeWorkflow(cfg, tmp_path))  # 4 updates per epoch
    history = trainer.fit()
    assert history[1]["lr"] == pytest.approx(trainer.scheduler.lr_at(7)) and history[1]["lr"] > 0  # not lr_at(8) = 0


@pytest.mark.parametrize("native, setting, expected", [(False, "auto", (torch.float16, True)),
                                                       (False, "bf16", (torch.float16, True)),
                                                       (True, "auto", (torch.bfloat16, False)),
                                                       (True, "fp16", (torch.float16, True))])
def test_amp_on_a_gpu_takes_bf16_only_where_it_is_native(monkeypatch, caplog, native, setting, expected):
    """torch's is_bf16_supported() also counts emulation, true on a T4, whose cuDNN convolutions lack bf16."""
    from biapy.engine.precision import resolve_amp

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native or including_emulation)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    with caplog.at_level("WARNING"):
        assert resolve_amp(setting, torch.device("cuda:0")) == expected
    assert ("Tesla T4 has no native bfloat16" in caplog.text) == (setting == "bf16" and not native)


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


class SignalDisposition(torch.utils.data.Dataset):
    """Each item: whether SIGINT and SIGTERM are ignored in the process that made it."""

    def __len__(self):
        return 2

    def __getitem__(self, i):
        return torch.tensor([signal.getsignal(s) == signal.SIG_IGN for s in (signal.SIGINT, signal.SIGTERM)])


@pytest.mark.parametrize("stop_handler", [True, False])
def test_loader_workers_leave_stop_signals_to_the_trainer(stop_handler):
    """Workers forked under the trainer's stop handler ignore SIGINT and SIGTERM: each had reported a terminal's
    Ctrl-C again, and a SIGTERM sent to the whole job ended them and made torch raise in the main process.
    Forked without it, a worker keeps torch's SIGTERM handling."""
    signals = (signal.SIGINT, signal.SIGTERM) if stop_handler else ()
    previous = {s: signal.signal(s, lambda *a: None) for s in signals}
    try:
        loader = make_loader(SignalDisposition(), 2, False, DistInfo(), num_workers=1)
        batch = next(iter(loader))
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    release_workers(loader)
    assert loader._iterator is None
    assert batch.tolist() == [[True, stop_handler]] * 2


def test_releasing_workers_lets_an_interrupt_through(monkeypatch):
    """A Ctrl-C while the workers are shut down at the end of training: the iterator's __del__, which did the
    shutting down, swallowed it, and the run went on to its test phase and exited 0."""
    loader = make_loader(SignalDisposition(), 2, False, DistInfo(), num_workers=1)
    next(iter(loader))
    iterator = loader._iterator
    shutdown = iterator._shutdown_workers

    def interrupted():
        shutdown()
        raise KeyboardInterrupt

    monkeypatch.setattr(iterator, "_shutdown_workers", interrupted)
    try:
        with pytest.raises(KeyboardInterrupt):
            release_workers(loader)
        assert loader._iterator is None
    finally:
        monkeypatch.undo()  # before the iterator's __del__ runs again


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


@pytest.mark.parametrize("n", [9, 1])
def test_validation_shards_hold_every_sample_once_over_the_ranks(n):
    """DistributedSampler evens the shards by repeating samples (9 over 2 ranks: sample 0 twice), which the
    validation loss and metrics, summed over ranks, then counted twice. Training keeps its even shards."""
    from types import SimpleNamespace

    shards = [list(make_loader(EpochData(n), 2, False, SimpleNamespace(enabled=True, world_size=2, rank=r)).sampler)
              for r in range(2)]
    assert sorted(shards[0] + shards[1]) == list(range(n))
    train = make_loader(EpochData(9), 2, True, SimpleNamespace(enabled=True, world_size=2, rank=0), drop_last=True)
    assert len(train.sampler) == 4


def test_the_duplicate_window_applies_under_torchrun_whatever_its_process_count(tmp_path, monkeypatch):
    """torchrun's agent forwards signals with one process too (WORLD_SIZE 1, no process group here)."""
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert Trainer(FakeWorkflow(make_cfg(), tmp_path / "a")).stop.window == 0
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    assert Trainer(FakeWorkflow(make_cfg(), tmp_path / "b")).stop.window > 0


def test_a_checkpoint_from_before_the_update_layout_was_recorded_takes_it_from_its_config(tmp_path, caplog):
    """Without batch_size/accum_iter keys (saved by an earlier version) the stored config tells them: a changed
    ACCUM_ITER still restarts the epoch instead of going on at a learning rate of 0."""
    import torch

    sched = {"LR_SCHEDULER.NAME": "warmupcosine", "LR_SCHEDULER.WARMUP_COSINE_DECAY_EPOCHS": 1.0}
    wf = FakeWorkflow(make_cfg(BATCH_SIZE=2, **sched), tmp_path / "b", n=12, sigint_at=8)
    with pytest.raises(KeyboardInterrupt):
        Trainer(wf).fit()
    path = wf.job.checkpoint("last")
    state = load_checkpoint(path)
    del state["batch_size"], state["accum_iter"]
    torch.save(state, path)
    resumed = FakeWorkflow(make_cfg(BATCH_SIZE=2, ACCUM_ITER=2, **sched), tmp_path / "b", n=12)
    with caplog.at_level("WARNING"):
        history = Trainer(resumed).fit()
    assert "with TRAIN.ACCUM_ITER 1, here it is 2: epoch 2 restarts from its first step" in caplog.text
    assert min(r["lr"] for r in history) > 0


@pytest.mark.parametrize("amx, setting, expected", [(True, "auto", torch.bfloat16), (False, "auto", None),
                                                    (False, "bf16", torch.bfloat16), (True, "off", None),
                                                    (True, "fp16", None)])
def test_amp_on_a_cpu_takes_bf16_where_it_has_amx_or_when_asked(monkeypatch, caplog, amx, setting, expected):
    """bf16 autocast is 1.6-2.3x faster than float32 on AMX tiles, 1.27x slower with AVX-512 BF16 alone."""
    from biapy.engine.precision import resolve_amp

    monkeypatch.setattr("biapy.engine.precision.cpu_has_amx", lambda: amx)
    with caplog.at_level("WARNING"):
        assert resolve_amp(setting, torch.device("cpu")) == (expected, False)
        assert resolve_amp(setting, torch.device("cpu"), warn=False) == (expected, False)
    assert caplog.text.count("TRAIN.AMP fp16 needs a GPU") == (setting == "fp16")  # once: not when warn=False
