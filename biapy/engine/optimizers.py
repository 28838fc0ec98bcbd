"""SGD (multi-tensor foreach update), Adam and AdamW (fused kernels), outside torch.optim's base class.

torch.optim.Optimizer imports torch._dynamo the first time a parameter group is added or a step
is taken (its methods are wrapped to keep them out of torch.compile graphs). That import costs
1.35 s and about 110 MB of resident memory on every run: a fifth of a short job on a CPU and a
tenth of an out-of-core run's memory. These classes make the same updates as torch.optim's
(tests compare them step by step) and keep torch.optim's state_dict layout, so earlier
checkpoints load unchanged.

Adam and AdamW call the fused kernels torch.optim uses with fused=True (CPU and CUDA): one pass
over each parameter instead of the foreach path's nine, which on a CPU loops tensor by tensor.
Measured on 2 CPU cores: 3.1 -> 1.9 ms per step for the 2D U-Net [16..256] (64 tensors, 1.9 M
values), 11.6 -> 3.1 ms for eight ViT blocks of width 256 (88 tensors, 6.3 M values).
"""
from collections import defaultdict

import torch


class BaseOptimizer:
    """Parameter groups, zero_grad, step and state_dict; subclasses give `defaults` and `_update`."""

    defaults: dict = {}
    state_keys: frozenset = frozenset()  # what a parameter's saved state must hold

    def __init__(self, params, **hyper):
        self.defaults = {**self.defaults, **hyper}
        groups = list(params)
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        self.param_groups = [{**self.defaults, **g, "params": list(g["params"])} for g in groups]
        self.state = {}  # parameter -> its buffers and step count

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if set_to_none:
                    p.grad = None
                elif p.grad is not None:
                    p.grad.detach_().zero_()

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]  # frozen parameters have none
            if params:
                self._update(group, params, [p.grad for p in params])

    def state_dict(self) -> dict:
        """torch.optim's layout: parameters by their index over all groups, the step count as a tensor."""
        index = {}
        groups = []
        for group in self.param_groups:
            packed = {k: v for k, v in group.items() if k != "params"}
            packed["params"] = [index.setdefault(p, len(index)) for p in group["params"]]
            groups.append(packed)
        state = {}
        for p, s in self.state.items():
            state[index[p]] = {k: torch.tensor(float(v)) if k == "step" else v for k, v in s.items()}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        """The saved buffers and step counts. Unlike torch.optim, the groups keep their own hyperparameters (the
        config's TRAIN.W_DECAY, OPT_BETAS...; the LR is the schedule's): a resumed run runs under the config its
        config.yaml records. Raises ValueError (or KeyError) when the saved groups or buffers do not fit."""
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"saved state has {len(saved_groups)} parameter group(s), this model "
                             f"{len(self.param_groups)}")
        by_index = {}
        for group, saved in zip(self.param_groups, saved_groups):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"a saved parameter group holds {len(saved['params'])} parameters, this model's "
                                 f"{len(group['params'])}")
            by_index.update(zip(saved["params"], group["params"]))
        state = {}
        for i, saved in state_dict["state"].items():
            if set(saved) != self.state_keys:  # e.g. SGD's momentum resumed by Adam
                raise ValueError(f"saved state holds {sorted(saved)}, {type(self).__name__} keeps "
                                 f"{sorted(self.state_keys)}")
            p = by_index[int(i)]
            state[p] = {k: self._restore(k, v, p) for k, v in saved.items()}
        self.state = state

    @staticmethod
    def _restore(key, value, p):
        if key == "step":  # a float32 tensor beside its parameter, as the fused kernels take it
            return torch.tensor(float(value), dtype=torch.float32, device=p.device)
        if isinstance(value, torch.Tensor):
            if value.shape != p.shape:
                raise ValueError(f"saved {key} of shape {tuple(value.shape)} for a parameter of shape "
                                 f"{tuple(p.shape)}")
            return value.to(device=p.device, dtype=p.dtype, copy=True)  # never shared with the source
        return value


class SGD(BaseOptimizer):
    """SGD with heavy-ball momentum and L2 weight decay (torch.optim.SGD, dampening 0, no Nesterov)."""

    defaults = {"lr": 1e-3, "momentum": 0.0, "weight_decay": 0.0}
    state_keys = frozenset({"momentum_buffer"})

    def _update(self, group, params, grads):
        lr, momentum, wd = group["lr"], group["momentum"], group["weight_decay"]
        if wd:
            grads = torch._foreach_add(grads, params, alpha=wd)
        if momentum:
            states = [self.state.setdefault(p, {}) for p in params]
            old = [(s["momentum_buffer"], g) for s, g in zip(states, grads) if "momentum_buffer" in s]
            if old:
                bufs, old_grads = map(list, zip(*old))
                torch._foreach_mul_(bufs, momentum)
                torch._foreach_add_(bufs, old_grads)
            for s, g in zip(states, grads):  # a parameter's first update starts its buffer at its gradient
                s.setdefault("momentum_buffer", g.detach().clone())
            grads = [s["momentum_buffer"] for s in states]
        torch._foreach_add_(params, grads, alpha=-lr)


class Adam(BaseOptimizer):
    """Adam; weight decay is L2 (added to the gradient) here and decoupled in AdamW."""

    defaults = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}
    state_keys = frozenset({"step", "exp_avg", "exp_avg_sq"})
    decoupled = False
    # GradScaler (TRAIN.AMP fp16) then sets `grad_scale` and `found_inf` on the optimizer for the fused kernel, which
    # unscales and skips a step with an inf or NaN gradient on the device; otherwise it reads the flag back with
    # .item() before every step, a wait for the GPU.
    _step_supports_amp_scaling = True

    def _update(self, group, params, grads):
        (beta1, beta2) = group["betas"]
        # One kernel call per device and dtype (the CUDA kernel needs them uniform); a parameter's own
        # step count gives its bias correction, so one unfrozen later catches up correctly.
        lists = defaultdict(lambda: ([], [], [], [], []))
        for p, g in zip(params, grads):
            s = self.state.get(p)
            if s is None:
                s = self.state[p] = {"step": torch.zeros((), dtype=torch.float32, device=p.device),
                                     "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
            for column, t in zip(lists[p.device, p.dtype], (p, g, s["exp_avg"], s["exp_avg_sq"], s["step"])):
                column.append(t)
        kernel = torch._fused_adamw_ if self.decoupled else torch._fused_adam_
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        for (device, _), (ps, gs, exp_avgs, exp_avg_sqs, steps) in lists.items():
            scale = None if grad_scale is None else grad_scale.to(device, non_blocking=True)
            inf = None if found_inf is None else found_inf.to(device, non_blocking=True)
            torch._foreach_add_(steps, 1)
            kernel(ps, gs, exp_avgs, exp_avg_sqs, [], steps, lr=group["lr"], beta1=beta1, beta2=beta2,
                   weight_decay=group["weight_decay"], eps=group["eps"], amsgrad=False, maximize=False,
                   grad_scale=scale, found_inf=inf)
            if inf is not None:  # a skipped step is not counted
                torch._foreach_sub_(steps, [inf] * len(steps))


class AdamW(Adam):
    """Adam with decoupled weight decay: parameters shrink by lr * weight_decay before the update."""

    defaults = {**Adam.defaults, "weight_decay": 1e-2}
    decoupled = True
