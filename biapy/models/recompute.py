"""MODEL.ACTIVATION_CHECKPOINTING: keep only each block's input for the backward pass and run the
block again there, instead of keeping every intermediate activation.

The containers that loop over blocks (U-Net encoder and decoder, ViT encoder, MAE and UNETR
decoders) carry `recompute_blocks` (off by default) and call their blocks through `run`.

torch.utils.checkpoint does the same, but its first call imports torch._dynamo: ~1 s and ~155 MB
of resident memory on a CPU, about what checkpointing saves on the 3D U-Net. `_Recompute` is the
classic recompute-in-backward autograd function, with what the second run must reproduce: the
random state (dropout draws the same masks), autocast, and batch-norm running statistics (the
second run must not move them again), so the trained weights are the same with the key on or off.
"""
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def set_recompute(model: nn.Module, on: bool) -> nn.Module:
    """Switch activation checkpointing for every block container in `model`."""
    for m in model.modules():
        if hasattr(m, "recompute_blocks"):
            m.recompute_blocks = bool(on)
    return model


def run(owner: nn.Module, block: nn.Module, *inputs, fn=None):
    """(fn or block)(*inputs) -> one tensor; recomputed in the backward pass when owner.recompute_blocks is on.

    fn, when given, may also call modules without batch norm (pooling, an up-sampling convolution);
    the batch norms restored after the second run are `block`'s.
    """
    fn = block if fn is None else fn  # `fn or block` split torch.compile (2.11) into one graph per block
    if not (owner.recompute_blocks and torch.is_grad_enabled()):
        return fn(*inputs)
    # The empty tensor that needs a gradient puts the function in the graph even when no input needs
    # one (the first encoder block's input is the image), so the block's weights still get gradients.
    anchor = torch.empty(0, device=inputs[0].device, requires_grad=True)
    return _Recompute.apply(fn, block, anchor, *inputs)


class _Recompute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, block, _anchor, *inputs):
        ctx.fn, ctx.block = fn, block
        device = inputs[0].device
        ctx.device = device
        ctx.autocast = (torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type))
        ctx.rng = _rng_state(device)
        ctx.save_for_backward(*inputs)
        with torch.no_grad():
            return fn(*inputs)

    @staticmethod
    def backward(ctx, grad):
        inputs = [x.detach().requires_grad_(x.requires_grad) for x in ctx.saved_tensors]
        enabled, dtype = ctx.autocast
        # Statistics are put back after the inner backward: batch norm's backward checks they are unchanged.
        with _replayed_rng(ctx.device, ctx.rng), _statistics_kept(ctx.block):
            with torch.enable_grad(), torch.autocast(ctx.device.type, dtype=dtype, enabled=enabled):
                out = ctx.fn(*inputs)
            if out.requires_grad:  # not so for a frozen block fed by one: nothing here needs a gradient
                torch.autograd.backward(out, grad)
        return (None, None, None, *[x.grad if x.requires_grad else None for x in inputs])


def _rng_state(device):
    cpu = torch.get_rng_state()
    return cpu, (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


@contextmanager
def _replayed_rng(device, state):
    """Run with the random state of the first run; fork_rng puts the state outside back on exit."""
    cpu, cuda = state
    with torch.random.fork_rng(devices=[device] if cuda is not None else []):
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)
        yield


@contextmanager
def _statistics_kept(block):
    """Batch-norm running statistics of `block` restored on exit."""
    norms = [m for m in block.modules() if isinstance(m, _BatchNorm) and m.training and m.track_running_stats]
    saved = [[b.clone() for b in (m.running_mean, m.running_var, m.num_batches_tracked)] for m in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, (mean, var, count) in zip(norms, saved):
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)
