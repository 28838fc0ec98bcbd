"""Loader workers and in-memory images: a worker started by spawn (macOS, Windows) or forkserver (Linux from Python
3.14) maps the dataset's pixels from shared memory, where it had unpickled a whole copy of them (4 workers over a
6 GB training set: 24 GB more); forked workers share them as before; nothing is left in /dev/shm."""
import gc
import logging
import os
import pickle
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as tmp

import biapy.data.datasets as datasets
from biapy.data.datasets import PatchDataset, SharedArrays
from biapy.data.image_writing import write_image
from biapy.data.normalization import Normalizer
from biapy.engine.loaders import make_loader, release_workers, set_epoch
from biapy.job import Job
from tests.conftest import tiny_config
from tests.test_portability import start_spawned_job

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and /dev/shm: Linux")
SHM = Path("/dev/shm")


def _images(tmp_path, shapes, dtype=np.uint16):
    rng = np.random.default_rng(0)
    paths = []
    for i, shape in enumerate(shapes):
        path = tmp_path / f"img_{i}.tif"
        write_image(path, rng.integers(0, 4000, shape).astype(dtype), 2)
        paths.append(path)
    return paths


def _dataset(paths, mode="same", **kw):
    return PatchDataset(paths, paths, 2, (32, 32, 1), Normalizer(), mode, in_memory=True, random_patches=True,
                        patches_per_image=8, **kw)


def _batches(loader, epochs=(0, 1)):
    """Every batch of two epochs (the second: other crops and order, reaching persistent workers)."""
    out = []
    for epoch in epochs:
        set_epoch(loader, epoch)
        out += [[t.clone() for t in batch] for batch in loader]
    release_workers(loader)
    return out


def _unique_mb(pid):
    """The process's unique memory (USS: private pages, clean or dirty), in MB."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[2] == "kB":
            fields[parts[0].rstrip(":")] = int(parts[1])
    return (fields["Private_Clean"] + fields["Private_Dirty"]) / 1024


def _torch_segments():
    return {p.name for p in SHM.glob("torch_*")} if SHM.is_dir() else set()


def _shm_entries():
    """Torch's named segments and multiprocessing's named semaphores (spawned workers' queues)."""
    return _torch_segments() | ({p.name for p in SHM.glob("sem.mp-*")} if SHM.is_dir() else set())


def _worker_loader(ds, context):
    loader = make_loader(ds, 4, shuffle=True, dist=None, num_workers=1, seed=3)
    loader.multiprocessing_context = context
    return loader


def _worker_unique_mb(ds, context):
    """USS of a persistent worker of `ds` after it made a few batches."""
    loader = _worker_loader(ds, context)
    it = iter(loader)
    for _ in range(2):
        next(it)
    try:
        return _unique_mb(it._workers[0].pid)
    finally:
        release_workers(loader)


def test_shared_arrays_keep_every_array_its_dtype_shape_and_values():
    """Arrays of several dtypes packed into one buffer, views of it in place of the originals; other entries kept."""
    rng = np.random.default_rng(1)
    a = rng.integers(0, 255, (5, 7, 1)).astype(np.uint8)
    b = rng.random((3, 4, 2)).astype(np.float32)
    c = rng.integers(-9, 9, (6,)).astype(np.int64)
    lazy = object()
    images, targets = [a, lazy, b], [None, c, None]
    copies = [a.copy(), b.copy(), c.copy()]
    shared = SharedArrays((images, targets))
    assert images[1] is lazy and targets[0] is None and targets[2] is None
    for view, original in zip((images[0], images[2], targets[1]), copies):
        assert view.dtype == original.dtype and view.shape == original.shape
        np.testing.assert_array_equal(view, original)
        assert view.ctypes.data % SharedArrays.ALIGN == 0
        assert np.shares_memory(view, shared.buffer.numpy())
    assert shared.buffer.is_shared()


def test_arrays_of_objects_stay_as_they_are_and_structured_ones_keep_their_fields():
    """Raw shared bytes cannot hold Python objects (numpy refused the view with a TypeError that stopped the
    loader), and a structured dtype rebuilt from its string ('|V5') had lost its fields."""
    objects = np.array([1, "a", None], dtype=object)
    records = np.array([(1, 2.5), (3, 4.5)], dtype=[("a", "u1"), ("b", "<f4")])
    images = [objects, records.copy()]
    shared = SharedArrays((images, [None]))
    assert images[0] is objects
    assert images[1].dtype == records.dtype and images[1]["b"].tolist() == [2.5, 4.5]
    assert np.shares_memory(images[1], shared.buffer.numpy())
    # What still travels by value in a worker's pickle: the object array, not the shared one.
    sent_images, sent_targets = shared.without_shared((images, [None]))
    assert sent_images[0] is objects and sent_images[1] is None and sent_targets == [None]


def _statvfs_with_free(free):
    return lambda path: os.statvfs_result((4096, 4096, free // 4096, free // 4096, free // 4096, 0, 0, 0, 0, 255))


def test_a_small_dataset_is_shared_in_dockers_64_mb_dev_shm(tmp_path, monkeypatch, caplog):
    """The spare kept for batches (256 MB) exceeded all of Docker's default /dev/shm: every spawn or forkserver
    job in a container warned that '0.0 GB of in-memory images do not fit' and gave each worker a copy."""
    ds = _dataset(_images(tmp_path, [(40, 50, 1)]))
    monkeypatch.setattr(datasets, "being_sent_to_new_process", lambda: True)
    monkeypatch.setattr(datasets, "SHM_DIR", str(tmp_path))
    monkeypatch.setattr(datasets.os, "statvfs", _statvfs_with_free(64 * 2 ** 20))
    with caplog.at_level(logging.WARNING, logger="biapy.data.datasets"):
        state = ds.__getstate__()
    assert caplog.text == ""
    assert isinstance(state["_shared"], SharedArrays) and state["_images"] == [None]
    assert datasets._shm_room(30 * 2 ** 20) and not datasets._shm_room(40 * 2 ** 20)  # half kept for batches
    monkeypatch.setattr(datasets.os, "statvfs", _statvfs_with_free(2 ** 40))
    assert datasets._shm_room(2 ** 40 - datasets.SHM_SPARE) and not datasets._shm_room(2 ** 40 - datasets.SHM_SPARE + 1)


@linux_only
def test_spawned_workers_make_the_same_batches_and_map_the_pixels_instead_of_copying_them(tmp_path):
    big = _dataset(_images(tmp_path, [(2048, 2048, 1)] * 16))  # 128 MB of uint16 pixels
    nbytes = sum(a.nbytes for a in big._images)
    assert nbytes >= 128 * 2 ** 20
    in_process = _batches(make_loader(big, 4, shuffle=True, dist=None, num_workers=0, seed=3))
    spawned = _batches(_worker_loader(big, "spawn"))
    assert len(spawned) == len(in_process) > 0
    assert all(torch.equal(x, y) for bs, bp in zip(spawned, in_process) for x, y in zip(bs, bp))
    tiny = _dataset(_images(tmp_path / "tiny", [(64, 64, 1)]))
    extra = _worker_unique_mb(big, "spawn") - _worker_unique_mb(tiny, "spawn")
    # A worker's own copy of the pixels had made it 128 MB larger than the tiny dataset's worker.
    assert extra < 0.4 * nbytes / 2 ** 20, f"a spawned worker holds {extra:.0f} MB more for {nbytes >> 20} MB of pixels"
    np.testing.assert_array_equal(big.image(0), big._images[0])  # numpy arrays in the main process still


@linux_only
def test_forked_workers_make_the_same_batches_without_a_shared_copy(tmp_path):
    ds = _dataset(_images(tmp_path, [(96, 80, 1), (70, 90, 1)]), mode="image")
    originals = [a for a in ds._images]
    in_process = _batches(make_loader(ds, 4, shuffle=True, dist=None, num_workers=0, seed=3))
    forked = _batches(_worker_loader(ds, "fork"))
    assert len(forked) == len(in_process) > 0
    assert all(torch.equal(x, y) for bf, bp in zip(forked, in_process) for x, y in zip(bf, bp))
    assert ds._shared is None and all(a is b for a, b in zip(ds._images, originals))  # nothing was copied


def test_a_plain_pickle_carries_the_pixels_themselves(tmp_path):
    ds = _dataset(_images(tmp_path, [(40, 50, 1)]), mode="image")
    copy = pickle.loads(pickle.dumps(ds))
    assert ds._shared is None and copy._shared is None
    np.testing.assert_array_equal(copy.image(0), ds.image(0))
    assert torch.equal(copy[3][0], ds[3][0])


def test_without_room_in_shared_memory_workers_get_a_copy_and_a_warning(tmp_path, monkeypatch, caplog):
    """A container's 64 MB /dev/shm: writing a larger buffer there would end the job with SIGBUS."""
    ds = _dataset(_images(tmp_path, [(40, 50, 1)]))
    monkeypatch.setattr(datasets, "being_sent_to_new_process", lambda: True)
    monkeypatch.setattr(datasets, "_shm_room", lambda nbytes: False)
    with caplog.at_level(logging.WARNING, logger="biapy.data.datasets"):
        state = ds.__getstate__()
    assert state["_shared"] is None and state["_images"][0] is ds._images[0]
    assert "0 MB of in-memory images do not fit the free space of /dev/shm (" in caplog.text
    assert "MB free" in caplog.text and "--shm-size" in caplog.text
    caplog.clear()
    ds.__getstate__()  # the next worker: the same copy, no second warning
    assert caplog.text == ""


# Before torch 2.14 a worker's Process object kept the dataset until the worker exited, so the worker never let go
# of a 'file_system' segment and its manager removed it when the job ended, not once the loader was gone.
_WORKERS_KEEP_THE_DATASET = pytest.mark.xfail(torch.__version__ < (2, 14),
                                              reason="torch < 2.14: removed when the job ends, not before")


@linux_only
@pytest.mark.parametrize("strategy", ["file_descriptor", pytest.param("file_system", marks=_WORKERS_KEEP_THE_DATASET)])
def test_nothing_is_left_in_dev_shm_once_loader_and_dataset_are_gone(strategy, tmp_path):
    """Torch's default Linux strategy unlinks its segment at once; 'file_system' (macOS's) names one, which its
    manager removes once the last process lets go of it."""
    before = _torch_segments()
    previous = tmp.get_sharing_strategy()
    tmp.set_sharing_strategy(strategy)
    try:
        ds = _dataset(_images(tmp_path, [(64, 64, 1)]))
        loader = _worker_loader(ds, "spawn")
        it = iter(loader)
        next(it)
        named = _torch_segments() - before
        assert ds._shared is not None
        assert bool(named) is (strategy == "file_system")  # the check below sees such segments
        release_workers(loader)
        del it, loader, ds
        gc.collect()
        end = time.monotonic() + 10
        while _torch_segments() - before and time.monotonic() < end:
            time.sleep(0.05)
    finally:
        tmp.set_sharing_strategy(previous)
    assert not _torch_segments() - before


@linux_only
@pytest.mark.parametrize("how", ["ends", "killed"])
def test_a_spawned_job_leaves_nothing_in_dev_shm(how, data2d, tmp_path):
    """Named segments (the 'file_system' strategy) too: a job that ends, or whose main process the system's
    out-of-memory killer ends with SIGKILL (its workers and the segments' manager then follow). Python's own named
    semaphores of spawned workers' queues are checked as well; a SIGKILL to every process of the job, the
    resource tracker included, would leave those behind whatever the job does."""
    cfg = tiny_config(data2d, 2, TRAIN={"EPOCHS": 1 if how == "ends" else 50}, TEST={"ENABLE": False},
                      SYSTEM={"NUM_CPUS": 1, "NUM_WORKERS": 1}, LOG={"CHART_CREATION_FREQ": 100})
    before = _shm_entries()
    proc = start_spawned_job(tmp_path, cfg, "shm", sharing="file_system")
    try:
        if how == "killed":
            from tests.test_interrupt import _wait_for
            _wait_for(Job(tmp_path / "out", "shm", 1).checkpoint("last").exists, proc, timeout=120)
            assert _torch_segments() - before  # the workers map the images from a named segment
            os.kill(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == (0 if how == "ends" else -signal.SIGKILL), out[-3000:]
    end = time.monotonic() + 30  # orphaned workers notice their parent is gone within 5 s
    while _shm_entries() - before and time.monotonic() < end:
        time.sleep(0.1)
    assert not _shm_entries() - before
