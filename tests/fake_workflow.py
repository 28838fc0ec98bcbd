"""A tiny model, noise data and a minimal workflow that follows the hooks: what the trainer, resume and loader
tests run."""
import os
import signal

import numpy as np
import torch
from torch import nn

from biapy.config.defaults import get_defaults
from biapy.engine.distributed import DistInfo
from biapy.engine.loaders import make_loader
from biapy.job import Job


class TinyNet(nn.Module):
    def __init__(self, out=1):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.3))
        self.head = nn.Conv2d(4, out, 1)

    def forward(self, x):
        return self.head(self.encoder(x))


class EpochData(torch.utils.data.Dataset):
    """Fresh noise per (seed, epoch, index), like PatchDataset's random crops."""

    def __init__(self, n=12, seed=0):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(self.seed * 10_000 + self.epoch * 100 + i)
        x = torch.rand(1, 8, 8, generator=g)
        return x, x.flip(-1) * 0.5


class SharedEpochData(EpochData):
    """EpochData whose epoch reaches persistent worker processes (shared memory, as PatchDataset's)."""

    def __init__(self, n=12, seed=0):
        super().__init__(n, seed)
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch):
        self._epoch[0] = epoch

    @property
    def epoch(self):
        return int(self._epoch[0])

    @epoch.setter
    def epoch(self, value):
        pass  # EpochData.__init__ sets it; the shared tensor is the one copy


class FakeWorkflow:
    def __init__(self, cfg, tmp_path, n=12, model=None, stop_at_epoch=None, val_losses=None, nan_at=None,
                 sigint_at=None, workers=0):
        self.cfg, self.job, self.dist, self.device = cfg, Job(tmp_path, "job", 1), DistInfo(), torch.device("cpu")
        torch.manual_seed(cfg.SYSTEM.SEED)
        self.model = model or TinyNet()
        data = SharedEpochData(n) if workers else EpochData(n)
        self.train_loader = make_loader(data, cfg.TRAIN.BATCH_SIZE, True, self.dist, workers, cfg.SYSTEM.SEED, True)
        self.val_loader = make_loader(EpochData(4, seed=9), 2, False, self.dist, 0, cfg.SYSTEM.SEED, False)
        self.stop_at_epoch, self.val_losses, self.nan_at, self.sigint_at = stop_at_epoch, val_losses, nan_at, sigint_at
        self.epoch_calls, self.steps, self.epoch = [], 0, 0

    def compute_loss(self, batch, train):
        x, y = batch
        pred = self.model(x)
        loss = nn.functional.mse_loss(pred, y.expand_as(pred))
        if train:
            self.steps += 1
            if self.nan_at is not None and self.steps == self.nan_at:
                loss = loss * float("nan")
            if self.sigint_at is not None and self.steps == self.sigint_at:
                os.kill(os.getpid(), signal.SIGINT)
        elif self.val_losses is not None:
            loss = loss * 0 + self.val_losses[len(self.epoch_calls)]
        return loss, (pred, y)

    def batch_metrics(self, batch, outputs):
        pred, y = outputs
        return {"mae": (float((pred - y).abs().mean()) * len(y), len(y))}

    def on_epoch_end(self, epoch, tb, final=False):
        self.epoch_calls.append((epoch, final))
        if tb is not None and final:
            volume = np.random.default_rng(0).random((4, 8, 8, 1))
            tb.add_images("reconstruction/x", [volume, volume * 2], epoch, ndim=3)
        if self.stop_at_epoch is not None and epoch == self.stop_at_epoch and not final:
            raise KeyboardInterrupt

    def checkpoint_extras(self):
        return {"normalization": {"type": "zero_mean_unit_variance"}}


def make_cfg(**train):
    cfg = get_defaults()
    cfg.TRAIN.EPOCHS = 4
    cfg.TRAIN.BATCH_SIZE = 3
    cfg.TRAIN.LR = 1e-2
    cfg.TRAIN.METRICS = ["mae"]
    cfg.LOG.CHART_CREATION_FREQ = 100  # charts only at the end (matplotlib is the slow part)
    for key, value in train.items():  # "KEY" -> TRAIN.KEY; "SECTION.KEY" from the root when SECTION is one
        parts = key.split(".")
        node = cfg if parts[0] in cfg else cfg.TRAIN
        for part in parts[:-1]:
            node = node[part]
        setattr(node, parts[-1], value)
    return cfg


def weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
