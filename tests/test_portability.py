"""What differs off Linux: Windows (no fcntl, os.kill, text-mode newlines, device names) and worker processes
started by spawn or forkserver (macOS, Windows, Python 3.14's default on Linux), each emulated here."""
import builtins
import csv
import errno
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import types
from pathlib import Path

import numpy as np
import pytest
import yaml

from biapy.cli import main
from biapy.config.load import plain_tree
from biapy.data.crappify import MANIFEST, copies_folder, prepare_ssl_source
from biapy.data.image_writing import write_image
from biapy.job import Job
from biapy.utils import files
from biapy.utils.files import _temporary, atomic_write_text
from biapy.workflows.report import write_metrics_csv
from tests.conftest import tiny_config
from tests.test_cli import run_main

ROOT = Path(__file__).parents[1]


def _source(tmp_path):
    src = tmp_path / "src" / "a.tif"
    write_image(src, np.random.default_rng(0).integers(0, 255, (32, 32)).astype(np.uint8), 2)
    return src


def _ended_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_without_a_file_lock_other_jobs_temporaries_are_kept(tmp_path, monkeypatch):
    """Windows without a lock: the build removed every temporary in the folder, a running job's too, and that
    job stopped with 'cannot write (No such file or directory)'. Only those of ended processes go now."""
    monkeypatch.setitem(sys.modules, "fcntl", None)  # `import fcntl` raises ImportError, as on Windows
    monkeypatch.setitem(sys.modules, "msvcrt", None)
    src = _source(tmp_path)
    dst = copies_folder(tmp_path / "dst", 0.2, 2, 0)
    dst.mkdir(parents=True)
    writing = _temporary(dst / "b.tif", os.getppid())  # a job that runs, writing its copy
    killed = _temporary(dst / "c.tif", _ended_pid())
    for tmp in (writing, killed):
        tmp.write_bytes(b"x")
    prepare_ssl_source([src], tmp_path / "dst", 0.2, 2, 2, 0)
    assert writing.exists() and not killed.exists()
    assert json.loads((dst / MANIFEST).read_text())["params"]["noise"] == 0.2


def test_on_windows_jobs_sharing_the_copies_folder_take_turns(tmp_path, monkeypatch):
    """Without fcntl the lock had been skipped: two jobs built in one folder at once. msvcrt's lock, emulated
    here with flock (it blocks per open file as msvcrt's does per handle), gives up after 10 s with EDEADLOCK:
    the build waits on."""
    import fcntl

    calls = []

    def locking(fd, mode, nbytes):
        calls.append((mode, nbytes))
        if len(calls) == 1:
            raise OSError(errno.EDEADLOCK, "Resource deadlock avoided")  # LK_LOCK's 10 tries failed
        fcntl.flock(fd, fcntl.LOCK_EX)

    monkeypatch.setitem(sys.modules, "fcntl", None)
    monkeypatch.setitem(sys.modules, "msvcrt", types.SimpleNamespace(LK_LOCK=1, locking=locking))
    src = _source(tmp_path)
    dst = copies_folder(tmp_path / "dst", 0.2, 2, 0)
    dst.mkdir(parents=True)
    done = threading.Event()
    with open(dst / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another job is building
        worker = threading.Thread(target=lambda: (prepare_ssl_source([src], tmp_path / "dst", 0.2, 2, 2, 0),
                                                  done.set()))
        worker.start()
        assert not done.wait(0.5)  # waits for the lock, past LK_LOCK's giving up
    worker.join(30)
    assert done.is_set() and calls == [(1, 1), (1, 1)]


class _FakeWinapi:
    """_winapi's process calls for one process: 'running', 'exited' (a handle still open), 'gone', 'denied'."""
    SYNCHRONIZE, WAIT_OBJECT_0, WAIT_TIMEOUT = 0x100000, 0, 258

    def __init__(self, state):
        self.state, self.closed = state, 0

    def OpenProcess(self, access, inherit, pid):  # noqa: N802 (the real names)
        if self.state in ("gone", "denied"):
            err = OSError(errno.EINVAL if self.state == "gone" else errno.EACCES, "OpenProcess")
            err.winerror = 87 if self.state == "gone" else 5
            raise err
        return 1234

    def WaitForSingleObject(self, handle, ms):  # noqa: N802
        return self.WAIT_TIMEOUT if self.state == "running" else self.WAIT_OBJECT_0

    def CloseHandle(self, handle):  # noqa: N802
        self.closed += 1


@pytest.mark.parametrize("state, running", [("running", True), ("exited", False), ("gone", False),
                                            ("denied", True)])
def test_on_windows_whether_a_process_runs_is_asked_of_the_process(monkeypatch, state, running):
    """os.kill(pid, 0) on Windows sends CTRL_C_EVENT: it never said a killed run's process had gone (its
    temporaries, hundreds of MB, stayed) and could interrupt the console."""
    fake = _FakeWinapi(state)

    def no_kill(pid, sig):
        raise AssertionError("os.kill on Windows")

    monkeypatch.setitem(sys.modules, "_winapi", fake)
    monkeypatch.setattr(os, "kill", no_kill)
    real_name = os.name
    os.name = "nt"  # only for the call: pathlib reads it too
    try:
        answer = files._running(4_000_000)
    finally:
        os.name = real_name
    assert answer is running
    assert fake.closed == (state in ("running", "exited"))


def _windows_text_mode(monkeypatch):
    """open() as on Windows: text written with newline=None turns each '\\n' into '\\r\\n'."""
    real = io.open

    def windows_open(file, mode="r", buffering=-1, encoding=None, errors=None, newline=None, *args, **kwargs):
        if "b" not in mode and newline is None and set(mode) & set("wax+"):
            newline = "\r\n"
        return real(file, mode, buffering, encoding, errors, newline, *args, **kwargs)

    monkeypatch.setattr(io, "open", windows_open)
    monkeypatch.setattr(builtins, "open", windows_open)


def test_on_windows_the_metrics_csv_has_one_line_ending_per_row(tmp_path, monkeypatch):
    """csv writes '\\r\\n', which Windows' text mode made '\\r\\r\\n': a blank row after each in some readers."""
    _windows_text_mode(monkeypatch)
    path = tmp_path / "test_results_metrics.csv"
    write_metrics_csv(path, [{"file": "a.tif", "psnr": 20.0}, {"file": "b.tif", "psnr": 21.0}])
    atomic_write_text(tmp_path / "c.yaml", "a: 1\nb: 2\n")
    assert b"\r\r\n" not in path.read_bytes() and path.read_bytes().count(b"\r\n") == 3
    assert (tmp_path / "c.yaml").read_bytes() == b"a: 1\nb: 2\n"  # the same bytes everywhere
    with open(path, newline="", encoding="utf-8") as fh:
        assert list(csv.reader(fh)) == [["file", "psnr"], ["a.tif", "20"], ["b.tif", "21"]]


@pytest.mark.parametrize("name", ["CON", "nul", "aux", "COM1", "lpt1.run", "Prn.txt", "job."])
def test_names_windows_cannot_hold_are_refused(name, data2d, tmp_path, capsys):
    """Results move between machines: a folder named CON (or nul.txt, or ending in '.') cannot be made or
    copied on Windows."""
    assert run_main(tmp_path, tiny_config(data2d, 2), name=name) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ERROR: --name:") and "expected" in err[0]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("name", ["console", "CON_1", "nul2", "COM10", "job.v2"])
def test_names_near_windows_device_names_are_kept(name):
    from biapy.runner import check_name
    check_name(name)


@pytest.mark.parametrize("signal_name, memory", [("Killed", True), ("Terminated", False)])
def test_a_worker_ended_by_a_signal_blames_memory_only_for_sigkill(signal_name, memory, monkeypatch, capsys):
    """A worker ended by SIGTERM (a user's or scheduler's) had been reported as out of memory."""
    import biapy.runner

    def killed(self):
        raise RuntimeError(f"DataLoader worker (pid 4242) is killed by signal: {signal_name}. ")

    monkeypatch.setattr(biapy.runner.BiaPy, "run_job", killed)
    assert main(["--config", "x.yaml", "--result_dir", "r", "--name", "n"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"data-loading worker (pid 4242) was killed ({signal_name})" in err[0]
    assert ("memory" in err[0]) is memory and "run the same command again to resume" in err[0]


_SPAWN_MAIN = """import sys
import torch.multiprocessing as mp
if __name__ == "__main__":
    mp.set_start_method("spawn", force=True)  # as on macOS and Windows
    if sys.argv[1].startswith("--sharing="):
        mp.set_sharing_strategy(sys.argv.pop(1).partition("=")[2])
    from biapy.cli import exit_fast, main
    exit_fast(main())
"""


def start_spawned_job(tmp_path, cfg, name, sharing=None):
    """`main.py` on `cfg` in a process of its own, its loader workers started by spawn (torch's shared-memory
    strategy `sharing` if given), in a session of its own; results under tmp_path/out. -> the Popen."""
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(plain_tree(cfg)))
    script = tmp_path / "spawn_main.py"
    script.write_text(_SPAWN_MAIN)
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    args = [f"--sharing={sharing}"] if sharing else []
    return subprocess.Popen([sys.executable, str(script), *args, "--config", str(config), "--result_dir",
                             str(tmp_path / "out"), "--name", name, "--run_id", "1"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


@pytest.mark.skipif(not hasattr(os, "killpg"), reason="a process group's signal: POSIX")
def test_a_sigterm_to_the_whole_job_stops_it_with_spawned_workers_too(data2d, tmp_path):
    """Spawned workers do not inherit the main process's SIGTERM handler: they had died of a SIGTERM to the
    job, which then ended 'killed (Terminated), as the system does when memory runs out' with exit 1 instead
    of saving and exiting 130 as with forked workers."""
    cfg = tiny_config(data2d, 2, TRAIN={"EPOCHS": 50}, TEST={"ENABLE": False},
                      SYSTEM={"NUM_CPUS": 1, "NUM_WORKERS": 1}, LOG={"CHART_CREATION_FREQ": 100})
    last = Job(tmp_path / "out", "sp", 1).checkpoint("last")
    proc = start_spawned_job(tmp_path, cfg, "sp")
    try:
        from tests.test_interrupt import _wait_for
        _wait_for(last.exists, proc, timeout=120)  # an epoch done: the workers run
        os.killpg(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out[-3000:]
    # The trainer's saving stop: mid-epoch ("at epoch N, step k/n") or, when the signal lands as an epoch ends,
    # "after epoch N"; both save the last checkpoint.
    assert re.search(r"Stopped (at|after) epoch \d+.*checkpoint-last\.pth saved", out), out[-3000:]
    assert "killed" not in out and "Traceback" not in out, out[-3000:]



def stored_volume(path):
    """A stand-in for h5py/zarr (not installed here): the chunked array an .h5 file would give."""
    return np.arange(4 * 6 * 5, dtype=np.uint16).reshape(4, 6, 5)


def test_a_lazily_read_chunked_image_reaches_spawned_workers(monkeypatch, tmp_path):
    """Spawned loader workers get their dataset pickled: a lazy HDF5/Zarr (or compressed TIFF) reader that kept a
    lambda stopped a macOS or Windows job with "Can't pickle local object" before its first step."""
    import pickle

    import biapy.data.io as bio
    from biapy.data.lazy_images import LazyStore
    monkeypatch.setattr(bio, "_open_chunked", stored_volume)
    path = tmp_path / "vol.h5"
    path.write_bytes(b"")
    store = bio.open_image_lazy(path, 3)
    copy = pickle.loads(pickle.dumps(store))
    assert isinstance(copy, LazyStore)
    np.testing.assert_array_equal(copy[1:3], stored_volume(path)[1:3, ..., None])


def test_output_names_that_differ_only_in_case_are_refused(tmp_path):
    """'Cell.tif' and 'cell.tif' are one file on a case-insensitive disk (macOS, Windows): one output replaced the
    other's, with both images' rows in the CSV."""
    from biapy.data.io import check_unique_stems
    from biapy.errors import DataError
    with pytest.raises(DataError, match=r"^DATA\.TEST\.PATH: Cell\.jpg and cell\.png would write the same output "
                                        r"files \('cell', names that differ only in case"):
        check_unique_stems([tmp_path / "Cell.jpg", tmp_path / "cell.png"], "DATA.TEST.PATH")
    check_unique_stems([tmp_path / "Cell.tif", tmp_path / "cell2.tif"], "DATA.TEST.PATH")
