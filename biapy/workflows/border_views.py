"""Pixels a masked test input saw as mirror copies beyond the image border.

A patch that leaves the image reads it reflected, and the stitched 'seen' channel holds each patch's part
inside the image only: a pixel whose mirror copy was visible had been scored as hidden although the network
saw it. `BorderViews` follows one image's inputs (predict_slabs' patches in grid order, or TEST.FULL_IMG's
one input) and marks those pixels.
"""
import functools

import numpy as np

from biapy.data.patches import reflect_indices
from biapy.utils.transfer import HostCopy


@functools.lru_cache(maxsize=1024)
def _axis_view(start, length, size, pad):
    """Along one axis of an input at `start`: which of its pixels lie beyond the image, the image pixel each
    shows, and whether that pixel is one where this input's output counts (its centre, inside the padding).
    The same few starts recur on every border row of the grid."""
    span = np.arange(start, start + length)
    target = reflect_indices(start, length, size)
    arrays = (span < 0) | (span >= size), target, (start + pad <= target) & (target < start + length - pad)
    for a in arrays:
        a.flags.writeable = False  # shared by every call with these arguments
    return arrays


def _along_axes(vectors):
    """1-D vectors shaped to broadcast, each along its own axis."""
    n = len(vectors)
    return [v.reshape([-1 if a == i else 1 for a in range(n)]) for i, v in enumerate(vectors)]


class BorderViews:
    """The inputs of one image's prediction, in the order the network gets them: `note(mask)` per batch,
    `marked()` the pixels seen through the border so far. A batch's mask goes to the host behind the work queued
    before it and is read one batch later, or when `marked()` is asked: on a GPU, reading it at once made the
    host wait for every batch's forward pass, where a batch behind leaves the next one queued on the GPU. The
    lag stays one batch, so the masks held are two batches' whatever the image's size."""

    def __init__(self, starts, shape, padding, spatial):
        self._starts = iter(starts)
        self.shape, self.padding = tuple(shape), tuple(padding)
        self.seen = np.zeros(spatial, dtype=bool)
        self._pending = []  # (HostCopy of the batch's visible pixels, the batch's starts), oldest first
        self.closed = False  # the image's pass is over: later inputs are not from its grid

    def _inside(self, start):
        return all(0 <= s and s + p <= n for s, p, n in zip(start, self.shape, self.seen.shape))

    def note(self, mask):
        """A batch's (B, 1, *shape) mask, 1 = hidden."""
        if self.closed:
            return
        starts = [next(self._starts) for _ in range(mask.shape[0])]
        if all(self._inside(s) for s in starts):  # nothing of this batch beyond the border: nothing to read
            return
        self._pending.append((HostCopy(mask[:, 0] < 0.5), starts))
        self._mark_pending(keep=1)

    def marked(self):
        """The (spatial) bool array of pixels an input saw as a visible mirror copy, where its output counts."""
        self._mark_pending(keep=0)
        return self.seen

    def _mark_pending(self, keep):
        """Mark the noted batches but the newest `keep`."""
        while len(self._pending) > keep:
            copy, starts = self._pending.pop(0)
            for visible, start in zip(copy.numpy(), starts):
                if not self._inside(start):
                    self._mark(visible, start)

    def _mark(self, visible, start):
        outside, target, used = zip(*(_axis_view(s, p, n, d) for s, p, n, d in
                                      zip(start, self.shape, self.seen.shape, self.padding)))
        beyond = functools.reduce(np.logical_or, _along_axes(outside))
        counts = functools.reduce(np.logical_and, _along_axes(used))
        where = np.nonzero(visible & beyond & counts)
        self.seen[tuple(t[w] for t, w in zip(target, where))] = True
