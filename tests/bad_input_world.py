"""What the bad-input tests (test_bad_input.py, test_bad_checkpoints.py, test_failures_while_running.py) share:
`World`, a folder of good data where one good tiny run is made and bad cases run beside it; `hashes` of the
files a run wrote; `one_error_line`, the check that stderr is one `ERROR:` line naming the culprit and no
traceback; and the spoiled copies and configs more than one of those files builds (`spoil_first`,
`one_nan_pixel`, `seg_cfg`, `from_checkpoint`).

The fixtures `world` (the good run, once per test module) and `intact` (its files unchanged after a test) are
in conftest.py.
"""
import hashlib
import shutil
from pathlib import Path

import numpy as np
import yaml

from biapy.cli import main
from biapy.config.load import plain_tree
from biapy.data.image_writing import write_image
from biapy.data.io import read_image
from tests.conftest import make_dataset, tiny_config

GOOD = "good"


def hashes(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


class World:
    """The shared good run and helpers to run bad cases beside it."""

    def __init__(self, root):
        self.root = root
        self.data = make_dataset(root / "data", 2)
        self.out = root / "out"
        self.cfgs = root / "cfgs"
        self.cfgs.mkdir()
        self.next_id = 100

    def cfg(self, **sections):
        sections.setdefault("TRAIN", {"EPOCHS": 1})
        sections.setdefault("SYSTEM", {"NUM_CPUS": 1})  # tiny models: a second thread only waits
        return tiny_config(self.data, 2, **sections)

    def write_cfg(self, cfg, stem):
        path = self.cfgs / f"{stem}.yaml"
        path.write_text(yaml.safe_dump(plain_tree(cfg)))
        return path

    def run(self, cfg, stem, name=GOOD, run_id="new", extra=(), result_dir=None):
        """main([...]) of the config; run_id 'new' = a fresh ID of job NAME."""
        path = cfg if isinstance(cfg, Path) else self.write_cfg(cfg, stem)
        if run_id == "new":
            self.next_id += 1
            run_id = self.next_id
        argv = ["--config", str(path), "--result_dir", str(result_dir or self.out), "--name", name]
        if run_id is not None:
            argv += ["--run_id", str(run_id)]
        return main(argv + list(extra))

    def bad_folder(self, stem, split="train"):
        """A copy of the good image (and label) folders to spoil."""
        dst = self.root / "bad" / stem
        for src, sub in zip(self.data[split], ("x", "y")):
            shutil.copytree(src, dst / sub)
        return dst / "x", dst / "y"


def one_error_line(capsys, *culprits):
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("ERROR:"), err  # nothing else on stderr (the log is on stdout)
    for culprit in culprits:
        assert str(culprit) in lines[0], (culprit, lines[0])
    print(lines[0])  # shown by `pytest -rP`: the messages quoted in the README table
    return lines[0]


def spoil_first(world, stem, spoil):
    x, y = world.bad_folder(stem)
    victim = sorted(x.iterdir())[1]
    spoil(victim)
    return x, y, victim


def one_nan_pixel(p):
    img = read_image(p, 2).astype(np.float32)
    img[3, 4, 0] = np.nan
    write_image(p, img, 2)


def seg_cfg(world, x, y):
    return world.cfg(PROBLEM={"TYPE": "SEMANTIC_SEG"}, MODEL={"N_CLASSES": 2},
                     DATA={"TRAIN": {"PATH": str(x), "GT_PATH": str(y)},
                           "TEST": {"PATH": str(world.data["test"][0]), "GT_PATH": str(world.data["test"][1])}})


def from_checkpoint(world, ckpt, **sections):
    sections.setdefault("TRAIN", {"ENABLE": False})
    cfg = world.cfg(**sections)
    cfg["MODEL"]["LOAD_CHECKPOINT"] = True
    cfg["PATHS"] = {"CHECKPOINT_FILE": str(ckpt)}
    return cfg
