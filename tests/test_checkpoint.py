"""Checkpoint files: atomic writes, weights_only loading, tolerant weight loading, clear errors."""
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from biapy.config.defaults import get_defaults
from biapy.engine.checkpoint import (check_compatible, checkpoint_metadata, load_checkpoint, load_weights,
                                     rng_states, save_checkpoint, set_rng_states, to_plain)
from biapy.errors import CheckpointError


def net(out=1):
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, out, 1))


def test_atomic_save_keeps_previous_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pth"
    save_checkpoint(path, {"model": {"w": torch.ones(3)}})
    before = path.read_bytes()

    def broken_save(obj, f, *args, **kwargs):
        with open(f, "wb") as fh:
            fh.write(b"PK\x03\x04half")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    from biapy.errors import BiapyError
    with pytest.raises(BiapyError, match="cannot write the checkpoint"):
        save_checkpoint(path, {"model": {"w": torch.zeros(3)}})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pth"]  # no temporary left behind


def test_payload_loads_with_weights_only(tmp_path):
    cfg = get_defaults()
    model = net()
    opt = torch.optim.AdamW(model.parameters())
    model(torch.rand(1, 1, 8, 8)).sum().backward()
    opt.step()
    payload = {"model": model.state_dict(), "optimizer": opt.state_dict(), "rng": rng_states(),
               "config": cfg.dump(), "metadata": checkpoint_metadata(cfg), "history": [{"epoch": 0, "x": 1.5}],
               "extras": to_plain({"mean": np.array([1.0, 2.0]), "n": np.int64(3)})}
    save_checkpoint(tmp_path / "c.pth", payload)
    state = torch.load(tmp_path / "c.pth", weights_only=True)
    assert state["metadata"]["ndim"] == 2 and state["extras"]["n"] == 3
    assert torch.equal(state["extras"]["mean"], torch.tensor([1.0, 2.0], dtype=torch.float64))
    assert load_checkpoint(tmp_path / "c.pth")["config"].startswith("AUGMENTOR")


def test_rng_states_roundtrip():
    states = rng_states()
    a = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_states(states)
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_missing_corrupt_and_foreign_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "none.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="bad.pth"):
        load_checkpoint(bad)
    full = tmp_path / "full.pth"
    save_checkpoint(full, {"model": net().state_dict()})
    truncated = tmp_path / "trunc.pth"
    truncated.write_bytes(full.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="trunc.pth"):
        load_checkpoint(truncated)
    torch.save({"optimizer": {}}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="no 'model'"):
        load_checkpoint(tmp_path / "other.pth")
    torch.save(net().state_dict(), tmp_path / "bare.pth")  # a plain state_dict is accepted
    assert "0.weight" in load_checkpoint(tmp_path / "bare.pth")["model"]


def test_skip_unmatched_layers_with_different_head():
    src, dst = net(out=1), net(out=3)
    with pytest.raises(CheckpointError, match=r"2\.weight.*SKIP_UNMATCHED_LAYERS"):
        load_weights(dst, src.state_dict(), skip_unmatched=False)
    state = {f"module.{k}": v for k, v in src.state_dict().items()}  # DDP prefix is stripped
    loaded, skipped = load_weights(dst, state, skip_unmatched=True)
    assert "0.weight" in loaded and "2.weight" not in loaded
    assert any(s.startswith("2.weight") for s in skipped) and any(s.startswith("2.bias") for s in skipped)
    assert torch.equal(dst[0].weight, src[0].weight)
    with pytest.raises(CheckpointError, match="no weight matches"):
        load_weights(dst, {"x": torch.ones(1)}, skip_unmatched=True)
    counters = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))  # batch norm's step counters fit any model
    with pytest.raises(CheckpointError, match="no weight matches"):
        load_weights(nn.Sequential(nn.Conv2d(1, 5, 3), nn.BatchNorm2d(5)), counters.state_dict(), skip_unmatched=True)
    # A 2D network into its 3D twin: every batch norm fits (same widths), no convolution does.
    flat = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))
    deep = nn.Sequential(nn.Conv3d(1, 4, 3), nn.BatchNorm3d(4), nn.Conv3d(4, 4, 3), nn.BatchNorm3d(4))
    with pytest.raises(CheckpointError, match="no weight matches"):
        load_weights(deep, flat.state_dict(), skip_unmatched=True)


def test_metadata_mismatch_names_both_values():
    cfg = get_defaults()
    meta = checkpoint_metadata(cfg)
    check_compatible(meta, cfg, "a.pth")
    with pytest.raises(CheckpointError, match="3D but PROBLEM.NDIM is 2D"):
        check_compatible(dict(meta, ndim=3), cfg, "a.pth")
    with pytest.raises(CheckpointError, match="3 input channel.*1"):
        check_compatible(dict(meta, in_channels=3), cfg, "a.pth")
    with pytest.raises(CheckpointError, match="'mae' model but MODEL.ARCHITECTURE is 'unet'"):
        check_compatible(dict(meta, architecture="mae"), cfg, "a.pth")
    cfg.MODEL.ARCHITECTURE = "unetr"
    check_compatible(dict(meta, architecture="mae"), cfg, "a.pth")  # MAE encoder -> UNETR is the point


def test_cuda_rng_state_is_this_process_gpu_only(monkeypatch):
    """Rank 0's copies of the other GPUs' generators were never drawn from: restoring them reset the other ranks'
    streams. One state is saved (once CUDA is in use) and set on the process's own GPU; older checkpoints hold one
    per visible GPU, of which the process's own is taken."""
    from biapy.engine.checkpoint import rng_states, set_rng_states

    assert rng_states()["cuda"] == []  # CUDA never started: not started for the checkpoint either
    seen = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": torch.tensor([7], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": seen.append((state.tolist(), device)))
    states = rng_states()
    assert [s.tolist() for s in states["cuda"]] == [[7]]
    set_rng_states(states)
    set_rng_states({"cuda": [torch.tensor([1], dtype=torch.uint8), torch.tensor([2], dtype=torch.uint8)]})
    assert seen == [([7], 1), ([2], 1)]


def test_another_task_head_is_made_anew_even_where_its_shape_fits(tmp_path, caplog):
    """A 1-channel crappify U-Net's head has the shape of a 1-class... any equal count: it is not a classifier."""
    from biapy.engine.checkpoint import save_checkpoint
    from biapy.engine.resume import load_model_from

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder, self.head = nn.Conv2d(2, 4, 3), nn.Conv2d(4, 2, 1)

    pre, seg = get_defaults(), get_defaults()
    pre.DATA.PATCH_SIZE = seg.DATA.PATCH_SIZE = (32, 32, 2)
    seg.PROBLEM.TYPE, seg.MODEL.N_CLASSES, seg.DATA.NORMALIZATION.TYPE = "SEMANTIC_SEG", 2, "div"
    src, dst = Tiny(), Tiny()
    path = tmp_path / "pre.pth"
    save_checkpoint(path, {"model": src.state_dict(), "metadata": checkpoint_metadata(pre), "config": pre.dump()})
    with caplog.at_level("WARNING"):
        _, loaded, skipped = load_model_from(dst, seg, path, skip_unmatched=True)
    assert loaded == ["encoder.bias", "encoder.weight"] and not torch.equal(dst.head.weight, src.head.weight)
    assert all("made anew" in s for s in skipped) and len(skipped) == 2
    assert "DATA.NORMALIZATION.TYPE zero_mean_unit_variance in the checkpoint, div here" in caplog.text
    _, loaded, _ = load_model_from(Tiny(), seg, path, skip_unmatched=False)  # a new head is no mismatch
    assert loaded == ["encoder.bias", "encoder.weight"]
    _, loaded, _ = load_model_from(Tiny(), pre, path, skip_unmatched=False)  # the same task keeps its head
    assert "head.weight" in loaded


def test_a_start_is_recognized_by_its_file_not_by_its_name(tmp_path, monkeypatch):
    """A relative name typed in another folder is another file; a moved copy or a link is the same one. The two
    files have the same size and the same last 512 KB, and no CRC-32s (as save_checkpoint writes them)."""
    import biapy.engine.resume as R
    from biapy.engine.checkpoint import save_checkpoint
    from biapy.errors import ConfigError
    from biapy.job import Job

    for folder, value in (("a", 1.0), ("b", 2.0)):
        (tmp_path / folder).mkdir()
        save_checkpoint(tmp_path / folder / "start.pth", {"model": {"w": torch.full((4096,), value),
                                                                    "tail": torch.zeros(1 << 17)}})
    assert (tmp_path / "a" / "start.pth").stat().st_size == (tmp_path / "b" / "start.pth").stat().st_size
    monkeypatch.chdir(tmp_path / "a")
    began = R.start_record(Path("start.pth"))
    job, own = Job(tmp_path, "run", 1), tmp_path / "last.pth"
    (tmp_path / "moved.pth").write_bytes((tmp_path / "a" / "start.pth").read_bytes())
    (tmp_path / "link.pth").symlink_to(tmp_path / "a" / "start.pth")
    for same in ("start.pth", tmp_path / "a" / "start.pth", tmp_path / "moved.pth", tmp_path / "link.pth"):
        R._check_same_start(began, Path(same), job, own)
    monkeypatch.chdir(tmp_path / "b")
    with pytest.raises(ConfigError, match=f"run run_1 began from {tmp_path / 'a' / 'start.pth'}"):
        R._check_same_start(began, Path("start.pth"), job, own)
    R._check_same_start(None, Path("start.pth"), job, own)  # a run from before the record: taken as the same


def test_checkpoints_skip_the_crc_and_leave_torch_s_setting_as_it_was(tmp_path):
    """torch.save spent 22 of 30 ms of a 23 MB epoch checkpoint on CRC-32s; a truncated file is still refused."""
    import zipfile

    from biapy.engine.checkpoint import save_checkpoint

    try:  # the setting came with torch 2.6; before it, torch.save always computes them (nothing to skip)
        from torch.utils.serialization import config
    except ImportError:
        assert torch.__version__ < (2, 6)
        config = None
    path = tmp_path / "c.pth"
    save_checkpoint(path, {"model": {"w": torch.arange(1000.0)}})
    if config is not None:
        assert config.save.compute_crc32  # torch's own saves are as before
        assert {info.CRC for info in zipfile.ZipFile(path).infolist()} == {0}
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.arange(1000.0))
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(path)


def test_a_model_with_float32_layers_pickles_and_loads_in_a_fresh_process(tmp_path):
    """The float32 ends swap a layer's class for a generated one, which pickle must find by name."""
    import pickle
    import subprocess
    import sys

    from biapy.models.unet import UNet

    model = UNet(2, 1, 1, [4, 8])
    (tmp_path / "m.pkl").write_bytes(pickle.dumps(model))
    code = ("import pickle, sys; m = pickle.load(open(sys.argv[1], 'rb')); "
            "print(type(m.head).__name__, type(m.encoder.blocks[0].conv1[0]).__name__)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m.pkl")], capture_output=True, text=True,
                         check=True).stdout
    assert out.split() == ["Float32Conv2d", "Float32Conv2d"]


class _System:
    """Unpickling this would run a shell command (torch 2.14 names it 'posix.system ... is blocked')."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return (os.system, (f"touch {self.marker}",))


def test_pickled_code_and_text_files_are_named_as_such(tmp_path):
    """torch 2.14 words a refused global 'unsupported GLOBAL posix.system whose module posix is blocked': it had
    been reported as 'not torch data'; a text file's reason had been a bare '101' (a KeyError)."""
    marker = tmp_path / "pwned"
    torch.save({"model": {}, "x": _System(marker)}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match=r"evil.pth: holds a pickled Python object \(\S*system\)"):
        load_checkpoint(tmp_path / "evil.pth")
    assert not marker.exists()
    (tmp_path / "notes.pth").write_text("hello world\n")
    with pytest.raises(CheckpointError, match=r"notes.pth: not a readable checkpoint .*: KeyError: \S+$"):
        load_checkpoint(tmp_path / "notes.pth")


@pytest.mark.parametrize("fields", [{"config": {"lr": 0.1}}, {"config": 123}, {"metadata": "oops"},
                                    {"metadata": {"ndim": "x", "in_channels": True}}, {"extras": [1]},
                                    {"epoch": 2.5}, {"best_val": "inf"}, {"partial_loss": 0.5},
                                    {"scheduler": [{"step": 3}]}, {"history": {"epoch": 1}},
                                    {"bad_epochs": True}, {"rng": [1, 2]}])
def test_a_checkpoint_with_foreign_fields_still_gives_its_weights(tmp_path, caplog, fields):
    """Another program's 'config' (a dict) or 'metadata' had crashed the run (AttributeError, ValueError):
    fields not of the types this tool writes are ignored, each tensor still checked against the model."""
    from biapy.engine.resume import load_model_from

    cfg, src = get_defaults(), net()
    path = tmp_path / "foreign.pth"
    torch.save({"model": src.state_dict(), **fields}, path)
    dst = net()
    with caplog.at_level("WARNING"):
        _, loaded, _ = load_model_from(dst, cfg, path, skip_unmatched=False)
    assert "0.weight" in loaded and torch.equal(dst[0].weight, src[0].weight)
    assert f"foreign.pth: ignoring {next(iter(fields))}" in caplog.text


def test_model_entries_that_are_not_tensors_are_named():
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "odd.pth"
        torch.save({"model": {"0.weight": torch.ones(4, 1, 3, 3), "0.bias": "zeros"}}, path)
        with pytest.raises(CheckpointError, match=r"odd.pth: .*'model' entry '0.bias' holds a str; expected tensors"):
            load_checkpoint(path)


def _cfg(**model):
    cfg = get_defaults()
    for key, value in model.items():
        cfg.MODEL[key] = value
    return cfg


@pytest.mark.parametrize("arch, key, trained, here", [
    ("unet", "ACTIVATION", "elu", "relu"), ("resunet", "ACTIVATION", "elu", "relu"),
    ("mae", "VIT_NORM_EPS", 1e-6, 1e-5), ("mae", "MAE_DEC_NUM_HEADS", 16, 8), ("unetr", "ACTIVATION", "elu", "relu"),
    ("unetr", "VIT_NORM_EPS", 1e-6, 1e-5)])
def test_a_run_goes_on_only_with_the_layers_it_was_trained_with(arch, key, trained, here, caplog):
    """An ELU-trained run re-tested (or resumed) as ReLU had replaced its outputs (PSNR 18.75 -> 17.13)."""
    from biapy.engine.checkpoint import check_own_run, function_key_differences, saved_config_tree
    from biapy.errors import ConfigError

    saved = _cfg(ARCHITECTURE=arch, **{key: trained})
    state = {"config": saved.dump(), "metadata": checkpoint_metadata(saved)}
    check_own_run(state, _cfg(ARCHITECTURE=arch, **{key: trained}), "r_1-checkpoint-last.pth", "r_1")
    with pytest.raises(ConfigError, match=f"MODEL.{key} {trained} in the checkpoint, {here} here"):
        check_own_run(state, _cfg(ARCHITECTURE=arch, **{key: here}), "r_1-checkpoint-last.pth", "r_1")
    # A fine-tune may change it: told (only for a setting both architectures read).
    tree, meta = saved_config_tree(state["config"]), state["metadata"]
    assert function_key_differences(tree, meta, _cfg(ARCHITECTURE=arch, **{key: here}))
    assert not function_key_differences(tree, dict(meta, architecture="mae"), _cfg(ARCHITECTURE="unetr",
                                                                                   ACTIVATION="relu"))


def test_a_run_resumes_only_with_its_own_optimizer():
    """SGD resuming an AdamW run failed after the data preparation, advising MODEL.LOAD_CHECKPOINT_ONLY_WEIGHTS,
    which a resume does not read. A test-only re-run does not use the optimizer."""
    from biapy.engine.checkpoint import check_own_run
    from biapy.errors import ConfigError

    saved = get_defaults()
    state = {"config": saved.dump(), "metadata": checkpoint_metadata(saved)}
    cfg = get_defaults()
    cfg.TRAIN.OPTIMIZER = "SGD"
    with pytest.raises(ConfigError, match="TRAIN.OPTIMIZER ADAMW in the checkpoint, SGD here.*new --run_id"):
        check_own_run(state, cfg, "r_1-checkpoint-last.pth", "r_1")
    cfg.TRAIN.ENABLE = False
    check_own_run(state, cfg, "r_1-checkpoint-last.pth", "r_1")


def test_lineage_is_recorded_only_in_a_job_folder(tmp_path):
    """A model downloaded into any folder named 'checkpoints' had gained a derived_models.log beside it, outside
    --result_dir."""
    from biapy.job import Job
    from biapy.runner import record_derived_model

    job = Job(tmp_path / "out", "ft", 1)
    download = tmp_path / "dl" / "checkpoints" / "model.pth"
    download.parent.mkdir(parents=True)
    download.write_bytes(b"")
    record_derived_model(download, job)
    assert not (tmp_path / "dl" / "derived_models.log").exists()
    source = Job(tmp_path / "out", "pre", 3)
    source.results.mkdir(parents=True)
    source.checkpoint_dir.mkdir()
    for name in ("model.pth", "other_3-checkpoint-best.pth", source.checkpoint("best").name):
        (source.checkpoint_dir / name).write_bytes(b"")
        record_derived_model(source.checkpoint_dir / name, job)
    lines = (source.job_dir / "derived_models.log").read_text().splitlines()
    assert len(lines) == 1 and lines[0].endswith(f"{job.results}\tfrom pre_3-checkpoint-best.pth")


def test_training_fields_of_other_types_are_dropped_and_none_is_taken_as_unset(tmp_path):
    """Another program's {'epoch': None} or {'scheduler': [...]} had stopped a fine-tune with
    MODEL.LOAD_CHECKPOINT_ONLY_WEIGHTS False in a traceback (int(None); 'list' has no attribute 'get')."""
    path = tmp_path / "foreign.pth"
    torch.save({"model": net().state_dict(), "epoch": None, "best_val": None, "step_in_epoch": 3,
                "partial_loss": 0.5, "scheduler": [{"step": 1}], "optimizer": {"state": {}}}, path)
    state = load_checkpoint(path)
    assert sorted(state) == ["model", "optimizer", "step_in_epoch"]


class _Trainer:
    """What restore_training reads and sets of a Trainer."""

    def __init__(self):
        from biapy.engine.optim import LRSchedule

        self.model = net()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        self.scheduler = LRSchedule(self.optimizer, "warmupcosine", 1e-3, 40, warmup=4)
        self.scaler = None
        self.steps_per_epoch, self.accum = 4, 1
        self.cfg = get_defaults()
        self.wf = type("Wf", (), {"train_loader": range(4)})()
        self.dist = type("Dist", (), {"world_size": 1})()


@pytest.mark.parametrize("fields, says", [
    ({"scheduler": {"step": None}}, "TypeError"),
    ({"scheduler": {"step": "x"}}, "invalid literal"),
    ({"optimizer": {"state": {}, "param_groups": 3}}, "TypeError"),
    ({"epoch": 1, "step_in_epoch": 2, "partial_loss": [1.0]}, "ValueError"),
    ({"epoch": -3}, "epoch is -3"),
    ({"history": [1, 2]}, "history"),
])
@pytest.mark.parametrize("advice", ["set MODEL.LOAD_CHECKPOINT_ONLY_WEIGHTS True to load its weights only",
                                    "pass a new --run_id to train anew"])
def test_training_state_of_another_layout_is_one_checkpoint_error(tmp_path, fields, says, advice):
    """Fields of this tool's types laid out otherwise (another program's) had escaped as TypeError or
    AttributeError tracebacks; the advice is the caller's (a fine-tune's, or a resume's of its own run)."""
    from biapy.engine.resume import restore_training

    path = tmp_path / "foreign.pth"
    torch.save({"model": net().state_dict(), **fields}, path)
    state = load_checkpoint(path)
    with pytest.raises(CheckpointError) as caught:
        restore_training(_Trainer(), state, path, with_rng=False, advice=advice)
    message = str(caught.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    assert says in message and message.endswith(advice)


def test_a_checkpoint_that_cannot_be_written_asks_about_the_disk_only_when_it_may_be_full(tmp_path, monkeypatch):
    """A file name too long had been told 'is the disk full?'."""
    import errno

    from biapy.errors import BiapyError

    too_long = tmp_path / ("n" * 250 + "_1-checkpoint-last.pth")
    with pytest.raises(BiapyError) as caught:
        save_checkpoint(too_long, {"model": {"w": torch.ones(2)}})
    assert "File name too long" in str(caught.value) and "disk" not in str(caught.value)
    assert list(tmp_path.iterdir()) == []  # no temporary left
    for code, asks in ((errno.ENOSPC, True), (errno.EDQUOT, True), (errno.EROFS, False), (errno.EACCES, False)):
        def fail(obj, f, *a, code=code, **k):
            raise OSError(code, os.strerror(code))
        monkeypatch.setattr(torch, "save", fail)
        with pytest.raises(BiapyError) as caught:
            save_checkpoint(tmp_path / "c.pth", {"model": {}})
        assert os.strerror(code) in str(caught.value)
        assert str(caught.value).endswith("; is the disk full?") == asks, caught.value


def test_a_segmentation_run_resumes_only_with_its_own_ignore_index():
    """LOSS.IGNORE_INDEX says which pixels are unlabelled, and whether a 0/255 mask's 255 is class 1: a resume with
    another one had gone on with other labels, with a warning at most. A test-only run may score with another."""
    from biapy.engine.checkpoint import check_own_run
    from biapy.errors import ConfigError

    def seg(ignore):
        cfg = get_defaults()
        cfg.PROBLEM.TYPE, cfg.MODEL.N_CLASSES, cfg.LOSS.IGNORE_INDEX = "SEMANTIC_SEG", 2, ignore
        return cfg

    saved = seg(-1)
    state = {"config": saved.dump(), "metadata": checkpoint_metadata(saved)}
    check_own_run(state, seg(-1), "r_1-checkpoint-last.pth", "r_1")
    with pytest.raises(ConfigError, match="LOSS.IGNORE_INDEX -1 in the checkpoint, 255 here.*new --run_id"):
        check_own_run(state, seg(255), "r_1-checkpoint-last.pth", "r_1")
    test_only = seg(255)
    test_only.TRAIN.ENABLE = False
    check_own_run(state, test_only, "r_1-checkpoint-last.pth", "r_1")
