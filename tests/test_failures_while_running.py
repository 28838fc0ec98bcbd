"""What goes wrong around and during a run, one row of the README table "Bad input and what it says" per
test: where results go (result folder, job name, run ID, GPU), failures while running (full disk, NaN loss,
out of memory, killed workers, SIGTERM), failed runs that must leave nothing changed, and the notebook API.

One good tiny run is made first (the module-scoped `world` fixture of conftest.py: one per test file) and
every file it wrote is hashed; each bad case then runs against the same --result_dir (another run ID or name
where the case gets that far) and must exit non-zero with one `ERROR:` line naming the culprit, no traceback,
and leave the good run's files byte-identical (the `intact` fixture).
"""
import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import yaml

from biapy.cli import main
from biapy.errors import BiapyError, ConfigError, DataError
from biapy.job import Job
from biapy.runner import resolve_device
from tests.bad_input_world import GOOD, from_checkpoint, one_error_line, one_nan_pixel, spoil_first

ROOT = Path(__file__).parents[1]


# ------------------------------------------------------------------ where results go
def test_result_folder_not_writable(world, intact, capsys):
    blocker = world.root / "a_file"
    blocker.write_text("")
    assert world.run(world.cfg(), "unwritable", result_dir=blocker / "sub") == 2
    one_error_line(capsys, "--result_dir", "a_file")
    assert world.run(world.cfg(), "result_dir_file", result_dir=blocker) == 2
    one_error_line(capsys, "--result_dir", "a_file is a file; expected a folder")


def test_job_folder_that_is_a_file_is_refused_before_any_work(world, intact, capsys):
    """It had been found only after the data were prepared, as 'config_files: Not a directory' (exit 1)."""
    (world.out / "jobfile").write_text("")
    assert world.run(world.cfg(), "job_is_file", name="jobfile") == 2
    one_error_line(capsys, "--name", "jobfile is a file; expected a folder")
    assert (world.out / "jobfile").read_text() == ""


def test_two_training_images_with_one_stem_are_refused(world, intact, capsys):
    """'x.jpg' and 'x.png' in one folder had the one copy 'x.png': training paired an image with the other's copy."""
    x, _ = world.bad_folder("stems")
    from PIL import Image
    Image.fromarray(np.full((40, 40), 7, np.uint8)).save(x / "same.png")
    Image.fromarray(np.full((40, 40), 9, np.uint8)).save(x / "same.jpg")
    assert world.run(world.cfg(DATA={"TRAIN": {"PATH": str(x)}}), "stems") == 3
    one_error_line(capsys, "DATA.TRAIN.PATH", "same.jpg and same.png would write the same output files")


@pytest.mark.parametrize("task", ["crappify", "masking"])
def test_file_names_that_are_not_utf8_run_through(world, capsys, task):
    """Latin-1 names from an old share (Python holds their odd bytes as escapes): crappify's seed, the masking
    check's TensorBoard tag and the metrics CSV had stopped the run with a UnicodeEncodeError."""
    folders = {}
    for split in ("train", "test"):
        folders[split] = world.root / "latin1" / split
        folders[split].mkdir(parents=True, exist_ok=True)
        for i, src in enumerate(sorted(world.data[split][0].iterdir())):
            shutil.copy(src, os.path.join(os.fsencode(folders[split]), b"caf\xe9_%d.tif" % i))
    cfg = world.cfg(PROBLEM={"SELF_SUPERVISED": {"PRETEXT_TASK": task}}, TEST={"ENABLE": True},
                    DATA={"TRAIN": {"PATH": str(folders["train"])}, "TEST": {"PATH": str(folders["test"])}})
    assert world.run(cfg, f"latin1_{task}", name=f"latin1_{task}") == 0, capsys.readouterr().err
    job = Job(world.out, f"latin1_{task}", world.next_id)
    rows = job.metrics_csv.read_text(encoding="utf-8").splitlines()
    assert len(rows) == 1 + len(list(folders["test"].iterdir())) and rows[1].startswith("caf\ufffd_0.tif,")


def test_file_names_near_the_length_limit_are_written(tmp_path):
    """The temporary beside a 250-byte name (legal) had been 12 bytes too long: 'File name too long'."""
    from biapy.utils.files import atomic_write_text
    for path in (tmp_path / ("a" * 246 + ".csv"), tmp_path / ("\N{MICROSCOPE}" * 60 + ".csv")):  # 4-byte characters
        atomic_write_text(path, "x")
        assert path.read_text() == "x"
    assert len(list(tmp_path.iterdir())) == 2


@pytest.mark.parametrize("name", ["../evil", "a/b", "..", "a..b", "/abs"])
def test_name_with_path_separators_or_dotdot(world, intact, capsys, name):
    assert world.run(world.cfg(), "bad_name", name=name) == 2
    one_error_line(capsys, "--name", repr(name))
    assert not (world.root / "evil").exists()


@pytest.mark.parametrize("result_dir", ["", "  "])
def test_empty_result_dir(world, intact, capsys, tmp_path, monkeypatch, result_dir):
    """An unset shell variable: the job folder had been made in the current folder."""
    monkeypatch.chdir(tmp_path)
    cfg = world.write_cfg(world.cfg(), "empty_result_dir")
    assert main(["--config", str(cfg), "--result_dir", result_dir, "--name", "here", "--run_id", "1"]) == 2
    one_error_line(capsys, "--result_dir is empty")
    assert not (tmp_path / "here").exists()


@pytest.mark.parametrize("run_id", ["../1", "1/2", "-1"])
def test_run_id_must_be_a_plain_number(world, intact, capsys, run_id):
    path = world.write_cfg(world.cfg(), "bad_run_id")
    try:
        code = main(["--config", str(path), "--result_dir", str(world.out), "--name", GOOD, "--run_id", run_id])
    except SystemExit as stop:  # argparse: usage line + one error line
        code = stop.code
    assert code == 2
    err = capsys.readouterr().err
    assert "--run_id" in err and "Traceback" not in err


def test_gpu_that_does_not_exist(world, intact, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "FakeGPU")
    with pytest.raises(ConfigError, match=r"--gpu: device 3 does not exist"):
        resolve_device("3")
    with pytest.raises(ConfigError, match="--gpu"):
        resolve_device("x")
    assert world.run(world.cfg(), "bad_gpu", extra=["--gpu", "0,3"]) == 2
    one_error_line(capsys, "--gpu", "device 3")


def test_batch_size_larger_than_the_dataset(world, intact, capsys):
    assert world.run(world.cfg(TRAIN={"EPOCHS": 1, "BATCH_SIZE": 500}), "big_batch") == 3
    one_error_line(capsys, "TRAIN.BATCH_SIZE", "500")


# found by the audit of bad input
def test_a_name_too_long_for_its_file_names_is_refused_before_any_work(world, intact, capsys):
    """250 characters had trained a whole epoch, then failed to save it ('File name too long'); 300 had failed
    with a bare OS error."""
    for name in ("n" * 219, "n" * 300):
        assert world.run(world.cfg(), "long_name", name=name) == 2
        one_error_line(capsys, "--name", f"is {len(name)} characters long", "at most 218", "255 bytes")
        assert name not in os.listdir(world.out)
    # The longest takes a 12-digit run ID (a scheduler's job ID) and epoch-numbered checkpoints up to 8 digits.
    assert world.run(world.cfg(), "longest_name", name="n" * 218, run_id=10 ** 12 - 1) == 0
    job = Job(world.out, "n" * 218, 10 ** 12 - 1)
    assert job.checkpoint("last").is_file() and len(job.checkpoint(10 ** 8 - 1).name) == 255


# ------------------------------------------------------------------ failures while running
def test_disk_full_while_saving_a_checkpoint(world, intact, capsys, monkeypatch):
    def full(obj, f, *a, **k):
        Path(f).write_bytes(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", full)
    job_id = world.next_id + 1
    code = world.run(world.cfg(), "disk_full")
    assert code != 0
    one_error_line(capsys, "No space left on device", f"{GOOD}_{job_id}-checkpoint-last.pth")
    ckpts = Job(world.out, GOOD, job_id).checkpoint_dir
    assert not [p for p in ckpts.iterdir() if p.name.startswith(f".{GOOD}_{job_id}")]  # no temporary left


def test_disk_full_names_the_checkpoint_though_the_train_log_then_fails_too(world, intact, capsys, monkeypatch):
    """Once the disk is full, the train log written as training ends fails as well: its error had replaced the
    checkpoint's ('ERROR: No space left on device', no file named)."""
    import biapy.engine.reporting as reporting

    full_disk = []

    def full(obj, f, *a, **k):
        full_disk.append(True)
        raise OSError(errno.ENOSPC, "No space left on device")

    def train_log(path, history, real=reporting.write_train_log):
        if full_disk:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, history)
    monkeypatch.setattr(torch, "save", full)
    monkeypatch.setattr(reporting, "write_train_log", train_log)
    job_id = world.next_id + 1
    assert world.run(world.cfg(), "disk_full_log") != 0
    one_error_line(capsys, "No space left on device", f"{GOOD}_{job_id}-checkpoint-last.pth")


def test_a_killed_save_leaves_no_temporary_for_good(tmp_path):
    """A run killed while it saved a checkpoint left `.NAME-checkpoint-last.pth.tmpPID` (hundreds of MB) for ever:
    the next save removes those of processes that no longer run."""
    import subprocess
    import sys

    from biapy.engine.checkpoint import save_checkpoint
    path = tmp_path / "job_1-checkpoint-last.pth"
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".{path.name}.tmp{int(gone.stdout)}"  # a process that has ended
    stale.write_bytes(b"half a checkpoint")
    live = tmp_path / f".{path.name}.tmp1"  # init, which runs: another process may still be writing it
    live.write_bytes(b"in progress")
    other = tmp_path / ".job_1-checkpoint-best.pth.tmp999999999"  # another file's: not this save's business
    other.write_bytes(b"x")
    save_checkpoint(path, {"model": {"w": torch.ones(2)}})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, live.name, other.name])


def test_temporaries_of_a_run_killed_outright_are_removed_by_the_next(world, capsys):
    """kill -9 (or the out-of-memory killer) while a file was written left its temporary for good: charts and
    logs in the results, and degraded copies (gigabytes for a volume) beside the user's images."""
    import subprocess
    import sys

    from biapy.config.derived import ssl_copy_dir
    from biapy.config.load import load_config
    from biapy.data.crappify import copies_folder

    gone = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    x, _ = world.bad_folder("killed")
    cfg = world.cfg(DATA={"TRAIN": {"PATH": str(x)}})
    assert world.run(cfg, "killed", name="killed", run_id=1) == 0
    job = Job(world.out, "killed", 1)
    copies = copies_folder(ssl_copy_dir(load_config(cfg).DATA, "TRAIN"), 0.2, 4, 0)
    left = [job.charts / f".{job.id}_loss.png.tmp{gone}", job.train_logs / f".{job.id}_log.txt.tmp{gone}",
            copies / f".{sorted(x.iterdir())[0].name}.tmp{gone}", copies / f".manifest.json.tmp{os.getppid()}"]
    for path in left:
        path.write_bytes(b"half a file")
    live = job.charts / f".other.png.tmp{os.getppid()}"  # a process that runs may be writing it
    live.write_bytes(b"in progress")
    assert world.run(cfg.copy() | {"TRAIN": {"EPOCHS": 2}}, "killed", name="killed", run_id=1) == 0
    assert not any(p.exists() for p in left) and live.exists()  # under the copies' lock: every temporary


def test_disk_full_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    from biapy.engine.checkpoint import save_checkpoint
    path = tmp_path / "c.pth"
    save_checkpoint(path, {"model": {"w": torch.ones(2)}})
    before = path.read_bytes()

    def full(obj, f, *a, **k):
        Path(f).write_bytes(b"half")
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(BiapyError, match="c.pth"):
        save_checkpoint(path, {"model": {"w": torch.zeros(2)}})
    assert path.read_bytes() == before and list(tmp_path.iterdir()) == [path]


@pytest.mark.parametrize("error, says", [
    (OSError(errno.ENOSPC, "No space left on device"), "No space left on device"),
    # numpy's short write on a full disk has no errno (a real 4 MB tmpfs): the line asks about the disk
    (OSError("589824 requested and 36528 written"), "589824 requested and 36528 written); is the disk full?"),
])
def test_disk_full_while_writing_a_result_image(world, intact, capsys, monkeypatch, error, says):

    def full(*a, **k):
        raise error
    monkeypatch.setattr(tifffile, "imwrite", full)
    cfg = from_checkpoint(world, world.good_job.checkpoint("best"))
    assert world.run(cfg, "disk_full_image") != 0
    one_error_line(capsys, "cannot write (", says)


def test_non_finite_loss_names_epoch_and_step(world, intact, capsys, monkeypatch):
    from biapy.workflows.crappify import CrappifyWorkflow
    real = CrappifyWorkflow.compute_loss

    def nan_loss(self, batch, train):
        loss, out = real(self, batch, train)
        return loss * float("nan"), out
    monkeypatch.setattr(CrappifyWorkflow, "compute_loss", nan_loss)
    assert world.run(world.cfg(), "nan_loss") == 5
    one_error_line(capsys, "epoch 1", "step 1")


def test_out_of_memory_says_what_to_lower(world, intact, capsys, monkeypatch):
    from biapy.workflows.crappify import CrappifyWorkflow

    def oom(self, batch, train):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    monkeypatch.setattr(CrappifyWorkflow, "compute_loss", oom)
    assert world.run(world.cfg(), "oom") == 1
    one_error_line(capsys, "out of memory", "Tried to allocate 20.00 GiB", "TRAIN.BATCH_SIZE", "MODEL.ACTIVATION_CHECKPOINTING")


def test_a_killed_loader_worker_is_one_line_that_says_what_to_lower(world, intact, capsys, monkeypatch):
    """torch's RuntimeError when the kernel kills a DataLoader worker (out of memory, say) had been a traceback."""
    from biapy.workflows.crappify import CrappifyWorkflow

    def killed(self, batch, train):
        raise RuntimeError("DataLoader worker (pid 4242) is killed by signal: Killed. ")
    monkeypatch.setattr(CrappifyWorkflow, "compute_loss", killed)
    assert world.run(world.cfg(), "worker_killed") == 1
    one_error_line(capsys, "data-loading worker (pid 4242) was killed (Killed)", "SYSTEM.NUM_WORKERS",
                   "run the same command again to resume")


@pytest.mark.parametrize("error, code, culprit", [
    (lambda: DataError("/d/img_005.tif: cannot read image (ValueError: mmap length is greater than file size)"), 3,
     "ERROR: /d/img_005.tif: cannot read image (ValueError: mmap length"),
    (lambda: FileNotFoundError(2, "No such file or directory", "/d/img_005.tif"), 1,
     "ERROR: [Errno 2] No such file or directory: '/d/img_005.tif'"),
])
def test_an_error_in_a_loader_worker_is_its_own_one_line(world, intact, capsys, monkeypatch, error, code, culprit):
    """torch raises a worker's error again with the worker's whole traceback in its message ('Caught DataError in
    DataLoader worker process 0.' and ~20 lines): only the error's own line is shown."""
    from torch._utils import ExceptionWrapper

    from biapy.workflows.crappify import CrappifyWorkflow

    def in_worker(self, batch, train):
        try:
            raise error()
        except Exception:
            ExceptionWrapper(where="in DataLoader worker process 0").reraise()
    monkeypatch.setattr(CrappifyWorkflow, "compute_loss", in_worker)
    assert world.run(world.cfg(), "worker_error") == code
    assert one_error_line(capsys, culprit).startswith(culprit) and "Caught" not in capsys.readouterr().err


def test_sigterm_outside_training_exits_130_without_traceback(world, intact, capsys, monkeypatch):
    import os
    import signal

    from biapy.workflows.crappify import CrappifyWorkflow

    def killed(self, files=None):
        os.kill(os.getpid(), signal.SIGTERM)
    monkeypatch.setattr(CrappifyWorkflow, "test", killed)
    before = signal.getsignal(signal.SIGTERM)
    assert world.run(from_checkpoint(world, world.good_job.checkpoint("best")), "sigterm_test") == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Interrupted" in err
    assert signal.getsignal(signal.SIGTERM) is before


def test_traceback_only_with_verbose(world, intact, capsys):
    path = world.write_cfg(world.cfg(TRAIN={"EPOCH": 2}), "verbose")
    args = ["--config", str(path), "--result_dir", str(world.out), "--name", GOOD, "--run_id", "1"]
    quiet = subprocess.run([sys.executable, str(ROOT / "main.py"), *args], capture_output=True, text=True, cwd=ROOT)
    assert quiet.returncode == 2
    assert "Traceback" not in quiet.stderr and quiet.stderr.strip().splitlines() == [
        f"ERROR: {path}: unknown key TRAIN.EPOCH; did you mean TRAIN.EPOCHS?"]
    assert main(args + ["--verbose"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("ERROR: ")


# ------------------------------------------------------------------ failed runs leave nothing changed
@pytest.mark.parametrize("train", [False, True])  # True: training already finished, so only the test runs
def test_a_test_rerun_that_fails_midway_keeps_the_runs_outputs_and_metrics(world, intact, capsys, train):
    """The first test image is written before the second (NaN) one fails: the staged outputs are dropped,
    per_image/, the metrics CSV and the config copies of run 1 stay as they were (`intact`)."""
    x, _, victim = spoil_first(world, f"rerun_nan_test_{train}", one_nan_pixel)
    cfg = world.cfg(TRAIN={"ENABLE": train, "EPOCHS": 1}, TEST={"ENABLE": True}, DATA={"TEST": {"PATH": str(x)}})
    assert world.run(cfg, f"rerun_nan_test_{train}", run_id=1) == 3
    one_error_line(capsys, victim.name, "NaN")
    assert not (world.good_job.results / ".per_image.partial").exists()


def test_a_new_test_only_run_without_a_checkpoint_leaves_no_run_behind(world, intact, capsys):
    cfg = world.cfg(TRAIN={"ENABLE": False}, TEST={"ENABLE": True})
    assert world.run(cfg, "no_ckpt_new", run_id=None) == 4  # the next free ID: it has no checkpoint
    line = one_error_line(capsys, "no checkpoint of run", "runs with checkpoints: 1", "(pass --run_id)")
    new_id = int(line.split("no checkpoint of run ")[1].split()[0])
    assert not Job(world.out, GOOD, new_id).results.exists()


def test_test_images_that_would_write_the_same_output(world, intact, capsys):
    x, _ = world.bad_folder("same_stem", split="test")
    first = sorted(x.iterdir())[0]
    shutil.copy(first, x / (first.stem + ".tiff"))
    cfg = from_checkpoint(world, world.good_job.checkpoint("best"), DATA={"TEST": {"PATH": str(x)}})
    assert world.run(cfg, "same_stem") == 3
    one_error_line(capsys, "DATA.TEST.PATH", first.name, first.stem + ".tiff", "rename one")


def test_nothing_to_do_is_a_config_error(world, intact, capsys):
    assert world.run(world.cfg(TRAIN={"ENABLE": False}, TEST={"ENABLE": False}), "nothing", run_id=1) == 2
    one_error_line(capsys, "TRAIN.ENABLE and TEST.ENABLE are both False")


# ------------------------------------------------------------------ the notebook API
def test_api_takes_numpy_values_and_paths_in_a_dict_config(world):
    """A sweep's np.float64 LR had passed the checks, then stopped the run when its YAML copy was written (a
    RepresenterError, after data preparation, with the run's folders left behind)."""
    from biapy import BiaPy

    cfg = world.cfg(TRAIN={"EPOCHS": np.int64(1), "LR": np.logspace(-3, -2, 2)[0]})
    cfg["DATA"]["TRAIN"]["PATH"] = Path(cfg["DATA"]["TRAIN"]["PATH"])
    job = BiaPy(cfg, world.out, "numpy_values", run_id=np.int64(1)).run_job()
    assert job.checkpoint("last").is_file()
    copied = yaml.safe_load((job.config_files / "numpy_values.yaml").read_text())
    assert copied["TRAIN"]["LR"] == 0.001 and copied["DATA"]["TRAIN"]["PATH"] == str(world.data["train"][0])


@pytest.mark.parametrize("run_id", [1.5, True, "2", -1])
def test_api_run_id_must_be_a_non_negative_integer(world, run_id):
    """1.5 or True had named run folders next_run_id never sees, '2' had raised a TypeError."""
    from biapy import BiaPy

    with pytest.raises(ConfigError, match="--run_id: .* must be a non-negative integer"):
        BiaPy(world.cfg(), world.out, "bad_id", run_id=run_id).run_job()
    assert not (world.out / "bad_id").exists()


def test_api_gives_the_callers_logging_threads_and_random_state_back(world):
    """In a notebook, a job had replaced the session's own handlers and levels for good, set torch's thread count
    to its own and reseeded torch's global generator."""
    import logging

    from biapy import BiaPy

    mine = logging.NullHandler()
    lg = logging.getLogger("biapy")
    lg.addHandler(mine)
    lg.setLevel(logging.WARNING)
    handlers = list(lg.handlers)  # with those of earlier jobs of this process run through main()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(123)
    try:
        BiaPy(world.cfg(SYSTEM={"NUM_CPUS": 2}), world.out, "caller_state", run_id=1).run_job()
        assert lg.handlers == handlers and lg.level == logging.WARNING
        assert torch.get_num_threads() == 1 and torch.initial_seed() == 123
        with pytest.raises(ConfigError):  # a failed job gives them back too
            BiaPy(world.cfg(TRAIN={"EPOCH": 1}), world.out, "caller_state").run_job()
        assert lg.handlers == handlers and torch.get_num_threads() == 1
    finally:
        lg.removeHandler(mine)
        lg.setLevel(logging.NOTSET)
        torch.set_num_threads(threads)
