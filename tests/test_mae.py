"""ViT masked autoencoder: tokens <-> pixels, visible-only encoder, masks, UNETR weight transfer."""
import math

import pytest
import torch

from biapy.config.defaults import get_defaults
from biapy.models import build_model
from biapy.models.mae import MaskedAutoencoderViT
from biapy.models.masking import hidden_count


def tiny_vit_cfg(ndim=2, patch=(16, 24, 1), token=4, mask_type="random", ratio=0.75, arch="mae"):
    cfg = get_defaults()
    cfg.PROBLEM.NDIM = f"{ndim}D"
    if arch == "unetr":
        cfg.PROBLEM.TYPE = "SEMANTIC_SEG"
        cfg.MODEL.N_CLASSES = 3
    else:
        cfg.PROBLEM.SELF_SUPERVISED.PRETEXT_TASK = "masking"
    cfg.MODEL.ARCHITECTURE = arch
    cfg.DATA.PATCH_SIZE = patch
    m = cfg.MODEL
    m.VIT_TOKEN_SIZE, m.VIT_EMBED_DIM, m.VIT_NUM_LAYERS, m.VIT_NUM_HEADS = token, 24, 4, 2
    m.MAE_DEC_HIDDEN_SIZE, m.MAE_DEC_NUM_LAYERS, m.MAE_DEC_NUM_HEADS, m.MAE_DEC_MLP_DIMS = 16, 1, 2, 40
    m.MAE_MASK_TYPE, m.MAE_MASK_RATIO = mask_type, ratio
    m.FEATURE_MAPS = [8, 8, 8, 8, 8]
    return cfg


def _mae(spatial, token=4, channels=1, mask_type="random", ratio=0.75):
    return MaskedAutoencoderViT(len(spatial), channels, spatial, token, embed_dim=24, depth=2, heads=2,
                                dec_width=16, dec_depth=1, dec_heads=2, dec_mlp_dims=40,
                                mask_type=mask_type, mask_ratio=ratio)


@pytest.mark.parametrize("spatial,channels", [((16, 24), 1), ((8, 12), 3), ((8, 12, 16), 1), ((4, 8, 12), 2)])
def test_patchify_roundtrip(spatial, channels):
    model = _mae(spatial, channels=channels)
    x = torch.randn(2, channels, *spatial)
    tokens = model.patchify(x)
    assert tokens.shape == (2, math.prod(model.grid), 4 ** len(spatial) * channels)
    assert model.grid == tuple(s // 4 for s in spatial)
    assert torch.equal(model.unpatchify(tokens), x)
    # Token 0 holds exactly the first token_size^ndim block.
    first = x[(slice(None), slice(None), *[slice(0, 4)] * len(spatial))]
    assert torch.equal(tokens[:, 0].sort(dim=1).values, first.reshape(2, -1).sort(dim=1).values)


def test_decoder_puts_each_token_back_at_its_grid_place_with_its_position():
    """Without blocks, the decoder's token j is norm(embed(latent of j) + pos[j]) where j is visible and
    norm(mask_token + pos[j]) where hidden: the gather and the position embedding are both checked."""
    from biapy.models.mae import MAEDecoder
    from biapy.models.masking import random_token_mask

    torch.manual_seed(0)
    dec = MAEDecoder(enc_dim=6, grid=(3, 4), width=8, depth=0, heads=2, mlp_dims=16)
    torch.nn.init.normal_(dec.mask_token)
    mask, ids_keep, ids_restore = random_token_mask(2, 12, 0.5, torch.Generator().manual_seed(1))
    latent = torch.randn(2, ids_keep.shape[1], 6)
    pos = torch.randn(1, 12, 8)
    out = dec(latent, ids_restore, pos)
    for b in range(2):
        kept = ids_keep[b].tolist()
        for j in range(12):
            token = dec.embed(latent[b, kept.index(j)]) if j in kept else dec.mask_token[0, 0]
            assert bool(mask[b, j]) == (j not in kept)
            torch.testing.assert_close(out[b, j], dec.norm(token + pos[0, j]))


@pytest.mark.parametrize("mask_type,ratio", [("random", 0.75), ("grid", 0.5), ("grid", 0.3), ("random", 0.0)])
def test_forward_shapes_and_encoder_sees_visible_only(mask_type, ratio):
    model = _mae((16, 24), mask_type=mask_type, ratio=ratio)
    x = torch.randn(3, 1, 16, 24)
    L = math.prod(model.grid)
    latent, mask, ids_restore, ids_keep = model.encode(x, torch.Generator().manual_seed(0))
    assert latent.shape == (3, L - hidden_count(L, ratio), 24)
    assert model.encoder.last_input_len == L - hidden_count(L, ratio)
    pred, img_mask = model(x, generator=torch.Generator().manual_seed(0))
    assert pred.shape == x.shape and img_mask.shape == (3, 1, 16, 24)
    assert torch.allclose(img_mask.mean(dim=(1, 2, 3)), torch.full((3,), hidden_count(L, ratio) / L))


def test_random_mask_reproducible_with_generator():
    model = _mae((16, 16)).eval()
    x = torch.randn(2, 1, 16, 16)
    p1, m1 = model(x, generator=torch.Generator().manual_seed(5))
    p2, m2 = model(x, generator=torch.Generator().manual_seed(5))
    assert torch.equal(m1, m2) and torch.allclose(p1, p2)
    assert not torch.equal(m1[0], m1[1])


@pytest.mark.parametrize("spatial, channels", [((16, 24), 1), ((16, 24), 3), ((8, 8, 8), 1), ((8, 8, 8), 2)])
def test_every_mae_gradient_comes_out_in_its_weights_strides(spatial, channels):
    """DDP compares a gradient's strides with its weight's literally: the one-channel patch embedding's gradient,
    channels-last strides for the same bytes, had it warn under torchrun ("Grad strides do not match bucket view
    strides") and copy it every step."""
    model = _mae(spatial, channels=channels)
    pred, _ = model(torch.randn(2, channels, *spatial), generator=torch.Generator().manual_seed(0))
    pred.square().mean().backward()
    differ = [(name, p.stride(), p.grad.stride()) for name, p in model.named_parameters()
              if p.grad is not None and p.grad.stride() != p.stride()]
    assert not differ and model.encoder.patch_embed.proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("mask_type", ["random", "grid"])
def test_the_workflow_calls_the_mae_as_one_compiled_graph_with_the_generators_masks(mask_type):
    """TRAIN.COMPILE: the workflow draws a random mask's noise outside the model, so the compiled model is one
    graph (a generator handed to it split the graph in three at the draw), and the masks are those the same
    generator gives the model directly: resumed and earlier runs keep their masks."""
    import torch._dynamo

    from biapy.workflows.masking import MaskingWorkflow

    cfg = tiny_vit_cfg(mask_type=mask_type)
    model = build_model(cfg).eval()
    wf = object.__new__(MaskingWorkflow)
    wf.cfg, wf.is_vit, wf.token_size = cfg, True, cfg.MODEL.VIT_TOKEN_SIZE
    explained = []

    def compiled(*args, **kwargs):
        torch._dynamo.reset()
        explained.append(torch._dynamo.explain(model)(*args, **kwargs))
        return model(*args, **kwargs)

    wf.model = compiled
    x = torch.randn(3, 1, 16, 24)
    pred, mask = wf.masked_forward(x, torch.Generator().manual_seed(4))
    torch._dynamo.reset()
    assert (explained[0].graph_count, explained[0].graph_break_count) == (1, 0)
    direct_pred, direct_mask = model(x, generator=torch.Generator().manual_seed(4))
    assert torch.equal(mask, direct_mask) and torch.allclose(pred, direct_pred)
    if mask_type == "random":
        assert not torch.equal(mask[0], mask[1])


def test_grid_3d_reported_mask_is_the_hidden_set():
    model = _mae((8, 8, 8), token=2, mask_type="grid", ratio=0.875)  # 4x4x4 tokens
    x = torch.randn(2, 1, 8, 8, 8)
    _, mask, _, ids_keep = model.encode(x)
    visible = torch.zeros_like(mask)
    visible.scatter_(1, ids_keep, 1.0)
    assert torch.equal(mask, 1 - visible)  # hidden from the encoder == reported as hidden
    _, img_mask = model(x)
    # The image mask is the token mask painted per token: one visible token per 2x2x2 cell.
    assert torch.equal(model.patchify(img_mask)[..., 0], mask)
    assert img_mask[0, 0, 0, 0, 0] == 0 and img_mask[0, 0, 5, 5, 5] == 0 and img_mask[1, 0, 4, 4, 1] == 0
    assert img_mask[0, 0, 2, 0, 0] == 1 and img_mask[1, 0, 0, 0, 3] == 1
    assert float(img_mask.mean()) == pytest.approx(0.875)


def test_backward_reaches_encoder_and_mask_token():
    model = _mae((8, 8, 8), mask_type="random", ratio=0.5)
    pred, mask = model(torch.randn(2, 1, 8, 8, 8))
    (pred * mask).pow(2).mean().backward()
    assert model.encoder.patch_embed.proj.weight.grad is not None
    assert model.decoder.mask_token.grad.abs().sum() > 0


def test_build_mae_from_cfg_honours_decoder_sizes():
    model = build_model(tiny_vit_cfg())
    assert isinstance(model, MaskedAutoencoderViT) and model.token_size == 4 and model.grid == (4, 6)
    blk = model.decoder.blocks[0]
    assert blk.mlp.fc1.out_features == 40 and blk.attn.num_heads == 2 and len(model.decoder.blocks) == 1
    assert len(model.encoder.blocks) == 4
    assert model.decoder.mask_token.std() > 0  # learned, initialised N(0, 0.02)
    # Fixed sin-cos positions: a buffer, not a parameter.
    assert "pos_embed" in dict(model.encoder.named_buffers())
    assert not any("pos_embed" in n for n, _ in model.named_parameters())


@pytest.mark.parametrize("ndim,patch", [(2, (16, 24, 1)), (3, (8, 8, 16, 2))])
def test_unetr_loads_mae_encoder_exactly(ndim, patch):
    mae = build_model(tiny_vit_cfg(ndim, patch))
    unetr = build_model(tiny_vit_cfg(ndim, patch, arch="unetr"))
    enc = {k: v for k, v in mae.state_dict().items() if k.startswith("encoder.")}
    unetr_enc = {k for k in unetr.state_dict() if k.startswith("encoder.")}
    assert set(enc) == unetr_enc
    missing, unexpected = unetr.load_state_dict(enc, strict=False)
    assert not unexpected and all(not k.startswith("encoder.") for k in missing)
    for k, v in enc.items():
        assert torch.equal(unetr.state_dict()[k], v)
    x = torch.randn(2, patch[-1], *patch[:-1])
    out = unetr(x)
    assert out.shape == (2, 3, *patch[:-1])


def test_unetr_token_sizes_and_blocks():
    cfg = tiny_vit_cfg(2, (24, 24, 1), token=6, arch="unetr")
    cfg.MODEL.VIT_NUM_LAYERS = 6
    model = build_model(cfg)
    assert model(torch.randn(1, 1, 24, 24)).shape == (1, 3, 24, 24)
    cfg.MODEL.VIT_TOKEN_SIZE = 1
    cfg.DATA.PATCH_SIZE = (4, 4, 1)
    assert build_model(cfg)(torch.randn(1, 1, 4, 4)).shape == (1, 3, 4, 4)


def test_attention_kernel_follows_the_step_and_gives_the_float32_numbers():
    """Under CPU bf16 autocast a training forward over few tokens takes timm's plain attention (the fused kernel's
    bf16 backward is ~13x slower there); inference, float32 and many tokens keep the fused one. Same numbers."""
    model = _mae((16, 24))
    blocks = list(model.encoder.blocks) + list(model.decoder.blocks)
    x = torch.randn(2, 1, 16, 24)

    def fused_after(grad, bf16):
        with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(x, torch.Generator().manual_seed(0))[0]
        return {blk.attn.fused_attn for blk in blocks}, out.float()

    bf16_plain, float32_fused = fused_after(True, True), fused_after(True, False)
    assert bf16_plain[0] == {False} and float32_fused[0] == {True} and fused_after(False, True)[0] == {True}
    torch.testing.assert_close(bf16_plain[1], float32_fused[1], rtol=0.05, atol=0.05)  # bf16 rounding apart
    # Many tokens: the plain path's N x N weights would cost more than the fused kernel's slow backward.
    model.encoder.blocks.PLAIN_MAX_TOKENS = model.decoder.blocks.PLAIN_MAX_TOKENS = 5  # encoder 6, decoder 24
    assert fused_after(True, True)[0] == {True}


@pytest.mark.parametrize("spatial,channels,given", [((16, 24), 1, None), ((8, 12), 3, None), ((8, 12, 16), 2, None),
                                                    ((8, 12), 1, (10, 12))])
def test_visible_tokens_alone_are_embedded_as_the_convolution_embeds_them(spatial, channels, given):
    """The encoder embeds only the tokens it keeps (a quarter at mask ratio 0.75), by a matrix product over their
    pixels: the same tokens and weight gradients as the convolution over every token, in float32 under bf16
    autocast as the convolution ran. (10, 12): a partial token at the border goes through the convolution."""
    model = _mae(spatial, channels=channels)
    embed = model.encoder.patch_embed
    x = torch.randn(3, channels, *(given or spatial))
    ids_keep = torch.stack([torch.randperm(math.prod(model.encoder.grid_of(x)))[:2] for _ in range(3)])

    def kept(fn):
        embed.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            tokens = fn()
        assert tokens.dtype == torch.float32
        (tokens * torch.linspace(-1, 1, tokens.numel()).reshape(tokens.shape)).sum().backward()
        return tokens.detach(), embed.proj.weight.grad.clone(), embed.proj.bias.grad.clone()

    everyone = kept(lambda: torch.gather(embed(x), 1, ids_keep.unsqueeze(-1).expand(-1, -1, 24)))
    alone = kept(lambda: embed.embed_kept(x, ids_keep))
    for a, b in zip(alone, everyone):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # Through the encoder: its first block sees those tokens plus their positions, as before.
    with torch.no_grad():
        latent, _ = model.encoder(x, ids_keep=ids_keep)
        positions = model.encoder.position_table(model.encoder.grid_of(x)).expand(3, -1, -1)
        tokens = (embed(x) + positions).gather(1, ids_keep.unsqueeze(-1).expand(-1, -1, 24))
        for blk in model.encoder.blocks:
            tokens = blk(tokens)
        torch.testing.assert_close(latent, model.encoder.norm(tokens), rtol=1e-5, atol=1e-5)
