"""Masking end to end: ViT MAE and masked U-Net, 2D and 3D, MAE_checks and hidden-region scores."""
import numpy as np
import pytest

from biapy import BiaPy
from biapy.data.io import read_image
from tests.conftest import tiny_config
from tests.test_e2e_crappify import check_results_tree

MAE_MODEL = {"ARCHITECTURE": "mae", "VIT_TOKEN_SIZE": 8, "VIT_EMBED_DIM": 32, "VIT_NUM_LAYERS": 2,
             "VIT_NUM_HEADS": 2, "MAE_DEC_HIDDEN_SIZE": 16, "MAE_DEC_NUM_LAYERS": 1, "MAE_DEC_NUM_HEADS": 2,
             "MAE_DEC_MLP_DIMS": 32, "MAE_MASK_TYPE": "random", "MAE_MASK_RATIO": 0.75}


@pytest.mark.parametrize("ndim, arch", [(2, "mae"), (3, "mae"), (2, "unet"), (3, "unet")])
def test_masking_end_to_end(ndim, arch, data2d, data3d, tmp_path):
    data = data2d if ndim == 2 else data3d
    model = dict(MAE_MODEL) if arch == "mae" else {"MAE_MASK_RATIO": 0.5}
    cfg = tiny_config(data, ndim, PROBLEM={"SELF_SUPERVISED": {"PRETEXT_TASK": "masking", "MASK_BLOCK_SIZE": 4}},
                      MODEL=model, LOG={"RECONSTRUCTION_FREQ": 1, "RECONSTRUCTION_NUM_SAMPLES": 1})
    job = BiaPy(cfg, result_dir=tmp_path / "out", name="mask", run_id=1).run_job()
    check_results_tree(job, data, ndim, extra_columns=("hidden_psnr", "hidden_mse"))
    checks = sorted(job.mae_checks.iterdir())
    suffixes = ["_masked.tif", "_original.tif", "_reconstruction.tif", "_reconstruction_and_visible.tif"]
    assert len(checks) == 4 and all(any(c.name.endswith(s) for c in checks) for s in suffixes)
    stem = next(c for c in checks if c.name.endswith("_original.tif")).name[: -len("_original.tif")]
    source = next(p for p in data["train"][0].iterdir() if p.name.startswith(stem))
    original = read_image(source, ndim)
    panels = {s: read_image(job.mae_checks / f"{stem}{s}", ndim) for s in suffixes}
    for panel in panels.values():
        assert panel.shape == original.shape
    np.testing.assert_allclose(panels["_original.tif"], original.astype(np.float32))
    hidden = panels["_masked.tif"] == 0
    visible = ~hidden & (original != 0)
    # Where the input was visible the composite shows the input, elsewhere the reconstruction.
    np.testing.assert_allclose(panels["_reconstruction_and_visible.tif"][visible], original[visible].astype(np.float32))
