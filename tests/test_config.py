"""Config defaults, BiaPy-compatible loading, checks and derived values."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from biapy.config import check_config, finalize, get_defaults, load_config
from biapy.config.load import coerce
from biapy.errors import ConfigError
from biapy.models import check_patch_fits
from biapy.job import Job

DEFAULTS_FILE = Path(__file__).parents[1] / "biapy" / "config" / "defaults.py"

BIAPY_2D_SSL_YAML = """
# BiaPy version: 3.5.1
SYSTEM:
    NUM_CPUS: -1
    NUM_WORKERS: 5
PROBLEM:
    TYPE: SELF_SUPERVISED
    NDIM: 2D
    SELF_SUPERVISED:
        PRETEXT_TASK: 'crappify'
DATA:
    PATCH_SIZE: (256, 256, 1)
    TRAIN:
        PATH: {train}
        IN_MEMORY: True
    VAL:
        SPLIT_TRAIN: 0.1
    TEST:
        IN_MEMORY: True
        PATH: {test}
        PADDING: (32,32)
AUGMENTOR:
    ENABLE: True
    DA_PROB: 0.5
    RANDOM_ROT: True
    VFLIP: True
    HFLIP: True
MODEL:
    ARCHITECTURE: unet
    LOAD_CHECKPOINT: False
TRAIN:
    ENABLE: True
    OPTIMIZER: ADAMW
    LR: 1.E-4
    BATCH_SIZE: 12
    EPOCHS: 360
    PATIENCE: 50
TEST:
    ENABLE: True
    AUGMENTATION: False
    FULL_IMG: False
"""


@pytest.fixture
def folders(tmp_path):
    train, test = tmp_path / "train", tmp_path / "test"
    train.mkdir()
    test.mkdir()
    return train, test


def checked(overrides, folders=None):
    cfg = load_config(overrides)
    check_config(cfg, check_paths=folders is not None)
    return cfg


def test_every_default_key_has_a_comment_line_above_it():
    lines = DEFAULTS_FILE.read_text().splitlines()
    leaves = [i for i, line in enumerate(lines) if re.match(r"_C\.[A-Z0-9_.]+ = (?!CN\(\))", line)]
    assert len(leaves) > 100
    for i in leaves:
        assert lines[i - 1].startswith("# "), f"no comment above: {lines[i]}"


def test_every_settable_default_key_is_read_outside_the_config_package():
    """A key only the config code knows about would be an option that does nothing; keys the run
    derives itself (commented 'Derived') are written into the resolved config instead."""
    lines = DEFAULTS_FILE.read_text().splitlines()
    package = DEFAULTS_FILE.parents[1]
    code = "\n".join(p.read_text() for p in package.rglob("*.py") if p.parent.name != "config")
    unread = []
    for i, line in enumerate(lines):
        m = re.match(r"_C\.([A-Z0-9_.]+) = (?!CN\(\))", line)
        if m and not lines[i - 1].startswith("# Derived"):
            leaf = m.group(1).rsplit(".", 1)[-1]
            if not re.search(rf"\b{leaf}\b", code):
                unread.append(m.group(1))
    assert unread == []


def test_defaults_pass_the_checks_without_paths():
    cfg = get_defaults()
    check_config(cfg, check_paths=False)


def test_biapy_self_supervised_yaml_loads_unchanged(tmp_path, folders):
    train, test = folders
    path = tmp_path / "biapy.yaml"
    path.write_text(BIAPY_2D_SSL_YAML.format(train=train, test=test))
    cfg = load_config(path)
    check_config(cfg)
    assert cfg.DATA.PATCH_SIZE == (256, 256, 1)
    assert cfg.DATA.TEST.PADDING == (32, 32)
    assert cfg.TRAIN.LR == pytest.approx(1e-4)
    assert cfg.TRAIN.OPTIMIZER == "ADAMW"
    assert cfg.AUGMENTOR.RANDOM_ROT is True


def test_biapy_3_7_list_forms_and_unused_keys_are_accepted(caplog):
    cfg = load_config({"TRAIN": {"OPTIMIZER": ["SGD"], "LR": [0.01], "OPT_BETAS": [[0.8, 0.9]]},
                       "LOSS": {"TYPE": ["MSE"]},
                       "MODEL": {"BMZ": {"EXPORT": {"ENABLE": True}}},
                       "DATA": {"EXTRACT_RANDOM_PATCH": False, "N_CLASSES": 3},
                       "TEST": {"BY_CHUNKS": {"ENABLE": True}}})
    assert (cfg.TRAIN.OPTIMIZER, cfg.TRAIN.LR, cfg.TRAIN.OPT_BETAS) == ("SGD", 0.01, (0.8, 0.9))
    assert cfg.LOSS.TYPE == "MSE"
    assert cfg.DATA.TRAIN.EXTRACT_RANDOM_PATCH is False  # BiaPy's older place for the key
    assert cfg.MODEL.N_CLASSES == 3
    assert "MODEL.BMZ.EXPORT.ENABLE" in caplog.text
    chunks = next(r.getMessage() for r in caplog.records if "TEST.BY_CHUNKS.ENABLE" in r.getMessage())
    assert "ignored (3D test volumes are read, predicted, written and scored by slabs" in chunks


@pytest.mark.parametrize("loss, weights, expected", [
    ([], [], ("", [])),  # BiaPy 3.7.1's default: the workflow's loss (it had been refused: 'expected a string')
    (["MSE"], [1.0], ("MSE", [])),
    (["SSIM", "MAE"], [0.3, 0.7], ("W_MAE_SSIM", [0.7, 0.3])),  # the weights follow their terms
    (["MSE", "SSIM"], [], ("W_MSE_SSIM", [1.0, 1.0])),  # BiaPy sums its terms, each weighing 1 when not given
    (["DICE", "CE"], [2.0, 1.0], ("CE_DICE", [1.0, 2.0])),
    (["W_MAE_SSIM"], [0.3, 0.7], ("W_MAE_SSIM", [0.3, 0.7])),  # this tool's own name in BiaPy's one-element list
    (["MAE"], 1.0, ("MAE", [])),  # a bare weight
])
def test_biapy_3_7_1_loss_lists_read_as_one_loss(loss, weights, expected):
    cfg = load_config({"LOSS": {"TYPE": loss, "WEIGHTS": weights}})
    assert (cfg.LOSS.TYPE, list(cfg.LOSS.WEIGHTS)) == expected
    flags = ["LOSS.TYPE", "[" + ", ".join(loss) + "]"] + (["LOSS.WEIGHTS", str(weights)] if weights else [])
    flags += ["DATA.TRAIN.PATH", "[a]"] if loss == [] else []  # a bracketed value of another key: as YAML reads it
    cli = load_config(None, flags)  # bare words on the command line, as in the YAML
    assert (cli.LOSS.TYPE, list(cli.LOSS.WEIGHTS)) == expected
    assert load_config({"DATA": {"TRAIN": {"PATH": "[a]"}}}).DATA.TRAIN.PATH == "[a]"  # a YAML string stays one


@pytest.mark.parametrize("loss, weights, message", [
    (["MAE", "PCC"], [], r"LOSS\.TYPE: \['MAE', 'PCC'\] is not a mix this tool has; expected one name, or \[MAE, SSIM\]"),
    (["MAE", "SSIM"], [1.0], r"LOSS\.WEIGHTS: \[1\.0\] must hold one weight per LOSS\.TYPE term"),
    (["MSE"], [2.0], r"LOSS\.WEIGHTS: \[2\.0\] would scale the one LOSS\.TYPE term"),
])
def test_biapy_loss_lists_this_tool_cannot_take_are_named(loss, weights, message):
    with pytest.raises(ConfigError, match=message):
        load_config({"LOSS": {"TYPE": loss, "WEIGHTS": weights}})


def test_command_line_overrides_win_over_the_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("TRAIN:\n  EPOCHS: 3\n")
    cfg = load_config(path, ["TRAIN.EPOCHS", "2", "DATA.PATCH_SIZE", "(32, 32, 1)"])
    assert cfg.TRAIN.EPOCHS == 2
    assert cfg.DATA.PATCH_SIZE == (32, 32, 1)


@pytest.mark.parametrize("overrides, key", [
    ({"TRAIN": {"EPOCH": 3}}, "did you mean TRAIN.EPOCHS"),
    ({"TRAIN": {"PATCH_SIZE": (64, 64, 1)}}, "did you mean DATA.PATCH_SIZE"),  # the name, another section
    ({"train": {"epochs": 5}}, "did you mean TRAIN.EPOCHS"),  # keys are upper case
    ({"TRAIN": {"PATH": "x"}}, "did you mean DATA.TRAIN.PATH"),
    ({"DATA": {"NORMALIZATION": {"TYP": "div"}}}, "did you mean DATA.NORMALIZATION.TYPE"),
    ({"TRAIN": {"EPOCHS": "ten"}}, "TRAIN.EPOCHS: expected an integer"),
    ({"TRAIN": {"ENABLE": "yes"}}, "TRAIN.ENABLE: expected a boolean"),
    ({"DATA": {"PATCH_SIZE": 64}}, "DATA.PATCH_SIZE: expected a list"),
])
def test_unknown_keys_and_wrong_types_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(overrides)


@pytest.mark.parametrize("overrides, key", [
    ({"PROBLEM": {"SELF_SUPERVISED": {"RESIZING_FACTOR": 3}}}, "PROBLEM.SELF_SUPERVISED.RESIZING_FACTOR"),
    ({"PROBLEM": {"NDIM": "2D"}, "DATA": {"PATCH_SIZE": (16, 64, 64, 1)}}, "DATA.PATCH_SIZE"),
    ({"PROBLEM": {"NDIM": "3D"}, "DATA": {"PATCH_SIZE": (64, 64, 1)}}, "DATA.PATCH_SIZE"),
    ({"PROBLEM": {"NDIM": "4D"}}, "PROBLEM.NDIM"),
    ({"PROBLEM": {"SELF_SUPERVISED": {"PRETEXT_TASK": "masking"}},
      "MODEL": {"ARCHITECTURE": "mae", "VIT_TOKEN_SIZE": 12}, "DATA": {"PATCH_SIZE": (64, 64, 1)}}, "VIT_TOKEN_SIZE"),
    ({"MODEL": {"ARCHITECTURE": "mae"}}, "MODEL.ARCHITECTURE"),
    ({"TRAIN": {"OPTIMIZER": "LION"}}, "TRAIN.OPTIMIZER"),
    ({"TRAIN": {"BATCH_SIZE": 0}}, "TRAIN.BATCH_SIZE"),
    ({"TRAIN": {"LR": -1.0}}, "TRAIN.LR"),
    ({"DATA": {"VAL": {"SPLIT_TRAIN": 1.5}}}, "DATA.VAL.SPLIT_TRAIN"),
    ({"DATA": {"TEST": {"OVERLAP": (0.5, 1.0)}}}, "DATA.TEST.OVERLAP"),
    ({"DATA": {"TEST": {"PADDING": (0, 0, 0)}}}, "DATA.TEST.PADDING"),
    ({"LOSS": {"TYPE": "CE"}}, "LOSS.TYPE"),
    ({"TEST": {"METRICS": ["psnr", "iou"]}}, "TEST.METRICS"),
    ({"MODEL": {"DROPOUT_VALUES": [0.1]}}, "MODEL.DROPOUT_VALUES"),  # all zeros of any length are filled
    ({"DATA": {"NORMALIZATION": {"TYPE": "minmax"}}}, "DATA.NORMALIZATION.TYPE"),
    ({"PROBLEM": {"SELF_SUPERVISED": {"PRETEXT_TASK": "masking"}}, "TEST": {"AUGMENTATION": True}},
     "TEST.AUGMENTATION"),
    ({"PROBLEM": {"SELF_SUPERVISED": {"PRETEXT_TASK": "masking"}}, "MODEL": {"ARCHITECTURE": "mae"},
      "TEST": {"FULL_IMG": True}}, "TEST.FULL_IMG"),
    ({"MODEL": {"KERNEL_SIZE": 4}}, "MODEL.KERNEL_SIZE: 4 must be odd"),
    ({"SYSTEM": {"NUM_WORKERS": -3}}, "SYSTEM.NUM_WORKERS"),
    ({"SYSTEM": {"NUM_CPUS": 0}}, "SYSTEM.NUM_CPUS"),
    ({"PROBLEM": {"TYPE": "SEMANTIC_SEG", "SEMANTIC_SEG": {"IGNORE_CLASS_ID": 2}}, "MODEL": {"N_CLASSES": 2}},
     "PROBLEM.SEMANTIC_SEG.IGNORE_CLASS_ID"),
    ({"PROBLEM": {"TYPE": "SEMANTIC_SEG", "SEMANTIC_SEG": {"IGNORE_CLASS_ID": -5}}}, "IGNORE_CLASS_ID"),
    ({"DATA": {"NORMALIZATION": {"TYPE": "custom", "ZERO_MEAN_UNIT_VAR": {"STD_VAL": [0.0]}}}},
     "ZERO_MEAN_UNIT_VAR.STD_VAL"),
    ({"AUGMENTOR": {"ENABLE": True, "GAUSSIAN_NOISE": True, "GAUSSIAN_NOISE_VAR": -1.0}},
     "AUGMENTOR.GAUSSIAN_NOISE_VAR"),
    ({"AUGMENTOR": {"ENABLE": True, "G_BLUR": True, "G_SIGMA": (-1.0, 2.0)}}, "AUGMENTOR.G_SIGMA"),
    ({"AUGMENTOR": {"VFLIP_PROB": 1.5}}, "AUGMENTOR.VFLIP_PROB: 1.5 is out of range"),
    ({"AUGMENTOR": {"ENABLE": True, "RANDOM_ROT": True, "RANDOM_ROT_RANGE": (10,)}}, "AUGMENTOR.RANDOM_ROT_RANGE"),
    ({"AUGMENTOR": {"ENABLE": True, "GAMMA_CONTRAST": True, "GC_GAMMA": (1.5, 1.2)}}, "AUGMENTOR.GC_GAMMA"),
    ({"AUGMENTOR": {"ENABLE": True, "CONTRAST": True, "CONTRAST_FACTOR": (-1.0, 0.1)}}, "AUGMENTOR.CONTRAST_FACTOR"),
    ({"TRAIN": {"LR_SCHEDULER": {"NAME": "warmupcosine", "MIN_LR": 0.01}, "LR": 0.001}},
     "TRAIN.LR_SCHEDULER.MIN_LR"),
    ({"TRAIN": {"LR_SCHEDULER": {"REDUCEONPLATEAU_PATIENCE": -4}}}, "REDUCEONPLATEAU_PATIENCE"),
    ({"TRAIN": {"LR_SCHEDULER": {"WARMUP_COSINE_DECAY_EPOCHS": -2.0}}}, "WARMUP_COSINE_DECAY_EPOCHS"),
    ({"TRAIN": {"LR_SCHEDULER": {"NAME": "cosine"}}}, "expected one of '' (none), warmupcosine"),
    ({"DATA": {"NORMALIZATION": {"PERC_CLIP": {"ENABLE": True, "LOWER_VALUE": [300.0], "UPPER_VALUE": [200.0]}}}},
     "LOWER_VALUE [300.0] must be below UPPER_VALUE [200.0]"),
    ({"DATA": {"NORMALIZATION": {"PERC_CLIP": {"ENABLE": True, "LOWER_VALUE": [1.0, 2.0],
                                               "UPPER_VALUE": [5.0, 6.0, 7.0]}}}}, "PERC_CLIP: LOWER_VALUE"),
    ({"PROBLEM": {"SELF_SUPERVISED": {"PRETEXT_TASK": "masking", "MASK_BLOCK_SIZE": 64}},
      "DATA": {"PATCH_SIZE": (32, 32, 1)}}, "hides none of the 1 block(s) of 64 pixels"),
    # One case per check that no other test reaches (found by removing them: the suite had stayed green).
    ({"PROBLEM": {"SELF_SUPERVISED": {"NOISE": 1.5}}}, "PROBLEM.SELF_SUPERVISED.NOISE: 1.5 is out of range"),
    ({"DATA": {"PATCH_SIZE": (64, 0, 1)}}, "DATA.PATCH_SIZE: (64, 0, 1) must hold positive integers"),
    ({"DATA": {"TRAIN": {"PADDING": (40, 0)}, "PATCH_SIZE": (64, 64, 1)}},
     "DATA.TRAIN.PADDING: (40, 0) must be whole pixels below half"),
    ({"DATA": {"NORMALIZATION": {"PERC_CLIP": {"ENABLE": True, "LOWER_PERC": 101.0}}}},
     "DATA.NORMALIZATION.PERC_CLIP.LOWER_PERC: 101.0 is out of range"),
    ({"DATA": {"NORMALIZATION": {"PERC_CLIP": {"ENABLE": True, "LOWER_PERC": 99.0, "UPPER_PERC": 1.0}}}},
     "LOWER_PERC must be below UPPER_PERC"),
    ({"DATA": {"TRAIN": {"PATCHES_PER_IMAGE": 0}}}, "DATA.TRAIN.PATCHES_PER_IMAGE: 0 is out of range"),
    ({"MODEL": {"FEATURE_MAPS": [16, 0]}}, "MODEL.FEATURE_MAPS: [16, 0] must hold positive integers"),
    ({"PROBLEM": {"NDIM": "3D"}, "DATA": {"PATCH_SIZE": (16, 64, 64, 1)}, "MODEL": {"Z_DOWN": [1, 1]}},
     "MODEL.Z_DOWN: [1, 1] must have 4 values"),
    ({"PROBLEM": {"SELF_SUPERVISED": {"PRETEXT_TASK": "masking"}}, "MODEL": {"ARCHITECTURE": "mae",
      "VIT_EMBED_DIM": 100, "VIT_NUM_HEADS": 3}}, "MODEL.VIT_EMBED_DIM: 100 is not divisible by MODEL.VIT_NUM_HEADS 3"),
    ({"TRAIN": {"OPT_BETAS": (0.9, 1.0)}}, "TRAIN.OPT_BETAS: (0.9, 1.0) must be two values in [0, 1)"),
    ({"MODEL": {"SAVE_CKPT_FREQ": 0}}, "MODEL.SAVE_CKPT_FREQ: 0 is out of range"),
    ({"AUGMENTOR": {"DA_PROB": 1.5}}, "AUGMENTOR.DA_PROB: 1.5 is out of range"),
    ({"SYSTEM": {"SEED": -1}}, "SYSTEM.SEED: -1 is out of range; expected 0..4294967295"),
    ({"DATA": {"NORMALIZATION": {"PERC_CLIP": {"ENABLE": True}}}},
     "DATA.NORMALIZATION.PERC_CLIP.ENABLE is True but no bound is set"),
    ({"LOSS": {"TYPE": "W_MAE_SSIM", "WEIGHTS": [0.0, 0.0]}}, "LOSS.WEIGHTS: [0.0, 0.0] weighs both terms 0"),
    ({"LOSS": {"IGNORE_INDEX": 255}}, "LOSS.IGNORE_INDEX: applies to semantic segmentation labels"),
    ({"PROBLEM": {"TYPE": "SEMANTIC_SEG"}, "LOSS": {"IGNORE_INDEX": -2}}, "LOSS.IGNORE_INDEX: -2 is out of range"),
    ({"PROBLEM": {"TYPE": "SEMANTIC_SEG"}, "LOSS": {"CLASS_REBALANCE": "auto"}}, "LOSS.CLASS_REBALANCE"),
    ({"PROBLEM": {"TYPE": "SEMANTIC_SEG"}, "LOSS": {"CLASS_WEIGHTS": [1.0, 2.0]}},
     "LOSS.CLASS_WEIGHTS: [1.0, 2.0] is set but LOSS.CLASS_REBALANCE is 'none'"),
    ({"PROBLEM": {"TYPE": "SEMANTIC_SEG"}, "MODEL": {"N_CLASSES": 3},
      "LOSS": {"CLASS_REBALANCE": "manual", "CLASS_WEIGHTS": [1.0, 2.0]}}, "must hold 3 non-negative weights"),
    ({"SYSTEM": {"SEED": 2 ** 70}}, "SYSTEM.SEED: 1180591620717411303424 is out of range"),
    ({"PROBLEM": {"SELF_SUPERVISED": {"PRETEXT_TASK": "masking"}}, "MODEL": {"MAE_MASK_RATIO": 0.0}},
     "MODEL.MAE_MASK_RATIO: 0.0 hides none"),
    ({"PROBLEM": {"SELF_SUPERVISED": {"PRETEXT_TASK": "masking"}},  # grid masks hide hidden_count tokens too
      "MODEL": {"ARCHITECTURE": "mae", "MAE_MASK_TYPE": "grid", "MAE_MASK_RATIO": 0.0}},
     "MODEL.MAE_MASK_RATIO: 0.0 hides none"),
    ({"PROBLEM": {"SELF_SUPERVISED": {"PRETEXT_TASK": "masking"}}, "DATA": {"PATCH_SIZE": (32, 32, 1)},
      "MODEL": {"ARCHITECTURE": "mae", "MAE_MASK_TYPE": "grid", "VIT_TOKEN_SIZE": 32}},
     "hides none of the 1 block(s) of 32 pixels (MODEL.VIT_TOKEN_SIZE)"),
    ({"DATA": {"NORMALIZATION": {"TYPE": "custom", "ZERO_MEAN_UNIT_VAR": {"MEAN_VAL": [1.0, 2.0],
                                                                          "STD_VAL": [1.0, 2.0]}}}},
     "DATA.NORMALIZATION.ZERO_MEAN_UNIT_VAR.MEAN_VAL: [1.0, 2.0] holds 2 value(s) but DATA.PATCH_SIZE has 1 channel"),
])
def test_values_out_of_range_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        checked(overrides)


def test_ranges_of_augmentations_that_do_not_run_are_not_checked_and_valid_values_pass():
    checked({"AUGMENTOR": {"ENABLE": True, "G_SIGMA": (-1.0, 2.0), "GC_GAMMA": (2.0, 1.0)}})  # G_BLUR, GAMMA off
    checked({"SYSTEM": {"NUM_WORKERS": 0, "NUM_CPUS": 1},
             "PROBLEM": {"TYPE": "SEMANTIC_SEG", "SEMANTIC_SEG": {"IGNORE_CLASS_ID": -1}},
             "DATA": {"NORMALIZATION": {"TYPE": "custom", "ZERO_MEAN_UNIT_VAR": {"STD_VAL": [2.5]}}},
             "AUGMENTOR": {"ENABLE": True, "G_BLUR": True, "G_SIGMA": (0.0, 1.0), "RANDOM_ROT": True},
             "TRAIN": {"LR_SCHEDULER": {"NAME": "reduceonplateau", "MIN_LR": 0.0, "REDUCEONPLATEAU_PATIENCE": 0}}})


def test_patch_not_divisible_by_the_unet_depth_is_rejected():
    with pytest.raises(ConfigError, match="DATA.PATCH_SIZE"):
        checked({"DATA": {"PATCH_SIZE": (50, 50, 1)}})


def test_missing_data_folder_names_the_key(tmp_path, folders):
    train, test = folders
    with pytest.raises(ConfigError, match="DATA.TRAIN.PATH"):
        checked({"DATA": {"TRAIN": {"PATH": str(tmp_path / "nope")}, "TEST": {"PATH": str(test)}}}, folders)
    with pytest.raises(ConfigError, match="DATA.TEST.PATH"):
        checked({"DATA": {"TRAIN": {"PATH": str(train)}, "TEST": {"PATH": ""}}}, folders)


def test_coerce_keeps_types_and_refuses_others():
    assert coerce("K", "3", 1) == 3
    assert coerce("K", 3, 1.0) == 3.0 and isinstance(coerce("K", 3, 1.0), float)
    assert coerce("K", [1, 2], (0, 0)) == (1, 2)
    with pytest.raises(ConfigError):
        coerce("K", True, 1)
    with pytest.raises(ConfigError):
        coerce("K", 1.5, 1)


def test_copy_folder_of_dot_is_beside_the_current_folder_not_inside_it(tmp_path, folders, monkeypatch):
    """DATA.TRAIN.PATH '.' (run from inside the image folder): Path('.').name is '', and the copies had gone into
    the image folder as '_ssl_source'."""
    train, test = folders
    monkeypatch.chdir(train)
    cfg = checked({"DATA": {"TRAIN": {"PATH": "."}, "TEST": {"PATH": "../test"}}}, folders)
    finalize(cfg, Job(tmp_path / "out", "demo", 1))
    assert cfg.DATA.TRAIN.SSL_SOURCE_DIR == str(tmp_path / "train_ssl_source")
    assert cfg.DATA.TEST.SSL_SOURCE_DIR == str(Path("..") / "test_ssl_source")  # relative paths stay relative


def test_finalize_fills_derived_values_and_the_resolved_config_round_trips(tmp_path, folders):
    train, test = folders
    cfg = checked({"DATA": {"TRAIN": {"PATH": str(train)}, "TEST": {"PATH": str(test)}}}, folders)
    job = Job(tmp_path / "out", "demo", 3)
    finalize(cfg, job)
    assert cfg.SYSTEM.NUM_CPUS >= 1 and cfg.SYSTEM.NUM_WORKERS >= 0
    assert cfg.PATHS.RESULT_DIR == str(tmp_path / "out" / "demo" / "results" / "demo_3")
    assert cfg.PATHS.CHECKPOINT == str(tmp_path / "out" / "demo" / "checkpoints")
    assert cfg.DATA.TRAIN.SSL_SOURCE_DIR == str(tmp_path / "train_ssl_source")
    assert cfg.DATA.VAL.SSL_SOURCE_DIR == cfg.DATA.TRAIN.SSL_SOURCE_DIR
    assert cfg.LOSS.TYPE == "MAE"
    assert cfg.TEST.METRICS == ["psnr", "ssim", "mae", "mse"]
    assert cfg.TEST.BATCH_SIZE == cfg.TRAIN.BATCH_SIZE
    reloaded = load_config(yaml.safe_load(cfg.dump()))
    assert reloaded == cfg


def test_a_derived_key_given_in_the_yaml_is_named_in_one_warning_and_replaced(tmp_path, folders, caplog):
    train, test = folders
    given = {"DATA": {"TRAIN": {"PATH": str(train)}, "TEST": {"PATH": str(test)}},
             "PATHS": {"RESULT_DIR": "/elsewhere", "CHARTS": "/charts", "CHECKPOINT_FILE": ""}}
    with caplog.at_level("WARNING", logger="biapy"):
        cfg = checked(given, folders)
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and "PATHS.RESULT_DIR, PATHS.CHARTS set from --result_dir" in warned[0]
    assert "CHECKPOINT_FILE" not in warned[0]
    finalize(cfg, Job(tmp_path / "out", "demo", 1))
    assert cfg.PATHS.RESULT_DIR == str(tmp_path / "out" / "demo" / "results" / "demo_1")
    caplog.clear()
    with caplog.at_level("WARNING", logger="biapy"):
        checked({"DATA": given["DATA"]}, folders)
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_3d_problem_gets_3d_overlap_and_padding_defaults():
    cfg = checked({"PROBLEM": {"NDIM": "3D"}, "DATA": {"PATCH_SIZE": (16, 32, 32, 1)},
                   "MODEL": {"FEATURE_MAPS": [8, 16, 32], "DROPOUT_VALUES": [0, 0, 0], "Z_DOWN": [1, 1]}})
    assert cfg.DATA.TEST.OVERLAP == (0, 0, 0) and cfg.DATA.TRAIN.PADDING == (0, 0, 0)


def test_choices_ignore_letter_case_and_store_the_canonical_spelling():
    """BiaPy writes ACTIVATION 'ELU'; 'adamw' or 'mse' name a choice just as well."""
    cfg = checked({"MODEL": {"ACTIVATION": "ELU", "ARCHITECTURE": "ResUNet", "NORMALIZATION": "BN"},
                   "TRAIN": {"OPTIMIZER": "adamw", "LR_SCHEDULER": {"NAME": "WarmUpCosine"}},
                   "LOSS": {"TYPE": "mse"}, "PROBLEM": {"NDIM": "2d", "SELF_SUPERVISED": {"PRETEXT_TASK": "Crappify"}}})
    assert (cfg.MODEL.ACTIVATION, cfg.MODEL.ARCHITECTURE, cfg.MODEL.NORMALIZATION) == ("elu", "resunet", "bn")
    assert (cfg.TRAIN.OPTIMIZER, cfg.TRAIN.LR_SCHEDULER.NAME, cfg.LOSS.TYPE) == ("ADAMW", "warmupcosine", "MSE")
    assert (cfg.PROBLEM.NDIM, cfg.PROBLEM.SELF_SUPERVISED.PRETEXT_TASK) == ("2D", "crappify")


def test_masking_settings_that_hide_blocks_pass():
    checked({"PROBLEM": {"SELF_SUPERVISED": {"PRETEXT_TASK": "masking", "MASK_BLOCK_SIZE": 16}},
             "DATA": {"PATCH_SIZE": (32, 32, 1)}, "MODEL": {"MAE_MASK_RATIO": 0.5}})  # 4 blocks, 2 hidden


def test_workers_are_capped_to_the_usable_cores(tmp_path, folders, monkeypatch):
    import os
    train, test = folders
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    cfg = checked({"SYSTEM": {"NUM_WORKERS": 5}, "DATA": {"TRAIN": {"PATH": str(train)}, "TEST": {"PATH": str(test)}}},
                  folders)
    finalize(cfg, Job(tmp_path, "w", 1))
    assert cfg.SYSTEM.NUM_WORKERS == 2  # BiaPy's templates ask for 5; more than the cores only adds processes


def test_a_process_count_that_is_not_a_number_is_a_one_line_error(monkeypatch):
    from biapy.config.checks import cores_per_process
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "two")
    with pytest.raises(ConfigError, match=r"^environment variable LOCAL_WORLD_SIZE='two' is not a process count"):
        cores_per_process(16)


def test_cores_are_the_ones_this_process_may_run_on(tmp_path, folders, monkeypatch):
    """A Slurm job given 4 cores of a 64-core node: 4 torch threads and 3 workers, not 64 threads."""
    import os
    train, test = folders
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {8, 9, 10, 11}, raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cfg = checked({"DATA": {"TRAIN": {"PATH": str(train)}, "TEST": {"PATH": str(test)}}}, folders)
    finalize(cfg, Job(tmp_path, "w", 1))
    assert (cfg.SYSTEM.NUM_CPUS, cfg.SYSTEM.NUM_WORKERS) == (4, 3)


@pytest.mark.parametrize("world_size, local_world_size, cores, workers", [
    (None, None, 16, 4),  # one process
    ("16", "4", 4, 3),    # torchrun, 4 processes on each of 4 machines
    ("16", "8", 2, 0),
    ("4", None, 4, 3),    # a launcher that sets only WORLD_SIZE: all taken to share this machine
    (None, "4", 16, 4),   # a stray LOCAL_WORLD_SIZE in a single process's environment
    ("", "", 16, 4),
])
def test_automatic_workers_and_threads_share_the_machine_among_its_processes(
        tmp_path, folders, monkeypatch, world_size, local_world_size, cores, workers):
    """16 cores: one process gets min(16 - 1, 4) workers; 4 (or 8) processes on this machine 4 (or 2) cores each,
    so 3 workers (or none) apiece, and as many torch threads. torchrun's WORLD_SIZE counts every machine's."""
    import os

    from biapy.config.checks import cores_per_process
    train, test = folders
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    for name, value in (("WORLD_SIZE", world_size), ("LOCAL_WORLD_SIZE", local_world_size)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    cfg = checked({"DATA": {"TRAIN": {"PATH": str(train)}, "TEST": {"PATH": str(test)}}}, folders)
    finalize(cfg, Job(tmp_path, "w", 1))
    assert cfg.SYSTEM.NUM_CPUS == 16
    assert (cores_per_process(cfg.SYSTEM.NUM_CPUS), cfg.SYSTEM.NUM_WORKERS) == (cores, workers)


@pytest.mark.parametrize("text, message", [
    ("TRAIN:\n  EPOCHS: 2\nDATA:\n  PATCH_SIZE: (32, 32, 1)\nTRAIN:\n  LR: 0.1\n", "(line 5): TRAIN appears twice"),
    ("TRAIN:\n  EPOCHS: 2\n  EPOCHS: 3\n", "(line 3): EPOCHS appears twice"),
    ("TRAIN: 5\n", "TRAIN is a section of keys, not a value"),
])
def test_yaml_mistakes_that_would_pass_silently_are_named(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(path)


def test_a_folder_given_as_config_and_lower_case_booleans_on_the_command_line(tmp_path):
    with pytest.raises(ConfigError, match="is a folder; expected a YAML file"):
        load_config(tmp_path)
    assert load_config(None, ["TEST.ENABLE", "false", "TRAIN.ENABLE", "True"]).TEST.ENABLE is False


def test_yaml_merge_keys_still_work_and_may_be_overridden(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("DATA:\n  TRAIN: &common\n    PATH: /x\n    IN_MEMORY: true\n"
                    "  VAL:\n    <<: *common\n    IN_MEMORY: false\n")
    cfg = load_config(path)
    assert (cfg.DATA.VAL.PATH, cfg.DATA.VAL.IN_MEMORY, cfg.DATA.TRAIN.IN_MEMORY) == ("/x", False, True)


def test_all_zero_dropouts_and_z_down_of_another_length_are_filled_as_biapy_does():
    """BiaPy's documented MODEL block: FEATURE_MAPS of 4 levels beside its default 5 dropouts (and zeros in Z_DOWN)."""
    cfg = checked({"PROBLEM": {"NDIM": "3D"}, "DATA": {"PATCH_SIZE": (16, 32, 32, 1)},
                   "MODEL": {"FEATURE_MAPS": [8, 16, 32, 64], "DROPOUT_VALUES": [0.0] * 5, "Z_DOWN": [0, 0]}})
    assert list(cfg.MODEL.DROPOUT_VALUES) == [0.0] * 4 and list(cfg.MODEL.Z_DOWN) == [0, 0, 0]


@pytest.mark.parametrize("word, setting", [("off", "off"), ("no", "off"), ("false", "off"), ("on", "auto"),
                                           ("'off'", "off"), ("bf16", "bf16")])
def test_yaml_on_off_words_of_train_amp_name_its_settings(tmp_path, word, setting):
    """YAML reads `AMP: off` as false, which had been refused as 'expected a string, got False'."""
    path = tmp_path / "amp.yaml"
    path.write_text(f"TRAIN:\n  AMP: {word}\n")
    assert load_config(path).TRAIN.AMP == setting
    word = word.strip("'")
    assert load_config(None, ["TRAIN.AMP", word]).TRAIN.AMP == setting  # the command line reads them alike
    path.write_text("TRAIN:\n  AMP: 3\n")
    with pytest.raises(ConfigError, match="TRAIN.AMP: expected a string, got 3"):
        load_config(path)


@pytest.mark.parametrize("problem, arch", [("SEMANTIC_SEG", "unetr"), ("SELF_SUPERVISED", "mae")])
def test_a_vit_does_not_need_z_down_to_match_the_feature_maps(problem, arch):
    """Z_DOWN pools a 3D U-Net's encoder; a ViT never reads it, so a template's Z_DOWN beside three UNETR levels
    had stopped the job."""
    sections = {"PROBLEM": {"TYPE": problem, "NDIM": "3D"}, "DATA": {"PATCH_SIZE": (16, 32, 32, 1)},
                "MODEL": {"ARCHITECTURE": arch, "FEATURE_MAPS": [16, 32, 64], "Z_DOWN": [1, 2, 2],
                          "DROPOUT_VALUES": [0.0, 0.0, 0.0], "VIT_TOKEN_SIZE": 8}}
    if arch == "mae":
        sections["PROBLEM"]["SELF_SUPERVISED"] = {"PRETEXT_TASK": "masking"}
    checked(sections)
    sections["MODEL"]["ARCHITECTURE"] = "unet"  # a U-Net still needs one value per down-sampling
    if arch == "unetr":
        with pytest.raises(ConfigError, match=r"MODEL.Z_DOWN: \[1, 2, 2\] must have 2 values"):
            checked(sections)


def _alias_bomb(levels):
    """A value of nested YAML aliases: a few hundred bytes that stand for 9**levels strings."""
    nested = "[&l0 [" + ", ".join(['"x"'] * 9) + "]"
    for i in range(1, levels):
        nested += f", &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]"
    return nested + "]"


@pytest.mark.parametrize("text", [f"DATA:\n  PATCH_SIZE: {_alias_bomb(8)}\n",
                                  "TRAIN: &a {EPOCHS: *a}\n",  # an alias of its own section: endless
                                  "DATA: &a\n  TRAIN: {X: {<<: *a}}\n"])  # the same through a merge
def test_yaml_aliases_that_repeat_a_value_without_end_are_refused_in_one_short_line(tmp_path, text):
    """A 600-byte alias bomb had made a 254 MB error line (1.3 GB, 6 s); a self-referring alias a traceback."""
    path = tmp_path / "bomb.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"holds more than 10000 values or nests them more than 12 deep") as err:
        load_config(path)
    assert len(str(err.value)) < 300
    with pytest.raises(ConfigError, match=r"^command line: TRAIN.METRICS holds more than 10000 values") as err:
        load_config(None, ["TRAIN.METRICS", _alias_bomb(8).replace('"x"', "x")])  # bare words: read as YAML


def test_long_values_are_cut_short_in_error_messages(tmp_path):
    path = tmp_path / "long.yaml"
    path.write_text(f"DATA:\n  PATCH_SIZE: [{', '.join(['x'] * 5000)}]\nTRAIN:\n  EPOCHS: {'n' * 5000}\n")
    with pytest.raises(ConfigError, match=r"PATCH_SIZE: expected a list of finite numbers, got \['x', 'x'") as err:
        load_config(path)
    assert len(str(err.value)) < 200
    with pytest.raises(ConfigError, match=r"EPOCHS: expected an integer, got 'nnn.*\.\.\..*' \(a string\)") as err:
        load_config(None, ["TRAIN.EPOCHS", "n" * 5000])
    assert len(str(err.value)) < 200


@pytest.mark.parametrize("overrides, start", [
    (["TRAIN.OPTIMIZER", "x" * 5000], "TRAIN.OPTIMIZER: 'xxx"),
    (["MODEL.ARCHITECTURE", "x" * 5000], "MODEL.ARCHITECTURE: 'xxx"),
    (["DATA.PATCH_SIZE", "[" + ", ".join(["1"] * 3000) + "]"], "DATA.PATCH_SIZE: (1, 1, 1"),
    (["MODEL.DROPOUT_VALUES", "[" + ", ".join(["0.1"] * 3000) + "]"], "MODEL.DROPOUT_VALUES: [0.1, 0.1"),
    (["TRAIN.OPT_BETAS", "[" + ", ".join(["0.5"] * 3000) + "]"], "TRAIN.OPT_BETAS: (0.5, 0.5"),
    (["DATA.TEST.OVERLAP", "[" + ", ".join(["0.5"] * 3000) + "]"], "DATA.TEST.OVERLAP: (0.5, 0.5"),
    (["MODEL.FEATURE_MAPS", "[" + ", ".join(["2"] * 3000) + "]", "MODEL.DROPOUT_VALUES", "[" + ", ".join(["0"] * 3000)
      + "]"], "DATA.PATCH_SIZE (256, 256) must be divisible by (6"),
])
def test_checks_show_long_values_cut_short(overrides, start):
    """Checks had spelled a value out whole: 5 to 15 KB on one line (a 900-digit pooling divisor)."""
    cfg = load_config(None, ["DATA.TRAIN.PATH", "x", "DATA.TEST.PATH", "x"] + overrides)
    with pytest.raises(ConfigError) as err:
        check_config(cfg, check_paths=False)
        check_patch_fits(cfg)
    assert str(err.value).startswith(start) and len(str(err.value)) < 300, str(err.value)[:400]


@pytest.mark.parametrize("text, line, kind", [("? [1, 2]\n: 3\n", 1, "list"), ("TRAIN:\n  [1]: 3\n", 2, "list"),
                                              ("TRAIN:\n  ? {a: 1}\n  : 3\n", 2, "mapping")])
def test_yaml_keys_that_are_lists_or_mappings_are_named(tmp_path, text, line, kind):
    """They had stopped the run with `TypeError: unhashable type` and a traceback."""
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(f"(line {line}): a key must be a plain name such as EPOCHS, "
                                                    f"not a {kind}")):
        load_config(path)


@pytest.mark.parametrize("text, message", [
    ("MODEL: {N_CLASSES: 2}\nDATA: {N_CLASSES: 3}\n", "MODEL.N_CLASSES is 2 but DATA.N_CLASSES is 3; both set "
                                                      "MODEL.N_CLASSES"),
    ("DATA:\n  EXTRACT_RANDOM_PATCH: true\n  TRAIN: {EXTRACT_RANDOM_PATCH: false}\n",
     "DATA.EXTRACT_RANDOM_PATCH is True but DATA.TRAIN.EXTRACT_RANDOM_PATCH is False; both set "
     "DATA.TRAIN.EXTRACT_RANDOM_PATCH"),
])
def test_a_biapy_key_and_its_new_name_set_differently_are_refused(tmp_path, text, message):
    """The one read last had won silently (MODEL.N_CLASSES 3 above), where a key written twice is refused."""
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(path)
    path.write_text("MODEL: {N_CLASSES: 3}\nDATA: {N_CLASSES: 3}\n")  # the same value twice: no doubt
    assert load_config(path).MODEL.N_CLASSES == 3
    path.write_text("MODEL: {N_CLASSES: 2}\n")
    assert load_config(path, ["DATA.N_CLASSES", "4"]).MODEL.N_CLASSES == 4  # the command line overrides the file
    with pytest.raises(ConfigError, match=re.escape("command line: DATA.N_CLASSES is 4 but MODEL.N_CLASSES is 5")):
        load_config(path, ["DATA.N_CLASSES", "4", "MODEL.N_CLASSES", "5"])
    assert load_config(None, ["TRAIN.EPOCHS", "2", "TRAIN.EPOCHS", "3"]).TRAIN.EPOCHS == 3  # appended: the last


def test_a_tilde_in_config_paths_is_the_home_folder(tmp_path, monkeypatch):
    """`~/...` had been read as a folder named '~' in the current one: 'folder ~/train does not exist'."""
    monkeypatch.setenv("HOME", str(tmp_path))
    for folder in ("train", "test"):
        (tmp_path / folder).mkdir()
    (tmp_path / "c.pth").write_bytes(b"")
    cfg = load_config(None, ["DATA.TRAIN.PATH", "~/train", "DATA.TEST.PATH", "~/test", "DATA.TEST.SSL_SOURCE_DIR",
                             "~/copies", "MODEL.LOAD_CHECKPOINT", "True", "PATHS.CHECKPOINT_FILE", "~/c.pth"])
    check_config(cfg)
    assert (cfg.DATA.TRAIN.PATH, cfg.DATA.TEST.SSL_SOURCE_DIR, cfg.PATHS.CHECKPOINT_FILE) == (
        str(tmp_path / "train"), str(tmp_path / "copies"), str(tmp_path / "c.pth"))
    assert cfg.DATA.TRAIN.SSL_SOURCE_DIR == "" and finalize(cfg, Job(tmp_path, "w", 1)).DATA.TRAIN.SSL_SOURCE_DIR == \
        str(tmp_path / "train_ssl_source")


def test_the_yaml_file_is_read_as_utf_8_whatever_the_locale(tmp_path):
    """Under LC_ALL=C a comment such as '# données' had stopped the run: 'ascii' codec can't decode."""
    good, bom, latin = tmp_path / "good.yaml", tmp_path / "bom.yaml", tmp_path / "latin.yaml"
    good.write_bytes("# données\nTRAIN:\n  EPOCHS: 7\n".encode("utf-8"))
    bom.write_bytes("# données\nTRAIN:\n  EPOCHS: 8\n".encode("utf-8-sig"))
    latin.write_bytes("# données\nTRAIN:\n  EPOCHS: 9\n".encode("latin-1"))
    code = ("import sys\nfrom biapy.config import load_config\nfrom biapy.errors import ConfigError\n"
            "for path in sys.argv[1:]:\n    try:\n        print(load_config(path).TRAIN.EPOCHS)\n"
            "    except ConfigError as err:\n        print(err)\n")
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONIOENCODING": "utf-8"}
    out = subprocess.run([sys.executable, "-c", code, str(good), str(bom), str(latin)], capture_output=True,
                         text=True, encoding="utf-8", env=env, cwd=Path(__file__).parents[1], check=True).stdout
    lines = out.splitlines()
    assert lines[:2] == ["7", "8"]
    assert lines[2].startswith(f"--config: cannot read {latin}: 'utf-8' codec can't decode") and len(lines) == 3
