"""Networks: `build_model(cfg)` picks one from MODEL.* and PROBLEM.*.

Every model has top-level submodules `encoder`, `decoder` and `head`, so pretrained weights move
to a downstream model by name (only `head.*` differs between a U-Net's pretext and segmentation
versions; `encoder.*` is shared by MAE and UNETR).
"""
from biapy.errors import ConfigError, shown

# (PROBLEM.TYPE, PRETEXT_TASK or None) -> architectures that combination can use.
ARCHITECTURES = {
    ("SELF_SUPERVISED", "crappify"): ("unet", "resunet"),
    ("SELF_SUPERVISED", "masking"): ("unet", "resunet", "mae"),
    ("SEMANTIC_SEG", None): ("unet", "resunet", "unetr"),
}


def _ndim(cfg) -> int:
    return 3 if cfg.PROBLEM.NDIM == "3D" else 2


def _task(cfg):
    return cfg.PROBLEM.SELF_SUPERVISED.PRETEXT_TASK if cfg.PROBLEM.TYPE == "SELF_SUPERVISED" else None


def _check_architecture(cfg):
    key = (cfg.PROBLEM.TYPE, _task(cfg))
    if key not in ARCHITECTURES:
        raise ConfigError(f"PROBLEM.TYPE: {shown(cfg.PROBLEM.TYPE)} is not valid; expected SELF_SUPERVISED or "
                          "SEMANTIC_SEG")
    allowed = ARCHITECTURES[key]
    arch = cfg.MODEL.ARCHITECTURE
    if arch not in allowed:
        what = cfg.PROBLEM.TYPE + (f" with PRETEXT_TASK {key[1]}" if key[1] else "")
        raise ConfigError(f"MODEL.ARCHITECTURE: {shown(arch)} is not available for {what}; "
                          f"expected one of {', '.join(allowed)}")
    return arch


def required_divisor(cfg) -> tuple:
    """What each spatial axis of DATA.PATCH_SIZE must be a multiple of, for MODEL.ARCHITECTURE."""
    ndim = _ndim(cfg)
    m = cfg.MODEL
    if m.ARCHITECTURE in ("mae", "unetr"):
        return (int(m.VIT_TOKEN_SIZE),) * ndim
    from biapy.models.unet import pool_factors, total_divisor
    return total_divisor(pool_factors(ndim, len(m.FEATURE_MAPS), m.Z_DOWN), ndim)


def check_patch_fits(cfg):
    """ConfigError unless every spatial axis of DATA.PATCH_SIZE is a multiple of the architecture's
    total pooling (unet/resunet) or of MODEL.VIT_TOKEN_SIZE (mae/unetr)."""
    m = cfg.MODEL  # its ARCHITECTURE was checked by check_config and _check_architecture
    spatial = tuple(cfg.DATA.PATCH_SIZE[:-1])
    div = required_divisor(cfg)
    if any(s % d for s, d in zip(spatial, div)):
        if m.ARCHITECTURE in ("mae", "unetr"):
            why = f"MODEL.VIT_TOKEN_SIZE {m.VIT_TOKEN_SIZE}"
        else:
            why = f"{len(m.FEATURE_MAPS)} levels (MODEL.FEATURE_MAPS)"
            if _ndim(cfg) == 3:
                why += f" and MODEL.Z_DOWN {shown(list(m.Z_DOWN))}"
        raise ConfigError(f"DATA.PATCH_SIZE {shown(spatial)} must be divisible by {shown(div)} for MODEL.ARCHITECTURE "
                          f"{m.ARCHITECTURE} with {why}")
    if m.ARCHITECTURE in ("unet", "resunet") and all(s == d for s, d in zip(spatial, div)):
        _check_one_pixel_bottleneck(cfg, spatial, div)


def _check_one_pixel_bottleneck(cfg, spatial, div):
    """Normalization statistics of a single value per channel are undefined (torch refuses them in training)."""
    where = (f"DATA.PATCH_SIZE ({', '.join(map(str, spatial))}) leaves a single pixel at the deepest level "
             f"(divided by ({', '.join(map(str, div))}))")
    norm = cfg.MODEL.NORMALIZATION
    if norm == "in":
        raise ConfigError(f"MODEL.NORMALIZATION: 'in' normalizes each feature map over its pixels, but {where}; "
                          "use a larger patch, fewer levels or another normalization")
    if norm == "bn" and cfg.TRAIN.ENABLE and int(cfg.TRAIN.BATCH_SIZE) == 1:
        raise ConfigError(f"TRAIN.BATCH_SIZE: 1 with MODEL.NORMALIZATION 'bn' leaves one value per channel to "
                          f"normalize, as {where}; use a batch of 2 or more, a larger patch or fewer levels")


def build_model(cfg):
    """The network for this config (CPU, float32, training mode)."""
    from biapy.models.recompute import set_recompute
    return set_recompute(_build(cfg), cfg.MODEL.ACTIVATION_CHECKPOINTING)


def _build(cfg):
    arch = _check_architecture(cfg)
    check_patch_fits(cfg)
    channels = int(cfg.DATA.PATCH_SIZE[-1])
    if arch in ("unet", "resunet"):
        from biapy.models.unet import unet_from_cfg
        out = channels if cfg.PROBLEM.TYPE == "SELF_SUPERVISED" else int(cfg.MODEL.N_CLASSES)
        return unet_from_cfg(cfg, channels, out)
    if arch == "mae":
        from biapy.models.mae import mae_from_cfg
        return mae_from_cfg(cfg, channels)
    from biapy.models.unetr import unetr_from_cfg
    return unetr_from_cfg(cfg, channels)


__all__ = ["ARCHITECTURES", "build_model", "check_patch_fits", "required_divisor"]
