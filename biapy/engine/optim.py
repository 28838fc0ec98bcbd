"""Optimizers and learning-rate schedules.

`LRSchedule.lr_at(step)` is a pure function of the optimizer-update index (and, for
'reduceonplateau', of the reductions made so far), so tests check the formula directly and a
resumed run continues the same curve. Formulas, with T = EPOCHS * steps_per_epoch updates:
- '' constant: LR.
- 'warmupcosine': W warmup updates (WARMUP_COSINE_DECAY_EPOCHS epochs, or that fraction of EPOCHS when
  0 < v < 1; -1/0 = none): LR * (step + 1) / W, then MIN + (LR - MIN) * (1 + cos(pi * (step - W) / (T - W))) / 2.
- 'onecycle' (torch's OneCycleLR, cosine annealing, the same value at every step): from LR/25 at update 0 up
  to LR at update 0.3 * T - 1, then down to LR/25/1e4 at the last update, T - 1.
- 'reduceonplateau': LR * FACTOR^k after k reductions (per epoch, on the validation loss), floored at MIN.
"""
import logging
import math

from biapy.engine import optimizers
from biapy.errors import ConfigError

log = logging.getLogger(__name__)

_NO_DECAY_NAMES = ("pos_embed", "mask_token", "cls_token", "token", "relative_position")


def _no_decay(name: str, param) -> bool:
    """Norm weights, biases, any 1-D parameter and position/mask tokens are not decayed."""
    leaf = name.rsplit(".", 1)[-1]
    return param.ndim <= 1 or leaf == "bias" or any(k in leaf for k in _NO_DECAY_NAMES)


def param_groups(model, weight_decay):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        # Frozen parameters are kept too: FREEZE_ENCODER_EPOCHS unfreezes them later.
        (no_decay if _no_decay(name, p) else decay).append(p)
    groups = [{"params": decay, "weight_decay": float(weight_decay)},
              {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model, cfg):
    """The TRAIN.OPTIMIZER update rule (biapy.engine.optimizers: torch.optim's updates without its 1.35 s
    torch._dynamo import)."""
    t = cfg.TRAIN
    groups = param_groups(model, t.W_DECAY)
    name = str(t.OPTIMIZER).upper()
    table = {
        "SGD": (optimizers.SGD, {"lr": t.LR, "momentum": 0.9}),
        "ADAM": (optimizers.Adam, {"lr": t.LR, "betas": tuple(t.OPT_BETAS)}),
        "ADAMW": (optimizers.AdamW, {"lr": t.LR, "betas": tuple(t.OPT_BETAS)}),
    }
    if name not in table:
        raise ConfigError(f"TRAIN.OPTIMIZER: {t.OPTIMIZER!r} is not supported; choose SGD, ADAM or ADAMW")
    cls, kwargs = table[name]
    return cls(groups, **kwargs)


def warmup_steps(cfg, steps_per_epoch):
    v = float(cfg.TRAIN.LR_SCHEDULER.WARMUP_COSINE_DECAY_EPOCHS)
    if v <= 0:
        return 0
    epochs = v * cfg.TRAIN.EPOCHS if v < 1 else v
    return int(round(epochs * steps_per_epoch))


def _cos(start, end, pct):
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * min(max(pct, 0.0), 1.0)))


class LRSchedule:
    """Sets the optimizer's learning rate per update (`step_iter`) or per epoch (`step_epoch`)."""

    def __init__(self, optimizer, name, base_lr, total_steps, warmup=0, min_lr=-1.0, factor=0.5, patience=2):
        self.optimizer, self.name, self.base_lr = optimizer, name, float(base_lr)
        self.total_steps, self.warmup = max(1, int(total_steps)), int(warmup)
        default_min = 1e-6 if name == "reduceonplateau" else 0.0
        self.min_lr = default_min if min_lr is None or min_lr < 0 else float(min_lr)
        self.factor, self.patience = float(factor), int(patience)
        self.step = 0
        self.reductions = 0
        self.best = math.inf
        self.bad_epochs = 0
        self._apply()

    def lr_at(self, step: int) -> float:
        lr, T, W = self.base_lr, self.total_steps, min(self.warmup, self.total_steps)
        if self.name == "warmupcosine":
            if step < W:
                return lr * (step + 1) / W
            return _cos(lr, self.min_lr, (step - W) / max(1, T - W))
        if self.name == "onecycle":
            initial, final = lr / 25.0, lr / 25.0 / 1e4
            up = 0.3 * T - 1  # torch's phase end: a float, as in OneCycleLR
            if step <= up:
                return _cos(initial, lr, step / up if up > 0 else 1.0)
            return _cos(lr, final, (step - up) / (T - 1 - up) if T - 1 > up else 1.0)
        if self.name == "reduceonplateau":
            return max(lr * self.factor ** self.reductions, self.min_lr)
        return lr

    @property
    def lr(self) -> float:
        return self.lr_at(self.step)

    def _apply(self):
        lr = self.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def step_iter(self) -> None:
        """After each optimizer update."""
        self.step += 1
        if self.name in ("warmupcosine", "onecycle"):
            self._apply()

    def step_epoch(self, val_loss=None) -> None:
        """After each epoch; 'reduceonplateau' reduces when val_loss has not improved for `patience` epochs."""
        if self.name != "reduceonplateau" or val_loss is None or not math.isfinite(val_loss):
            return
        improved = not math.isfinite(self.best) or val_loss < self.best - 1e-4 * abs(self.best)
        if improved:
            self.best, self.bad_epochs = float(val_loss), 0
            return
        self.bad_epochs += 1
        if self.bad_epochs > self.patience:
            if self.lr_at(self.step) > self.min_lr:
                self.reductions += 1
                log.info("Validation loss plateau: learning rate lowered to %.2e", self.lr_at(self.step))
            self.bad_epochs = 0
            self._apply()

    def restart_at(self, step: int) -> None:
        """Continue the schedule from update `step` (a resumed run whose epochs hold another number of updates)."""
        self.step = int(step)
        self._apply()

    def state_dict(self) -> dict:
        return {"name": self.name, "step": self.step, "reductions": self.reductions,
                "best": self.best, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state.get("step", 0))
        self.reductions = int(state.get("reductions", 0))
        self.best = float(state.get("best", math.inf))
        self.bad_epochs = int(state.get("bad_epochs", 0))
        self._apply()


def build_scheduler(optimizer, cfg, steps_per_epoch) -> LRSchedule:
    """TRAIN.LR_SCHEDULER -> LRSchedule; steps_per_epoch counts optimizer updates (after ACCUM_ITER)."""
    t, s = cfg.TRAIN, cfg.TRAIN.LR_SCHEDULER
    patience = s.REDUCEONPLATEAU_PATIENCE
    if patience < 0:
        patience = max(t.PATIENCE // 2, 2) if t.PATIENCE > 0 else 2
    return LRSchedule(optimizer, s.NAME, t.LR, t.EPOCHS * max(1, steps_per_epoch),
                      warmup=warmup_steps(cfg, steps_per_epoch) if s.NAME == "warmupcosine" else 0,
                      min_lr=s.MIN_LR, factor=s.REDUCEONPLATEAU_FACTOR, patience=patience)
