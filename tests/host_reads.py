"""A CPU stand-in for `torch.cuda.set_sync_debug_mode("error")`: inside `HostReads()`, the operators that read a
tensor's values back to the host raise, since on a GPU each of them makes the host wait for all the work queued
before it: a value read (`.item()`, `float()`, `bool()`), `nonzero` and indexing with a boolean mask (the
output's size), `bincount` (its size from the maximum), `unique`, `masked_select`, `equal`.

`Tensor.cpu()`, `.numpy()` and `.tolist()` call no operator on a CPU tensor: they are refused inside the block
too. Allowed: the reads by design, from the functions named in `HOST_DATA`, and the range checks that torch makes
on a CPU only (`CPU_ONLY_CHECKS`; on a GPU, device-side asserts). Other ways to a tensor's memory (`np.asarray`,
the buffer protocol) are not seen: the CUDA tests see them where a GPU is present."""
import sys

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
READS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default, aten.bincount.default,
         aten.equal.default, aten.is_nonzero.default, aten._unique2.default, aten.unique_consecutive.default,
         aten.unique_dim.default, aten.repeat_interleave.Tensor}
INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}

# This project's functions whose reads are by design: of host data (a masking batch's sample indices, its masks'
# seed; segmentation labels, checked on the host before they are copied), or the few reads the loop makes on
# purpose (the trainer's loss window every SYNC_EVERY steps; a HostCopy, read a batch after it was queued).
HOST_DATA = {"training_generator", "validation_generators", "_class_ids", "_check_ids", "_flush", "numpy"}
# torch.nn.functional's functions that check their input's range with a read on a CPU only.
CPU_ONLY_CHECKS = ("one_hot",)
TO_HOST = ("cpu", "numpy", "tolist")


def _boolean_index(func, args):
    return func in INDEXING and any(i is not None and i.dtype == torch.bool for i in args[1])


def _from_host_data(depth=2):
    frame = sys._getframe(depth)
    while frame is not None and frame.f_code.co_name not in HOST_DATA:
        frame = frame.f_back
    return frame is not None


class HostReads(TorchDispatchMode):
    """`with HostReads():` the block fails at the first read of a tensor's values outside the named places."""

    def __init__(self):
        super().__init__()
        self.checking = 0  # inside a CPU_ONLY_CHECKS function
        self._saved, self._saved_methods = {}, {}

    def __enter__(self):
        for name in CPU_ONLY_CHECKS:
            self._saved[name] = fn = getattr(F, name)
            setattr(F, name, self._unchecked(fn))
        for name in TO_HOST:
            self._saved_methods[name] = fn = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, self._refused(name, fn))
        return super().__enter__()

    def __exit__(self, *exc):
        for name, fn in self._saved.items():
            setattr(F, name, fn)
        for name, fn in self._saved_methods.items():
            setattr(torch.Tensor, name, fn)
        return super().__exit__(*exc)

    def _refused(self, name, fn):
        def call(t, *args, **kwargs):
            if not _from_host_data(1):
                raise AssertionError(f"Tensor.{name}() reads tensor values back to the host: on a GPU, a wait for it")
            return fn(t, *args, **kwargs)
        return call

    def _unchecked(self, fn):
        def call(*args, **kwargs):
            self.checking += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self.checking -= 1
        return call

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if (func in READS or _boolean_index(func, args)) and not self.checking and not _from_host_data():
            raise AssertionError(f"{func} reads tensor values back to the host: on a GPU, a wait for it")
        return func(*args, **(kwargs or {}))
