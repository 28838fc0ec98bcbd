"""Channels-last memory layout for the convolutional models (TRAIN.CHANNELS_LAST), set where the workflow builds them.

oneDNN (CPU) and cuDNN (recent GPUs) convolve faster with the channels varying fastest. The layout is the
weights' and the inputs' strides, so both are set: the weights here, the inputs by a forward pre-hook. Set at
build time, it serves training, validation and the test phase alike, a test-only run included, whose stitched
inference had run plain: channels-last took it to 0.72-0.80x that time on a 1024x1024 image (2D U-Net, bf16 and
float32) and 0.82x on a 48x192x192 volume (3D U-Net, bf16), on an AMD EPYC. A checkpoint loaded afterwards keeps
the layout (its values are copied into the weights), and one saved from it loads into a plain model alike.
"""
import torch
from torch import nn

from biapy.config import ndim_of

# The architectures that convolve image-shaped activations: the U-Nets, and UNETR's decoder (its ViT's tokens
# come out of the patch embedding and go back into maps channels-last at no cost). UNETR's training step and
# no-grad forward took 0.79-0.82x their plain time in channels-last (2D 128x128 x 8 and 3D 32x64x64 x 2, bf16, an
# AMD EPYC). The MAE's ViT has a single convolution, its patch embedding, and stays plain.
CHANNELS_LAST_ARCHS = ("unet", "resunet", "unetr")


def wants_channels_last(cfg) -> bool:
    return bool(cfg.TRAIN.CHANNELS_LAST) and cfg.MODEL.ARCHITECTURE in CHANNELS_LAST_ARCHS


def to_channels_last(model: nn.Module, ndim: int) -> nn.Module:
    """`model`'s weights in channels-last layout (in place) and its image inputs given channels-last strides."""
    layout = torch.channels_last_3d if ndim == 3 else torch.channels_last
    model.to(memory_format=layout)
    # A model set up twice keeps one hook of each.
    if _inputs_channels_last not in model._forward_pre_hooks.values():
        model.register_forward_pre_hook(_inputs_channels_last)
    for p in model.parameters():
        both = p.dim() == 2 + ndim and p.is_contiguous() and p.is_contiguous(memory_format=layout)
        if both and _grad_in_weight_strides not in (p._post_accumulate_grad_hooks or {}).values():
            p.register_post_accumulate_grad_hook(_grad_in_weight_strides)
    return model


def apply_layout(model: nn.Module, cfg) -> nn.Module:
    """`model` in the layout TRAIN.CHANNELS_LAST asks of its architecture."""
    return to_channels_last(model, ndim_of(cfg)) if wants_channels_last(cfg) else model


def channels_last_strides(shape):
    """The strides of a channels-last tensor of `shape` (N, C, *spatial): channels vary fastest."""
    strides, inner = [], shape[1]
    for size in reversed(shape[2:]):
        strides.insert(0, inner)
        inner *= size
    return (inner, 1, *strides)


def _inputs_channels_last(module, args):
    """Forward pre-hook: the model's image inputs in channels-last strides. torch deems a one-channel image's plain
    strides channels-last too (`contiguous(memory_format=...)` leaves them), but a convolution follows the strides
    it is given. With a plain input and the first weight given plain strides (its two layouts hold the same bytes),
    the first level had run plain and its gradients met the channels-last ones in slow mixed-layout copies and
    sums: U-Net training steps on a CPU, 2D and 3D, took 3-11% longer."""
    def restrided(x):
        if not (torch.is_tensor(x) and x.dim() in (4, 5) and x.is_floating_point()):
            return x
        want = channels_last_strides(x.shape)
        return x if x.stride() == want else torch.empty_strided(x.shape, want, dtype=x.dtype,
                                                                 device=x.device).copy_(x)
    return tuple(restrided(a) for a in args)


def _grad_in_weight_strides(p):
    """Post-accumulate-grad hook of a weight whose two layouts hold the same bytes (a 1x1 convolution's, one of a
    single input channel): its gradient given the weight's strides, which differ from the kernel's only where a
    size is 1. Which of the two a kernel returns depends on the kernel (1x1x1 weights came out plain on one thread
    and channels-last on two), and DDP, whose hooks run after this one, compares strides literally: it copied
    such gradients and warned."""
    grad = p.grad
    if grad is None or grad.stride() == p.stride():
        return
    if all(g == w for size, g, w in zip(p.shape, grad.stride(), p.stride()) if size != 1):  # the same addresses
        p.grad = grad.as_strided(p.shape, p.stride(), grad.storage_offset())
