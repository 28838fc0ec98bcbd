"""Fine-tuning semantic segmentation from a self-supervised run, 2D and 3D."""
import csv
import re

import numpy as np
import pytest
import torch

from biapy import BiaPy
from biapy.config import check_config, load_config
from biapy.data.io import read_image
from biapy.engine import metrics as M
from biapy.engine.checkpoint import load_checkpoint
from biapy.models import build_model
from tests.conftest import tiny_config
from tests.test_e2e_masking import MAE_MODEL as MAE_TINY


def pretrain(data, ndim, tmp_path, **sections):
    cfg = tiny_config(data, ndim, TRAIN={"EPOCHS": 1}, TEST={"ENABLE": False}, **sections)
    return BiaPy(cfg, result_dir=tmp_path / "out", name="ssl", run_id=1).run_job()


def finetune_config(data, ndim, checkpoint, **sections):
    cfg = tiny_config(data, ndim, **sections)
    cfg["PROBLEM"]["TYPE"] = "SEMANTIC_SEG"
    cfg["DATA"]["TRAIN"]["GT_PATH"] = str(data["train"][1])
    cfg["DATA"]["TEST"]["GT_PATH"] = str(data["test"][1])
    cfg["MODEL"].update({"N_CLASSES": 2, "LOAD_CHECKPOINT": True, "SKIP_UNMATCHED_LAYERS": True})
    cfg["PATHS"] = {"CHECKPOINT_FILE": str(checkpoint)}
    return cfg


@pytest.mark.parametrize("ndim", [2, 3])
def test_finetune_from_crappify_end_to_end(ndim, data2d, data3d, tmp_path):
    data = data2d if ndim == 2 else data3d
    ssl = pretrain(data, ndim, tmp_path)
    cfg = finetune_config(data, ndim, ssl.checkpoint("best"), TEST={"SAVE_PROBABILITIES": True})
    job = BiaPy(cfg, result_dir=tmp_path / "out", name="seg", run_id=1).run_job()
    assert job.checkpoint("best").is_file()
    test_files = sorted(data["test"][0].iterdir())
    for src in test_files:
        labels = read_image(job.per_image / src.name, ndim)
        assert labels.shape[:-1] == read_image(src, ndim).shape[:-1]
        assert set(np.unique(labels)) <= {0, 1}
        probs = read_image(job.per_image / f"{src.name.split('.')[0]}_probabilities.tif", ndim)
        assert probs.shape == labels.shape[:-1] + (2,) and probs.dtype == np.float32
        np.testing.assert_allclose(probs.sum(-1), 1, atol=1e-5)
        assert (probs.argmax(-1) == labels[..., 0]).all()
    with open(job.metrics_csv) as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(test_files)
    assert all(0 <= float(r["iou"]) <= 1 and 0 <= float(r["dice"]) <= 1 for r in rows)
    # Scores summed over the slabs of the prediction stream equal the whole-image ones.
    for row in rows:
        pred = torch.from_numpy(read_image(job.per_image / row["file"], ndim)[..., 0].astype(np.int64))[None]
        gt = torch.from_numpy(read_image(data["test"][1] / row["file"], ndim)[..., 0].astype(np.int64))[None]
        for name, fn in (("iou", M.iou_per_class), ("dice", M.dice_per_class)):
            for c, value in enumerate(fn(pred, gt, 2).tolist()):
                assert float(row[f"{name}_class{c}"]) == pytest.approx(value, abs=1e-5, nan_ok=True)  # the CSV keeps 6 digits
    lineage = (ssl.job_dir / "derived_models.log").read_text()
    assert str(job.results) in lineage


def test_a_fine_tune_that_asks_for_the_pretext_runs_training_state_gets_the_weights_only(data2d, tmp_path, capsys):
    """A pretext run's epoch count and optimizer moments mean nothing for segmentation: with
    MODEL.LOAD_CHECKPOINT_ONLY_WEIGHTS False the fine-tune had gone on from the pretraining's epoch."""
    ssl = pretrain(data2d, 2, tmp_path)
    cfg = finetune_config(data2d, 2, ssl.checkpoint("best"), TRAIN={"EPOCHS": 2}, TEST={"ENABLE": False})
    cfg["MODEL"]["LOAD_CHECKPOINT_ONLY_WEIGHTS"] = False
    job = BiaPy(cfg, result_dir=tmp_path / "out", name="seg", run_id=1).run_job()
    out = capsys.readouterr()
    assert "was trained for another task, so only its weights are loaded" in out.out + out.err
    assert [r["epoch"] for r in load_checkpoint(job.checkpoint("last"))["history"]] == [1, 2]


def test_loading_an_ssl_checkpoint_copies_the_encoder_exactly(data2d, tmp_path):
    from biapy.engine.checkpoint import load_weights
    ssl = pretrain(data2d, 2, tmp_path)
    cfg = load_config(finetune_config(data2d, 2, ssl.checkpoint("best")))
    check_config(cfg, check_paths=False)
    model = build_model(cfg)
    state = load_checkpoint(ssl.checkpoint("best"))["model"]
    loaded, skipped = load_weights(model, state, skip_unmatched=True)
    own = model.state_dict()
    encoder_keys = [k for k in state if k.startswith("encoder.")]
    assert encoder_keys
    for key in encoder_keys:
        assert torch.equal(own[key], state[key]), key
    assert any(k.startswith("head.") for k in (s if isinstance(s, str) else s[0] for s in skipped))


def test_mae_weights_go_into_unetr(data2d, tmp_path, capsys):
    ssl = pretrain(data2d, 2, tmp_path, PROBLEM={"SELF_SUPERVISED": {"PRETEXT_TASK": "masking"}}, MODEL=MAE_TINY)
    cfg = finetune_config(data2d, 2, ssl.checkpoint("best"), MODEL=dict(MAE_TINY, ARCHITECTURE="unetr"),
                          TRAIN={"EPOCHS": 1})
    capsys.readouterr()
    job = BiaPy(cfg, result_dir=tmp_path / "out", name="unetr", run_id=1).run_job()
    state = load_checkpoint(job.checkpoint("last"))["model"]
    assert any(k.startswith("encoder.blocks.") for k in state)
    assert job.metrics_csv.is_file()
    log = capsys.readouterr().out  # the job's log (stdout)
    assert "Loaded 28 tensor(s)" in log and "other model settings" not in log
    # Another head count fits every tensor but reads the attention weights another way: said in a warning.
    heads = finetune_config(data2d, 2, ssl.checkpoint("best"), MODEL=dict(MAE_TINY, ARCHITECTURE="unetr",
                                                                          VIT_NUM_HEADS=4),
                            TRAIN={"EPOCHS": 1}, TEST={"ENABLE": False})
    BiaPy(heads, result_dir=tmp_path / "out", name="heads", run_id=1).run_job()
    assert "other model settings (MODEL.VIT_NUM_HEADS 2 in the checkpoint, 4 here)" in capsys.readouterr().out


@pytest.fixture(scope="module")
def seg_run(data2d, tmp_path_factory):
    """A tiny segmentation run (1 epoch, no test phase) whose checkpoint the bad-label cases test from."""
    out = tmp_path_factory.mktemp("seg_labels")
    cfg = tiny_config(data2d, 2, TRAIN={"EPOCHS": 1}, TEST={"ENABLE": False}, MODEL={"N_CLASSES": 2})
    cfg["PROBLEM"]["TYPE"] = "SEMANTIC_SEG"
    cfg["DATA"]["TRAIN"]["GT_PATH"] = str(data2d["train"][1])
    return out, BiaPy(cfg, result_dir=out, name="seg", run_id=1).run_job()


@pytest.mark.parametrize("spoil, message", [
    (lambda y: np.concatenate([np.full_like(y[:4], 255), y[4:]]),  # 0/1 with 255s: not a 0/255 binary mask
     "holds class id 255 but MODEL.N_CLASSES is 2 (ids must be 0..1; unlabelled pixels? Set LOSS.IGNORE_INDEX to "
     "their value. A 0/255 binary mask reads as 0/1 only when it holds no other value)"),
    (lambda y: y.astype(np.float32) * 0.5, "labels must be integer class ids"),    # 0 / 0.5
    (lambda y: np.repeat(y, 2, axis=-1), "label shape"),                            # two channels
    (lambda y: y[:30, :30], "label shape (30, 30, 1) does not match its image"),   # another size
])
def test_bad_test_labels_are_named_not_scored(seg_run, data2d, tmp_path, spoil, message):
    """Test labels get the checks training labels get; before, ids out of range were dropped from the scores
    and other layouts truncated or cut, with exit 0."""
    from biapy.data.image_writing import write_image
    from biapy.errors import DataError

    out, job = seg_run
    gt = tmp_path / "y"
    for src in sorted(data2d["test"][1].iterdir()):
        write_image(gt / src.name, spoil(read_image(src, 2)), 2)
    cfg = tiny_config(data2d, 2, TRAIN={"ENABLE": False}, MODEL={"N_CLASSES": 2, "LOAD_CHECKPOINT": True})
    cfg["PROBLEM"]["TYPE"] = "SEMANTIC_SEG"
    cfg["DATA"]["TEST"]["GT_PATH"] = str(gt)
    cfg["PATHS"] = {"CHECKPOINT_FILE": str(job.checkpoint("best"))}
    with pytest.raises(DataError, match=re.escape(message)):
        BiaPy(cfg, result_dir=out, name="bad_labels", run_id=1).run_job()


def test_out_of_range_ids_that_a_sampled_check_missed_stop_training_with_one_line(seg_run, data2d, tmp_path):
    from biapy.errors import DataError
    from biapy.workflows.segmentation import SegmentationWorkflow

    wf = object.__new__(SegmentationWorkflow)
    wf.n_classes, wf.ignore = 2, -1
    x, y = torch.zeros(2, 1, 8, 8), torch.zeros(2, 8, 8, dtype=torch.int64)
    y[1, 3, 4] = 255
    with pytest.raises(DataError, match=r"a training patch of DATA.TRAIN.GT_PATH: holds class id 255"):
        wf.compute_loss((x, y), train=True)


def test_test_labels_out_of_range_stop_the_job_before_training(seg_run, data2d, tmp_path):
    from biapy.data.image_writing import write_image
    from biapy.errors import DataError
    from biapy.job import Job

    out, _ = seg_run
    gt = tmp_path / "y"
    for src in sorted(data2d["test"][1].iterdir()):
        write_image(gt / src.name, read_image(src, 2) * 5, 2)
    cfg = tiny_config(data2d, 2, TRAIN={"EPOCHS": 1}, MODEL={"N_CLASSES": 2})
    cfg["PROBLEM"]["TYPE"] = "SEMANTIC_SEG"
    cfg["DATA"]["TRAIN"]["GT_PATH"] = str(data2d["train"][1])
    cfg["DATA"]["TEST"]["GT_PATH"] = str(gt)
    with pytest.raises(DataError, match="holds class id 5 but MODEL.N_CLASSES is 2"):
        BiaPy(cfg, result_dir=out, name="bad_ids_train", run_id=1).run_job()
    assert not Job(out, "bad_ids_train", 1).checkpoint("last").exists()


def test_partly_labelled_masks_train_and_score_with_ignore_index(data2d, tmp_path):
    """Unlabelled pixels (255) with LOSS.IGNORE_INDEX 255 and class weights: training runs, and the scores leave
    those pixels out (they had stopped the run as class id 255)."""
    from biapy.data.image_writing import write_image

    partial = {}
    for split in ("train", "test"):
        partial[split] = tmp_path / f"{split}_y"
        for src in sorted(data2d[split][1].iterdir()):
            labels = read_image(src, 2)
            labels[: labels.shape[0] // 2] = 255  # only the lower half annotated
            write_image(partial[split] / src.name, labels, 2)
    cfg = tiny_config(data2d, 2, TRAIN={"EPOCHS": 2}, MODEL={"N_CLASSES": 2},
                      LOSS={"TYPE": "CE_DICE", "IGNORE_INDEX": 255, "CLASS_REBALANCE": "manual",
                            "CLASS_WEIGHTS": [0.3, 1.0]})
    cfg["PROBLEM"]["TYPE"] = "SEMANTIC_SEG"
    cfg["DATA"]["TRAIN"]["GT_PATH"] = str(partial["train"])
    cfg["DATA"]["TEST"]["GT_PATH"] = str(partial["test"])
    job = BiaPy(cfg, result_dir=tmp_path / "out", name="partial", run_id=1).run_job()
    with open(job.metrics_csv) as fh:
        rows = list(csv.DictReader(fh))
    assert rows and all(np.isfinite(float(r["iou"])) for r in rows)
    for row in rows:
        pred = torch.from_numpy(read_image(job.per_image / row["file"], 2)[..., 0].astype(np.int64))[None]
        gt = torch.from_numpy(read_image(partial["test"] / row["file"], 2)[..., 0].astype(np.int64))[None]
        half = gt.shape[1] // 2
        lower = M.iou_per_class(pred[:, half:], gt[:, half:], 2)  # the annotated part alone
        for c, value in enumerate(lower.tolist()):
            assert float(row[f"iou_class{c}"]) == pytest.approx(value, abs=1e-5, nan_ok=True)


def test_probabilities_that_would_replace_another_test_output_are_refused(seg_run, data2d, tmp_path):
    """With TEST.SAVE_PROBABILITIES, x's probabilities go to x_probabilities.tif: a test image named so had had its
    mask silently replaced by them (or they by it)."""
    import shutil

    from biapy.errors import DataError

    out, job = seg_run
    x, y = tmp_path / "x", tmp_path / "y"
    for src, dst in ((data2d["test"][0], x), (data2d["test"][1], y)):
        first = sorted(src.iterdir())[0]
        for name in (first.name, first.stem + "_probabilities" + first.suffix):
            dst.mkdir(exist_ok=True)
            shutil.copy(first, dst / name)
    cfg = tiny_config(data2d, 2, TRAIN={"ENABLE": False}, MODEL={"N_CLASSES": 2, "LOAD_CHECKPOINT": True},
                      TEST={"SAVE_PROBABILITIES": True})
    cfg["PROBLEM"]["TYPE"] = "SEMANTIC_SEG"
    cfg["DATA"]["TEST"].update({"PATH": str(x), "GT_PATH": str(y)})
    cfg["PATHS"] = {"CHECKPOINT_FILE": str(job.checkpoint("best"))}
    with pytest.raises(DataError, match=r"^DATA.TEST.PATH: the probabilities of \S+ \(TEST.SAVE_PROBABILITIES\) "
                                        r"would replace the output of \S+_probabilities\.tif; rename one of them"):
        BiaPy(cfg, result_dir=out, name="prob_clash", run_id=1).run_job()


def test_augmented_label_samples_are_written_as_small_integers(data2d, tmp_path):
    """They had been int64, a TIFF Fiji does not open."""
    import tifffile

    cfg = tiny_config(data2d, 2, TRAIN={"EPOCHS": 1}, TEST={"ENABLE": False}, MODEL={"N_CLASSES": 2},
                      AUGMENTOR={"ENABLE": True, "HFLIP": True, "AUG_SAMPLES": True, "AUG_NUM_SAMPLES": 2})
    cfg["PROBLEM"]["TYPE"] = "SEMANTIC_SEG"
    cfg["DATA"]["TRAIN"]["GT_PATH"] = str(data2d["train"][1])
    job = BiaPy(cfg, result_dir=tmp_path, name="aug", run_id=1).run_job()
    labels = sorted(job.aug.glob("aug_*_y.tif"))
    assert len(labels) == 2
    for path in labels:
        y = tifffile.imread(path)
        assert y.dtype == np.uint8 and set(np.unique(y)) <= {0, 1}
