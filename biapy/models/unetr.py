"""UNETR-like segmentation network (Hatamizadeh et al. 2022), 2D and 3D.

The `encoder` is the masked autoencoder's ViTEncoder (same class, same names), run on every
token. The token size T is split into up-sampling stages (factors of 2, then any remainder),
giving levels 0 (full resolution) .. S (token grid). Level l < S gets a skip: level 0 from a
conv stem on the raw image, level l >= 1 from an evenly spaced transformer block, brought up from
the token grid by S - l (ConvTranspose + conv) stages. The decoder climbs from the encoder's
output like a U-Net. Widths: level l uses MODEL.FEATURE_MAPS[l] (the last value repeated when
there are more levels); NORMALIZATION, KERNEL_SIZE and ACTIVATION are honoured as in the U-Nets.
"""
from torch import nn

from biapy.models.blocks import (ConvBlock, ConvNormAct, conv_nd, conv_transpose_nd, decode_level, init_conv_weights,
                                 keep_input_float32)
from biapy.models.float32 import keep_float32
from biapy.models.mae import check_token_fit
from biapy.models.vit import ViTEncoder, init_vit_weights, tokens_to_map


def upsampling_factors(token_size: int) -> list:
    """16 -> [2, 2, 2, 2]; 12 -> [2, 2, 3]; 1 -> [1] (one stage that keeps the size)."""
    factors, t = [], token_size
    while t % 2 == 0 and t > 1:
        factors.append(2)
        t //= 2
    if t > 1 or not factors:
        factors.append(t)
    return factors


class SkipPath(nn.Sequential):
    """Token map (dim) -> level features: per stage ConvTranspose(factor) then ConvNormAct."""

    def __init__(self, ndim, dim, width, factors, kernel, norm, act):
        layers, c = [], dim
        for f in factors:
            layers += [conv_transpose_nd(ndim)(c, width, f, stride=f),
                       ConvNormAct(ndim, width, width, kernel, norm, act)]
            c = width
        super().__init__(*layers)


class UNETRDecoder(nn.Module):
    def __init__(self, ndim, in_channels, dim, widths, factors, kernel, norm, act):
        super().__init__()
        S = len(factors)
        # factors[i] is the up-sampling from level i+1 to level i.
        self.stem = keep_input_float32(ConvBlock(ndim, in_channels, widths[0], kernel, norm, act))
        self.skips = nn.ModuleList(SkipPath(ndim, dim, widths[l], factors[l:], kernel, norm, act)
                                   for l in range(1, S))
        up = conv_transpose_nd(ndim)
        in_w = [widths[l + 1] if l + 1 < S else dim for l in range(S)]
        self.ups = nn.ModuleList(up(in_w[l], widths[l], factors[l], stride=factors[l]) for l in range(S))
        self.blocks = nn.ModuleList(ConvBlock(ndim, 2 * widths[l], widths[l], kernel, norm, act) for l in range(S))

    recompute_blocks = False  # MODEL.ACTIVATION_CHECKPOINTING (biapy.models.recompute)

    def forward(self, image, top, block_maps):
        """top: encoder output map (B, dim, *grid); block_maps[l-1]: skip source of level l."""
        skips = [self.stem(image)] + [path(m) for path, m in zip(self.skips, block_maps)]
        x = top
        for l in reversed(range(len(self.ups))):
            x = decode_level(self, self.ups[l], self.blocks[l], x, skips[l])
        return x


class UNETR(nn.Module):
    """forward(x (B, C, *spatial)) -> logits (B, n_classes, *spatial)."""

    def __init__(self, ndim, in_channels, n_classes, patch_spatial, token_size=16, embed_dim=768, depth=12,
                 heads=12, mlp_ratio=4.0, norm_eps=1e-6, feature_maps=(16, 32, 64, 128, 256), kernel=3,
                 norm="bn", act="elu"):
        super().__init__()
        check_token_fit(patch_spatial, token_size)
        self.ndim = ndim
        self.token_size = token_size
        self.grid = tuple(s // token_size for s in patch_spatial)
        factors = upsampling_factors(token_size)
        S = len(factors)
        widths = [feature_maps[min(l, len(feature_maps) - 1)] for l in range(S)]
        # Evenly spaced blocks feed levels 1 .. S-1 (shallow block -> high resolution, as UNETR):
        # depth 12, S 4 -> blocks 3, 6, 9 (1-based) for levels 1, 2, 3; the normed output is the top.
        self.skip_blocks = [max(0, round(depth * k / S) - 1) for k in range(1, S)]
        self.encoder = ViTEncoder(ndim, in_channels, patch_spatial, token_size, embed_dim, depth, heads,
                                  mlp_ratio, norm_eps)
        self.decoder = UNETRDecoder(ndim, in_channels, embed_dim, widths, factors, kernel, norm, act)
        self.head = keep_float32(conv_nd(ndim)(widths[0], n_classes, 1))
        init_vit_weights(self.encoder)
        init_conv_weights(self.decoder)
        init_conv_weights(self.head)

    def forward(self, x):
        grid = self.encoder.grid_of(x)
        wanted = sorted(set(self.skip_blocks))
        top, feats = self.encoder(x, return_blocks=wanted)
        by_block = dict(zip(wanted, feats))
        maps = [tokens_to_map(by_block[b], grid) for b in self.skip_blocks]
        return self.head(self.decoder(x, tokens_to_map(top, grid), maps))


def unetr_from_cfg(cfg, in_channels):
    m = cfg.MODEL
    ndim = 3 if cfg.PROBLEM.NDIM == "3D" else 2
    return UNETR(ndim, in_channels, m.N_CLASSES, tuple(cfg.DATA.PATCH_SIZE[:-1]), m.VIT_TOKEN_SIZE,
                 m.VIT_EMBED_DIM, m.VIT_NUM_LAYERS, m.VIT_NUM_HEADS, m.VIT_MLP_RATIO, m.VIT_NORM_EPS,
                 m.FEATURE_MAPS, m.KERNEL_SIZE, m.NORMALIZATION, m.ACTIVATION)
