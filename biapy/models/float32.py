"""The layers that read the network's input or write its output run in float32 under autocast.

bf16 keeps 8 significant bits. A 16-bit image normalized by 'div' sits around, say, 0.3, where bf16 steps by
~128 counts: the input's detail is rounded away before the first convolution, and an output near 0.3 is rounded
the same way (a 2D crappify job on such data: 11.7 dB in bf16 against 13.8 dB in float32). Kept in float32, the
first convolution (its normalization then takes the offset away), a shortcut that reads the input, the ViT's
patch embedding and the output heads leave only normalized features to bf16, at a small share of the compute.
"""
import torch

_CLASSES = {}


class _Float32:
    def forward(self, x, *args, **kwargs):
        if not torch.is_autocast_enabled(x.device.type):
            return super().forward(x, *args, **kwargs)
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float(), *args, **kwargs)


def keep_float32(module):
    """`module` runs in float32 under autocast. Its class becomes a subclass of its own (parameters, state-dict
    keys and copies stay as they were)."""
    cls = type(module)
    if not issubclass(cls, _Float32):
        if cls not in _CLASSES:
            _CLASSES[cls] = type(f"Float32{cls.__name__}", (_Float32, cls), {})
        module.__class__ = _CLASSES[cls]
    return module
