"""Bad checkpoints, and re-runs or resumes of a run that it refuses, one row of the README table "Bad input
and what it says" per test: checkpoints missing, corrupt, unsafe, foreign or of another model; a run's ID
reused with other data, settings, optimizer, starting checkpoint or task.

One good tiny run is made first (the module-scoped `world` fixture of conftest.py: one per test file) and
every file it wrote is hashed; each bad case then runs against the same --result_dir (another run ID or name
where the case gets that far) and must exit non-zero with one `ERROR:` line naming the culprit, no traceback,
and leave the good run's files byte-identical (the `intact` fixture).
"""
import shutil
from pathlib import Path

import pytest
import torch

from biapy.job import Job
from tests.bad_input_world import from_checkpoint, hashes, one_error_line, seg_cfg, spoil_first
from tests.conftest import tiny_config


# ------------------------------------------------------------------ checkpoints
def test_a_fine_tune_refused_for_its_checkpoint_leaves_no_run_folder(world, intact, capsys):
    """Augmentation samples are written once the starting checkpoint was accepted, not before its check."""
    cfg = from_checkpoint(world, world.good_job.checkpoint("best"), TRAIN={"EPOCHS": 1},
                          AUGMENTOR={"ENABLE": True, "HFLIP": True, "AUG_SAMPLES": True, "AUG_NUM_SAMPLES": 2})
    cfg["MODEL"]["ARCHITECTURE"] = "resunet"
    assert world.run(cfg, "refused_arch", name="refused_arch") == 4
    one_error_line(capsys, "'unet' model but MODEL.ARCHITECTURE is 'resunet'")
    assert not (world.out / "refused_arch").exists()


def test_checkpoint_missing(world, intact, capsys):
    ckpt = world.root / "none.pth"
    assert world.run(from_checkpoint(world, ckpt), "ckpt_missing") == 4
    one_error_line(capsys, "none.pth", "not found", "PATHS.CHECKPOINT_FILE")
    # Found before any work: no run of the job was started (the config checks run first).
    assert world.run(from_checkpoint(world, ckpt, TRAIN={"EPOCHS": 1}), "ckpt_missing_train", name="fresh") == 4
    assert not (world.out / "fresh").exists()


def test_checkpoint_file_that_is_a_folder(world, intact, capsys):
    assert world.run(from_checkpoint(world, world.root), "ckpt_folder") == 4
    one_error_line(capsys, "PATHS.CHECKPOINT_FILE", "is a folder", "expected a checkpoint file")


@pytest.mark.parametrize("train", [True, False])
def test_load_checkpoint_without_a_file_on_a_new_run_says_so_before_any_work(world, intact, capsys, train):
    cfg = from_checkpoint(world, "", TRAIN={"ENABLE": train, "EPOCHS": 1})
    assert world.run(cfg, "ckpt_empty", name="own_start") == 4
    one_error_line(capsys, "MODEL.LOAD_CHECKPOINT is True and PATHS.CHECKPOINT_FILE is empty",
                   "own_start_", "does not exist")
    assert not (world.out / "own_start").exists()  # before the data step: no degraded copies, no run folder


def test_testing_a_pretext_checkpoint_as_a_segmentation_model_is_refused(world, intact, capsys):
    """Its head is the pretext task's (made anew, untrained): scores would mean nothing, and replace the run's."""
    x, y = world.data["train"]
    cfg = seg_cfg(world, x, y)
    cfg["TRAIN"] = {"ENABLE": False}
    cfg["MODEL"].update({"LOAD_CHECKPOINT": True, "SKIP_UNMATCHED_LAYERS": True})
    cfg["PATHS"] = {"CHECKPOINT_FILE": str(world.good_job.checkpoint("best"))}
    assert world.run(cfg, "test_pretext_as_seg") == 4
    one_error_line(capsys, "good_1-checkpoint-best.pth", "tensor(s) of the model are not in it (head.weight",
                   "would score untrained layers")


@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_checkpoint_corrupt(world, intact, capsys, how):
    ckpt = world.root / f"corrupt_{how}.pth"
    data = world.good_job.checkpoint("last").read_bytes()
    ckpt.write_bytes(data[: len(data) // 3] if how == "truncated" else b"garbage" * 100)
    assert world.run(from_checkpoint(world, ckpt), f"ckpt_{how}") == 4
    one_error_line(capsys, ckpt.name, "not a readable checkpoint")


class _Payload:
    """Unpickling this would touch a file: weights_only loading must refuse it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_checkpoint_with_pickled_code_is_refused_and_runs_nothing(world, intact, capsys, tmp_path):
    marker = tmp_path / "pwned"
    ckpt = world.root / "pickled.pth"
    torch.save({"model": {}, "evil": _Payload(marker)}, ckpt)
    assert world.run(from_checkpoint(world, ckpt), "ckpt_pickled") == 4
    one_error_line(capsys, "pickled.pth", "pickled Python object", "weights_only=True")
    assert not marker.exists()


def test_a_downloaded_checkpoint_with_foreign_fields_fine_tunes_and_writes_only_under_result_dir(world, intact,
                                                                                                   capsys):
    """A 'config' dict (common in other programs' checkpoints) had crashed the run ('dict' object has no attribute
    'read'), a stray 'metadata' too; a model in any folder named 'checkpoints' had gained a derived_models.log."""
    download = world.root / "dl" / "checkpoints" / "model.pth"
    download.parent.mkdir(parents=True)
    weights = torch.load(world.good_job.checkpoint("best"), weights_only=True)["model"]
    torch.save({"model": weights, "config": {"lr": 0.1}, "metadata": "oops"}, download)
    assert world.run(from_checkpoint(world, download, TRAIN={"EPOCHS": 1}), "foreign", name="foreign") == 0
    assert "model.pth: ignoring config, metadata" in capsys.readouterr().out
    assert sorted(p.name for p in (world.root / "dl").iterdir()) == ["checkpoints"]
    torch.save({"model": dict(weights, extra="x")}, download)
    assert world.run(from_checkpoint(world, download, TRAIN={"EPOCHS": 1}), "foreign_value", name="foreign2") == 4
    one_error_line(capsys, "model.pth", "'model' entry 'extra' holds a str; expected tensors only")


def test_checkpoint_of_another_architecture(world, intact, capsys):
    ckpt = world.good_job.checkpoint("best")
    cfg = from_checkpoint(world, ckpt, MODEL={"ARCHITECTURE": "resunet"})
    assert world.run(cfg, "ckpt_arch") == 4
    one_error_line(capsys, ckpt.name, "'unet'", "resunet")


def test_checkpoint_of_other_widths_names_the_keys_to_set(world, intact, capsys):
    ckpt = world.good_job.checkpoint("best")
    model = dict(world.cfg()["MODEL"], FEATURE_MAPS=[4, 8, 32])
    assert world.run(from_checkpoint(world, ckpt, MODEL=model), "ckpt_widths") == 4
    one_error_line(capsys, ckpt.name, "do not fit the model",
                   "Set as in the pretraining: MODEL.FEATURE_MAPS [4, 8, 16] in the checkpoint, [4, 8, 32] here")


def test_checkpoint_and_config_disagree_on_ndim(world, intact, capsys):
    cfg = tiny_config(world.data, 3, TRAIN={"ENABLE": False})
    cfg["MODEL"]["LOAD_CHECKPOINT"] = True
    cfg["PATHS"] = {"CHECKPOINT_FILE": str(world.good_job.checkpoint("best"))}
    assert world.run(cfg, "ckpt_ndim") == 4
    one_error_line(capsys, "checkpoint is 2D", "PROBLEM.NDIM is 3D")


def test_checkpoint_and_config_disagree_on_channels(world, intact, capsys):
    cfg = from_checkpoint(world, world.good_job.checkpoint("best"), DATA={"PATCH_SIZE": (32, 32, 3)})
    assert world.run(cfg, "ckpt_channels") == 4
    one_error_line(capsys, "1 input channel(s)", "DATA.PATCH_SIZE asks for 3")


# found by the audit of bad input
@pytest.mark.parametrize("fields, says", [
    ({"epoch": None}, None), ({"epoch": 0, "best_val": None}, None),
    ({"epoch": 0, "partial_loss": 0.5}, "ignoring partial_loss"),
    ({"epoch": 0, "scheduler": [{"step": 1}]}, "ignoring scheduler"),
])
def test_a_foreign_checkpoint_s_training_fields_of_other_types_are_ignored(world, intact, capsys, fields, says):
    """MODEL.LOAD_CHECKPOINT_ONLY_WEIGHTS False with another program's checkpoint had ended in TypeError
    (int(None), float(None), tuple(0.5)) or AttributeError ('list' object has no attribute 'get') tracebacks."""
    ckpt = world.root / "foreign_training.pth"
    weights = torch.load(world.good_job.checkpoint("best"), weights_only=True)["model"]
    torch.save({"model": weights, **fields}, ckpt)
    cfg = from_checkpoint(world, ckpt, TRAIN={"EPOCHS": 1})
    cfg["MODEL"]["LOAD_CHECKPOINT_ONLY_WEIGHTS"] = False
    assert world.run(cfg, "foreign_training", name="foreign_training") == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "Continuing from epoch 0 of foreign_training.pth" in out
    assert says is None or f"foreign_training.pth: {says}" in out


def test_a_foreign_checkpoint_s_training_state_of_another_layout_is_one_line(world, intact, capsys):
    ckpt = world.root / "foreign_layout.pth"
    weights = torch.load(world.good_job.checkpoint("best"), weights_only=True)["model"]
    torch.save({"model": weights, "epoch": 0, "scheduler": {"step": None}}, ckpt)
    cfg = from_checkpoint(world, ckpt, TRAIN={"EPOCHS": 1})
    cfg["MODEL"]["LOAD_CHECKPOINT_ONLY_WEIGHTS"] = False
    assert world.run(cfg, "foreign_layout", name="foreign_layout") == 4
    one_error_line(capsys, "foreign_layout.pth: its training state (optimizer, scheduler, epoch counters) is not of "
                   "this tool's layout (TypeError", "set MODEL.LOAD_CHECKPOINT_ONLY_WEIGHTS True to load its weights only")


# ------------------------------------------------------------------ re-runs and resumes of a run
def test_a_failed_rerun_of_a_finished_run_leaves_its_files_as_they_were(world, intact, capsys):
    """Bad training data, or another pretext task, under the finished run's ID: the run's config copies,
    outputs and checkpoints are untouched (`intact`)."""
    x, _, victim = spoil_first(world, "rerun_bad", lambda p: p.write_bytes(b"this is not a TIFF" * 10))
    assert world.run(world.cfg(TRAIN={"EPOCHS": 2}, DATA={"TRAIN": {"PATH": str(x)}}), "rerun_bad", run_id=1) == 3
    one_error_line(capsys, victim.name)
    masking = world.cfg(TEST={"ENABLE": True}, PROBLEM={"SELF_SUPERVISED": {"PRETEXT_TASK": "masking"}})
    assert world.run(masking, "rerun_masking", run_id=1) == 4
    one_error_line(capsys, "run good_1 was trained for SELF_SUPERVISED crappify",
                   "asks for SELF_SUPERVISED masking")


@pytest.mark.parametrize("train", [True, False])
def test_a_rerun_of_a_trained_run_under_other_input_or_layout_settings_is_refused(world, intact, capsys, train):
    """Retested with another normalization, a finished run had rewritten its outputs (PSNR 14.2 -> 11.1) and its
    config.yaml; a resumed one would go on learning from other inputs."""
    cfg = world.cfg(TRAIN={"ENABLE": train, "EPOCHS": 2}, TEST={"ENABLE": True},
                    DATA={"NORMALIZATION": {"TYPE": "scale_range"}})
    assert world.run(cfg, f"rerun_norm_{train}", run_id=1) == 2
    one_error_line(capsys, "run good_1 was trained with other settings", "DATA.NORMALIZATION.TYPE",
                   "zero_mean_unit_variance in the checkpoint, scale_range here", "new --run_id")
    cfg = world.cfg(TRAIN={"ENABLE": train}, TEST={"ENABLE": True}, MODEL={"KERNEL_SIZE": 5})
    assert world.run(cfg, f"rerun_kernel_{train}", run_id=1) == 2
    one_error_line(capsys, "MODEL.KERNEL_SIZE 3 in the checkpoint, 5 here")
    # An ELU-trained run re-tested as ReLU had replaced its outputs (PSNR 18.75 -> 17.13) and its config.yaml.
    cfg = world.cfg(TRAIN={"ENABLE": train, "EPOCHS": 2}, TEST={"ENABLE": True}, MODEL={"ACTIVATION": "relu"})
    assert world.run(cfg, f"rerun_activation_{train}", run_id=1) == 2
    one_error_line(capsys, "run good_1 was trained with other settings", "MODEL.ACTIVATION elu in the checkpoint, "
                   "relu here", "new --run_id")


def test_resuming_a_run_with_another_optimizer_is_refused_before_any_work(world, intact, capsys):
    """It had failed after the data preparation, advising MODEL.LOAD_CHECKPOINT_ONLY_WEIGHTS, which a resume
    does not read (it always restores its optimizer)."""
    cfg = world.cfg(TRAIN={"EPOCHS": 2, "OPTIMIZER": "SGD"})
    assert world.run(cfg, "resume_sgd", run_id=1) == 2
    line = one_error_line(capsys, "run good_1 was trained with other settings",
                          "TRAIN.OPTIMIZER ADAMW in the checkpoint, SGD here", "new --run_id")
    assert "LOAD_CHECKPOINT_ONLY_WEIGHTS" not in line


def test_testing_another_checkpoint_into_a_trained_run_is_refused(world, intact, capsys):
    other = world.root / "other_run.pth"
    shutil.copyfile(world.good_job.checkpoint("best"), other)
    assert world.run(from_checkpoint(world, other, TEST={"ENABLE": True}), "test_other_into_good", run_id=1) == 2
    one_error_line(capsys, "PATHS.CHECKPOINT_FILE", "run good_1 has checkpoints of its own", "other_run.pth",
                   "new --run_id")
    # Its own checkpoint named by path, or through a link, is its own: tested as asked.
    assert world.run(world.cfg(), "own_path", name="own_path", run_id=1) == 0
    link = world.root / "own_best_link.pth"
    link.symlink_to(Job(world.out, "own_path", 1).checkpoint("best"))
    for path in (Job(world.out, "own_path", 1).checkpoint("best"), link):
        capsys.readouterr()
        assert world.run(from_checkpoint(world, path, TEST={"ENABLE": True}), "test_own_by_path", name="own_path",
                         run_id=1) == 0
        assert f"Test weights: {path}" in capsys.readouterr().out


def test_a_resumed_run_asked_to_start_from_a_checkpoint_it_did_not_begin_from(world, intact, capsys, monkeypatch):
    """The run resumes its own 'last': a PATHS.CHECKPOINT_FILE other than the one it began from had been ignored."""
    start = world.root / "start.pth"
    shutil.copyfile(world.good_job.checkpoint("best"), start)
    assert world.run(from_checkpoint(world, start, TRAIN={"EPOCHS": 2}), "resume_other_start", run_id=1) == 2
    one_error_line(capsys, "PATHS.CHECKPOINT_FILE", "run good_1 began from scratch", "start.pth would not be loaded")
    numbered = world.good_job.checkpoint(1)  # its own other checkpoints are not where it resumes either
    shutil.copyfile(world.good_job.checkpoint("last"), numbered)
    try:
        numbered.write_bytes(numbered.read_bytes()[:-1] + b"x")  # another file's bytes
        assert world.run(from_checkpoint(world, numbered, TRAIN={"EPOCHS": 2}), "resume_own_1", run_id=1) == 2
        one_error_line(capsys, "run good_1 began from scratch", "good_1-checkpoint-1.pth would not be loaded")
    finally:
        numbered.unlink()
    capsys.readouterr()
    # Begun from that file, the run goes on (interrupted, or with more epochs) whenever the command names it:
    # as the same text from another folder, through a moved copy, or not at all in between.
    assert world.run(from_checkpoint(world, start, TRAIN={"EPOCHS": 1}), "from_start", name="from_start",
                     run_id=1) == 0
    job = Job(world.out, "from_start", 1)
    monkeypatch.chdir(world.root)
    relative = from_checkpoint(world, "start.pth", TRAIN={"EPOCHS": 2})
    moved = world.root / "moved" / "start.pth"
    moved.parent.mkdir()
    shutil.copyfile(start, moved)
    no_start = world.cfg(TRAIN={"EPOCHS": 4})
    for epochs, cfg in ((2, relative), (3, from_checkpoint(world, moved, TRAIN={"EPOCHS": 3})), (4, no_start),
                        (5, from_checkpoint(world, start, TRAIN={"EPOCHS": 5}))):
        capsys.readouterr()
        assert world.run(cfg, f"from_start{epochs}", name="from_start", run_id=1) == 0
        resumed = f"Resuming from_start_1 from from_start_1-checkpoint-last.pth at epoch {epochs}"
        assert resumed in capsys.readouterr().out
    # Another checkpoint (its own best, another epoch's weights) is not what it began from.
    other = world.root / "other.pth"
    shutil.copyfile(job.checkpoint("best"), other)
    assert world.run(from_checkpoint(world, other, TRAIN={"EPOCHS": 6}), "from_other", name="from_start",
                     run_id=1) == 2
    one_error_line(capsys, f"run from_start_1 began from {start.resolve()}", "other.pth would not be loaded")
    # The same file name from another folder is another file: refused.
    elsewhere = world.root / "elsewhere"
    elsewhere.mkdir()
    shutil.copyfile(other, elsewhere / "start.pth")
    monkeypatch.chdir(elsewhere)
    assert world.run(from_checkpoint(world, "start.pth", TRAIN={"EPOCHS": 6}), "from_elsewhere", name="from_start",
                     run_id=1) == 2
    one_error_line(capsys, "start.pth would not be loaded")


# found by the audit of bad input
def test_testing_another_task_s_checkpoint_under_a_fine_tuned_run_s_id_names_the_task(world, intact, capsys):
    """It had advised a new --run_id, under which the test was then refused for the other task's head."""
    x, y = world.data["train"]
    cfg = seg_cfg(world, x, y)
    assert world.run(cfg, "seg_own", name="seg_own", run_id=1) == 0
    capsys.readouterr()
    cfg["TRAIN"] = {"ENABLE": False}
    cfg["TEST"] = {"ENABLE": True}
    cfg["MODEL"]["LOAD_CHECKPOINT"] = True
    cfg["PATHS"] = {"CHECKPOINT_FILE": str(world.good_job.checkpoint("best"))}
    before = hashes(world.out / "seg_own")
    assert world.run(cfg, "seg_test_pretext", name="seg_own", run_id=1) == 4
    line = one_error_line(capsys, "good_1-checkpoint-best.pth", "trained for SELF_SUPERVISED crappify but this "
                          "config asks for SEMANTIC_SEG", "test a checkpoint of this task")
    assert "--run_id" not in line
    assert hashes(world.out / "seg_own") == before
