"""ELU (the U-Nets' default activation, as BiaPy's) computed from exp on the CPU.

torch's CPU ELU calls expm1, whose AVX-512 kernel is slow on some CPUs: on an AMD EPYC (Zen 4) it took 2.3 ms on
8x16x64x64 floats against 0.23 for exp, and the U-Net's ELUs were a third of its training step. For x <= 0,
exp(x) - 1 >= x, so ELU(x) = max(x, exp(min(x, 0)) - 1) exactly, in four vectorized passes (0.33 ms there; on
Intel CPUs, where expm1 is fast, about torch's own time). Reduced-precision inputs take the exponential in float32,
so a bf16 output rounds once, as torch's: exp(x) rounded to bf16 before the subtraction would lose every value
between -0.002 and 0. The backward pass is torch's in-place ELU's (from the output). On a GPU torch's fused
kernel is kept.
"""
import torch
from torch import nn


class _ExpELU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        neg = x.clamp(max=0)
        if neg.dtype in (torch.bfloat16, torch.float16):
            neg = neg.float()
        neg.exp_().sub_(1)
        torch.maximum(x, neg.to(x.dtype), out=x)
        ctx.mark_dirty(x)
        ctx.save_for_backward(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        return torch.ops.aten.elu_backward(grad, 1.0, 1, 1, True, out)


class ELU(nn.ELU):
    """nn.ELU(inplace=True) (same repr, no parameters, so checkpoints are unchanged), from exp on the CPU."""

    def __init__(self):
        super().__init__(alpha=1.0, inplace=True)

    def forward(self, x):
        if x.device.type != "cpu":
            return super().forward(x)
        return _ExpELU.apply(x)
