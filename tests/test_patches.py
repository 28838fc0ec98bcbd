"""biapy.data.patches: grids cover images, reflection matches np.pad, stitching an identity is exact."""
import itertools

import numpy as np
import pytest
import torch

from biapy.data.patches import blend_window, extract_patch, grid_starts, predict_whole, reflect_indices
from biapy.errors import ConfigError


def test_reflect_indices_match_numpy_pad():
    for size in (1, 2, 5):
        a = np.arange(size)
        padded = np.pad(a, 7, mode="reflect")
        np.testing.assert_array_equal(a[reflect_indices(-7, size + 14, size)], padded)


@pytest.mark.parametrize("shape,patch,start", [
    ((10, 9, 2), (4, 4), (8, -2)), ((3, 3, 1), (8, 8), (-2, 0)), ((5, 7, 6, 1), (4, 4, 4), (-1, 5, 3))])
def test_extract_patch_reflects_like_np_pad(shape, patch, start):
    img = np.random.default_rng(0).random(shape)
    n = len(patch)
    pad = 20
    padded = np.pad(img, [(pad, pad)] * n + [(0, 0)], mode="reflect")
    want = padded[tuple(slice(s + pad, s + pad + p) for s, p in zip(start, patch))]
    got = extract_patch(img, start, patch)
    assert got.shape == tuple(patch) + (shape[-1],)
    np.testing.assert_array_equal(got, want)


def test_grid_covers_the_image_with_kept_centres():
    for size, p, ov, pad in [(50, 16, 0.0, 0), (50, 16, 0.5, 0), (50, 16, 0.25, 3), (9, 16, 0.0, 2), (16, 16, 0, 0)]:
        starts = [s[0] for s in grid_starts((size,), (p,), (ov,), (pad,))]
        covered = np.zeros(size, bool)
        for s in starts:
            covered[max(0, s + pad):min(size, s + p - pad)] = True
        assert covered.all(), (size, p, ov, pad, starts)
        assert starts[0] == -pad
    assert grid_starts((32, 32), (16, 16)) == [(0, 0), (0, 16), (16, 0), (16, 16)]


def test_bad_overlap_or_padding_are_config_errors():
    with pytest.raises(ConfigError, match="OVERLAP"):
        grid_starts((20, 20), (8, 8), (1.0, 0), (0, 0))
    with pytest.raises(ConfigError, match="PADDING"):
        grid_starts((20, 20), (8, 8), (0, 0), (4, 0))


def test_window_is_positive_on_kept_region_and_zero_on_padding():
    w = blend_window((10, 12), (2, 0))
    assert w.shape == (10, 12)
    assert (w[2:8] > 0).all() and (w[:2] == 0).all() and (w[8:] == 0).all()


CASES = [  # (spatial, patch, overlap, padding)
    ((37, 29), (16, 16), (0, 0), (0, 0)),
    ((37, 29), (16, 16), (0.5, 0.5), (0, 0)),
    ((41, 23), (16, 8), (0.25, 0.5), (3, 2)),
    ((7, 5), (16, 16), (0, 0), (0, 0)),  # smaller than the patch
    ((16, 16), (16, 16), (0.5, 0.5), (2, 2)),  # patch == image
    ((9, 21, 19), (4, 8, 8), (0, 0, 0), (0, 0, 0)),
    ((9, 21, 19), (4, 8, 8), (0.5, 0.5, 0.5), (1, 2, 2)),
    ((3, 5, 7), (4, 8, 8), (0, 0, 0), (0, 1, 1)),  # smaller than the patch, 3D
]


@pytest.mark.parametrize("spatial,patch,overlap,padding", CASES)
def test_identity_stitching_is_exact(spatial, patch, overlap, padding):
    img = torch.from_numpy(np.random.default_rng(1).random((2,) + spatial).astype(np.float32))
    calls = []

    def identity(batch):
        calls.append(batch.shape[0])
        assert tuple(batch.shape[2:]) == patch
        return batch

    out = predict_whole(img, identity, patch, overlap, padding, batch_size=3)
    assert out.shape == img.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, img, rtol=1e-6, atol=1e-6)
    assert max(calls) <= 3


def test_output_channels_may_differ_and_blending_is_smooth():
    img = torch.rand(1, 40, 40)
    # a per-patch constant output: overlapping windows must blend it continuously
    out = predict_whole(img, lambda b: torch.ones(b.shape[0], 3, *b.shape[2:]) * b.mean(dim=(1, 2, 3),
                                                                                      keepdim=True),
                        (16, 16), (0.5, 0.5), (0, 0), batch_size=4)
    assert out.shape == (3, 40, 40)
    jumps = (out[0, 1:] - out[0, :-1]).abs().max()
    spread = out.max() - out.min()
    assert jumps < spread  # no hard seam between patches


def test_every_pixel_is_the_window_weighted_mean_of_the_patches_over_it():
    """Each patch predicts one value (its own number): a pixel's result is the sin^2-window-weighted mean of
    the numbers of the patches covering it (a flat window had passed the smoothness test above)."""
    from biapy.data.patches import blend_window, grid_starts

    spatial, patch, overlap, padding = (40, 36), (16, 16), (0.5, 0.5), (2, 1)
    starts = grid_starts(spatial, patch, overlap, padding)
    numbers = iter(range(len(starts)))

    def numbered(batch):
        return torch.stack([torch.full(batch.shape[1:], float(next(numbers))) for _ in batch])

    out = predict_whole(torch.rand(1, *spatial), numbered, patch, overlap, padding, batch_size=3)
    axes = []
    for p, d in zip(patch, padding):  # sin^2 over the kept centre, floored at 1e-2; 0 on the padding
        axis = np.zeros(p)
        axis[d:p - d] = np.maximum(np.sin(np.pi * (np.arange(p - 2 * d) + 0.5) / (p - 2 * d)) ** 2, 1e-2)
        axes.append(axis)
    window = torch.from_numpy(np.outer(*axes)).float()
    torch.testing.assert_close(window, blend_window(patch, padding))
    total, weight = torch.zeros(spatial), torch.zeros(spatial)
    for k, (y, x) in enumerate(starts):  # the patches in the order they are predicted
        ys, xs = slice(max(y, 0), min(y + 16, 40)), slice(max(x, 0), min(x + 16, 36))
        w = window[ys.start - y:ys.stop - y, xs.start - x:xs.stop - x]
        total[ys, xs] += w * k
        weight[ys, xs] += w
    torch.testing.assert_close(out[0], total / weight)


@pytest.mark.parametrize("shape", [(2, 1, 8, 8), (1, 2, 6, 10), (1, 1, 4, 8, 8), (2, 1, 3, 6, 10)])
def test_test_time_augmentation_undoes_every_view(shape):
    from biapy.data.patches import predict_augmented

    batch = torch.randn(shape)
    seen = []

    def equivariant(v):
        seen.append(tuple(v.shape))
        return v * 2

    np.testing.assert_allclose(predict_augmented(equivariant, batch).numpy(), (batch * 2).numpy(), atol=1e-6)
    square = shape[-1] == shape[-2]
    assert len(seen) == (8 if square else 4) and all(s == tuple(shape) for s in seen)
    # A position-dependent output (a ramp along X) averages to its mean over the views only if each
    # view is turned back correctly: X-1-j after a flip, the Y ramp after a quarter turn...
    ramp = torch.arange(shape[-1], dtype=torch.float32)

    def biased(v):
        return v + torch.arange(v.shape[-1], dtype=torch.float32)

    out = predict_augmented(biased, batch)
    np.testing.assert_allclose((out - batch).numpy(), np.full(shape, float(ramp.mean())), atol=1e-5)


@pytest.mark.parametrize("spatial,divisor", [((13, 22), (8, 8)), ((5, 9, 16), (2, 4, 4))])
def test_full_image_prediction_pads_to_the_divisor_and_crops_back(spatial, divisor):
    from biapy.data.patches import predict_full

    img = torch.randn((2,) + spatial)
    seen = []

    def identity(b):
        seen.append(tuple(b.shape[2:]))
        return b

    out = predict_full(img, identity, divisor)
    assert torch.equal(out, img)
    assert len(seen) == 1 and all(s % d == 0 and s >= n for s, d, n in zip(seen[0], divisor, spatial))


def _canvas_reference(img, predict_fn, patch, overlap, padding):
    """Stitching done the plain way: a mirrored canvas and a weight image (what predict_slabs avoids)."""
    from biapy.data.patches import axis_starts

    spatial = img.shape[1:]
    axes = [axis_starts(s, p, o, d) for s, p, o, d in zip(spatial, patch, overlap, padding)]
    before = [max(0, -min(a)) for a in axes]
    after = [max(0, max(a) + p - s) for a, p, s in zip(axes, patch, spatial)]
    canvas = np.pad(img.numpy(), [(0, 0)] + list(zip(before, after)), mode="reflect")
    window = blend_window(patch, padding).numpy()
    acc, weight = None, np.zeros(canvas.shape[1:], np.float64)
    for start in itertools.product(*axes):
        region = tuple(slice(s + b, s + b + p) for s, b, p in zip(start, before, patch))
        out = predict_fn(torch.from_numpy(np.ascontiguousarray(canvas[(slice(None),) + region]))[None])[0].numpy()
        if acc is None:
            acc = np.zeros((out.shape[0],) + canvas.shape[1:], np.float64)
        acc[(slice(None),) + region] += out * window
        weight[region] += window
    inside = tuple(slice(b, b + s) for b, s in zip(before, spatial))
    return (acc[(slice(None),) + inside] / weight[inside]).astype(np.float32)


@pytest.mark.parametrize("spatial,patch,overlap,padding", CASES)
def test_streamed_slabs_match_plain_stitching_and_read_each_row_once(spatial, patch, overlap, padding):
    from biapy.data.patches import predict_slabs

    torch.manual_seed(0)
    conv = (torch.nn.Conv3d if len(spatial) == 3 else torch.nn.Conv2d)(2, 3, 3, padding=1)
    img = torch.from_numpy(np.random.default_rng(2).random((2,) + spatial).astype(np.float32))
    reads = []

    def read(lo, hi):
        reads.append((lo, hi))
        return img[:, lo:hi].clone()

    with torch.no_grad():
        slabs = list(predict_slabs(read, spatial, conv, patch, overlap, padding, batch_size=3))
        expected = _canvas_reference(img, conv, patch, overlap, padding)
    assert [s for s, _ in slabs] == list(np.cumsum([0] + [sl.shape[1] for _, sl in slabs[:-1]]))
    got = torch.cat([sl for _, sl in slabs], dim=1)
    assert got.shape == (3,) + spatial
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-5)
    # Rows are read in order, each once, a patch's depth or so at a time; the whole image is never read
    # at once when it is deeper than a patch and a patch row.
    rows = [r for lo, hi in reads for r in range(lo, hi)]
    assert rows == sorted(set(rows)) == list(range(spatial[0]))
    if spatial[0] > 2 * patch[0]:
        assert len(slabs) > 1 and max(hi - lo for lo, hi in reads) <= patch[0]


@pytest.mark.parametrize("size", [1, 2, 3, 7])
def test_mirrored_runs_equal_reflect_indices_on_every_axis(size):
    """Mirroring by narrowed and flipped runs gives exactly the pixels numpy's 'reflect' padding gives, on
    any axis, for patches reaching past one or both ends, several times over for tiny images."""
    from biapy.data.patches import _mirror

    img = torch.arange(2 * size * 5 * size, dtype=torch.float32).reshape(2, size, 5, size)
    for axis in (1, 3):
        for start in range(-2 * size - 3, size + 2):
            for length in (1, 2, size, 2 * size + 5):
                idx = torch.from_numpy(reflect_indices(start, length, size))
                torch.testing.assert_close(_mirror(img, axis, start, length), img.index_select(axis, idx))
