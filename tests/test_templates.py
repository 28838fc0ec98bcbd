"""Every template loads, passes the checks on the example data, and its model runs on one patch."""
from pathlib import Path

import pytest
import torch

from biapy.config import check_config, load_config
from biapy.models import build_model

ROOT = Path(__file__).parents[1]
TEMPLATES = sorted((ROOT / "templates").rglob("*.yaml"))


def test_there_is_a_template_per_use():
    names = {p.relative_to(ROOT / "templates").as_posix() for p in TEMPLATES}
    assert {"self-supervised/2d_self-supervised.yaml", "self-supervised/3d_self-supervised.yaml",
            "self-supervised/2d_masking_mae.yaml", "self-supervised/3d_masking_mae.yaml",
            "self-supervised/2d_masking_unet.yaml", "self-supervised/3d_masking_unet.yaml",
            "semantic_segmentation/2d_finetune_from_ssl.yaml",
            "semantic_segmentation/3d_finetune_from_ssl.yaml"} <= names


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda p: p.name)
def test_template_checks_and_its_model_runs(template, monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)  # template data paths are relative to the repository root
    cfg = load_config(template)
    if cfg.MODEL.LOAD_CHECKPOINT and not Path(cfg.PATHS.CHECKPOINT_FILE).is_file():
        # A fine-tuning template names the demo's checkpoint, made by running the demo (the end-to-end tests
        # do); the checks only need a file there.
        assert cfg.PATHS.CHECKPOINT_FILE.startswith("demo_results/")
        cfg.PATHS.CHECKPOINT_FILE = str(tmp_path / "pretrained.pth")
        Path(cfg.PATHS.CHECKPOINT_FILE).touch()
    check_config(cfg)  # includes: every data folder it names exists
    model = build_model(cfg).eval()
    x = torch.randn(1, cfg.DATA.PATCH_SIZE[-1], *cfg.DATA.PATCH_SIZE[:-1])
    with torch.no_grad():
        out = model(x)
    pred = out[0] if isinstance(out, tuple) else out
    assert pred.shape[2:] == x.shape[2:]
