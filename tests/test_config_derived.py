"""Derived values (biapy.config.derived): automatic cores and workers, default loss and metrics, paths."""
from pathlib import Path

import pytest
import yaml

from biapy.config import finalize, load_config
from biapy.errors import ConfigError
from biapy.job import Job
from tests.conftest import checked


def test_copy_folder_of_dot_is_beside_the_current_folder_not_inside_it(tmp_path, config_folders, monkeypatch):
    """DATA.TRAIN.PATH '.' (run from inside the image folder): Path('.').name is '', and the copies had gone into
    the image folder as '_ssl_source'."""
    train, test = config_folders
    monkeypatch.chdir(train)
    cfg = checked({"DATA": {"TRAIN": {"PATH": "."}, "TEST": {"PATH": "../test"}}}, config_folders)
    finalize(cfg, Job(tmp_path / "out", "demo", 1))
    assert cfg.DATA.TRAIN.SSL_SOURCE_DIR == str(tmp_path / "train_ssl_source")
    assert cfg.DATA.TEST.SSL_SOURCE_DIR == str(Path("..") / "test_ssl_source")  # relative paths stay relative


def test_finalize_fills_derived_values_and_the_resolved_config_round_trips(tmp_path, config_folders):
    train, test = config_folders
    cfg = checked({"DATA": {"TRAIN": {"PATH": str(train)}, "TEST": {"PATH": str(test)}}}, config_folders)
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


def test_a_derived_key_given_in_the_yaml_is_named_in_one_warning_and_replaced(tmp_path, config_folders, caplog):
    train, test = config_folders
    given = {"DATA": {"TRAIN": {"PATH": str(train)}, "TEST": {"PATH": str(test)}},
             "PATHS": {"RESULT_DIR": "/elsewhere", "CHARTS": "/charts", "CHECKPOINT_FILE": ""}}
    with caplog.at_level("WARNING", logger="biapy"):
        cfg = checked(given, config_folders)
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and "PATHS.RESULT_DIR, PATHS.CHARTS set from --result_dir" in warned[0]
    assert "CHECKPOINT_FILE" not in warned[0]
    finalize(cfg, Job(tmp_path / "out", "demo", 1))
    assert cfg.PATHS.RESULT_DIR == str(tmp_path / "out" / "demo" / "results" / "demo_1")
    caplog.clear()
    with caplog.at_level("WARNING", logger="biapy"):
        checked({"DATA": given["DATA"]}, config_folders)
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_workers_are_capped_to_the_usable_cores(tmp_path, config_folders, monkeypatch):
    import os
    train, test = config_folders
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    cfg = checked({"SYSTEM": {"NUM_WORKERS": 5}, "DATA": {"TRAIN": {"PATH": str(train)}, "TEST": {"PATH": str(test)}}},
                  config_folders)
    finalize(cfg, Job(tmp_path, "w", 1))
    assert cfg.SYSTEM.NUM_WORKERS == 2  # BiaPy's templates ask for 5; more than the cores only adds processes


def test_a_process_count_that_is_not_a_number_is_a_one_line_error(monkeypatch):
    from biapy.config.derived import cores_per_process
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "two")
    with pytest.raises(ConfigError, match=r"^environment variable LOCAL_WORLD_SIZE='two' is not a process count"):
        cores_per_process(16)


def test_cores_are_the_ones_this_process_may_run_on(tmp_path, config_folders, monkeypatch):
    """A Slurm job given 4 cores of a 64-core node: 4 torch threads and 3 workers, not 64 threads."""
    import os
    train, test = config_folders
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {8, 9, 10, 11}, raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cfg = checked({"DATA": {"TRAIN": {"PATH": str(train)}, "TEST": {"PATH": str(test)}}}, config_folders)
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
        tmp_path, config_folders, monkeypatch, world_size, local_world_size, cores, workers):
    """16 cores: one process gets min(16 - 1, 4) workers; 4 (or 8) processes on this machine 4 (or 2) cores each,
    so 3 workers (or none) apiece, and as many torch threads. torchrun's WORLD_SIZE counts every machine's."""
    import os

    from biapy.config.derived import cores_per_process
    train, test = config_folders
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    for name, value in (("WORLD_SIZE", world_size), ("LOCAL_WORLD_SIZE", local_world_size)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    cfg = checked({"DATA": {"TRAIN": {"PATH": str(train)}, "TEST": {"PATH": str(test)}}}, config_folders)
    finalize(cfg, Job(tmp_path, "w", 1))
    assert cfg.SYSTEM.NUM_CPUS == 16
    assert (cores_per_process(cfg.SYSTEM.NUM_CPUS), cfg.SYSTEM.NUM_WORKERS) == (cores, workers)
