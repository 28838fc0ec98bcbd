"""Fine-tuning from a pretrained checkpoint: which settings are compared, and what the load says it left random."""
import logging

import pytest
import torch

from biapy.config.defaults import get_defaults
from biapy.engine.checkpoint import (check_own_run, checkpoint_metadata, function_key_differences, save_checkpoint,
                                     saved_config_tree)
from biapy.engine.resume import load_model_from
from biapy.errors import ConfigError

TINY_VIT = {"VIT_TOKEN_SIZE": 8, "VIT_EMBED_DIM": 32, "VIT_NUM_LAYERS": 1, "VIT_NUM_HEADS": 2,
            "MAE_DEC_HIDDEN_SIZE": 16, "MAE_DEC_NUM_LAYERS": 1, "MAE_DEC_NUM_HEADS": 2, "MAE_DEC_MLP_DIMS": 32,
            "FEATURE_MAPS": [4, 8]}


def _cfg(data=None, **model):
    cfg = get_defaults()
    cfg.DATA.PATCH_SIZE = (32, 32, 1)
    for key, value in model.items():
        cfg.MODEL[key] = value
    for key, value in (data or {}).items():
        node = cfg.DATA.NORMALIZATION
        *parents, last = key.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
    return cfg


def _state(cfg, drop=()):
    """A checkpoint's config fields for `cfg`; `drop`: DATA.NORMALIZATION sub-keys its (older) config lacks."""
    tree = saved_config_tree(cfg.dump())
    for key in drop:
        tree["DATA"]["NORMALIZATION"].pop(key)
    import yaml

    return {"config": yaml.safe_dump(tree), "metadata": checkpoint_metadata(cfg)}


@pytest.mark.parametrize("trained, here, says", [
    ({}, {"PERC_CLIP.ENABLE": True, "PERC_CLIP.LOWER_PERC": 1.0}, "PERC_CLIP.ENABLE False in the checkpoint, True"),
    ({"PERC_CLIP.ENABLE": True, "PERC_CLIP.UPPER_PERC": 99.0}, {"PERC_CLIP.ENABLE": True, "PERC_CLIP.UPPER_PERC": 99.8},
     "PERC_CLIP.UPPER_PERC 99.0 in the checkpoint, 99.8 here"),
    ({"PERC_CLIP.ENABLE": True, "PERC_CLIP.UPPER_VALUE": [300]}, {"PERC_CLIP.ENABLE": True,
                                                                  "PERC_CLIP.UPPER_VALUE": [255.0]},
     r"PERC_CLIP.UPPER_VALUE \[300.0\] in the checkpoint, \[255.0\] here"),
    ({"ZERO_MEAN_UNIT_VAR.MEAN_VAL": [0.5]}, {"ZERO_MEAN_UNIT_VAR.MEAN_VAL": [0.4]},
     r"ZERO_MEAN_UNIT_VAR.MEAN_VAL \[0.5\] in the checkpoint, \[0.4\] here"),
    ({"TYPE": "custom", "ZERO_MEAN_UNIT_VAR.STD_VAL": [2.0]}, {"TYPE": "custom"},
     r"ZERO_MEAN_UNIT_VAR.STD_VAL \[2.0\] in the checkpoint, \[-1.0\] here"),
])
def test_a_run_goes_on_only_with_the_normalization_it_was_trained_with(trained, here, says):
    """Only TYPE was compared: a run re-tested with clipping switched on (or other fixed bounds or mean/std)
    replaced its outputs with those of inputs the network never saw, and a fine-tune was not told."""
    state = _state(_cfg(trained))
    check_own_run(state, _cfg(trained), "r_1-checkpoint-last.pth", "r_1")
    with pytest.raises(ConfigError, match=f"DATA.NORMALIZATION.{says}"):
        check_own_run(state, _cfg(here), "r_1-checkpoint-last.pth", "r_1")
    assert function_key_differences(saved_config_tree(state["config"]), state["metadata"], _cfg(here))


@pytest.mark.parametrize("trained, here", [
    ({}, {"PERC_CLIP.LOWER_PERC": 2.0}),  # clipping off: its bounds are not read
    ({"PERC_CLIP.ENABLE": True, "PERC_CLIP.LOWER_PERC": 1.0}, {"PERC_CLIP.ENABLE": True, "PERC_CLIP.LOWER_PERC": 1,
                                                               "PERC_CLIP.LOWER_VALUE": [5.0]}),  # the percentile wins
    ({"TYPE": "div"}, {"TYPE": "div", "ZERO_MEAN_UNIT_VAR.MEAN_VAL": [0.3]}),  # 'div' reads no mean
    ({}, {"ZERO_MEAN_UNIT_VAR.MEAN_VAL": [-1, -1]}),  # 'measure it' either way
])
def test_normalization_settings_that_are_not_read_are_not_compared(trained, here):
    state = _state(_cfg(trained))
    check_own_run(state, _cfg(here), "r_1-checkpoint-last.pth", "r_1")
    assert not function_key_differences(saved_config_tree(state["config"]), state["metadata"], _cfg(here))


def test_a_checkpoint_from_before_the_clip_and_fixed_value_keys_were_compared_takes_their_defaults():
    old = _state(_cfg(), drop=("PERC_CLIP", "ZERO_MEAN_UNIT_VAR"))
    check_own_run(old, _cfg(), "r_1-checkpoint-last.pth", "r_1")
    with pytest.raises(ConfigError, match="PERC_CLIP.ENABLE False in the checkpoint, True here"):
        check_own_run(old, _cfg({"PERC_CLIP.ENABLE": True, "PERC_CLIP.LOWER_PERC": 1.0}), "r_1-checkpoint-last.pth",
                      "r_1")
    # A checkpoint without a config (a bare state_dict's) is not compared at all.
    assert not function_key_differences({}, {}, _cfg({"PERC_CLIP.ENABLE": True}))


def test_model_normalization_is_compared_only_where_the_checkpoints_architecture_reads_it():
    """The MAE has no MODEL.NORMALIZATION: an MAE fine-tuned as a UNETR with 'in' was told it had been trained
    with 'bn', and an MAE run re-tested with another value was refused."""
    mae = _state(_cfg(ARCHITECTURE="mae", **TINY_VIT))
    unetr_in = _cfg(ARCHITECTURE="unetr", NORMALIZATION="in", **TINY_VIT)
    assert not function_key_differences(saved_config_tree(mae["config"]), mae["metadata"], unetr_in)
    check_own_run(mae, _cfg(ARCHITECTURE="mae", NORMALIZATION="in", **TINY_VIT), "r_1-checkpoint-last.pth", "r_1")
    for arch in ("unet", "unetr"):
        own = _state(_cfg(ARCHITECTURE=arch, **TINY_VIT))
        here = _cfg(ARCHITECTURE=arch, NORMALIZATION="in", **TINY_VIT)
        assert function_key_differences(saved_config_tree(own["config"]), own["metadata"], here) == [
            "MODEL.NORMALIZATION bn in the checkpoint, in here"]
        with pytest.raises(ConfigError, match="MODEL.NORMALIZATION bn in the checkpoint, in here"):
            check_own_run(own, here, "r_1-checkpoint-last.pth", "r_1")


def test_an_mae_loaded_into_a_unetr_names_what_stays_random_apart_from_what_it_does_not_use(tmp_path, caplog):
    """One 'Skipped 109 tensor(s)' line mixed the MAE decoder's unused tensors with the UNETR's random ones, and
    showed the former first."""
    from biapy.models import build_model

    pre = _cfg(ARCHITECTURE="mae", **TINY_VIT)
    pre.PROBLEM.SELF_SUPERVISED.PRETEXT_TASK = "masking"
    seg = _cfg(ARCHITECTURE="unetr", NORMALIZATION="none", **TINY_VIT)  # the MAE was saved with "bn"
    seg.PROBLEM.TYPE, seg.MODEL.N_CLASSES = "SEMANTIC_SEG", 2
    torch.manual_seed(0)
    mae, unetr = build_model(pre), build_model(seg)
    path = tmp_path / "mae.pth"
    save_checkpoint(path, {"model": mae.state_dict(), "metadata": checkpoint_metadata(pre), "config": pre.dump()})
    with caplog.at_level(logging.INFO, logger="biapy"):
        _, loaded, _ = load_model_from(unetr, seg, path, skip_unmatched=True)
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    unused = next(line for line in lines if line.startswith("Not used: "))
    initial = next(line for line in lines if line.startswith("Left at their initial values: "))
    not_in_model = [n for n in mae.state_dict() if n not in unetr.state_dict()]
    random = [n for n in unetr.state_dict() if n not in loaded and not n.endswith("num_batches_tracked")]
    assert not_in_model and any(n.startswith("decoder.") for n in not_in_model)
    assert f"{len(random)} tensor(s) of the model" in initial and "(not in the model)" not in initial
    assert f"{len(not_in_model) + 2} tensor(s) of the checkpoint" in unused  # + its head, made anew
    assert "(not in the checkpoint)" not in unused and "decoder.stem" in initial
    # Six named, then counted; --verbose lists them all.
    assert unused.endswith(f", +{len(not_in_model) + 2 - 6} more (--verbose lists them)")
    assert initial.endswith(f", +{len(random) - 6} more (--verbose lists them)")
    assert not any("MODEL.NORMALIZATION" in r.getMessage() for r in caplog.records)  # nor any other warning
