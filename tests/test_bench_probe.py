"""bench/bench_probe.py and the options bench/bench_finetune.py shares with it (no training here)."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import bench_finetune  # noqa: E402
import bench_probe  # noqa: E402
from biapy.errors import ConfigError  # noqa: E402


def test_preset_sets_defaults_that_the_command_line_still_overrides():
    args = bench_finetune.parse_args(["--preset", "textured-long", "--seeds", "3"])
    assert (args.task, args.size, args.pretrain_patches, args.pretrain_schedule) == ("textured", 96, 16, "warmupcosine")
    assert args.finetune_epochs == [10, 25, 50] and args.seeds == 3
    plain = bench_finetune.parse_args([])
    assert (plain.task, plain.size, plain.finetune_epochs, plain.pretrain_patches) == ("nuclei", 192, [25], -1)


def test_pretraining_config_carries_the_recipe_and_the_overrides(tmp_path):
    args = bench_finetune.parse_args(["--pretrain-patches", "16", "--pretrain-schedule", "warmupcosine",
                                      "--pretrain-set", "PROBLEM.SELF_SUPERVISED.MASK_BLOCK_SIZE=16"])
    cfg, overrides = bench_finetune.pretraining(args, {"all_x": tmp_path})
    assert cfg["DATA"]["TRAIN"]["PATCHES_PER_IMAGE"] == 16
    assert cfg["TRAIN"]["LR_SCHEDULER"] == {"NAME": "warmupcosine", "WARMUP_COSINE_DECAY_EPOCHS": 0.05}
    assert overrides == ["PROBLEM.SELF_SUPERVISED.MASK_BLOCK_SIZE", "16"]


def test_an_unknown_key_is_refused_naming_the_option(capsys):
    with pytest.raises(SystemExit):
        bench_finetune.parse_args(["--finetune-set", "TRAIN.LRR=1"])
    assert "--finetune-set: unknown key 'TRAIN.LRR'; did you mean TRAIN.LR?" in capsys.readouterr().err


def test_probe_separates_a_feature_that_tells_the_classes_apart():
    y = (torch.arange(400) % 2).float()
    x = torch.stack([y * 2 - 1 + 0.1 * torch.randn(400, generator=torch.Generator().manual_seed(0)),
                     torch.randn(400, generator=torch.Generator().manual_seed(1))], 1)
    w, b, mean, sd = bench_probe.fit_probe(x, y)
    predicted = (((x - mean) / sd) @ w + b) > 0
    assert torch.equal(predicted, y.bool())
    assert abs(float(w[0])) > 5 * abs(float(w[1]))


def test_drift_is_one_for_an_untrained_encoder_and_below_for_a_changed_one(tmp_path):
    cfg = bench_probe.model_config(bench_finetune.pretraining(bench_finetune.parse_args([]), {"all_x": tmp_path})[0])
    encoder = bench_probe.initial_model(cfg, 0).encoder
    start = {k: v.clone() for k, v in encoder.state_dict().items()}
    assert bench_probe.drift(encoder, start) == pytest.approx((1.0, 1.0, 0.0))
    with torch.no_grad():
        encoder.blocks[0].conv1[0].weight.mul_(-1)
    lo, hi, dist = bench_probe.drift(encoder, start)
    assert lo == pytest.approx(-1.0) and hi == pytest.approx(1.0) and dist == pytest.approx(2.0)


def test_a_checkpoint_without_the_tools_config_is_refused(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(ConfigError, match="other.pth: no 'config' and 'model' in it"):
        bench_probe.checkpoint_encoder(path)
