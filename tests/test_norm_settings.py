"""Normalizer.settings: the one place that says which DATA.NORMALIZATION keys shape the normalized inputs, and the
checkpoint comparison (normalization_differences) that reads it."""
import random

import numpy as np
import pytest
import yaml

from biapy.config.defaults import get_defaults
from biapy.data.normalization import TYPES, Normalizer
from biapy.engine.checkpoint import check_own_run, function_key_differences, normalization_differences
from biapy.errors import ConfigError, DataError


# ------------------------------------------------------------------ the comparison before Normalizer.settings
def _reference_differences(saved, cfg):
    """normalization_differences as it was written before it read Normalizer.settings (kept as the reference)."""
    data = saved.get("DATA")
    norm = data.get("NORMALIZATION") if isinstance(data, dict) else None
    if not (isinstance(norm, dict) and isinstance(norm.get("TYPE"), str)):
        return []
    default = get_defaults()
    out = []

    def compare(key):
        theirs, mine = _reference_value(saved, key, default), _reference_value(cfg, key, default)
        if theirs != mine:
            out.append(f"DATA.NORMALIZATION.{key} {theirs} in the checkpoint, {mine} here")
        return theirs, mine

    kinds = compare("TYPE")
    if compare("PERC_CLIP.ENABLE") == (True, True):
        for side in ("LOWER", "UPPER"):
            if compare(f"PERC_CLIP.{side}_PERC") == (-1.0, -1.0):
                compare(f"PERC_CLIP.{side}_VALUE")
    if all(kind in ("zero_mean_unit_variance", "custom") for kind in kinds):
        compare("ZERO_MEAN_UNIT_VAR.MEAN_VAL")
        compare("ZERO_MEAN_UNIT_VAR.STD_VAL")
    return out


def _reference_value(tree, key, default):
    node, fallback = tree["DATA"]["NORMALIZATION"], default.DATA.NORMALIZATION
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
        fallback = fallback[part]
    value = fallback if node is None else node
    if isinstance(value, (list, tuple)):
        try:
            value = [float(v) for v in value]
        except (TypeError, ValueError):
            return list(value)
        return [-1.0] if all(v == -1 for v in value) else value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return value


# ------------------------------------------------------------------ random settings
def _percentile(rng):
    return rng.choice([-1, -1.0, 0, 1, 1.0, 2.5, 99, 99.8, 100])


def _values(rng):
    """A fixed clip value or mean/std list as a YAML or a config holds it: 'not set' in its several spellings too."""
    return rng.choice([[-1], [-1.0], [-1, -1], [], [5], [5.0], [300], [0.5, 2], [0.5, 2.0], [-1, 5.0], [2.0]])


def _random_normalization(rng):
    """{sub-key: value} for DATA.NORMALIZATION, drawn from small pools so that equal values are common."""
    return {"TYPE": rng.choice(TYPES), "PERC_CLIP.ENABLE": rng.random() < 0.6,
            "PERC_CLIP.LOWER_PERC": _percentile(rng), "PERC_CLIP.UPPER_PERC": _percentile(rng),
            "PERC_CLIP.LOWER_VALUE": _values(rng), "PERC_CLIP.UPPER_VALUE": _values(rng),
            "ZERO_MEAN_UNIT_VAR.MEAN_VAL": _values(rng), "ZERO_MEAN_UNIT_VAR.STD_VAL": _values(rng)}


def _as_cfg(settings):
    cfg = get_defaults()
    for key, value in settings.items():
        node = cfg.DATA.NORMALIZATION
        *parents, last = key.split(".")
        for part in parents:
            node = node[part]
        node[last] = tuple(value) if isinstance(value, list) else value
    return cfg


def _as_checkpoint_tree(settings, rng):
    """A checkpoint's config tree (YAML read back): some keys absent (an older version's), null or whole sections
    gone, now and then no TYPE at all (a config that is not this tool's)."""
    norm = {}
    for key, value in settings.items():
        if rng.random() < 0.15:
            continue
        section, _, leaf = key.rpartition(".")
        node = norm.setdefault(section, {}) if section else norm
        node[leaf] = None if rng.random() < 0.05 else value
    for section in ("PERC_CLIP", "ZERO_MEAN_UNIT_VAR"):
        if rng.random() < 0.1:
            norm.pop(section, None)
    if rng.random() < 0.05:
        norm.pop("TYPE", None)
    return yaml.safe_load(yaml.safe_dump({"DATA": {"NORMALIZATION": norm}}))


def test_the_comparison_through_normalizer_settings_says_what_the_one_before_it_said():
    rng = random.Random(1234)
    reported = 0
    for _ in range(1000):
        trained, here = _random_normalization(rng), _random_normalization(rng)
        if rng.random() < 0.3:  # the same but for a few keys: most pairs differ in TYPE or ENABLE otherwise
            here = dict(trained, **{k: here[k] for k in rng.sample(sorted(here), 2)})
        saved, cfg = _as_checkpoint_tree(trained, rng), _as_cfg(here)
        expected = _reference_differences(saved, cfg)
        assert normalization_differences(saved, cfg) == expected, (saved, here)
        reported += bool(expected)
    assert 300 < reported < 900  # both outcomes were drawn often


# ------------------------------------------------------------------ what settings holds
def test_settings_name_only_what_the_normalizer_reads_in_config_order():
    clip = Normalizer("custom", clip=True, lower_perc=1, upper_perc=-1, lower_value=[7], upper_value=[300, 400],
                      mean=(-1, -1), std=[2])
    assert clip.settings() == {"TYPE": "custom", "PERC_CLIP.ENABLE": True, "PERC_CLIP.LOWER_PERC": 1.0,
                               "PERC_CLIP.UPPER_PERC": -1.0, "PERC_CLIP.UPPER_VALUE": [300.0, 400.0],
                               "ZERO_MEAN_UNIT_VAR.MEAN_VAL": [-1.0], "ZERO_MEAN_UNIT_VAR.STD_VAL": [2.0]}
    assert list(clip.settings()) == ["TYPE", "PERC_CLIP.ENABLE", "PERC_CLIP.LOWER_PERC", "PERC_CLIP.UPPER_PERC",
                                     "PERC_CLIP.UPPER_VALUE", "ZERO_MEAN_UNIT_VAR.MEAN_VAL",
                                     "ZERO_MEAN_UNIT_VAR.STD_VAL"]
    plain = Normalizer("div", clip=False, lower_perc=5, mean=[0.3])
    assert plain.settings() == {"TYPE": "div", "PERC_CLIP.ENABLE": False}
    assert all(type(v) is float for v in clip.settings()["PERC_CLIP.UPPER_VALUE"])  # not numpy's: printed plainly


def test_settings_that_are_equal_normalize_alike_and_a_changed_setting_shows():
    """The property the checkpoint comparison rests on: keys left out of `settings` do not change the output."""
    rng = random.Random(7)
    img = np.random.default_rng(0).gamma(2.0, 40.0, size=(24, 24, 2)).astype(np.float32)
    same = changed = 0
    for _ in range(300):
        a, b = _random_normalization(rng), _random_normalization(rng)
        b = dict(a, **{k: b[k] for k in rng.sample(sorted(b), 2)})
        first, second = Normalizer.from_cfg(_as_cfg(a)), Normalizer.from_cfg(_as_cfg(b))
        try:
            outputs = [_normalized(n, img) for n in (first, second)]
        except DataError:  # a percentile against a fixed bound that crosses it, say: refused alike or not compared
            continue
        if first.settings() == second.settings():
            np.testing.assert_array_equal(outputs[0], outputs[1])
            same += 1
        elif not np.array_equal(outputs[0], outputs[1]):
            changed += 1
    assert same > 50 and changed > 50


def _normalized(normalizer, img):
    normalizer.fit([img])
    return normalizer.normalize(img, normalizer.stats(img))


# ------------------------------------------------------------------ checkpoints this version cannot read
def test_a_checkpoint_normalization_this_version_refuses_is_named_not_raised_as_the_configs_fault():
    """A checkpoint's TYPE (or percentile) that Normalizer refuses: a fine-tune is told, a resume refused, both
    naming the checkpoint, rather than a ConfigError that blames this run's DATA.NORMALIZATION.TYPE."""
    saved = {"DATA": {"NORMALIZATION": {"TYPE": "percentile", "PERC_CLIP": {"ENABLE": True, "LOWER_PERC": 120}}}}
    told = function_key_differences(saved, {}, get_defaults())
    assert told == ["DATA.NORMALIZATION in the checkpoint, not readable here (DATA.NORMALIZATION.TYPE: 'percentile' "
                    "is not one of zero_mean_unit_variance, div, scale_range, custom)"]
    saved["DATA"]["NORMALIZATION"]["TYPE"] = "div"
    assert normalization_differences(saved, get_defaults()) == [
        "DATA.NORMALIZATION in the checkpoint, not readable here (DATA.NORMALIZATION.PERC_CLIP.LOWER_PERC: 120.0 is "
        "not a percentile in [0, 100])"]
    with pytest.raises(ConfigError, match=r"^run r_1 was trained with other settings than these \(DATA.NORMALIZATION "
                                          r"in the checkpoint, not readable here \(.*LOWER_PERC: 120.0"):
        check_own_run({"config": yaml.safe_dump(saved)}, get_defaults(), "r_1-checkpoint-last.pth", "r_1")
