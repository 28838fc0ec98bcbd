"""Masks: exact counts, reproducibility, grid patterns, token->image and CNN block masks."""
import math

import pytest
import torch

from biapy.models.masking import (block_mask, grid_rank, grid_token_mask, hidden_count, random_token_mask,
                                  token_mask_to_image)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("L,ratio", [(16, 0.75), (49, 0.5), (10, 0.33), (64, 0.0), (8, 0.99)])
def test_random_mask_exact_count_and_consistent_indices(L, ratio):
    mask, keep, restore = random_token_mask(4, L, ratio, _gen(), None)
    n_hidden = hidden_count(L, ratio)
    assert mask.shape == (4, L) and keep.shape == (4, L - n_hidden) and restore.shape == (4, L)
    assert torch.all(mask.sum(1) == n_hidden)
    # ids_keep lists exactly the visible tokens.
    assert torch.all(torch.gather(mask, 1, keep) == 0)
    # ids_restore inverts the [visible, hidden] order.
    order = torch.argsort(restore, dim=1)
    assert torch.equal(order[:, : keep.shape[1]], keep)


def test_random_mask_differs_between_samples_and_is_reproducible():
    m1, _, _ = random_token_mask(8, 64, 0.75, _gen(3), None)
    m2, _, _ = random_token_mask(8, 64, 0.75, _gen(3), None)
    m3, _, _ = random_token_mask(8, 64, 0.75, _gen(4), None)
    assert torch.equal(m1, m2)
    assert not torch.equal(m1, m3)
    assert len({tuple(r.tolist()) for r in m1}) > 1


def test_hidden_count_bounds():
    assert hidden_count(10, 0.0) == 0
    assert hidden_count(10, 0.25) == round(2.5)
    assert hidden_count(4, 0.99) == 3  # one token always stays visible


def test_grid_2d_checkerboard_and_one_per_cell():
    m, _, _ = grid_token_mask((4, 6), 0.5, 2)
    y, x = torch.meshgrid(torch.arange(4), torch.arange(6), indexing="ij")
    assert torch.equal(m[0].reshape(4, 6), ((y + x) % 2 == 1).float())
    assert torch.equal(m[0], m[1])  # same pattern for every sample
    m, _, _ = grid_token_mask((4, 6), 0.75, 1)
    assert torch.equal(m[0].reshape(4, 6), (~((y % 2 == 0) & (x % 2 == 0))).float())


def test_grid_3d_patterns():
    g = (4, 4, 4)
    z, y, x = torch.meshgrid(*[torch.arange(4)] * 3, indexing="ij")
    m, _, _ = grid_token_mask(g, 0.875, 1)
    assert torch.equal(m[0].reshape(g), (~((z % 2 == 0) & (y % 2 == 0) & (x % 2 == 0))).float())
    m, _, _ = grid_token_mask(g, 0.5, 1)
    assert torch.equal(m[0].reshape(g), ((z + y + x) % 2 == 1).float())
    m, _, _ = grid_token_mask(g, 0.75, 1)
    assert torch.all((1 - m[0].reshape(g)).sum(dim=(1, 2)) > 0)  # every z slice keeps tokens


@pytest.mark.parametrize("grid", [(5, 7), (3, 4, 6), (1, 8, 8), (2, 2)])
@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.3, 0.5, 0.6, 0.75, 0.9, 0.99])
def test_grid_any_ratio_exact_count(grid, ratio):
    L = math.prod(grid)
    m, keep, restore = grid_token_mask(grid, ratio, 3)
    assert torch.all(m.sum(1) == hidden_count(L, ratio))
    assert torch.all(torch.gather(m, 1, keep) == 0)
    assert len(set(grid_rank(grid).tolist())) == L


def test_token_mask_to_image_2d_3d_anisotropic():
    m = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    img = token_mask_to_image(m, (2, 2), 3)
    assert img.shape == (1, 1, 6, 6)
    assert img[0, 0, 0, 0] == 0 and img[0, 0, 2, 3] == 1 and img[0, 0, 4, 0] == 1 and img[0, 0, 5, 5] == 0
    m3 = torch.arange(8.0).reshape(1, 8) % 2
    img3 = token_mask_to_image(m3, (2, 2, 2), (1, 2, 3))
    assert img3.shape == (1, 1, 2, 4, 6)
    assert img3[0, 0, 0, 0, 3] == 1 and img3[0, 0, 1, 3, 0] == 0


def test_block_mask_ratio_shape_and_reproducibility():
    mask = block_mask(4, (32, 32), 8, 0.5, _gen(1), None)
    assert mask.shape == (4, 1, 32, 32)
    assert torch.allclose(mask.mean(dim=(1, 2, 3)), torch.full((4,), 0.5))
    assert torch.equal(mask, block_mask(4, (32, 32), 8, 0.5, _gen(1), None))
    m3 = block_mask(2, (8, 16, 16), 4, 0.75, _gen(2), None)
    assert m3.shape == (2, 1, 8, 16, 16) and torch.allclose(m3.mean(), torch.tensor(0.75))
    assert torch.all(block_mask(2, (16, 16), 4, 0.0, None, None) == 0)


def test_block_mask_not_divisible_and_thin():
    mask = block_mask(3, (30, 21), 8, 0.5, _gen(0), None)
    assert mask.shape == (3, 1, 30, 21)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert 0.2 < float(mask.mean()) < 0.8
    thin = block_mask(2, (3, 16, 16), 8, 0.5, _gen(0), None)  # z shorter than the block
    assert thin.shape == (2, 1, 3, 16, 16)
    assert torch.allclose(thin.mean(dim=(1, 2, 3, 4)), torch.full((2,), 0.5))
