"""What a training checkpoint holds and how it is restored: exact resume, starting weights, test weights.

Payload keys: model, optimizer, scheduler, scaler, epoch (epochs completed, or the epoch in progress when
step_in_epoch > 0), step_in_epoch, partial_loss (sum, count of that partial epoch over all ranks),
epoch_steps, world_size, batch_size and accum_iter (the layout step_in_epoch and the scheduler's update
count refer to), best_val, bad_epochs, stopped_early, history, began (`start_record` of the checkpoint the run
began from), val_split (`split_record` of its validation images; absent before runs recorded it), rng
(torch/numpy/python/cuda), config (YAML text), metadata, extras.
"""
import hashlib
import logging
import os
import re
from pathlib import Path

from biapy.data.splits import split_record, validation_names
from biapy.engine.checkpoint import (check_compatible, check_own_run, checkpoint_metadata, function_key_differences,
                                     is_step_counter, key_differences, layout_key_differences, load_checkpoint,
                                     load_weights, other_task, rng_states, save_checkpoint, saved_config_tree,
                                     set_rng_states, task_name, to_plain)
from biapy.errors import CheckpointError, ConfigError, first_line, named_few

log = logging.getLogger(__name__)


def build_payload(t, epoch, step_in_epoch=0, partial_loss=(0.0, 0)) -> dict:
    """Everything needed to continue training exactly; `t` is the Trainer."""
    extras = t.wf.checkpoint_extras() if hasattr(t.wf, "checkpoint_extras") else {}
    return {
        "model": t.model.state_dict(),
        "optimizer": t.optimizer.state_dict(),
        "scheduler": t.scheduler.state_dict(),
        "scaler": t.scaler.state_dict() if t.scaler is not None else None,
        "epoch": int(epoch),
        "step_in_epoch": int(step_in_epoch),
        "partial_loss": [float(partial_loss[0]), int(partial_loss[1])],  # summed over every rank
        **current_layout(t),
        "best_val": float(t.best_val),
        "bad_epochs": int(t.bad_epochs),
        "stopped_early": bool(t.stopped_early),
        "history": to_plain(list(t.history)),
        "began": t.began,  # the start this run began from, kept over its resumes (check_start compares it)
        "val_split": getattr(t.wf, "val_split", None),  # its validation images (check_start compares them)
        "rng": rng_states(),
        "config": t.config_text,
        "metadata": checkpoint_metadata(t.cfg),
        "extras": to_plain(extras or {}),
    }


def save(t, path, **kwargs) -> None:
    save_checkpoint(path, build_payload(t, **kwargs))


def restore_training(t, state, path, with_rng=True, advice="pass a new --run_id to train anew") -> None:
    """Optimizer, scheduler, scaler, counters and history from `state` (the model is loaded separately);
    `advice` ends the error when they do not fit. Fields of other types than this tool writes were dropped on
    loading (`load_checkpoint`); what is left may still be laid out otherwise (another program's checkpoint)."""
    try:
        if state.get("optimizer"):
            t.optimizer.load_state_dict(state["optimizer"])
        if state.get("scheduler"):
            t.scheduler.load_state_dict(state["scheduler"])
        if t.scaler is not None and state.get("scaler"):
            t.scaler.load_state_dict(state["scaler"])
    except (ValueError, KeyError, RuntimeError) as err:
        raise CheckpointError(f"{path}: optimizer/scheduler state does not fit this model or TRAIN.OPTIMIZER "
                              f"({first_line(err, 160)}); {advice}") from None
    except (TypeError, AttributeError) as err:  # a dict of another layout: {'step': None}, a list for a dict...
        raise _foreign_layout(path, err, advice) from None
    try:
        t.start_epoch = _count(state, "epoch")
        t.skip_steps = _count(state, "step_in_epoch")
        total, count = state.get("partial_loss", (0.0, 0))
        t.partial_loss = (float(total), int(count))
        _fit_layout(t, saved_layout(state))
        t.best_val = float(state.get("best_val", float("inf")))
        t.bad_epochs = _count(state, "bad_epochs")
        t.stopped_early = bool(state.get("stopped_early", False))
        t.history = list(state.get("history", []))
        if not all(isinstance(record, dict) for record in t.history):
            raise TypeError("its history holds other entries than one dict per epoch")
        if with_rng:
            set_rng_states(state.get("rng"))
    except (TypeError, ValueError, AttributeError, KeyError, RuntimeError) as err:
        raise _foreign_layout(path, err, advice) from None


def _count(state, key) -> int:
    value = int(state.get(key, 0))
    if value < 0:
        raise ValueError(f"{key} is {value}; expected a count (0 or more)")
    return value


def _foreign_layout(path, err, advice) -> CheckpointError:
    return CheckpointError(f"{path}: its training state (optimizer, scheduler, epoch counters) is not of this tool's "
                           f"layout ({type(err).__name__}: {first_line(err, 160)}); {advice}")


# What a step and an update are: a checkpoint saved mid-epoch resumes at its step only where all of them match.
LAYOUT = ("epoch_steps", "world_size", "batch_size", "accum_iter")


def current_layout(t) -> dict:
    """This run's LAYOUT values, as a checkpoint records them."""
    return {"epoch_steps": len(t.wf.train_loader),  # per rank: where step_in_epoch is valid
            "world_size": int(t.dist.world_size),
            "batch_size": int(t.cfg.TRAIN.BATCH_SIZE),  # another one can give the same step count, not the same steps
            "accum_iter": int(t.accum)}  # another one gives the same steps but other updates


def saved_layout(state) -> dict:
    """The LAYOUT values a checkpoint was saved with; batch_size and accum_iter from its stored config where it
    predates their keys (taken as unchanged, a changed ACCUM_ITER had resumed at a learning rate of 0)."""
    layout = {k: int(state[k]) for k in LAYOUT if k in state}
    train = saved_config_tree(state.get("config")).get("TRAIN") or {}
    for key, name in (("batch_size", "BATCH_SIZE"), ("accum_iter", "ACCUM_ITER")):
        if key not in layout and isinstance(train.get(name), int):
            layout[key] = max(1, train[name]) if key == "accum_iter" else train[name]
    return layout


def _fit_layout(t, saved):
    """A checkpoint of another epoch layout (TRAIN.BATCH_SIZE, TRAIN.ACCUM_ITER, the data or the number of
    processes changed): its interrupted epoch restarts from its first step. From an epoch's start, the LR
    schedule, which counts updates, goes on from the updates of the epochs before it in this layout (with
    TRAIN.BATCH_SIZE or TRAIN.ACCUM_ITER changed, the saved count can lie past this run's last update: a
    learning rate of 0)."""
    here = current_layout(t)
    changed = [k for k in LAYOUT if saved.get(k, here[k]) != here[k]]  # checkpoints before a key: taken as equal
    if t.skip_steps and changed:
        if changed[0] in ("epoch_steps", "world_size"):
            log.warning("The checkpoint stopped at step %d of %s, but an epoch here has %d steps on %d process(es): "
                        "epoch %d restarts from its first step", t.skip_steps, saved.get("epoch_steps", "?"),
                        here["epoch_steps"], here["world_size"], t.start_epoch + 1)
        else:
            key = {"batch_size": "TRAIN.BATCH_SIZE", "accum_iter": "TRAIN.ACCUM_ITER"}[changed[0]]
            log.warning("The checkpoint stopped at step %d with %s %d, here it is %d: epoch %d restarts from its "
                        "first step", t.skip_steps, key, saved[changed[0]], here[changed[0]], t.start_epoch + 1)
        t.skip_steps, t.partial_loss = 0, (0.0, 0)
    if not t.skip_steps:  # the same count as the saved one when nothing changed
        t.scheduler.restart_at(t.start_epoch * t.steps_per_epoch)


def load_model_from(t_model, cfg, path, skip_unmatched, own_run=None):
    """`own_run`: the job ID when `path` is that job's own checkpoint, which must be of the same task."""
    state = load_checkpoint(path)
    check_compatible(state.get("metadata") or {}, cfg, path)
    if own_run is not None:
        check_own_run(state, cfg, path, own_run)
    saved = saved_config_tree(state.get("config"))
    differ = layout_key_differences(saved, cfg)
    fresh = ("head.",) if other_task(state.get("metadata") or {}, cfg) else ()
    try:
        loaded, skipped = load_weights(t_model, state["model"], skip_unmatched, source=str(path), fresh=fresh)
    except CheckpointError as err:
        if not differ:
            raise
        raise CheckpointError(f"{err}. Set as in the pretraining: {'; '.join(differ)}") from None
    if differ:
        log.warning("%s was trained with other model settings (%s); its weights were loaded where they fit",
                    path.name, "; ".join(differ))
    inputs = function_key_differences(saved, state.get("metadata") or {}, cfg)
    if inputs:  # the weights load, but they learned from inputs (or with layers) of another kind
        log.warning("%s was trained with %s; the pretrained features may fit this run's inputs and layers less "
                    "well", path.name, "; ".join(inputs))
    if skipped:
        # Two lines: what stays at its initial values in the model is what a user needs to see, not hidden among
        # the checkpoint's tensors it has no use for (an MAE's decoder). A tensor of another shape is in both.
        entries = {entry.split(" (", 1)[0]: entry for entry in skipped}  # name -> 'name (reason)'
        model_names = set(t_model.state_dict())
        entries = {n: e for n, e in entries.items() if not is_step_counter(n)}  # fit any model; prove nothing
        _log_tensors("Not used: %d tensor(s) of the checkpoint: %s",
                     [e for e in entries.values() if not e.endswith("(not in the checkpoint)")])
        _log_tensors("Left at their initial values: %d tensor(s) of the model: %s",
                     [e for n, e in entries.items() if n in model_names])
    return state, loaded, skipped


def _log_tensors(message, entries, shown=6):
    """One INFO line naming the first `shown` of `entries`; all of them at DEBUG (--verbose)."""
    if not entries:
        return
    hint = " (--verbose lists them)" if len(entries) > shown else ""
    # named_few keeps what follows a last '/' (file names): neither tensor names nor load_weights' reasons hold one.
    log.info(message, len(entries), named_few(entries, shown) + hint)
    if len(entries) > shown:
        log.debug(message, len(entries), ", ".join(entries))


def starting_checkpoint(cfg, job):
    """MODEL.LOAD_CHECKPOINT source: PATHS.CHECKPOINT_FILE, else this job's checkpoint by LOAD_CHECKPOINT_EPOCH
    (CheckpointError when that one does not exist)."""
    if cfg.PATHS.CHECKPOINT_FILE:
        return Path(cfg.PATHS.CHECKPOINT_FILE)
    own = job.checkpoint("best" if cfg.MODEL.LOAD_CHECKPOINT_EPOCH == "best_on_val" else "last")
    if not own.exists():
        raise CheckpointError(f"MODEL.LOAD_CHECKPOINT is True and PATHS.CHECKPOINT_FILE is empty, so this run's own "
                              f"{own.name} would be loaded, but it does not exist ({_runs_with_checkpoints(job)}"
                              "set PATHS.CHECKPOINT_FILE to the checkpoint to start from)")
    return own


def check_start(cfg, job) -> None:
    """Before any data work: a run that goes on from its own checkpoint (resumed, or tested again) has the settings
    it was trained with and asks for no other start; a test of another checkpoint does not replace the outputs of
    a run that has its own; the MODEL.LOAD_CHECKPOINT start exists."""
    last, best = job.checkpoint("last"), job.checkpoint("best")
    start = Path(cfg.PATHS.CHECKPOINT_FILE) if cfg.MODEL.LOAD_CHECKPOINT and cfg.PATHS.CHECKPOINT_FILE else None
    real = start.expanduser().resolve() if start is not None else None  # through links: what will be read
    foreign = real is not None and not (_same_file(real.parent, job.checkpoint_dir)
                                        and real.name.startswith(f"{job.id}-checkpoint-"))
    resumes = cfg.TRAIN.ENABLE and last.exists()
    if resumes or (not cfg.TRAIN.ENABLE and not foreign and (last.exists() or best.exists())):
        own = last if last.exists() else best
        state = load_checkpoint(own, mmap=True)
        check_own_run(state, cfg, own, job.id)
        if resumes and start is not None:
            _check_same_start(state.get("began"), start, job, own)
        if resumes:
            _check_same_split(state, cfg, own, job.id)
    elif not cfg.TRAIN.ENABLE and foreign and (last.exists() or best.exists()):
        # A checkpoint of another task is refused under any run ID (load_for_test): no new --run_id to advise.
        meta = load_checkpoint(start, mmap=True).get("metadata") or {}
        if other_task(meta, cfg):
            raise CheckpointError(f"{start}: checkpoint was trained for {task_name(meta)} but this config asks "
                                  f"for {task_name(checkpoint_metadata(cfg))}, so the test would score its "
                                  f"untrained output layer; {_TEST_THIS_TASK}")
        raise ConfigError(f"PATHS.CHECKPOINT_FILE: run {job.id} has checkpoints of its own, and testing {start.name} "
                          f"would replace its test outputs with another model's; pass a new --run_id to test it")
    if cfg.MODEL.LOAD_CHECKPOINT and not resumes:
        starting_checkpoint(cfg, job)


# What decides which images validate (`validation_split`): named when a resumed run would validate on others.
SPLIT_KEYS = ("DATA.TRAIN.PATH", "DATA.VAL.FROM_TRAIN", "DATA.VAL.PATH", "DATA.VAL.SPLIT_TRAIN", "DATA.VAL.RANDOM",
              "DATA.VAL.CROSS_VAL", "DATA.VAL.CROSS_VAL_NFOLD", "DATA.VAL.CROSS_VAL_FOLD", "SYSTEM.SEED")


def _check_same_split(state, cfg, own, run):
    """A resumed run validates on the images it validated on: others would move former training images into
    validation, and its best checkpoint would be chosen across different validation sets. Compared by file name
    (a moved dataset still resumes); a checkpoint without the record (older runs) is taken as the same."""
    saved = state.get("val_split")
    finished = state.get("stopped_early") or (state.get("epoch", 0) >= cfg.TRAIN.EPOCHS
                                              and not state.get("step_in_epoch"))
    if not saved or "digest" not in saved or finished:  # a finished run trains no more: only tested
        return
    here = split_record(validation_names(cfg))
    if here["digest"] == saved["digest"]:
        return
    changed = key_differences(saved_config_tree(state.get("config")), cfg, SPLIT_KEYS)
    folder = "DATA.TRAIN.PATH" if cfg.DATA.VAL.FROM_TRAIN else "DATA.VAL.PATH"
    why = "; ".join(changed) if changed else f"the images in {folder} changed"
    raise ConfigError(f"run {run} validated on other images than these settings pick ({why}; {saved.get('count')} "
                      f"validation image(s) then, {here['count']} now): set them as in its training to go on with "
                      f"{Path(own).name}, or pass a new --run_id to train anew")


def _same_file(a, b) -> bool:
    """The same file or folder (through links, hard links too), or the same resolved path where one is missing."""
    a, b = Path(a).expanduser(), Path(b).expanduser()
    try:
        return a.samefile(b)
    except OSError:
        return a.resolve() == b.resolve()


def start_record(path) -> dict:
    """What a run began from, to recognize it later from another folder, through a link or after a move: its
    resolved path and a fingerprint (`_fingerprint`). Both empty: from scratch."""
    if path is None:
        return {"path": "", "fingerprint": ""}
    return {"path": str(Path(path).expanduser().resolve()), "fingerprint": _fingerprint(path)}


def _fingerprint(path, blocks=64) -> str:
    """Size, and a SHA-1 of `blocks` 4 KB blocks spread over the file and of its last 64 KB (a torch checkpoint's
    zip directory): ~320 KB read whatever the size. The blocks tell apart checkpoints saved without CRC-32s, whose
    directories differ in sizes and offsets only."""
    try:
        with open(path, "rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            digest = hashlib.sha1()
            for k in range(blocks):
                fh.seek(size * k // blocks)
                digest.update(fh.read(1 << 12))
            fh.seek(max(0, size - (1 << 16)))
            digest.update(fh.read())
            return f"{size}:{digest.hexdigest()}"
    except OSError:
        return ""


def _check_same_start(began, start, job, own):
    """A resumed run goes on from its own 'last', so the start this command names must be the one it began from
    (the same resolved path, or a file with its fingerprint; the text as given is no proof: relative, it names
    another file from another folder). `began` None: a checkpoint from before runs recorded it, taken as the same."""
    if began is None or _same_file(start, own):
        return
    here = start_record(start)
    fingerprint = here["fingerprint"]
    same = bool(began.get("path")) and (began.get("path") == here["path"]
                                        or (bool(fingerprint) and began.get("fingerprint") == fingerprint))
    if not same:
        where = f"from {began.get('path')}" if began.get("path") else "from scratch"
        raise ConfigError(f"PATHS.CHECKPOINT_FILE: run {job.id} began {where} and resumes from its own {own.name}, "
                          f"so {start} would not be loaded; pass a new --run_id to start from it")


def resume_or_start(t) -> bool:
    """Restore this job's unfinished 'last' checkpoint, or the MODEL.LOAD_CHECKPOINT start.

    Returns False when this job's training already finished (nothing to do).
    """
    cfg, job = t.cfg, t.job
    last = job.checkpoint("last")
    if last.exists():
        state, _, _ = load_model_from(t.model, cfg, last, skip_unmatched=False, own_run=job.id)
        restore_training(t, state, last)
        t.began = state.get("began")
        if t.stopped_early or (t.start_epoch >= cfg.TRAIN.EPOCHS and t.skip_steps == 0):
            log.info("Training of %s already finished (%d epoch(s)%s); %s kept. Use a new --run_id to train again",
                     job.id, t.start_epoch, ", stopped early" if t.stopped_early else "", last.name)
            return False
        where = f"epoch {t.start_epoch + 1}" + (f", step {t.skip_steps + 1}" if t.skip_steps else "")
        log.info("Resuming %s from %s at %s", job.id, last.name, where)
        return True
    if not cfg.MODEL.LOAD_CHECKPOINT:
        t.began = start_record(None)
        return True
    path = starting_checkpoint(cfg, job)
    t.began = start_record(path)
    state, loaded, skipped = load_model_from(t.model, cfg, path, cfg.MODEL.SKIP_UNMATCHED_LAYERS)
    t.start_loaded = (path, set(loaded))  # MODEL.FREEZE_ENCODER_EPOCHS freezes only what this filled
    log.info("Loaded %d tensor(s) from %s", len(loaded), path)
    log.debug("Loaded tensors: %s", ", ".join(loaded))
    if not cfg.MODEL.LOAD_CHECKPOINT_ONLY_WEIGHTS and other_task(state.get("metadata") or {}, cfg):
        # Another task's optimizer moments and epoch count (a pretext run's) mean nothing for this one, and its
        # output head was made anew: a fine-tune starts its own training from the loaded weights.
        log.warning("MODEL.LOAD_CHECKPOINT_ONLY_WEIGHTS False: %s was trained for another task, so only its "
                    "weights are loaded; this run's training starts at epoch 1", path.name)
    elif not cfg.MODEL.LOAD_CHECKPOINT_ONLY_WEIGHTS:
        # Another run's optimizer state may not fit this TRAIN.OPTIMIZER; its weights alone always do
        restore_training(t, state, path, with_rng=False,
                         advice="set MODEL.LOAD_CHECKPOINT_ONLY_WEIGHTS True to load its weights only")
        if t.start_epoch >= cfg.TRAIN.EPOCHS and t.skip_steps == 0:
            raise ConfigError(f"TRAIN.EPOCHS: {cfg.TRAIN.EPOCHS}, but {path.name} already holds {t.start_epoch} epoch(s) "
                              "and MODEL.LOAD_CHECKPOINT_ONLY_WEIGHTS False continues its count; raise TRAIN.EPOCHS "
                              "above it, or set TRAIN.ENABLE False to only test it")
        # This run keeps its own best checkpoint and patience: another run's best validation loss would stop
        # it from ever writing one (and early stopping from counting its own epochs).
        t.best_val, t.bad_epochs, t.stopped_early = float("inf"), 0, False
        log.info("Continuing from epoch %d of %s (optimizer and schedule restored)", t.start_epoch, path.name)
    if t.dist.is_main and cfg.PATHS.CHECKPOINT_FILE:
        from biapy.runner import record_derived_model
        record_derived_model(path, job)
    return True


def _runs_with_checkpoints(job) -> str:
    """'runs with checkpoints: 1, 3 (pass --run_id); ' for this job, or '' when it has none."""
    pattern = re.compile(re.escape(job.name) + r"_(\d+)-checkpoint-")
    ids = sorted({int(m.group(1)) for f in job.checkpoint_dir.glob("*.pth") if (m := pattern.match(f.name))})
    return f"runs with checkpoints: {', '.join(map(str, ids))} (pass --run_id); " if ids else ""


# What to test instead of a checkpoint whose layers are not all trained for this task (a pretext run's).
_TEST_THIS_TASK = ("test a checkpoint of this task (a fine-tuned run's own: MODEL.LOAD_CHECKPOINT False, or "
                   "PATHS.CHECKPOINT_FILE set to it)")


def load_for_test(wf) -> Path:
    """Weights for the test phase: this job's checkpoint by LOAD_CHECKPOINT_EPOCH (best, else last; or last) after
    training; with TRAIN.ENABLE False and MODEL.LOAD_CHECKPOINT True, PATHS.CHECKPOINT_FILE (or this job's, the same way)."""
    cfg, job = wf.cfg, wf.job
    if not cfg.TRAIN.ENABLE and cfg.MODEL.LOAD_CHECKPOINT:
        path = starting_checkpoint(cfg, job)
    else:
        best, last = job.checkpoint("best"), job.checkpoint("last")
        path = last if cfg.MODEL.LOAD_CHECKPOINT_EPOCH == "last_on_train" or not best.exists() else best
        if not path.exists():
            raise CheckpointError(f"{best}: no checkpoint of run {job.run_id} to test ({_runs_with_checkpoints(job)}"
                                  "train first, or set MODEL.LOAD_CHECKPOINT True with PATHS.CHECKPOINT_FILE)")
        if path == last and cfg.MODEL.LOAD_CHECKPOINT_EPOCH == "best_on_val":
            log.info("No %s (no validation loss was recorded): testing the last weights", best.name)
    model = getattr(wf.model, "module", wf.model)
    model = getattr(model, "_orig_mod", model)
    external = not cfg.TRAIN.ENABLE and cfg.MODEL.LOAD_CHECKPOINT and cfg.PATHS.CHECKPOINT_FILE
    own = None if external else job.id
    state, loaded, skipped = load_model_from(model, cfg, path, cfg.MODEL.SKIP_UNMATCHED_LAYERS, own_run=own)
    kept = set(loaded)
    untrained = [n for n in model.state_dict() if n not in kept and not is_step_counter(n)]
    if untrained:  # SKIP_UNMATCHED_LAYERS suits a start, not a test: those layers would score as initialized
        raise CheckpointError(f"{path}: {len(untrained)} tensor(s) of the model are not in it "
                              f"({named_few(untrained, 4)}), so the test would score untrained layers; "
                              f"{_TEST_THIS_TASK}")
    if hasattr(wf, "restore_extras"):
        wf.restore_extras(state.get("extras"), path)
    epoch = state.get("epoch")
    log.info("Test weights: %s%s", path, f" (after {epoch} epoch(s))" if epoch is not None else "")
    return path
