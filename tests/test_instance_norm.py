"""MODEL.NORMALIZATION 'in': the same values, gradients and parameters as torch's InstanceNorm, layout kept."""
import pytest
import torch
from torch import nn

from biapy.models.instance_norm import InstanceNorm, _InstanceNormFunction


def _pair(channels, ndim, dtype=torch.float64):
    torch.manual_seed(0)
    ref = (nn.InstanceNorm3d if ndim == 3 else nn.InstanceNorm2d)(channels, affine=True).to(dtype)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(channels))
        ref.bias.copy_(torch.randn(channels))
    ours = InstanceNorm(channels).to(dtype)
    ours.load_state_dict(ref.state_dict())  # same parameter names and shapes
    return ref, ours


@pytest.mark.parametrize("ndim,fmt", [(2, torch.channels_last), (2, torch.contiguous_format),
                                      (3, torch.channels_last_3d)])
def test_matches_torch_values_and_gradients(ndim, fmt):
    shape = (3, 5, 7, 6) if ndim == 2 else (2, 4, 3, 5, 6)
    ref, ours = _pair(shape[1], ndim)
    x = (torch.randn(*shape, dtype=torch.float64) * 3 + 1).contiguous(memory_format=fmt)
    g = torch.randn(*shape, dtype=torch.float64).contiguous(memory_format=fmt)
    xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    arriving = []  # the gradient as the layer returns it (autograd re-lays a leaf's .grad to match the leaf)
    xo.register_hook(lambda grad: arriving.append(grad.is_contiguous(memory_format=fmt)))
    yr, yo = ref(xr), ours(xo)
    yr.backward(g)
    yo.backward(g)
    assert arriving == [True]
    torch.testing.assert_close(yo, yr)
    torch.testing.assert_close(xo.grad, xr.grad)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad)
    torch.testing.assert_close(ours.bias.grad, ref.bias.grad)
    assert yo.is_contiguous(memory_format=fmt)
    # every sample and channel comes out with the learned mean and scale
    dims = tuple(range(2, x.dim()))
    torch.testing.assert_close(yo.mean(dims), ours.bias.view(1, -1).expand(shape[0], -1).detach())
    torch.testing.assert_close(yo.std(dims, correction=0), ours.weight.abs().view(1, -1).expand(shape[0], -1).detach(),
                               rtol=1e-4, atol=1e-4)


def test_gradcheck():
    torch.manual_seed(1)
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64).contiguous(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, w, b: _InstanceNormFunction.apply(a, w, b, 1e-5), (x, w, b))


def test_float32_precision_like_torch_on_offset_input():
    """A large mean over a small spread: the centred backward loses no more than torch's kernel."""
    ref64, _ = _pair(8, 2)
    ref32, ours = _pair(8, 2, torch.float32)
    x = (torch.randn(4, 8, 32, 32) * 0.01 + 100).contiguous(memory_format=torch.channels_last)
    g = torch.randn_like(x)
    x64 = x.double().requires_grad_()
    ref64(x64).backward(g.double())
    errors = []
    for module in (ref32, ours):
        xi = x.clone().requires_grad_()
        module(xi).backward(g)
        errors.append(((xi.grad.double() - x64.grad).abs().max() / x64.grad.abs().max()).item())
    assert errors[1] <= 2 * errors[0] + 1e-6


def test_half_input_keeps_dtype_and_float32_statistics():
    norm = InstanceNorm(4)
    torch.manual_seed(2)
    x = (torch.randn(2, 4, 8, 8) + 20).to(torch.bfloat16).requires_grad_()  # offset: bf16 sums would be off
    y = norm(x)
    assert y.dtype == torch.bfloat16
    exact = nn.functional.instance_norm(x.detach().double())
    assert (y.double() - exact).abs().max() < 0.02  # bf16 rounding of the output only
    y.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and norm.weight.grad.dtype == torch.float32


def test_single_spatial_element_refused():
    from biapy.config.defaults import get_defaults
    from biapy.errors import ConfigError
    from biapy.models import check_patch_fits

    with pytest.raises(ValueError, match="more than 1 spatial element"):
        InstanceNorm(3)(torch.randn(2, 3, 1, 1))
    assert InstanceNorm(3).eval()(torch.randn(2, 3, 1, 1)).shape == (2, 3, 1, 1)
    cfg = get_defaults()
    cfg.DATA.PATCH_SIZE = (16, 16, 1)  # 5 levels: a 1x1 bottleneck
    cfg.MODEL.NORMALIZATION = "in"
    with pytest.raises(ConfigError, match="MODEL.NORMALIZATION: 'in' .* single pixel"):
        check_patch_fits(cfg)
    cfg.MODEL.NORMALIZATION = "bn"
    check_patch_fits(cfg)


def test_second_derivative_raises_instead_of_being_wrong():
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(InstanceNorm(3).double()(x).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|not differentiable|does not require grad"):
        grad.sum().backward()


def test_unet_with_instance_norm_stays_channels_last():
    from biapy.models.unet import UNet

    model = UNet(3, 1, 1, feature_maps=(4, 8), norm="in").to(memory_format=torch.channels_last_3d)
    assert sum(isinstance(m, InstanceNorm) for m in model.modules()) == 6
    x = torch.randn(2, 1, 4, 8, 8).contiguous(memory_format=torch.channels_last_3d)
    out = model(x)
    out.square().mean().backward()
    assert out.is_contiguous(memory_format=torch.channels_last_3d)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
