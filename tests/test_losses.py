"""Losses: each LOSS.TYPE, weights, segmentation targets and the masked reconstruction loss."""
import pytest
import torch

from biapy.config.defaults import get_defaults
from biapy.engine.losses import build_loss, masked_reconstruction_loss, normalize_tokens
from biapy.errors import ConfigError


def loss_of(name, weights=()):
    cfg = get_defaults()
    cfg.LOSS.TYPE = name
    cfg.LOSS.WEIGHTS = list(weights)
    return build_loss(cfg)


def test_pixel_losses_known_values():
    a, b = torch.zeros(2, 1, 16, 16), torch.full((2, 1, 16, 16), 0.5)
    assert float(loss_of("MAE")(a, b)) == pytest.approx(0.5)
    assert float(loss_of("MSE")(a, b)) == pytest.approx(0.25)
    x = torch.rand(2, 1, 16, 16)
    assert float(loss_of("SSIM")(x, x)) == pytest.approx(0.0, abs=1e-5)
    y = torch.rand(2, 1, 16, 16)
    ssim_term = float(loss_of("SSIM")(x, y))
    mae = float(loss_of("MAE")(x, y))
    assert float(loss_of("W_MAE_SSIM", [0.3, 0.7])(x, y)) == pytest.approx(0.3 * mae + 0.7 * ssim_term, rel=1e-5)
    mse = float(loss_of("MSE")(x, y))
    assert float(loss_of("W_MSE_SSIM")(x, y)) == pytest.approx(0.5 * mse + 0.5 * ssim_term, rel=1e-5)


def test_segmentation_losses():
    labels = torch.randint(0, 3, (2, 8, 8))
    perfect = torch.nn.functional.one_hot(labels, 3).permute(0, 3, 1, 2).float() * 20
    assert float(loss_of("CE")(perfect, labels)) < 1e-6
    assert float(loss_of("DICE")(perfect, labels)) < 1e-4
    assert float(loss_of("CE")(perfect, labels[:, None])) < 1e-6  # (B,1,...) labels too
    logits = torch.randn(2, 3, 8, 8, requires_grad=True)
    loss = loss_of("CE_DICE", [0.5, 0.5])(logits, labels)
    loss.backward()
    assert 0 < float(loss.detach()) and torch.isfinite(logits.grad).all()


def test_unknown_loss_is_config_error():
    with pytest.raises(ConfigError, match="LOSS.TYPE"):
        loss_of("HUBER")


def test_masked_reconstruction_loss():
    target = torch.zeros(1, 2, 8, 8)
    pred = torch.zeros(1, 2, 8, 8)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4, :] = 1
    pred[..., :4, :] = 2.0  # error only where hidden
    pred[..., 4:, :] = 1.0  # and a smaller one where visible
    assert float(masked_reconstruction_loss(pred, target, mask, 4, False, True)) == pytest.approx(4.0)
    assert float(masked_reconstruction_loss(pred, target, mask, 4, False, True, kind="mae")) == pytest.approx(2.0)
    assert float(masked_reconstruction_loss(pred, target, mask, 4, False, False)) == pytest.approx(2.5)
    assert float(masked_reconstruction_loss(pred, target, mask.bool(), 4, False, True)) == pytest.approx(4.0)
    assert float(masked_reconstruction_loss(pred, target, mask * 0, 4, False, True)) == 0.0


def test_norm_pix_normalizes_each_token_3d_and_partial():
    t = torch.rand(2, 1, 4, 8, 8) * 5 + 3
    n = normalize_tokens(t, 4)
    tokens = n.reshape(2, 1, 1, 4, 2, 4, 2, 4).permute(0, 1, 2, 4, 6, 3, 5, 7).reshape(2, 4, -1)
    assert torch.allclose(tokens.mean(-1), torch.zeros(2, 4), atol=1e-4)
    assert torch.allclose(tokens.std(-1), torch.ones(2, 4), atol=1e-3)
    odd = normalize_tokens(torch.rand(1, 1, 10, 10), 4)  # last partial tokens
    assert odd.shape == (1, 1, 10, 10) and torch.isfinite(odd).all()
    pred = torch.zeros(1, 1, 10, 10, requires_grad=True)
    loss = masked_reconstruction_loss(pred, torch.rand(1, 1, 10, 10), torch.ones(1, 1, 10, 10), 4, True, True)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(1.0, rel=0.1)  # normalized target has unit variance


def _seg_loss(name, ignore=-1, weights=None):
    cfg = get_defaults()
    cfg.PROBLEM.TYPE = "SEMANTIC_SEG"
    cfg.LOSS.TYPE, cfg.LOSS.IGNORE_INDEX = name, ignore
    if weights is not None:
        cfg.LOSS.CLASS_REBALANCE, cfg.LOSS.CLASS_WEIGHTS = "manual", weights
    return build_loss(cfg)


def test_unlabelled_pixels_and_class_weights_in_the_segmentation_losses():
    """LOSS.IGNORE_INDEX: what the network predicts on unlabelled pixels changes no loss; LOSS.CLASS_WEIGHTS
    weigh CE as torch's weighted mean and Dice's mean over classes."""
    torch.manual_seed(0)
    logits, labels = torch.randn(2, 3, 6, 8), torch.randint(0, 3, (2, 6, 8))
    partial = labels.clone()
    partial[0, :3] = 255
    other = logits.clone()
    other[0, :, :3] += torch.randn(3, 3, 8) * 5  # other predictions where unlabelled
    F = torch.nn.functional
    ce = float(_seg_loss("CE", 255)(logits, partial))
    assert ce == pytest.approx(float(F.cross_entropy(logits, partial, ignore_index=255)), rel=1e-6)
    for name in ("CE", "DICE", "CE_DICE"):
        loss = _seg_loss(name, 255)
        assert float(loss(other, partial)) == pytest.approx(float(loss(logits, partial)))
    unlabelled = torch.full_like(labels, 255)
    assert float(_seg_loss("CE", 255)(logits, unlabelled)) == 0.0  # no labelled pixel: 0, not NaN
    w = [0.2, 1.0, 3.0]
    assert float(_seg_loss("CE", weights=w)(logits, labels)) == pytest.approx(
        float(F.cross_entropy(logits, labels, weight=torch.tensor(w))), rel=1e-6)
    probs, onehot = logits.softmax(1), F.one_hot(labels, 3).permute(0, 3, 1, 2).float()
    dice = (2 * (probs * onehot).sum((0, 2, 3)) + 1) / (probs.sum((0, 2, 3)) + onehot.sum((0, 2, 3)) + 1)
    expected = 1 - float((dice * torch.tensor(w)).sum() / sum(w))
    assert float(_seg_loss("DICE", weights=w)(logits, labels)) == pytest.approx(expected, rel=1e-6)
    assert float(_seg_loss("DICE")(logits, labels)) == pytest.approx(1 - float(dice.mean()), rel=1e-6)
