"""Crappify end to end, 2D and 3D: every file of the results tree, shapes, metrics."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from biapy import BiaPy
from biapy.cli import main
from biapy.data.image_writing import write_image
from biapy.data.io import open_image_lazy, read_image
from biapy.engine.checkpoint import load_checkpoint
from tests.conftest import tiny_config


def run(cfg, tmp_path, name="job", run_id=1):
    return BiaPy(cfg, result_dir=tmp_path / "out", name=name, run_id=run_id).run_job()


def train_log(job):
    files = sorted(job.train_logs.glob("*.jsonl"))
    assert files, "no train log written"
    return [json.loads(line) for line in files[0].read_text().splitlines() if line.strip()]


def check_results_tree(job, data, ndim, extra_columns=()):
    assert (job.config_files / f"{job.name}.yaml").is_file()
    assert job.resolved_config.is_file() and "&id" not in job.resolved_config.read_text()  # no shared values
    assert job.checkpoint("best").is_file() and job.checkpoint("last").is_file()
    assert (job.charts / f"{job.id}_loss.png").is_file()
    assert list(job.tensorboard.glob("events.out.tfevents*"))
    assert len(train_log(job)) == 2
    test_files = sorted(data["test"][0].iterdir())
    for src in test_files:
        out = job.per_image / src.name
        assert out.is_file(), out
        assert read_image(out, ndim).shape[:-1] == read_image(src, ndim).shape[:-1]
    with open(job.metrics_csv) as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(test_files)
    for column in ("psnr", "ssim", "mae", "mse", *extra_columns):
        assert all(np.isfinite(float(r[column])) for r in rows), column


@pytest.mark.parametrize("ndim", [2, 3])
def test_crappify_end_to_end(ndim, data2d, data3d, tmp_path, monkeypatch):
    released = []  # a CPU job takes the CUDA libraries' pages out of its memory, once
    monkeypatch.setattr("biapy.utils.memory.drop_gpu_library_pages", lambda: released.append(1) or 0)
    data = data2d if ndim == 2 else data3d
    job = run(tiny_config(data, ndim), tmp_path)
    assert released == [1]
    check_results_tree(job, data, ndim, extra_columns=("input_psnr", "input_ssim"))
    manifests = list((data["train"][0].parent / "x_ssl_source").glob("*/manifest.json"))
    assert [m.parent.name for m in manifests] == ["noise0.2_factor4_seed0"]
    out = tifffile.TiffFile(next(job.per_image.iterdir()))
    assert out.is_imagej  # Fiji reads the axes


def test_lazy_and_in_memory_datasets_give_the_same_first_epoch_loss(data2d, tmp_path):
    losses = []
    for in_memory in (True, False):
        cfg = tiny_config(data2d, 2, DATA={"TRAIN": {"IN_MEMORY": in_memory}, "VAL": {"IN_MEMORY": in_memory}},
                          TRAIN={"EPOCHS": 1}, TEST={"ENABLE": False})
        job = run(cfg, tmp_path / str(in_memory))
        losses.append(train_log(job)[0]["train_loss"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


def test_command_line_override_beats_the_yaml(data2d, tmp_path):
    cfg = tiny_config(data2d, 2, TRAIN={"EPOCHS": 3}, TEST={"ENABLE": False})
    import yaml
    from biapy.config.load import plain_tree
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(plain_tree(cfg)))
    code = main(["--config", str(path), "--result_dir", str(tmp_path / "out"), "--name", "cli", "--run_id", "1",
                 "TRAIN.EPOCHS", "2"])
    assert code == 0
    from biapy.job import Job
    job = Job(tmp_path / "out", "cli", 1)
    assert [e["epoch"] for e in train_log(job)] == [1, 2]
    assert (job.config_files / "c.yaml").read_text() == path.read_text()


def test_run_id_omitted_takes_the_next_free_one_and_test_only_loads_best(data2d, tmp_path):
    cfg = tiny_config(data2d, 2, TRAIN={"EPOCHS": 1}, TEST={"ENABLE": False})
    first = BiaPy(cfg, result_dir=tmp_path / "out", name="auto").run_job()
    assert first.run_id == 1
    test_only = tiny_config(data2d, 2, TRAIN={"ENABLE": False})
    test_only["PATHS"] = {"CHECKPOINT_FILE": str(first.checkpoint("best"))}
    test_only["MODEL"]["LOAD_CHECKPOINT"] = True
    second = BiaPy(test_only, result_dir=tmp_path / "out", name="auto").run_job()
    assert second.run_id == 2
    assert len(list(second.per_image.iterdir())) == 2


def test_a_test_only_job_does_not_import_the_training_charts(data2d, tmp_path):
    """matplotlib (0.65 s of start-up) is imported by the trainer's charts, which a test-only job never draws."""
    import subprocess
    import sys

    first = run(tiny_config(data2d, 2, TRAIN={"EPOCHS": 1}, TEST={"ENABLE": False}), tmp_path, name="trained")
    test_only = tiny_config(data2d, 2, TRAIN={"ENABLE": False}, MODEL={"LOAD_CHECKPOINT": True},
                            PATHS={"CHECKPOINT_FILE": str(first.checkpoint("best"))})
    script = ("import json, sys\nfrom biapy import BiaPy\n"
              f"cfg = json.loads({json.dumps(json.dumps(test_only))})\n"
              "job = BiaPy(cfg, result_dir=sys.argv[1], name='t').run_job()\n"
              "print(len(list(job.per_image.iterdir())), 'matplotlib' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "out")], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-2:] == ["2", "False"]


def test_custom_normalization_of_a_test_only_job_comes_from_the_tested_checkpoint(data2d, tmp_path):
    """A test-only job on another job's checkpoint uses the dataset mean/std stored in that checkpoint, even
    with the .npy copies beside it gone, and restores the images exactly as the training job did."""
    norm = {"NORMALIZATION": {"TYPE": "custom"}}
    trained = run(tiny_config(data2d, 2, TRAIN={"EPOCHS": 1}, DATA=norm), tmp_path, name="trained")
    for npy in trained.checkpoint_dir.glob("normalization_*.npy"):
        npy.unlink()
    cfg = tiny_config(data2d, 2, TRAIN={"ENABLE": False}, DATA=norm, MODEL={"LOAD_CHECKPOINT": True},
                      PATHS={"CHECKPOINT_FILE": str(trained.checkpoint("best"))})
    tested = run(cfg, tmp_path, name="tested")
    outputs = sorted(trained.per_image.iterdir())
    assert len(outputs) == 2
    for out in outputs:
        np.testing.assert_allclose(read_image(tested.per_image / out.name, 2), read_image(out, 2), rtol=1e-5,
                                   atol=1e-4)


@pytest.mark.parametrize("in_memory", [True, False])
def test_test_images_read_up_front_only_with_test_in_memory(in_memory, data2d, tmp_path, monkeypatch):
    import biapy.workflows.base as base

    events = []
    predict = base.Workflow.predict_slabs

    def spy(opener):  # reads of the network's inputs (the degraded test copies), not of the originals scored
        return lambda path, ndim: (Path(path).parent.parent.name.endswith("_ssl_source")
                                   and events.append("read")) or opener(path, ndim)

    # Up front: read whole; one at a time: opened (lazily where the format allows) when its turn comes.
    monkeypatch.setattr(base, "read_image", spy(base.read_image))
    monkeypatch.setattr(base, "open_image_rows", spy(base.open_image_rows))
    monkeypatch.setattr(base.Workflow, "predict_slabs",
                        lambda self, *args: events.append("predict") or predict(self, *args))
    cfg = tiny_config(data2d, 2, TRAIN={"EPOCHS": 1}, DATA={"TEST": {"IN_MEMORY": in_memory}})
    job = run(cfg, tmp_path)
    n = len(list(data2d["test"][0].iterdir()))
    assert n >= 2 and events.count("predict") == n
    test_events = events[events.index("predict") - (n if in_memory else 1):]
    assert test_events == (["read"] * n + ["predict"] * n if in_memory else ["read", "predict"] * n)
    with open(job.metrics_csv) as fh:
        assert len(list(csv.DictReader(fh))) == n


def test_full_image_and_test_time_augmentation_predict_whole_images(data2d, tmp_path, monkeypatch):
    import biapy.workflows.base as base

    calls = []
    augmented = base.predict_augmented
    monkeypatch.setattr(base, "predict_augmented", lambda fn, batch: calls.append(tuple(batch.shape)) or
                        augmented(fn, batch))
    cfg = tiny_config(data2d, 2, TRAIN={"EPOCHS": 1}, TEST={"FULL_IMG": True, "AUGMENTATION": True})
    job = run(cfg, tmp_path)
    tests = sorted(data2d["test"][0].iterdir())
    assert len(calls) == len(tests)  # one augmented forward per image: whole, not by patches
    for src, shape in zip(tests, calls):
        spatial = read_image(src, 2).shape[:-1]
        assert shape[0] == 1 and all(s >= n and s % 4 == 0 for s, n in zip(shape[2:], spatial))  # 2 poolings
        assert read_image(job.per_image / src.name, 2).shape[:-1] == spatial
    with open(job.metrics_csv) as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(tests) and all(np.isfinite(float(r["psnr"])) for r in rows)


@pytest.mark.parametrize("task", ["crappify", "masking"])
def test_3d_test_volumes_are_streamed_and_give_the_in_memory_results(task, data3d, tmp_path, monkeypatch):
    """DATA.TEST.IN_MEMORY False opens a 3D test volume lazily and predicts, writes and scores it a slab
    at a time; with the same statistics, outputs and scores equal those of the volume read whole (to
    float rounding: the trained model runs channels-last, the reloaded one does not)."""
    import functools

    import biapy.data.normalization as normalization
    import biapy.workflows.scoring as scoring
    from biapy.data.lazy_images import LazyTiff

    ssl = {"SELF_SUPERVISED": {"PRETEXT_TASK": task, "MASK_BLOCK_SIZE": 4}}
    trained = run(tiny_config(data3d, 3, PROBLEM=ssl, TRAIN={"EPOCHS": 1}, DATA={"TEST": {"IN_MEMORY": True}}),
                  tmp_path, name="whole")

    def test_only(name, **test):
        cfg = tiny_config(data3d, 3, PROBLEM=ssl, TRAIN={"ENABLE": False}, DATA={"TEST": {"IN_MEMORY": False}},
                          MODEL={"LOAD_CHECKPOINT": True}, PATHS={"CHECKPOINT_FILE": str(trained.checkpoint("best"))},
                          TEST=test)
        return run(cfg, tmp_path, name=name)

    streamed = test_only("streamed")
    for out in trained.per_image.iterdir():
        np.testing.assert_allclose(read_image(streamed.per_image / out.name, 3), read_image(out, 3), rtol=1e-5,
                                   atol=1e-4)
    with open(trained.metrics_csv) as a, open(streamed.metrics_csv) as b:
        whole, slabs = list(csv.DictReader(a)), list(csv.DictReader(b))
    assert len(whole) == len(slabs) == 1 and whole[0].keys() == slabs[0].keys()
    for key in whole[0].keys() - {"file"}:
        assert float(slabs[0][key]) == pytest.approx(float(whole[0][key]), rel=1e-4, abs=1e-5), key

    # Statistics from a strided sample and small scoring slabs (SSIM's window would span this small
    # volume): no read takes the whole volume.
    depth = read_image(next(data3d["test"][0].iterdir()), 3).shape[0]
    spans = []
    getitem = LazyTiff.__getitem__

    def recording(self, key):
        out = getitem(self, key)
        spans.append(out.shape[0] if out.ndim == 4 else 1)
        return out

    monkeypatch.setattr(LazyTiff, "__getitem__", recording)
    monkeypatch.setattr(normalization, "pixel_sample", functools.partial(normalization.pixel_sample, budget=2000))
    monkeypatch.setattr(scoring, "_SLAB_VOXELS", 4000)
    job = test_only("sliced", METRICS=["psnr", "mae", "mse"])
    assert spans and max(spans) < depth
    with open(job.metrics_csv) as fh:
        assert all(np.isfinite(float(v)) for k, v in next(csv.DictReader(fh)).items() if k != "file")


def test_nan_voxels_missed_by_the_statistics_sample_stop_the_streamed_test(data3d, tmp_path, monkeypatch):
    """A lazily read test volume's statistics come from a strided sample; a NaN voxel outside it is still
    caught when its slab is read, with the file and rows named, and no partial output is left."""
    import functools

    import biapy.data.normalization as normalization
    from biapy.errors import DataError

    src = next(data3d["test"][0].iterdir())
    spoilt = tmp_path / "spoilt"
    img = read_image(src, 3).astype(np.float32)
    img[1, 1, 1, 0] = np.nan
    write_image(spoilt / src.name, img, 3)
    monkeypatch.setattr(normalization, "pixel_sample", functools.partial(normalization.pixel_sample, budget=2000))
    assert np.isfinite(normalization.pixel_sample(open_image_lazy(spoilt / src.name, 3))).all()  # the sample misses it
    ssl = {"SELF_SUPERVISED": {"PRETEXT_TASK": "masking", "MASK_BLOCK_SIZE": 4}}
    cfg = tiny_config(data3d, 3, PROBLEM=ssl, TRAIN={"EPOCHS": 1}, DATA={"TEST": {"PATH": str(spoilt)}})
    with pytest.raises(DataError, match=rf"{src.name} \(rows 0\.\.\d+\): 1 pixel\(s\) are NaN or Inf"):
        run(cfg, tmp_path)
    assert not [p for p in (tmp_path / "out").rglob("per_image/*") if p.is_file()]


def test_compiled_model_trains_like_the_eager_one_and_saves_plain_weights(data2d, tmp_path):
    """TRAIN.COMPILE (torch.compile, ~25 s to compile here): same first-epoch loss, checkpoint without wrapper names.
    In float32, from a fresh compiler cache: in bf16 (TRAIN.AMP auto on an AMX CPU) compiled and eager kernels round
    differently, and graphs an earlier test left (dynamic shapes) had moved the loss past 1e-4 in some suite runs."""
    torch._dynamo.reset()
    losses, scores = [], []
    for compile_ in (False, True):
        cfg = tiny_config(data2d, 2, TRAIN={"EPOCHS": 1, "COMPILE": compile_, "AMP": "off"})
        job = run(cfg, tmp_path / str(compile_))
        losses.append(train_log(job)[0]["train_loss"])
        with open(job.metrics_csv) as fh:
            scores.append([float(r["psnr"]) for r in csv.DictReader(fh)])
        keys = list(load_checkpoint(job.checkpoint("best"))["model"])
        assert keys and not any(k.startswith(("_orig_mod.", "module.")) for k in keys)
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)
    assert scores[1] == pytest.approx(scores[0], abs=0.01)


@pytest.mark.parametrize("amp, fast, expected", [("auto", True, torch.bfloat16), ("auto", False, None),
                                                ("off", True, None), ("bf16", False, torch.bfloat16)])
def test_amp_sets_the_precision_of_training_and_test_inference_on_a_cpu(amp, fast, expected, data2d, tmp_path,
                                                                        monkeypatch, capsys):
    """TRAIN.AMP 'auto' trains and predicts in bf16 on a CPU where it is faster (AMX; AMD's AVX-512 BF16), float32
    elsewhere; the written predictions and the scores stay float32 either way."""
    from biapy.models.unet import UNet

    monkeypatch.setattr("biapy.engine.precision.cpu_prefers_bf16", lambda: fast)
    seen = {"train": set(), "test": set()}
    forward = UNet.forward

    def recording_forward(self, x):
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
        seen["train" if torch.is_grad_enabled() else "test"].add(dtype)
        return forward(self, x)

    monkeypatch.setattr(UNet, "forward", recording_forward)
    job = run(tiny_config(data2d, 2, TRAIN={"AMP": amp}), tmp_path)
    assert seen["train"] == {expected} and seen["test"] == {expected}  # "test": validation and test inference
    said = "bf16 mixed precision" if expected else "float32"
    assert f"Device: CPU (no --gpu given); {said} (TRAIN.AMP {amp})" in capsys.readouterr().out
    check_results_tree(job, data2d, 2)
    assert all(tifffile.imread(f).dtype == np.float32 for f in job.per_image.iterdir())


def test_runs_of_one_name_copy_their_yaml_through_temporary_files_of_their_own(data2d, tmp_path):
    """Another run of the same NAME copying the YAML at the same moment: its temporary file (here left in place
    at the name every run had used) must not stop this one (it had: 'config_files/c.yaml.tmp: No such file')."""
    import yaml
    from biapy.config.load import plain_tree
    from biapy.job import Job

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(plain_tree(tiny_config(data2d, 2, TRAIN={"EPOCHS": 1}, TEST={"ENABLE": False}))))
    job = Job(tmp_path / "out", "sweep", 2)
    (job.config_files / "c.yaml.tmp").mkdir(parents=True)  # run 1's copy in progress
    code = main(["--config", str(path), "--result_dir", str(tmp_path / "out"), "--name", "sweep", "--run_id", "2"])
    assert code == 0
    assert (job.config_files / "c.yaml").read_text() == path.read_text()
    assert [p.name for p in job.config_files.iterdir() if p.name.startswith(".")] == []  # no temporary left


def test_a_full_disk_while_copying_the_yaml_names_the_copy_not_the_users_file(data2d, tmp_path, monkeypatch, capsys):
    """shutil's copy reported its source: 'ERROR: .../c.yaml: No space left on device' blamed the user's YAML."""
    import errno

    import yaml
    from biapy.config.load import plain_tree

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(plain_tree(tiny_config(data2d, 2, TRAIN={"EPOCHS": 1}, TEST={"ENABLE": False}))))
    real = Path.write_bytes

    def full(self, data):
        if self.parent.name == "config_files":
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real(self, data)
    monkeypatch.setattr(Path, "write_bytes", full)
    code = main(["--config", str(path), "--result_dir", str(tmp_path / "out"), "--name", "full", "--run_id", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and err.startswith("ERROR: ") and "config_files/.c.yaml.tmp" in err, err
    assert "No space left on device" in err and path.read_text()  # the user's file untouched


@pytest.mark.parametrize("task, ndim", [("crappify", 2), ("crappify", 3), ("masking", 3), ("segmentation", 2)])
def test_outputs_and_degraded_copies_keep_the_calibration_of_their_input(task, ndim, tmp_path):
    """A calibrated test image's per_image output (a segmentation's mask and probabilities too) and the degraded
    copies of crappify have its pixel size, unit and z spacing: ImageJ inputs, and an OME-TIFF one (whose output
    keeps its .ome.tif name, as an ImageJ file)."""
    from biapy.data.synthetic import nuclei_image
    from tests.test_image_writing import expected_calibration, write_calibrated, written_calibration

    shapes = {2: [(48, 56), (52, 48), (48, 48), (60, 50)], 3: [(12, 40, 40), (13, 36, 44), (12, 40, 36)]}[ndim]
    data, kinds = {}, {}
    for split, names in (("train", [f"t{i}.tif" for i in range(len(shapes))]), ("test", ["ij.tif", "om.ome.tif"])):
        x_dir, y_dir = tmp_path / split / "x", tmp_path / split / "y"
        x_dir.mkdir(parents=True), y_dir.mkdir(parents=True)
        for i, name in enumerate(names):
            image, labels = nuclei_image(shapes[i], n_nuclei=4, radius=(3, 6), seed=i)
            kinds[name] = "ome" if name.endswith(".ome.tif") else "imagej"
            write_calibrated(x_dir / name, image[..., 0], kinds[name])
            write_image(y_dir / name, labels[..., None], ndim)  # labels uncalibrated: the outputs take the image's
        data[split] = (x_dir, y_dir)
    ssl = {} if task == "segmentation" else {"SELF_SUPERVISED": {"PRETEXT_TASK": task, "MASK_BLOCK_SIZE": 4}}
    cfg = tiny_config(data, ndim, TRAIN={"EPOCHS": 1}, PROBLEM=ssl)
    if task == "segmentation":
        cfg["PROBLEM"]["TYPE"] = "SEMANTIC_SEG"
        cfg["DATA"]["TRAIN"]["GT_PATH"], cfg["DATA"]["TEST"]["GT_PATH"] = str(data["train"][1]), str(data["test"][1])
        cfg["TEST"] = {"SAVE_PROBABILITIES": True}
    job = run(cfg, tmp_path)
    outputs = {name: [job.per_image / name] for name in ("ij.tif", "om.ome.tif")}
    if task == "segmentation":
        for name in outputs:
            outputs[name].append(job.per_image / f"{name.split('.')[0]}_probabilities.tif")
    if task == "crappify":
        for split in ("train", "test"):
            for copy in (tmp_path / split / "x_ssl_source").glob("*/*.tif"):
                outputs.setdefault(copy.name, []).append(copy)
        assert sum(map(len, outputs.values())) == 2 + len(shapes) + 2  # outputs, then every source's copy
    for name, files in outputs.items():
        for out in files:
            assert tifffile.TiffFile(out).is_imagej, out
            assert written_calibration(out) == expected_calibration(kinds[name], ndim), out
