"""biapy.utils.transfer: copies to a GPU that the host does not wait for, and border indices made once.

The CUDA half (no synchronizing call anywhere in whole-image stitching) runs only where a GPU is present;
on a CPU the same code paths are checked for their values and their caching."""
import numpy as np
import pytest
import torch

from biapy.data.patches import predict_whole
from biapy.models.masking import _grid_order, grid_token_mask, random_token_mask
from biapy.utils.transfer import index_on, queue_to_device

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_index_on_cpu_is_the_array_itself():
    idx = np.array([3, 2, 1, 0, 1], dtype=np.int64)
    t = index_on(idx, "cpu")
    assert t.dtype == torch.int64 and t.tolist() == [3, 2, 1, 0, 1]


def test_index_on_another_device_is_made_once_per_distinct_array():
    # The meta device stands for a GPU here: no data, but a real device other than the CPU.
    a = index_on(np.array([2, 1, 0, 1, 2]), "meta")
    b = index_on(np.array([2, 1, 0, 1, 2]), torch.device("meta"))
    c = index_on(np.array([1, 0, 1, 2, 3]), "meta")
    assert a is b and a is not c
    assert a.device.type == "meta" and a.shape == (5,) and a.dtype == torch.int64


def test_queue_to_device_leaves_cpu_tensors_alone():
    t = torch.arange(6.0).reshape(2, 3)
    assert queue_to_device(t, "cpu") is t
    assert queue_to_device(t, "meta").device.type == "meta"


def test_grid_mask_order_is_made_once_per_grid_and_device():
    _grid_order.cache_clear()
    m1 = grid_token_mask((8, 8), 0.75, 2, "cpu")[0]
    m2 = grid_token_mask((8, 8), 0.75, 3, "cpu")[0]
    info = _grid_order.cache_info()
    assert (info.misses, info.hits) == (1, 1)
    assert torch.equal(m1[0], m2[0]) and int(m1[0].sum()) == 48


@cuda
def test_stitching_on_a_gpu_never_waits_for_it():
    # Mirrored borders on both axes, several rows of patches, batches of 3: every host-to-GPU copy the
    # stitching makes (input rows, border indices) must be queued, not synchronizing.
    img = torch.rand(2, 150, 170)
    expected = predict_whole(img, lambda b: b, (32, 32), (0.25, 0.25), (4, 4), batch_size=3)
    gpu = img.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = predict_whole(gpu, lambda b: b * 1.0, (32, 32), (0.25, 0.25), (4, 4), batch_size=3)
        masks = [random_token_mask(4, 196, 0.75, torch.Generator().manual_seed(0), gpu.device)[0],
                 grid_token_mask((14, 14), 0.75, 4, gpu.device)[0]]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(got.cpu(), expected)
    assert [int(m.sum()) for m in masks] == [4 * 147, 4 * 147]


@cuda
def test_workflow_rows_reach_the_gpu_without_a_wait():
    t = torch.from_numpy(np.random.default_rng(0).random((64, 64), dtype=np.float32))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        moved = queue_to_device(t, "cuda")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(moved.cpu(), t)
