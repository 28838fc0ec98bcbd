"""U-Net and residual U-Net, 2D and 3D, with anisotropic z pooling for thin stacks.

Top-level submodules are `encoder` (all levels down to the bottleneck), `decoder` (transposed
convolutions and the level blocks after each skip concatenation) and `head` (the final 1x1
convolution): a checkpoint from self-supervised pretraining loads into a segmentation model by
name, only `head.*` differing in shape.
"""
from torch import nn

from biapy.errors import ConfigError
from biapy.models import recompute
from biapy.models.blocks import (block_class, conv_nd, conv_transpose_nd, decode_level, init_conv_weights,
                                 keep_input_float32)
from biapy.models.float32 import keep_float32


def pool_factors(ndim, levels, z_down=()):
    """Per down-sampling, the pooling factor per spatial axis; 3D z factor from Z_DOWN (0 = 2)."""
    factors = []
    for i in range(levels - 1):
        if ndim == 3:
            z = z_down[i] if i < len(z_down) else 0
            factors.append((2 if z in (0, 2) else 1, 2, 2))
        else:
            factors.append((2, 2))
    return factors


def total_divisor(factors, ndim):
    div = [1] * ndim
    for f in factors:
        div = [d * k for d, k in zip(div, f)]
    return tuple(div)


class UNetEncoder(nn.Module):
    """`blocks[i]` runs at level i; max pooling (no parameters) between levels."""

    def __init__(self, ndim, in_channels, feature_maps, factors, block, kernel, norm, act, dropout):
        super().__init__()
        pool = nn.MaxPool3d if ndim == 3 else nn.MaxPool2d
        self.pools = nn.ModuleList(pool(f, f) for f in factors)
        widths = [in_channels, *feature_maps]
        self.blocks = nn.ModuleList(block(ndim, widths[i], widths[i + 1], kernel, norm, act, dropout[i])
                                    for i in range(len(feature_maps)))

    recompute_blocks = False  # MODEL.ACTIVATION_CHECKPOINTING (biapy.models.recompute)

    def forward(self, x):
        """Features of every level, the bottleneck last."""
        feats = [recompute.run(self, self.blocks[0], x)]
        for pool, blk in zip(self.pools, self.blocks[1:]):
            feats.append(recompute.run(self, blk, feats[-1], fn=lambda f, pool=pool, blk=blk: blk(pool(f))))
        return feats


class UNetDecoder(nn.Module):
    """`ups[i]` brings level i+1 up to level i (ConvTranspose, kernel = stride = pool factor)."""

    def __init__(self, ndim, feature_maps, factors, block, kernel, norm, act, dropout):
        super().__init__()
        up = conv_transpose_nd(ndim)
        fm = feature_maps
        self.ups = nn.ModuleList(up(fm[i + 1], fm[i], f, stride=f) for i, f in enumerate(factors))
        self.blocks = nn.ModuleList(block(ndim, 2 * fm[i], fm[i], kernel, norm, act, dropout[i])
                                    for i in range(len(factors)))

    recompute_blocks = False  # MODEL.ACTIVATION_CHECKPOINTING (biapy.models.recompute)

    def forward(self, feats):
        x = feats[-1]
        for i in reversed(range(len(self.ups))):
            x = decode_level(self, self.ups[i], self.blocks[i], x, feats[i])
        return x


class UNet(nn.Module):
    """forward(x (B, in_channels, *spatial)) -> (B, out_channels, *spatial) (no final activation)."""

    def __init__(self, ndim, in_channels, out_channels, feature_maps=(16, 32, 64, 128, 256),
                 dropout=None, norm="bn", kernel=3, act="elu", z_down=(), residual=False):
        super().__init__()
        feature_maps = list(feature_maps)
        dropout = list(dropout) if dropout is not None else [0.0] * len(feature_maps)
        factors = pool_factors(ndim, len(feature_maps), z_down)
        self.ndim = ndim
        self.divisor = total_divisor(factors, ndim)
        block = block_class(residual)
        self.encoder = UNetEncoder(ndim, in_channels, feature_maps, factors, block, kernel, norm, act, dropout)
        self.decoder = UNetDecoder(ndim, feature_maps, factors, block, kernel, norm, act, dropout)
        self.head = keep_float32(conv_nd(ndim)(feature_maps[0], out_channels, 1))
        keep_input_float32(self.encoder.blocks[0])
        init_conv_weights(self)

    def forward(self, x):
        spatial = tuple(x.shape[2:])
        if any(s % d for s, d in zip(spatial, self.divisor)):
            raise ConfigError(f"DATA.PATCH_SIZE: network input of spatial size {spatial} must be divisible by "
                              f"{self.divisor} (the U-Net's total pooling)")
        return self.head(self.decoder(self.encoder(x)))


def unet_from_cfg(cfg, in_channels, out_channels):
    m = cfg.MODEL
    ndim = 3 if cfg.PROBLEM.NDIM == "3D" else 2
    return UNet(ndim, in_channels, out_channels, feature_maps=m.FEATURE_MAPS, dropout=m.DROPOUT_VALUES,
                norm=m.NORMALIZATION, kernel=m.KERNEL_SIZE, act=m.ACTIVATION, z_down=m.Z_DOWN,
                residual=m.ARCHITECTURE == "resunet")
