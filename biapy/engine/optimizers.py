"""SGD, Adam and AdamW as multi-tensor (foreach) updates, outside torch.optim's base class.

torch.optim.Optimizer imports torch._dynamo the first time a parameter group is added or a step
is taken (its methods are wrapped to keep them out of torch.compile graphs). That import costs
1.35 s and about 110 MB of resident memory on every run: a fifth of a short job on a CPU and a
tenth of an out-of-core run's memory. These classes make the same updates with the same
torch._foreach kernels as torch.optim's foreach implementations (tests compare them step by
step) and keep torch.optim's state_dict layout, so earlier checkpoints load unchanged.
"""
import torch


class ForeachOptimizer:
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
        """Raises ValueError (or KeyError) when the saved groups or buffers do not fit these parameters."""
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
        for group, saved in zip(self.param_groups, saved_groups):
            group.update({k: v for k, v in saved.items() if k != "params"})

    @staticmethod
    def _restore(key, value, p):
        if key == "step":
            return float(value)
        if isinstance(value, torch.Tensor):
            if value.shape != p.shape:
                raise ValueError(f"saved {key} of shape {tuple(value.shape)} for a parameter of shape "
                                 f"{tuple(p.shape)}")
            return value.to(device=p.device, dtype=p.dtype, copy=True)  # never shared with the source
        return value


class SGD(ForeachOptimizer):
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


class Adam(ForeachOptimizer):
    """Adam; weight decay is L2 (added to the gradient) here and decoupled in AdamW."""

    defaults = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}
    state_keys = frozenset({"step", "exp_avg", "exp_avg_sq"})
    decoupled = False

    def _update(self, group, params, grads):
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        states = []
        for p in params:
            s = self.state.get(p)
            if s is None:
                s = self.state[p] = {"step": 0.0, "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
            s["step"] += 1
            states.append(s)
        if wd:
            if self.decoupled:
                torch._foreach_mul_(params, 1 - lr * wd)
            else:
                grads = torch._foreach_add(grads, params, alpha=wd)
        exp_avgs = [s["exp_avg"] for s in states]
        exp_avg_sqs = [s["exp_avg_sq"] for s in states]
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
        # Bias corrections per parameter: a parameter unfrozen later has taken fewer steps.
        step_sizes = [-lr / (1 - beta1 ** s["step"]) for s in states]
        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denom, [(1 - beta2 ** s["step"]) ** 0.5 for s in states])
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(params, exp_avgs, denom, step_sizes)


class AdamW(Adam):
    """Adam with decoupled weight decay: parameters shrink by lr * weight_decay before the update."""

    defaults = {**Adam.defaults, "weight_decay": 1e-2}
    decoupled = True
