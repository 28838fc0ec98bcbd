"""Read a YAML file and `KEY VALUE` overrides into the default config, with clear errors.

BiaPy compatibility: keys of BiaPy 3.7.1 that this tool does not use are accepted with a
warning (so a BiaPy YAML runs unchanged); a few BiaPy keys that moved are read at their new
place (ALIASES); BiaPy's one-element list forms (`OPTIMIZER: [ADAMW]`) are unwrapped.
Anything else unknown is an error that suggests the closest valid key.
"""
import ast
import difflib
import logging
import math
import os
from pathlib import Path

import yaml
from yacs.config import CfgNode as CN

from biapy.config.defaults import get_defaults
from biapy.errors import ConfigError, shown

log = logging.getLogger(__name__)

# BiaPy key (any version) -> the key this tool reads for the same meaning.
ALIASES = {
    "DATA.EXTRACT_RANDOM_PATCH": "DATA.TRAIN.EXTRACT_RANDOM_PATCH",
    "DATA.N_CLASSES": "MODEL.N_CLASSES",
    "TRAIN.LR_SCHEDULER.WARMUP_EPOCHS": "TRAIN.LR_SCHEDULER.WARMUP_COSINE_DECAY_EPOCHS",
}

_BIAPY_KEYS_FILE = Path(__file__).with_name("biapy_3_7_1_keys.txt")


def _biapy_keys():
    return set(_BIAPY_KEYS_FILE.read_text(encoding="utf-8").split())



def _flatten(tree, prefix=""):
    """Nested dict -> {'A.B.C': value}."""
    flat = {}
    for key, value in tree.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict):
            if not value:
                continue
            flat.update(_flatten(value, full + "."))
        else:
            flat[full] = value
    return flat


def _leaf_keys(node, prefix=""):
    keys = []
    for key, value in node.items():
        if isinstance(value, CN):
            keys.extend(_leaf_keys(value, f"{prefix}{key}."))
        else:
            keys.append(f"{prefix}{key}")
    return keys


# Text keys with an on/off meaning, for the YAML words (off, no, false / on, yes, true) read as booleans.
BOOLEAN_WORDS = {"TRAIN.AMP": {False: "off", True: "auto"}}
_YAML_BOOLEANS = {"yes": True, "on": True, "true": True, "no": False, "off": False, "false": False}


def _decode(value):
    """Strings such as '(64, 64, 1)' or '1e-4' become Python values, as YACS does."""
    if not isinstance(value, str):
        return value
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _finite(value):
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def _type_name(value):
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            tuple: "a list", list: "a list"}.get(type(value), type(value).__name__)


def coerce(key, value, default):
    """Return `value` in the type of `default`, or raise ConfigError naming the key."""
    value = _decode(value)
    # BiaPy 3.7 wraps single values in lists (OPTIMIZER: [ADAMW], OPT_BETAS: [[0.9, 0.999]]).
    if isinstance(value, (list, tuple)) and len(value) == 1 and not isinstance(default, (list, tuple)):
        value = value[0]
    if (isinstance(default, (list, tuple)) and isinstance(value, (list, tuple)) and len(value) == 1
            and isinstance(value[0], (list, tuple))
            and default and not isinstance(default[0], (list, tuple))):
        value = value[0]
    expected = _type_name(default)
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):  # `TEST.ENABLE false` on the command line
            return value.lower() == "true"
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if _is_number(value):
            if not _finite(value):
                raise ConfigError(f"{key}: expected a finite number, got {shown(value)}")
            return float(value)
    elif isinstance(default, str):
        if key in BOOLEAN_WORDS:  # YAML reads `AMP: off` as false; `TRAIN.AMP no` on the command line alike
            flag = _YAML_BOOLEANS.get(value.lower()) if isinstance(value, str) else value
            if isinstance(flag, bool):
                return BOOLEAN_WORDS[key][flag]
        if isinstance(value, str):
            return value
    elif isinstance(default, (list, tuple)):
        if isinstance(value, (list, tuple)):
            # A list of numbers by default (sizes, ranges, per-channel values) takes finite numbers only.
            if default and all(_is_number(d) for d in default) and not all(
                    _is_number(v) and _finite(v) for v in value):
                raise ConfigError(f"{key}: expected a list of finite numbers, got {shown(value)}")
            if default and all(isinstance(d, float) for d in default):
                value = [float(v) for v in value]  # (0, 1) for (0.9, 0.999): torch wants floats
            return type(default)(value)
        if not isinstance(value, (bool, str)) and isinstance(value, (int, float)) and default == []:
            return [value]
    raise ConfigError(f"{key}: expected {expected}, got {shown(value)} ({_type_name(value)})")


def _suggest(key, valid):
    key = key.upper()  # keys are upper case; 'train.epochs' is TRAIN.EPOCHS
    section, _, leaf = key.rpartition(".")
    # The right name under the wrong section (TRAIN.PATCH_SIZE for DATA.PATCH_SIZE) says more than a
    # one-letter neighbour in the same section (TRAIN.BATCH_SIZE).
    elsewhere = [v for v in valid if v.rpartition(".")[2] == leaf]
    close = [key] if key in valid else difflib.get_close_matches(key, elsewhere, n=1, cutoff=0)
    close = close or difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if not close:
        # A misspelt last part under a right section: compare the last parts only.
        same_section = [v for v in valid if v.rpartition(".")[0] == section]
        leaves = difflib.get_close_matches(leaf, [v.rpartition(".")[2] for v in same_section], n=1, cutoff=0.5)
        close = [f"{section}.{leaves[0]}"] if leaves else []
    return f"; did you mean {close[0]}?" if close else ""


# What does the job of an unused BiaPy option here, told beside the warning.
BIAPY_HINTS = {
    "TEST.BY_CHUNKS.": " (3D test volumes are read, predicted, written and scored by slabs whenever "
                       "DATA.TEST.IN_MEMORY is False, the default)",
    "MODEL.": " (the network built here may differ from the one BiaPy builds with it)",
    "AUGMENTOR.": " (that augmentation is not applied)",
    "DATA.TEST.USE_VAL_AS_TEST": " (the test phase predicts DATA.TEST.PATH; the log names the validation images "
                                 "to place there)",
}

# Filled in at start from the command line (the results tree, --gpu); a value given for them is replaced.
DERIVED = ("SYSTEM.DEVICE", "PATHS.CHECKPOINT", "PATHS.RESULT_DIR", "PATHS.PER_IMAGE", "PATHS.CHARTS",
           "PATHS.DA_SAMPLES", "PATHS.MAE_OUT_DIR", "PATHS.TRAIN_LOGS", "PATHS.TEST_METRICS_FILE",
           "LOG.TENSORBOARD_LOG_DIR")


# BiaPy 3.7.1's LOSS.TYPE is a list of terms summed with LOSS.WEIGHTS; here two-term mixes have one name each,
# whose LOSS.WEIGHTS follow these terms.
LOSS_MIXES = {frozenset({"MAE", "SSIM"}): ("W_MAE_SSIM", ("MAE", "SSIM")),
              frozenset({"MSE", "SSIM"}): ("W_MSE_SSIM", ("MSE", "SSIM")),
              frozenset({"CE", "DICE"}): ("CE_DICE", ("CE", "DICE"))}


def _loss_list_form(values, source):
    """`values` with BiaPy 3.7.1's list form of LOSS.TYPE read as one name: [] the default, [X] X, a two-term mix
    its combined loss, LOSS.WEIGHTS put in that loss's order of terms (each 1 when not given, as in BiaPy)."""
    names = _decode(values.get("LOSS.TYPE"))
    if not isinstance(names, (list, tuple)):
        return values
    names = [str(n).upper() for n in names]
    if len(names) == 1 and names[0] in {mix for mix, _ in LOSS_MIXES.values()}:
        return values  # [W_MAE_SSIM]: a one-element list of a name that has two weights (unwrapped by coerce)
    weights = _decode(values.get("LOSS.WEIGHTS", []))
    weights = list(weights) if isinstance(weights, (list, tuple)) else [weights]  # a bare number: one weight
    weights = weights or [1.0] * len(names)
    if len(weights) != len(names):
        raise ConfigError(f"{source}: LOSS.WEIGHTS: {shown(weights)} must hold one weight per LOSS.TYPE term "
                          f"{shown(names)}")
    values = dict(values)
    if len(names) < 2:
        if weights not in ([], [1], [1.0]):
            raise ConfigError(f"{source}: LOSS.WEIGHTS: {shown(weights)} would scale the one LOSS.TYPE term "
                              f"{shown(names)}; expected [] or [1.0] (weights apply to two-term losses here)")
        values["LOSS.TYPE"], values["LOSS.WEIGHTS"] = (names[0] if names else ""), []
        return values
    mix = LOSS_MIXES.get(frozenset(names)) if len(set(names)) == len(names) == 2 else None
    if mix is None:
        raise ConfigError(f"{source}: LOSS.TYPE: {shown(names)} is not a mix this tool has; expected one name, or "
                          "[MAE, SSIM], [MSE, SSIM] or [DICE, CE] (W_MAE_SSIM, W_MSE_SSIM, CE_DICE)")
    weight_of = dict(zip(names, weights))
    values["LOSS.TYPE"], values["LOSS.WEIGHTS"] = mix[0], [weight_of[term] for term in mix[1]]
    return values


def merge_values(cfg, values: dict, source: str):
    """Merge a flat {'A.B': value} mapping into cfg, checking each key and type."""
    valid = _leaf_keys(cfg)
    valid_set = set(valid)
    biapy_keys = None
    values = _loss_list_form(values, source)
    derived = [k for k in values if ALIASES.get(k, k) in DERIVED and values[k] not in ("", None)]
    if derived:
        log.warning("%s: %s set from --result_dir, --name, --run_id and --gpu; the value%s given %s replaced",
                    source, ", ".join(derived), "s" if len(derived) > 1 else "", "are" if len(derived) > 1 else "is")
    set_by = {}  # target key -> (key given, value): a BiaPy key and its new name must not disagree
    for key, value in values.items():
        target = ALIASES.get(key, key)
        if target not in valid_set:
            biapy_keys = biapy_keys if biapy_keys is not None else _biapy_keys()
            if key in biapy_keys:
                hint = next((h for prefix, h in BIAPY_HINTS.items() if key.startswith(prefix)), "")
                log.warning("%s: %s is a BiaPy option this tool does not use; ignored%s", source, key, hint)
                continue
            inside = [v for v in valid if v.startswith(f"{target}.")]
            if inside:
                raise ConfigError(f"{source}: {key} is a section of keys, not a value; write its keys under it "
                                  f"(e.g. {inside[0]})")
            raise ConfigError(f"{source}: unknown key {key}{_suggest(key, valid)}")
        node = cfg
        *parents, leaf = target.split(".")
        for part in parents:
            node = node[part]
        value = coerce(target, value, node[leaf])
        if target in set_by and set_by[target][1] != value:
            first, first_value = set_by[target]
            raise ConfigError(f"{source}: {first} is {shown(first_value)} but {key} is {shown(value)}; both set "
                              f"{target} (BiaPy's name and this tool's); keep one of them")
        set_by[target] = (key, value)
        node[leaf] = value


class _NoAliasDumper(yaml.SafeDumper):
    def ignore_aliases(self, data):
        return True


def plain_tree(tree):
    """Nested dicts (CfgNodes too) with tuples as lists, numpy values as Python's and paths as strings: what the
    safe YAML writer and the config checks take (a sweep's np.float64 LR had passed the checks, then stopped the
    run when its YAML copy was written)."""
    if isinstance(tree, dict):
        return {k: plain_tree(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [plain_tree(v) for v in tree]
    if type(tree).__module__ == "numpy":  # np.float64(0.001), np.int64(5), np.bool_, an array
        return plain_tree(tree.tolist()) if hasattr(tree, "tolist") else tree
    if isinstance(tree, os.PathLike):
        return os.fspath(tree)
    return tree


def dump_config(cfg) -> str:
    """The config as YAML with every value written out: yacs' own dump shares equal tuples through &id anchors,
    so that editing one value in the file would change several keys."""
    return yaml.dump(plain_tree(cfg), Dumper=_NoAliasDumper)


class _UniqueKeyLoader(yaml.SafeLoader):
    """The safe loader, refusing a key written twice in one mapping (YAML would keep the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: keys written below it may override
                continue
            if not isinstance(key_node, yaml.ScalarNode):  # `? [1, 2]`: unhashable, and no key's name
                raise yaml.constructor.ConstructorError(
                    None, None, f"a key must be a plain name such as EPOCHS, not a "
                    f"{'list' if isinstance(key_node, yaml.SequenceNode) else 'mapping'}", key_node.start_mark)
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"{key} appears twice in the same section",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path) -> dict:
    """The YAML file as a flat {'A.B': value} mapping (safe loader: no code is run)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"--config: {path} is a folder; expected a YAML file")
    if not path.is_file():
        raise ConfigError(f"--config: file {path} does not exist")
    try:
        # UTF-8 whatever the locale, as the config.yaml this tool writes (utf-8-sig: a BOM is skipped).
        tree = yaml.load(path.read_text(encoding="utf-8-sig"), Loader=_UniqueKeyLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError(f"--config: {path} is not valid YAML{where}: {getattr(err, 'problem', err)}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"--config: cannot read {path}: {err}") from None
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(f"--config: {path} must hold sections such as TRAIN: and DATA:, not a {type(tree).__name__}")
    _check_size(tree, f"--config: {path}")
    return _flatten(tree)


MAX_VALUES, MAX_DEPTH = 10_000, 12  # far above any config (BiaPy's has some 600 keys, 4 levels deep)


def _check_size(tree, where):
    """Refuse a tree that YAML aliases (`*name`) make huge or endless: a few lines of nested aliases stand for
    billions of values, which reading, checking or an error message would spell out."""
    count, todo = 0, [(tree, 1)]
    while todo:
        node, depth = todo.pop()
        count += 1
        if count > MAX_VALUES or depth > MAX_DEPTH:
            raise ConfigError(f"{where} holds more than {MAX_VALUES} values or nests them more than {MAX_DEPTH} "
                              "deep (aliases such as *name repeating each other?); expected a configuration's "
                              "sections, keys and values")
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        todo.extend((child, depth + 1) for child in children)


def parse_overrides(pairs) -> dict:
    """['TRAIN.EPOCHS', '3', ...] -> {'TRAIN.EPOCHS': '3'}; a key given twice takes its last value, as in BiaPy
    (yacs' merge_from_list), so a script may append overrides to a base command."""
    if len(pairs) % 2:
        raise ConfigError(f"command-line overrides must come as KEY VALUE pairs; {shown(pairs[-1])} has no value")
    values = dict(zip(pairs[::2], pairs[1::2]))
    return {key: _command_line_list(key, value) for key, value in values.items()}


def _command_line_list(key, value):
    """A command-line list of bare words, '[MAE, SSIM]', read as YAML reads it in a file; anything else as given."""
    if not (value.startswith("[") and value.endswith("]")) or _decode(value) is not value:
        return value
    try:
        words = yaml.safe_load(value)
    except yaml.YAMLError:
        return value
    if not isinstance(words, list):
        return value
    _check_size(words, f"command line: {key}")  # YAML aliases there too
    return words


def load_config(config=None, overrides=()):
    """Defaults <- YAML file (path) or mapping <- KEY VALUE overrides. Not yet checked."""
    cfg = get_defaults()
    if isinstance(config, dict):
        merge_values(cfg, _flatten(plain_tree(config)), "config")
    elif config is not None:
        merge_values(cfg, read_yaml(config), str(config))
    merge_values(cfg, parse_overrides(list(overrides)), "command line")
    return cfg
