"""The one place where masks are made. Convention everywhere: 1 = hidden.

Token masks are (B, L) float with `ids_keep` (B, L_keep), the visible token indices in the
order the encoder sees them, and `ids_restore` (B, L), which puts [visible..., hidden...] back
into grid order. Image masks are (B, 1, *spatial).

Hidden count: `hidden_count(L, ratio)` = round(L * ratio), capped at L - 1 so the encoder never
gets an empty sequence. Ratio 0 hides nothing.

Grid masking ("ordered dither"): every token gets a fixed rank from its coordinates as in a
Bayer dither matrix generalised to 2D/3D, and the tokens with the lowest ranks stay visible.
The pattern is the same for every sample and deterministic, any ratio in [0, 1) works, and
on a grid of even sides the familiar patterns come out exactly:
  ratio 0.5    checkerboard (visible tokens have an even coordinate sum);
  ratio 0.75   2D: one visible token per 2x2 cell; 3D: x even and z + y even (every z slice keeps tokens);
  ratio 0.875  3D: one visible token per 2x2x2 cell;
other ratios fill in between by the same strided order (e.g. 0.9375 in 2D keeps one token per
4x4 cell). On odd sides the pattern is cropped from the next power-of-two grid, so it stays
regular and the count is still exactly hidden_count(L, ratio).
"""
import math

import torch

from biapy.utils.transfer import made_once_per_device, queue_to_device

# Order in which the 2^ndim offsets of one cell become visible (first = visible first).
# Even-parity offsets come first (checkerboard at half), and the first quarter is a lattice.
_CELL_ORDER = {
    1: [(0,), (1,)],
    2: [(0, 0), (1, 1), (0, 1), (1, 0)],
    3: [(0, 0, 0), (1, 1, 0), (1, 0, 1), (0, 1, 1), (0, 0, 1), (1, 1, 1), (1, 0, 0), (0, 1, 0)],
}


def hidden_count(L: int, ratio: float) -> int:
    """round(L * ratio) (Python rounding), at most L - 1 so at least one token stays visible."""
    if ratio <= 0:
        return 0
    return max(0, min(int(round(L * ratio)), L - 1))


def _masks_from_order(order: torch.Tensor, n_keep: int):
    """order (B, L): token indices, the first n_keep visible. -> (mask, ids_keep, ids_restore)."""
    ids_restore = torch.argsort(order, dim=1)
    B, L = order.shape
    mask = torch.ones(B, L, device=order.device)
    mask[:, :n_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return mask, order[:, :n_keep], ids_restore


def token_noise(B: int, L: int, generator=None, device=None) -> torch.Tensor:
    """(B, L) uniform draws that decide a random token mask: from a torch.Generator (on any device), or from a
    list of B CPU generators, one per sample, whose masks then depend on their own generator alone."""
    if isinstance(generator, (list, tuple)):
        noise = torch.stack([torch.rand(L, generator=g) for g in generator])
    else:
        noise_device = generator.device if generator is not None else device
        noise = torch.rand(B, L, generator=generator, device=noise_device)
    if device is not None:
        noise = queue_to_device(noise, device)  # test and validation masks come from CPU generators
    return noise


def random_token_mask(B: int, L: int, ratio: float, generator=None, device=None, noise=None):
    """Exactly `hidden_count(L, ratio)` hidden tokens per sample, chosen independently per sample
    (argsort of uniform noise, as MAE); the noise is `token_noise(B, L, generator, device)` unless given."""
    if noise is None:
        noise = token_noise(B, L, generator, device)
    order = torch.argsort(noise, dim=1)
    return _masks_from_order(order, L - hidden_count(L, ratio))


def grid_rank(grid_shape, device=None) -> torch.Tensor:
    """(L,) int64 dither rank of every token of grid_shape (row-major), all distinct.

    The lowest coordinate bits decide the most significant digit of the rank, so neighbouring
    tokens get far-apart ranks and any prefix of the ranking is spread evenly over the grid.
    """
    n = len(grid_shape)
    cell_rank = torch.zeros((2,) * n, dtype=torch.long)
    for r, off in enumerate(_CELL_ORDER[n]):
        cell_rank[off] = r
    levels = max(1, max(math.ceil(math.log2(g)) if g > 1 else 0 for g in grid_shape))
    coords = torch.meshgrid(*[torch.arange(g) for g in grid_shape], indexing="ij")
    coords = [c.flatten() for c in coords]
    rank = torch.zeros_like(coords[0])
    for b in range(levels):  # bit b of the coordinates -> digit (levels - 1 - b) of the rank
        digit = cell_rank[tuple((c >> b) & 1 for c in coords)]
        rank += digit * (2 ** n) ** (levels - 1 - b)
    return rank.to(device)


@made_once_per_device
def _grid_order(grid_shape, device):
    return queue_to_device(torch.argsort(grid_rank(grid_shape)), device)


def grid_token_mask(grid_shape, ratio: float, B: int, device=None):
    """The regular dither pattern (see the module docstring), the same for all B samples."""
    L = math.prod(grid_shape)
    grid_shape = tuple(int(g) for g in grid_shape)
    # A copy, also for B == 1: the cached order is never handed out.
    order = _grid_order(grid_shape, device=device).unsqueeze(0).repeat(B, 1)
    return _masks_from_order(order, L - hidden_count(L, ratio))


def _as_tuple(value, n):
    return tuple(int(v) for v in value) if isinstance(value, (tuple, list)) else (int(value),) * n


def token_mask_to_image(mask: torch.Tensor, grid, token_size) -> torch.Tensor:
    """(B, L) token mask -> (B, 1, *spatial) with every token's pixels set to its value."""
    n = len(grid)
    t = _as_tuple(token_size, n)
    B = mask.shape[0]
    # (B, 1, g0, 1, g1, 1, ...) expanded to (B, 1, g0, t0, g1, t1, ...) then merged: one copy.
    view, full = [B, 1], [B, 1]
    for g, k in zip(grid, t):
        view += [g, 1]
        full += [g, k]
    m = mask.reshape(view).expand(full)
    return m.reshape(B, 1, *[g * k for g, k in zip(grid, t)])


def block_mask(B: int, spatial, block_size, ratio: float, generator=None, device=None) -> torch.Tensor:
    """Random block mask for CNN masking: (B, 1, *spatial) float, 1 = hidden.

    The image is tiled by blocks of `block_size` pixels per side (cubic in 3D; clipped to an
    axis shorter than the block); hidden_count(n_blocks, ratio) blocks are hidden per sample,
    chosen independently per sample. Where a side is not a multiple of the block, the grid is
    rounded up and the mask cropped, so a last partial block is hidden or kept as a whole and
    the hidden pixel fraction matches the ratio exactly only when the blocks tile the patch.
    """
    spatial = tuple(int(s) for s in spatial)
    bs = tuple(min(b, s) for b, s in zip(_as_tuple(block_size, len(spatial)), spatial))
    grid = tuple(-(-s // b) for s, b in zip(spatial, bs))
    if ratio <= 0:
        return torch.zeros(B, 1, *spatial, device=device)
    mask, _, _ = random_token_mask(B, math.prod(grid), ratio, generator, device)
    img = token_mask_to_image(mask, grid, bs)
    return img[(slice(None), slice(None), *[slice(0, s) for s in spatial])]
