"""A 2D colour TIFF given to a 3D job: said to be a 2D image with channels, not a channel count or patch mismatch."""
import re

import numpy as np
import pytest
import tifffile

from biapy import BiaPy
from biapy.data.io import image_shape, open_image_lazy, read_image
from biapy.errors import DataError
from tests.conftest import tiny_config

RGB = np.random.default_rng(0).integers(0, 255, (64, 48, 3), dtype=np.uint8)


def _said_to_be_2d(path, channels=3):
    return re.escape(f"{path}: looks like a 2D image with {channels} channels (Y, X, C: ") + \
        r".*" + re.escape(f"but PROBLEM.NDIM is 3D; for 2D images set PROBLEM.NDIM 2D and DATA.PATCH_SIZE (y, x, "
                          f"{channels}); if it is a volume of {channels} slices, save it with its slices first, "
                          f"({channels}, Y, X), or with ImageJ axes ZYX")


@pytest.mark.parametrize("patch_channels", [3, 1])
def test_a_3d_job_given_2d_rgb_tiffs_is_told_they_are_2d_images_with_channels(tmp_path, patch_channels):
    """tifffile.imwrite of an (H, W, 3) array had read as a volume of H slices, 3 pixels wide: the job stopped on
    'has 1 channel(s) but DATA.PATCH_SIZE asks for 3' or on a patch wider than its 3 pixels of x."""
    folder = tmp_path / "x"
    folder.mkdir()
    for i in range(2):
        tifffile.imwrite(folder / f"rgb_{i}.tif", RGB)
    data = {"train": (folder, None), "test": (folder, None)}
    cfg = tiny_config(data, 3, TRAIN={"EPOCHS": 1}, TEST={"ENABLE": False})
    cfg["DATA"]["PATCH_SIZE"] = (8, 16, 16, patch_channels)
    with pytest.raises(DataError) as err:
        BiaPy(cfg, result_dir=tmp_path / "out", name="rgb", run_id=1).run_job()
    message = str(err.value)
    assert re.fullmatch(_said_to_be_2d(folder / "rgb_0.tif"), message) and "\n" not in message
    assert "shape (64, 48, 3)" in message


def test_every_reader_of_a_3d_job_says_so_and_2d_reads_it_as_before(tmp_path):
    path = tmp_path / "rgb.tif"
    tifffile.imwrite(path, RGB)
    for read in (read_image, image_shape, open_image_lazy):
        with pytest.raises(DataError, match=_said_to_be_2d(path)):
            read(path, 3)
    np.testing.assert_array_equal(read_image(path, 2), RGB)
    rgba = tmp_path / "rgba.tif"
    tifffile.imwrite(rgba, np.zeros((1, 10, 12, 4), np.uint8))  # a leading axis of 1 and 4 samples: the same
    with pytest.raises(DataError, match=_said_to_be_2d(rgba, 4)):
        image_shape(rgba, 3)


def test_an_image_with_named_axes_y_x_and_channels_in_3d_is_named_a_2d_image_too(tmp_path):
    """Its axes are named (no Z): it had been refused as 'no Z axis'."""
    rgb, channels = tmp_path / "named_rgb.tif", tmp_path / "named_cyx.tif"
    tifffile.imwrite(rgb, RGB, metadata={"axes": "YXS"})
    tifffile.imwrite(channels, np.zeros((2, 10, 12), np.uint16), metadata={"axes": "CYX"})
    with pytest.raises(DataError, match=_said_to_be_2d(rgb)):
        image_shape(rgb, 3)
    with pytest.raises(DataError, match=_said_to_be_2d(channels, 2)):
        image_shape(channels, 3)
    assert image_shape(channels, 2) == (10, 12, 2)


def test_volumes_that_only_look_alike_stay_volumes(tmp_path):
    """A 3-slice volume saved slices first and a volume of colour slices read in 3D as before."""
    slices, colour = tmp_path / "three.tif", tmp_path / "colour_volume.tif"
    tifffile.imwrite(slices, np.zeros((3, 40, 52), np.uint16))
    tifffile.imwrite(colour, np.zeros((5, 10, 12, 3), np.uint8))
    assert image_shape(slices, 3) == (3, 40, 52, 1)
    assert read_image(colour, 3).shape == (5, 10, 12, 3)
