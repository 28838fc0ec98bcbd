"""Checkpoints a training run starts from, through the trainer: resuming its own run exactly (or restarting an
epoch whose layout changed), continuing another run's, starting weights (unmatched layers, a frozen
encoder) and the weights the test phase loads."""
import signal

import pytest
import torch
from torch import nn

from biapy.engine.checkpoint import load_checkpoint
from biapy.engine.resume import load_for_test
from biapy.engine.trainer import Trainer
from biapy.errors import CheckpointError, ConfigError
from tests.fake_workflow import FakeWorkflow, TinyNet, assert_same, make_cfg, weights

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


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
    assert len(Trainer(resumed).fit()) == 4  # as test_trainer.py's test_early_stopping straight run
    again = FakeWorkflow(cfg, tmp_path, val_losses=losses[4:])
    assert len(Trainer(again).fit()) == 4 and again.steps == 0


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


def test_continuing_with_another_optimizer_is_a_one_line_error(tmp_path):
    src = FakeWorkflow(make_cfg(EPOCHS=1, OPTIMIZER="SGD"), tmp_path / "src")
    Trainer(src).fit()
    cfg = make_cfg(EPOCHS=2, OPTIMIZER="ADAMW", **{"MODEL.LOAD_CHECKPOINT": True,
                                                   "MODEL.LOAD_CHECKPOINT_ONLY_WEIGHTS": False})
    cfg.PATHS.CHECKPOINT_FILE = str(src.job.checkpoint("last"))
    with pytest.raises(CheckpointError, match=r"TRAIN\.OPTIMIZER .*momentum_buffer.*AdamW keeps") as err:
        Trainer(FakeWorkflow(cfg, tmp_path / "dst")).fit()
    assert "\n" not in str(err.value)


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
