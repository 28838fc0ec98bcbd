"""One run of a job at a time: a second process running NAME_ID while the first still runs it is refused before it
touches the results tree (it had resumed from the first's last checkpoint mid-run, and both had written the same
files). The lock is biapy.utils.locks's, held by rank 0 until the run ends, let go by the OS if the process dies."""
import errno
import logging
import multiprocessing
import os
import re
import signal
import socket
import subprocess
import sys
import time
import types
from contextlib import contextmanager
from pathlib import Path

import pytest

from biapy.cli import main
from biapy.job import Job
from biapy.runner import BiaPy, lock_run
from biapy.utils import locks
from biapy.utils.locks import LockBusy, try_lock_path
from tests.conftest import tiny_config
from tests.test_cli import write_yaml
from tests.test_distributed import _free_port

ROOT = Path(__file__).parents[1]
pytestmark = pytest.mark.skipif(os.name != "posix", reason="the holders here are POSIX processes and signals")


@contextmanager
def held_elsewhere(lock_file):
    """Another process holding `lock_file` through biapy.utils.locks, as a run does, until the block ends."""
    Path(lock_file).parent.mkdir(parents=True, exist_ok=True)
    code = "import sys; from biapy.utils.locks import try_lock_path; try_lock_path(sys.argv[1]); print('held', " \
           "flush=True); sys.stdin.read()"
    holder = subprocess.Popen([sys.executable, "-c", code, str(lock_file)], cwd=ROOT, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        yield holder
    finally:
        holder.kill()
        holder.wait()


def _tree(folder):
    """Every path under `folder` (itself too) with its size and modification time: what a run writing, or
    making and removing a file, changes."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in [Path(folder), *sorted(Path(folder).rglob("*"))]}


def _config(tmp_path, data2d, **sections):
    sections.setdefault("TRAIN", {"EPOCHS": 1})
    sections.setdefault("TEST", {"ENABLE": False})
    return write_yaml(tmp_path, tiny_config(data2d, 2, SYSTEM={"NUM_CPUS": 1}, **sections))


def _argv(config, out, run_id=None, *overrides):
    return ["--config", str(config), "--result_dir", str(out), "--name", "job",
            *(["--run_id", str(run_id)] if run_id is not None else []), *overrides]


def test_a_second_run_of_a_run_in_progress_is_refused_and_the_tree_is_unchanged(tmp_path, data2d):
    out, config = tmp_path / "out", _config(tmp_path, data2d)
    assert main(_argv(config, out, 1)) == 0  # run 1's tree: checkpoints, results, configs
    with held_elsewhere(Job(out, "job", 1).lock_file) as holder:
        before = _tree(out)
        time.sleep(0.01)  # a file written now would show another modification time
        again = subprocess.run([sys.executable, str(ROOT / "main.py"), *_argv(config, out, 1, "TRAIN.EPOCHS", "2")],
                               cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert again.returncode == 2
        assert re.fullmatch(rf"ERROR: --run_id: run job_1 is in use by another process \(pid {holder.pid} on host "
                            rf"{re.escape(socket.gethostname())}, since \d\d:\d\d:\d\d\); wait for it to end or pass "
                            r"another --run_id\n", again.stderr)
        assert _tree(out) == before
        assert main(_argv(config, out, 2)) == 0  # another run of the job is not held back
    assert Job(out, "job", 2).checkpoint("last").is_file()


@pytest.mark.parametrize("run_id", [1, None], ids=["run_id given", "run_id claimed"])
def test_a_refused_run_makes_no_folder(tmp_path, data2d, capsys, run_id):
    """The ID claimed without --run_id is 1 here, the one held: the claim's folders go too."""
    out, config = tmp_path / "out", _config(tmp_path, data2d)
    lock_file = Job(out, "job", 1).lock_file
    with held_elsewhere(lock_file):
        assert main(_argv(config, out, run_id)) == 2
        assert "run job_1 is in use by another process" in capsys.readouterr().err
        assert [p.name for p in out.iterdir()] == ["job"]
        assert [p.name for p in (out / "job").iterdir()] == [lock_file.name]


def test_a_run_whose_holder_was_killed_goes_on(tmp_path, data2d):
    out, config = tmp_path / "out", _config(tmp_path, data2d)
    job = Job(out, "job", 1)
    with held_elsewhere(job.lock_file) as holder:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        assert main(_argv(config, out, 1)) == 0
    assert job.checkpoint("last").is_file() and job.lock_file.read_bytes() == b""  # let go, emptied


def test_the_notebook_api_lets_go_of_the_lock_whatever_the_outcome(tmp_path, data2d):
    overrides = tiny_config(data2d, 2, TRAIN={"EPOCHS": 1}, TEST={"ENABLE": False}, SYSTEM={"NUM_CPUS": 1})
    job = BiaPy(overrides, result_dir=tmp_path / "out", name="job", run_id=1).run_job()
    assert BiaPy(overrides, result_dir=tmp_path / "out", name="job", run_id=1).run_job() == job  # finds it done
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.tif").write_text("not an image")  # found while the data is prepared, after the lock
    overrides["DATA"]["TRAIN"]["PATH"] = str(bad)
    failing = BiaPy(overrides, result_dir=tmp_path / "out", name="job", run_id=2)
    with pytest.raises(Exception, match="broken.tif"):
        failing.run_job()
    assert not Job(tmp_path / "out", "job", 2).lock_file.exists()  # made by the run that never started: gone
    try_lock_path(job.lock_file).release()  # free (an open file of this process would hold it)
    with pytest.raises(Exception, match="broken.tif"):
        failing.run_job()  # the same object again: its lock too was let go
    try_lock_path(Job(tmp_path / "out", "job", 2).lock_file).release(remove=True)


def test_under_torchrun_every_rank_stops_at_rank_0s_refusal(tmp_path, data2d):
    out, config = tmp_path / "out", _config(tmp_path, data2d)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", str(ROOT / "main.py"), *_argv(config, out, 1), "--dist_backend", "gloo"]
    with held_elsewhere(Job(out, "job", 1).lock_file):
        done = subprocess.run(cmd, cwd=ROOT, env=dict(env, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                              timeout=300)
    assert done.returncode != 0
    for rank in (0, 1):
        assert f"ERROR: [rank {rank}] --run_id: run job_1 is in use by another process" in done.stderr
    assert "another process of this job failed" not in done.stderr  # each rank knew why, none waited for rank 0
    assert [p.name for p in (out / "job").iterdir()] == [".job_1.lock"]


# ------------------------------------------------------------------ the lock itself
def _replacing_the_file_before_the_first_lock(monkeypatch, path, meanwhile):
    """biapy.utils.locks.lock, but its first call first runs `meanwhile`: the file opened is unlinked, another made."""
    real, calls = locks.lock, []

    def lock(fh, wait=True):
        calls.append(fh)
        if len(calls) == 1:
            meanwhile()
        return real(fh, wait)

    monkeypatch.setattr(locks, "lock", lock)
    return calls


def test_a_lock_file_replaced_under_a_waiter_is_locked_again_at_its_path(tmp_path, monkeypatch):
    """The holder that unlinks its file as it lets go: a waiter that had opened it locked the dead file."""
    path = tmp_path / ".job_1.lock"
    first = try_lock_path(path)
    calls = _replacing_the_file_before_the_first_lock(monkeypatch, path, lambda: first.release(remove=True))
    waiter = try_lock_path(path)
    assert len(calls) == 2  # tried again: the first lock was the dead file's
    assert os.fstat(waiter.fd).st_ino == os.stat(path).st_ino and waiter.made


def test_a_waiter_on_a_replaced_lock_file_does_not_run_beside_its_new_holder(tmp_path, monkeypatch):
    path = tmp_path / ".job_1.lock"
    first, others = try_lock_path(path), []

    def release_and_let_a_third_lock_a_new_file():
        first.release(remove=True)
        others.append(try_lock_path(path))

    _replacing_the_file_before_the_first_lock(monkeypatch, path, release_and_let_a_third_lock_a_new_file)
    with pytest.raises(LockBusy) as busy:
        try_lock_path(path)
    assert busy.value.holder["pid"] == os.getpid() and os.fstat(others[0].fd).st_ino == os.stat(path).st_ino


def _wait_a_minute(started):
    started.set()
    time.sleep(60)


def test_a_forked_child_does_not_keep_the_lock_after_its_parent_let_go(tmp_path):
    """DataLoader workers are forked: each shared the run's lock, and kept the next run out while it lived on."""
    path = tmp_path / ".job_1.lock"
    held = try_lock_path(path)
    fork = multiprocessing.get_context("fork")
    started = fork.Event()
    child = fork.Process(target=_wait_a_minute, args=(started,))
    child.start()
    try:
        assert started.wait(30)
        held.release()
        try_lock_path(path).release()
    finally:
        child.kill()
        child.join()


def test_on_windows_a_held_lock_refuses_at_once_and_names_its_holder(tmp_path, monkeypatch):
    """msvcrt's LK_NBLCK says 'held' with EACCES; emulated with flock (held per open file, as per handle)."""
    import fcntl

    def locking(fd, mode, nbytes):
        assert (mode, nbytes) == (2, 1)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OSError(errno.EACCES, "Permission denied") from None

    monkeypatch.setitem(sys.modules, "fcntl", None)
    monkeypatch.setitem(sys.modules, "msvcrt", types.SimpleNamespace(LK_LOCK=1, LK_NBLCK=2, locking=locking))
    held = try_lock_path(tmp_path / ".job_1.lock")
    with pytest.raises(LockBusy) as busy:
        try_lock_path(tmp_path / ".job_1.lock")
    assert busy.value.holder["pid"] == os.getpid()
    held.release()
    try_lock_path(tmp_path / ".job_1.lock").release()


def test_a_file_system_without_locks_runs_unguarded_with_one_debug_line(tmp_path, monkeypatch, caplog):
    import fcntl

    def no_locks(fh, how):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    job = Job(tmp_path / "out", "job", 1)
    with caplog.at_level(logging.DEBUG, logger="biapy"):
        first, second = lock_run(job, []), lock_run(job, [])
    assert not (first.locked or second.locked) and job.lock_file.read_bytes() == b""
    assert [r.levelno for r in caplog.records] == [logging.DEBUG, logging.DEBUG]  # one per run
    second.release()
    first.release(remove=first.made)
    assert not job.lock_file.exists()
