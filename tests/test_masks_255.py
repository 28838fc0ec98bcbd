"""Semantic segmentation labels saved as 0/255 binary masks (ImageJ/Fiji's) read as classes 0 and 1, as BiaPy reads
them, in training, validation and test scoring; LOSS.IGNORE_INDEX 255 keeps 255 unlabelled; other values refused."""
import csv
import re

import numpy as np
import pytest
import torch

from biapy import BiaPy
from biapy.data.image_writing import write_image
from biapy.data.io import read_image
from biapy.errors import DataError
from biapy.workflows import segmentation
from biapy.workflows.segmentation import SegmentationWorkflow
from tests.conftest import tiny_config

RESCALED = "label files are binary masks of 0 and 255, read as classes 0 and 1"


def _relabelled(data, ndim, root, change):
    """{'train': y folder, 'test': y folder} of `data`'s labels (0/1) passed through `change`."""
    out = {}
    for split in ("train", "test"):
        out[split] = root / f"{split}_y"
        for src in sorted(data[split][1].iterdir()):
            write_image(out[split] / src.name, change(read_image(src, ndim)), ndim)
    return out


def _config(data, ndim, labels, in_memory=True, loss=None, **sections):
    cfg = tiny_config(data, ndim, TRAIN={"EPOCHS": 1}, MODEL={"N_CLASSES": 2}, LOSS=loss or {}, **sections)
    cfg["PROBLEM"]["TYPE"] = "SEMANTIC_SEG"
    cfg["DATA"]["TRAIN"].update({"GT_PATH": str(labels["train"]), "IN_MEMORY": in_memory})
    cfg["DATA"]["TEST"].update({"GT_PATH": str(labels["test"]), "IN_MEMORY": in_memory})
    return cfg


@pytest.fixture
def targets_seen(monkeypatch):
    """The distinct values of every target the loss was given (training and validation batches)."""
    seen = set()
    real = segmentation.build_loss

    def recording(cfg):
        loss = real(cfg)

        def fn(logits, y):
            seen.update(torch.unique(y).tolist())
            return loss(logits, y)
        return fn

    monkeypatch.setattr(segmentation, "build_loss", recording)
    return seen


def _perfect_prediction(monkeypatch, labels_folder, ndim):
    """The test phase 'predicts' each image's own 0/255 mask as classes 0/1 (one-hot), in slabs of 5 rows."""
    def predict_slabs(self, image, stats, path):
        truth = torch.from_numpy(read_image(labels_folder / path.name, ndim)[..., 0] // 255).long()
        onehot = torch.nn.functional.one_hot(truth, 2).movedim(-1, 0).float()
        return ((row0, onehot[:, row0:row0 + 5]) for row0 in range(0, truth.shape[0], 5))

    monkeypatch.setattr(SegmentationWorkflow, "predict_slabs", predict_slabs)


@pytest.mark.parametrize("ndim, in_memory", [(2, True), (2, False), (3, False)])
def test_binary_masks_of_0_and_255_train_and_score_as_classes_0_and_1(ndim, in_memory, data2d, data3d, tmp_path,
                                                                       monkeypatch, capsys, targets_seen):
    data = data2d if ndim == 2 else data3d
    labels = _relabelled(data, ndim, tmp_path, lambda y: y * 255)
    _perfect_prediction(monkeypatch, labels["test"], ndim)
    job = BiaPy(_config(data, ndim, labels, in_memory), result_dir=tmp_path / "out", name="m255",
                run_id=1).run_job()
    assert targets_seen == {0, 1}  # what the loss learnt from: classes, not 255
    said = capsys.readouterr().out
    n_train, n_test = (len(list(labels[s].iterdir())) for s in ("train", "test"))
    assert f"DATA.TRAIN.GT_PATH: {n_train} of {n_train} {RESCALED}" in said
    assert f"DATA.TEST.GT_PATH: {n_test} of {n_test} {RESCALED}" in said
    with open(job.metrics_csv) as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == n_test
    for row in rows:  # a perfect prediction scores 1 on both classes (255 taken as class 1, not out of range)
        assert [float(row[k]) for k in ("iou_class0", "iou_class1", "dice_class0", "dice_class1")] == [1, 1, 1, 1]
        mask = read_image(job.per_image / row["file"], ndim)
        np.testing.assert_array_equal(mask, read_image(labels["test"] / row["file"], ndim) // 255)


def test_with_ignore_index_255_a_0_255_mask_keeps_255_unlabelled_and_says_so(data2d, tmp_path, capsys,
                                                                             targets_seen):
    labels = _relabelled(data2d, 2, tmp_path, lambda y: y * 255)
    cfg = _config(data2d, 2, labels, loss={"IGNORE_INDEX": 255}, TEST={"ENABLE": False})
    BiaPy(cfg, result_dir=tmp_path / "out", name="ignore", run_id=1).run_job()
    assert targets_seen == {0, 255}  # 255 reached the loss as its ignore index, never as class 1
    said = capsys.readouterr().out
    assert RESCALED not in said
    assert ("DATA.TRAIN.GT_PATH: the label files hold 0 and 255 alone and LOSS.IGNORE_INDEX is 255, so 255 marks "
            "unlabelled pixels and every labelled one is class 0; for 0/255 binary masks (255 the foreground) set "
            "LOSS.IGNORE_INDEX -1") in said


@pytest.mark.parametrize("values", [(0, 1, 255), (0, 128, 255)])
def test_masks_of_other_values_beside_255_are_still_refused(values, data2d, tmp_path):
    """0/1/255 (1 and 255 both foreground? or 255 unlabelled?) and 0/128/255 are no binary masks: the refusal names
    the file and says when 255 reads as foreground."""
    def spread(y):
        y = y.astype(np.uint8) * values[1]
        y[:4] = values[2]
        return y

    labels = _relabelled(data2d, 2, tmp_path, spread)
    with pytest.raises(DataError, match=r"^\S+img_0\d\.tif: holds class id 255 but MODEL\.N_CLASSES is 2 \(ids must "
                                        r"be 0\.\.1; unlabelled pixels\? Set LOSS\.IGNORE_INDEX to their value\. A "
                                        r"0/255 binary mask reads as 0/1 only when it holds no other value\)$"):
        BiaPy(_config(data2d, 2, labels), result_dir=tmp_path / "out", name="three", run_id=1).run_job()


def _workflow(ignore=-1, n_classes=2):
    wf = object.__new__(SegmentationWorkflow)
    wf.n_classes, wf.ignore = n_classes, ignore
    return wf


def _labels(*values):
    return np.array(values, np.uint8).reshape(-1, 1)


def test_a_mixed_0_1_255_mask_reads_with_ignore_index_255_as_ids_and_unlabelled():
    wf = _workflow(ignore=255)
    wf._label_set_checked("training", "DATA.TRAIN.GT_PATH", [("a.tif", _labels(0, 1, 255))])
    assert "training" not in wf.binary_masks
    y = torch.tensor([[0, 1, 255]])
    assert wf._class_ids("a patch", y, "training").tolist() == [[0, 1, 255]]


def test_a_label_set_mixing_binary_masks_and_class_ids_is_refused_naming_both():
    with pytest.raises(DataError, match=r"^DATA\.TEST\.GT_PATH: a\.tif is a binary mask of 0 and 255 but b\.tif holds "
                                        r"other class ids; save every label file alike"):
        _workflow()._label_set_checked("test", "DATA.TEST.GT_PATH", [("a.tif", _labels(0, 255)),
                                                                      ("b.tif", _labels(0, 1))])
    wf = _workflow()  # files of background alone go with either kind
    wf._label_set_checked("test", "DATA.TEST.GT_PATH", [("a.tif", _labels(0, 255)), ("b.tif", _labels(0, 0))])
    assert wf.binary_masks == {"test"}


def test_a_patch_of_a_binary_mask_set_holding_another_value_is_refused_whole():
    """A lazily read file was decided on a sample: every patch and slab is checked whole."""
    wf = _workflow(ignore=7)
    wf._label_set_checked("training", "DATA.TRAIN.GT_PATH", [("a.tif", _labels(0, 255, 7))])
    y = torch.tensor([[0, 255, 7]])
    assert wf._class_ids("a patch", y, "training").tolist() == [[0, 1, 7]]  # IGNORE_INDEX kept as it is
    with pytest.raises(DataError, match=re.escape("a training patch of DATA.TRAIN.GT_PATH: holds value 1 but its "
                                                  "label files are binary masks of 0 and 255 (read as classes 0 and "
                                                  "1), expected 0 and 255 and LOSS.IGNORE_INDEX 7 alone")):
        wf._class_ids("a training patch of DATA.TRAIN.GT_PATH", torch.tensor([[0, 255, 1]]), "training")


@pytest.mark.parametrize("ignore, n_classes, says", [
    (1, 2, "unless LOSS.IGNORE_INDEX is 1"),  # class 1 ignored: the foreground would vanish
    (-1, 300, None),                           # 255 is a class id of its own
])
def test_no_rescaling_where_255_or_1_mean_something_else(ignore, n_classes, says):
    wf = _workflow(ignore, n_classes)
    if says is None:
        wf._label_set_checked("training", "DATA.TRAIN.GT_PATH", [("a.tif", _labels(0, 255))])
        assert not wf.binary_masks
        assert wf._class_ids("p", torch.tensor([0, 255]), "training").tolist() == [0, 255]
        return
    with pytest.raises(DataError, match=re.escape(f"a.tif: holds class id 255 but MODEL.N_CLASSES is 2 (ids must be "
                                                  f"0..1; unlabelled pixels? Set LOSS.IGNORE_INDEX to their value. A "
                                                  f"0/255 binary mask reads as 0/1 {says})")):
        wf._label_set_checked("training", "DATA.TRAIN.GT_PATH", [("a.tif", _labels(0, 255))])
