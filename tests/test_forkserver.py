"""Forkserver, Linux's default start method from Python 3.14: loader workers get their dataset pickled, its
in-memory pixels mapped from shared memory (`SharedArrays`); a job must train, validate and test as under fork."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from biapy.config.load import plain_tree
from biapy.data.datasets import PatchDataset, SharedArrays
from biapy.data.image_writing import write_image
from biapy.data.lazy_images import LazyTiff
from biapy.data.normalization import Normalizer
from biapy.data.splits import Band
from biapy.engine.loaders import make_loader
from biapy.job import Job
from tests.conftest import tiny_config
from tests.test_worker_memory import _batches, _worker_loader

ROOT = Path(__file__).parents[1]
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="forkserver: Linux")

_LAUNCHER = """import sys
import torch.multiprocessing as mp
if __name__ == "__main__":
    mp.set_start_method(sys.argv.pop(1), force=True)
    from biapy.cli import exit_fast, main
    exit_fast(main())
"""


def _same(a, b):
    return len(a) == len(b) > 0 and all(torch.equal(x, y) for ba, bb in zip(a, b) for x, y in zip(ba, bb))


def _in_process(ds):
    return _batches(make_loader(ds, 4, shuffle=True, dist=None, num_workers=0, seed=3))


@linux_only
def test_forkserver_workers_see_labels_bands_and_mixed_lazy_images_as_the_main_process_does(tmp_path):
    rng = np.random.default_rng(0)
    u8 = write_image(tmp_path / "u8.tif", rng.integers(0, 255, (60, 50, 1)).astype(np.uint8), 2)
    u16 = write_image(tmp_path / "u16.tif", rng.integers(0, 4000, (50, 64, 1)).astype(np.uint16), 2)
    labels = write_image(tmp_path / "lab.tif", rng.integers(0, 3, (60, 50, 1)).astype(np.uint8), 2)
    labels2 = write_image(tmp_path / "lab2.tif", rng.integers(0, 3, (50, 64, 1)).astype(np.uint8), 2)
    png = write_image(tmp_path / "p.png", rng.integers(0, 255, (40, 44, 1)).astype(np.uint8), 2)
    segmentation = PatchDataset([u8, u16], [labels, labels2], 2, (32, 32, 1), Normalizer(), "label",
                                patches_per_image=6, regions=[Band(0, 0, 40), None])
    reference = _in_process(segmentation)
    assert _same(_batches(_worker_loader(segmentation, "forkserver")), reference)
    shared = segmentation._shared
    assert isinstance(shared, SharedArrays) and shared.nbytes >= 2 * (40 * 50 + 50 * 64)  # inputs and labels
    # A second loader over the same dataset (validation again, a resumed run's new loader) maps the same buffer.
    assert _same(_batches(_worker_loader(segmentation, "forkserver")), reference)
    assert segmentation._shared is shared
    # IN_MEMORY False: the TIFF stays lazy (pickled as its reader), the PNG read whole is shared.
    mixed = PatchDataset([u16, png], None, 2, (32, 32, 1), Normalizer(), "same", in_memory=False,
                         patches_per_image=4)
    assert isinstance(mixed._images[0], LazyTiff) and isinstance(mixed._images[1], np.ndarray)
    assert _same(_batches(_worker_loader(mixed, "forkserver")), _in_process(mixed))
    assert mixed._shared.layouts == [[None, (np.dtype(np.uint8), (40, 44, 1), 0)], [None, None]]


def _run(tmp_path, cfg, method):
    """Job `method` (run 1) of `cfg` with its loader workers started by `method`. -> CompletedProcess."""
    config = tmp_path / f"{method}.yaml"
    config.write_text(yaml.safe_dump(plain_tree(cfg)))
    script = tmp_path / "launch.py"
    script.write_text(_LAUNCHER)
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, str(script), method, "--config", str(config), "--result_dir",
                           str(tmp_path / "out"), "--name", method, "--run_id", "1"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def _results(tmp_path, method):
    """The test metrics and the per-epoch losses (not their durations) of job `method`."""
    job = Job(tmp_path / "out", method, 1)
    epochs = next(job.train_logs.glob("*.jsonl")).read_text().splitlines()
    losses = [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in epochs]
    return job.metrics_csv.read_text(), losses


@linux_only
def test_a_forkserver_job_trains_validates_and_tests_as_a_forked_one(data2d, tmp_path):
    cfg = tiny_config(data2d, 2, TRAIN={"EPOCHS": 1}, SYSTEM={"NUM_CPUS": 2, "NUM_WORKERS": 1},
                      LOG={"CHART_CREATION_FREQ": 100})
    for method in ("fork", "forkserver"):
        done = _run(tmp_path, cfg, method)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "leaked" not in done.stderr, done.stderr[-3000:]  # semaphores or shared memory at exit
    forked, served = _results(tmp_path, "fork"), _results(tmp_path, "forkserver")
    assert served[1] and served[1][0]["train_loss"] > 0
    assert served == forked
