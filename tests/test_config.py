"""Config defaults (the manual) and loading: BiaPy-compatible YAML files and command-line overrides."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from biapy.config import check_config, load_config
from biapy.config.load import coerce
from biapy.errors import ConfigError

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


def test_biapy_self_supervised_yaml_loads_unchanged(tmp_path, config_folders):
    train, test = config_folders
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


def test_coerce_keeps_types_and_refuses_others():
    assert coerce("K", "3", 1) == 3
    assert coerce("K", 3, 1.0) == 3.0 and isinstance(coerce("K", 3, 1.0), float)
    assert coerce("K", [1, 2], (0, 0)) == (1, 2)
    with pytest.raises(ConfigError):
        coerce("K", True, 1)
    with pytest.raises(ConfigError):
        coerce("K", 1.5, 1)


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
