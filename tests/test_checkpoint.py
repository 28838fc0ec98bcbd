"""Checkpoint files: atomic writes, weights_only loading, tolerant weight loading, clear errors."""
import random

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
    with pytest.raises(CheckpointError, match="no tensor matches"):
        load_weights(dst, {"x": torch.ones(1)}, skip_unmatched=True)


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
