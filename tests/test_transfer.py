"""Steps that never make the host wait for a GPU: copies through biapy.utils.transfer, and no value read back.

On a GPU the checks run under torch.cuda.set_sync_debug_mode("error"); on a CPU, under `HostReads`
(tests/host_reads.py), which fails on the operators that read a value back (what would wait on a GPU, but for
`.cpu()`, `.numpy()` and `.tolist()`), and the same paths are checked for their values and their caching."""
import numpy as np
import pytest
import torch

from biapy.config import get_defaults
from biapy.data.normalization import Normalizer
from biapy.data.patches import grid_starts, predict_whole
from biapy.engine import metrics as M
from biapy.models.masking import _grid_order, grid_token_mask, hidden_count, random_token_mask
from biapy.utils.transfer import queue_to_device
from biapy.workflows.crappify import CrappifyWorkflow
from tests.host_reads import HostReads

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu"] + (["cuda:0"] if torch.cuda.is_available() else [])


class _NoWait:
    """On a CUDA device, any call that makes the host wait for the GPU raises inside this block. On a CPU, where
    nothing waits, the operators that would wait there raise instead (`HostReads`)."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.reads = None if self.cuda else HostReads()

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        else:
            self.reads.__enter__()

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.set_sync_debug_mode("default")
        else:
            self.reads.__exit__(*exc)


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


def test_a_grid_mask_of_one_sample_does_not_share_the_cached_order():
    _, keep, _ = grid_token_mask((8, 8), 0.75, 1, "cpu")
    first = keep.clone()
    keep.zero_()  # a caller's own tensor: the next mask is unchanged
    assert torch.equal(grid_token_mask((8, 8), 0.75, 1, "cpu")[1], first)


def test_masks_under_torch_compile_match_eager_without_the_cache():
    _grid_order.cache_clear()
    eager = grid_token_mask((6, 10), 0.75, 2, "cpu")[0]
    compiled = torch.compile(lambda: grid_token_mask((6, 10), 0.75, 2, "cpu")[0], backend="eager", fullgraph=True)
    assert torch.equal(compiled(), eager)
    assert _grid_order.cache_info().misses == 1  # the eager call's; the compiled graph holds its own constant


@pytest.mark.parametrize("device", DEVICES)
def test_mirrored_stitching_gives_the_image_back_and_never_waits(device):
    # Mirrored borders on both axes, several rows of patches, batches of 3: every host-to-GPU copy the
    # stitching makes (border indices) must be queued, not synchronizing.
    img = torch.rand(2, 150, 170)
    with _NoWait(device):
        got = predict_whole(img.to(device), lambda b: b * 1.0, (32, 32), (0.25, 0.25), (4, 4), batch_size=3)
        masks = [random_token_mask(4, 196, 0.75, torch.Generator().manual_seed(0), device)[0],
                 grid_token_mask((14, 14), 0.75, 4, device)[0]]
    torch.testing.assert_close(got.cpu(), img)
    assert [int(m.sum()) for m in masks] == [4 * 147, 4 * 147]


@pytest.mark.parametrize("device", DEVICES)
def test_a_workflow_predicts_a_host_image_without_waiting(device):
    """The test phase's path: a numpy image read, normalized and sent to the device a row block at a time."""
    wf = object.__new__(CrappifyWorkflow)
    wf.cfg, wf.device, wf.patch, wf.normalizer = get_defaults(), torch.device(device), (32, 32), Normalizer("div")
    wf.cfg.DATA.TEST.OVERLAP, wf.cfg.DATA.TEST.PADDING, wf.cfg.TEST.BATCH_SIZE = (0.25, 0.25), (4, 4), 3
    wf.model = torch.nn.Identity()
    image = np.random.default_rng(0).integers(0, 255, (150, 170, 1)).astype(np.uint8)
    stats = wf.normalizer.stats(image)
    with _NoWait(device):
        out = wf.predict_image(image, stats, "image.tif")
    want = np.moveaxis(wf.normalizer.normalize(image, stats), -1, 0)
    np.testing.assert_allclose(out.cpu().numpy(), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_masked_stitching_notes_the_border_views_without_waiting(device):
    """Masking's test phase reads each batch's mask for the inputs that leave the image (their mirror copies are
    pixels the network saw): the read is queued and done when the slab is scored, so the stitching never waits."""
    from biapy.workflows.masking import MaskingWorkflow
    from tests.test_border_views import seen_pixel_by_pixel

    wf = object.__new__(MaskingWorkflow)
    wf.cfg, wf.device, wf.patch, wf.normalizer = get_defaults(), torch.device(device), (32, 32), Normalizer("div")
    wf.cfg.DATA.TEST.OVERLAP, wf.cfg.DATA.TEST.PADDING, wf.cfg.TEST.BATCH_SIZE = (0.25, 0.25), (4, 4), 3
    wf.model, wf.is_vit, wf.token_size, wf.ratio, wf.channels = torch.nn.Identity(), False, 8, 0.5, 1
    masks, forward = [], wf.masked_forward

    def masked_forward(x, generator):
        pred, mask = forward(x, generator)
        masks.extend(mask[:, 0])  # read after the block: on the device until then
        return pred, mask

    wf.masked_forward = masked_forward
    image = np.random.default_rng(0).integers(0, 255, (150, 170, 1)).astype(np.uint8)
    with _NoWait(device):
        out = wf.predict_image(image, wf.normalizer.stats(image), "image.tif")
    assert tuple(out.shape) == (2, 150, 170)
    views = zip(grid_starts((150, 170), (32, 32), (0.25, 0.25), (4, 4)), [m.cpu().numpy() < 0.5 for m in masks])
    want = seen_pixel_by_pixel((150, 170), (32, 32), (4, 4), views)
    assert want.any()
    np.testing.assert_array_equal(wf.seen_through_border, want)


@pytest.mark.parametrize("device", DEVICES)
def test_a_masking_training_step_leaves_the_indices_on_the_host_and_never_waits(device):
    """The ViT MAE's step is bound by the host on a GPU: the batch's sample indices, which seed its masks, stay on
    the host (read back from the device, the seed would wait for the GPU every step), and nothing else waits."""
    from types import SimpleNamespace

    from biapy.models import build_model
    from biapy.workflows.masking import MaskingWorkflow
    from tests.test_mae import tiny_vit_cfg

    wf = object.__new__(MaskingWorkflow)
    wf.cfg = tiny_vit_cfg()
    wf.device, wf.is_vit, wf.token_size = torch.device(device), True, wf.cfg.MODEL.VIT_TOKEN_SIZE
    wf.train_dataset = SimpleNamespace(epoch=3)
    torch.manual_seed(0)
    wf.model = build_model(wf.cfg).to(device).train()
    x, indices = torch.rand(2, 1, 16, 24), torch.tensor([5, 9])
    with _NoWait(device):
        loss, (pred, _, mask) = wf.compute_loss((x.to(device), indices), train=True)
        loss.backward()
    assert indices.device.type == "cpu" and torch.isfinite(loss)
    same = wf.model(x.to(device), generator=wf.training_generator(indices, torch.device(device)))[1]
    assert torch.equal(mask, same) and int(mask[0].sum()) == hidden_count(24, 0.75) * 16


@pytest.mark.parametrize("device", DEVICES)
def test_validation_scores_stay_on_the_device_until_the_epoch_ends(device):
    """Segmentation's IoU/Dice and masking's hidden-pixel MSE of a validation batch are summed on the device (a
    count read back, or the pixels selected first, had waited for the GPU at every batch), and a batch with
    nothing to score counts for nothing."""
    from biapy.engine.metrics import MetricAverager
    from biapy.workflows.masking import MaskingWorkflow
    from biapy.workflows.segmentation import SegmentationWorkflow

    seg = object.__new__(SegmentationWorkflow)
    seg.cfg, seg.n_classes, seg.ignore = get_defaults(), 3, 255
    seg.cfg.TRAIN.METRICS = ["iou", "dice"]
    gen = torch.Generator().manual_seed(0)
    logits, y = torch.randn(2, 3, 8, 8, generator=gen), torch.randint(0, 3, (2, 8, 8), generator=gen)
    unlabelled = torch.full_like(y, 255)
    mae = object.__new__(MaskingWorkflow)
    mae.cfg = get_defaults()
    mae.cfg.TRAIN.METRICS = ["psnr"]
    x, pred = torch.rand(2, 1, 8, 8, generator=gen), torch.rand(2, 1, 8, 8, generator=gen)
    mask = (torch.rand(2, 1, 8, 8, generator=gen) < 0.5).float()
    averager = MetricAverager()
    with _NoWait(device):
        for labels in (y, unlabelled):
            averager.update_many(seg.batch_metrics(None, (logits.to(device), labels.to(device))))
        for m in (mask, torch.zeros_like(mask)):
            averager.update_many(mae.batch_metrics(None, (pred.to(device), x.to(device), m.to(device))))
    got = averager.result()
    pred_labels = logits.argmax(1)
    for name, fn in (("iou", M.iou_per_class), ("dice", M.dice_per_class)):
        per_class = fn(pred_labels, y, 3)[1:]  # IGNORE_CLASS_ID 0 left out of the mean
        assert got[name] == pytest.approx(float(per_class.nanmean()))
    assert got["hidden_mse"] == pytest.approx(float(((pred - x) ** 2)[mask > 0.5].mean()))


@pytest.mark.parametrize("device", DEVICES)
def test_class_weighted_losses_make_their_weights_once_per_device_and_never_wait(device):
    """LOSS.CLASS_WEIGHTS go to the device once, not at every step (a copy from ordinary memory waits for the GPU)."""
    from biapy.engine.losses import _weights, cross_entropy, soft_dice_loss

    _weights.cache_clear()
    logits = torch.randn(2, 3, 8, 8, device=device)
    labels = torch.randint(0, 3, (2, 8, 8), device=device)
    with _NoWait(device):
        for _ in range(2):
            ce = cross_entropy(logits, labels, class_weights=[0.2, 1.0, 3.0])
            dice = soft_dice_loss(logits, labels, class_weights=[0.2, 1.0, 3.0])
        other = cross_entropy(logits, labels, class_weights=[1.0, 1.0, 1.0])
    assert (_weights.cache_info().hits, _weights.cache_info().misses) == (3, 2)
    w = torch.tensor([0.2, 1.0, 3.0], device=device)[labels]
    per_pixel = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    torch.testing.assert_close(ce, (per_pixel * w).sum() / w.sum())
    torch.testing.assert_close(other, per_pixel.mean())
    assert 0 < float(dice) < 1


@pytest.mark.parametrize("device", DEVICES)
def test_a_segmentation_step_on_binary_masks_never_waits(device):
    """0/255 masks read as classes 0 and 1: the ids are a new host tensor each step, sent through pinned memory
    (from ordinary memory the copy waits for the GPU's queue)."""
    from biapy.engine.losses import build_loss
    from biapy.workflows.segmentation import SegmentationWorkflow

    wf = object.__new__(SegmentationWorkflow)
    wf.cfg = get_defaults()
    wf.cfg.LOSS.TYPE = "CE"
    wf.device, wf.n_classes, wf.ignore, wf.binary_masks = torch.device(device), 2, -1, {"training"}
    wf.loss_fn = build_loss(wf.cfg)
    wf.model = torch.nn.Conv2d(1, 2, 3, padding=1).to(device)
    x = torch.rand(2, 1, 16, 16)
    masks = (torch.rand(2, 1, 16, 16) > 0.5).long() * 255
    with _NoWait(device):
        loss, (logits, y) = wf.compute_loss((x.to(device), masks), train=True)
        loss.backward()
    assert torch.equal(y.cpu(), masks // 255) and torch.isfinite(loss)


@cuda
def test_queue_to_device_does_not_synchronize():
    t = torch.from_numpy(np.random.default_rng(0).random((64, 64), dtype=np.float32))
    with _NoWait("cuda:0"):
        moved = queue_to_device(t, "cuda:0")
    assert torch.equal(moved.cpu(), t)



@pytest.mark.parametrize("job", ["crappify", "masked_unet_3d", "mae", "segmentation"])
def test_no_training_validation_or_test_batch_reads_a_value_back(job, data2d, data3d, tmp_path, monkeypatch):
    """Every training step (data, forward, loss, backward, optimizer, the loss kept for the bar), every validation
    batch (loss and scores) and every batch of the test phase's stitched prediction of a real job, under
    `HostReads`: none reads a tensor's value back, which on a GPU would make the host wait for it at every step.
    Only the epoch's end (its loss, its scores) and each finished slab of a test image are read."""
    from biapy import BiaPy
    from biapy.engine.trainer import Trainer
    from biapy.workflows.base import Workflow
    from tests.conftest import tiny_config
    from tests.test_e2e_masking import MAE_MODEL

    def guarded(method):
        def call(*args, **kwargs):
            with HostReads():
                return method(*args, **kwargs)
        return call

    monkeypatch.setattr(Trainer, "_steps", guarded(Trainer._steps))
    validate = Trainer._validate

    def guarded_batches(self, epoch):  # each batch's loss and scores guarded; the epoch's totals are read after
        monkeypatch.setattr(self.wf, "compute_loss", guarded(self.wf.compute_loss))
        monkeypatch.setattr(self.wf, "batch_metrics", guarded(self.wf.batch_metrics))
        return validate(self, epoch)

    monkeypatch.setattr(Trainer, "_validate", guarded_batches)
    monkeypatch.setattr(Workflow, "predict_batch", guarded(Workflow.predict_batch))
    masking = {"SELF_SUPERVISED": {"PRETEXT_TASK": "masking", "MASK_BLOCK_SIZE": 4}}
    metrics = ["iou", "dice"] if job == "segmentation" else ["psnr", "ssim"]
    common = dict(TRAIN={"EPOCHS": 1, "METRICS": metrics},
                  SYSTEM={"NUM_WORKERS": 1})  # the loader in its own process: its host work is no step's
    if job == "masked_unet_3d":
        cfg = tiny_config(data3d, 3, PROBLEM=masking, MODEL={"MAE_MASK_RATIO": 0.5}, **common)
    elif job == "mae":
        cfg = tiny_config(data2d, 2, PROBLEM=masking, MODEL=dict(MAE_MODEL), **common)
    elif job == "segmentation":  # with unlabelled pixels and class weights: the paths with the most checks
        cfg = tiny_config(data2d, 2, MODEL={"N_CLASSES": 2}, LOSS={"TYPE": "CE_DICE", "IGNORE_INDEX": 255,
                                                                   "CLASS_REBALANCE": "manual",
                                                                   "CLASS_WEIGHTS": [0.3, 1.0]}, **common)
        cfg["PROBLEM"]["TYPE"] = "SEMANTIC_SEG"
        cfg["DATA"]["TRAIN"]["GT_PATH"] = str(data2d["train"][1])
        cfg["DATA"]["TEST"]["GT_PATH"] = str(data2d["test"][1])
    else:
        cfg = tiny_config(data2d, 2, **common)
    done = BiaPy(cfg, result_dir=tmp_path / "out", name=job, run_id=1).run_job()
    assert done.checkpoint("last").is_file() and done.metrics_csv.is_file()
