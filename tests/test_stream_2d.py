"""2D test images are streamed as 3D volumes are: opened lazily (uncompressed TIFF), predicted, written and scored a
band of rows at a time, with the files and scores of the whole-image path."""
import csv
import functools
import tracemalloc

import numpy as np
import pytest
import tifffile

from biapy import BiaPy
from biapy.data.image_axes import plain_plan, tiff_calibration
from biapy.data.image_writing import write_image
from biapy.data.io import read_image
from biapy.data.lazy_images import LazyStore
from biapy.data.synthetic import nuclei_image
from tests.conftest import tiny_config

SHAPE = (512, 480)  # test image: several patch rows and scoring slabs; fixed costs (imports) well below it


def _run(cfg, tmp_path, name):
    return BiaPy(cfg, result_dir=tmp_path / "out", name=name, run_id=1).run_job()


def _test_folders(root, compress_too=True, names=("big.tif",)):
    """test/x (uncompressed, calibrated, read lazily), test_z/x (the same pixels zlib-compressed: read whole) and
    their labels."""
    image, labels = nuclei_image(SHAPE, 40, radius=(3, 6), seed=7)
    image = image[..., 0].astype(np.uint16) * 11
    kinds = {"test": None, "test_z": "zlib"} if compress_too else {"test": None}
    for split, compression in kinds.items():
        for sub, arr in (("x", image), ("y", labels.astype(np.uint8))):
            (root / split / sub).mkdir(parents=True)
            for name in names:
                tifffile.imwrite(root / split / sub / name, arr, imagej=compression is None,
                                 compression=compression, resolution=((40, 13), (40, 13)), resolutionunit=1,
                                 metadata={"axes": "YX", "unit": "um"})
    return {split: (root / split / "x", root / split / "y") for split in kinds}


def _metrics(job):
    with open(job.metrics_csv) as fh:
        return list(csv.DictReader(fh))


def _train(data2d, tmp_path, **sections):
    sections = {**sections, "TEST": {**sections.get("TEST", {}), "ENABLE": False}}
    return _run(tiny_config(data2d, 2, TRAIN={"EPOCHS": 1}, **sections), tmp_path, "trained")


def _test_only(data2d, trained, folder, tmp_path, name, in_memory=False, **sections):
    sections["DATA"] = {**sections.get("DATA", {}), "TEST": {"PATH": str(folder[0]), "GT_PATH": str(folder[1]),
                                                             "IN_MEMORY": in_memory}}
    sections["MODEL"] = {**sections.get("MODEL", {}), "LOAD_CHECKPOINT": True}
    cfg = tiny_config(data2d, 2, TRAIN={"ENABLE": False}, PATHS={"CHECKPOINT_FILE": str(trained.checkpoint("best"))},
                      **sections)
    return _run(cfg, tmp_path, name)


TASKS = {
    "crappify": {"PROBLEM": {"SELF_SUPERVISED": {"PRETEXT_TASK": "crappify"}}},
    "masking": {"PROBLEM": {"SELF_SUPERVISED": {"PRETEXT_TASK": "masking", "MASK_BLOCK_SIZE": 4}}},
    "segmentation": {"PROBLEM": {"TYPE": "SEMANTIC_SEG"}, "MODEL": {"N_CLASSES": 2},
                     "TEST": {"SAVE_PROBABILITIES": True, "METRICS": ["iou", "dice"]}},
}


def _workflows():
    from biapy.workflows.crappify import CrappifyWorkflow
    from biapy.workflows.masking import MaskingWorkflow
    from biapy.workflows.segmentation import SegmentationWorkflow

    return {"crappify": CrappifyWorkflow, "masking": MaskingWorkflow, "segmentation": SegmentationWorkflow}


WORKFLOWS = _workflows()


def _task(task, data2d):
    sections = {k: dict(v) for k, v in TASKS[task].items()}
    if task == "segmentation":
        sections["DATA"] = {"TRAIN": {"GT_PATH": str(data2d["train"][1])}}
    return sections


@pytest.mark.parametrize("task", ["crappify", "masking", "segmentation"])
def test_a_lazily_read_2d_image_gives_the_files_and_scores_of_one_read_whole(task, data2d, tmp_path, monkeypatch):
    """The uncompressed image (streamed) and a compressed copy (read whole without zarr; crappify: the image read
    whole by DATA.TEST.IN_MEMORY, as a copy gets noise of its own): the same pixels, dtype, axes and calibration in
    every output, the same scores; a small scoring slab changes no score."""
    import biapy.workflows.scoring as scoring

    folders = _test_folders(tmp_path / "data")
    sections = _task(task, data2d)
    trained = _train(data2d, tmp_path, **sections)
    whole = _test_only(data2d, trained, folders["test" if task == "crappify" else "test_z"], tmp_path, "whole",
                       in_memory=task == "crappify", **sections)
    monkeypatch.setattr(scoring, "_SLAB_VOXELS", 3000)  # SSIM's halo crosses many slab boundaries
    streamed = _test_only(data2d, trained, folders["test"], tmp_path, "streamed", **sections)
    outputs = sorted(p.name for p in whole.per_image.iterdir())
    assert outputs == sorted(p.name for p in streamed.per_image.iterdir())  # no temporary file left
    assert len(outputs) == (2 if task == "segmentation" else 1)
    for name in outputs:
        a, b = whole.per_image / name, streamed.per_image / name
        with tifffile.TiffFile(a) as ta, tifffile.TiffFile(b) as tb:
            assert ta.series[0].axes == tb.series[0].axes and ta.is_imagej and tb.is_imagej
            np.testing.assert_array_equal(tb.asarray(), ta.asarray())
            assert tb.asarray().dtype == ta.asarray().dtype
        assert tiff_calibration(b) == tiff_calibration(a) == tiff_calibration(folders["test"][0] / "big.tif")
    (w,), (s,) = _metrics(whole), _metrics(streamed)
    assert w.keys() == s.keys() and len(w) > 2
    for key in w.keys() - {"file"}:
        assert float(s[key]) == pytest.approx(float(w[key]), rel=1e-6, abs=1e-9), key


@pytest.mark.parametrize("task", ["crappify", "masking", "segmentation"])
def test_the_2d_test_phase_never_holds_a_whole_image(task, data2d, tmp_path, monkeypatch):
    """The numpy memory the test phase allocates (tracemalloc: the output file's pixels, the input, scoring) stays
    far below one whole image: before, the input was read whole and the float32 output assembled whole."""
    import biapy.data.normalization as normalization
    import biapy.workflows.base as base
    import biapy.workflows.scoring as scoring

    folders = _test_folders(tmp_path / "data", compress_too=False, names=("a.tif", "b.tif"))
    sections = _task(task, data2d)
    trained = _train(data2d, tmp_path, **sections)
    monkeypatch.setattr(scoring, "_SLAB_VOXELS", 3000)
    monkeypatch.setattr(normalization, "pixel_sample", functools.partial(normalization.pixel_sample, budget=2000))
    # numpy's allocations while each image is predicted, written and scored (all in finish_prediction, which
    # consumes the prediction stream); the second image's: the first also pays one-off costs (imports, caches).
    peaks, tests, finish = [], base.Workflow._test_images, WORKFLOWS[task].finish_prediction

    def traced(self, *args, **kwargs):
        tracemalloc.start()
        try:
            return tests(self, *args, **kwargs)
        finally:
            tracemalloc.stop()

    def measured(self, *args, **kwargs):
        tracemalloc.reset_peak()
        start = tracemalloc.get_traced_memory()[0]
        row = finish(self, *args, **kwargs)
        peaks.append(tracemalloc.get_traced_memory()[1] - start)
        return row

    monkeypatch.setattr(base.Workflow, "_test_images", traced)
    monkeypatch.setattr(WORKFLOWS[task], "finish_prediction", measured)
    job = _test_only(data2d, trained, folders["test"], tmp_path, "traced", **sections)
    one_image = SHAPE[0] * SHAPE[1] * 4  # the float32 output of one channel
    # Masking keeps 1 byte a pixel (which pixels a patch saw through the border: a quarter of this).
    assert len(peaks) == 2 and peaks[1] < one_image / 2, (peaks, one_image)
    assert all(np.isfinite([float(v) for k, v in row.items() if k != "file"]).all() for row in _metrics(job))


@pytest.mark.parametrize("ndim, shape", [(2, (37, 53, 1)), (2, (37, 53, 3)), (3, (5, 9, 7, 1)), (3, (5, 9, 7, 2))])
@pytest.mark.parametrize("dtype", [np.float32, np.uint16, np.int64, bool])
def test_a_file_written_band_by_band_has_the_bytes_write_image_writes(ndim, shape, dtype, tmp_path):
    from biapy.data.image_writing import image_rows_writer

    arr = (np.random.default_rng(0).random(shape) * 1000).astype(dtype)
    calibration = {"resolution": ((40, 13), (40, 13)), "resolutionunit": 1, "unit": "µm",
                   "spacing": 1.5 if ndim == 3 else None}
    whole = write_image(tmp_path / "whole.tif", arr, ndim, calibration)
    with image_rows_writer(tmp_path / "rows.tif", shape, dtype, ndim, calibration) as out:
        for a, b in ((0, 1), (1, 4), (4, 4), (4, shape[0])):  # bands of any height, empty ones too
            out.write(arr[a:b])
    assert out.path.read_bytes() == whole.read_bytes()


def test_a_band_writer_refuses_missing_rows_and_leaves_no_file(tmp_path):
    from biapy.data.image_writing import image_rows_writer

    with pytest.raises(ValueError, match=r"part\.tif: 3 of 4 rows written"):
        with image_rows_writer(tmp_path / "part.tif", (4, 5, 1), np.uint8, 2) as out:
            out.write(np.zeros((3, 5, 1), np.uint8))
    with pytest.raises(ValueError, match=r"wide\.tif: rows 0\.\.1 of shape \(6, 1\)"):
        with image_rows_writer(tmp_path / "wide.tif", (4, 5, 1), np.uint8, 2) as out:
            out.write(np.zeros((2, 6, 1), np.uint8))
    assert not list(tmp_path.iterdir())


def test_a_png_path_is_written_as_write_image_writes_it(tmp_path):
    from biapy.data.image_writing import image_rows_writer

    arr = np.random.default_rng(1).integers(0, 3, (9, 8, 1)).astype(np.uint8)
    with image_rows_writer(tmp_path / "labels.png", arr.shape, arr.dtype, 2) as out:
        out.write(arr[:5])
        out.write(arr[5:])
    assert out.path == tmp_path / "labels.png"
    np.testing.assert_array_equal(read_image(out.path, 2), arr)


def test_a_2d_store_in_one_chunk_of_all_rows_is_read_whole_for_the_test_phase(tmp_path, monkeypatch):
    """Each band read of it would decode the whole image: read once instead; a store chunked along rows stays lazy."""
    import biapy.data.io as io

    path = write_image(tmp_path / "img.tif", np.arange(120, dtype=np.uint16).reshape(12, 10), 2)

    class Chunked(np.ndarray):
        chunks = None

    def store(chunk_rows):
        arr = np.arange(120, dtype=np.uint16).reshape(12, 10).view(Chunked)
        arr.chunks = (chunk_rows, 10)
        return LazyStore(path, plain_plan(arr.shape, 2, path, guess=True), lambda: arr)

    monkeypatch.setattr(io, "open_image_lazy", lambda p, ndim: store(12))
    assert isinstance(io.open_image_rows(path, 2), np.ndarray)
    monkeypatch.setattr(io, "open_image_lazy", lambda p, ndim: store(4))
    assert isinstance(io.open_image_rows(path, 2), LazyStore)


def test_a_band_of_whole_rows_is_read_through_few_maps(tmp_path, monkeypatch):
    """The test phase scores a 2D image a band of whole rows at a time from its file: the band's rows lie end to
    end there, so they are copied through maps of up to MAP_BYTES, not one map per image row (1.5x the scoring
    time on a 4096² image)."""
    import biapy.data.io as bio
    import biapy.data.lazy_images as lazy_images
    image = np.arange(600 * 500, dtype=np.float32).reshape(600, 500, 1)
    lazy = bio.open_image_lazy(write_image(tmp_path / "x.tif", image, 2), 2)
    assert isinstance(lazy, lazy_images.LazyTiff)
    maps = []
    copy = lazy_images._mapped_copy
    monkeypatch.setattr(lazy_images, "_mapped_copy", lambda *args: maps.append(args[2]) or copy(*args))
    monkeypatch.setattr(lazy_images.LazyTiff, "MAP_BYTES", 100 * 500 * 4)  # 100 rows a map
    np.testing.assert_array_equal(lazy[50:450], image[50:450])
    assert [m[0] for m in maps] == [100, 100, 100, 100]
    maps.clear()
    np.testing.assert_array_equal(lazy[50:450, 10:20], image[50:450, 10:20])  # not whole rows: one map a row
    assert len(maps) == 400
