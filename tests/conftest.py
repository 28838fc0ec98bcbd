"""Shared fixtures: small synthetic image folders, tiny-model config overrides, configs loaded and checked, one
torch thread for the tiny-model tests, and the good run the bad-input tests run beside (`world`, `intact`; its
helpers are in tests/bad_input_world.py)."""
import logging
import os

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")

from biapy.config import check_config, load_config  # noqa: E402
from biapy.data.image_writing import write_image  # noqa: E402
from biapy.data.synthetic import nuclei_image  # noqa: E402
from biapy.job import Job  # noqa: E402

SHAPES = {
    2: dict(train=[(48, 56), (52, 48), (48, 48), (60, 50)], test=[(50, 45), (47, 61)]),
    3: dict(train=[(12, 40, 40), (13, 36, 44), (12, 40, 36)], test=[(13, 37, 35)]),
}


@pytest.fixture(autouse=True)
def _biapy_logs_reach_caplog(monkeypatch):
    """A CLI run in an earlier test turns propagation off (its own handler); caplog needs it on."""
    monkeypatch.setattr(logging.getLogger("biapy"), "propagate", True)


def _make_folder(root, ndim, split, shapes, seed, channels=1):
    x_dir, y_dir = root / split / "x", root / split / "y"
    for i, shape in enumerate(shapes):
        image, labels = nuclei_image(shape, n_nuclei=max(3, shape[-1] // 8), radius=(3, 6),
                                     channels=channels, seed=seed + i)
        write_image(x_dir / f"img_{i:02d}.tif", image, ndim)
        write_image(y_dir / f"img_{i:02d}.tif", labels[..., None], ndim)
    return x_dir, y_dir


def make_dataset(root, ndim, channels=1):
    """{'train': (x_dir, y_dir), 'test': (x_dir, y_dir)} of small synthetic nuclei images."""
    return {split: _make_folder(root, ndim, split, SHAPES[ndim][split], seed=100 * k, channels=channels)
            for k, split in enumerate(("train", "test"))}


@pytest.fixture(scope="session")
def data2d(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data2d"), 2)


@pytest.fixture(scope="session")
def data3d(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data3d"), 3)


def tiny_config(data, ndim, **sections):
    """Overrides for a fast run: tiny U-Net, small patches, 2 epochs, on `data` folders."""
    patch = (32, 32, 1) if ndim == 2 else (8, 16, 16, 1)
    cfg = {
        "PROBLEM": {"NDIM": f"{ndim}D"},
        "SYSTEM": {"NUM_WORKERS": 0, "SEED": 0},
        "DATA": {"PATCH_SIZE": patch,
                 "TRAIN": {"PATH": str(data["train"][0])},
                 "VAL": {"SPLIT_TRAIN": 0.25},
                 "TEST": {"PATH": str(data["test"][0])}},
        "MODEL": {"ARCHITECTURE": "unet", "FEATURE_MAPS": [4, 8, 16], "DROPOUT_VALUES": [0.0, 0.0, 0.0],
                  "Z_DOWN": [1, 2] if ndim == 3 else [0, 0, 0, 0]},
        "TRAIN": {"EPOCHS": 2, "BATCH_SIZE": 2, "LR": 1e-3},
        "LOG": {"CHART_CREATION_FREQ": 1},
    }
    if ndim == 2:
        cfg["MODEL"].pop("Z_DOWN")
    for section, values in sections.items():
        merged = cfg.setdefault(section, {})
        for key, value in values.items():
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key].update(value)
            else:
                merged[key] = value
    return cfg


@pytest.fixture
def config_folders(tmp_path):
    """Empty train and test folders: the path checks pass, nothing reads them."""
    train, test = tmp_path / "train", tmp_path / "test"
    train.mkdir()
    test.mkdir()
    return train, test


def checked(overrides, folders=None):
    """The config of `overrides`, loaded and checked; its paths too when `folders` (config_folders) is given."""
    cfg = load_config(overrides)
    check_config(cfg, check_paths=folders is not None)
    return cfg


@pytest.fixture
def one_thread():
    """Tiny tensors run fastest on one thread (and do not fight other test processes for cores)."""
    import torch  # late: the tests that do not ask for this fixture need not import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """One good tiny run per test module, every file it wrote hashed: the bad cases run beside it."""
    from tests.bad_input_world import GOOD, World, hashes  # late: that module imports this one's helpers

    w = World(tmp_path_factory.mktemp("robust"))
    assert w.run(w.cfg(TEST={"ENABLE": True}), GOOD, run_id=1) == 0
    w.good_job = Job(w.out, GOOD, 1)
    assert w.good_job.checkpoint("last").is_file() and any(w.good_job.per_image.iterdir())
    w.hashes = hashes(w.out)
    return w


@pytest.fixture
def intact(world):
    """After the test: every file of the good run is still there, byte-identical."""
    from tests.bad_input_world import hashes

    yield
    now = hashes(world.out)
    changed = [k for k, v in world.hashes.items() if now.get(k) != v]
    assert not changed, f"the earlier run's files changed: {changed}"
