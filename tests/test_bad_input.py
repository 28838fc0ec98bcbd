"""Bad input a user gives, one row of the README table "Bad input and what it says" per test: the
configuration, crappify's degraded copies, images and labels.

One good tiny run is made first (the module-scoped `world` fixture of conftest.py: one per test file) and
every file it wrote is hashed; each bad case then runs against the same --result_dir (another run ID or name
where the case gets that far) and must exit non-zero with one `ERROR:` line naming the culprit, no traceback,
and leave the good run's files byte-identical (the `intact` fixture).
"""
import errno
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from biapy.data.image_writing import write_image
from biapy.data.io import read_image
from biapy.job import Job
from tests.bad_input_world import GOOD, from_checkpoint, hashes, one_error_line, one_nan_pixel, seg_cfg, spoil_first
from tests.conftest import tiny_config


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


# found by the audit of bad input
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
    cfg = world.cfg(DATA=values, TEST={"ENABLE": True}) if section == "DATA" else from_checkpoint(world, path)
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


# ------------------------------------------------------------------ crappify's degraded copies
@pytest.mark.parametrize("split, target, says", [("TRAIN", "train", "is the image folder of DATA.TRAIN.PATH"),
                                                 ("TRAIN", "test", "is the image folder of DATA.TEST.PATH"),
                                                 ("TEST", "train", "is the image folder of DATA.TRAIN.PATH")])
def test_copy_folder_that_is_an_image_folder_is_refused_and_the_images_stay(world, intact, capsys, split, target,
                                                                         says):
    folders = {"train": world.bad_folder(f"own_{split}_{target}")[0]}
    folders["test"] = world.bad_folder(f"own_{split}_{target}_test", "test")[0]
    before = {k: hashes(v) for k, v in folders.items()}
    data = {"TRAIN": {"PATH": str(folders["train"])}, "TEST": {"PATH": str(folders["test"])}}
    data[split]["SSL_SOURCE_DIR"] = str(folders[target])
    cfg = world.cfg(DATA=data, TEST={"ENABLE": True})
    assert world.run(cfg, f"ssl_{split}_{target}") == 2
    one_error_line(capsys, f"DATA.{split}.SSL_SOURCE_DIR", says, "replace its images")
    assert {k: hashes(v) for k, v in folders.items()} == before


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
def test_ndim_2d_with_3d_stacks(world, intact, capsys):
    x, _, victim = spoil_first(world, "stack_in_2d",
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
    x, _, victim = spoil_first(world, f"unreadable_{how}", spoil)
    assert world.run(world.cfg(DATA={"TRAIN": {"PATH": str(x)}}), f"unreadable_{how}") == 3
    one_error_line(capsys, victim.name)


def test_complex_pixels_are_refused_by_name(world, intact, capsys):

    x, _, victim = spoil_first(world, "complex", lambda p: tifffile.imwrite(
        p, (read_image(p, 2)[..., 0] * (1 + 1j)).astype(np.complex64)))
    assert world.run(world.cfg(DATA={"TRAIN": {"PATH": str(x)}}), "complex") == 3
    one_error_line(capsys, victim.name, "complex64", "expected real numbers")


def test_image_without_pixels(world, intact, capsys):
    import warnings


    def spoil(p):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tifffile warns that such a file is nonconformant: the point here
            tifffile.imwrite(p, np.zeros((0, 0), np.uint8))
    x, _, victim = spoil_first(world, "no_pixels", spoil)
    assert world.run(world.cfg(DATA={"TRAIN": {"PATH": str(x)}}), "no_pixels") == 3
    one_error_line(capsys, victim.name, "holds no pixels")


def test_a_bad_test_image_stops_the_job_before_training(world, intact, capsys):
    x, _, victim = spoil_first(world, "bad_test", lambda p: p.write_bytes(b"this is not a TIFF" * 10))
    cfg = world.cfg(TEST={"ENABLE": True}, DATA={"TEST": {"PATH": str(x)}})
    assert world.run(cfg, "bad_test", run_id=90) == 3
    one_error_line(capsys, victim.name)
    assert not Job(world.out, GOOD, 90).checkpoint("last").exists()


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
    x, _, victim = spoil_first(world, f"nonfinite_{value}", spoil)
    assert world.run(world.cfg(DATA={"TRAIN": {"PATH": str(x)}}), f"nonfinite_{value}") == 3
    one_error_line(capsys, victim.name, "NaN or Inf")


def test_nan_pixels_in_a_test_image(world, intact, capsys):
    x, _, victim = spoil_first(world, "nonfinite_test", one_nan_pixel)
    cfg = from_checkpoint(world, world.good_job.checkpoint("best"), DATA={"TEST": {"PATH": str(x)}})
    assert world.run(cfg, "nonfinite_test") == 3
    one_error_line(capsys, victim.name, "NaN")


def test_a_new_run_refused_for_its_test_images_writes_no_augmentation_samples(world, intact, capsys):
    x, _, victim = spoil_first(world, "nonfinite_test_new_run", one_nan_pixel)
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
    x, _, _ = spoil_first(world, "constant", lambda p: write_image(p, np.full((48, 48, 1), 7, np.uint8), 2))
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


# found by the audit of bad input
@pytest.mark.parametrize("task", ["masking"])  # crappify refuses its float32 copy of it first (as NaN or Inf)
def test_pixel_values_too_large_to_normalize_are_named(world, intact, capsys, task):
    """float64 pixels near 1e300 had printed overflow warnings, then been called NaN or Inf."""
    def spoil(p):
        tifffile.imwrite(p, 1e300 * np.random.default_rng(0).random((48, 48)))  # float64, kept so
    x, _, victim = spoil_first(world, f"too_large_{task}", spoil)
    cfg = world.cfg(PROBLEM={"SELF_SUPERVISED": {"PRETEXT_TASK": task}}, DATA={"TRAIN": {"PATH": str(x)}})
    assert world.run(cfg, f"too_large_{task}") == 3
    one_error_line(capsys, victim.name, "pixel values up to 1e+300 in magnitude are too large to normalize",
                   "expected values below about 3.4e38")


# ------------------------------------------------------------------ labels (segmentation)
def test_labels_whose_shape_differs_from_their_image(world, intact, capsys):
    x, y = world.bad_folder("label_shape")
    victim = sorted(y.iterdir())[1]
    write_image(victim, np.zeros((30, 30, 1), np.uint8), 2)
    assert world.run(seg_cfg(world, x, y), "label_shape") == 3
    one_error_line(capsys, victim.name, "does not match its image")


def test_non_integer_labels(world, intact, capsys):
    x, y = world.bad_folder("label_float")
    victim = sorted(y.iterdir())[1]
    labels = read_image(victim, 2).astype(np.float32)
    labels[0, 0, 0] = 0.5
    write_image(victim, labels, 2)
    assert world.run(seg_cfg(world, x, y), "label_float") == 3
    one_error_line(capsys, victim.name, "integer")


def test_labels_with_class_ids_beyond_n_classes(world, intact, capsys):
    x, y = world.bad_folder("label_ids")
    victim = sorted(y.iterdir())[1]
    labels = read_image(victim, 2)
    labels[labels > 0] = 5
    write_image(victim, labels, 2)
    assert world.run(seg_cfg(world, x, y), "label_ids") == 3
    one_error_line(capsys, victim.name, "class id 5", "MODEL.N_CLASSES is 2")
