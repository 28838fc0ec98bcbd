"""The one training loop: epochs of accumulated, mixed-precision steps, validation, checkpoints, logs.

How the trainer drives a workflow `wf` (see biapy/workflows/base.py):
- `wf.compute_loss(batch, train=True)` inside autocast with `wf.model` set to the training model
  (DDP/compiled wrapper); the workflow moves the batch to the device itself.
- validation: `model.eval()`, `torch.no_grad()`, `wf.compute_loss(batch, train=False)` and
  `wf.batch_metrics(batch, outputs) -> {name: (sum, count)}`.
- rank 0 after each epoch: `wf.on_epoch_end(epoch, tb)`; once after training
  `wf.on_epoch_end(last_epoch, tb, final=True)`; `wf.checkpoint_extras()` goes into checkpoints.
`wf.model` is always the plain model again when fit() returns.

Speed: the loss is copied into a small device buffer each step and read back only every
SYNC_EVERY steps (bar, non-finite check), so steps never wait for the device.
TRAIN.CHANNELS_LAST converts CNN weights only; inputs follow because convolutions keep the
weights' layout (converting batches would cost a copy per step).
SIGINT/SIGTERM: the current optimizer update finishes, 'last' is saved at that exact step and
KeyboardInterrupt is raised; resuming skips the batches already seen in that epoch (the order is a
function of seed and epoch) so the result equals an uninterrupted run. A second signal stops at once.
"""
import inspect
import logging
import math
import os
import signal
import threading
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from tqdm import tqdm

from biapy.config import dump_config
from biapy.engine import resume as R
from biapy.engine.checkpoint import is_step_counter, rng_states, set_rng_states
from biapy.engine.distributed import all_reduce_sum, broadcast_buffers
from biapy.engine.loaders import release_workers, start_epoch
from biapy.engine.metrics import MetricAverager
from biapy.engine.optim import build_optimizer, build_scheduler
from biapy.engine.precision import autocast, resolve_amp
from biapy.engine.reporting import EpochReporter, describe_model
from biapy.errors import AgreedStop, ConfigError, TrainingError, named_few
from biapy.utils.files import atomic_path

log = logging.getLogger(__name__)

SYNC_EVERY = 20  # steps between host reads of the loss


def _unwrap(model):
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def _batch_size(batch) -> int:
    if torch.is_tensor(batch):
        return batch.shape[0]
    if isinstance(batch, dict):
        return _batch_size(next(iter(batch.values())))
    return _batch_size(batch[0])


def _accepts_final(hook) -> bool:
    """Workflows whose on_epoch_end has no `final` parameter have nothing to do after training."""
    params = inspect.signature(hook).parameters
    return "final" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


@contextmanager
def forked_rng():
    """Work inside does not change the global RNG streams (keeps training identical with or without it)."""
    states = rng_states()
    try:
        yield
    finally:
        set_rng_states(states)


class StopRequest:
    """SIGINT/SIGTERM handlers (main thread only) that ask the loop to stop at the next update; a second signal
    stops at once. `duplicate_window_s`: the same signal again within this many seconds is the first one
    delivered twice, not a second request. Under torchrun that happens whenever the signal reaches every
    process (Slurm's SIGTERM at a time limit): torchrun's agent gets it too and forwards it to each of them,
    and a process that took the copy for "stop at once" quit without saving while the others saved."""

    def __init__(self, duplicate_window_s=0.0):
        self.requested = False
        self.window = float(duplicate_window_s)
        self._first = None  # (signal, monotonic time) of the request
        self._previous = {}

    def _handle(self, signum, frame):
        now = time.monotonic()
        if self.requested:
            if signum == self._first[0] and now - self._first[1] < self.window:
                return
            raise KeyboardInterrupt
        self.requested, self._first = True, (signum, now)
        log.warning("%s received: finishing the current step and saving the last checkpoint "
                    "(send it again to stop at once)", signal.Signals(signum).name)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        return False


class Trainer:
    def __init__(self, wf):
        self.wf, self.cfg, self.job, self.dist = wf, wf.cfg, wf.job, wf.dist
        self.device = torch.device(wf.device)
        self.model = _unwrap(wf.model)
        t = self.cfg.TRAIN
        self.epochs, self.accum = int(t.EPOCHS), max(1, int(t.ACCUM_ITER))
        self.clip = float(t.GRADIENT_CLIP_NORM)
        self.amp_dtype, use_scaler = resolve_amp(t.AMP, self.device)
        self.scaler = torch.amp.GradScaler("cuda") if use_scaler else None
        self.optimizer = build_optimizer(self.model, self.cfg)
        self.steps_per_epoch = math.ceil(len(wf.train_loader) / self.accum)
        self.scheduler = build_scheduler(self.optimizer, self.cfg, self.steps_per_epoch)
        self.last_lr = self.optimizer.param_groups[0]["lr"]
        self.start_epoch, self.skip_steps, self.partial_loss = 0, 0, (0.0, 0)
        self._next_batches = None  # (epoch, its batch iterator) started while the previous epoch validated
        self.best_val, self.bad_epochs, self.stopped_early = math.inf, 0, False
        self.history = []
        self.began = None  # resume.start_record of what this run began from, set by resume_or_start
        self.start_loaded = None  # (path, names of the tensors it filled) of a MODEL.LOAD_CHECKPOINT start
        self.config_text = dump_config(self.cfg)  # stored in every checkpoint; dumping takes ~6 ms
        under_torchrun = "TORCHELASTIC_RUN_ID" in os.environ  # with one process too: its agent forwards signals
        self.stop = StopRequest(duplicate_window_s=2.0 if under_torchrun else 0.0)
        self.train_model = self.eval_model = self.ddp = None
        self._frozen = None

    # ------------------------------------------------------------------ set-up
    def _autocast(self):
        return autocast(self.device, self.amp_dtype)

    def _wrap(self):
        """DDP (when distributed) and torch.compile around the plain model; rebuilt when freezing changes."""
        model = self.model
        self.ddp = None
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP
            ids = [self.device.index] if self.device.type == "cuda" else None
            model = self.ddp = DDP(model, device_ids=ids, find_unused_parameters=False)
        compile_ = bool(self.cfg.TRAIN.COMPILE)
        self.train_model = torch.compile(model) if compile_ else model
        if self.eval_model is None:
            self.eval_model = torch.compile(self.model) if compile_ else self.model

    def _apply_freeze(self, epoch):
        n = int(self.cfg.MODEL.FREEZE_ENCODER_EPOCHS)
        frozen = epoch < n
        encoder = getattr(self.model, "encoder", None)
        if n > 0 and encoder is None and self._frozen is None:
            log.warning("MODEL.FREEZE_ENCODER_EPOCHS: %s has no 'encoder' submodule; nothing is frozen",
                        type(self.model).__name__)
        if frozen and self._frozen is None and not self.cfg.MODEL.LOAD_CHECKPOINT:
            log.warning("MODEL.FREEZE_ENCODER_EPOCHS: no pretrained weights are loaded (MODEL.LOAD_CHECKPOINT "
                        "False), so the frozen encoder keeps its random initial weights")
        if frozen and self._frozen is None and encoder is not None:
            self._check_encoder_loaded(encoder)
        if frozen != self._frozen and encoder is not None and n > 0:
            for p in encoder.parameters():
                p.requires_grad_(not frozen)
            log.info("Encoder %s", f"frozen until epoch {n}" if frozen else f"unfrozen from epoch {epoch + 1}")
            self.train_model = None
        self._frozen = frozen
        if self.train_model is None:
            self._wrap()

    def _check_encoder_loaded(self, encoder):
        """ConfigError when the start checkpoint left encoder tensors at their initial values (another token size,
        an extra U-Net level): frozen, a random patch embedding feeds every pretrained block noise for the whole
        freeze. Refused rather than freezing the loaded part only: what trains would then hang on which shapes
        happened to match, and the loaded blocks after a random one compute nothing pretrained either."""
        if self.start_loaded is None:  # from scratch (warned above), or resumed from this run's own checkpoint
            return
        path, loaded = self.start_loaded
        mine = {id(v) for v in encoder.state_dict(keep_vars=True).values()}
        random = [n for n, v in self.model.state_dict(keep_vars=True).items()
                  if id(v) in mine and n not in loaded and not is_step_counter(n)]
        if random:
            raise ConfigError(f"MODEL.FREEZE_ENCODER_EPOCHS: {len(random)} encoder tensor(s) were not loaded from "
                              f"{Path(path).name} and keep their random initial values ({named_few(random, 3)}), so "
                              "freezing them would train the decoder on random features; set "
                              "MODEL.FREEZE_ENCODER_EPOCHS 0, or start from a checkpoint whose encoder matches this "
                              "model")

    # ------------------------------------------------------------------ loop
    def fit(self):
        """Train (or resume) for TRAIN.EPOCHS; returns the per-epoch history."""
        resumed = R.resume_or_start(self)
        if not resumed:  # already finished: nothing new yet (a test phase that follows calls `ready` when done)
            return self.history
        if hasattr(self.wf, "ready"):
            self.wf.ready()
        self._apply_freeze(self.start_epoch)  # first, so the model table counts a frozen encoder as such
        describe_model(self.model, self.job, self.dist.is_main, self.cfg.MODEL.ARCHITECTURE)
        reporter = EpochReporter(self.cfg, self.job, self.dist.is_main)
        plain = self.wf.model
        ended = False
        try:
            with self.stop:
                last_epoch = self._epochs(reporter)
            self.wf.model = plain
            if self.dist.is_main and last_epoch is not None and _accepts_final(self.wf.on_epoch_end):
                self.model.eval()
                with forked_rng():
                    self.wf.on_epoch_end(last_epoch, reporter.tb, final=True)
            ended = True
        finally:
            self.wf.model = plain
            self._next_batches = None
            for loader in (self.wf.train_loader, self.wf.val_loader):
                release_workers(loader)
            try:
                reporter.close(self.history)
            except OSError as err:
                if ended:
                    raise
                # The error that stopped training (a full disk: its checkpoint) is the one to report.
                log.warning("Could not write the train log and charts either: %s", err)
        return self.history

    def _stop_agreed(self) -> bool:
        if not self.dist.enabled:
            return self.stop.requested
        flag = torch.tensor([1.0 if self.stop.requested else 0.0], device=self.device)
        return bool(all_reduce_sum(flag).item() > 0)

    def _epochs(self, reporter):
        epoch = None
        for epoch in range(self.start_epoch, self.epochs):
            self._apply_freeze(epoch)
            start = time.perf_counter()
            train_loss = self._train_epoch(epoch)
            val_loss, metrics = self._validate(epoch)
            monitored = val_loss if val_loss is not None else train_loss
            self.scheduler.step_epoch(monitored)
            is_best = monitored < self.best_val
            if is_best:
                self.best_val, self.bad_epochs = monitored, 0
            else:
                self.bad_epochs += 1
            patience = int(self.cfg.TRAIN.PATIENCE)
            self.stopped_early = patience > 0 and self.bad_epochs >= patience and epoch + 1 < self.epochs
            record = {"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val_loss, "metrics": metrics,
                      "lr": self.last_lr, "seconds": round(time.perf_counter() - start, 3)}
            self.history.append(record)
            if self.dist.is_main:
                self._save_epoch(epoch, is_best)
            with forked_rng():  # logging and workflow extras must not shift the training RNG streams
                reporter.epoch_end(record, self.history, is_best)
                if self.dist.is_main:
                    self.wf.model = self.model
                    self.model.eval()
                    self.wf.on_epoch_end(epoch, reporter.tb)
            if self._stop_agreed():
                log.warning("Stopped after epoch %d; %s saved, run the same command again to resume",
                            epoch + 1, self.job.checkpoint("last").name)
                raise AgreedStop
            if self.stopped_early:
                log.info("Early stopping: no better validation loss for %d epochs (best %.4f)", patience,
                         self.best_val)
                break
        return epoch

    def _save_epoch(self, epoch, is_best):
        last = self.job.checkpoint("last")
        R.save(self, last, epoch=epoch + 1)
        copies = [self.job.checkpoint("best")] if is_best else []
        freq = int(self.cfg.MODEL.SAVE_CKPT_FREQ)
        if freq > 0 and (epoch + 1) % freq == 0:
            copies.append(self.job.checkpoint(epoch + 1))
        for dst in copies:  # same payload: link (or copy) the file instead of serializing again
            with atomic_path(dst) as tmp:
                try:
                    os.link(last, tmp)  # 'last' is later replaced by a new file, so this one stays intact
                except OSError:  # no hard links on this file system
                    tmp.write_bytes(last.read_bytes())

    def _optimizer_step(self):
        self.last_lr = self.optimizer.param_groups[0]["lr"]  # the epoch's record shows the LR its updates used
        if self.scaler is not None:
            if self.clip > 0:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            if self.clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step_iter()

    def _train_epoch(self, epoch) -> float:
        wf, loader = self.wf, self.wf.train_loader
        self.model.train()
        if self._frozen:  # a frozen encoder is a fixed feature extractor: BatchNorm statistics kept, no dropout
            self.model.encoder.eval()
        wf.model = self.train_model
        batches = self._batches(epoch)
        n = len(loader)
        skip = self.skip_steps if epoch == self.start_epoch else 0  # resume.restore_training checked its layout
        # The saved partial loss is every rank's total: rank 0 carries it into the epoch's all-reduce.
        loss_sum, loss_count = self.partial_loss if skip and self.dist.is_main else (0.0, 0)
        self.skip_steps, self.partial_loss = 0, (0.0, 0)
        with tqdm(total=n, initial=skip, desc=f"Epoch {epoch + 1}/{self.epochs}", unit="step", leave=False,
                  disable=None if self.dist.is_main else True, dynamic_ncols=True) as bar:
            loss_sum, loss_count = self._steps(batches, epoch, n, skip, loss_sum, loss_count, bar)
        if epoch + 1 < self.epochs and getattr(loader, "num_workers", 0) > 0:
            # The workers prepare the next epoch's first batches while this one validates and is saved;
            # otherwise every epoch's first step waits for a whole batch to be made (~10% of a short GPU epoch).
            self._next_batches = (epoch + 1, start_epoch(loader, epoch + 1))
        totals = all_reduce_sum(torch.tensor([loss_sum, float(loss_count)], dtype=torch.float64,
                                             device=self.device))
        return float(totals[0] / totals[1].clamp_min(1))

    def _batches(self, epoch):
        """The epoch's batch iterator: the one started at the end of the previous epoch, else a new one."""
        ready, self._next_batches = self._next_batches, None
        if ready is not None and ready[0] == epoch:
            return ready[1]
        return start_epoch(self.wf.train_loader, epoch)

    def _steps(self, batches, epoch, n, skip, loss_sum, loss_count, bar):
        wf = self.wf
        window = torch.zeros(SYNC_EVERY, device=self.device)
        filled, updates = 0, 0
        self.optimizer.zero_grad(set_to_none=True)
        for _ in range(skip):  # same (seed, epoch) order: skip what the interrupted run already used
            next(batches)
        for step, batch in enumerate(batches, start=skip):
            group_start = (step // self.accum) * self.accum
            group = min(self.accum, n - group_start)
            updating = step - group_start + 1 == group
            sync = nullcontext() if updating or self.ddp is None else self.ddp.no_sync()
            with sync:
                with self._autocast():
                    loss, _ = wf.compute_loss(batch, train=True)
                scaled = loss if group == 1 else loss / group
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            window[filled].copy_(loss.detach())
            filled += 1
            if updating:
                self._optimizer_step()
                updates += 1
            bar.update(1)
            stopping = updating and (not self.dist.enabled or updates % SYNC_EVERY == 0) and self._stop_agreed()
            if filled == SYNC_EVERY or step == n - 1 or stopping:
                loss_sum, loss_count = self._flush(window, filled, step, epoch, loss_sum, loss_count, bar)
                filled = 0
            if stopping and step < n - 1:
                partial = all_reduce_sum(torch.tensor([loss_sum, float(loss_count)], dtype=torch.float64,
                                                      device=self.device))
                if self.dist.is_main:
                    R.save(self, self.job.checkpoint("last"), epoch=epoch, step_in_epoch=step + 1,
                           partial_loss=(float(partial[0]), int(partial[1])))
                log.warning("Stopped at epoch %d, step %d/%d; %s saved, run the same command again to resume",
                            epoch + 1, step + 1, n, self.job.checkpoint("last").name)
                raise AgreedStop
        return loss_sum, loss_count

    def _flush(self, window, filled, step, epoch, loss_sum, loss_count, bar):
        values = window[:filled].tolist()
        for j, value in enumerate(values):
            if not math.isfinite(value):
                bad_step = step - filled + 1 + j
                raise TrainingError(
                    f"training loss became {value} at epoch {epoch + 1}, step {bad_step + 1}; "
                    f"{self._kept_checkpoint()}. Lower TRAIN.LR, set TRAIN.GRADIENT_CLIP_NORM or TRAIN.AMP 'off', "
                    "or check the input images")
        bar.set_postfix(loss=f"{sum(values) / max(1, filled):.4g}", refresh=False)
        return loss_sum + sum(values), loss_count + filled

    def _kept_checkpoint(self) -> str:
        last = self.job.checkpoint("last")
        return f"the last good checkpoint {last} is kept" if last.exists() else "no checkpoint was saved yet"

    @torch.no_grad()
    def _validate(self, epoch):
        wf, loader = self.wf, self.wf.val_loader
        if loader is None or len(loader.dataset) == 0:  # the same on every rank; a rank's own share may be empty
            return None, {}
        self.model.eval()
        broadcast_buffers(self.model)  # every rank validates the model rank 0 saves
        wf.model = self.eval_model
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        count = 0
        averager = MetricAverager()
        for batch in tqdm(loader, desc="Validation", unit="batch", leave=False, disable=None if self.dist.is_main else True):
            with self._autocast():
                loss, outputs = wf.compute_loss(batch, train=False)
            n = _batch_size(batch)
            total += loss.detach().double() * n
            count += n
            averager.update_many(wf.batch_metrics(batch, outputs) or {})
        totals = all_reduce_sum(torch.stack([total, torch.tensor(float(count), dtype=torch.float64,
                                                                 device=self.device)]))
        averager.all_reduce(self.device)
        val_loss = float(totals[0] / totals[1].clamp_min(1))
        if not math.isfinite(val_loss):
            raise TrainingError(f"validation loss became {val_loss} at epoch {epoch + 1}; {self._kept_checkpoint()}. "
                                "Lower TRAIN.LR or set TRAIN.AMP 'off'")
        return val_loss, averager.result()
