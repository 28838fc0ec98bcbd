"""The four cases of the benchmark suite (bench/run_all.py), shared by the scripts that measure them
(bench_recompute.py, profile_mae.py): their configs at CPU, GPU and --quick sizes, the synthetic images
they train on, and a case's workflow and trainer built as a job builds them.
"""
import json

import numpy as np

# Sizes a user would pick for the device: (cpu, gpu) overrides of the case's config.
CASES = {
    "2d_crappify": {
        "title": "2D crappify U-Net",
        "ndim": 2,
        "config": {"PROBLEM": {"SELF_SUPERVISED": {"PRETEXT_TASK": "crappify", "RESIZING_FACTOR": 4, "NOISE": 0.2}},
                   "MODEL": {"ARCHITECTURE": "unet"}, "LOSS": {"TYPE": "MAE"},
                   "AUGMENTOR": {"ENABLE": True, "VFLIP": True, "HFLIP": True, "ROT90": True}},
        "cpu": {"patch": (128, 128), "batch": 8, "fmaps": [16, 32, 64, 128, 256], "image": (1024, 1024)},
        # 48 steps: an epoch of ~0.6 s on an H200, as the other cases' 12 (with 12, the GPU's one drain
        # per epoch, at the loss read-back, weighed 1/12 of the figure).
        "gpu": {"patch": (256, 256), "batch": 16, "fmaps": [32, 64, 128, 256, 512], "image": (2048, 2048),
                "steps": 48},
    },
    "3d_crappify": {
        "title": "3D crappify U-Net",
        "ndim": 3,
        "config": {"PROBLEM": {"SELF_SUPERVISED": {"PRETEXT_TASK": "crappify", "RESIZING_FACTOR": 2, "NOISE": 0.2}},
                   "MODEL": {"ARCHITECTURE": "unet", "Z_DOWN": [1, 2, 2]}, "LOSS": {"TYPE": "MAE"},
                   "AUGMENTOR": {"ENABLE": True, "VFLIP": True, "HFLIP": True, "ZFLIP": True}},
        "cpu": {"patch": (32, 64, 64), "batch": 2, "fmaps": [16, 32, 64, 128], "image": (48, 192, 192), "steps": 6},
        "gpu": {"patch": (64, 128, 128), "batch": 4, "fmaps": [32, 64, 128, 256], "image": (128, 512, 512)},
    },
    "2d_mae": {
        "title": "2D ViT MAE",
        "ndim": 2,
        "config": {"PROBLEM": {"SELF_SUPERVISED": {"PRETEXT_TASK": "masking"}},
                   "MODEL": {"ARCHITECTURE": "mae", "MAE_MASK_RATIO": 0.75, "MAE_MASK_TYPE": "random"},
                   "AUGMENTOR": {"ENABLE": True, "VFLIP": True, "HFLIP": True}},
        "cpu": {"patch": (128, 128), "batch": 16, "image": (1024, 1024),
                "vit": {"VIT_TOKEN_SIZE": 8, "VIT_EMBED_DIM": 256, "VIT_NUM_LAYERS": 6, "VIT_NUM_HEADS": 8,
                        "MAE_DEC_HIDDEN_SIZE": 128, "MAE_DEC_NUM_LAYERS": 2, "MAE_DEC_NUM_HEADS": 4,
                        "MAE_DEC_MLP_DIMS": 512}},
        "gpu": {"patch": (224, 224), "batch": 64, "image": (2048, 2048),
                "vit": {"VIT_TOKEN_SIZE": 16, "VIT_EMBED_DIM": 768, "VIT_NUM_LAYERS": 12, "VIT_NUM_HEADS": 12,
                        "MAE_DEC_HIDDEN_SIZE": 512, "MAE_DEC_NUM_LAYERS": 8, "MAE_DEC_NUM_HEADS": 16,
                        "MAE_DEC_MLP_DIMS": 2048}},
    },
    "3d_masked_unet": {
        "title": "3D masked U-Net",
        "ndim": 3,
        "config": {"PROBLEM": {"SELF_SUPERVISED": {"PRETEXT_TASK": "masking", "MASK_BLOCK_SIZE": 8}},
                   "MODEL": {"ARCHITECTURE": "unet", "MAE_MASK_RATIO": 0.6, "Z_DOWN": [1, 2, 2]},
                   "AUGMENTOR": {"ENABLE": True, "VFLIP": True, "HFLIP": True, "ZFLIP": True}},
        "cpu": {"patch": (32, 64, 64), "batch": 2, "fmaps": [16, 32, 64, 128], "image": (48, 192, 192), "steps": 6},
        "gpu": {"patch": (64, 128, 128), "batch": 4, "fmaps": [32, 64, 128, 256], "image": (128, 512, 512)},
    },
}
QUICK = {"2d_crappify": {"patch": (64, 64), "batch": 4, "fmaps": [8, 16, 32], "image": (256, 256)},
         "3d_crappify": {"patch": (16, 32, 32), "batch": 2, "fmaps": [8, 16, 32], "image": (32, 96, 96)},
         "2d_mae": {"patch": (64, 64), "batch": 8, "image": (256, 256),
                    "vit": {"VIT_TOKEN_SIZE": 16, "VIT_EMBED_DIM": 64, "VIT_NUM_LAYERS": 2, "VIT_NUM_HEADS": 4,
                            "MAE_DEC_HIDDEN_SIZE": 32, "MAE_DEC_NUM_LAYERS": 1, "MAE_DEC_NUM_HEADS": 4,
                            "MAE_DEC_MLP_DIMS": 64}},
         "3d_masked_unet": {"patch": (16, 32, 32), "batch": 2, "fmaps": [8, 16, 32], "image": (32, 96, 96)}}


def write_images(folder, shape, count, ndim, seed):
    """Synthetic nuclei images; big ones are tiled from a smaller draw (drawing nuclei is slow)."""
    from biapy.data.image_writing import write_image
    from biapy.data.synthetic import nuclei_image

    folder.mkdir(parents=True, exist_ok=True)
    tile = tuple(min(s, 256 if ndim == 2 else 64) for s in shape)
    for i in range(count):
        img, _ = nuclei_image(tile, max(8, int(np.prod(tile) / (4000 if ndim == 2 else 40000))), seed=seed + i)
        reps = [int(np.ceil(s / t)) for s, t in zip(shape, tile)] + [1]
        img = np.tile(img, reps)[tuple(slice(0, s) for s in shape)]
        write_image(folder / f"img_{i:02d}.tif", img, ndim)


def case_config(name, size, data, steps, device, workers=-1):
    spec = CASES[name]
    ndim = spec["ndim"]
    patch = tuple(size["patch"]) + (1,)
    cfg = json.loads(json.dumps(spec["config"]))  # deep copy
    cfg.setdefault("PROBLEM", {}).update({"TYPE": "SELF_SUPERVISED", "NDIM": f"{ndim}D"})
    model = cfg.setdefault("MODEL", {})
    if "fmaps" in size:
        model.update({"FEATURE_MAPS": size["fmaps"], "DROPOUT_VALUES": [0.0] * len(size["fmaps"])})
        if ndim == 3:
            model["Z_DOWN"] = [1] + [2] * (len(size["fmaps"]) - 2)
    model.update(size.get("vit", {}))
    n_train = 2  # training images written by run_case
    cfg.update({
        "SYSTEM": {"SEED": 0, "NUM_CPUS": -1, "NUM_WORKERS": workers},
        "DATA": {"PATCH_SIZE": patch, "NORMALIZATION": {"TYPE": "zero_mean_unit_variance"},
                 "TRAIN": {"PATH": str(data / "train"), "IN_MEMORY": True,
                           "PATCHES_PER_IMAGE": steps * size["batch"] // n_train},
                 "VAL": {"FROM_TRAIN": False, "PATH": str(data / "val"), "IN_MEMORY": True},
                 "TEST": {"PATH": str(data / "test"), "OVERLAP": (0.25,) * ndim,
                          "PADDING": tuple(max(1, p // 8) for p in size["patch"])}},
        "TRAIN": {"ENABLE": True, "OPTIMIZER": "ADAMW", "LR": 1e-3, "BATCH_SIZE": size["batch"], "EPOCHS": 100},
        "TEST": {"ENABLE": False},
    })
    if device.startswith("cuda"):
        cfg["TRAIN"]["AMP"] = "auto"  # bf16 where the GPU has it natively, else fp16 with loss scaling
    return cfg


def case_trainer(case, size, data, steps, device, workers=-1, overrides=None):
    """A case's workflow and trainer as a job builds them (threads, memory, cuDNN as the job runner sets them),
    on synthetic training and validation images it writes under `data`; training not yet begun.
    Returns (cfg, wf, trainer)."""
    import torch

    from biapy.config import check_config, finalize, load_config
    from biapy.config.derived import cores_per_process
    from biapy.config.load import merge_values
    from biapy.engine.distributed import init_distributed
    from biapy.engine.trainer import Trainer
    from biapy.job import Job
    from biapy.utils.memory import tune_process_memory
    from biapy.workflows import get_workflow

    ndim = CASES[case]["ndim"]
    write_images(data / "train", size["image"], 2, ndim, seed=1)
    write_images(data / "val", tuple(p * 2 for p in size["patch"]), 1, ndim, seed=20)
    cfg = load_config(case_config(case, size, data, steps, device, workers))
    merge_values(cfg, dict(overrides or {}), "--set")
    check_config(cfg)
    job = Job(data.parent / "results", case, 1)
    cfg = finalize(cfg, job)
    torch.set_num_threads(cores_per_process(cfg.SYSTEM.NUM_CPUS))  # as the job runner does, and the next line
    tune_process_memory(torch.device(device))
    if device.startswith("cuda"):  # as the job runner does too: its GPU current, cuDNN timing its algorithms
        torch.cuda.set_device(torch.device(device))
        torch.backends.cudnn.benchmark = True
    wf = get_workflow(cfg)(cfg, job, init_distributed("gloo"), torch.device(device))
    wf.prepare_training()
    trainer = Trainer(wf)
    trainer._apply_freeze(0)  # builds the train/eval wrappers as fit() does
    return cfg, wf, trainer
