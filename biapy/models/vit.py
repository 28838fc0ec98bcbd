"""ViT encoder pieces shared by the masked autoencoder and UNETR (2D and 3D).

`ViTEncoder` is the one encoder class of both models, so `encoder.*` parameter names and
shapes match exactly and MAE weights load into UNETR. There is no class token: the
reconstruction and the segmentation decoder only need the patch tokens.

Position embeddings are fixed 2D/3D sine-cosine tables kept as non-persistent buffers: they are
not learned, not stored in checkpoints, and recomputed for any grid, so a checkpoint trained
on one patch size fine-tunes on another.
"""
from functools import partial

import math
import torch
from torch import nn
from timm.models.vision_transformer import Block

from biapy.models import recompute
from biapy.models.float32 import keep_float32


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """(N,) positions -> (N, dim) [sin | cos] with MAE's frequencies (dim even)."""
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000 ** omega
    out = pos.double().reshape(-1, 1) * omega.reshape(1, -1)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_pos_embed(grid, dim: int) -> torch.Tensor:
    """(L, dim) float32 table for a 2D (y, x) or 3D (z, y, x) token grid, L in row-major order.

    Each axis gets an even share of `dim`; the few leftover channels (when dim is not a multiple
    of 2 * ndim) are zero.
    """
    n = len(grid)
    share = (dim // n) // 2 * 2
    coords = torch.meshgrid(*[torch.arange(g) for g in grid], indexing="ij")
    parts = [sincos_1d(share, c.flatten()) for c in coords]
    L = math.prod(grid)
    parts.append(torch.zeros(L, dim - share * n, dtype=torch.float64))
    return torch.cat(parts, dim=1).float()


def take_tokens(tokens, ids):
    """tokens (B, L, D) at `ids` (B, L'), per sample -> (B, L', D)."""
    return torch.gather(tokens, 1, ids.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def token_pixels(imgs, t):
    """(B, C, *spatial) -> (B, L, t^ndim * C): the pixels of each t^ndim token, ordered (t.., C) as MAE's, tokens in
    grid order (spatial sides divisible by t)."""
    B, C = imgs.shape[:2]
    grid = [s // t for s in imgs.shape[2:]]
    shape = [B, C]
    for g in grid:
        shape += [g, t]
    n = len(grid)
    x = imgs.reshape(shape).permute(0, *(2 + 2 * i for i in range(n)), *(3 + 2 * i for i in range(n)), 1)
    return x.reshape(B, math.prod(grid), t ** n * C)


class PatchEmbed(nn.Module):
    """Non-overlapping token_size^ndim patches -> (B, L, dim) tokens, by a strided convolution."""

    def __init__(self, ndim, in_channels, token_size, dim):
        super().__init__()
        conv = nn.Conv3d if ndim == 3 else nn.Conv2d
        self.proj = conv(in_channels, dim, token_size, stride=token_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)

    def embed_kept(self, x, ids_keep):
        """The tokens `ids_keep` (B, L_keep) of `forward(x)` alone: the convolution as one matrix product over the
        pixels of just those tokens, in float32 as the convolution runs (MAE's encoder sees a quarter of them, so
        embedding every token cost 4x the work; its backward too)."""
        t = self.proj.kernel_size[0]
        if any(s % t for s in x.shape[2:]):  # a partial token at the border, which the convolution drops
            return take_tokens(self.forward(x), ids_keep)
        pixels = take_tokens(token_pixels(x, t), ids_keep)
        w = self.proj.weight
        # The weight in its pixels' (t.., C) order. With one channel that is its own order, and a view of it gives
        # the gradient back in its strides: through movedim that came out channels-last (the same bytes), which DDP
        # compares literally, warning under torchrun and copying every step.
        weight = w.flatten(1) if w.shape[1] == 1 else w.movedim(1, -1).flatten(1)
        with torch.autocast(x.device.type, enabled=False):
            return nn.functional.linear(pixels.float(), weight, self.proj.bias)


class TransformerBlocks(nn.ModuleList):
    """timm Blocks (state-dict keys as a plain ModuleList's) whose attention kernel suits the step.

    torch's fused CPU attention takes ~13x longer over its bf16 backward than over its float32 one (5.3 against
    0.4 ms a block of the run_all ViT), so a CPU training step under bf16 autocast has the blocks compute
    attention as two matmuls and a softmax instead (timm's plain path): the ViT's step then ran 1.5x (width
    256) to 2x (ViT-B) faster than in float32, where with the fused kernel it was 1.05-1.15x slower at width
    256 (bench/HISTORY.md, eighth session).
    """

    def __init__(self, blocks):
        super().__init__(blocks)
        self.fused = [blk.attn.fused_attn for blk in self]  # timm's own choice (TIMM_FUSED_ATTN)

    # Above this many tokens the plain path's N x N attention weights, kept for the backward, cost more than the
    # fused kernel's slowness (bf16 training step, width 256: plain 29 against fused 36 ms at 256 tokens, 83
    # against 54 ms at 1024; at 4096 tokens plain took 4x the memory).
    PLAIN_MAX_TOKENS = 256

    def pick_attention(self, x):
        slow_fused = (x.device.type == "cpu" and torch.is_grad_enabled() and torch.is_autocast_enabled("cpu")
                      and torch.get_autocast_dtype("cpu") == torch.bfloat16 and x.shape[1] <= self.PLAIN_MAX_TOKENS)
        for blk, fused in zip(self, self.fused):
            blk.attn.fused_attn = fused and not slow_fused


class ViTEncoder(nn.Module):
    """patch_embed -> + pos_embed -> (optional token selection) -> blocks -> norm."""

    def __init__(self, ndim, in_channels, patch_spatial, token_size, dim, depth, heads, mlp_ratio=4.0,
                 norm_eps=1e-6):
        super().__init__()
        self.ndim = ndim
        self.token_size = token_size
        self.grid = tuple(s // token_size for s in patch_spatial)
        self.patch_embed = PatchEmbed(ndim, in_channels, token_size, dim)
        keep_float32(self.patch_embed.proj)  # it reads the pixels
        self.register_buffer("pos_embed", sincos_pos_embed(self.grid, dim).unsqueeze(0), persistent=False)
        norm = partial(nn.LayerNorm, eps=norm_eps)
        self.blocks = TransformerBlocks(Block(dim, heads, mlp_ratio, qkv_bias=True, norm_layer=norm)
                                        for _ in range(depth))
        self.norm = norm(dim)
        self.last_input_len = None  # tokens the blocks saw in the last forward (tests, debugging)

    def grid_of(self, x) -> tuple:
        return tuple(s // self.token_size for s in x.shape[2:])

    def position_table(self, grid) -> torch.Tensor:
        if tuple(grid) == self.grid:
            return self.pos_embed
        return sincos_pos_embed(grid, self.pos_embed.shape[-1]).unsqueeze(0).to(self.pos_embed.device)

    recompute_blocks = False  # MODEL.ACTIVATION_CHECKPOINTING (biapy.models.recompute)

    def forward(self, x, ids_keep=None, return_blocks=()):
        """x (B, C, *spatial) -> (normed tokens (B, L_seen, dim), [raw outputs of `return_blocks`]).

        With `ids_keep` (B, L_keep) only those tokens enter the transformer (MAE's encoder).
        """
        positions = self.position_table(self.grid_of(x))
        if ids_keep is None:
            tokens = self.patch_embed(x)
        else:
            tokens = self.patch_embed.embed_kept(x, ids_keep)
            positions = take_tokens(positions.expand(x.shape[0], -1, -1), ids_keep)
        tokens = tokens + positions.to(tokens.dtype)
        self.last_input_len = tokens.shape[1]
        self.blocks.pick_attention(tokens)
        feats = []
        for i, blk in enumerate(self.blocks):
            tokens = recompute.run(self, blk, tokens)
            if i in return_blocks:
                feats.append(tokens)
        return self.norm(tokens), feats


def init_vit_weights(module: nn.Module):
    """facebookresearch/mae initialization: xavier-uniform linears (and the patch projection
    seen as a linear), zero biases, unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, PatchEmbed):
            w = m.proj.weight
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
            nn.init.zeros_(m.proj.bias)


def tokens_to_map(tokens: torch.Tensor, grid) -> torch.Tensor:
    """(B, L, D) -> (B, D, *grid): a view with channels-last strides, no copy."""
    B, L, D = tokens.shape
    return tokens.transpose(1, 2).reshape(B, D, *grid)
