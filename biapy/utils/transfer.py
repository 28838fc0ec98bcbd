"""Copies between the host and a GPU that do not stop the host.

After a copy from ordinary (pageable) host memory to a CUDA device the host waits until the stream has
done all the work queued before it, so it cannot run ahead of the GPU: at every such copy inside a loop
of forward passes the GPU drains and then idles while the host prepares the next launches. Whole-image
prediction made one per row of patches and one per mirrored border patch (an index array), which cost it a
third of its time on an H200. A copy from pinned memory is queued like a kernel. The other way, reading a
result at once waits for all the work queued before it; a copy queued into pinned memory and read later does not.
"""
import functools

import torch


# Above this a copy's own transfer outlasts the wait it saves, and pinned host memory, which the caching
# allocator keeps for reuse, is better not spent on it (a 3D slab of a large test volume can reach GBs).
PIN_LIMIT_BYTES = 64 << 20


def queue_to_device(t: torch.Tensor, device) -> torch.Tensor:
    """`t` on `device`; from the CPU to a CUDA device through pinned memory, queued without waiting."""
    device = torch.device(device)
    if (device.type != "cuda" or t.device.type != "cpu" or t.numel() * t.element_size() > PIN_LIMIT_BYTES
            or torch.compiler.is_compiling()):  # in a compiled graph the compiler places the copy
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def cache_key(device) -> torch.device:
    """`device` as a key of a per-device cache: 'cuda' names the current GPU, which may change, so the index."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def made_once_per_device(make):
    """Decorator for `make(*args, device)` -> a constant tensor on `device`: made once per arguments and device,
    as a copy to a GPU at every call (a loss's class weights each step) would wait for the work queued before it.
    The cached tensor is shared: callers must not write to it. Under torch.compile `make` is called as it is (the
    compiler does not see the cache; the graph keeps the tensor as a constant)."""
    cached = functools.lru_cache(maxsize=16)(make)

    @functools.wraps(make)
    def get(*args, device=None):
        if torch.compiler.is_compiling():
            return make(*args, device)
        return cached(*args, cache_key(device or "cpu"))
    get.cache_clear, get.cache_info = cached.cache_clear, cached.cache_info
    return get


class HostCopy:
    """A tensor's copy to the host, queued behind the work before it: `.numpy()` waits for that copy only, so
    a result read later (the next batch, the next slab) costs the host no wait for the GPU. From a CPU tensor,
    the tensor itself."""

    def __init__(self, t: torch.Tensor):
        self._event = None
        if t.device.type != "cuda":
            self._host = t
            return
        self._host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        self._host.copy_(t, non_blocking=True)
        self._event = torch.cuda.Event()
        self._event.record(torch.cuda.current_stream(t.device))

    def numpy(self):
        if self._event is not None:
            self._event.synchronize()
        return self._host.numpy()
