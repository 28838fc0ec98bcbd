"""Masking end to end: ViT MAE and masked U-Net, 2D and 3D, MAE_checks and hidden-region scores."""
import numpy as np
import pytest

from biapy import BiaPy
from biapy.data.io import read_image
from tests.conftest import tiny_config
from tests.test_e2e_crappify import check_results_tree

MAE_MODEL = {"ARCHITECTURE": "mae", "VIT_TOKEN_SIZE": 8, "VIT_EMBED_DIM": 32, "VIT_NUM_LAYERS": 2,
             "VIT_NUM_HEADS": 2, "MAE_DEC_HIDDEN_SIZE": 16, "MAE_DEC_NUM_LAYERS": 1, "MAE_DEC_NUM_HEADS": 2,
             "MAE_DEC_MLP_DIMS": 32, "MAE_MASK_TYPE": "random", "MAE_MASK_RATIO": 0.75}


@pytest.mark.parametrize("ndim, arch", [(2, "mae"), (3, "mae"), (2, "unet"), (3, "unet")])
def test_masking_end_to_end(ndim, arch, data2d, data3d, tmp_path):
    data = data2d if ndim == 2 else data3d
    model = dict(MAE_MODEL) if arch == "mae" else {"MAE_MASK_RATIO": 0.5}
    cfg = tiny_config(data, ndim, PROBLEM={"SELF_SUPERVISED": {"PRETEXT_TASK": "masking", "MASK_BLOCK_SIZE": 4}},
                      MODEL=model, LOG={"RECONSTRUCTION_FREQ": 1, "RECONSTRUCTION_NUM_SAMPLES": 1})
    job = BiaPy(cfg, result_dir=tmp_path / "out", name="mask", run_id=1).run_job()
    check_results_tree(job, data, ndim, extra_columns=("hidden_psnr", "hidden_mse"))
    checks = sorted(job.mae_checks.iterdir())
    suffixes = ["_masked.tif", "_original.tif", "_reconstruction.tif", "_reconstruction_and_visible.tif"]
    assert len(checks) == 4 and all(any(c.name.endswith(s) for c in checks) for s in suffixes)
    stem = next(c for c in checks if c.name.endswith("_original.tif")).name[: -len("_original.tif")]
    source = next(p for p in data["train"][0].iterdir() if p.name.startswith(stem))
    original = read_image(source, ndim)
    panels = {s: read_image(job.mae_checks / f"{stem}{s}", ndim) for s in suffixes}
    for panel in panels.values():
        assert panel.shape == original.shape
    np.testing.assert_allclose(panels["_original.tif"], original.astype(np.float32))
    hidden = panels["_masked.tif"] == 0
    visible = ~hidden & (original != 0)
    # Where the input was visible the composite shows the input, elsewhere the reconstruction.
    np.testing.assert_allclose(panels["_reconstruction_and_visible.tif"][visible], original[visible].astype(np.float32))


@pytest.mark.parametrize("spatial, patch, budget, expected", [
    ((40, 50), (16, 16), 10_000, (40, 50)),                # small enough: the whole image
    ((400, 50), (16, 16), 5_000, (100, 50)),               # the long axis halved until it fits
    ((64, 512, 512), (8, 64, 64), 64 * 128 * 128, (32, 128, 256)),  # ties: the longer axis first
    ((10, 20, 20), (16, 32, 32), 100, (10, 20, 20)),       # never below the patch (or the image)
])
def test_mae_checks_region_is_a_centred_crop_within_budget(spatial, patch, budget, expected):
    from biapy.workflows.masking import check_region

    region = check_region(spatial, patch, budget)
    assert tuple(r.stop - r.start for r in region) == expected
    assert all(r.start == (n - e) // 2 for r, n, e in zip(region, spatial, expected))
    assert np.prod(expected) <= budget or all(e == min(p, n) for e, p, n in zip(expected, patch, spatial))


def test_mae_checks_of_a_large_lazily_read_volume_show_a_crop(data3d, tmp_path, monkeypatch):
    """A validation volume above the budget is shown as a centred crop read alone, never whole."""
    import biapy.workflows.masking as masking
    from biapy.data.lazy_images import LazyTiff

    monkeypatch.setattr(masking, "_CHECK_VOXELS", 8 * 16 * 16)
    spans = []
    getitem = LazyTiff.__getitem__
    monkeypatch.setattr(masking.MaskingWorkflow, "write_mae_checks", _recording(masking.MaskingWorkflow.write_mae_checks,
                                                                                LazyTiff, getitem, spans))
    cfg = tiny_config(data3d, 3, PROBLEM={"SELF_SUPERVISED": {"PRETEXT_TASK": "masking", "MASK_BLOCK_SIZE": 4}},
                      TRAIN={"EPOCHS": 1}, TEST={"ENABLE": False}, LOG={"RECONSTRUCTION_NUM_SAMPLES": 1},
                      DATA={"VAL": {"IN_MEMORY": False}})
    job = BiaPy(cfg, result_dir=tmp_path / "out", name="crop", run_id=1).run_job()
    original = next(job.mae_checks.glob("*_original.tif"))
    source = next(p for p in data3d["train"][0].iterdir() if original.name.startswith(p.name.split(".")[0]))
    whole = read_image(source, 3)
    region = masking.check_region(whole.shape[:-1], (8, 16, 16), 8 * 16 * 16)
    np.testing.assert_allclose(read_image(original, 3), whole[region].astype(np.float32))
    assert spans and max(spans) <= 8 * 16 * 16  # voxels read per access while writing the checks


def _recording(method, lazy_class, getitem, spans):
    """`method` with every lazy read it makes recorded (voxels per access)."""
    def wrapped(self, *args, **kwargs):
        def recording(img, key):
            out = getitem(img, key)
            spans.append(int(np.prod(out.shape[:-1])))
            return out
        lazy_class.__getitem__ = recording
        try:
            return method(self, *args, **kwargs)
        finally:
            lazy_class.__getitem__ = getitem
    return wrapped


@pytest.mark.parametrize("norm_pix", [True, False])
def test_norm_pix_outputs_and_metrics_are_in_the_input_units(norm_pix):
    """A network that predicts the per-token normalized target exactly: with NORM_PIX_LOSS its visible tokens map
    back to the input itself, its hidden ones with visible statistics only (outputs, MAE_checks and metrics all
    read `predict_patches`/`batch_metrics`)."""
    import torch

    from biapy.config import get_defaults
    from biapy.engine.losses import normalize_tokens
    from biapy.workflows.masking import MaskingWorkflow

    cfg = get_defaults()
    cfg.PROBLEM.SELF_SUPERVISED.NORM_PIX_LOSS = norm_pix
    cfg.TRAIN.METRICS = ["psnr"]
    from biapy.models.masking import block_mask

    wf = object.__new__(MaskingWorkflow)
    wf.cfg, wf.token_size, wf._mask_generator = cfg, 4, None
    x = torch.rand(2, 3, 16, 12) * 50 + 10
    mask = block_mask(2, (16, 12), 4, 0.5, torch.Generator().manual_seed(0))
    wf.masked_forward = lambda batch, generator=None: (normalize_tokens(batch, 4), mask)
    out = wf.predict_patches(x)
    assert out.shape == (2, 4, 16, 12) and torch.equal(out[:, 3:], 1 - mask)  # the 'seen' channel
    hidden = mask.bool().expand_as(x)
    if norm_pix:  # visible tokens come back exactly; hidden ones with the visible tokens' statistics only
        torch.testing.assert_close(out[:, :3][~hidden], x[~hidden], rtol=1e-4, atol=1e-3)
        moved = torch.where(hidden, x * 3 + 100, x)  # what the network never saw must not reach its outputs
        torch.testing.assert_close(wf.in_image_units(normalize_tokens(x, 4), moved, mask), out[:, :3])
    else:
        torch.testing.assert_close(out[:, :3], normalize_tokens(x, 4))
    metrics = wf.batch_metrics(None, (normalize_tokens(x, 4), x, mask))
    hidden_mse = metrics["hidden_mse"][0] / metrics["hidden_mse"][1]
    assert hidden_mse > (1 if norm_pix else 100)  # with NORM_PIX_LOSS a hidden token's own mean/std made it ~0


def test_mae_checks_of_validation_images_sharing_a_stem_do_not_overwrite_each_other(data2d, tmp_path):
    import shutil

    val = tmp_path / "val"
    val.mkdir()
    first = sorted(data2d["train"][0].iterdir())[0]
    shutil.copy(first, val / "cell.tif")
    shutil.copy(first, val / "cell.tiff")
    cfg = tiny_config(data2d, 2, PROBLEM={"SELF_SUPERVISED": {"PRETEXT_TASK": "masking", "MASK_BLOCK_SIZE": 4}},
                      MODEL={"MAE_MASK_RATIO": 0.5}, TRAIN={"EPOCHS": 1}, TEST={"ENABLE": False},
                      DATA={"VAL": {"FROM_TRAIN": False, "PATH": str(val)}},
                      LOG={"RECONSTRUCTION_FREQ": 1, "RECONSTRUCTION_NUM_SAMPLES": 2})
    job = BiaPy(cfg, result_dir=tmp_path / "out", name="stems", run_id=1).run_job()
    originals = sorted(p.name for p in job.mae_checks.glob("*_original.tif"))
    assert originals == ["cell_0_original.tif", "cell_1_original.tif"]


def test_test_masks_do_not_depend_on_the_test_batch_size(data2d, tmp_path):
    """Masks are drawn patch after patch from one seeded generator per image: TEST.BATCH_SIZE, a speed setting,
    leaves the outputs and scores unchanged (a generator re-seeded per batch gave every batch the same masks)."""
    import csv

    cfg = tiny_config(data2d, 2, PROBLEM={"SELF_SUPERVISED": {"PRETEXT_TASK": "masking", "MASK_BLOCK_SIZE": 4}},
                      MODEL={"MAE_MASK_RATIO": 0.5}, TRAIN={"EPOCHS": 1, "AMP": "off"})
    BiaPy(cfg, result_dir=tmp_path / "out", name="bs", run_id=1).run_job()
    results = {}
    for batch in (1, 5):
        # float32: in bf16 the channels-last kernels of other batch sizes round a few outputs differently (3e-5),
        # which moves this untrained model's SSIM of ~0.03 by 1e-3 of itself
        cfg["TRAIN"] = {"ENABLE": False, "AMP": "off"}
        cfg["TEST"] = {"BATCH_SIZE": batch}
        job = BiaPy(cfg, result_dir=tmp_path / "out", name="bs", run_id=1).run_job()
        with open(job.metrics_csv) as fh:
            results[batch] = list(csv.DictReader(fh))
        results[batch, "img"] = read_image(sorted(job.per_image.iterdir())[0], 2)
    # Other batch sizes take other convolution kernels, so scores agree to float rounding, not digit for digit;
    # other masks would move them by percents.
    assert [row["file"] for row in results[1]] == [row["file"] for row in results[5]]
    for row1, row5 in zip(results[1], results[5]):
        for key in row1.keys() - {"file"}:
            assert float(row1[key]) == pytest.approx(float(row5[key]), rel=1e-4), (row1["file"], key)
    np.testing.assert_allclose(results[1, "img"], results[5, "img"], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("spatial, patch", [((64, 64), (16, 16)), ((16, 48, 48), (8, 16, 16))])
def test_a_pixel_counts_as_hidden_only_where_every_covering_patch_hid_it(spatial, patch):
    """Even where the patch that saw a pixel weighs least (its window's corner, ~1e-4 in 2D, ~1e-6 in 3D): a
    threshold on the blended mask counted ~5% of such pixels as hidden."""
    import torch

    from biapy.config import get_defaults
    from biapy.data.normalization import Normalizer
    from biapy.data.patches import assemble, grid_starts, predict_slabs
    from biapy.models.masking import block_mask
    from biapy.workflows.masking import MaskingWorkflow

    wf = object.__new__(MaskingWorkflow)
    wf.cfg, wf.channels, wf.normalizer = get_defaults(), 1, Normalizer("div")
    wf.cfg.PROBLEM.SELF_SUPERVISED.NORM_PIX_LOSS = False
    generator, masks = torch.Generator().manual_seed(0), []

    def masked_forward(batch, _=None):
        m = block_mask(batch.shape[0], tuple(batch.shape[2:]), 4, 0.5, generator)
        masks.extend(m[:, 0])
        return batch, m

    wf.masked_forward, wf._mask_generator = masked_forward, None
    image = torch.zeros((1,) + spatial)
    overlap = (0.5,) * len(spatial)
    out = assemble(predict_slabs(lambda lo, hi: image[:, lo:hi], spatial, wf.predict_patches, patch, overlap,
                                 (0,) * len(spatial), 3), spatial)
    seen = np.zeros(spatial, bool)
    for start, m in zip(grid_starts(spatial, patch, overlap, (0,) * len(spatial)), masks):
        seen[tuple(slice(s, s + p) for s, p in zip(start, patch))] |= m.numpy() == 0
    _, hidden = wf.split_output(out, wf.normalizer.stats(np.full((4, 1), 255, np.uint8)))
    assert 0 < hidden.sum() < hidden.size
    np.testing.assert_array_equal(hidden[..., 0] == 1, ~seen)


@pytest.mark.parametrize("full_img", [False, True])
@pytest.mark.parametrize("spatial, padding", [((12, 10), (0, 0)), ((40, 36), (2, 3))])
def test_a_pixel_seen_through_its_reflection_beyond_the_border_is_not_hidden(spatial, padding, full_img):
    """An image smaller than the patch, or test padding at the border: a patch reads mirror copies of pixels.
    Where such a copy was visible the network saw the pixel, which had still been scored as hidden. With
    TEST.FULL_IMG the one input is the image mirrored up to the network's divisor (its grid of patches had been
    walked instead: a broadcast error, in the MAE_checks at the end of training too)."""
    import torch

    from biapy.config import get_defaults
    from biapy.data.normalization import Normalizer
    from biapy.data.patches import assemble, full_image_input, grid_starts, reflect_indices
    from biapy.models import required_divisor
    from biapy.models.masking import block_mask
    from biapy.workflows.masking import MaskingWorkflow

    wf = object.__new__(MaskingWorkflow)
    wf.cfg, wf.channels, wf.normalizer = get_defaults(), 1, Normalizer("div")
    wf.cfg.PROBLEM.SELF_SUPERVISED.NORM_PIX_LOSS = False
    wf.cfg.DATA.TEST.OVERLAP, wf.cfg.DATA.TEST.PADDING, wf.cfg.TEST.BATCH_SIZE = (0.5, 0.5), padding, 3
    wf.cfg.TEST.FULL_IMG = full_img
    wf.patch, wf.device, wf.model = (16, 16), torch.device("cpu"), torch.nn.Identity()
    masks = []

    def masked_forward(batch, generator):
        m = block_mask(batch.shape[0], tuple(batch.shape[2:]), 4, 0.5, generator)
        masks.extend(m[:, 0])
        return batch, m

    wf.masked_forward = masked_forward
    image = np.full(spatial + (1,), 100, np.uint8)
    stats = wf.normalizer.stats(image)
    _, hidden = wf.split_output(assemble(wf.predict_slabs(image, stats, "img.tif"), spatial), stats)
    hidden = (hidden[..., 0] == 1) & ~wf.seen_through_border
    # Seen: visible, as itself or as a mirror copy, in a patch whose output there counts (its centre).
    seen = np.zeros(spatial, bool)
    if full_img:
        views, shape, padding = [(0, 0)], full_image_input(spatial, required_divisor(wf.cfg)), (0, 0)
    else:
        views, shape = grid_starts(spatial, wf.patch, (0.5, 0.5), padding), wf.patch
    assert len(masks) == len(views) and tuple(masks[0].shape) == shape
    for start, m in zip(views, masks):
        rows, cols = (reflect_indices(s, p, n) for s, p, n in zip(start, shape, spatial))
        for i, j in zip(*np.nonzero(m.numpy() == 0)):
            r, c = rows[i], cols[j]
            if start[0] + padding[0] <= r < start[0] + shape[0] - padding[0] and \
                    start[1] + padding[1] <= c < start[1] + shape[1] - padding[1]:
                seen[r, c] = True
    assert wf.seen_through_border.any() and 0 < hidden.sum() < hidden.size
    np.testing.assert_array_equal(hidden, ~seen)
    # Patches predicted after the image are not from its grid (this had raised StopIteration).
    assert wf.predict_batch(torch.rand(2, 1, 16, 16)).shape == (2, 2, 16, 16)


def test_norm_pix_token_statistics_of_a_patch_thinner_than_the_block():
    """block_mask clips a block to a short axis (a 3D patch 4 deep, blocks of 8): so do the token statistics."""
    import torch

    from biapy.engine.losses import masked_reconstruction_loss, token_moments
    from biapy.models.masking import block_mask

    x = torch.rand(2, 1, 4, 16, 16)
    mean, std = token_moments(x, 8)
    assert mean.shape == x.shape and std.shape == x.shape
    torch.testing.assert_close(mean[0, 0, :, :8, :8], x[0, 0, :, :8, :8].mean().expand(4, 8, 8))
    mask = block_mask(2, (4, 16, 16), 8, 0.5, torch.Generator().manual_seed(0))
    assert torch.isfinite(masked_reconstruction_loss(torch.zeros_like(x), x, mask, 8, norm_pix=True))


def test_unique_mae_check_names_never_take_a_name_in_use():
    from biapy.workflows.masking import _unique_names

    names = _unique_names(["cell", "cell", "cell_1", "other"])
    assert len(set(names)) == 4 and names[2:] == ["cell_1", "other"]


def test_reconstruction_images_in_tensorboard_are_at_the_epoch_of_the_scalars(data2d, tmp_path):
    """1-based steps, as loss/val; the last epoch's panels once, not again at the end of training."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny_config(data2d, 2, PROBLEM={"SELF_SUPERVISED": {"PRETEXT_TASK": "masking", "MASK_BLOCK_SIZE": 4}},
                      MODEL={"MAE_MASK_RATIO": 0.5}, TRAIN={"EPOCHS": 2}, TEST={"ENABLE": False},
                      LOG={"RECONSTRUCTION_FREQ": 1, "RECONSTRUCTION_NUM_SAMPLES": 1})
    job = BiaPy(cfg, result_dir=tmp_path / "out", name="tb", run_id=1).run_job()
    acc = EventAccumulator(str(job.tensorboard), size_guidance={"images": 0}).Reload()
    images = [t for t in acc.Tags()["images"] if t.startswith("reconstruction/")]
    assert images
    assert [e.step for e in acc.Scalars("loss/val")] == [1, 2]
    for tag in images:
        steps = [e.step for e in acc.Images(tag)]
        assert sorted(set(steps)) == [1, 2] and steps.count(1) == steps.count(2), (tag, steps)


@pytest.mark.parametrize("arch", ["mae", "unet"])
def test_validation_masks_are_the_same_every_epoch(arch, data2d, tmp_path):
    """The validation loss picks the best checkpoint and stops early: it must move with the model, not with
    which tokens happened to be hidden that epoch. Training masks change with every batch and epoch."""
    import torch

    from biapy.config import check_config, finalize, load_config
    from biapy.engine.distributed import init_distributed
    from biapy.engine.trainer import Trainer
    from biapy.job import Job
    from biapy.workflows import get_workflow

    model = dict(MAE_MODEL) if arch == "mae" else {"MAE_MASK_RATIO": 0.5}
    cfg = load_config(tiny_config(data2d, 2, PROBLEM={"SELF_SUPERVISED": {"PRETEXT_TASK": "masking",
                                                                          "MASK_BLOCK_SIZE": 4}}, MODEL=model))
    check_config(cfg)
    job = Job(tmp_path, "val", 1)
    cfg = finalize(cfg, job)
    wf = get_workflow(cfg)(cfg, job, init_distributed("gloo"), torch.device("cpu"))
    wf.prepare_training()
    trainer = Trainer(wf)
    trainer._apply_freeze(0)
    torch.manual_seed(1)
    first = trainer._validate(0)[0]
    torch.manual_seed(2)  # the global RNG, which drew the masks before, moved on
    assert trainer._validate(1)[0] == first
    # Training masks: a function of the seed, the epoch and the batch (the same after a resume at that step),
    # another for every batch and epoch, whatever the global RNG (seeded alike on every process) does.
    first_batch, second_batch = list(wf.train_loader)[:2]
    wf.model = trainer.train_model

    def mask(batch, epoch, global_seed):
        wf.train_dataset.set_epoch(epoch)
        torch.manual_seed(global_seed)
        return wf.compute_loss(batch, train=True)[1][2]

    assert torch.equal(mask(first_batch, 0, 1), mask(first_batch, 0, 2))
    assert not torch.equal(mask(first_batch, 0, 1), mask(first_batch, 1, 1))
    assert not torch.equal(mask(first_batch, 0, 1)[:1], mask(second_batch, 0, 1)[:1])


def test_validation_masks_depend_on_the_patch_alone_not_on_batches_or_processes():
    """Under torchrun each process validates its own share (patches r, r + world, ...): the mask of a patch
    must not depend on which share or batch it came in, or losses of runs with another process count or
    batch size, or of a resumed run, would not compare."""
    import torch

    from biapy.config import get_defaults
    from biapy.models.masking import random_token_mask
    from biapy.workflows.masking import MaskingWorkflow

    wf = object.__new__(MaskingWorkflow)
    wf.cfg = get_defaults()

    def masks(indices):
        return random_token_mask(len(indices), 64, 0.75, wf.validation_generators(torch.tensor(indices)))[0]

    whole = masks(list(range(6)))
    by_rank = {i: m for r in range(2) for i, m in zip(range(r, 6, 2), masks(list(range(r, 6, 2))))}
    assert all(torch.equal(whole[i], by_rank[i]) for i in range(6))
    assert all(torch.equal(whole[i], masks([i])[0]) for i in range(6))
    assert len({tuple(m.tolist()) for m in whole}) == 6  # and still a different mask per patch


@pytest.mark.parametrize("arch", ["mae", "unet"])
def test_a_run_interrupted_mid_epoch_resumes_to_the_same_weights(arch, data2d, tmp_path, monkeypatch):
    """Training masks are drawn from the seed, the epoch and the batch, not from the global RNG: stopped by a
    signal mid-epoch and run again, a masking run ends with the weights of an uninterrupted one."""
    import os
    import signal

    import torch

    from biapy.engine.checkpoint import load_checkpoint
    from biapy.job import Job
    from biapy.workflows.masking import MaskingWorkflow

    model = dict(MAE_MODEL) if arch == "mae" else {"MAE_MASK_RATIO": 0.5}
    cfg = tiny_config(data2d, 2, PROBLEM={"SELF_SUPERVISED": {"PRETEXT_TASK": "masking", "MASK_BLOCK_SIZE": 4}},
                      MODEL=model, TRAIN={"EPOCHS": 2, "BATCH_SIZE": 2}, TEST={"ENABLE": False})
    BiaPy(cfg, result_dir=tmp_path, name="straight", run_id=1).run_job()
    calls, compute_loss = [0], MaskingWorkflow.compute_loss

    def interrupting(self, batch, train):
        if train:
            calls[0] += 1
            if calls[0] == 5:
                os.kill(os.getpid(), signal.SIGINT)  # finishes this step, saves 'last' there, stops
        return compute_loss(self, batch, train)

    monkeypatch.setattr(MaskingWorkflow, "compute_loss", interrupting)
    with pytest.raises(KeyboardInterrupt):
        BiaPy(cfg, result_dir=tmp_path, name="stopped", run_id=1).run_job()
    assert load_checkpoint(Job(tmp_path, "stopped", 1).checkpoint("last"))["step_in_epoch"] > 0
    monkeypatch.setattr(MaskingWorkflow, "compute_loss", compute_loss)
    BiaPy(cfg, result_dir=tmp_path, name="stopped", run_id=1).run_job()
    straight, resumed = (load_checkpoint(Job(tmp_path, name, 1).checkpoint("last"))["model"]
                         for name in ("straight", "stopped"))
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], msg=key)
