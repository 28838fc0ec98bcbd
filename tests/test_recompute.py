"""MODEL.ACTIVATION_CHECKPOINTING: the same training with far fewer saved activations (no torch._dynamo import:
test_optimizers)."""
import pytest
import torch

from biapy.engine.optimizers import SGD
from biapy.models import build_model
from biapy.models.recompute import set_recompute
from tests.test_mae import tiny_vit_cfg
from tests.test_models import cnn_cfg


def saved_bytes(model, *inputs):
    """Bytes of the tensors autograd keeps for the backward pass of model(*inputs)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(*inputs)
    return sum(storages.values())


def first_tensor(out):
    return out[0] if isinstance(out, tuple) else out


def train(cfg, x, on, steps=3, autocast=None):
    torch.manual_seed(0)
    model = set_recompute(build_model(cfg), on)
    # SGD, not Adam: Adam turns the rounding noise of gradients that are zero in theory (a ViT's key bias)
    # into full-size steps, and summing a gradient in another order is enough to flip their sign.
    opt = SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    torch.manual_seed(1)  # dropout and MAE masks draw from here: the recomputation must replay them
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast is not None):
            loss = first_tensor(model(x)).float().square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return model, losses, torch.get_rng_state()


CASES = {
    "unet 2D, dropout": (cnn_cfg(2, (16, 16, 1), "unet"), (2, 1, 16, 16)),
    "resunet 3D": (cnn_cfg(3, (8, 16, 16, 2), "resunet"), (2, 2, 8, 16, 16)),
    "mae": (tiny_vit_cfg(), (2, 1, 16, 24)),
    "unetr": (tiny_vit_cfg(arch="unetr"), (2, 1, 16, 24)),
}


@pytest.mark.parametrize("case", CASES)
def test_same_training_with_the_key_on(case):
    cfg, shape = CASES[case]
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    plain, plain_losses, plain_rng = train(cfg, x, on=False)
    recomputed, losses, rng = train(cfg, x, on=True)
    assert losses == pytest.approx(plain_losses, rel=1e-5)
    assert torch.equal(rng, plain_rng)  # the replay leaves the random stream where the plain run left it
    a, b = plain.state_dict(), recomputed.state_dict()  # weights and batch-norm statistics, moved once per step
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)


def test_same_training_under_autocast():
    cfg, shape = CASES["unet 2D, dropout"]
    x = torch.randn(*shape)
    _, plain_losses, _ = train(cfg, x, on=False, steps=2, autocast=torch.bfloat16)
    _, losses, _ = train(cfg, x, on=True, steps=2, autocast=torch.bfloat16)
    assert losses == pytest.approx(plain_losses, rel=1e-3)


@pytest.mark.parametrize("case,most", [("unet 2D, dropout", 0.35), ("resunet 3D", 0.35), ("mae", 0.25)])
def test_keeps_a_fraction_of_the_activations(case, most):
    cfg, shape = CASES[case]
    x = torch.randn(*shape)
    model = build_model(cfg)
    plain = saved_bytes(model, x)
    kept = saved_bytes(set_recompute(model, True), x)
    assert 0 < kept < most * plain


def test_frozen_encoder_still_trains_the_decoder():
    """Fine-tuning freezes the encoder: no block input needs a gradient, the decoder's weights still get theirs."""
    cfg, shape = CASES["unet 2D, dropout"]
    x = torch.randn(*shape)
    grads = []
    for on in (False, True):
        torch.manual_seed(0)
        model = set_recompute(build_model(cfg), on).eval()  # eval: dropout off, one forward to compare
        model.encoder.requires_grad_(False)
        model(x).square().mean().backward()
        assert all(p.grad is None for p in model.encoder.parameters())
        grads.append([p.grad for p in model.decoder.parameters()])
    for g_plain, g in zip(*grads):
        torch.testing.assert_close(g, g_plain)


def test_no_gradient_no_recomputation():
    cfg, shape = CASES["unet 2D, dropout"]
    model = set_recompute(build_model(cfg), True)
    with torch.no_grad():
        out = model(torch.randn(*shape))
    assert out.grad_fn is None


@pytest.mark.parametrize("cfg", [cnn_cfg(), tiny_vit_cfg()], ids=["unet", "mae"])
def test_compile_traces_a_model_without_recompute_as_one_graph(cfg):
    """TRAIN.COMPILE: the block containers' call through `run` must not split the graph (with torch 2.11
    `fn or block` there gave one graph per block, and past eight blocks the rest ran uncompiled)."""
    import torch._dynamo

    model = set_recompute(build_model(cfg), False)
    x = torch.randn(2, 1, *cfg.DATA.PATCH_SIZE[:-1])
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(x)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)
