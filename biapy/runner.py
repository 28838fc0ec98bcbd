"""One job from start to end: config, devices, the results tree, then the workflow.

`BiaPy(config, result_dir=..., name=..., run_id=...).run_job()` is the notebook API and what
`main.py` calls.
"""
import logging
import numbers
import os
import re
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import yaml

from biapy.config import check_config, dump_config, finalize, load_config
from biapy.config.derived import cores_per_process
from biapy.config.load import plain_tree
from biapy.engine.resume import check_start
from biapy.engine.precision import describe_amp
from biapy.errors import AgreedStop, ConfigError, shown
from biapy.job import Job
from biapy.utils.files import atomic_path, atomic_write_text, remove_stale_temporaries_under
from biapy.utils.locks import LockBusy, try_lock_path
from biapy.utils.memory import tune_process_memory

log = logging.getLogger("biapy")

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


def setup_logging(is_main=True, verbose=False):
    # Other ranks: errors only, --verbose or not; their lines would repeat rank 0's (each rank runs the same checks).
    level = (logging.DEBUG if verbose else logging.INFO) if is_main else logging.ERROR
    root = logging.getLogger("biapy")
    root.handlers.clear()
    # The log is the job's output, on stdout as BiaPy prints it (`> run.log` keeps it); the final error line
    # and tqdm's bars go to stderr.
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", datefmt="%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False
    # tifffile logs its own complaints about a damaged file; the read that fails names the file in one line
    # (biapy.data.image_axes turns its ERROR records into that failure, so they must still be made, not shown).
    tiff_log = logging.getLogger("tifffile")
    tiff_log.setLevel(logging.DEBUG if verbose else logging.ERROR)
    tiff_log.propagate = verbose
    if not any(isinstance(h, logging.NullHandler) for h in tiff_log.handlers):
        tiff_log.addHandler(logging.NullHandler())  # else Python's last-resort handler prints what none shows
    # TRAIN.COMPILE on a machine without CUDA: torch notes that it found no CUDA runtime, which is expected.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.DEBUG if verbose else logging.ERROR)


@contextmanager
def _caller_state():
    """The process-wide settings a job changes (its loggers, torch's threads and global random state), put back
    when it ends: a notebook's own handlers and levels had been replaced for the rest of the session."""
    loggers = [logging.getLogger(n) for n in ("biapy", "tifffile", "torch.utils.cpp_extension")]
    saved = [(lg, list(lg.handlers), lg.level, lg.propagate) for lg in loggers]
    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    try:
        yield
    finally:
        for lg, handlers, level, propagate in saved:
            lg.handlers[:] = handlers
            lg.setLevel(level)
            lg.propagate = propagate
        torch.set_num_threads(threads)
        torch.set_rng_state(rng)


# The longest file name made from --name: NAME_<run id>-checkpoint-<epoch>.pth, with room for a run ID of 12 digits
# (a scheduler's job ID, say) and an epoch of 8.
_LONGEST_DERIVED = f"_{'9' * 12}-checkpoint-{'9' * 8}.pth"
_NAME_MAX = 255  # bytes of one file name (ext4, xfs, btrfs, tmpfs, NTFS...)
# Windows' device names, alone or before an extension ('nul.txt' too): refused on every system, as results move
# between machines.
_WINDOWS_DEVICE = re.compile(r"(CON|PRN|AUX|NUL|COM[0-9]|LPT[0-9])(\..*)?", re.IGNORECASE)


def check_name(name):
    if not name or name in (".", "..") or not _SAFE_NAME.match(name) or ".." in name:
        raise ConfigError(f"--name: {shown(name)} must be a plain folder name (letters, digits, '.', '_', '-', '+'; "
                          "no path separators or '..')")
    if _WINDOWS_DEVICE.fullmatch(name):
        raise ConfigError(f"--name: {shown(name)} is a device name on Windows, where its folder cannot be made; "
                          "expected a name other than CON, PRN, AUX, NUL, COM0-9 or LPT0-9 (with or without an "
                          "extension, in any case)")
    if name.endswith("."):
        raise ConfigError(f"--name: {shown(name)} ends in '.', which Windows drops from a folder name; expected a "
                          "name that ends in a letter, digit, '_', '+' or '-'")
    limit = _NAME_MAX - len(_LONGEST_DERIVED)
    if len(os.fsencode(name)) > limit:  # refused before any work: it had failed when the first epoch was saved
        raise ConfigError(f"--name: {shown(name)} is {len(os.fsencode(name))} characters long; expected at most "
                          f"{limit}, so that the file names made from it (NAME_<run id>-checkpoint-<epoch>.pth, room "
                          f"for a 12-digit run ID) fit the file system's limit of {_NAME_MAX} bytes")


def next_run_id(result_dir, name) -> int:
    """The next free ID of job NAME: one more than the highest results/NAME_<id> folder."""
    results = Path(result_dir) / name / "results"
    ids = [int(m.group(1)) for p in results.glob(f"{name}_*")
           if (m := re.fullmatch(re.escape(name) + r"_(\d+)", p.name))]
    return max(ids, default=0) + 1


def claim_run_id(result_dir, name):
    """The next free ID of job NAME, taken at once by making its results folder (mkdir is atomic): two jobs
    started together without --run_id had both taken run 1, and one's results had replaced the other's.
    Returns (ID, the folders made, innermost first: `release_claim` removes them if the run never starts)."""
    results = Path(result_dir) / name / "results"
    made = [d for d in (results, results.parent) if not d.exists()]
    results.mkdir(parents=True, exist_ok=True)
    run_id = next_run_id(result_dir, name)
    while True:
        try:
            (results / f"{name}_{run_id}").mkdir()
            return run_id, [results / f"{name}_{run_id}", *made]
        except FileExistsError:
            run_id += 1


def release_claim(folders):
    """Remove the folders `claim_run_id` made, those still empty: a run that fails before it starts leaves none."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return  # not empty (or gone): it and the folders above it stay


def lock_run(job, made):
    """The lock of run NAME_ID (rank 0 takes it, at once): two processes of one run had written the same results
    tree, the second resuming mid-run from the first's last checkpoint. The job folder it makes is added to `made`
    (see `release_claim`). Raises LockBusy while another process runs NAME_ID."""
    try:
        if not job.job_dir.exists():
            job.job_dir.mkdir(parents=True)
            made.append(job.job_dir)
        held = try_lock_path(job.lock_file)
    except OSError:
        _check_writable(job.result_dir, job.name)  # names the folder at fault, as for any run
        raise
    if not held.locked:
        log.debug("%s: this file system takes no locks; a second run of %s would not be refused", held.path, job.id)
    return held


def in_use_message(job, holder) -> str:
    """The refusal of a run that another process runs; `holder`: its details as try_lock_path wrote them."""
    return (f"--run_id: run {job.id} is in use by another process{_holder_text(holder)}; wait for it to end or pass "
            "another --run_id")


def _holder_text(holder) -> str:
    """' (pid 1234 on host xyz, since 14:02:11)', the date too when not today; '' before the holder wrote them."""
    parts = []
    if "pid" in holder:
        parts.append(f"pid {holder['pid']}" + (f" on host {holder['host']}" if "host" in holder else ""))
    since = str(holder.get("since", ""))
    if since:
        parts.append(f"since {since.removeprefix(time.strftime('%Y-%m-%d '))}")
    return f" ({', '.join(parts)})" if parts else ""


def resolve_device(gpu, local_rank=0):
    """'0', '0,1' or None -> a torch.device; a missing GPU index is an error, no GPU at all means CPU."""
    if gpu is None or str(gpu).strip() in ("", "cpu"):
        return torch.device("cpu"), "CPU (no --gpu given)"
    try:
        ids = [int(g) for g in str(gpu).split(",") if g.strip() != ""]
    except ValueError:
        raise ConfigError(f"--gpu: {gpu!r} must be a GPU index or comma-separated indices such as 0,1") from None
    if not torch.cuda.is_available():
        return torch.device("cpu"), f"CPU (--gpu {gpu} given but no GPU is visible)"
    count = torch.cuda.device_count()
    for i in ids:
        if not 0 <= i < count:
            raise ConfigError(f"--gpu: device {i} does not exist; this machine has {count} GPU(s) "
                              f"(indices 0..{count - 1})")
    index = ids[local_rank % len(ids)]
    return torch.device(f"cuda:{index}"), f"GPU {index} ({torch.cuda.get_device_name(index)})"


def _check_writable(result_dir, name):
    """--result_dir, and the job folder NAME in it when it exists already (it is not made here: a run that
    fails before it starts leaves no new folder), are folders this process can write in."""
    path = Path(result_dir)
    for flag, folder, made in (("--result_dir", path, True), ("--name", path / name, False)):
        if folder.exists() and not folder.is_dir():
            raise ConfigError(f"{flag}: {folder} is a file; expected a folder for the results")
        if not (made or folder.exists()):
            continue
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / f".biapy_write_test_{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as err:
            raise ConfigError(f"{flag}: {folder} is not writable ({err.strerror or err})") from None


class BiaPy:
    """A configured job. `config` is a YAML path or a nested dict of overrides."""

    def __init__(self, config, result_dir, name, run_id=None, gpu=None, dist_backend=None, overrides=(),
                 verbose=False):
        self.config_source = config
        self.given_result_dir = str(result_dir)
        self.result_dir = Path(result_dir).expanduser().resolve()  # `--result_dir=~/r`: the shell left the ~
        self.name = name
        self.run_id = run_id
        self.gpu = gpu
        self.dist_backend = dist_backend
        self.overrides = list(overrides)
        self.verbose = verbose
        self.cfg = None
        self.job = None
        self._claimed = []  # folders made to claim a run ID, removed if the run does not start
        self._run_lock = None  # rank 0's lock of the run (lock_run)
        self._started = False  # the run has described itself (`_write_configs`): its files are its own

    def _prepare(self):
        check_name(self.name)
        if not self.given_result_dir.strip():  # an unset shell variable: the run would land in the current folder
            raise ConfigError("--result_dir is empty; expected the folder under which the job folder NAME is made")
        if self.run_id is not None:  # from the API, any value: 1.5 or True had named a run folder
            if isinstance(self.run_id, bool) or not isinstance(self.run_id, numbers.Integral) or self.run_id < 0:
                raise ConfigError(f"--run_id: {self.run_id!r} must be a non-negative integer")
            self.run_id = int(self.run_id)
        cfg = load_config(self.config_source, self.overrides)
        check_config(cfg)
        return cfg

    def run_job(self):
        """Run the job; returns its `Job` (folders, checkpoints). In a notebook, the logging set-up, torch's thread
        count and its global random state are the caller's again afterwards, whatever the outcome."""
        with _caller_state():
            return self._run_job()

    def _run_job(self):
        from biapy.engine.distributed import broadcast_object, cleanup, init_distributed

        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        is_main_env = int(os.environ.get("RANK", 0)) == 0
        setup_logging(is_main_env, self.verbose)
        cfg = self._prepare()  # every rank checks, so a bad config stops all of them alike
        device, device_text = resolve_device(self.gpu, local_rank)
        backend = self.dist_backend or ("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            torch.cuda.set_device(device)
            # Patch shapes are fixed, so cuDNN can time its convolution algorithms once per shape and keep
            # the fastest (results then vary in the last bits between runs, as GPU reductions do anyway).
            torch.backends.cudnn.benchmark = True
        dist = init_distributed(backend)
        finished = False
        self._claimed, self._run_lock, self._started = [], None, False
        try:
            run_id, refusal = self._claim_and_lock() if dist.is_main else (self.run_id, None)
            run_id, refusal = broadcast_object((run_id, refusal))  # every rank takes rank 0's
            if refusal is not None:
                raise ConfigError(refusal)
            self.job = Job(self.result_dir, self.name, run_id)
            self.cfg = finalize(cfg, self.job)
            check_start(self.cfg, self.job)
            self.cfg.defrost()
            self.cfg.SYSTEM.DEVICE = str(device)
            self.cfg.freeze()
            torch.set_num_threads(cores_per_process(self.cfg.SYSTEM.NUM_CPUS))
            tune_process_memory(device)
            if dist.is_main:
                log.info("Job %s (run %d) -> %s", self.name, run_id, self.job.results)
                log.info("Device: %s%s; %s", device_text,
                         f", {dist.world_size} processes ({backend})" if dist.world_size > 1 else "",
                         describe_amp(self.cfg.TRAIN.AMP, device))
            from biapy.workflows import get_workflow
            workflow = get_workflow(self.cfg)(self.cfg, self.job, dist, device)
            # The run describes itself only once its data and checkpoint were accepted (training starts, or
            # a test-only run finished): a run that fails before leaves no new folder, a re-run the old files.
            if dist.is_main:
                workflow.on_ready = self._write_configs
            workflow.run()
            finished = True
        except AgreedStop:
            finished = True  # wait for every rank: rank 0 may still be writing the checkpoint of the stop
            raise
        finally:
            self._release_run()
            cleanup(wait=finished)
        return self.job

    def _claim_and_lock(self):
        """Rank 0: (the run ID, None), the ID claimed when none was given and the run locked; (ID, the message that
        refuses the run) while another process runs it, the results tree left as it was."""
        run_id = self.run_id
        if run_id is None:
            _check_writable(self.result_dir, self.name)
            run_id, self._claimed = claim_run_id(self.result_dir, self.name)
        job = Job(self.result_dir, self.name, run_id)
        try:
            self._run_lock = lock_run(job, self._claimed)
        except LockBusy as busy:
            return run_id, in_use_message(job, busy.holder)
        if self.run_id is not None:
            _check_writable(self.result_dir, self.name)  # once locked: a refused run had written its probe
        return run_id, None

    def _release_run(self):
        """Rank 0's hold on the run, let go whatever the outcome: its lock, and when the run never started the lock
        file and folders it made (a run that fails before it starts leaves no new folder)."""
        if self._run_lock is not None:
            self._run_lock.release(remove=self._run_lock.made and not self._started)
            self._run_lock = None
        if not self._started:
            release_claim(self._claimed)

    def _write_configs(self):
        job = self.job
        self._started = True
        for folder in (job.results, job.config_files):  # what a run killed outright (kill -9, out of memory) left
            remove_stale_temporaries_under(folder)
        job.config_files.mkdir(parents=True, exist_ok=True)
        job.results.mkdir(parents=True, exist_ok=True)
        if isinstance(self.config_source, (str, Path)):
            src = Path(self.config_source)
            dst = job.config_files / src.name
            if src.resolve() != dst.resolve():
                data = src.read_bytes()  # read, then written: an error names the file it is about
                with atomic_path(dst) as tmp:  # a temporary name of this process: runs of one NAME copy at once
                    Path(tmp).write_bytes(data)
        else:
            atomic_write_text(job.config_files / f"{self.name}.yaml",
                              yaml.safe_dump(plain_tree(self.config_source), sort_keys=False))
        atomic_write_text(job.resolved_config, dump_config(self.cfg))


def record_derived_model(checkpoint_file, job):
    """Append this run to the pretrained run's derived_models.log (lineage of fine-tuned runs)."""
    ckpt = Path(checkpoint_file).resolve()
    source_job_dir = ckpt.parent.parent
    # Only into one of this tool's job folders (NAME/checkpoints/NAME_ID-checkpoint-*.pth beside NAME/results):
    # any other folder named 'checkpoints' (a downloaded model's) is not a run's, and may lie outside --result_dir.
    own_name = re.fullmatch(re.escape(source_job_dir.name) + r"_\d+-checkpoint-.+\.pth", ckpt.name)
    if ckpt.parent.name != "checkpoints" or not own_name or not (source_job_dir / "results").is_dir():
        return
    if source_job_dir.resolve() == job.job_dir.resolve():
        return
    line = f"{time.strftime('%Y-%m-%d %H:%M:%S')}\t{job.results}\tfrom {ckpt.name}\n"
    try:
        # UTF-8 whatever the locale; a folder name it cannot spell (held as escapes) is written as its own bytes.
        with open(source_job_dir / "derived_models.log", "a", encoding="utf-8", errors="surrogateescape") as fh:
            fh.write(line)
    except OSError as err:
        log.warning("Could not record this run in %s/derived_models.log: %s", source_job_dir, err)
