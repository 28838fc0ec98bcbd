"""The train/validation split: its share, k-fold cross-validation, its record in checkpoints (a resume keeps it),
the band split of a single image (no pixel on both sides, lazy as in memory, inputs, targets and labels cut
alike, too short an image refused early), and what the log says about it."""
import logging
import shutil

import numpy as np
import pytest
import torch

from biapy import BiaPy
from biapy.config import check_config, finalize, load_config
from biapy.data.datasets import _BandView
from biapy.data.image_writing import write_image
from biapy.data.io import read_image
from biapy.data.splits import Band, band_split, split_fold, split_record, split_train_val, validation_names
from biapy.engine.checkpoint import load_checkpoint, save_checkpoint
from biapy.engine.distributed import init_distributed
from biapy.errors import ConfigError, DataError
from biapy.job import Job
from biapy.workflows import get_workflow
from tests.conftest import tiny_config


def _cfg(data, ndim=2, **sections):
    cfg = load_config(tiny_config(data, ndim, **sections))
    check_config(cfg)
    return cfg


def _workflow(cfg, tmp_path):
    job = Job(tmp_path / "out", "split", 1)
    cfg = finalize(cfg, job)
    return get_workflow(cfg)(cfg, job, init_distributed("gloo"), torch.device("cpu"))


def _folder(data, tmp_path, n):
    """A copy of the first `n` training images of `data`."""
    folder = tmp_path / f"x{n}"
    folder.mkdir()
    for path in sorted(data["train"][0].iterdir())[:n]:
        shutil.copy(path, folder / path.name)
    return folder


def test_the_validation_share_is_rounded_up_as_biapy_does():
    items = list(range(25))
    assert len(split_train_val(items, 0.1)[1]) == 3  # ceil(2.5); round() gave 2
    assert len(split_train_val(items[:30] * 2, 0.1)[1]) == 5  # 50 * 0.1 = 5 exactly
    assert len(split_train_val(list(range(30)), 0.1)[1]) == 3  # 3.0000000000000004 in floating point
    assert [len(x) for x in split_train_val(items[:2], 0.99)] == [1, 1]  # at least one image each


@pytest.mark.parametrize("random", [True, False])
def test_k_folds_are_disjoint_cover_every_item_and_depend_on_the_seed_only(random):
    items = [f"f{i}" for i in range(11)]
    vals = [split_fold(items, 4, k, random, seed=3)[1] for k in range(1, 5)]
    assert sorted(sum(vals, [])) == sorted(items)  # together every item, each once
    assert sorted(len(v) for v in vals) == [2, 3, 3, 3]
    for k, val in enumerate(vals, 1):
        train = split_fold(items, 4, k, random, seed=3)[0]
        assert not set(train) & set(val) and sorted(train + val) == sorted(items)
    assert vals == [split_fold(items, 4, k, random, seed=3)[1] for k in range(1, 5)]
    other = [split_fold(items, 4, k, random, seed=4)[1] for k in range(1, 5)]
    assert (other != vals) == random
    with pytest.raises(ConfigError, match="CROSS_VAL_FOLD"):
        split_fold(items, 4, 5)


def test_cross_validation_keys_are_used_and_checked(data2d, caplog):
    picked = [validation_names(_cfg(data2d, DATA={"VAL": {"CROSS_VAL": True, "CROSS_VAL_NFOLD": 2,
                                                          "CROSS_VAL_FOLD": k}}))
              for k in (1, 2)]
    assert "ignored" not in caplog.text
    assert sorted(picked[0] + picked[1]) == sorted(p.name for p in data2d["train"][0].iterdir())
    assert not set(picked[0]) & set(picked[1])
    for val, says in [({"CROSS_VAL_FOLD": 3, "CROSS_VAL_NFOLD": 2}, "CROSS_VAL_FOLD: 3 is out of range"),
                      ({"CROSS_VAL_FOLD": 0}, "CROSS_VAL_FOLD: 0 is out of range"),
                      ({"CROSS_VAL_NFOLD": 1, "CROSS_VAL_FOLD": 1}, "CROSS_VAL_NFOLD: 1 is out of range"),
                      ({"FROM_TRAIN": False, "PATH": str(data2d["test"][0])}, "needs DATA.VAL.FROM_TRAIN True")]:
        with pytest.raises(ConfigError, match=says):
            _cfg(data2d, DATA={"VAL": {"CROSS_VAL": True, **val}})
    with pytest.raises(DataError, match="DATA.TRAIN.PATH: 4 image.*CROSS_VAL_NFOLD 5"):
        validation_names(_cfg(data2d, DATA={"VAL": {"CROSS_VAL": True}}))
    _cfg(data2d, DATA={"TEST": {"USE_VAL_AS_TEST": True}})  # not done here: the warning says what to do instead
    assert "USE_VAL_AS_TEST is a BiaPy option this tool does not use; ignored (the test phase predicts" in caplog.text


def test_one_training_image_too_short_for_two_bands_is_refused_before_any_degraded_copy_is_made(data2d, data3d,
                                                                                                 tmp_path):
    one = _folder(data2d, tmp_path, 1)  # 48 x 56: a quarter of 48 rows holds no 32-row patch
    wf = _workflow(_cfg(data2d, DATA={"TRAIN": {"PATH": str(one)}}), tmp_path)  # crappify, the default
    # 125 rows: ceil(0.25 * 125) = 32 validation rows, 93 training rows (124 leave 31)
    with pytest.raises(DataError, match=rf"^{one / 'img_00.tif'}: the only training image, .* it has 48 along y "
                                        r"\(needs 125\)\. Change SPLIT_TRAIN"):
        wf.prepare_training()
    assert not (tmp_path / "x1_ssl_source").exists()
    # 3D: neither z (12 slices) nor y (40 rows) can be cut; both are named, each with what it would need
    vol = tmp_path / "vol"
    vol.mkdir()
    shutil.copy(sorted(data3d["train"][0].iterdir())[0], vol / "v.tif")
    with pytest.raises(DataError, match=r"v.tif: .* it has 40 along y \(needs 61\) and 12 along z \(needs 29\)\."):
        validation_names(_cfg(data3d, 3, DATA={"TRAIN": {"PATH": str(vol)}}))


# ------------------------------------------------------------------ one image: a band of it validates
def _one_image(tmp_path, shape, name="one.tif", labels=False):
    """A folder holding one uint16 image whose every pixel is its flat index (so a patch tells where each of its
    pixels comes from), and with `labels` a folder of its labels, (flat index) % 3."""
    index = np.arange(int(np.prod(shape))).reshape(tuple(shape) + (1,))
    assert index.max() < 65536
    folder = tmp_path / "one"
    write_image(folder / name, index.astype(np.uint16), len(shape))
    if labels:
        write_image(tmp_path / "one_gt" / name, (index % 3).astype(np.uint8), len(shape))
    return folder


def _where(t, shape):
    """Per spatial axis, the source coordinates of a patch's pixels ('div' normalization: value * 65535)."""
    return np.unravel_index(np.rint(t.numpy()[0] * 65535).astype(np.int64), shape)


def _items(ds, epochs=(0, 1, 2)):
    for epoch in epochs:
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            yield ds[i]


@pytest.mark.parametrize("ndim,shape,axis,cut", [(2, (160, 40), 0, 120),  # 2D: y
                                                 (3, (40, 24, 24), 0, 30),  # z holds a patch on both sides
                                                 (3, (12, 80, 24), 1, 60)])  # 3 z slices would not: y
@pytest.mark.parametrize("random", [True, False])
def test_one_image_is_cut_into_bands_that_no_patch_crosses_in_memory_or_lazily(data2d, data3d, tmp_path, caplog,
                                                                               ndim, shape, axis, cut, random):
    folder = _one_image(tmp_path, shape)
    pad = (2,) * ndim  # grid patches reflected at the band's borders: within the band, never across the cut
    wfs = []
    for in_memory in (True, False):
        cfg = _cfg(data2d if ndim == 2 else data3d, ndim, PROBLEM={"SELF_SUPERVISED": {"PRETEXT_TASK": "masking"}},
                   DATA={"TRAIN": {"PATH": str(folder), "IN_MEMORY": in_memory, "EXTRACT_RANDOM_PATCH": random,
                                   "PADDING": pad, "OVERLAP": (0.5,) * ndim},
                         "VAL": {"IN_MEMORY": in_memory, "PADDING": pad, "OVERLAP": (0.5,) * ndim},
                         "NORMALIZATION": {"TYPE": "div"}})
        wf = _workflow(cfg, tmp_path / f"m{in_memory}")
        with caplog.at_level(logging.INFO, logger="biapy"):
            wf.prepare_training()
        wfs.append(wf)
    name = "zyx"[-ndim:][axis]
    assert f"Validation: rows {cut}..{shape[axis] - 1} of one.tif ({name}), training: rows 0..{cut - 1}" in caplog.text
    band = f"one.tif {name} {cut}..{shape[axis] - 1}"
    assert validation_names(cfg) == [band] and wfs[0].val_split == wfs[1].val_split == split_record([band])
    mem, lazy = wfs
    assert isinstance(lazy.train_dataset.image(0), _BandView) and isinstance(lazy.val_dataset.image(0), _BandView)
    assert isinstance(mem.train_dataset.image(0), np.ndarray)
    for ds, rows in [(mem.train_dataset, range(0, cut)), (mem.val_dataset, range(cut, shape[axis]))]:
        seen = set()
        for x, _ in _items(ds):
            patch_rows = set(_where(x, shape)[axis].ravel().tolist())
            assert patch_rows <= set(rows), f"a patch reads rows {sorted(patch_rows - set(rows))} of the other band"
            seen |= patch_rows
        if ds is mem.val_dataset or not random:
            assert seen == set(rows)  # the grid covers its band
    for a, b in [(mem.train_dataset, lazy.train_dataset), (mem.val_dataset, lazy.val_dataset)]:
        assert len(a) == len(b) and a.sources[0].stats == b.sources[0].stats
        for (xa, ya), (xb, yb) in zip(_items(a, (0, 1)), _items(b, (0, 1))):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_crappify_cuts_the_degraded_input_and_its_original_at_the_same_rows(data2d, tmp_path):
    shape = (160, 40)
    folder = _one_image(tmp_path, shape)
    wf = _workflow(_cfg(data2d, DATA={"TRAIN": {"PATH": str(folder)}, "NORMALIZATION": {"TYPE": "div"}}), tmp_path)
    wf.prepare_training()
    for ds, rows in [(wf.train_dataset, (0, 120)), (wf.val_dataset, (120, 160))]:
        src = ds.sources[0]
        assert src.target == folder / "one.tif" and src.path != src.target and src.shape == (rows[1] - rows[0], 40, 1)
        degraded = read_image(src.path, 2)[..., 0]
        for x, y in _items(ds, (0, 1)):
            r, c = _where(y, shape)
            r0, c0 = int(r[0, 0]), int(c[0, 0])
            assert rows[0] <= r0 and r0 + 32 <= rows[1]
            assert np.array_equal(np.stack([r, c]), np.mgrid[r0:r0 + 32, c0:c0 + 32])  # a block of the original
            torch.testing.assert_close(x[0], torch.from_numpy(degraded[r0:r0 + 32, c0:c0 + 32] / 65535).float())


def test_segmentation_labels_are_cut_with_their_image(data2d, tmp_path):
    shape = (160, 40)
    folder = _one_image(tmp_path, shape, labels=True)
    cfg = _cfg(data2d, PROBLEM={"TYPE": "SEMANTIC_SEG"}, MODEL={"N_CLASSES": 3}, TEST={"ENABLE": False},
               DATA={"TRAIN": {"PATH": str(folder), "GT_PATH": str(tmp_path / "one_gt"), "IN_MEMORY": False},
                     "NORMALIZATION": {"TYPE": "div"}})
    wf = _workflow(cfg, tmp_path)
    wf.prepare_training()
    for ds, rows in [(wf.train_dataset, range(0, 120)), (wf.val_dataset, range(120, 160))]:
        for x, y in _items(ds, (0, 1)):
            index = np.ravel_multi_index(_where(x, shape), shape)
            assert set(_where(x, shape)[0].ravel().tolist()) <= set(rows)
            assert np.array_equal(y.numpy(), index % 3)  # each label under its own pixel


def test_a_resume_with_another_band_is_refused(data2d, tmp_path):
    folder = _one_image(tmp_path, (160, 40))
    cfg = tiny_config(data2d, 2, DATA={"TRAIN": {"PATH": str(folder)}}, TRAIN={"EPOCHS": 1}, TEST={"ENABLE": False})
    job = BiaPy(cfg, result_dir=tmp_path / "out", name="job", run_id=1).run_job()
    last = job.checkpoint("last")
    assert load_checkpoint(last)["val_split"] == split_record(["one.tif y 120..159"])

    def run(split):
        sections = {**cfg, "TRAIN": {**cfg["TRAIN"], "EPOCHS": 2},
                    "DATA": {**cfg["DATA"], "VAL": {**cfg["DATA"]["VAL"], "SPLIT_TRAIN": split}}}
        return BiaPy(sections, result_dir=tmp_path / "out", name="job", run_id=1).run_job()

    with pytest.raises(ConfigError, match="run job_1 validated on other images.*DATA.VAL.SPLIT_TRAIN 0.25 in the "
                                          "checkpoint, 0.5 here"):
        run(0.5)
    run(0.25)
    assert load_checkpoint(last)["epoch"] == 2


def test_the_log_names_the_validation_images_and_warns_when_they_are_training_images(data2d, tmp_path, caplog):
    train = data2d["train"][0]
    with caplog.at_level(logging.INFO, logger="biapy"):
        _workflow(_cfg(data2d, PROBLEM={"SELF_SUPERVISED": {"PRETEXT_TASK": "masking"}}), tmp_path).prepare_training()
    val = validation_names(_cfg(data2d))
    assert f"Validation images: {', '.join(val)}" in caplog.text and "also training images" not in caplog.text
    caplog.clear()
    same = _cfg(data2d, PROBLEM={"SELF_SUPERVISED": {"PRETEXT_TASK": "masking"}},
                DATA={"VAL": {"FROM_TRAIN": False, "PATH": str(train)}})
    with caplog.at_level(logging.INFO, logger="biapy"):
        _workflow(same, tmp_path).prepare_training()
    warned = [r for r in caplog.records if "also training images" in r.getMessage()]
    assert len(warned) == 1 and warned[0].levelno == logging.WARNING and "DATA.VAL.PATH: 4" in warned[0].getMessage()
    assert "img_00.tif, img_01.tif, img_02.tif, img_03.tif" in caplog.text


def test_a_resume_with_another_split_is_refused_before_any_work(data2d, tmp_path):
    folder = _folder(data2d, tmp_path, 4)
    cfg = tiny_config(data2d, 2, DATA={"TRAIN": {"PATH": str(folder)}}, TRAIN={"EPOCHS": 1},
                      TEST={"ENABLE": False})

    def run(**changes):
        sections = {k: dict(v) for k, v in cfg.items()}
        for key, value in changes.items():
            section, name = key.split("__")
            sections[section] = {**sections.get(section, {}), name: value}
        sections["TRAIN"]["EPOCHS"] = 2
        return BiaPy(sections, result_dir=tmp_path / "out", name="job", run_id=1).run_job()

    job = BiaPy(cfg, result_dir=tmp_path / "out", name="job", run_id=1).run_job()
    last = job.checkpoint("last")
    record = load_checkpoint(last)["val_split"]
    assert record["count"] == 1 and len(record["digest"]) == 40
    for change, says in [({"SYSTEM__SEED": 2}, "SYSTEM.SEED 0 in the checkpoint, 2 here"),
                         ({"DATA__VAL": {"SPLIT_TRAIN": 0.5}}, "DATA.VAL.SPLIT_TRAIN 0.25 in the checkpoint, 0.5")]:
        before = last.stat().st_mtime_ns
        with pytest.raises(ConfigError, match=f"run job_1 validated on other images.*{says}.*new --run_id"):
            run(**change)
        assert last.stat().st_mtime_ns == before
    shutil.copy(folder / "img_00.tif", folder / "img_04.tif")  # one more image: another random split
    with pytest.raises(ConfigError, match="the images in DATA.TRAIN.PATH changed; 1 validation image.s. then, 2 now"):
        run()
    (folder / "img_04.tif").unlink()
    # A test of the trained run under other settings is no resume: nothing is chosen across validation sets.
    BiaPy({**cfg, "SYSTEM": {**cfg["SYSTEM"], "SEED": 2}, "TRAIN": {"ENABLE": False}, "TEST": {"ENABLE": True}},
          result_dir=tmp_path / "out", name="job", run_id=1).run_job()
    # A checkpoint from before the record resumes as before.
    state = load_checkpoint(last)
    del state["val_split"]
    save_checkpoint(last, state)
    run(SYSTEM__SEED=2)
    assert load_checkpoint(last)["epoch"] == 2


def test_split_train_val():
    files = [f"f{i}" for i in range(10)]
    train, val = split_train_val(files, 0.2, random=False)
    assert val == ["f8", "f9"] and train == files[:8]
    a = split_train_val(files, 0.3, random=True, seed=1)
    assert a == split_train_val(files, 0.3, random=True, seed=1)
    assert len(a[1]) == 3 and sorted(a[0] + a[1]) == sorted(files)
    assert [len(x) for x in split_train_val(files[:2], 0.01)] == [1, 1]
    with pytest.raises(ConfigError, match="SPLIT_TRAIN"):
        split_train_val(["only"], 0.1)


def test_band_split_takes_the_share_at_the_end_of_z_else_y(tmp_path):
    assert band_split("v", (80, 64, 64), (8, 16, 16), 0.1) == (Band(0, 0, 72), Band(0, 72, 80))  # ceil(8.0) is 8...
    assert band_split("v", (81, 64, 64), (8, 16, 16), 0.1) == (Band(0, 0, 72), Band(0, 72, 81))  # ...ceil(8.1) 9
    assert band_split("v", (20, 200, 64), (8, 16, 16), 0.1) == (Band(1, 0, 180), Band(1, 180, 200))  # 2 z slices
    assert band_split("i", (320, 64), (32, 32), 0.1) == (Band(0, 0, 288), Band(0, 288, 320))
    with pytest.raises(DataError, match=r"^i: the only training image.* it has 300 along y \(needs 311\)\."):
        band_split("i", (300, 64), (32, 32), 0.1)
