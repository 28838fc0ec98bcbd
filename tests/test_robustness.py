"""Bad input, one row of the README table "Bad input and what it says" per test.

One good tiny run is made first (module fixture) and every file it wrote is hashed; each bad case
then runs against the same --result_dir (another run ID or name where the case gets that far) and
must exit non-zero with one `ERROR:` line naming the culprit, no traceback, and leave the good
run's files byte-identical.
"""
import errno
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import yaml

from biapy.cli import main
from biapy.config.load import plain_tree
from biapy.data.image_writing import write_image
from biapy.data.io import read_image
from biapy.errors import BiapyError, ConfigError, DataError
from biapy.job import Job
from biapy.runner import resolve_device
from tests.conftest import make_dataset, tiny_config

ROOT = Path(__file__).parents[1]
GOOD = "good"


def _hashes(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


class World:
    """The shared good run and helpers to run bad cases beside it."""

    def __init__(self, root):
        self.root = root
        self.data = make_dataset(root / "data", 2)
        self.out = root / "out"
        self.cfgs = root / "cfgs"
        self.cfgs.mkdir()
        self.next_id = 100

    def cfg(self, **sections):
        sections.setdefault("TRAIN", {"EPOCHS": 1})
        sections.setdefault("SYSTEM", {"NUM_CPUS": 1})  # tiny models: a second thread only waits
        return tiny_config(self.data, 2, **sections)

    def write_cfg(self, cfg, stem):
        path = self.cfgs / f"{stem}.yaml"
        path.write_text(yaml.safe_dump(plain_tree(cfg)))
        return path

    def run(self, cfg, stem, name=GOOD, run_id="new", extra=(), result_dir=None):
        """main([...]) of the config; run_id 'new' = a fresh ID of job NAME."""
        path = cfg if isinstance(cfg, Path) else self.write_cfg(cfg, stem)
        if run_id == "new":
            self.next_id += 1
            run_id = self.next_id
        argv = ["--config", str(path), "--result_dir", str(result_dir or self.out), "--name", name]
        if run_id is not None:
            argv += ["--run_id", str(run_id)]
        return main(argv + list(extra))

    def bad_folder(self, stem, split="train"):
        """A copy of the good image (and label) folders to spoil."""
        dst = self.root / "bad" / stem
        for src, sub in zip(self.data[split], ("x", "y")):
            shutil.copytree(src, dst / sub)
        return dst / "x", dst / "y"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = World(tmp_path_factory.mktemp("robust"))
    assert w.run(w.cfg(TEST={"ENABLE": True}), GOOD, run_id=1) == 0
    w.good_job = Job(w.out, GOOD, 1)
    assert w.good_job.checkpoint("last").is_file() and any(w.good_job.per_image.iterdir())
    w.hashes = _hashes(w.out)
    return w


@pytest.fixture
def intact(world):
    """After the test: every file of the good run is still there, byte-identical."""
    yield
    now = _hashes(world.out)
    changed = [k for k, v in world.hashes.items() if now.get(k) != v]
    assert not changed, f"the earlier run's files changed: {changed}"


def one_error_line(capsys, *culprits):
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("ERROR:"), err  # nothing else on stderr (the log is on stdout)
    for culprit in culprits:
        assert str(culprit) in lines[0], (culprit, lines[0])
    print(lines[0])  # shown by `pytest -rP`: the messages quoted in the README table
    return lines[0]


# ------------------------------------------------------------------ configuration
@pytest.mark.parametrize("section, values, culprits", [
    ("TRAIN", {"EPOCH": 2}, ["TRAIN.EPOCH", "did you mean TRAIN.EPOCHS"]),            # unknown/misspelt key
    ("TRAIN", {"EPOCHS": "two"}, ["TRAIN.EPOCHS", "expected an integer"]),              # wrong type
    ("TRAIN", {"LR": -1.0}, ["TRAIN.LR", "out of range"]),                               # out of range
    ("DATA", {"VAL": {"SPLIT_TRAIN": 1.5}}, ["DATA.VAL.SPLIT_TRAIN", "out of range"]),
    ("DATA", {"PATCH_SIZE": [8, 32, 32, 1]}, ["DATA.PATCH_SIZE", "PROBLEM.NDIM is 2D"]),  # 2D/3D mismatch
    ("TRAIN", {"EPOCHS": "__import__('os').system('false')"}, ["TRAIN.EPOCHS"]),        # no eval of values
])
def test_config_errors_exit_2_before_touching_the_run(world, intact, capsys, section, values, culprits):
    # Same name and run ID as the good run: a config error must stop before writing anything.
    cfg = world.cfg(**{section: values})
    assert world.run(cfg, f"cfg_{culprits[0]}", run_id=1) == 2
    one_error_line(capsys, *culprits)


def test_misspelt_key_on_the_command_line(world, intact, capsys):
    assert world.run(world.cfg(), "cli_typo", run_id=1, extra=["TRAIN.EPOCSH", "3"]) == 2
    one_error_line(capsys, "TRAIN.EPOCSH", "TRAIN.EPOCHS")


def test_unsafe_yaml_tag_is_refused_and_runs_nothing(world, intact, capsys, tmp_path):
    marker = tmp_path / "pwned"
    path = world.cfgs / "unsafe.yaml"
    path.write_text(f"TRAIN:\n  EPOCHS: !!python/object/apply:os.system ['touch {marker}']\n")
    assert world.run(path, "unsafe", run_id=1) == 2
    one_error_line(capsys, "unsafe.yaml")
    assert not marker.exists()


def test_missing_data_folder(world, intact, capsys):
    cfg = world.cfg(DATA={"TRAIN": {"PATH": str(world.root / "nowhere")}})
    assert world.run(cfg, "missing_folder") == 2
    one_error_line(capsys, "DATA.TRAIN.PATH", "nowhere")


def test_empty_data_folder(world, intact, capsys):
    empty = world.root / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    assert world.run(world.cfg(DATA={"TRAIN": {"PATH": str(empty)}}), "empty_folder") == 3
    one_error_line(capsys, "DATA.TRAIN.PATH", "no images", str(empty))


def test_unlistable_data_folder_names_the_key(world, intact, capsys, monkeypatch):
    x, _ = world.bad_folder("unlistable")
    real = Path.iterdir

    def iterdir(self):
        if self == x:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)  # chmod 000 does not stop root, who runs CI
    assert world.run(world.cfg(DATA={"TRAIN": {"PATH": str(x)}}), "unlistable") == 3
    one_error_line(capsys, "DATA.TRAIN.PATH", "cannot list folder", "Permission denied")


# ------------------------------------------------------------------ crappify's degraded copies
@pytest.mark.parametrize("split, target, says", [("TRAIN", "train", "is the image folder of DATA.TRAIN.PATH"),
                                                 ("TRAIN", "test", "is the image folder of DATA.TEST.PATH"),
                                                 ("TEST", "train", "is the image folder of DATA.TRAIN.PATH")])
def test_copy_folder_that_is_an_image_folder_is_refused_and_the_images_stay(world, intact, capsys, split, target,
                                                                         says):
    folders = {"train": world.bad_folder(f"own_{split}_{target}")[0]}
    folders["test"] = world.bad_folder(f"own_{split}_{target}_test", "test")[0]
    before = {k: _hashes(v) for k, v in folders.items()}
    data = {"TRAIN": {"PATH": str(folders["train"])}, "TEST": {"PATH": str(folders["test"])}}
    data[split]["SSL_SOURCE_DIR"] = str(folders[target])
    cfg = world.cfg(DATA=data, TEST={"ENABLE": True})
    assert world.run(cfg, f"ssl_{split}_{target}") == 2
    one_error_line(capsys, f"DATA.{split}.SSL_SOURCE_DIR", says, "replace its images")
    assert {k: _hashes(v) for k, v in folders.items()} == before


def test_one_copy_folder_for_two_image_folders_is_refused(world, intact, capsys):
    shared = world.root / "shared_copies"
    cfg = world.cfg(DATA={"TRAIN": {"SSL_SOURCE_DIR": str(shared)}, "TEST": {"SSL_SOURCE_DIR": str(shared)}},
                    TEST={"ENABLE": True})
    assert world.run(cfg, "ssl_shared") == 2
    one_error_line(capsys, "DATA.TEST.SSL_SOURCE_DIR", "is also DATA.TRAIN.SSL_SOURCE_DIR", "replace each other")
    assert not shared.exists()


def test_copy_folder_that_is_a_file_or_cannot_be_made(world, intact, capsys):
    blocker = world.root / "copies_file"
    blocker.write_text("")
    assert world.run(world.cfg(DATA={"TRAIN": {"SSL_SOURCE_DIR": str(blocker)}}), "ssl_file") == 2
    one_error_line(capsys, "DATA.TRAIN.SSL_SOURCE_DIR", "is a file", "expected a folder")
    assert world.run(world.cfg(DATA={"TRAIN": {"SSL_SOURCE_DIR": str(blocker / "sub")}}), "ssl_unmakeable") == 3
    one_error_line(capsys, "DATA.TRAIN.SSL_SOURCE_DIR", "cannot write the degraded copies", "writable folder")


# ------------------------------------------------------------------ images
def _spoil_first(world, stem, spoil):
    x, y = world.bad_folder(stem)
    victim = sorted(x.iterdir())[1]
    spoil(victim)
    return x, y, victim


def test_ndim_2d_with_3d_stacks(world, intact, capsys):
    x, _, victim = _spoil_first(world, "stack_in_2d",
                                lambda p: write_image(p, np.zeros((5, 40, 40, 1), np.uint8), 3))
    assert world.run(world.cfg(DATA={"TRAIN": {"PATH": str(x)}}), "stack_in_2d") == 3
    one_error_line(capsys, victim.name, "PROBLEM.NDIM is 2D")


def test_ndim_3d_with_2d_images(world, intact, capsys):
    x, _ = world.bad_folder("2d_in_3d")
    cfg = tiny_config(world.data, 3, TRAIN={"EPOCHS": 1}, DATA={"TRAIN": {"PATH": str(x)}})
    assert world.run(cfg, "2d_in_3d") == 3
    one_error_line(capsys, "DATA.TRAIN.PATH", "img_", "along z", "PROBLEM.NDIM is 3D")


def test_ndim_3d_with_2d_colour_tiffs(world, intact, capsys):
    """tifffile.imwrite of (Y, X, 3) colour images had read as volumes 3 pixels wide in a 3D job."""
    x = world.root / "bad" / "rgb_in_3d"
    x.mkdir(parents=True)
    for i in range(2):
        tifffile.imwrite(x / f"rgb_{i:02d}.tif", np.zeros((40, 40, 3), np.uint8))
    cfg = tiny_config(world.data, 3, TRAIN={"EPOCHS": 1}, DATA={"TRAIN": {"PATH": str(x)}})
    assert world.run(cfg, "rgb_in_3d") == 3
    one_error_line(capsys, "rgb_00.tif", "looks like a 2D image with 3 channels", "PROBLEM.NDIM is 3D",
                   "set PROBLEM.NDIM 2D and DATA.PATCH_SIZE (y, x, 3)")


def test_patch_larger_than_every_image(world, intact, capsys):
    x, _ = world.bad_folder("big_patch")
    assert world.run(world.cfg(DATA={"PATCH_SIZE": (128, 128, 1), "TRAIN": {"PATH": str(x)}}), "big_patch") == 3
    one_error_line(capsys, "DATA.TRAIN.PATH", "smaller than DATA.PATCH_SIZE (128, 128)", "img_03.tif")
    assert not x.with_name("x_ssl_source").exists()  # refused before crappify degraded a copy of every image


def test_patch_larger_than_one_image_without_padding(world, intact, capsys):
    cfg = world.cfg(DATA={"PATCH_SIZE": (56, 56, 1), "REFLECT_TO_COMPLETE_SHAPE": False})
    assert world.run(cfg, "big_patch_no_pad") == 3
    line = one_error_line(capsys, "img_", "smaller than DATA.PATCH_SIZE (56, 56)", "REFLECT_TO_COMPLETE_SHAPE")
    assert "_ssl_source" not in line  # the user's file, not crappify's degraded copy of it


@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_unreadable_image(world, intact, capsys, how):
    def spoil(p):
        data = p.read_bytes()
        p.write_bytes(data[: len(data) // 2] if how == "truncated" else b"this is not a TIFF" * 10)
    x, _, victim = _spoil_first(world, f"unreadable_{how}", spoil)
    assert world.run(world.cfg(DATA={"TRAIN": {"PATH": str(x)}}), f"unreadable_{how}") == 3
    one_error_line(capsys, victim.name)


def test_complex_pixels_are_refused_by_name(world, intact, capsys):

    x, _, victim = _spoil_first(world, "complex", lambda p: tifffile.imwrite(
        p, (read_image(p, 2)[..., 0] * (1 + 1j)).astype(np.complex64)))
    assert world.run(world.cfg(DATA={"TRAIN": {"PATH": str(x)}}), "complex") == 3
    one_error_line(capsys, victim.name, "complex64", "expected real numbers")


def test_image_without_pixels(world, intact, capsys):
    import warnings


    def spoil(p):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tifffile warns that such a file is nonconformant: the point here
            tifffile.imwrite(p, np.zeros((0, 0), np.uint8))
    x, _, victim = _spoil_first(world, "no_pixels", spoil)
    assert world.run(world.cfg(DATA={"TRAIN": {"PATH": str(x)}}), "no_pixels") == 3
    one_error_line(capsys, victim.name, "holds no pixels")


def test_a_bad_test_image_stops_the_job_before_training(world, intact, capsys):
    x, _, victim = _spoil_first(world, "bad_test", lambda p: p.write_bytes(b"this is not a TIFF" * 10))
    cfg = world.cfg(TEST={"ENABLE": True}, DATA={"TEST": {"PATH": str(x)}})
    assert world.run(cfg, "bad_test", run_id=90) == 3
    one_error_line(capsys, victim.name)
    assert not Job(world.out, GOOD, 90).checkpoint("last").exists()


def test_a_failed_rerun_of_a_finished_run_leaves_its_files_as_they_were(world, intact, capsys):
    """Bad training data, or another pretext task, under the finished run's ID: the run's config copies,
    outputs and checkpoints are untouched (`intact`)."""
    x, _, victim = _spoil_first(world, "rerun_bad", lambda p: p.write_bytes(b"this is not a TIFF" * 10))
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
    assert world.run(_from_checkpoint(world, other, TEST={"ENABLE": True}), "test_other_into_good", run_id=1) == 2
    one_error_line(capsys, "PATHS.CHECKPOINT_FILE", "run good_1 has checkpoints of its own", "other_run.pth",
                   "new --run_id")
    # Its own checkpoint named by path, or through a link, is its own: tested as asked.
    assert world.run(world.cfg(), "own_path", name="own_path", run_id=1) == 0
    link = world.root / "own_best_link.pth"
    link.symlink_to(Job(world.out, "own_path", 1).checkpoint("best"))
    for path in (Job(world.out, "own_path", 1).checkpoint("best"), link):
        capsys.readouterr()
        assert world.run(_from_checkpoint(world, path, TEST={"ENABLE": True}), "test_own_by_path", name="own_path",
                         run_id=1) == 0
        assert f"Test weights: {path}" in capsys.readouterr().out


def test_a_resumed_run_asked_to_start_from_a_checkpoint_it_did_not_begin_from(world, intact, capsys, monkeypatch):
    """The run resumes its own 'last': a PATHS.CHECKPOINT_FILE other than the one it began from had been ignored."""
    start = world.root / "start.pth"
    shutil.copyfile(world.good_job.checkpoint("best"), start)
    assert world.run(_from_checkpoint(world, start, TRAIN={"EPOCHS": 2}), "resume_other_start", run_id=1) == 2
    one_error_line(capsys, "PATHS.CHECKPOINT_FILE", "run good_1 began from scratch", "start.pth would not be loaded")
    numbered = world.good_job.checkpoint(1)  # its own other checkpoints are not where it resumes either
    shutil.copyfile(world.good_job.checkpoint("last"), numbered)
    try:
        numbered.write_bytes(numbered.read_bytes()[:-1] + b"x")  # another file's bytes
        assert world.run(_from_checkpoint(world, numbered, TRAIN={"EPOCHS": 2}), "resume_own_1", run_id=1) == 2
        one_error_line(capsys, "run good_1 began from scratch", "good_1-checkpoint-1.pth would not be loaded")
    finally:
        numbered.unlink()
    capsys.readouterr()
    # Begun from that file, the run goes on (interrupted, or with more epochs) whenever the command names it:
    # as the same text from another folder, through a moved copy, or not at all in between.
    assert world.run(_from_checkpoint(world, start, TRAIN={"EPOCHS": 1}), "from_start", name="from_start",
                     run_id=1) == 0
    job = Job(world.out, "from_start", 1)
    monkeypatch.chdir(world.root)
    relative = _from_checkpoint(world, "start.pth", TRAIN={"EPOCHS": 2})
    moved = world.root / "moved" / "start.pth"
    moved.parent.mkdir()
    shutil.copyfile(start, moved)
    no_start = world.cfg(TRAIN={"EPOCHS": 4})
    for epochs, cfg in ((2, relative), (3, _from_checkpoint(world, moved, TRAIN={"EPOCHS": 3})), (4, no_start),
                        (5, _from_checkpoint(world, start, TRAIN={"EPOCHS": 5}))):
        capsys.readouterr()
        assert world.run(cfg, f"from_start{epochs}", name="from_start", run_id=1) == 0
        resumed = f"Resuming from_start_1 from from_start_1-checkpoint-last.pth at epoch {epochs}"
        assert resumed in capsys.readouterr().out
    # Another checkpoint (its own best, another epoch's weights) is not what it began from.
    other = world.root / "other.pth"
    shutil.copyfile(job.checkpoint("best"), other)
    assert world.run(_from_checkpoint(world, other, TRAIN={"EPOCHS": 6}), "from_other", name="from_start",
                     run_id=1) == 2
    one_error_line(capsys, f"run from_start_1 began from {start.resolve()}", "other.pth would not be loaded")
    # The same file name from another folder is another file: refused.
    elsewhere = world.root / "elsewhere"
    elsewhere.mkdir()
    shutil.copyfile(other, elsewhere / "start.pth")
    monkeypatch.chdir(elsewhere)
    assert world.run(_from_checkpoint(world, "start.pth", TRAIN={"EPOCHS": 6}), "from_elsewhere", name="from_start",
                     run_id=1) == 2
    one_error_line(capsys, "start.pth would not be loaded")


def test_test_images_whose_channels_differ_from_the_training_images(world, intact, capsys):
    """The hint had been to change DATA.PATCH_SIZE, which fits the training images."""
    x, _ = world.bad_folder("test_rgb", split="test")
    for p in sorted(x.iterdir()):
        write_image(p, np.repeat(read_image(p, 2), 3, axis=-1), 2)
    assert world.run(world.cfg(TEST={"ENABLE": True}, DATA={"TEST": {"PATH": str(x)}}), "test_rgb") == 3
    line = one_error_line(capsys, "has 3 channel(s) but DATA.PATCH_SIZE (32, 32, 1) and the training images have 1",
                          "expected DATA.TEST.PATH images of 1 channel(s)")
    assert "set its last value" not in line


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_nan_or_inf_pixels(world, intact, capsys, value):
    def spoil(p):
        img = read_image(p, 2).astype(np.float32)
        img[3, 4, 0] = value
        write_image(p, img, 2)
    x, _, victim = _spoil_first(world, f"nonfinite_{value}", spoil)
    assert world.run(world.cfg(DATA={"TRAIN": {"PATH": str(x)}}), f"nonfinite_{value}") == 3
    one_error_line(capsys, victim.name, "NaN or Inf")


def _one_nan_pixel(p):
    img = read_image(p, 2).astype(np.float32)
    img[3, 4, 0] = np.nan
    write_image(p, img, 2)


def test_nan_pixels_in_a_test_image(world, intact, capsys):
    x, _, victim = _spoil_first(world, "nonfinite_test", _one_nan_pixel)
    cfg = _from_checkpoint(world, world.good_job.checkpoint("best"), DATA={"TEST": {"PATH": str(x)}})
    assert world.run(cfg, "nonfinite_test") == 3
    one_error_line(capsys, victim.name, "NaN")


def test_a_new_run_refused_for_its_test_images_writes_no_augmentation_samples(world, intact, capsys):
    x, _, victim = _spoil_first(world, "nonfinite_test_new_run", _one_nan_pixel)
    job_id = world.next_id + 1
    cfg = world.cfg(DATA={"TEST": {"PATH": str(x)}}, TEST={"ENABLE": True},
                    AUGMENTOR={"ENABLE": True, "HFLIP": True, "AUG_SAMPLES": True, "AUG_NUM_SAMPLES": 2})
    assert world.run(cfg, "nonfinite_test_new_run") == 3
    one_error_line(capsys, victim.name, "NaN")
    assert not Job(world.out, GOOD, job_id).aug.exists()  # checks first, then the samples
    cfg["DATA"]["TEST"]["PATH"] = world.cfg()["DATA"]["TEST"]["PATH"]
    assert world.run(cfg, "good_test_new_run") == 0
    assert len(list(Job(world.out, GOOD, job_id + 1).aug.glob("aug_*_x.tif"))) == 2


def test_constant_image_trains_without_nan_and_writes_only_under_result_dir(world, intact, capsys):
    x, _, _ = _spoil_first(world, "constant", lambda p: write_image(p, np.full((48, 48, 1), 7, np.uint8), 2))
    job_id = world.next_id + 1
    # Output paths given in the YAML are ignored: they are derived from --result_dir, --name and --run_id.
    outside = world.root / "outside"
    cfg = world.cfg(DATA={"TRAIN": {"PATH": str(x)}}, LOG={"TENSORBOARD_LOG_DIR": str(outside / "tb")},
                    PATHS={key: str(outside / key.lower()) for key in ("CHECKPOINT", "RESULT_DIR", "PER_IMAGE",
                                                                      "CHARTS", "TRAIN_LOGS", "DA_SAMPLES")})
    assert world.run(cfg, "constant") == 0
    job = Job(world.out, GOOD, job_id)
    state = torch.load(job.checkpoint("last"), weights_only=True)
    assert all(np.isfinite(r["train_loss"]) and np.isfinite(r["val_loss"]) for r in state["history"])
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert not outside.exists()
    assert any(job.per_image.iterdir()) and any(job.train_logs.iterdir())


# ------------------------------------------------------------------ labels (segmentation)
def _seg_cfg(world, x, y):
    return world.cfg(PROBLEM={"TYPE": "SEMANTIC_SEG"}, MODEL={"N_CLASSES": 2},
                     DATA={"TRAIN": {"PATH": str(x), "GT_PATH": str(y)},
                           "TEST": {"PATH": str(world.data["test"][0]), "GT_PATH": str(world.data["test"][1])}})


def test_labels_whose_shape_differs_from_their_image(world, intact, capsys):
    x, y = world.bad_folder("label_shape")
    victim = sorted(y.iterdir())[1]
    write_image(victim, np.zeros((30, 30, 1), np.uint8), 2)
    assert world.run(_seg_cfg(world, x, y), "label_shape") == 3
    one_error_line(capsys, victim.name, "does not match its image")


def test_non_integer_labels(world, intact, capsys):
    x, y = world.bad_folder("label_float")
    victim = sorted(y.iterdir())[1]
    labels = read_image(victim, 2).astype(np.float32)
    labels[0, 0, 0] = 0.5
    write_image(victim, labels, 2)
    assert world.run(_seg_cfg(world, x, y), "label_float") == 3
    one_error_line(capsys, victim.name, "integer")


def test_labels_with_class_ids_beyond_n_classes(world, intact, capsys):
    x, y = world.bad_folder("label_ids")
    victim = sorted(y.iterdir())[1]
    labels = read_image(victim, 2)
    labels[labels > 0] = 5
    write_image(victim, labels, 2)
    assert world.run(_seg_cfg(world, x, y), "label_ids") == 3
    one_error_line(capsys, victim.name, "class id 5", "MODEL.N_CLASSES is 2")


# ------------------------------------------------------------------ checkpoints
def _from_checkpoint(world, ckpt, **sections):
    sections.setdefault("TRAIN", {"ENABLE": False})
    cfg = world.cfg(**sections)
    cfg["MODEL"]["LOAD_CHECKPOINT"] = True
    cfg["PATHS"] = {"CHECKPOINT_FILE": str(ckpt)}
    return cfg


def test_a_fine_tune_refused_for_its_checkpoint_leaves_no_run_folder(world, intact, capsys):
    """Augmentation samples are written once the starting checkpoint was accepted, not before its check."""
    cfg = _from_checkpoint(world, world.good_job.checkpoint("best"), TRAIN={"EPOCHS": 1},
                           AUGMENTOR={"ENABLE": True, "HFLIP": True, "AUG_SAMPLES": True, "AUG_NUM_SAMPLES": 2})
    cfg["MODEL"]["ARCHITECTURE"] = "resunet"
    assert world.run(cfg, "refused_arch", name="refused_arch") == 4
    one_error_line(capsys, "'unet' model but MODEL.ARCHITECTURE is 'resunet'")
    assert not (world.out / "refused_arch").exists()


def test_checkpoint_missing(world, intact, capsys):
    ckpt = world.root / "none.pth"
    assert world.run(_from_checkpoint(world, ckpt), "ckpt_missing") == 4
    one_error_line(capsys, "none.pth", "not found", "PATHS.CHECKPOINT_FILE")
    # Found before any work: no run of the job was started (the config checks run first).
    assert world.run(_from_checkpoint(world, ckpt, TRAIN={"EPOCHS": 1}), "ckpt_missing_train", name="fresh") == 4
    assert not (world.out / "fresh").exists()


def test_checkpoint_file_that_is_a_folder(world, intact, capsys):
    assert world.run(_from_checkpoint(world, world.root), "ckpt_folder") == 4
    one_error_line(capsys, "PATHS.CHECKPOINT_FILE", "is a folder", "expected a checkpoint file")


@pytest.mark.parametrize("train", [True, False])
def test_load_checkpoint_without_a_file_on_a_new_run_says_so_before_any_work(world, intact, capsys, train):
    cfg = _from_checkpoint(world, "", TRAIN={"ENABLE": train, "EPOCHS": 1})
    assert world.run(cfg, "ckpt_empty", name="own_start") == 4
    one_error_line(capsys, "MODEL.LOAD_CHECKPOINT is True and PATHS.CHECKPOINT_FILE is empty",
                   "own_start_", "does not exist")
    assert not (world.out / "own_start").exists()  # before the data step: no degraded copies, no run folder


def test_testing_a_pretext_checkpoint_as_a_segmentation_model_is_refused(world, intact, capsys):
    """Its head is the pretext task's (made anew, untrained): scores would mean nothing, and replace the run's."""
    x, y = world.data["train"]
    cfg = _seg_cfg(world, x, y)
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
    assert world.run(_from_checkpoint(world, ckpt), f"ckpt_{how}") == 4
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
    assert world.run(_from_checkpoint(world, ckpt), "ckpt_pickled") == 4
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
    assert world.run(_from_checkpoint(world, download, TRAIN={"EPOCHS": 1}), "foreign", name="foreign") == 0
    assert "model.pth: ignoring config, metadata" in capsys.readouterr().out
    assert sorted(p.name for p in (world.root / "dl").iterdir()) == ["checkpoints"]
    torch.save({"model": dict(weights, extra="x")}, download)
    assert world.run(_from_checkpoint(world, download, TRAIN={"EPOCHS": 1}), "foreign_value", name="foreign2") == 4
    one_error_line(capsys, "model.pth", "'model' entry 'extra' holds a str; expected tensors only")


def test_checkpoint_of_another_architecture(world, intact, capsys):
    ckpt = world.good_job.checkpoint("best")
    cfg = _from_checkpoint(world, ckpt, MODEL={"ARCHITECTURE": "resunet"})
    assert world.run(cfg, "ckpt_arch") == 4
    one_error_line(capsys, ckpt.name, "'unet'", "resunet")


def test_checkpoint_of_other_widths_names_the_keys_to_set(world, intact, capsys):
    ckpt = world.good_job.checkpoint("best")
    model = dict(world.cfg()["MODEL"], FEATURE_MAPS=[4, 8, 32])
    assert world.run(_from_checkpoint(world, ckpt, MODEL=model), "ckpt_widths") == 4
    one_error_line(capsys, ckpt.name, "do not fit the model",
                   "Set as in the pretraining: MODEL.FEATURE_MAPS [4, 8, 16] in the checkpoint, [4, 8, 32] here")


def test_checkpoint_and_config_disagree_on_ndim(world, intact, capsys):
    cfg = tiny_config(world.data, 3, TRAIN={"ENABLE": False})
    cfg["MODEL"]["LOAD_CHECKPOINT"] = True
    cfg["PATHS"] = {"CHECKPOINT_FILE": str(world.good_job.checkpoint("best"))}
    assert world.run(cfg, "ckpt_ndim") == 4
    one_error_line(capsys, "checkpoint is 2D", "PROBLEM.NDIM is 3D")


def test_checkpoint_and_config_disagree_on_channels(world, intact, capsys):
    cfg = _from_checkpoint(world, world.good_job.checkpoint("best"), DATA={"PATCH_SIZE": (32, 32, 3)})
    assert world.run(cfg, "ckpt_channels") == 4
    one_error_line(capsys, "1 input channel(s)", "DATA.PATCH_SIZE asks for 3")


# ------------------------------------------------------------------ where results go
def test_result_folder_not_writable(world, intact, capsys):
    blocker = world.root / "a_file"
    blocker.write_text("")
    assert world.run(world.cfg(), "unwritable", result_dir=blocker / "sub") == 2
    one_error_line(capsys, "--result_dir", "a_file")
    assert world.run(world.cfg(), "result_dir_file", result_dir=blocker) == 2
    one_error_line(capsys, "--result_dir", "a_file is a file; expected a folder")


def test_job_folder_that_is_a_file_is_refused_before_any_work(world, intact, capsys):
    """It had been found only after the data were prepared, as 'config_files: Not a directory' (exit 1)."""
    (world.out / "jobfile").write_text("")
    assert world.run(world.cfg(), "job_is_file", name="jobfile") == 2
    one_error_line(capsys, "--name", "jobfile is a file; expected a folder")
    assert (world.out / "jobfile").read_text() == ""


def test_two_training_images_with_one_stem_are_refused(world, intact, capsys):
    """'x.jpg' and 'x.png' in one folder had the one copy 'x.png': training paired an image with the other's copy."""
    x, _ = world.bad_folder("stems")
    from PIL import Image
    Image.fromarray(np.full((40, 40), 7, np.uint8)).save(x / "same.png")
    Image.fromarray(np.full((40, 40), 9, np.uint8)).save(x / "same.jpg")
    assert world.run(world.cfg(DATA={"TRAIN": {"PATH": str(x)}}), "stems") == 3
    one_error_line(capsys, "DATA.TRAIN.PATH", "same.jpg and same.png would write the same output files")


@pytest.mark.parametrize("task", ["crappify", "masking"])
def test_file_names_that_are_not_utf8_run_through(world, capsys, task):
    """Latin-1 names from an old share (Python holds their odd bytes as escapes): crappify's seed, the masking
    check's TensorBoard tag and the metrics CSV had stopped the run with a UnicodeEncodeError."""
    folders = {}
    for split in ("train", "test"):
        folders[split] = world.root / "latin1" / split
        folders[split].mkdir(parents=True, exist_ok=True)
        for i, src in enumerate(sorted(world.data[split][0].iterdir())):
            shutil.copy(src, os.path.join(os.fsencode(folders[split]), b"caf\xe9_%d.tif" % i))
    cfg = world.cfg(PROBLEM={"SELF_SUPERVISED": {"PRETEXT_TASK": task}}, TEST={"ENABLE": True},
                    DATA={"TRAIN": {"PATH": str(folders["train"])}, "TEST": {"PATH": str(folders["test"])}})
    assert world.run(cfg, f"latin1_{task}", name=f"latin1_{task}") == 0, capsys.readouterr().err
    job = Job(world.out, f"latin1_{task}", world.next_id)
    rows = job.metrics_csv.read_text(encoding="utf-8").splitlines()
    assert len(rows) == 1 + len(list(folders["test"].iterdir())) and rows[1].startswith("caf\ufffd_0.tif,")


def test_file_names_near_the_length_limit_are_written(tmp_path):
    """The temporary beside a 250-byte name (legal) had been 12 bytes too long: 'File name too long'."""
    from biapy.utils.files import atomic_write_text
    for path in (tmp_path / ("a" * 246 + ".csv"), tmp_path / ("\N{MICROSCOPE}" * 60 + ".csv")):  # 4-byte characters
        atomic_write_text(path, "x")
        assert path.read_text() == "x"
    assert len(list(tmp_path.iterdir())) == 2


@pytest.mark.parametrize("name", ["../evil", "a/b", "..", "a..b", "/abs"])
def test_name_with_path_separators_or_dotdot(world, intact, capsys, name):
    assert world.run(world.cfg(), "bad_name", name=name) == 2
    one_error_line(capsys, "--name", repr(name))
    assert not (world.root / "evil").exists()


@pytest.mark.parametrize("result_dir", ["", "  "])
def test_empty_result_dir(world, intact, capsys, tmp_path, monkeypatch, result_dir):
    """An unset shell variable: the job folder had been made in the current folder."""
    monkeypatch.chdir(tmp_path)
    cfg = world.write_cfg(world.cfg(), "empty_result_dir")
    assert main(["--config", str(cfg), "--result_dir", result_dir, "--name", "here", "--run_id", "1"]) == 2
    one_error_line(capsys, "--result_dir is empty")
    assert not (tmp_path / "here").exists()


@pytest.mark.parametrize("run_id", ["../1", "1/2", "-1"])
def test_run_id_must_be_a_plain_number(world, intact, capsys, run_id):
    path = world.write_cfg(world.cfg(), "bad_run_id")
    try:
        code = main(["--config", str(path), "--result_dir", str(world.out), "--name", GOOD, "--run_id", run_id])
    except SystemExit as stop:  # argparse: usage line + one error line
        code = stop.code
    assert code == 2
    err = capsys.readouterr().err
    assert "--run_id" in err and "Traceback" not in err


def test_gpu_that_does_not_exist(world, intact, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "FakeGPU")
    with pytest.raises(ConfigError, match=r"--gpu: device 3 does not exist"):
        resolve_device("3")
    with pytest.raises(ConfigError, match="--gpu"):
        resolve_device("x")
    assert world.run(world.cfg(), "bad_gpu", extra=["--gpu", "0,3"]) == 2
    one_error_line(capsys, "--gpu", "device 3")


def test_batch_size_larger_than_the_dataset(world, intact, capsys):
    assert world.run(world.cfg(TRAIN={"EPOCHS": 1, "BATCH_SIZE": 500}), "big_batch") == 3
    one_error_line(capsys, "TRAIN.BATCH_SIZE", "500")


# ------------------------------------------------------------------ failures while running
def test_disk_full_while_saving_a_checkpoint(world, intact, capsys, monkeypatch):
    def full(obj, f, *a, **k):
        Path(f).write_bytes(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", full)
    job_id = world.next_id + 1
    code = world.run(world.cfg(), "disk_full")
    assert code != 0
    one_error_line(capsys, "No space left on device", f"{GOOD}_{job_id}-checkpoint-last.pth")
    ckpts = Job(world.out, GOOD, job_id).checkpoint_dir
    assert not [p for p in ckpts.iterdir() if p.name.startswith(f".{GOOD}_{job_id}")]  # no temporary left


def test_disk_full_names_the_checkpoint_though_the_train_log_then_fails_too(world, intact, capsys, monkeypatch):
    """Once the disk is full, the train log written as training ends fails as well: its error had replaced the
    checkpoint's ('ERROR: No space left on device', no file named)."""
    import biapy.engine.reporting as reporting

    full_disk = []

    def full(obj, f, *a, **k):
        full_disk.append(True)
        raise OSError(errno.ENOSPC, "No space left on device")

    def train_log(path, history, real=reporting.write_train_log):
        if full_disk:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, history)
    monkeypatch.setattr(torch, "save", full)
    monkeypatch.setattr(reporting, "write_train_log", train_log)
    job_id = world.next_id + 1
    assert world.run(world.cfg(), "disk_full_log") != 0
    one_error_line(capsys, "No space left on device", f"{GOOD}_{job_id}-checkpoint-last.pth")


def test_a_killed_save_leaves_no_temporary_for_good(tmp_path):
    """A run killed while it saved a checkpoint left `.NAME-checkpoint-last.pth.tmpPID` (hundreds of MB) for ever:
    the next save removes those of processes that no longer run."""
    import subprocess
    import sys

    from biapy.engine.checkpoint import save_checkpoint
    path = tmp_path / "job_1-checkpoint-last.pth"
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".{path.name}.tmp{int(gone.stdout)}"  # a process that has ended
    stale.write_bytes(b"half a checkpoint")
    live = tmp_path / f".{path.name}.tmp1"  # init, which runs: another process may still be writing it
    live.write_bytes(b"in progress")
    other = tmp_path / ".job_1-checkpoint-best.pth.tmp999999999"  # another file's: not this save's business
    other.write_bytes(b"x")
    save_checkpoint(path, {"model": {"w": torch.ones(2)}})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, live.name, other.name])


def test_temporaries_of_a_run_killed_outright_are_removed_by_the_next(world, capsys):
    """kill -9 (or the out-of-memory killer) while a file was written left its temporary for good: charts and
    logs in the results, and degraded copies (gigabytes for a volume) beside the user's images."""
    import subprocess
    import sys

    from biapy.config.derived import ssl_copy_dir
    from biapy.config.load import load_config
    from biapy.data.crappify import copies_folder

    gone = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    x, _ = world.bad_folder("killed")
    cfg = world.cfg(DATA={"TRAIN": {"PATH": str(x)}})
    assert world.run(cfg, "killed", name="killed", run_id=1) == 0
    job = Job(world.out, "killed", 1)
    copies = copies_folder(ssl_copy_dir(load_config(cfg).DATA, "TRAIN"), 0.2, 4, 0)
    left = [job.charts / f".{job.id}_loss.png.tmp{gone}", job.train_logs / f".{job.id}_log.txt.tmp{gone}",
            copies / f".{sorted(x.iterdir())[0].name}.tmp{gone}", copies / f".manifest.json.tmp{os.getppid()}"]
    for path in left:
        path.write_bytes(b"half a file")
    live = job.charts / f".other.png.tmp{os.getppid()}"  # a process that runs may be writing it
    live.write_bytes(b"in progress")
    assert world.run(cfg.copy() | {"TRAIN": {"EPOCHS": 2}}, "killed", name="killed", run_id=1) == 0
    assert not any(p.exists() for p in left) and live.exists()  # under the copies' lock: every temporary


def test_disk_full_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    from biapy.engine.checkpoint import save_checkpoint
    path = tmp_path / "c.pth"
    save_checkpoint(path, {"model": {"w": torch.ones(2)}})
    before = path.read_bytes()

    def full(obj, f, *a, **k):
        Path(f).write_bytes(b"half")
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(BiapyError, match="c.pth"):
        save_checkpoint(path, {"model": {"w": torch.zeros(2)}})
    assert path.read_bytes() == before and list(tmp_path.iterdir()) == [path]


@pytest.mark.parametrize("error, says", [
    (OSError(errno.ENOSPC, "No space left on device"), "No space left on device"),
    # numpy's short write on a full disk has no errno (a real 4 MB tmpfs): the line asks about the disk
    (OSError("589824 requested and 36528 written"), "589824 requested and 36528 written); is the disk full?"),
])
def test_disk_full_while_writing_a_result_image(world, intact, capsys, monkeypatch, error, says):

    def full(*a, **k):
        raise error
    monkeypatch.setattr(tifffile, "imwrite", full)
    cfg = _from_checkpoint(world, world.good_job.checkpoint("best"))
    assert world.run(cfg, "disk_full_image") != 0
    one_error_line(capsys, "cannot write (", says)


def test_non_finite_loss_names_epoch_and_step(world, intact, capsys, monkeypatch):
    from biapy.workflows.crappify import CrappifyWorkflow
    real = CrappifyWorkflow.compute_loss

    def nan_loss(self, batch, train):
        loss, out = real(self, batch, train)
        return loss * float("nan"), out
    monkeypatch.setattr(CrappifyWorkflow, "compute_loss", nan_loss)
    assert world.run(world.cfg(), "nan_loss") == 5
    one_error_line(capsys, "epoch 1", "step 1")


def test_out_of_memory_says_what_to_lower(world, intact, capsys, monkeypatch):
    from biapy.workflows.crappify import CrappifyWorkflow

    def oom(self, batch, train):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    monkeypatch.setattr(CrappifyWorkflow, "compute_loss", oom)
    assert world.run(world.cfg(), "oom") == 1
    one_error_line(capsys, "out of memory", "Tried to allocate 20.00 GiB", "TRAIN.BATCH_SIZE", "MODEL.ACTIVATION_CHECKPOINTING")


def test_a_killed_loader_worker_is_one_line_that_says_what_to_lower(world, intact, capsys, monkeypatch):
    """torch's RuntimeError when the kernel kills a DataLoader worker (out of memory, say) had been a traceback."""
    from biapy.workflows.crappify import CrappifyWorkflow

    def killed(self, batch, train):
        raise RuntimeError("DataLoader worker (pid 4242) is killed by signal: Killed. ")
    monkeypatch.setattr(CrappifyWorkflow, "compute_loss", killed)
    assert world.run(world.cfg(), "worker_killed") == 1
    one_error_line(capsys, "data-loading worker (pid 4242) was killed (Killed)", "SYSTEM.NUM_WORKERS",
                   "run the same command again to resume")


@pytest.mark.parametrize("error, code, culprit", [
    (lambda: DataError("/d/img_005.tif: cannot read image (ValueError: mmap length is greater than file size)"), 3,
     "ERROR: /d/img_005.tif: cannot read image (ValueError: mmap length"),
    (lambda: FileNotFoundError(2, "No such file or directory", "/d/img_005.tif"), 1,
     "ERROR: [Errno 2] No such file or directory: '/d/img_005.tif'"),
])
def test_an_error_in_a_loader_worker_is_its_own_one_line(world, intact, capsys, monkeypatch, error, code, culprit):
    """torch raises a worker's error again with the worker's whole traceback in its message ('Caught DataError in
    DataLoader worker process 0.' and ~20 lines): only the error's own line is shown."""
    from torch._utils import ExceptionWrapper

    from biapy.workflows.crappify import CrappifyWorkflow

    def in_worker(self, batch, train):
        try:
            raise error()
        except Exception:
            ExceptionWrapper(where="in DataLoader worker process 0").reraise()
    monkeypatch.setattr(CrappifyWorkflow, "compute_loss", in_worker)
    assert world.run(world.cfg(), "worker_error") == code
    assert one_error_line(capsys, culprit).startswith(culprit) and "Caught" not in capsys.readouterr().err


def test_sigterm_outside_training_exits_130_without_traceback(world, intact, capsys, monkeypatch):
    import os
    import signal

    from biapy.workflows.crappify import CrappifyWorkflow

    def killed(self, files=None):
        os.kill(os.getpid(), signal.SIGTERM)
    monkeypatch.setattr(CrappifyWorkflow, "test", killed)
    before = signal.getsignal(signal.SIGTERM)
    assert world.run(_from_checkpoint(world, world.good_job.checkpoint("best")), "sigterm_test") == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Interrupted" in err
    assert signal.getsignal(signal.SIGTERM) is before


def test_traceback_only_with_verbose(world, intact, capsys):
    path = world.write_cfg(world.cfg(TRAIN={"EPOCH": 2}), "verbose")
    args = ["--config", str(path), "--result_dir", str(world.out), "--name", GOOD, "--run_id", "1"]
    quiet = subprocess.run([sys.executable, str(ROOT / "main.py"), *args], capture_output=True, text=True, cwd=ROOT)
    assert quiet.returncode == 2
    assert "Traceback" not in quiet.stderr and quiet.stderr.strip().splitlines() == [
        f"ERROR: {path}: unknown key TRAIN.EPOCH; did you mean TRAIN.EPOCHS?"]
    assert main(args + ["--verbose"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("ERROR: ")


# ------------------------------------------------------------------ failed runs leave nothing changed
@pytest.mark.parametrize("train", [False, True])  # True: training already finished, so only the test runs
def test_a_test_rerun_that_fails_midway_keeps_the_runs_outputs_and_metrics(world, intact, capsys, train):
    """The first test image is written before the second (NaN) one fails: the staged outputs are dropped,
    per_image/, the metrics CSV and the config copies of run 1 stay as they were (`intact`)."""
    x, _, victim = _spoil_first(world, f"rerun_nan_test_{train}", _one_nan_pixel)
    cfg = world.cfg(TRAIN={"ENABLE": train, "EPOCHS": 1}, TEST={"ENABLE": True}, DATA={"TEST": {"PATH": str(x)}})
    assert world.run(cfg, f"rerun_nan_test_{train}", run_id=1) == 3
    one_error_line(capsys, victim.name, "NaN")
    assert not (world.good_job.results / ".per_image.partial").exists()


def test_a_new_test_only_run_without_a_checkpoint_leaves_no_run_behind(world, intact, capsys):
    cfg = world.cfg(TRAIN={"ENABLE": False}, TEST={"ENABLE": True})
    assert world.run(cfg, "no_ckpt_new", run_id=None) == 4  # the next free ID: it has no checkpoint
    line = one_error_line(capsys, "no checkpoint of run", "runs with checkpoints: 1", "(pass --run_id)")
    new_id = int(line.split("no checkpoint of run ")[1].split()[0])
    assert not Job(world.out, GOOD, new_id).results.exists()


def test_test_images_that_would_write_the_same_output(world, intact, capsys):
    x, _ = world.bad_folder("same_stem", split="test")
    first = sorted(x.iterdir())[0]
    shutil.copy(first, x / (first.stem + ".tiff"))
    cfg = _from_checkpoint(world, world.good_job.checkpoint("best"), DATA={"TEST": {"PATH": str(x)}})
    assert world.run(cfg, "same_stem") == 3
    one_error_line(capsys, "DATA.TEST.PATH", first.name, first.stem + ".tiff", "rename one")


def test_nothing_to_do_is_a_config_error(world, intact, capsys):
    assert world.run(world.cfg(TRAIN={"ENABLE": False}, TEST={"ENABLE": False}), "nothing", run_id=1) == 2
    one_error_line(capsys, "TRAIN.ENABLE and TEST.ENABLE are both False")


# ------------------------------------------------------------------ the notebook API
def test_api_takes_numpy_values_and_paths_in_a_dict_config(world):
    """A sweep's np.float64 LR had passed the checks, then stopped the run when its YAML copy was written (a
    RepresenterError, after data preparation, with the run's folders left behind)."""
    from biapy import BiaPy

    cfg = world.cfg(TRAIN={"EPOCHS": np.int64(1), "LR": np.logspace(-3, -2, 2)[0]})
    cfg["DATA"]["TRAIN"]["PATH"] = Path(cfg["DATA"]["TRAIN"]["PATH"])
    job = BiaPy(cfg, world.out, "numpy_values", run_id=np.int64(1)).run_job()
    assert job.checkpoint("last").is_file()
    copied = yaml.safe_load((job.config_files / "numpy_values.yaml").read_text())
    assert copied["TRAIN"]["LR"] == 0.001 and copied["DATA"]["TRAIN"]["PATH"] == str(world.data["train"][0])


@pytest.mark.parametrize("run_id", [1.5, True, "2", -1])
def test_api_run_id_must_be_a_non_negative_integer(world, run_id):
    """1.5 or True had named run folders next_run_id never sees, '2' had raised a TypeError."""
    from biapy import BiaPy

    with pytest.raises(ConfigError, match="--run_id: .* must be a non-negative integer"):
        BiaPy(world.cfg(), world.out, "bad_id", run_id=run_id).run_job()
    assert not (world.out / "bad_id").exists()


def test_api_gives_the_callers_logging_threads_and_random_state_back(world):
    """In a notebook, a job had replaced the session's own handlers and levels for good, set torch's thread count
    to its own and reseeded torch's global generator."""
    import logging

    from biapy import BiaPy

    mine = logging.NullHandler()
    lg = logging.getLogger("biapy")
    lg.addHandler(mine)
    lg.setLevel(logging.WARNING)
    handlers = list(lg.handlers)  # with those of earlier jobs of this process run through main()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(123)
    try:
        BiaPy(world.cfg(SYSTEM={"NUM_CPUS": 2}), world.out, "caller_state", run_id=1).run_job()
        assert lg.handlers == handlers and lg.level == logging.WARNING
        assert torch.get_num_threads() == 1 and torch.initial_seed() == 123
        with pytest.raises(ConfigError):  # a failed job gives them back too
            BiaPy(world.cfg(TRAIN={"EPOCH": 1}), world.out, "caller_state").run_job()
        assert lg.handlers == handlers and torch.get_num_threads() == 1
    finally:
        lg.removeHandler(mine)
        lg.setLevel(logging.NOTSET)
        torch.set_num_threads(threads)


# ------------------------------------------------------------------ found by the audit of bad input
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
    cfg = _from_checkpoint(world, ckpt, TRAIN={"EPOCHS": 1})
    cfg["MODEL"]["LOAD_CHECKPOINT_ONLY_WEIGHTS"] = False
    assert world.run(cfg, "foreign_training", name="foreign_training") == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "Continuing from epoch 0 of foreign_training.pth" in out
    assert says is None or f"foreign_training.pth: {says}" in out


def test_a_foreign_checkpoint_s_training_state_of_another_layout_is_one_line(world, intact, capsys):
    ckpt = world.root / "foreign_layout.pth"
    weights = torch.load(world.good_job.checkpoint("best"), weights_only=True)["model"]
    torch.save({"model": weights, "epoch": 0, "scheduler": {"step": None}}, ckpt)
    cfg = _from_checkpoint(world, ckpt, TRAIN={"EPOCHS": 1})
    cfg["MODEL"]["LOAD_CHECKPOINT_ONLY_WEIGHTS"] = False
    assert world.run(cfg, "foreign_layout", name="foreign_layout") == 4
    one_error_line(capsys, "foreign_layout.pth: its training state (optimizer, scheduler, epoch counters) is not of "
                   "this tool's layout (TypeError", "set MODEL.LOAD_CHECKPOINT_ONLY_WEIGHTS True to load its weights only")


def test_testing_another_task_s_checkpoint_under_a_fine_tuned_run_s_id_names_the_task(world, intact, capsys):
    """It had advised a new --run_id, under which the test was then refused for the other task's head."""
    x, y = world.data["train"]
    cfg = _seg_cfg(world, x, y)
    assert world.run(cfg, "seg_own", name="seg_own", run_id=1) == 0
    capsys.readouterr()
    cfg["TRAIN"] = {"ENABLE": False}
    cfg["TEST"] = {"ENABLE": True}
    cfg["MODEL"]["LOAD_CHECKPOINT"] = True
    cfg["PATHS"] = {"CHECKPOINT_FILE": str(world.good_job.checkpoint("best"))}
    before = _hashes(world.out / "seg_own")
    assert world.run(cfg, "seg_test_pretext", name="seg_own", run_id=1) == 4
    line = one_error_line(capsys, "good_1-checkpoint-best.pth", "trained for SELF_SUPERVISED crappify but this "
                          "config asks for SEMANTIC_SEG", "test a checkpoint of this task")
    assert "--run_id" not in line
    assert _hashes(world.out / "seg_own") == before


def test_a_name_too_long_for_its_file_names_is_refused_before_any_work(world, intact, capsys):
    """250 characters had trained a whole epoch, then failed to save it ('File name too long'); 300 had failed
    with a bare OS error."""
    for name in ("n" * 219, "n" * 300):
        assert world.run(world.cfg(), "long_name", name=name) == 2
        one_error_line(capsys, "--name", f"is {len(name)} characters long", "at most 218", "255 bytes")
        assert name not in os.listdir(world.out)
    # The longest takes a 12-digit run ID (a scheduler's job ID) and epoch-numbered checkpoints up to 8 digits.
    assert world.run(world.cfg(), "longest_name", name="n" * 218, run_id=10 ** 12 - 1) == 0
    job = Job(world.out, "n" * 218, 10 ** 12 - 1)
    assert job.checkpoint("last").is_file() and len(job.checkpoint(10 ** 8 - 1).name) == 255


@pytest.mark.parametrize("suffix", [".h5", ".hdf5", ".zarr", ".tif"])
def test_a_data_path_that_is_a_file_is_called_a_file(world, intact, capsys, suffix):
    """An existing .h5/.hdf5/.zarr file had been reported as a folder that 'does not exist'."""
    image = world.root / f"volume{suffix}"
    image.write_bytes(b"data")
    assert world.run(world.cfg(DATA={"TRAIN": {"PATH": str(image)}}), "data_file") == 2
    one_error_line(capsys, f"DATA.TRAIN.PATH: {image} is a file; expected a folder of images (put volume{suffix} "
                   "in a folder of its own)")


@pytest.mark.parametrize("key, path", [
    ("DATA.TRAIN.PATH", "/tmp/" + "a" * 300),
    ("DATA.TEST.PATH", "/tmp" + ("/" + "b" * 200) * 25),  # 5 KB: longer than PATH_MAX
    ("PATHS.CHECKPOINT_FILE", "/tmp/" + "c" * 300 + ".pth"),
], ids=["name_over_255_bytes", "path_over_path_max", "checkpoint_name_over_255_bytes"])
def test_a_path_too_long_to_look_up_names_its_key(world, intact, capsys, key, path):
    """Path.exists() raises on such a path: it had ended as 'ERROR: /…: File name too long' (exit 1)."""
    section, name = key.split(".", 1)
    values = {"TRAIN": {"PATH": path}} if key == "DATA.TRAIN.PATH" else {"TEST": {"PATH": path}}
    cfg = world.cfg(DATA=values, TEST={"ENABLE": True}) if section == "DATA" else _from_checkpoint(world, path)
    assert world.run(cfg, "path_too_long") == 2
    one_error_line(capsys, f"{key}: cannot look up", "File name too long")


@pytest.mark.parametrize("key", ["DATA.TRAIN.SSL_SOURCE_DIR", "DATA.TRAIN.PATH", "PATHS.CHECKPOINT_FILE"])
def test_a_nul_character_in_a_path_is_named(world, intact, capsys, key):
    """It had ended in 'ValueError: embedded null byte' (a traceback), or an error line holding the NUL."""
    section, rest = key.split(".", 1)
    cfg = world.cfg()
    node = cfg.setdefault(section, {})
    for part in rest.split(".")[:-1]:
        node = node.setdefault(part, {})
    node[rest.split(".")[-1]] = "/tmp/x\0y"
    assert world.run(cfg, "nul_path") == 2
    line = one_error_line(capsys, f"{key}: '/tmp/x\\x00y' holds a NUL character; expected a file system path")
    assert "\0" not in line


@pytest.mark.parametrize("task", ["masking"])  # crappify refuses its float32 copy of it first (as NaN or Inf)
def test_pixel_values_too_large_to_normalize_are_named(world, intact, capsys, task):
    """float64 pixels near 1e300 had printed overflow warnings, then been called NaN or Inf."""
    def spoil(p):
        tifffile.imwrite(p, 1e300 * np.random.default_rng(0).random((48, 48)))  # float64, kept so
    x, _, victim = _spoil_first(world, f"too_large_{task}", spoil)
    cfg = world.cfg(PROBLEM={"SELF_SUPERVISED": {"PRETEXT_TASK": task}}, DATA={"TRAIN": {"PATH": str(x)}})
    assert world.run(cfg, f"too_large_{task}") == 3
    one_error_line(capsys, victim.name, "pixel values up to 1e+300 in magnitude are too large to normalize",
                   "expected values below about 3.4e38")
