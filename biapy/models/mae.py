"""ViT masked autoencoder (He et al. 2022) for 2D and 3D patches, after facebookresearch/mae.

Top-level submodules: `encoder` (ViTEncoder, shared with UNETR), `decoder` (embedding,
mask token, transformer blocks, norm) and `head` (linear to the pixels of one token). The
encoder runs on the visible tokens only; the mask reported by `forward` is built from the very
token set hidden from the encoder, for random and grid masks, in 2D and 3D.
"""
import math
from functools import partial

import torch
from torch import nn
from timm.layers import Mlp
from timm.models.vision_transformer import Block

from biapy.errors import ConfigError
from biapy.models import recompute
from biapy.models.float32 import keep_float32
from biapy.models.masking import grid_token_mask, random_token_mask, token_mask_to_image
from biapy.models.vit import (TransformerBlocks, ViTEncoder, init_vit_weights, sincos_pos_embed, take_tokens,
                              token_pixels)


def fixed_width_mlp(hidden: int):
    """timm Block `mlp_layer` whose hidden width is exactly `hidden` (MAE_DEC_MLP_DIMS is absolute)."""
    def make(in_features, hidden_features=None, **kwargs):
        return Mlp(in_features, hidden_features=int(hidden), **kwargs)
    return make


class MAEDecoder(nn.Module):
    """Latent of the visible tokens + mask tokens, back in grid order -> decoder tokens (B, L, width)."""

    def __init__(self, enc_dim, grid, width, depth, heads, mlp_dims, norm_eps=1e-6):
        super().__init__()
        self.embed = nn.Linear(enc_dim, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.register_buffer("pos_embed", sincos_pos_embed(grid, width).unsqueeze(0), persistent=False)
        norm = partial(nn.LayerNorm, eps=norm_eps)
        mlp = fixed_width_mlp(mlp_dims)
        self.blocks = TransformerBlocks(Block(width, heads, qkv_bias=True, norm_layer=norm, mlp_layer=mlp)
                                        for _ in range(depth))
        self.norm = norm(width)

    recompute_blocks = False  # MODEL.ACTIVATION_CHECKPOINTING (biapy.models.recompute)

    def forward(self, latent, ids_restore, pos_embed):
        x = self.embed(latent)
        B, L = ids_restore.shape
        fill = self.mask_token.to(x.dtype).expand(B, L - x.shape[1], -1)
        x = torch.cat([x, fill], dim=1)
        x = take_tokens(x, ids_restore)
        x = x + pos_embed.to(x.dtype)
        self.blocks.pick_attention(x)
        for blk in self.blocks:
            x = recompute.run(self, blk, x)
        return self.norm(x)


class MaskedAutoencoderViT(nn.Module):
    """forward(x, generator) -> (pred (B, C, *spatial), mask (B, 1, *spatial), 1 = hidden).

    `token_size` (pixels per token side) and `grid` (tokens per axis of the configured patch)
    are public; `encode` exposes the encoder's visible-token sequence for inspection.
    """

    def __init__(self, ndim, in_channels, patch_spatial, token_size=16, embed_dim=768, depth=12, heads=12,
                 mlp_ratio=4.0, norm_eps=1e-6, dec_width=512, dec_depth=8, dec_heads=16, dec_mlp_dims=2048,
                 mask_type="grid", mask_ratio=0.5):
        super().__init__()
        check_token_fit(patch_spatial, token_size)
        if mask_type not in ("grid", "random"):
            raise ConfigError(f"MODEL.MAE_MASK_TYPE: {mask_type!r} is not valid; expected one of random, grid")
        self.ndim = ndim
        self.in_channels = in_channels
        self.token_size = token_size
        self.grid = tuple(s // token_size for s in patch_spatial)
        self.mask_type = mask_type
        self.mask_ratio = mask_ratio
        self.encoder = ViTEncoder(ndim, in_channels, patch_spatial, token_size, embed_dim, depth, heads,
                                  mlp_ratio, norm_eps)
        self.decoder = MAEDecoder(embed_dim, self.grid, dec_width, dec_depth, dec_heads, dec_mlp_dims, norm_eps)
        self.head = keep_float32(nn.Linear(dec_width, token_size ** ndim * in_channels))
        init_vit_weights(self)
        nn.init.normal_(self.decoder.mask_token, std=0.02)

    # ------------------------------------------------------------------ tokens <-> pixels
    def patchify(self, imgs):
        """(B, C, *spatial) -> (B, L, t^ndim * C), each token's pixels ordered (t.., C) as MAE."""
        return token_pixels(imgs, self.token_size)

    def unpatchify(self, x, grid=None):
        """(B, L, t^ndim * C) -> (B, C, *spatial); `grid` defaults to the configured patch's."""
        grid = tuple(grid or self.grid)
        n = len(grid)
        t = self.token_size
        B = x.shape[0]
        C = x.shape[-1] // t ** n
        x = x.reshape(B, *grid, *([t] * n), C)
        perm = [0, 2 * n + 1]
        for i in range(n):
            perm += [1 + i, 1 + n + i]
        x = x.permute(*perm)
        return x.reshape(B, C, *[g * t for g in grid])

    # ------------------------------------------------------------------ model
    def make_mask(self, B, grid, generator=None, device=None, noise=None):
        """(mask (B, L) 1 = hidden, ids_keep, ids_restore) for this model's MAE_MASK_TYPE/RATIO; a random mask
        from `noise` (B, L) when given (`masking.token_noise`), else drawn from `generator`."""
        if self.mask_type == "grid":
            return grid_token_mask(grid, self.mask_ratio, B, device)
        return random_token_mask(B, math.prod(grid), self.mask_ratio, generator, device, noise)

    def encode(self, x, generator=None, noise=None):
        """-> (latent (B, L_visible, dim), mask (B, L), ids_restore (B, L), ids_keep (B, L_visible))."""
        grid = self.encoder.grid_of(x)
        mask, ids_keep, ids_restore = self.make_mask(x.shape[0], grid, generator, x.device, noise)
        latent, _ = self.encoder(x, ids_keep=ids_keep)
        return latent, mask, ids_restore, ids_keep

    def decode(self, latent, ids_restore, grid):
        """-> per-token pixel predictions (B, L, t^ndim * C)."""
        pos = self.decoder.pos_embed if tuple(grid) == self.grid else \
            sincos_pos_embed(grid, self.decoder.pos_embed.shape[-1]).unsqueeze(0).to(latent.device)
        return self.head(self.decoder(latent, ids_restore, pos))

    def forward(self, x, generator=None, noise=None):
        """x (B, C, *spatial) -> (pred (B, C, *spatial), mask (B, 1, *spatial) float, 1 = hidden).

        A random mask comes from `noise` (B, L) when given, else from `generator`. Under torch.compile pass
        the noise: a generator cannot enter the graph, which then broke in three at the draw."""
        grid = self.encoder.grid_of(x)
        latent, mask, ids_restore, _ = self.encode(x, generator, noise)
        pred = self.unpatchify(self.decode(latent, ids_restore, grid), grid)
        return pred, token_mask_to_image(mask.to(pred.dtype), grid, self.token_size)


def check_token_fit(patch_spatial, token_size):
    if any(s % token_size for s in patch_spatial):
        raise ConfigError(f"DATA.PATCH_SIZE ({', '.join(map(str, patch_spatial))}) must be divisible by "
                          f"MODEL.VIT_TOKEN_SIZE ({token_size}) on every spatial axis")


def mae_from_cfg(cfg, in_channels):
    m = cfg.MODEL
    ndim = 3 if cfg.PROBLEM.NDIM == "3D" else 2
    return MaskedAutoencoderViT(
        ndim, in_channels, tuple(cfg.DATA.PATCH_SIZE[:-1]), m.VIT_TOKEN_SIZE, m.VIT_EMBED_DIM, m.VIT_NUM_LAYERS,
        m.VIT_NUM_HEADS, m.VIT_MLP_RATIO, m.VIT_NORM_EPS, m.MAE_DEC_HIDDEN_SIZE, m.MAE_DEC_NUM_LAYERS,
        m.MAE_DEC_NUM_HEADS, m.MAE_DEC_MLP_DIMS, m.MAE_MASK_TYPE, m.MAE_MASK_RATIO)
