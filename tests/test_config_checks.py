"""Config checks: each bad value stops the run with one line that names the key; good ones pass."""
import re

import pytest

from biapy.config import check_config, finalize, get_defaults, load_config
from biapy.errors import ConfigError
from biapy.job import Job
from biapy.models import check_patch_fits
from tests.conftest import checked


def test_defaults_pass_the_checks_without_paths():
    cfg = get_defaults()
    check_config(cfg, check_paths=False)


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


def test_missing_data_folder_names_the_key(tmp_path, config_folders):
    train, test = config_folders
    with pytest.raises(ConfigError, match="DATA.TRAIN.PATH"):
        checked({"DATA": {"TRAIN": {"PATH": str(tmp_path / "nope")}, "TEST": {"PATH": str(test)}}}, config_folders)
    with pytest.raises(ConfigError, match="DATA.TEST.PATH"):
        checked({"DATA": {"TRAIN": {"PATH": str(train)}, "TEST": {"PATH": ""}}}, config_folders)


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


def test_all_zero_dropouts_and_z_down_of_another_length_are_filled_as_biapy_does():
    """BiaPy's documented MODEL block: FEATURE_MAPS of 4 levels beside its default 5 dropouts (and zeros in Z_DOWN)."""
    cfg = checked({"PROBLEM": {"NDIM": "3D"}, "DATA": {"PATCH_SIZE": (16, 32, 32, 1)},
                   "MODEL": {"FEATURE_MAPS": [8, 16, 32, 64], "DROPOUT_VALUES": [0.0] * 5, "Z_DOWN": [0, 0]}})
    assert list(cfg.MODEL.DROPOUT_VALUES) == [0.0] * 4 and list(cfg.MODEL.Z_DOWN) == [0, 0, 0]


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
