"""Batch norm folded into convolutions for the test phase: the same predictions, layouts kept, other norms left."""
import pytest
import torch
from torch import nn

from biapy.models import build_model
from biapy.models.folding import fold_batch_norm
from tests.test_e2e_crappify import run
from tests.conftest import tiny_config
from tests.test_mae import tiny_vit_cfg
from tests.test_models import cnn_cfg

NORMS = (nn.BatchNorm2d, nn.BatchNorm3d)


def trained_a_little(cfg, shape, layout=None):
    """A model whose batch norms hold statistics and affine values far from their initial ones."""
    torch.manual_seed(0)
    model = build_model(cfg)
    if layout is not None:
        model = model.to(memory_format=layout)
    for m in model.modules():
        if isinstance(m, NORMS):
            nn.init.uniform_(m.weight, 0.5, 2.0)
            nn.init.uniform_(m.bias, -0.5, 0.5)
    with torch.no_grad():  # training-mode forwards move the running statistics
        for _ in range(3):
            model(3 * torch.randn(*shape) + 1)
    return model.eval()


CASES = {
    "unet 2D channels-last": (cnn_cfg(2, (16, 16, 1), "unet"), (2, 1, 16, 16), torch.channels_last),
    "resunet 3D channels-last": (cnn_cfg(3, (8, 16, 16, 2), "resunet"), (2, 2, 8, 16, 16), torch.channels_last_3d),
    "resunet 2D": (cnn_cfg(2, (16, 16, 1), "resunet", FEATURE_MAPS=[4, 8, 8]), (2, 1, 16, 16), None),
    "unetr": (tiny_vit_cfg(arch="unetr"), (2, 1, 16, 24), None),
}


@pytest.mark.parametrize("case", CASES)
def test_folded_model_predicts_the_same(case):
    cfg, shape, layout = CASES[case]
    model = trained_a_little(cfg, shape, layout)
    x = torch.randn(*shape)
    if layout is not None:
        x = x.contiguous(memory_format=layout)
    norms = sum(isinstance(m, NORMS) for m in model.modules())
    with torch.no_grad():
        before = model(x)
        assert fold_batch_norm(model) == norms > 0
        after = model(x)
    assert not any(isinstance(m, NORMS) for m in model.modules())
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    assert (after - before).abs().max() > 0 or norms == 0  # the folded model really ran its own weights
    if layout is not None:  # a folded convolution keeps channels-last weights, so it stays on the fast path
        convs = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d)) and m.weight.shape[1] > 1]
        assert convs and all(c.weight.is_contiguous(memory_format=layout) for c in convs if c.weight.shape[-1] > 1)


@pytest.mark.parametrize("norm", ["in", "gn", "none"])
def test_other_normalizations_are_left_as_they_are(norm):
    model = trained_a_little(cnn_cfg(2, (16, 16, 1), "unet", NORMALIZATION=norm), (2, 1, 16, 16))
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        before = model(x)
        assert fold_batch_norm(model) == 0
        assert torch.equal(model(x), before)


def test_the_test_phase_predicts_with_the_folded_model(data2d, tmp_path, monkeypatch):
    import biapy.workflows.base as base

    seen = []
    predict = base.Workflow.predict_patches

    def recording(self, batch):
        seen.append(sum(isinstance(m, NORMS) for m in self.model.modules()))
        return predict(self, batch)

    monkeypatch.setattr(base.Workflow, "predict_patches", recording)
    run(tiny_config(data2d, 2, TRAIN={"EPOCHS": 1}), tmp_path)
    assert seen and all(n == 0 for n in seen)
