"""biapy.data.patches: grids cover images, reflection matches np.pad, stitching an identity is exact."""
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
