"""U-Nets and build_model: shapes in 2D/3D, anisotropic pooling, submodule names, config errors."""
import pytest
import torch

from biapy.config.defaults import get_defaults
from biapy.errors import ConfigError
from biapy.models import build_model, check_patch_fits
from biapy.models.summary import count_parameters, model_summary
from biapy.models.unet import UNet


def cnn_cfg(ndim=2, patch=(32, 32, 1), arch="unet", problem="SELF_SUPERVISED", task="crappify", **model):
    cfg = get_defaults()
    cfg.PROBLEM.TYPE = problem
    cfg.PROBLEM.NDIM = f"{ndim}D"
    cfg.PROBLEM.SELF_SUPERVISED.PRETEXT_TASK = task
    cfg.DATA.PATCH_SIZE = patch
    cfg.MODEL.ARCHITECTURE = arch
    cfg.MODEL.FEATURE_MAPS = [4, 8, 12]
    cfg.MODEL.DROPOUT_VALUES = [0.0, 0.1, 0.2]
    cfg.MODEL.Z_DOWN = [0, 0]
    for key, value in model.items():
        cfg.MODEL[key] = value
    return cfg


@pytest.mark.parametrize("arch", ["unet", "resunet"])
@pytest.mark.parametrize("ndim,patch", [(2, (16, 24, 1)), (2, (16, 16, 3)), (3, (8, 16, 8, 2))])
def test_cnn_shapes_ssl_and_segmentation(arch, ndim, patch):
    x = torch.randn(2, patch[-1], *patch[:-1])
    ssl = build_model(cnn_cfg(ndim, patch, arch))
    assert ssl(x).shape == x.shape
    seg = build_model(cnn_cfg(ndim, patch, arch, problem="SEMANTIC_SEG", N_CLASSES=3))
    assert seg(x).shape == (2, 3, *patch[:-1])
    # Only head.* differs between the pretext and the segmentation model.
    a, b = ssl.state_dict(), seg.state_dict()
    assert set(a) == set(b)
    assert {k for k in a if a[k].shape != b[k].shape} <= {k for k in a if k.startswith("head.")}
    assert {k.split(".")[0] for k in a} == {"encoder", "decoder", "head"}


@pytest.mark.parametrize("arch", ["unet", "resunet"])
def test_thin_stack_with_z_down_1(arch):
    cfg = cnn_cfg(3, (3, 16, 16, 1), arch, Z_DOWN=[1, 1])
    check_patch_fits(cfg)
    model = build_model(cfg)
    assert model(torch.randn(1, 1, 3, 16, 16)).shape == (1, 1, 3, 16, 16)
    up = model.decoder.ups[0]
    assert tuple(up.kernel_size) == (1, 2, 2) and tuple(up.stride) == (1, 2, 2)
    mixed = build_model(cnn_cfg(3, (2, 16, 16, 1), arch, Z_DOWN=[2, 1]))
    assert mixed(torch.randn(1, 1, 2, 16, 16)).shape == (1, 1, 2, 16, 16)


@pytest.mark.parametrize("norm", ["bn", "in", "gn", "none"])
@pytest.mark.parametrize("act", ["elu", "relu", "leaky_relu", "gelu", "silu"])
def test_norms_activations_kernel(norm, act):
    model = build_model(cnn_cfg(2, (8, 8, 1), NORMALIZATION=norm, ACTIVATION=act, KERNEL_SIZE=5))
    out = model(torch.randn(2, 1, 8, 8))
    assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all()


def test_channels_last_and_backward():
    model = UNet(2, 2, 2, feature_maps=(4, 8)).to(memory_format=torch.channels_last)
    x = torch.randn(2, 2, 16, 16).to(memory_format=torch.channels_last)
    out = model(x)
    out.mean().backward()
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert all(p.grad is not None for p in model.parameters())


def test_patch_not_divisible_is_config_error():
    with pytest.raises(ConfigError, match=r"DATA.PATCH_SIZE.*\(4, 4\)"):
        check_patch_fits(cnn_cfg(2, (18, 32, 1)))
    with pytest.raises(ConfigError, match=r"DATA.PATCH_SIZE.*\(4, 4, 4\).*Z_DOWN"):
        check_patch_fits(cnn_cfg(3, (6, 16, 16, 1)))
    check_patch_fits(cnn_cfg(3, (6, 16, 16, 1), Z_DOWN=[1, 0]))  # z needs only 2 now
    vit = cnn_cfg(2, (20, 32, 1), "mae", task="masking", VIT_TOKEN_SIZE=8)
    with pytest.raises(ConfigError, match=r"DATA.PATCH_SIZE.*VIT_TOKEN_SIZE"):
        check_patch_fits(vit)
    with pytest.raises(ConfigError, match="DATA.PATCH_SIZE"):
        build_model(cnn_cfg(2, (18, 32, 1)))


@pytest.mark.parametrize("arch,problem,task", [
    ("mae", "SELF_SUPERVISED", "crappify"), ("mae", "SEMANTIC_SEG", "masking"),
    ("unetr", "SELF_SUPERVISED", "masking"), ("vgg", "SEMANTIC_SEG", "crappify")])
def test_incompatible_architecture(arch, problem, task):
    with pytest.raises(ConfigError, match=r"MODEL.ARCHITECTURE.*expected one of"):
        build_model(cnn_cfg(2, (32, 32, 1), arch, problem=problem, task=task))


def test_masking_cnn_and_summary():
    model = build_model(cnn_cfg(2, (16, 16, 1), "resunet", task="masking"))
    assert model(torch.randn(1, 1, 16, 16)).shape == (1, 1, 16, 16)
    n = count_parameters(model)
    assert n == sum(p.numel() for p in model.parameters()) > 0
    text = model_summary(model)
    assert "encoder" in text and "decoder" in text and "head" in text and f"{n:,}" in text


def test_one_pixel_bottleneck_with_batch_norm_needs_a_batch_of_two():
    cfg = cnn_cfg(2, (16, 16, 1), FEATURE_MAPS=[4, 8, 16, 32, 64], DROPOUT_VALUES=[0.0] * 5)
    cfg.TRAIN.BATCH_SIZE = 1
    with pytest.raises(ConfigError, match=r"TRAIN.BATCH_SIZE: 1 with MODEL.NORMALIZATION 'bn' .* single pixel"):
        check_patch_fits(cfg)
    model = build_model(cnn_cfg(2, (16, 16, 1), FEATURE_MAPS=[4, 8, 16, 32, 64], DROPOUT_VALUES=[0.0] * 5))
    with pytest.raises(ValueError, match="more than 1 value per channel"):  # what the check stands in for
        model(torch.randn(1, 1, 16, 16))
    for change in ({"TRAIN.BATCH_SIZE": 2}, {"TRAIN.ENABLE": False}, {"MODEL.NORMALIZATION": "none"}):
        ok = cfg.clone()
        for key, value in change.items():
            section, name = key.split(".")
            ok[section][name] = value
        check_patch_fits(ok)


@pytest.mark.parametrize("residual", [False, True])
def test_detail_below_bf16_resolution_reaches_a_u_net_under_autocast(residual):
    """bf16 steps by ~0.002 around 0.3 (16-bit counts normalized by 'div' with an offset): an input cast to bf16
    loses detail finer than that (a crappify job on such data: 11.7 dB in bf16, 13.8 in float32). The first
    convolution reads the input in float32 and its batch norm takes the offset away; the head writes float32."""
    torch.manual_seed(0)
    model = UNet(2, 1, 1, [4, 8], residual=residual).train()  # batch statistics, as in training
    flat = torch.full((2, 1, 16, 16), 0.3125)  # a bf16 value
    detail = 4e-4 * (torch.arange(256).reshape(16, 16) % 2 * 2 - 1)  # zero mean, below bf16's step at 0.3
    assert torch.equal(flat.bfloat16(), (flat + detail).bfloat16())  # the cast alone would erase it
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain, detailed = model(flat), model(flat + detail)
    assert plain.dtype == torch.float32
    assert (detailed - plain).abs().max() > 1e-3  # the detail got through (identical outputs when it does not)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # folded for the test phase: still float32 at both ends
        from biapy.models.folding import fold_batch_norm
        fold_batch_norm(model)
        assert model(flat).dtype == torch.float32 and type(model.encoder.blocks[0].conv1[0]).__name__ == "Float32Conv2d"


@pytest.mark.parametrize("arch", ["mae", "unetr"])
def test_vit_models_read_pixels_and_write_outputs_in_float32_under_autocast(arch):
    from tests.test_mae import tiny_vit_cfg

    model = build_model(tiny_vit_cfg(arch=arch)).train()
    x = torch.rand(2, 1, 16, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tokens = model.encoder.patch_embed(x)
        out = model(x)[0] if arch == "mae" else model(x)
    assert tokens.dtype == torch.float32 and out.dtype == torch.float32
    keys = {k for k in model.state_dict()}
    assert "encoder.patch_embed.proj.weight" in keys and "head.weight" in keys  # names as before


def test_keep_float32_takes_torch_layers_only():
    """Its classes are found by name for pickling, which works for torch.nn layers."""
    from biapy.models.float32 import keep_float32
    from biapy.models.vit import PatchEmbed

    with pytest.raises(TypeError, match="PatchEmbed is not a torch.nn layer"):
        keep_float32(PatchEmbed(2, 1, 4, 8))
    layer = keep_float32(torch.nn.Linear(3, 2))
    assert keep_float32(layer) is layer and type(layer).__name__ == "Float32Linear"
