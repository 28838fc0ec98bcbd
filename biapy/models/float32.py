"""The layers that read the network's input or write its output run in float32 under autocast.

bf16 keeps 8 significant bits. A 16-bit image normalized by 'div' sits around, say, 0.3, where bf16 steps by
~128 counts: the input's detail is rounded away before the first convolution, and an output near 0.3 is rounded
the same way (a 2D crappify job on such data: 11.7 dB in bf16 against 13.8 dB in float32). Kept in float32, the
first convolution (its normalization then takes the offset away), a shortcut that reads the input, the ViT's
patch embedding and the output heads leave only normalized features to bf16, at a small share of the compute.
"""
import torch
from torch import nn

_CLASSES = {}


class _Float32:
    def forward(self, x, *args, **kwargs):
        if not torch.is_autocast_enabled(x.device.type):
            return super().forward(x, *args, **kwargs)
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float(), *args, **kwargs)


def _float32_class(cls):
    if cls not in _CLASSES:
        name = f"Float32{cls.__name__}"
        _CLASSES[cls] = type(name, (_Float32, cls), {"__module__": __name__, "__qualname__": name})
    return _CLASSES[cls]


def __getattr__(name):
    """`Float32Conv2d` and the like by name, as pickle looks a layer's class up."""
    base = getattr(nn, name[len("Float32"):], None) if name.startswith("Float32") else None
    if isinstance(base, type) and issubclass(base, nn.Module):
        return _float32_class(base)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def keep_float32(module):
    """`module`, a torch.nn layer, runs in float32 under autocast. Its class becomes a subclass of its own
    (parameters, state-dict keys, copies and pickles stay as they were)."""
    cls = type(module)
    if not issubclass(cls, _Float32):
        if getattr(nn, cls.__name__, None) is not cls:
            raise TypeError(f"keep_float32: {cls.__name__} is not a torch.nn layer")
        module.__class__ = _float32_class(cls)
    return module
