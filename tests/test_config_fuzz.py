"""Random values at the config keys: the program either accepts the config or stops with a ConfigError.

Each example takes a small valid config, overwrites a few keys (any key, or a misspelt one) with
random values, given either as YAML values (a mapping) or as command-line strings (`KEY VALUE`),
then runs what a job does before touching data: load, check, finalize, and build the pieces the
config feeds directly (normalizer, loss, augmentor, optimizer, model). Anything other than a
ConfigError escaping is a bug.
"""
import math
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from biapy.config import check_config, finalize, load_config, ndim_of
from biapy.config.defaults import get_defaults
from biapy.config.load import _leaf_keys
from biapy.data.augmentation import Augmentor
from biapy.data.normalization import Normalizer
from biapy.engine.losses import build_loss
from biapy.engine.optim import build_optimizer, build_scheduler
from biapy.errors import ConfigError
from biapy.job import Job
from biapy.models import build_model

KEYS = _leaf_keys(get_defaults())
_DATA = Path(tempfile.gettempdir()) / "biapy_fuzz_unset"  # set by the `folders` fixture


@pytest.fixture(scope="module", autouse=True)
def folders(tmp_path_factory):
    """Data folders that exist (nothing is read from them), so path checks pass."""
    global _DATA
    _DATA = tmp_path_factory.mktemp("fuzz")
    for sub in ("train", "train_y", "test", "test_y"):
        (_DATA / sub).mkdir()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # thousands of tiny forward passes: threads only add overhead
    yield
    torch.set_num_threads(threads)


# Values a user could plausibly write for some key: choices of the string keys and small numbers.
WORDS = ["2D", "3D", "crappify", "masking", "SELF_SUPERVISED", "SEMANTIC_SEG", "unet", "resunet", "mae", "unetr",
         "MAE", "MSE", "SSIM", "CE", "DICE", "W_MAE_SSIM", "psnr", "ssim", "iou", "grid", "random", "bn", "in",
         "gn", "none", "relu", "gelu", "ADAM", "SGD", "ADAMW", "warmupcosine", "onecycle", "reduceonplateau",
         "auto", "off", "bf16", "fp16", "div", "scale_range", "custom", "best_on_val", "last_on_train", "",
         "__import__('os').system('false')", "[1, 2", "nan", "inf", "-1", "1e-3", "(8, 8, 1)", "True"]
scalars = st.one_of(
    st.integers(-3, 40), st.sampled_from([0, 1, 2, 4, 8, 16, 32, 64, 2 ** 40]),
    st.floats(allow_nan=True, allow_infinity=True, width=32), st.floats(-2, 2), st.booleans(), st.none(),
    st.sampled_from(WORDS), st.text(max_size=6))
anything = st.one_of(scalars, st.lists(scalars, max_size=6),
                     st.lists(st.lists(st.integers(0, 4), max_size=3), max_size=3),
                     st.dictionaries(st.sampled_from(["A", "B"]), st.integers(), max_size=2))
ints = st.one_of(st.integers(-3, 40), st.sampled_from([-1, 0, 1, 2, 3, 4, 8, 16, 64, 2 ** 40]))
floats = st.one_of(st.floats(-2, 2), st.sampled_from([-1.0, 0.0, 0.5, 1.0, 1e-9, 100.0]),
                   st.floats(allow_nan=True, allow_infinity=True))
numbers = st.one_of(ints, floats)
words = st.one_of(st.sampled_from(WORDS), st.text(max_size=6))


def _like(default):
    """Mostly a value of the default's type (so the checks behind the type check are reached)."""
    if isinstance(default, bool):
        typed = st.booleans()
    elif isinstance(default, int):
        typed = ints
    elif isinstance(default, float):
        typed = floats
    elif isinstance(default, str):
        typed = words
    else:
        item = numbers if default and not isinstance(default[0], str) else st.one_of(words, numbers)
        typed = st.lists(item, max_size=6)
    return st.one_of(typed, typed, typed, anything)


def _default(key):
    node = get_defaults()
    for part in key.split("."):
        node = node[part]
    return node


def _key_value(key):
    return _like(_default(key)).map(lambda value: (key, value))


def _misspelt(key):
    return st.sampled_from([key.lower(), key + "S", key.replace(".", "_", 1), key[:-1], "NOPE." + key])


# Two thirds a real key with a value of about its type, one third a misspelt key.
change = st.one_of(st.sampled_from(KEYS).flatmap(_key_value), st.sampled_from(KEYS).flatmap(_key_value),
                   st.tuples(st.sampled_from(KEYS).flatmap(_misspelt), anything))

BASES = {
    "2d_crappify_unet": {},
    "3d_crappify_resunet": {"PROBLEM": {"NDIM": "3D"}, "DATA": {"PATCH_SIZE": (8, 16, 16, 2)},
                            "MODEL": {"ARCHITECTURE": "resunet"}},
    "2d_masking_mae": {"PROBLEM": {"SELF_SUPERVISED": {"PRETEXT_TASK": "masking"}}, "MODEL": {"ARCHITECTURE": "mae"}},
    "3d_masking_unet": {"PROBLEM": {"NDIM": "3D", "SELF_SUPERVISED": {"PRETEXT_TASK": "masking"}},
                        "DATA": {"PATCH_SIZE": (16, 16, 16, 1)}},
    "3d_segmentation_unetr": {"PROBLEM": {"NDIM": "3D", "TYPE": "SEMANTIC_SEG"},
                              "DATA": {"PATCH_SIZE": (8, 16, 16, 1)},
                              "MODEL": {"ARCHITECTURE": "unetr", "N_CLASSES": 3}},
}


def _merge(tree, extra):
    for key, value in extra.items():
        if isinstance(value, dict):
            _merge(tree.setdefault(key, {}), value)
        else:
            tree[key] = value
    return tree


def base_config(kind="2d_crappify_unet"):
    """A small valid config of `kind` (tiny U-Net and ViT sizes, so any model builds fast)."""
    tree = {
        "PROBLEM": {"NDIM": "2D"},
        "SYSTEM": {"NUM_WORKERS": 0},
        "DATA": {"PATCH_SIZE": (16, 16, 1),
                 "TRAIN": {"PATH": str(_DATA / "train"), "GT_PATH": str(_DATA / "train_y")},
                 "VAL": {"PATH": str(_DATA / "train"), "GT_PATH": str(_DATA / "train_y")},
                 "TEST": {"PATH": str(_DATA / "test"), "GT_PATH": str(_DATA / "test_y")}},
        "MODEL": {"FEATURE_MAPS": [2, 4], "DROPOUT_VALUES": [0.0, 0.0], "Z_DOWN": [0], "VIT_TOKEN_SIZE": 8,
                  "VIT_EMBED_DIM": 8, "VIT_NUM_LAYERS": 1, "VIT_NUM_HEADS": 2, "MAE_DEC_HIDDEN_SIZE": 8,
                  "MAE_DEC_NUM_LAYERS": 1, "MAE_DEC_NUM_HEADS": 2, "MAE_DEC_MLP_DIMS": 8},
        "TRAIN": {"EPOCHS": 3},
    }
    return _merge(tree, BASES[kind])


def _small(cfg):
    """Only build models whose size the fuzzer kept small (a random 2**40 feature count must not allocate)."""
    m = cfg.MODEL
    dims = list(m.FEATURE_MAPS) + list(cfg.DATA.PATCH_SIZE) + [m.N_CLASSES, m.KERNEL_SIZE, m.VIT_EMBED_DIM,
                                                               m.VIT_NUM_LAYERS, m.MAE_DEC_HIDDEN_SIZE,
                                                               m.MAE_DEC_NUM_LAYERS, m.MAE_DEC_MLP_DIMS]
    tokens = math.prod(s // max(1, m.VIT_TOKEN_SIZE) for s in cfg.DATA.PATCH_SIZE[:-1])
    return max(dims) <= 64 and len(m.FEATURE_MAPS) <= 6 and m.VIT_MLP_RATIO <= 16 and tokens <= 4096


def prepare(changes, as_strings, kind="2d_crappify_unet"):
    """What a job does with its config before reading any image."""
    if as_strings:
        overrides = [part for key, value in changes for part in (key, str(value))]
        cfg = load_config(base_config(kind), overrides)
    else:
        tree = base_config(kind)
        for key, value in changes:
            node = tree
            *parents, leaf = key.split(".")
            for part in parents:
                node = node.setdefault(part, {}) if isinstance(node.get(part, {}), dict) else {}
            node[leaf] = value
        cfg = load_config(tree)
    check_config(cfg)
    cfg = finalize(cfg, Job(_DATA / "out", "fuzz", 1))
    Normalizer.from_cfg(cfg)
    build_loss(cfg)
    Augmentor(cfg.AUGMENTOR, ndim_of(cfg))
    if _small(cfg):
        model = build_model(cfg)
        optimizer = build_optimizer(model, cfg)
        build_scheduler(optimizer, cfg, steps_per_epoch=3)
        patch = tuple(cfg.DATA.PATCH_SIZE)
        if math.prod(patch) <= 16 ** 3 * 4:
            with torch.no_grad():
                model.eval()(torch.zeros(1, patch[-1], *patch[:-1]))
    return cfg


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(changes=st.lists(change, min_size=1, max_size=4), as_strings=st.booleans(),
       kind=st.sampled_from(sorted(BASES)))
def test_random_config_values_run_or_stop_with_a_config_error(changes, as_strings, kind):
    try:
        prepare(changes, as_strings, kind)
    except ConfigError as err:
        assert str(err).strip()


@pytest.mark.parametrize("kind", sorted(BASES))
def test_the_base_configs_are_valid(kind):
    cfg = prepare([], as_strings=False, kind=kind)
    assert cfg.PROBLEM.NDIM == ("3D" if kind.startswith("3d") else "2D")


@pytest.mark.parametrize("key, value", [
    ("TRAIN.LR", "nan"), ("TRAIN.LR", "inf"), ("TRAIN.W_DECAY", float("nan")),
    ("TRAIN.GRADIENT_CLIP_NORM", float("inf")), ("DATA.TRAIN.OVERLAP", "('a', 'b')"),
    ("MODEL.FEATURE_MAPS", "[4, 'x']"), ("MODEL.DROPOUT_VALUES", "[0.0, 2.0]"), ("MODEL.KERNEL_SIZE", "0"),
    ("DATA.NORMALIZATION.ZERO_MEAN_UNIT_VAR.MEAN_VAL", "['a']"),
    ("DATA.NORMALIZATION.ZERO_MEAN_UNIT_VAR.MEAN_VAL", [[2, 4, 0], [], []]), ("LOSS.WEIGHTS", ["a", 1]),
    ("DATA.PATCH_SIZE", [2 ** 2000, 16, 1]), ("MODEL.VIT_EMBED_DIM", 0), ("MODEL.MAE_DEC_HIDDEN_SIZE", 0),
    ("MODEL.VIT_MLP_RATIO", -1.0),
])
def test_values_found_by_the_fuzzer_are_config_errors_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=key.split(".")[-1]):
        prepare([(key, value)], as_strings=isinstance(value, str), kind="2d_masking_mae")


def test_integer_betas_are_accepted_as_floats():
    cfg = prepare([("TRAIN.OPT_BETAS", [0, 0])], as_strings=False)  # torch's Adam refuses int betas
    assert cfg.TRAIN.OPT_BETAS == (0.0, 0.0)


def test_a_line_break_in_a_value_still_gives_one_error_line(tmp_path, capsys):
    from biapy.cli import main
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(base_config()))
    code = main(["--config", str(config), "--result_dir", str(tmp_path / "out"), "--name", "x",
                 "DATA.TRAIN.PATH", "no\nsuch"])
    assert code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ERROR: DATA.TRAIN.PATH"), lines
