"""biapy.data.image_writing: dtype conversion, atomic writes, calibration kept, band-by-band writing gives the
bytes of a whole write, failed writes named."""
import numpy as np
import pytest
import tifffile
from PIL import Image

from biapy.data.image_writing import write_image
from biapy.data.io import read_image


def test_float64_and_bool_are_converted(tmp_path):
    path = write_image(tmp_path / "f.tif", np.full((4, 5, 1), 0.5), 2)
    assert read_image(path, 2).dtype == np.float32
    path = write_image(tmp_path / "b.tif", np.ones((4, 5), bool), 2)
    b = read_image(path, 2)
    assert b.dtype == np.uint8 and b.shape == (4, 5, 1) and b.min() == 1


def test_write_is_atomic_and_leaves_no_temp(tmp_path):
    write_image(tmp_path / "sub" / "x.tif", np.zeros((4, 4, 1), np.uint8), 2)
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["x.tif"]


def written_calibration(path):
    """(X, Y pixels per unit, ResolutionUnit, unit, z spacing) of a TIFF, as tifffile reads them."""
    with tifffile.TiffFile(path) as tif:
        page, meta = tif.pages[0], tif.imagej_metadata or {}
        return (tuple(round(r, 6) for r in page.resolution), int(page.resolutionunit), meta.get("unit"),
                meta.get("spacing"))


def write_calibrated(path, array, kind):
    """A calibrated input: 'imagej' (0.325 um pixels, 2D, or 0.2 um pixels and 1.5 um slices in 3D), 'ome'
    (an OME-TIFF of 0.2 um pixels, 1.5 um slices in 3D)."""
    axes = "ZYX" if array.ndim == 3 else "YX"
    if kind == "ome":
        sizes = {"PhysicalSizeX": 0.2, "PhysicalSizeY": 0.2, **({"PhysicalSizeZ": 1.5} if array.ndim == 3 else {})}
        tifffile.imwrite(path, array, photometric="minisblack", metadata={"axes": axes, **sizes})
    elif array.ndim == 2:
        tifffile.imwrite(path, array, imagej=True, resolution=((40, 13), (40, 13)),
                         metadata={"axes": axes, "unit": "um"})
    else:
        tifffile.imwrite(path, array, imagej=True, resolution=((5, 1), (5, 1)),
                         metadata={"axes": axes, "unit": "um", "spacing": 1.5})
    return path


# What an ImageJ output of each input holds: pixels per unit, ResolutionUnit NONE, unit, z spacing.
EXPECTED_CALIBRATION = {("imagej", 2): ((40 / 13, 40 / 13), "um", None), ("imagej", 3): ((5.0, 5.0), "um", 1.5),
                        ("ome", 2): ((5.0, 5.0), "um", None), ("ome", 3): ((5.0, 5.0), "um", 1.5)}


def expected_calibration(kind, ndim):
    res, unit, spacing = EXPECTED_CALIBRATION[kind, ndim]
    return tuple(round(r, 6) for r in res), 1, unit, spacing


@pytest.mark.parametrize("kind", ["imagej", "ome"])
@pytest.mark.parametrize("ndim", [2, 3])
def test_outputs_keep_the_calibration_of_their_input(tmp_path, kind, ndim):
    """The pixel size, unit and z spacing of an ImageJ or OME input are written into an output (an ImageJ
    hyperstack, as Fiji opens it calibrated), whole or slice by slice; an .ome.tif output keeps its name."""
    from biapy.data.image_axes import tiff_calibration
    from biapy.data.image_writing import write_image_slices

    shape = (3, 6, 5) if ndim == 3 else (6, 5)
    src = write_calibrated(tmp_path / f"in.{'ome.' if kind == 'ome' else ''}tif",
                           np.arange(np.prod(shape), dtype=np.uint16).reshape(shape), kind)
    calibration = tiff_calibration(src)
    want = expected_calibration(kind, ndim)
    for dtype in (np.float32, np.uint8):
        out = write_image(tmp_path / f"out_{np.dtype(dtype).name}.ome.tif", np.zeros(shape + (2,), dtype), ndim,
                          calibration=calibration)
        assert out.name.endswith(".ome.tif") and tifffile.TiffFile(out).is_imagej
        assert written_calibration(out) == want
    if ndim == 3:
        out = write_image_slices(tmp_path / "slices.tif", (np.zeros(shape[1:] + (1,), np.float32) for _ in range(3)),
                                 shape + (1,), np.float32, calibration=calibration)
        assert written_calibration(out) == want
    # Uncalibrated inputs (and non-TIFFs) have none; writing none gives tifffile's default, 1 pixel per unit.
    write_image(tmp_path / "plain.tif", np.zeros(shape + (1,), np.uint8), ndim)
    assert tiff_calibration(tmp_path / "plain.tif") is None
    assert written_calibration(tmp_path / "plain.tif")[:1] == ((1.0, 1.0),)


def _whole_array_reference(path, arr, ndim, calibration):
    """What write_image wrote before it went through `image_rows_writer`: tifffile (or PIL) given the whole array."""
    if arr.ndim == ndim:
        arr = arr[..., None]
    arr = arr.astype({np.dtype(bool): np.uint8, np.dtype(np.float64): np.float32}.get(arr.dtype, arr.dtype))
    c = arr.shape[-1]
    if path.suffix == ".png":
        Image.fromarray(arr[..., 0] if c == 1 else arr).save(path, format="PNG")
        return
    axes = ("ZYX" if ndim == 3 else "YX") if c == 1 else ("ZCYX" if ndim == 3 else "CYX")
    metadata, extra = {"axes": axes}, {}
    if calibration:
        metadata["unit"] = calibration["unit"]
        extra = {"resolution": calibration["resolution"], "resolutionunit": calibration["resolutionunit"]}
        if ndim == 3:
            metadata["spacing"] = calibration["spacing"]
    tifffile.imwrite(path, arr[..., 0] if c == 1 else np.moveaxis(arr, -1, -3),
                     imagej=arr.dtype in (np.uint8, np.uint16, np.float32), metadata=metadata,
                     photometric="minisblack", **extra)


@pytest.mark.parametrize("ndim, shape", [(2, (13, 11)), (2, (13, 11, 1)), (2, (13, 11, 2)), (2, (13, 11, 3)),
                                         (3, (4, 13, 11)), (3, (4, 13, 11, 1)), (3, (4, 13, 11, 3))])
@pytest.mark.parametrize("calibrated", [False, True])
def test_write_image_writes_the_bytes_of_the_whole_array_written_at_once(tmp_path, ndim, shape, calibrated):
    """write_image goes through the band writer: the same file, byte for byte, as tifffile (PIL for a PNG) writing
    the whole array with the same arguments, for every dtype it takes (ImageJ's and the others), a .png, .jpg
    (-> .png) or .png path that needs a .tif, and a path without an image extension (-> .tif)."""
    calibration = {"resolution": ((40, 13), (40, 13)), "resolutionunit": 1, "unit": "um", "spacing": 1.5} \
        if calibrated else None
    values = np.random.default_rng(3).random(shape) * 200
    for dtype in (np.uint8, np.uint16, np.float32, np.float64, np.int8, np.int16, np.int32, np.uint32, bool):
        arr = values.astype(dtype)
        for ext in (".tif", ".png", ".jpg", ""):
            name = f"{np.dtype(dtype).name}{ext}"
            written = write_image(tmp_path / "new" / name, arr, ndim, calibration)
            channels = 1 if len(shape) == ndim else shape[-1]
            png = ext in (".png", ".jpg") and ndim == 2 and ((arr.dtype in (np.uint8, bool) and channels in (1, 3))
                                                            or (arr.dtype == np.uint16 and channels == 1))
            assert written.name == (f"{np.dtype(dtype).name}.png" if png else f"{np.dtype(dtype).name}.tif")
            want = tmp_path / "old" / written.name
            want.parent.mkdir(exist_ok=True)
            _whole_array_reference(want, arr, ndim, None if png else calibration)
            assert written.read_bytes() == want.read_bytes(), (written.name, shape)


@pytest.mark.parametrize("ndim, shape", [(2, (13, 11, 3)), (3, (4, 13, 11, 2))])
def test_a_large_image_is_written_a_band_at_a_time_as_the_same_file(tmp_path, monkeypatch, ndim, shape):
    """Above _Rows.BAND_BYTES write_image converts and reorders the array a band at a time (a 3D image with
    channels had been copied whole to be reordered): the file is the same."""
    from biapy.data import image_writing

    arr = np.random.default_rng(4).random(shape)  # float64: converted to float32 on writing
    monkeypatch.setattr(image_writing._Rows, "BAND_BYTES", arr[0].size * 4 * 2)  # bands of 2 rows (z slices in 3D)
    bands = []
    real_write = image_writing._Rows.write
    monkeypatch.setattr(image_writing._Rows, "write",
                        lambda self, band: (bands.append(len(band)), real_write(self, band)))
    written = write_image(tmp_path / "a.tif", arr, ndim)
    _whole_array_reference(tmp_path / "b.tif", arr, ndim, None)
    assert bands == [2] * (shape[0] // 2) + [1] * (shape[0] % 2)
    assert written.read_bytes() == (tmp_path / "b.tif").read_bytes()


def test_a_big_endian_array_is_written_as_the_same_values_in_the_machines_order(tmp_path):
    """It had become a big-endian TIFF without ImageJ metadata (with one channel; one with several, a little-endian
    ImageJ one): now the file of the same values in the machine's order."""
    arr = np.arange(2 * 6 * 5, dtype=np.uint16).reshape(6, 5, 2)
    for c in (1, 2):
        big = write_image(tmp_path / f"big{c}.tif", arr[..., :c].astype(">u2"), 2)
        native = write_image(tmp_path / f"native{c}.tif", arr[..., :c], 2)
        assert big.read_bytes() == native.read_bytes() and tifffile.TiffFile(big).is_imagej


def test_a_failed_write_names_the_file_and_keeps_the_one_it_would_replace(tmp_path, monkeypatch):
    from biapy.data import image_writing
    from biapy.errors import BiapyError

    path = write_image(tmp_path / "x.tif", np.ones((4, 5), np.uint8), 2)
    before = path.read_bytes()

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(image_writing, "_write_tiff", full_disk)
    with pytest.raises(BiapyError, match=r"x\.tif: cannot write \(No space left on device\)$"):
        write_image(path, np.zeros((4, 5), np.uint8), 2)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["x.tif"]
    (tmp_path / "file").write_text("")
    with pytest.raises(BiapyError, match=r"cannot write"):
        write_image(tmp_path / "file" / "y.png", np.zeros((4, 5), np.uint8), 2)
    with pytest.raises(ValueError, match=r"write_image: array of shape \(4, 5, 6, 7\) is not a 2D channel-last"):
        write_image(tmp_path / "z.tif", np.zeros((4, 5, 6, 7), np.uint8), 2)
