"""biapy.workflows.border_views: the pixels a masked test input saw as mirror copies beyond the image border."""
import itertools

import numpy as np
import pytest
import torch

from biapy.data.patches import grid_starts, reflect_indices
from biapy.workflows import border_views
from biapy.workflows.border_views import BorderViews


def seen_pixel_by_pixel(spatial, shape, padding, views):
    """The reference: for each (start, visible) view, every visible patch pixel beyond the border, followed to
    the image pixel it mirrors, kept where that view's output counts."""
    seen = np.zeros(spatial, bool)
    for start, visible in views:
        index = [reflect_indices(s, p, n) for s, p, n in zip(start, shape, spatial)]
        for pos in itertools.product(*(range(p) for p in shape)):
            coord = [s + i for s, i in zip(start, pos)]
            if not visible[pos] or all(0 <= c < n for c, n in zip(coord, spatial)):
                continue
            target = tuple(int(ix[i]) for ix, i in zip(index, pos))
            if all(s + d <= t < s + p - d for t, s, p, d in zip(target, start, shape, padding)):
                seen[target] = True
    return seen


@pytest.mark.parametrize("spatial, shape, overlap, padding, batch", [
    ((12, 10), (16, 16), (0.5, 0.5), (0, 0), 3),       # an image smaller than the patch
    ((40, 36), (16, 16), (0.5, 0.5), (2, 3), 4),       # test padding at the border
    ((9, 20, 18), (8, 8, 8), (0.0, 0.5, 0.25), (1, 2, 0), 5),
])
def test_marked_pixels_match_a_pixel_by_pixel_reading(spatial, shape, overlap, padding, batch):
    starts = grid_starts(spatial, shape, overlap, padding)
    rng = torch.Generator().manual_seed(0)
    views = BorderViews(starts, shape, padding, spatial)
    masks = []
    for k in range(0, len(starts), batch):
        mask = (torch.rand((min(batch, len(starts) - k), 1) + shape, generator=rng) < 0.5).float()
        views.note(mask)
        masks.extend(m[0].numpy() < 0.5 for m in mask)
    want = seen_pixel_by_pixel(spatial, shape, padding, zip(starts, masks))
    assert want.any() and not want.all()
    np.testing.assert_array_equal(views.marked(), want)
    np.testing.assert_array_equal(views.marked(), want)  # asked again: the same, nothing read twice


def test_only_batches_with_a_view_beyond_the_border_are_read(monkeypatch):
    copies, reads = [], []

    class Counted(border_views.HostCopy):
        def __init__(self, t):
            copies.append(t.shape[0])
            super().__init__(t)

        def numpy(self):
            reads.append(self)
            return super().numpy()

    monkeypatch.setattr(border_views, "HostCopy", Counted)
    spatial, shape = (64, 64), (16, 16)
    starts = grid_starts(spatial, shape, (0.0, 0.0), (0, 0))  # 4x4 patches, all inside the image
    views = BorderViews(starts, shape, (0, 0), spatial)
    for k in range(0, 16, 4):
        views.note(torch.zeros(4, 1, *shape))
    assert copies == [] and not views.marked().any()
    # The same grid over a smaller image: its last row and column of patches leave it.
    views = BorderViews(starts, shape, (0, 0), (60, 60))
    for k in range(0, 16, 4):
        views.note(torch.zeros(4, 1, *shape))
    assert copies == [4, 4, 4, 4]  # every row of 4 patches ends beyond the border
    assert len(reads) == 3  # each batch's mask is read one batch later: two held at most, whatever the image
    # Pixels 60..63 of the last patches mirror rows (and columns) 58..55, all visible.
    want = np.zeros((60, 60), bool)
    want[55:59], want[:, 55:59] = True, True
    np.testing.assert_array_equal(views.marked(), want)
    assert len(reads) == 4
    views.closed = True
    views.note(torch.zeros(4, 1, *shape))  # after the image's pass: not one of its inputs
    assert copies == [4, 4, 4, 4]
