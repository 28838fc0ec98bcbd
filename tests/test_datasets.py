"""biapy.data.datasets: item layout, lazy == in-memory, epochs, grid mode, bad inputs."""
import numpy as np
import pytest
import torch

from biapy.config.defaults import get_defaults
from biapy.data.augmentation import Augmentor
from biapy.data.datasets import PatchDataset, _BandView, banded
from biapy.data.image_writing import write_image
from biapy.data.normalization import Normalizer
from biapy.data.splits import Band
from biapy.errors import DataError


def _write(folder, shapes, ndim, channels=1, dtype=np.uint16, seed=0):
    rng = np.random.default_rng(seed)
    return [write_image(folder / f"im{i}.tif", (rng.random(tuple(s) + (channels,)) * 1000).astype(dtype), ndim)
            for i, s in enumerate(shapes)]


def _labels(folder, shapes, ndim, dtype=np.uint8):
    rng = np.random.default_rng(9)
    return [write_image(folder / f"im{i}.tif", rng.integers(0, 3, tuple(s) + (1,)).astype(dtype), ndim)
            for i, s in enumerate(shapes)]


@pytest.mark.parametrize("ndim,shapes,patch", [
    (2, [(37, 29), (20, 45)], (16, 16, 2)), (3, [(9, 21, 19), (6, 17, 30)], (4, 8, 8, 2))])
def test_lazy_and_in_memory_give_identical_patches(tmp_path, ndim, shapes, patch):
    files = _write(tmp_path, shapes, ndim, channels=2)
    kw = dict(ndim=ndim, patch=patch, normalizer=Normalizer(), target_mode="same", seed=4)
    mem = PatchDataset(files, None, in_memory=True, **kw)
    lazy = PatchDataset(files, None, in_memory=False, **kw)
    assert len(mem) == len(lazy) > 0
    for epoch in (0, 3):
        mem.set_epoch(epoch)
        lazy.set_epoch(epoch)
        for i in range(len(mem)):
            (xm, ym), (xl, yl) = mem[i], lazy[i]
            assert xm.shape == (2,) + patch[:-1] and xm.dtype == torch.float32
            torch.testing.assert_close(xm, xl, rtol=0, atol=0)
            assert int(ym) == int(yl) == i  # 'same' mode: the sample's index (masking seeds its masks by it)
    # a fresh epoch draws fresh crops, the same epoch repeats them
    mem.set_epoch(0)
    first = torch.stack([mem[i][0] for i in range(len(mem))])
    mem.set_epoch(1)
    assert not torch.equal(first, torch.stack([mem[i][0] for i in range(len(mem))]))
    mem.set_epoch(0)
    assert torch.equal(first, torch.stack([mem[i][0] for i in range(len(mem))]))


def test_default_length_patches_per_image_and_grid_mode(tmp_path):
    files = _write(tmp_path, [(32, 48), (20, 16)], 2)
    kw = dict(ndim=2, patch=(16, 16), normalizer=Normalizer(), target_mode="same")
    assert len(PatchDataset(files, None, **kw)) == 2 * 3 + 2 * 1
    assert len(PatchDataset(files, None, patches_per_image=5, **kw)) == 10
    grid = PatchDataset(files, None, random_patches=False, overlap=(0.5, 0.5), **kw)
    assert len(grid) == 3 * 5 + 2 * 1
    # grid items are the exact regions of the normalized image
    whole = grid.normalizer.normalize(np.asarray(grid.image(0)), grid.sources[0].stats)
    torch.testing.assert_close(grid[1][0][0], torch.from_numpy(whole[0:16, 8:24, 0]))
    assert [s.path for s in grid.sources] == files and grid.sources[0].shape == (32, 48, 1)


def test_image_target_is_normalized_with_input_stats(tmp_path):
    x = _write(tmp_path / "x", [(20, 20)], 2, seed=1)
    y = _write(tmp_path / "y", [(20, 20)], 2, seed=2)
    n = Normalizer()
    ds = PatchDataset(x, y, 2, (20, 20), n, "image")
    xb, yb = ds[0]
    st = ds.sources[0].stats
    from biapy.data.io import read_image

    want = n.normalize(read_image(y[0], 2), st)
    torch.testing.assert_close(yb, torch.from_numpy(np.moveaxis(want, -1, 0).copy()))


def test_labels_are_int64_and_aligned(tmp_path):
    shapes = [(24, 24)]
    x = _write(tmp_path / "x", shapes, 2)
    y = _labels(tmp_path / "y", shapes, 2)
    cfg = get_defaults().AUGMENTOR
    cfg.ENABLE, cfg.DA_PROB, cfg.VFLIP, cfg.ROT90 = True, 1.0, True, True
    ds = PatchDataset(x, y, 2, (16, 16, 1), Normalizer("div"), "label", augmentor=Augmentor(cfg, 2), in_memory=False)
    xb, yb = ds[0]
    assert xb.shape == (1, 16, 16) and yb.shape == (16, 16) and yb.dtype == torch.int64
    assert set(np.unique(yb.numpy())) <= {0, 1, 2}


def test_small_images_are_reflected_or_rejected(tmp_path):
    files = _write(tmp_path, [(5, 7)], 2)
    ds = PatchDataset(files, None, 2, (16, 16), Normalizer(), "same")
    assert ds[0][0].shape == (1, 16, 16)
    with pytest.raises(DataError, match="im0.tif.*smaller"):
        PatchDataset(files, None, 2, (16, 16), Normalizer(), "same", reflect_to_complete=False)


def test_bad_inputs_name_the_file(tmp_path):
    x = _write(tmp_path / "x", [(16, 16), (16, 16)], 2)
    wrong = _labels(tmp_path / "wrong", [(16, 16), (16, 15)], 2)
    with pytest.raises(DataError, match=r"wrong/im1.tif.*shape"):
        PatchDataset(x, wrong, 2, (8, 8), Normalizer(), "label")
    floats = [write_image(tmp_path / "f" / f"im{i}.tif", np.full((16, 16, 1), 0.5, np.float32), 2) for i in range(2)]
    with pytest.raises(DataError, match=r"f/im0.tif.*integer"):
        PatchDataset(x, floats, 2, (8, 8), Normalizer(), "label")
    nan = np.ones((16, 16, 1), np.float32)
    nan[3, 3] = np.nan
    bad = [write_image(tmp_path / "nan.tif", nan, 2)]
    for in_memory in (True, False):
        with pytest.raises(DataError, match="nan.tif.*NaN"):
            PatchDataset(bad, None, 2, (8, 8), Normalizer(), "same", in_memory=in_memory)
    mixed = x[:1] + _write(tmp_path / "rgb", [(16, 16)], 2, channels=3)
    with pytest.raises(DataError, match="rgb/im0.tif"):
        PatchDataset(mixed, None, 2, (8, 8), Normalizer(), "same")
    with pytest.raises(DataError, match="im0.tif.*3 channel"):
        PatchDataset(mixed[1:], None, 2, (8, 8, 1), Normalizer(), "same")


def test_dataloader_with_workers_sees_the_epoch(tmp_path):
    files = _write(tmp_path, [(40, 40)], 2)
    ds = PatchDataset(files, None, 2, (16, 16), Normalizer(), "same", patches_per_image=4)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=1, persistent_workers=True)
    ds.set_epoch(2)
    batch = next(iter(loader))[0]
    torch.testing.assert_close(batch, torch.stack([ds[i][0] for i in range(4)]))
    ds.set_epoch(3)
    batch3 = next(iter(loader))[0]
    torch.testing.assert_close(batch3, torch.stack([ds[i][0] for i in range(4)]))


@pytest.mark.parametrize("target_mode", ["same", "image"])
def test_z_flip_of_a_one_slice_patch_gives_a_tensor(tmp_path, target_mode):
    """Flipping a length-1 axis leaves a negative stride numpy calls contiguous (no copy) and torch refused."""
    img = np.random.default_rng(0).integers(0, 255, (6, 20, 20, 1)).astype(np.uint8)
    path = write_image(tmp_path / "v.tif", img, 3)
    aug = get_defaults().AUGMENTOR
    aug.ENABLE, aug.ZFLIP, aug.DA_PROB = True, True, 1.0
    ds = PatchDataset([path], [path] if target_mode == "image" else None, 3, (1, 8, 8), Normalizer(), target_mode,
                      augmentor=Augmentor(aug, 3))
    ds.set_epoch(0)
    x, y = ds[0]
    assert x.shape == (1, 1, 8, 8) and all(s > 0 for s in x.stride())
    assert y.shape == ((1, 1, 8, 8) if target_mode == "image" else ())  # 'same': the sample's index


def test_same_mode_batches_carry_the_input_once(tmp_path):
    """Masking's target is its input: batches hold x beside the samples' indices, not a second copy to
    collate, pass between processes, pin and send to the device."""
    files = _write(tmp_path / "x", [(32, 32)], 2, seed=3)
    ds = PatchDataset(files, None, 2, (16, 16), Normalizer(), "same", patches_per_image=4)
    ds.set_epoch(0)
    x, y = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert x.shape == (4, 1, 16, 16) and y.tolist() == [0, 1, 2, 3]
    torch.testing.assert_close(x, torch.stack([ds[i][0] for i in range(4)]))


def test_lazy_reading_says_once_which_images_it_holds_whole(tmp_path, caplog):
    """IN_MEMORY False on images that cannot be read by regions (a PNG here; compressed TIFFs without zarr):
    one line for the dataset, where a --verbose run had logged one per file and a plain one nothing."""
    import logging

    files = _write(tmp_path, [(40, 40)], 2, dtype=np.uint8)
    files.append(write_image(tmp_path / "flat.png", np.zeros((40, 40, 1), np.uint8), 2))
    kw = dict(ndim=2, patch=(16, 16, 1), normalizer=Normalizer(), target_mode="same")
    with caplog.at_level(logging.DEBUG):
        PatchDataset(files, None, in_memory=False, **kw)
        PatchDataset(files, None, in_memory=True, **kw)
    lines = [r.getMessage() for r in caplog.records if "cannot be read a region at a time" in r.getMessage()]
    assert lines == ["1 of 2 images cannot be read a region at a time (compressed TIFF without zarr installed, "
                     "PNG/JPEG, NIfTI): held in memory whole"]
    assert not [r for r in caplog.records if "memory-mapped" in r.getMessage()]


@pytest.mark.parametrize("axis", [0, 1])
def test_a_band_reads_as_an_image_of_its_own_lazy_or_in_memory(tmp_path, axis):
    """`banded`: a band of rows 5..14 of one axis; a lazily opened image stays lazy and is sliced as the array."""
    from biapy.data.io import open_image_lazy, read_image

    path = _write(tmp_path, [(9, 20, 12)], 3, channels=2)[0]
    band = Band(axis, 5, 15) if axis else Band(0, 3, 7)
    whole = read_image(path, 3)
    mem, lazy = banded(whole, band), banded(open_image_lazy(path, 3), band)
    assert isinstance(lazy, _BandView) and lazy.shape == mem.shape and lazy.dtype == mem.dtype
    assert mem.base is None  # a copy: the whole image is not kept alive by its band
    for key in [..., (slice(1, 3), slice(None), slice(2, 9)), (slice(0, None, 2), ...), (1,), (-1, slice(2, 5)),
                (slice(2, 100),), (slice(None), slice(None), slice(None), slice(1, 2))]:
        assert np.array_equal(np.asarray(lazy[key]), mem[key]), key
    with pytest.raises(IndexError):
        lazy[mem.shape[0]]
    assert banded(whole, None) is whole


