"""Channels-last CNNs (TRAIN.CHANNELS_LAST): the weights and the inputs in that layout, set where the workflow builds
its model, so training, validation and a test-only run's stitched inference all run it."""
import copy

import pytest
import torch
from torch import nn

from biapy.config import finalize, load_config
from biapy.engine.distributed import init_distributed
from biapy.job import Job
from biapy.models.layout import apply_layout, channels_last_strides, to_channels_last
from biapy.models.unet import UNet
from biapy.models.unetr import UNETR
from biapy.workflows import get_workflow
from tests.conftest import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")

LAYOUT = {2: torch.channels_last, 3: torch.channels_last_3d}


def _first_conv_output(model, x):
    """(the first convolution's output, the model's output) for input x."""
    first = next(m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d)))
    seen = []
    handle = first.register_forward_hook(lambda module, args, out: seen.append(out))
    try:
        out = model(x)
    finally:
        handle.remove()
    return seen[0], out


@pytest.mark.parametrize("ndim", [2, 3])
def test_a_one_channel_image_runs_channels_last_from_the_first_convolution(ndim):
    """torch deems a one-channel image's plain strides channels-last too, but a convolution follows the strides it
    is given: the first level had run plain, its gradients meeting the channels-last ones in slow mixed copies."""
    unet = UNet(ndim, 1, 1, feature_maps=(4, 8)).eval()
    plain = copy.deepcopy(unet)
    for _ in range(2):  # a model set up twice keeps one hook
        to_channels_last(unet, ndim)
    assert len(unet._forward_pre_hooks) == 1
    x = torch.randn(2, 1, *[8] * ndim)
    first, out = _first_conv_output(unet, x)
    assert first.is_contiguous(memory_format=LAYOUT[ndim]) and not first.is_contiguous()
    assert out.is_contiguous(memory_format=LAYOUT[ndim])
    torch.testing.assert_close(out, plain(x))  # the same numbers, in another layout
    assert x.stride() == torch.randn(2, 1, *[8] * ndim).stride()  # the caller's tensor is left as it was


@pytest.mark.parametrize("ndim", [2, 3])
def test_unetr_runs_channels_last_with_the_same_numbers_and_gradient_strides(ndim):
    """UNETR's decoder convolves maps made from the ViT's tokens and the image: channels-last through and through."""
    patch = (32, 32) if ndim == 2 else (16, 32, 32)
    torch.manual_seed(0)
    unetr = UNETR(ndim, 1, 2, patch, token_size=8, embed_dim=32, depth=2, heads=2, feature_maps=(8, 16, 32))
    plain = copy.deepcopy(unetr).eval()
    to_channels_last(unetr, ndim).eval()
    x = torch.randn(2, 1, *patch)
    first, out = _first_conv_output(unetr, x)
    assert first.is_contiguous(memory_format=LAYOUT[ndim]) and not first.is_contiguous()
    # (Not the output's layout: a 1x1x1 head may return either, as torch's kernel heuristics pick.)
    torch.testing.assert_close(out, plain(x), rtol=1e-4, atol=1e-5)
    unetr.train()(x).sum().backward()
    assert not [name for name, p in unetr.named_parameters() if p.grad is not None and p.grad.stride() != p.stride()]


@pytest.mark.parametrize("arch, on, expected", [("unet", True, True), ("resunet", True, True), ("unetr", True, True),
                                                ("mae", True, False), ("unet", False, False)])
def test_which_models_run_channels_last(arch, on, expected):
    from biapy.config import get_defaults
    from biapy.models.layout import wants_channels_last

    cfg = get_defaults()
    cfg.MODEL.ARCHITECTURE, cfg.TRAIN.CHANNELS_LAST = arch, on
    assert wants_channels_last(cfg) is expected


@pytest.mark.parametrize("shape", [(2, 1, 5, 7), (2, 3, 5, 7), (1, 2, 3, 4, 5)])
def test_channels_last_strides_are_torchs(shape):
    layout = LAYOUT[len(shape) - 2]
    assert channels_last_strides(shape) == torch.empty(shape, memory_format=layout).stride()


@pytest.mark.parametrize("ndim, residual, amp", [(2, False, False), (2, True, True), (3, False, True),
                                                 (3, True, False)])
def test_every_gradient_comes_out_in_its_weights_strides(ndim, residual, amp):
    """DDP copies a gradient whose strides differ from its weight's and warns: the first convolution's [C, 1, 3, 3]
    and 1x1 heads' and shortcuts' had (tests/test_distributed.py runs the job under torchrun)."""
    unet = to_channels_last(UNet(ndim, 1, 1, feature_maps=(4, 8, 16), residual=residual), ndim)
    with torch.autocast("cpu", torch.bfloat16, enabled=amp):
        out = unet(torch.randn(2, 1, *[8] * ndim))
    out.float().sum().backward()
    differ = [(name, p.stride(), p.grad.stride()) for name, p in unet.named_parameters()
              if p.grad.stride() != p.stride()]
    assert not differ


def test_a_gradient_takes_its_weights_strides_only_where_its_addresses_are_the_same():
    from biapy.models.layout import _grad_in_weight_strides

    weight = nn.Parameter(torch.randn(4, 3, 1, 1).contiguous(memory_format=torch.channels_last))  # (3, 1, 3, 3)
    plain = torch.randn(4, 3, 1, 1)  # (3, 1, 1, 1): the same addresses
    weight.grad = plain.clone()
    _grad_in_weight_strides(weight)
    assert weight.grad.stride() == weight.stride() and torch.equal(weight.grad, plain)
    other = torch.randn(3, 4, 1, 1).transpose(0, 1)  # output channels fastest: another order, left alone
    weight.grad = other
    _grad_in_weight_strides(weight)
    assert weight.grad.stride() == other.stride() and torch.equal(weight.grad, other)


def _workflow(data, tmp_path, **sections):
    cfg = load_config(tiny_config(data, 2, **sections))
    job = Job(tmp_path, "layout", 1)
    cfg = finalize(cfg, job)
    return get_workflow(cfg)(cfg, job, init_distributed("gloo"), torch.device("cpu"))


def test_the_workflows_cnn_predicts_channels_last_without_training_too(data2d, tmp_path):
    """Set where the model is built: a test-only run's stitched inference had run plain (1.25-1.4x slower on a CPU)."""
    wf = _workflow(data2d, tmp_path, TRAIN={"ENABLE": False})
    conv = wf.model.encoder.blocks[1].conv1[0]
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    first, out = _first_conv_output(wf.model.eval(), torch.randn(2, 1, 32, 32))
    assert first.is_contiguous(memory_format=torch.channels_last) and not first.is_contiguous()
    wf.model.load_state_dict(UNet(2, 1, 1, feature_maps=(4, 8, 16)).state_dict())  # a checkpoint keeps the layout
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()


def test_the_layout_is_left_plain_when_off_and_for_the_vit(data2d, tmp_path):
    wf = _workflow(data2d, tmp_path / "off", TRAIN={"CHANNELS_LAST": False})
    assert all(p.is_contiguous() for p in wf.model.parameters()) and not wf.model._forward_pre_hooks
    cfg = load_config(tiny_config(data2d, 2, PROBLEM={"SELF_SUPERVISED": {"PRETEXT_TASK": "masking"}},
                                  MODEL={"ARCHITECTURE": "mae", "VIT_TOKEN_SIZE": 8}))
    from biapy.models import build_model

    vit = build_model(cfg)
    assert apply_layout(vit, cfg) is vit and not vit._forward_pre_hooks
    assert all(p.is_contiguous() for p in vit.parameters())
