"""Instance normalization that keeps channels-last tensors channels-last.

torch's InstanceNorm reshapes its input to (1, B*C, ...) and runs batch norm on it, which needs a
contiguous NCHW copy: on a channels-last U-Net every normalized activation changes layout twice
and the next convolution gets the slow one (a 2D crappify epoch took 1.6x as long as with batch
norm on the CPU). Here the statistics are reductions over the spatial axes and the rest is
elementwise, so the layout of the input is kept, and the backward pass is written out so that only
the input and two (B, C) statistics are saved, as torch's own kernel does.

The parameters are `weight` and `bias` of shape (C,), as in nn.InstanceNorm2d/3d(affine=True), so
checkpoints of either load into the other.
"""
import torch
from torch import nn

_LOW_PRECISION = (torch.float16, torch.bfloat16)


class _InstanceNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        dtype = x.dtype
        xf = x.float() if dtype in _LOW_PRECISION else x  # statistics in float32 under autocast
        dims = tuple(range(2, x.dim()))
        var, mean = torch.var_mean(xf, dim=dims, keepdim=True, correction=0)
        rstd = (var + eps).rsqrt()
        shape = (1, -1) + (1,) * len(dims)
        scale = rstd * weight.to(xf.dtype).view(shape)
        shift = bias.to(xf.dtype).view(shape) - mean * scale
        ctx.save_for_backward(x, weight, mean, rstd)
        return torch.addcmul(shift, xf, scale).to(dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable  # a second derivative raises instead of being wrong
    def backward(ctx, grad):
        x, weight, mean, rstd = ctx.saved_tensors
        dtype = x.dtype
        xf = x.float() if dtype in _LOW_PRECISION else x
        g = grad.float() if grad.dtype in _LOW_PRECISION else grad
        dims = tuple(range(2, x.dim()))
        shape = (1, -1) + (1,) * len(dims)
        count = x[0, 0].numel()
        centred = xf - mean
        sum_g = g.sum(dim=dims, keepdim=True)  # (B, C, 1...)
        sum_g_centred = (g * centred).sum(dim=dims, keepdim=True)
        grad_weight = (sum_g_centred * rstd).sum(0).flatten().to(weight.dtype)
        grad_bias = sum_g.sum(0).flatten().to(weight.dtype)
        # dx = w * rstd * (g - mean(g) - x_hat * mean(g * x_hat)) with x_hat = centred * rstd,
        # as a*g + b*centred + c per sample and channel: two passes over the activation
        a = rstd * weight.to(xf.dtype).view(shape)
        b = a * rstd * rstd * sum_g_centred / -count
        c = a * sum_g / -count
        grad_x = torch.addcmul(c, g, a).addcmul_(centred, b)
        return grad_x.to(dtype), grad_weight, grad_bias, None


class InstanceNorm(nn.Module):
    """Per-sample, per-channel normalization over the spatial axes (2D or 3D), with a learned scale and shift."""

    def __init__(self, channels, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x):
        if self.training and x[0, 0].numel() == 1:  # as torch's layer: the output would be the bias alone
            raise ValueError(f"instance norm needs more than 1 spatial element when training, got input of size "
                             f"{tuple(x.shape)}")
        return _InstanceNormFunction.apply(x, self.weight, self.bias, self.eps)

    def extra_repr(self):
        return f"{self.weight.numel()}, eps={self.eps}"
