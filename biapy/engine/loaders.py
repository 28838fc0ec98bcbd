"""DataLoaders whose sample order is a function of (seed, epoch) only, so a resumed run sees the same data.

The trainer calls `start_epoch(loader, epoch)` before each epoch's batches are drawn: `set_epoch` forwards the
epoch to the sampler (shuffle order) and to the dataset (fresh random crops per epoch). With worker
processes it does so as soon as the previous epoch's training ends, so they make the first batches while
that epoch validates.
"""
import random
import signal

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler


class EpochSampler(Sampler):
    """Single-process sampler: a permutation seeded by (seed, epoch) when shuffling, else 0..n-1."""

    def __init__(self, length: int, shuffle: bool, seed: int = 0):
        self.length, self.shuffle, self.seed, self.epoch = length, shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.length))
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.length, generator=gen).tolist())

    def __len__(self):
        return self.length


class _WorkerInit:
    """worker_init_fn: numpy and random in each worker follow torch's per-worker seed (itself from the loader's
    generator).

    Stopping is the main process's job: a terminal's Ctrl-C reaches every process of the job, and each
    worker reported it again. A SIGTERM sent to the whole job (Slurm at its time limit, `kill -- -PGID`)
    ended the workers under torch's own handler, and torch then raised in the main process mid-step
    instead of the trainer's saving stop. While the main process handles SIGTERM, workers ignore both; the
    trainer ends them itself when it is done (`release_workers`)."""

    def __init__(self, stop_handled=None):
        self.stop_handled = stop_handled  # None: this process's own handler tells (a forked worker inherits it)

    def __reduce__(self):
        # Pickled in the main process as a worker starts (spawn, forkserver): such a worker starts with default
        # handlers, and had been ended by a SIGTERM to the job where a forked one saw the handler and ignored it.
        return _WorkerInit, (callable(signal.getsignal(signal.SIGTERM)),)

    def __call__(self, worker_id):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        handled = self.stop_handled
        if handled is None:
            handled = callable(signal.getsignal(signal.SIGTERM))
        if handled:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        seed = torch.initial_seed() % 2 ** 32
        np.random.seed(seed)
        random.seed(seed)


class ShardSampler(Sampler):
    """Indices rank, rank + world, ... of n: every sample once over all ranks, shards one apart in size (one
    may be empty). For validation, whose sums are added over ranks: DistributedSampler evens the shards by
    repeating samples, which then counted twice in the validation loss and metrics."""

    def __init__(self, n, rank, world):
        self.indices = range(rank, n, world)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def make_loader(dataset, batch_size, shuffle, dist, num_workers=0, seed=0, drop_last=False, pin_memory=False):
    """A DataLoader for `dataset`: across ranks a DistributedSampler (training: shuffled, even shards) or a
    `ShardSampler` (in order, no sample twice), else a seeded `EpochSampler`.

    Persistent workers when num_workers > 0; pinned memory when asked (SYSTEM.PIN_MEM, on a GPU). Workers started
    by spawn or forkserver map a `PatchDataset`'s in-memory pixels from shared memory rather than copy them.
    """
    if dist is not None and dist.enabled and (shuffle or drop_last):
        sampler = DistributedSampler(dataset, num_replicas=dist.world_size, rank=dist.rank, shuffle=shuffle,
                                     seed=seed, drop_last=drop_last)
    elif dist is not None and dist.enabled:
        sampler = ShardSampler(len(dataset), dist.rank, dist.world_size)
    else:
        sampler = EpochSampler(len(dataset), shuffle, seed)
    workers = max(0, int(num_workers))
    rank = dist.rank if dist is not None else 0
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last, num_workers=workers,
        pin_memory=bool(pin_memory), persistent_workers=workers > 0,
        worker_init_fn=_WorkerInit() if workers > 0 else None,
        generator=torch.Generator().manual_seed(int(seed) + 7919 * rank),  # base worker seeds; keeps global RNG untouched
        prefetch_factor=2 if workers > 0 else None,
    )


def set_epoch(loader, epoch: int) -> None:
    """Tell the loader's sampler and dataset which epoch starts (order and random crops depend on it)."""
    if loader is None:
        return
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    dataset = getattr(loader, "dataset", None)
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)


def release_workers(loader) -> None:
    """End a loader's persistent worker processes now (the next epoch would start new ones): they ignore the
    SIGTERM that the interpreter's exit would otherwise end them with."""
    iterator = getattr(loader, "_iterator", None) if isinstance(loader, DataLoader) else None
    if iterator is None:
        return
    loader._iterator = None
    # Shut down here rather than in the iterator's __del__, which would swallow a Ctrl-C arriving meanwhile.
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


def start_epoch(loader, epoch: int):
    """`set_epoch`, then the epoch's batch iterator; worker processes start preparing its first batches now."""
    set_epoch(loader, epoch)
    return iter(loader)
