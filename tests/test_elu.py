"""The U-Nets' ELU on the CPU (biapy/models/elu.py): torch's values and gradients, in place, without expm1."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from biapy.models.elu import ELU

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


class _Ops(TorchDispatchMode):
    """The names of the aten operators run inside the block."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def _sample(dtype, shape=(2, 5, 6, 7), memory_format=torch.contiguous_format):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 3
    # Values near 0, where exp(x) rounded to bf16 before subtracting 1 would lose them, and the special ones.
    x.view(-1)[:7] = torch.tensor([-1e-3, -1e-6, 0.0, -0.0, float("-inf"), float("inf"), -30.0])
    return x.to(dtype=dtype, memory_format=memory_format)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_values_and_gradients_are_torchs_in_place_elus(dtype):
    x = _sample(dtype)
    expected = F.elu(x.float()).to(dtype)  # float32 reference, rounded once
    ours = ELU()(x.clone())
    assert ours.dtype == dtype
    tolerance = {torch.float32: 1e-7, torch.float64: 1e-7}.get(dtype, 0)  # exp(x) - 1 against expm1(x)
    torch.testing.assert_close(ours, expected, atol=tolerance, rtol=0)
    assert ours.view(-1)[4:7].float().tolist() == [-1, float("inf"), pytest.approx(-1)]

    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    finite = x.isfinite()
    grads = []
    for act in (nn.ELU(inplace=True), ELU()):  # torch's in-place ELU: its backward pass reads the output too
        leaf = x.clone().requires_grad_()
        act(leaf * 1).backward(grad)  # `* 1`: a leaf cannot be changed in place
        grads.append(leaf.grad[finite].float())
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6 if dtype in (torch.float32, torch.float64) else 0,
                               rtol=0)


def test_it_works_in_place_and_keeps_the_memory_layout_in_2d_and_3d():
    for shape, layout in (((2, 4, 6, 8), torch.channels_last), ((2, 4, 3, 6, 8), torch.channels_last_3d)):
        x = _sample(torch.float32, shape, layout)
        version = x._version
        out = ELU()(x)
        assert out.data_ptr() == x.data_ptr() and x._version > version
        assert out.is_contiguous(memory_format=layout)
        torch.testing.assert_close(out, F.elu(_sample(torch.float32, shape)), atol=1e-7, rtol=0)
    with torch.inference_mode():  # the test phase
        y = ELU()(_sample(torch.float32))
    torch.testing.assert_close(y, F.elu(_sample(torch.float32)), atol=1e-7, rtol=0)


def test_the_unet_on_a_cpu_runs_no_expm1_and_keeps_its_modules_and_checkpoint_keys():
    """torch's CPU ELU calls expm1, 10x slower than exp on a Zen 4 EPYC: a third of the U-Net's step there."""
    from biapy.config import load_config
    from biapy.models import build_model

    cfg = load_config({"PROBLEM": {"SELF_SUPERVISED": {"PRETEXT_TASK": "crappify"}},
                       "MODEL": {"ARCHITECTURE": "unet", "FEATURE_MAPS": [4, 8], "ACTIVATION": "elu"},
                       "DATA": {"PATCH_SIZE": (16, 16, 1)}})
    model = build_model(cfg).train()
    elus = [m for m in model.modules() if isinstance(m, nn.ELU)]
    assert elus and all(type(m) is ELU and repr(m) == "ELU(alpha=1.0, inplace=True)" for m in elus)
    assert not any(isinstance(p, torch.Tensor) for m in elus for p in m.state_dict().values())  # keys unchanged
    with _Ops() as ops:
        model(torch.randn(2, 1, 16, 16)).sum().backward()
    assert "elu_backward" in ops.names
    assert not ops.names & {"elu", "elu_", "expm1", "expm1_"}


def test_other_devices_keep_torchs_fused_elu(monkeypatch):
    """On a GPU torch's ELU is one fused kernel; four passes would cost more. (The meta device stands in here.)"""
    def refuse(*args):
        raise AssertionError("the exp-based ELU ran off the CPU")

    monkeypatch.setattr("biapy.models.elu._ExpELU.apply", refuse)
    with _Ops() as ops:
        out = ELU()(torch.empty(2, 3, device="meta"))
    assert out.device.type == "meta" and "elu_" in ops.names
