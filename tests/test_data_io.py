"""biapy.data.io: listing and output stems, reading PNG/JPEG and the optional formats, shapes from headers, channel
and finite checks, bad files named, lazy opening falling back to whole reads."""
import numpy as np
import pytest
import tifffile
from PIL import Image
from skimage import io as skio

from biapy.data.image_writing import write_image
from biapy.data.io import (check_consistent_channels, check_finite, image_shape, list_images, open_image_lazy,
                           read_image)
from biapy.errors import ConfigError, DataError


def test_a_tiff_that_tifffile_reads_only_in_part_is_refused(tmp_path, monkeypatch):
    """tifffile 2026.11 zero-fills truncated or empty segments and missing pages, and says so only in an ERROR
    record of its logger (a damaged file had trained silently); emulated here on whatever tifffile is installed,
    with tifffile's logger set up as a run sets it (quiet)."""
    import logging

    from biapy.runner import setup_logging
    path = write_image(tmp_path / "a.tif", np.ones((8, 9, 1), np.uint8), 2)
    asarray = tifffile.TiffPageSeries.asarray

    def partial(self, *args, **kwargs):
        logging.getLogger("tifffile").error("<tifffile.FileHandle 'a.tif'> segments with zero byte count and "
                                            "nonzero offset are treated as empty")
        return asarray(self, *args, **kwargs)

    setup_logging(is_main=True)
    np.testing.assert_array_equal(read_image(path, 2), np.ones((8, 9, 1), np.uint8))  # an intact file reads
    monkeypatch.setattr(tifffile.TiffPageSeries, "asarray", partial)
    with pytest.raises(DataError, match=r"a\.tif: damaged TIFF, read only in part \(tifffile: .*zero byte count"):
        read_image(path, 2)


def test_png_and_jpg(tmp_path):
    rgb = np.random.default_rng(2).integers(0, 255, (16, 18, 3), dtype=np.uint8)
    grey = rgb[..., 0]
    skio.imsave(tmp_path / "rgb.png", rgb, check_contrast=False)
    skio.imsave(tmp_path / "grey.png", grey, check_contrast=False)
    np.testing.assert_array_equal(read_image(tmp_path / "rgb.png", 2), rgb)
    np.testing.assert_array_equal(read_image(tmp_path / "grey.png", 2), grey[..., None])
    smooth = np.tile(np.linspace(0, 250, 18, dtype=np.uint8), (16, 1))
    Image.fromarray(smooth).save(tmp_path / "s.jpg", quality=95)
    b = read_image(tmp_path / "s.jpg", 2)
    assert b.shape == (16, 18, 1) and np.abs(b[..., 0].astype(int) - smooth).max() <= 6
    # write_image keeps PNG for data PNG can hold, else writes a TIFF beside it
    assert write_image(tmp_path / "out.png", rgb, 2).suffix == ".png"
    assert write_image(tmp_path / "out2.png", rgb.astype(np.float32), 2).name == "out2.tif"
    # 4 channels (RGBA, or a CMYK JPEG as read): PNG holds them, JPEG does not (crappify's copy of one had failed)
    four = np.concatenate([rgb, rgb[..., :1]], axis=-1)
    assert write_image(tmp_path / "out4.png", four, 2).suffix == ".png"
    out = write_image(tmp_path / "out4.jpg", four, 2)
    assert out.name == "out4.png"
    np.testing.assert_array_equal(read_image(out, 2), four)
    # JPEG is lossy: label maps and crappified copies asked for as .jpg are written losslessly beside it
    labels = np.random.default_rng(3).integers(0, 3, (16, 18, 1), dtype=np.uint8)
    for name in ("labels.jpg", "labels2.jpeg"):
        out = write_image(tmp_path / name, labels, 2)
        assert out.suffix == ".png" and not (tmp_path / name).exists()
        np.testing.assert_array_equal(read_image(out, 2), labels)
    # PIL writes uint16 PNGs in grey only: RGB uint16 goes to a TIFF
    assert write_image(tmp_path / "g16.png", labels.astype(np.uint16) * 1000, 2).suffix == ".png"
    out = write_image(tmp_path / "rgb16.png", rgb.astype(np.uint16) * 200, 2)
    assert out.name == "rgb16.tif"
    np.testing.assert_array_equal(read_image(out, 2), rgb.astype(np.uint16) * 200)
    with pytest.raises(DataError, match="rgb.png"):
        read_image(tmp_path / "rgb.png", 3)


def test_list_images_sorted_skips_hidden_and_others(tmp_path):
    for name in ("b.tif", "a.png", ".hidden.tif", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.name for p in list_images(tmp_path, "DATA.TRAIN.PATH")] == ["a.png", "b.tif"]


def test_list_images_errors_name_key_and_folder(tmp_path):
    with pytest.raises(ConfigError, match="DATA.TRAIN.PATH.*nope"):
        list_images(tmp_path / "nope", "DATA.TRAIN.PATH")
    with pytest.raises(ConfigError, match="DATA.VAL.PATH"):
        list_images("", "DATA.VAL.PATH")
    with pytest.raises(DataError, match="DATA.TEST.PATH.*no images"):
        list_images(tmp_path, "DATA.TEST.PATH")


def test_unreadable_and_truncated_files_name_the_file(tmp_path):
    (tmp_path / "junk.tif").write_bytes(b"not a tiff at all")
    with pytest.raises(DataError, match="junk.tif"):
        read_image(tmp_path / "junk.tif", 2)
    path = write_image(tmp_path / "t.tif", np.ones((3, 40, 40, 1), np.uint16), 3)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    for fn in (read_image, open_image_lazy):
        with pytest.raises(DataError, match="t.tif"):
            fn(path, 3)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DataError, match="bad.png") as refused:
        read_image(tmp_path / "bad.png", 2)
    # The reader's first line only: imageio appends lines of plugins to install, beside the point for a broken PNG.
    assert "\n" not in str(refused.value) and "pip install" not in str(refused.value)


def test_mixed_channels_name_the_first_different_file(tmp_path):
    write_image(tmp_path / "a.tif", np.zeros((8, 8, 1), np.uint8), 2)
    write_image(tmp_path / "b.tif", np.zeros((8, 8, 1), np.uint8), 2)
    write_image(tmp_path / "c.tif", np.zeros((8, 8, 3), np.uint8), 2)
    files = list_images(tmp_path, "DATA.TRAIN.PATH")
    check_consistent_channels(files[:2], 2, "DATA.TRAIN.PATH")
    with pytest.raises(DataError, match="DATA.TRAIN.PATH.*c.tif.*3 channel"):
        check_consistent_channels(files, 2, "DATA.TRAIN.PATH")


def test_check_finite(tmp_path):
    img = np.ones((4, 4, 1), np.float32)
    check_finite(img, "ok.tif")
    img[1, 1] = np.nan
    with pytest.raises(DataError, match="nan.tif"):
        check_finite(img, "nan.tif")


def test_compressed_tiff_falls_back_to_full_read(tmp_path):
    a = np.arange(2 * 9 * 9, dtype=np.uint16).reshape(2, 9, 9)
    tifffile.imwrite(tmp_path / "z.tif", a, compression="zlib", imagej=True, metadata={"axes": "ZYX"})
    lazy = open_image_lazy(tmp_path / "z.tif", 3)
    assert isinstance(lazy, np.ndarray)
    np.testing.assert_array_equal(lazy[..., 0], a)


def test_lzw_tiffs_as_image_programs_save_them_are_read(tmp_path):
    """LZW (PIL's and many microscope programs' TIFF compression) needs imagecodecs, a requirement."""
    from PIL import Image

    a = np.random.default_rng(0).integers(0, 255, (20, 30), dtype=np.uint8)
    Image.fromarray(a).save(tmp_path / "lzw.tif", compression="tiff_lzw")
    stack = np.arange(3 * 8 * 8, dtype=np.uint16).reshape(3, 8, 8)
    tifffile.imwrite(tmp_path / "lzw3d.tif", stack, compression="lzw", imagej=True, metadata={"axes": "ZYX"})
    np.testing.assert_array_equal(read_image(tmp_path / "lzw.tif", 2)[..., 0], a)
    np.testing.assert_array_equal(open_image_lazy(tmp_path / "lzw3d.tif", 3)[..., 0], stack)


def test_optional_formats_explain_the_missing_package(tmp_path):
    try:
        import nibabel  # noqa: F401
    except ImportError:
        (tmp_path / "v.nii.gz").write_bytes(b"x")
        with pytest.raises(DataError, match="v.nii.gz.*nibabel"):
            read_image(tmp_path / "v.nii.gz", 3)
    with pytest.raises(DataError, match="notes.txt.*unsupported"):
        (tmp_path / "notes.txt").write_text("x")
        read_image(tmp_path / "notes.txt", 2)


def test_output_stems_and_their_collisions(tmp_path):
    from biapy.data.io import check_unique_stems, image_stem

    assert [image_stem(n) for n in ("a.tif", "a.ome.tif", "cell.v0.tif", "b.nii.gz", "c.PNG")] == \
        ["a", "a", "cell.v0", "b", "c"]
    check_unique_stems([tmp_path / "cell.v0.tif", tmp_path / "cell.v1.tif"], "DATA.TEST.PATH")
    with pytest.raises(DataError, match=r"DATA.TEST.PATH: cell.png and cell.tif would write the same output"):
        check_unique_stems([tmp_path / "cell.png", tmp_path / "cell.tif"], "DATA.TEST.PATH")


@pytest.mark.parametrize("mode, ext", [("L", "png"), ("L", "jpg"), ("LA", "png"), ("RGB", "png"), ("RGB", "jpg"),
                                       ("RGBA", "png"), ("I;16", "png"), ("1", "png"), ("P", "png"),
                                       ("CMYK", "jpg")])
def test_png_shape_from_its_header_is_the_shape_read(tmp_path, mode, ext, monkeypatch):
    """PNG shapes come from the header (decoding whole took 16-57x as long, twice per image before training), and
    agree with the pixels read; palette PNGs, converted on reading, and JPEGs are decoded."""
    path = tmp_path / f"im.{ext}"
    Image.fromarray(np.random.default_rng(0).integers(0, 200, (21, 33), dtype=np.uint8)).convert(mode).save(path)
    expected = read_image(path, 2).shape
    decoded = []
    imread = skio.imread
    monkeypatch.setattr(skio, "imread", lambda *a, **k: decoded.append(1) or imread(*a, **k))
    assert image_shape(path, 2) == expected
    assert bool(decoded) == (ext == "jpg" or mode == "P")


def test_a_damaged_png_is_found_by_its_shape_check(tmp_path):
    """The header alone had passed a PNG cut short: a test image so damaged had stopped the run after training."""
    path = tmp_path / "cut.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 200, (64, 64), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(DataError, match="cut.png: cannot read image"):
        image_shape(path, 2)


def test_images_over_pillows_pixel_limit_are_read_and_the_limit_is_kept(tmp_path, monkeypatch):
    """Pillow's guard against decompression bombs had refused the user's own PNGs over 179 M pixels (a 20000x20000
    one), when read and when its shape was read; it is lifted for this tool's reads only."""
    a = np.random.default_rng(0).integers(0, 200, (16, 18), dtype=np.uint8)  # 288 pixels
    Image.fromarray(a).save(tmp_path / "big.png")
    Image.fromarray(a).save(tmp_path / "big.jpg", quality=95)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # over twice the limit: an error
    decoded = []
    imread = skio.imread
    monkeypatch.setattr(skio, "imread", lambda *args, **kw: decoded.append(1) or imread(*args, **kw))
    assert image_shape(tmp_path / "big.png", 2) == (16, 18, 1) and not decoded  # from the header
    np.testing.assert_array_equal(read_image(tmp_path / "big.png", 2)[..., 0], a)
    assert read_image(tmp_path / "big.jpg", 2).shape == (16, 18, 1)
    assert Image.MAX_IMAGE_PIXELS == 100
    with pytest.raises(Image.DecompressionBombError):
        Image.open(tmp_path / "big.png")  # other code keeps the limit
