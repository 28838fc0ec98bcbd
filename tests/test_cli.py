"""The command line: flags, exit codes and one-line errors that name the culprit."""
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from biapy.cli import main
from biapy.config.load import plain_tree
from biapy.runner import claim_run_id, next_run_id, release_claim
from tests.conftest import tiny_config

ROOT = Path(__file__).parents[1]


def test_help_lists_the_biapy_flags():
    out = subprocess.run([sys.executable, str(ROOT / "main.py"), "--help"], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout
    for flag in ("--config", "--result_dir", "--name", "--run_id", "--gpu", "--dist_backend"):
        assert flag in out


def write_yaml(tmp_path, cfg, name="c.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(plain_tree(cfg)))
    return path


def run_main(tmp_path, cfg, *extra, name="job"):
    path = cfg if isinstance(cfg, Path) else write_yaml(tmp_path, cfg)
    return main(["--config", str(path), "--result_dir", str(tmp_path / "out"), "--name", name, "--run_id", "1",
                 *extra])


@pytest.mark.parametrize("change, culprit", [
    (lambda c: c["TRAIN"].update(EPOCH=2), "TRAIN.EPOCH"),
    (lambda c: c["TRAIN"].update(EPOCHS="two"), "TRAIN.EPOCHS"),
    (lambda c: c["PROBLEM"].update(SELF_SUPERVISED={"RESIZING_FACTOR": 5}), "RESIZING_FACTOR"),
    (lambda c: c["DATA"].update(PATCH_SIZE=[8, 32, 32, 1]), "DATA.PATCH_SIZE"),
    (lambda c: c["DATA"]["TRAIN"].update(PATH="/no/such/folder"), "DATA.TRAIN.PATH"),
])
def test_configuration_errors_exit_2_with_one_line_naming_the_key(change, culprit, data2d, tmp_path, capsys):
    cfg = tiny_config(data2d, 2)
    change(cfg)
    assert run_main(tmp_path, cfg) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ERROR:") and culprit in err[0]
    assert not (tmp_path / "out" / "job").exists()  # stopped before any work


def test_missing_config_file_and_bad_override_exit_2(tmp_path, capsys):
    assert main(["--config", str(tmp_path / "none.yaml"), "--result_dir", str(tmp_path), "--name", "x"]) == 2
    assert "none.yaml" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["../evil", "a/b", "..", ""])
def test_names_with_path_separators_are_refused(name, data2d, tmp_path, capsys):
    assert run_main(tmp_path, tiny_config(data2d, 2), name=name) == 2
    assert "--name" in capsys.readouterr().err
    assert not any((tmp_path / "out").rglob("*.pth")) if (tmp_path / "out").exists() else True


def test_next_run_id_counts_existing_runs(tmp_path):
    assert next_run_id(tmp_path, "n") == 1
    for i in (1, 4):
        (tmp_path / "n" / "results" / f"n_{i}").mkdir(parents=True)
    (tmp_path / "n" / "results" / "n_x").mkdir()
    assert next_run_id(tmp_path, "n") == 5


def test_an_error_line_is_capped_keeping_its_culprit_and_what_was_expected(tmp_path, data2d, capsys):
    cfg = tiny_config(data2d, 2)
    cfg["DATA"]["TRAIN"]["PATH"] = "/no" + ("/" + "a" * 200) * 15  # a path is printed whole: 3 KB
    assert run_main(tmp_path, cfg) == 2
    line = capsys.readouterr().err.strip()
    assert "\n" not in line and len(line) < 2100
    assert line.startswith("ERROR: DATA.TRAIN.PATH") and line.endswith("a does not exist")
    assert "characters) …" in line


def test_the_cpu_allocator_running_out_is_one_line_that_says_what_to_lower(tmp_path, data2d, capsys, monkeypatch):
    """torch's CPU allocator raises a RuntimeError, not a MemoryError: a TEST.FULL_IMG pass over a 20000x20000
    image had ended with a traceback."""
    from biapy.runner import BiaPy

    def no_memory(self):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:121] data. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 12800000000 bytes. Error code 12 (Cannot allocate memory)")
    monkeypatch.setattr(BiaPy, "run_job", no_memory)
    assert run_main(tmp_path, tiny_config(data2d, 2)) == 1
    line = capsys.readouterr().err.strip()
    assert line.startswith("ERROR: out of memory ([enforce fail") and "12800000000 bytes" in line
    assert "TEST.FULL_IMG False" in line and "\n" not in line


def test_run_ids_are_claimed_at_once_and_released_while_empty(tmp_path):
    """Two jobs started together without --run_id had both taken run 1 (the folder came after their data was
    ready) and written into one run."""
    first, made = claim_run_id(tmp_path, "n")
    second, _ = claim_run_id(tmp_path, "n")
    assert (first, second) == (1, 2) and (tmp_path / "n" / "results" / "n_1").is_dir()
    assert made == [tmp_path / "n" / "results" / "n_1", tmp_path / "n" / "results", tmp_path / "n"]
    release_claim(made)  # run 2's folder keeps the parents
    assert not (tmp_path / "n" / "results" / "n_1").exists() and (tmp_path / "n" / "results" / "n_2").is_dir()
    third, made = claim_run_id(tmp_path, "n")
    (made[0] / "started").write_text("")
    release_claim(made)  # never removes what a run wrote
    assert third == 3 and (made[0] / "started").is_file()


def test_a_job_without_run_id_that_fails_before_it_starts_leaves_no_folder(tmp_path, data2d, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.tif").write_text("not an image")  # found while the data is prepared, after the claim
    cfg = tiny_config(data2d, 2)
    cfg["DATA"]["TRAIN"]["PATH"] = str(bad)
    path = write_yaml(tmp_path, cfg)
    assert main(["--config", str(path), "--result_dir", str(tmp_path / "out"), "--name", "job"]) == 3
    assert "broken.tif" in capsys.readouterr().err
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("argv, culprit", [
    (["--config", "c.yaml", "--result_dir", "r", "--name", "n", "--run_id", "../x"], "--run_id"),
    (["--config", "c.yaml", "--result_dir", "r"], "--name"),
    (["--config", "c.yaml", "--result_dir", "r", "--name", "n", "--dist_backend", "mpi"], "--dist_backend"),
])
def test_usage_mistakes_exit_2_with_one_line_naming_the_flag(argv, culprit, capsys):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ERROR:") and culprit in err[0] and "--help" in err[0]


def test_flags_after_the_overrides_are_still_flags():
    from biapy.cli import build_parser, flags_first

    parser = build_parser()
    argv = ["--config", "a.yaml", "TRAIN.EPOCHS", "3", "--verbose", "--gpu", "0", "--name=x", "--result_dir", "r",
            "DATA.PATCH_SIZE", "(64,64,1)"]
    assert flags_first(argv, parser) == ["--config", "a.yaml", "--verbose", "--gpu", "0", "--name=x",
                                         "--result_dir", "r", "TRAIN.EPOCHS", "3", "DATA.PATCH_SIZE", "(64,64,1)"]
    args = parser.parse_args(flags_first(argv, parser))
    assert args.verbose and args.gpu == "0" and args.name == "x"
    assert args.overrides == ["TRAIN.EPOCHS", "3", "DATA.PATCH_SIZE", "(64,64,1)"]


@pytest.mark.parametrize("world, says", [("2", "ERROR: [rank 0] stopped by SIGTERM: another process of this job failed"),
                                         ("1", "Interrupted: the checkpoints saved so far are kept")])
def test_sigterm_outside_training_under_torchrun_does_not_advise_a_rerun(world, says, monkeypatch, capsys):
    import biapy.cli as cli
    import biapy.runner

    def terminated(self):
        cli._terminate(15, None)

    monkeypatch.setattr(biapy.runner.BiaPy, "run_job", terminated)
    monkeypatch.setenv("WORLD_SIZE", world)
    monkeypatch.setenv("RANK", "0")
    assert main(["--config", "x.yaml", "--result_dir", "r", "--name", "n"]) == 130
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("is_main, verbose, level", [(True, False, logging.INFO), (True, True, logging.DEBUG),
                                                     (False, False, logging.ERROR), (False, True, logging.ERROR)])
def test_only_rank_0_logs_with_or_without_verbose(is_main, verbose, level):
    """--verbose under torchrun had printed every info line once per process."""
    from biapy.runner import setup_logging

    try:
        setup_logging(is_main=is_main, verbose=verbose)
        assert logging.getLogger("biapy").getEffectiveLevel() == level
    finally:
        setup_logging(is_main=True)


def test_a_tilde_in_result_dir_and_config_paths_is_the_home_folder(data2d, tmp_path, monkeypatch, capsys):
    """`--result_dir=~/r` (the shell leaves a ~ after '=') had made a folder named '~' in the current one, and
    `PATHS.CHECKPOINT_FILE ~/c.pth` was 'not found'."""
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    cwd.mkdir()
    (home / "data").mkdir(parents=True)
    (home / "data" / "train").symlink_to(data2d["train"][0])
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    cfg = tiny_config(data2d, 2, TRAIN={"EPOCHS": 1}, TEST={"ENABLE": False})
    cfg["DATA"]["TRAIN"]["PATH"] = "~/data/train"
    path = write_yaml(tmp_path, cfg)
    assert main(["--config", str(path), "--result_dir=~/out", "--name", "job", "--run_id", "1"]) == 0
    assert (home / "out" / "job" / "results" / "job_1").is_dir() and list(cwd.iterdir()) == []
    assert (home / "data" / "train_ssl_source").is_dir()  # crappify's copies beside the images, in the home folder
    capsys.readouterr()
    assert main(["--config", str(path), "--result_dir=~/out", "--name", "job", "--run_id", "2",
                 "MODEL.LOAD_CHECKPOINT", "True",
                 "PATHS.CHECKPOINT_FILE", "~/out/job/checkpoints/job_1-checkpoint-best.pth"]) == 0
    assert (home / "out" / "job" / "results" / "job_2").is_dir() and list(cwd.iterdir()) == []


def test_the_lineage_log_takes_non_ascii_folder_names_whatever_the_locale(tmp_path):
    """Under LC_ALL=C a results folder such as 'données' had stopped a fine-tuning run at its end (UnicodeEncodeError
    writing derived_models.log)."""
    import os

    ckpt = tmp_path / "pre" / "checkpoints" / "pre_1-checkpoint-best.pth"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"")
    (tmp_path / "pre" / "results").mkdir()
    code = ("import sys\nfrom biapy.job import Job\nfrom biapy.runner import record_derived_model\n"
            "record_derived_model(sys.argv[1], Job(sys.argv[2], 'ft', 1))\n")
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0"}
    subprocess.run([sys.executable, "-c", code, str(ckpt), str(tmp_path / "données")], env=env, cwd=ROOT, check=True)
    assert "données/ft/results/ft_1\tfrom pre_1-checkpoint-best.pth" in \
        (tmp_path / "pre" / "derived_models.log").read_text(encoding="utf-8")
