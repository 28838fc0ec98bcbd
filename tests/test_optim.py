"""Optimizers (weight-decay groups) and the learning-rate schedules' formulas."""
import math

import pytest
import torch
from torch import nn

from biapy.config.defaults import get_defaults
from biapy.engine import optimizers
from biapy.engine.optim import build_optimizer, build_scheduler


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.norm = nn.BatchNorm2d(2)
        self.pos_embed = nn.Parameter(torch.zeros(1, 4, 8))


def cfg_with(name="", epochs=8, lr=1e-3, **sched):
    cfg = get_defaults()
    cfg.TRAIN.EPOCHS, cfg.TRAIN.LR = epochs, lr
    cfg.TRAIN.LR_SCHEDULER.NAME = name
    for k, v in sched.items():
        setattr(cfg.TRAIN.LR_SCHEDULER, k, v)
    return cfg


@pytest.mark.parametrize("name,cls", [("SGD", optimizers.SGD), ("ADAM", optimizers.Adam),
                                      ("ADAMW", optimizers.AdamW)])
def test_optimizer_and_no_decay_groups(name, cls):
    cfg = cfg_with()
    cfg.TRAIN.OPTIMIZER, cfg.TRAIN.W_DECAY = name, 0.05
    model = Net()
    opt = build_optimizer(model, cfg)
    assert isinstance(opt, cls)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {id(model.conv.weight)}
    n_params = sum(len(g["params"]) for g in opt.param_groups)
    assert n_params == len(list(model.parameters()))
    if name != "SGD":
        assert tuple(opt.param_groups[0]["betas"]) == tuple(cfg.TRAIN.OPT_BETAS)


def make(cfg, steps_per_epoch=5):
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=cfg.TRAIN.LR)
    return opt, build_scheduler(opt, cfg, steps_per_epoch)


def test_constant():
    _, s = make(cfg_with(""))
    assert all(s.lr_at(i) == 1e-3 for i in (0, 7, 39))


def test_warmup_as_long_as_training_is_a_linear_ramp_to_lr():
    """WARMUP_COSINE_DECAY_EPOCHS == EPOCHS (accepted, as BiaPy does): no cosine phase, LR reached at the end."""
    from biapy.config import check_config

    cfg = cfg_with("warmupcosine", epochs=2, WARMUP_COSINE_DECAY_EPOCHS=2.0)
    check_config(cfg, check_paths=False)
    _, s = make(cfg)
    assert [s.lr_at(i) for i in range(10)] == pytest.approx([1e-3 * (i + 1) / 10 for i in range(10)])
    cfg.TRAIN.LR_SCHEDULER.WARMUP_COSINE_DECAY_EPOCHS = 3.0
    with pytest.raises(Exception, match="WARMUP_COSINE_DECAY_EPOCHS: 3.0 must not exceed TRAIN.EPOCHS"):
        check_config(cfg, check_paths=False)


@pytest.mark.parametrize("warmup", [2.0, 0.25])  # 2 epochs, or 25% of 8 epochs: both 10 steps
def test_warmupcosine_formula(warmup):
    cfg = cfg_with("warmupcosine", MIN_LR=1e-5, WARMUP_COSINE_DECAY_EPOCHS=warmup)
    opt, s = make(cfg)
    W, T, lr, lo = 10, 40, 1e-3, 1e-5
    assert s.lr_at(0) == pytest.approx(lr / W)
    assert s.lr_at(W - 1) == pytest.approx(lr)
    for step in (W, 17, 30, T - 1):
        expected = lo + (lr - lo) * 0.5 * (1 + math.cos(math.pi * (step - W) / (T - W)))
        assert s.lr_at(step) == pytest.approx(expected)
    assert s.lr_at(T) == pytest.approx(lo)
    assert opt.param_groups[0]["lr"] == pytest.approx(lr / W)
    for _ in range(17):
        s.step_iter()
    assert opt.param_groups[0]["lr"] == pytest.approx(s.lr_at(17))
    opt2, s2 = make(cfg)
    s2.load_state_dict(s.state_dict())
    assert opt2.param_groups[0]["lr"] == pytest.approx(s.lr_at(17))


def test_onecycle_formula_is_torchs_one_cycle():
    import torch

    _, s = make(cfg_with("onecycle"))
    T, lr = 40, 1e-3
    assert s.lr_at(0) == pytest.approx(lr / 25)
    assert s.lr_at(11) == pytest.approx(lr)  # peak at update 0.3 * T - 1
    assert s.lr_at(T - 1) == pytest.approx(lr / 25 / 1e4)  # the last update anneals all the way
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    ref = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=T, pct_start=0.3, anneal_strategy="cos",
                                              cycle_momentum=False, div_factor=25.0, final_div_factor=1e4)
    for step in range(T):
        assert s.lr_at(step) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-6, abs=1e-12), step
        opt.step()
        ref.step() if step < T - 1 else None


def test_reduceonplateau_reduces_after_patience_with_floor():
    cfg = cfg_with("reduceonplateau", REDUCEONPLATEAU_PATIENCE=1, REDUCEONPLATEAU_FACTOR=0.5, MIN_LR=3e-4)
    opt, s = make(cfg)
    for v in (1.0, 0.9, 0.95, 0.95):  # best 0.9, then two epochs without improvement
        s.step_epoch(v)
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-4)
    s.step_iter()
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-4)  # per epoch only
    for v in (0.95, 0.95, 0.95, 0.95):
        s.step_epoch(v)
    assert opt.param_groups[0]["lr"] == pytest.approx(3e-4)  # floored at MIN_LR
