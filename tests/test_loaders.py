"""DataLoaders: pinned memory, worker processes and stop signals, validation shards over the ranks."""
import signal

import pytest
import torch

from biapy.engine.distributed import DistInfo
from biapy.engine.loaders import make_loader, release_workers
from tests.fake_workflow import EpochData

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


def test_pinned_memory_only_when_asked_and_on_a_gpu(data2d, tmp_path, monkeypatch):
    import biapy.workflows.base as base
    from biapy import BiaPy
    from tests.conftest import tiny_config

    assert make_loader(EpochData(4), 2, False, None, pin_memory=True).pin_memory
    assert not make_loader(EpochData(4), 2, False, None).pin_memory
    asked = []
    real = base.make_loader
    monkeypatch.setattr(base, "make_loader", lambda *a, **k: asked.append(k["pin_memory"]) or real(*a, **k))
    cfg = tiny_config(data2d, 2, SYSTEM={"PIN_MEM": True}, TRAIN={"EPOCHS": 1}, TEST={"ENABLE": False})
    BiaPy(cfg, result_dir=tmp_path, name="p", run_id=1).run_job()
    assert asked == [False, False]  # PIN_MEM on, but this job runs on the CPU: nothing to pin for


class SignalDisposition(torch.utils.data.Dataset):
    """Each item: whether SIGINT and SIGTERM are ignored in the process that made it."""

    def __len__(self):
        return 2

    def __getitem__(self, i):
        return torch.tensor([signal.getsignal(s) == signal.SIG_IGN for s in (signal.SIGINT, signal.SIGTERM)])


@pytest.mark.parametrize("stop_handler", [True, False])
def test_loader_workers_leave_stop_signals_to_the_trainer(stop_handler):
    """Workers forked under the trainer's stop handler ignore SIGINT and SIGTERM: each had reported a terminal's
    Ctrl-C again, and a SIGTERM sent to the whole job ended them and made torch raise in the main process.
    Forked without it, a worker keeps torch's SIGTERM handling."""
    signals = (signal.SIGINT, signal.SIGTERM) if stop_handler else ()
    previous = {s: signal.signal(s, lambda *a: None) for s in signals}
    try:
        loader = make_loader(SignalDisposition(), 2, False, DistInfo(), num_workers=1)
        batch = next(iter(loader))
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    release_workers(loader)
    assert loader._iterator is None
    assert batch.tolist() == [[True, stop_handler]] * 2


def test_releasing_workers_lets_an_interrupt_through(monkeypatch):
    """A Ctrl-C while the workers are shut down at the end of training: the iterator's __del__, which did the
    shutting down, swallowed it, and the run went on to its test phase and exited 0."""
    loader = make_loader(SignalDisposition(), 2, False, DistInfo(), num_workers=1)
    next(iter(loader))
    iterator = loader._iterator
    shutdown = iterator._shutdown_workers

    def interrupted():
        shutdown()
        raise KeyboardInterrupt

    monkeypatch.setattr(iterator, "_shutdown_workers", interrupted)
    try:
        with pytest.raises(KeyboardInterrupt):
            release_workers(loader)
        assert loader._iterator is None
    finally:
        monkeypatch.undo()  # before the iterator's __del__ runs again


@pytest.mark.parametrize("n", [9, 1])
def test_validation_shards_hold_every_sample_once_over_the_ranks(n):
    """DistributedSampler evens the shards by repeating samples (9 over 2 ranks: sample 0 twice), which the
    validation loss and metrics, summed over ranks, then counted twice. Training keeps its even shards."""
    from types import SimpleNamespace

    shards = [list(make_loader(EpochData(n), 2, False, SimpleNamespace(enabled=True, world_size=2, rank=r)).sampler)
              for r in range(2)]
    assert sorted(shards[0] + shards[1]) == list(range(n))
    train = make_loader(EpochData(9), 2, True, SimpleNamespace(enabled=True, world_size=2, rank=0), drop_last=True)
    assert len(train.sampler) == 4
