"""Process-group set-up for torchrun (env://) and the few collectives the engine needs.

Everything also works in a single process: `DistInfo.enabled` is False and collectives are no-ops.
"""
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as tdist

from biapy.config.derived import env_process_count
from biapy.errors import ConfigError

log = logging.getLogger(__name__)

# How long a rank waits for the others in a collective. Ranks legitimately wait long: while rank 0 alone builds
# the degraded copies, or while one rank predicts a large test volume. torch's default (30 min for gloo, 10 for
# NCCL) had stopped such jobs with a traceback. A rank that dies is seen by torchrun at once, not by this.
COLLECTIVE_TIMEOUT = timedelta(hours=48)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    is_main: bool = True
    enabled: bool = False


def is_initialized() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def init_distributed(backend="gloo") -> DistInfo:
    """Join the process group of torchrun (env:// variables) when WORLD_SIZE > 1; else a single-process info."""
    world_size = env_process_count("WORLD_SIZE") or 1  # parsed as cores_per_process parses it
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if world_size <= 1:
        return DistInfo()
    if backend == "nccl" and not torch.cuda.is_available():
        raise ConfigError("--dist_backend nccl: NCCL needs GPUs and none is visible here; expected gloo (the default "
                          "without --gpu)")
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if missing:
        raise ConfigError(f"WORLD_SIZE={world_size} is set but {' and '.join(missing)} not: start the processes with "
                          "python -m torch.distributed.run --nproc_per_node=K main.py ... (it sets them), or unset "
                          "WORLD_SIZE for one process")
    if not is_initialized():
        tdist.init_process_group(backend=backend, init_method="env://", world_size=world_size, rank=rank,
                                 timeout=COLLECTIVE_TIMEOUT)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, is_main=rank == 0, enabled=True)


def barrier() -> None:
    if is_initialized():
        tdist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (returned for chaining); no-op in a single process."""
    if is_initialized():
        tdist.all_reduce(tensor, op=tdist.ReduceOp.SUM)
    return tensor


def broadcast_buffers(model, src=0) -> None:
    """Rank `src`'s buffers (batch-norm running statistics) on every rank; no-op in a single process. DDP sends
    them at the start of each training forward pass only, so after an epoch's last step every rank holds the
    statistics of its own last batches, and each validated another model than the one rank 0 saves."""
    if is_initialized():
        for b in model.buffers():
            tdist.broadcast(b, src)


def broadcast_object(value, src=0):
    """Rank `src`'s value on every rank."""
    if not is_initialized():
        return value
    box = [value]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


def cleanup(wait=True) -> None:
    """Wait for every rank, then leave the process group (safe to call when none exists).

    `wait=False` after a failure: this rank exits at once, so the others (blocked in a collective) see it
    gone and torchrun stops them; a barrier here would hang against their collective until the timeout."""
    if not wait or not is_initialized():
        return
    try:
        tdist.barrier()
    except Exception as err:  # a peer already died; still release our side
        log.debug("barrier at cleanup failed: %s", err)
    tdist.destroy_process_group()


@contextmanager
def main_first(dist: DistInfo):
    """Rank 0 runs the block first (e.g. builds a cache), the others wait and then run it (reusing it)."""
    if dist is None or not dist.enabled:
        yield
        return
    if not dist.is_main:
        barrier()
        yield
        return
    try:
        yield
    finally:
        barrier()  # release the others even when rank 0 fails, so they fail too instead of hanging
