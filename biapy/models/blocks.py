"""Convolutional building blocks shared by the U-Nets and the UNETR decoder (2D and 3D).

Convolutions feeding a normalization layer have no bias (the norm's shift replaces it), and
nothing here forces a memory layout, so channels-last tensors stay channels-last end to end.
"""
import torch
from torch import nn

from . import recompute
from .elu import ELU
from .float32 import keep_float32
from .instance_norm import InstanceNorm

ACTIVATIONS = {
    "elu": ELU,
    "relu": lambda: nn.ReLU(inplace=True),
    "leaky_relu": lambda: nn.LeakyReLU(0.01, inplace=True),
    "gelu": nn.GELU,
    "silu": lambda: nn.SiLU(inplace=True),
}


def conv_nd(ndim):
    return nn.Conv3d if ndim == 3 else nn.Conv2d


def conv_transpose_nd(ndim):
    return nn.ConvTranspose3d if ndim == 3 else nn.ConvTranspose2d


def make_norm(kind, channels, ndim):
    if kind == "bn":
        return (nn.BatchNorm3d if ndim == 3 else nn.BatchNorm2d)(channels)
    if kind == "in":
        return InstanceNorm(channels)  # nn.InstanceNorm2d/3d(affine=True)'s parameters, channels-last kept
    if kind == "gn":
        groups = next(g for g in (8, 4, 2, 1) if channels % g == 0)
        return nn.GroupNorm(groups, channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown normalization {kind!r}")


def make_activation(kind):
    return ACTIVATIONS[kind]()


class ConvNormAct(nn.Sequential):
    """conv (same padding) -> norm -> activation."""

    def __init__(self, ndim, c_in, c_out, kernel, norm, act):
        super().__init__(
            conv_nd(ndim)(c_in, c_out, kernel, padding="same", bias=norm == "none"),
            make_norm(norm, c_out, ndim),
            make_activation(act),
        )


class ConvBlock(nn.Module):
    """Two ConvNormAct with optional dropout between them (BiaPy's U-Net level block)."""

    def __init__(self, ndim, c_in, c_out, kernel=3, norm="bn", act="elu", dropout=0.0):
        super().__init__()
        self.conv1 = ConvNormAct(ndim, c_in, c_out, kernel, norm, act)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = ConvNormAct(ndim, c_out, c_out, kernel, norm, act)

    def forward(self, x):
        return self.conv2(self.drop(self.conv1(x)))


class ResBlock(nn.Module):
    """Residual variant: act(norm(conv(act(norm(conv(x))))) + shortcut(x)); 1x1 shortcut when widths differ."""

    def __init__(self, ndim, c_in, c_out, kernel=3, norm="bn", act="elu", dropout=0.0):
        super().__init__()
        conv = conv_nd(ndim)
        self.conv1 = ConvNormAct(ndim, c_in, c_out, kernel, norm, act)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = conv(c_out, c_out, kernel, padding="same", bias=norm == "none")
        self.norm2 = make_norm(norm, c_out, ndim)
        self.shortcut = (nn.Identity() if c_in == c_out else
                         nn.Sequential(conv(c_in, c_out, 1, bias=norm == "none"), make_norm(norm, c_out, ndim)))
        self.act = make_activation(act)

    def forward(self, x):
        y = self.norm2(self.conv2(self.drop(self.conv1(x))))
        return self.act(y + self.shortcut(x))


def keep_input_float32(block):
    """The layers of a level block that read its input (its first convolution, and a residual block's 1x1
    shortcut) run in float32 under autocast: see biapy/models/float32.py. Returns the block."""
    keep_float32(block.conv1[0])
    if isinstance(getattr(block, "shortcut", None), nn.Sequential):
        keep_float32(block.shortcut[0])
    return block


def block_class(residual):
    return ResBlock if residual else ConvBlock


def init_conv_weights(module: nn.Module):
    """He init for convolutions followed by rectifier-like activations; zero biases."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def decode_level(owner: nn.Module, up: nn.Module, block: nn.Module, x: torch.Tensor, skip: torch.Tensor):
    """block(up-sampled `x` joined with the skip features along channels, skip first as U-Net): one decoder
    level, run through `recompute.run` (with owner.recompute_blocks on, only x and skip are kept)."""
    return recompute.run(owner, block, x, skip, fn=lambda x, skip: block(torch.cat([skip, up(x)], dim=1)))
