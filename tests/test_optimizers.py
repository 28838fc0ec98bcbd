"""SGD/Adam/AdamW against torch.optim (foreach SGD, fused Adam/AdamW: the same kernels) step by step, their
state_dicts, and no torch._dynamo import."""
import subprocess
import sys

import pytest
import torch
from torch import nn

from biapy.engine import optimizers

PAIRS = [
    (optimizers.SGD, torch.optim.SGD, {"lr": 0.05, "momentum": 0.9}),
    (optimizers.Adam, torch.optim.Adam, {"lr": 0.01, "betas": (0.8, 0.95)}),
    (optimizers.AdamW, torch.optim.AdamW, {"lr": 0.01, "betas": (0.9, 0.999)}),
]
IMPLEMENTATION = {torch.optim.SGD: {"foreach": True}, torch.optim.Adam: {"fused": True},
                  torch.optim.AdamW: {"fused": True}}


def net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ELU(), nn.Conv2d(4, 1, 1))


def groups(model, wd):
    decay = [p for p in model.parameters() if p.ndim > 1]
    rest = [p for p in model.parameters() if p.ndim <= 1]
    return [{"params": decay, "weight_decay": wd}, {"params": rest, "weight_decay": 0.0}]


def train(model, opt, steps, frozen_until=0):
    """`frozen_until` steps with the first conv frozen (no gradient), as FREEZE_ENCODER_EPOCHS does."""
    g = torch.Generator().manual_seed(1)
    for i in range(steps):
        model[0].requires_grad_(i >= frozen_until)
        x = torch.randn(4, 2, 8, 8, generator=g)
        loss = (model(x) - x[:, :1, 1:-1, 1:-1]).abs().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("ours,theirs,hyper", PAIRS)
@pytest.mark.parametrize("wd", [0.0, 0.05])
def test_same_updates_as_torch_optim(ours, theirs, hyper, wd):
    a, b = net(), net()
    opt_a = ours(groups(a, wd), **hyper)
    opt_b = theirs(groups(b, wd), **hyper, **IMPLEMENTATION[theirs])
    train(a, opt_a, 6, frozen_until=3)
    train(b, opt_b, 6, frozen_until=3)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)
    moved = (a[0].weight - net()[0].weight).abs().max()
    assert moved > 1e-3  # the frozen conv trained after it was released


@pytest.mark.parametrize("ours,theirs,hyper", PAIRS[1:])
@pytest.mark.parametrize("clip", [False, True])
def test_adam_under_a_grad_scaler_updates_as_torch_without_reading_the_inf_flag_back(ours, theirs, hyper, clip,
                                                                                        monkeypatch):
    """TRAIN.AMP fp16: GradScaler hands the scale and the inf flag to the fused kernel, which unscales and skips a
    step with an inf gradient on the device. Its other path reads the flag back (.item(): a wait for the GPU every
    step); it must not be taken. A step with an inf gradient is skipped and not counted, as torch's."""
    monkeypatch.setattr(torch.amp.GradScaler, "_maybe_opt_step", lambda *a, **k: pytest.fail("read the flag back"))
    models, opts, scalers = [], [], []
    for cls, extra in ((ours, {}), (theirs, IMPLEMENTATION[theirs])):
        model = net()
        models.append(model)
        opts.append(cls(groups(model, 0.05), **hyper, **extra))
        scalers.append(torch.amp.GradScaler("cpu", init_scale=2.0 ** 8, growth_interval=2))
    g = torch.Generator().manual_seed(1)
    for i in range(6):
        x = torch.randn(4, 2, 8, 8, generator=g)
        for model, opt, scaler in zip(models, opts, scalers):
            loss = (model(x) - x[:, :1, 1:-1, 1:-1]).abs().mean() * (float("inf") if i == 2 else 1.0)
            scaler.scale(loss).backward()
            if clip:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
    for pa, pb in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)
    assert [float(s.get_scale()) for s in scalers] == [float(scalers[1].get_scale())] * 2
    assert all(float(st["step"]) == 5 for st in opts[0].state.values())


@pytest.mark.parametrize("ours,theirs,hyper", PAIRS)
def test_state_dict_round_trip_and_torch_layout(ours, theirs, hyper):
    a, b = net(), net()
    opt_a = ours(groups(a, 0.01), **hyper)
    opt_b = theirs(groups(b, 0.01), **hyper, **IMPLEMENTATION[theirs])
    train(a, opt_a, 3)
    train(b, opt_b, 3)
    sd_a, sd_b = opt_a.state_dict(), opt_b.state_dict()
    assert [g["params"] for g in sd_a["param_groups"]] == [g["params"] for g in sd_b["param_groups"]]
    assert sd_a["state"].keys() == sd_b["state"].keys()
    for i, s in sd_b["state"].items():
        assert sd_a["state"][i].keys() == s.keys()
        for k, v in s.items():
            torch.testing.assert_close(sd_a["state"][i][k], v, rtol=1e-6, atol=1e-7)

    # A torch.optim checkpoint (as resumed from an earlier version) and our own continue identically.
    c, d = net(), net()
    c.load_state_dict(a.state_dict())
    d.load_state_dict(a.state_dict())
    opt_c, opt_d = ours(groups(c, 0.01), **hyper), ours(groups(d, 0.01), **hyper)
    opt_c.load_state_dict(sd_a)
    opt_d.load_state_dict(sd_b)
    train(a, opt_a, 2)
    train(c, opt_c, 2)
    train(d, opt_d, 2)
    for pa, pc, pd in zip(a.parameters(), c.parameters(), d.parameters()):
        assert torch.equal(pa, pc)
        torch.testing.assert_close(pa, pd, rtol=1e-6, atol=1e-7)


def test_load_rejects_state_of_another_model():
    a = net()
    opt = optimizers.AdamW(groups(a, 0.01), lr=1e-3)
    train(a, opt, 1)
    wider = nn.Sequential(nn.Conv2d(2, 8, 3), nn.BatchNorm2d(8), nn.ELU(), nn.Conv2d(8, 1, 1))
    with pytest.raises(ValueError, match="shape"):
        optimizers.AdamW(groups(wider, 0.01), lr=1e-3).load_state_dict(opt.state_dict())
    with pytest.raises(ValueError, match="parameter group"):
        optimizers.AdamW(list(a.parameters()), lr=1e-3).load_state_dict(opt.state_dict())
    with pytest.raises(ValueError, match=r"\['momentum_buffer'\], AdamW keeps"):  # TRAIN.OPTIMIZER changed
        sgd = optimizers.SGD(groups(a, 0.01), lr=1e-3, momentum=0.9)
        train(a, sgd, 1)
        opt.load_state_dict(sgd.state_dict())


def test_training_step_does_not_import_torch_dynamo():
    """torch.optim's base class would import torch._dynamo (1.35 s, ~110 MB) when the optimizer is built, and
    torch.utils.checkpoint on its first call (MODEL.ACTIVATION_CHECKPOINTING has its own recomputation)."""
    code = ("import sys, torch\n"
            "from tests.test_models import cnn_cfg\n"
            "from biapy.engine.optim import build_optimizer\n"
            "from biapy.models import build_model\n"
            "cfg = cnn_cfg(2, (16, 16, 1), 'unet', ACTIVATION_CHECKPOINTING=True)\n"
            "m = build_model(cfg)\n"
            "assert m.encoder.recompute_blocks and m.decoder.recompute_blocks\n"
            "opt = build_optimizer(m, cfg)\n"
            "m(torch.ones(2, 1, 16, 16)).mean().backward(); opt.step(); opt.zero_grad()\n"
            "print('torch._dynamo' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_grad_scaler_protocol():
    """The trainer's AMP path (GradScaler on CUDA) unscales through param_groups and skips non-finite steps."""
    a, b = net(), net()
    opt_a = optimizers.AdamW(groups(a, 0.01), lr=0.01)
    opt_b = optimizers.AdamW(groups(b, 0.01), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    x = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(3))
    scaler.scale(a(x).mean()).backward()
    scaler.unscale_(opt_a)
    scaler.step(opt_a)
    scaler.update()
    b(x).mean().backward()
    opt_b.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb)

    before = [p.detach().clone() for p in a.parameters()]
    opt_a.zero_grad()
    (scaler.scale(a(x).mean()) * float("inf")).backward()
    scaler.step(opt_a)
    scaler.update()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), before))
    assert scaler.get_scale() == 2.0 ** 9


@pytest.mark.parametrize("ours, before, after", [
    (optimizers.SGD, {"lr": 0.05, "momentum": 0.9}, {"lr": 0.01, "momentum": 0.5}),
    (optimizers.AdamW, {"lr": 0.01, "betas": (0.9, 0.999)}, {"lr": 0.02, "betas": (0.5, 0.6)}),
])
def test_a_loaded_state_keeps_this_optimizer_s_hyperparameters(ours, before, after):
    """A resume had gone on with the saved weight decay and betas while config.yaml recorded the new ones."""
    a = net()
    opt = ours(groups(a, 0.02), **before)
    train(a, opt, 2)
    resumed = ours(groups(a, 0.5), **after)
    resumed.load_state_dict(opt.state_dict())
    assert [g["weight_decay"] for g in resumed.param_groups] == [0.5, 0.0]
    for group in resumed.param_groups:
        assert {k: group[k] for k in after} == after
    assert resumed.state.keys() == opt.state.keys()  # the moments are the saved ones


def test_a_resumed_run_trains_with_the_config_s_weight_decay_and_betas(tmp_path):
    from biapy.engine.checkpoint import load_checkpoint
    from biapy.job import Job
    from tests.bad_input_world import World

    world = World(tmp_path)
    assert world.run(world.cfg(TRAIN={"EPOCHS": 1}), "first", name="wd", run_id=1) == 0
    resumed = world.cfg(TRAIN={"EPOCHS": 2, "W_DECAY": 0.5, "OPT_BETAS": [0.5, 0.6]})
    assert world.run(resumed, "resumed", name="wd", run_id=1) == 0
    groups = load_checkpoint(Job(world.out, "wd", 1).checkpoint("last"))["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.5, 0.0]
    assert all(tuple(g["betas"]) == (0.5, 0.6) for g in groups)
