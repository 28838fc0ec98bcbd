"""Check a merged config before any work is done.

Each problem stops the run with one ConfigError line that names the key, the value and what
was expected. The folders and files it names are checked in `folders`; its derived values are
filled in afterwards by `derived.finalize`.
"""
import math
import os

from biapy.config.derived import METRICS
from biapy.config.folders import check_folders
from biapy.errors import ConfigError, shown
from biapy.models import ARCHITECTURES  # torch-free import: the table only

LOSSES = {
    "SELF_SUPERVISED": ("MAE", "MSE", "SSIM", "W_MAE_SSIM", "W_MSE_SSIM"),
    "SEMANTIC_SEG": ("CE", "DICE", "CE_DICE"),
}


def _named_choice(value, choices):
    """The choice `value` names, its letter case ignored ('ELU' as BiaPy writes it, 'adamw'); None if none."""
    for choice in choices:
        if value == choice or (isinstance(value, str) and isinstance(choice, str) and value.lower() == choice.lower()):
            return choice
    return None


def _one_of(key, value, choices):
    """The choice `value` names (`_named_choice`); ConfigError if none."""
    choice = _named_choice(value, choices)
    if choice is None:
        names = ", ".join("'' (none)" if c == "" else str(c) for c in choices)
        raise ConfigError(f"{key}: {shown(value)} is not valid; expected one of {names}")
    return choice


def _store(node, name, value):
    if value != node[name]:  # only then: a frozen config that is already canonical passes too
        node[name] = value


def _pick(node, name, key, choices):
    """Check node[name] against `choices` and store the canonical spelling of the one it names."""
    _store(node, name, _one_of(key, node[name], choices))


def _at_least(key, value, low):
    if value < low:
        raise ConfigError(f"{key}: {value} is out of range; expected at least {low}")


def _in_open_range(key, value, low, high, include_low=False):
    ok = (low <= value < high) if include_low else (low < value < high)
    if not ok:
        bracket = "[" if include_low else "("
        raise ConfigError(f"{key}: {value} is out of range; expected a value in {bracket}{low}, {high})")


def _minus_one_or_at_least(key, value, low):
    """'-1 = automatic' keys: -1, or a value of at least `low`."""
    if value != -1 and value < low:
        raise ConfigError(f"{key}: {value} is out of range; expected -1 (automatic) or at least {low}")


def _weights(values) -> bool:
    """Every value a finite, non-negative number (booleans are not weights)."""
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < float("inf") for v in values)


def _range_pair(key, value, low=None, low_open=False):
    """A (min, max) range: two numbers, min <= max, both above `low` when given."""
    v = tuple(value)
    if len(v) != 2 or v[0] > v[1]:
        raise ConfigError(f"{key}: {v} must be two values (min, max) with min <= max")
    if low is not None and (v[0] <= low if low_open else v[0] < low):
        raise ConfigError(f"{key}: {v} is out of range; expected values {'above' if low_open else 'of at least'} {low}")


def ndim_of(cfg) -> int:
    return 3 if cfg.PROBLEM.NDIM == "3D" else 2


def _check_problem(cfg):
    _pick(cfg.PROBLEM, "TYPE", "PROBLEM.TYPE", ("SELF_SUPERVISED", "SEMANTIC_SEG"))
    _pick(cfg.PROBLEM, "NDIM", "PROBLEM.NDIM", ("2D", "3D"))
    ssl = cfg.PROBLEM.SELF_SUPERVISED
    _pick(ssl, "PRETEXT_TASK", "PROBLEM.SELF_SUPERVISED.PRETEXT_TASK", ("crappify", "masking"))
    _one_of("PROBLEM.SELF_SUPERVISED.RESIZING_FACTOR", ssl.RESIZING_FACTOR, (2, 4, 6))
    if not 0 <= ssl.NOISE <= 1:
        raise ConfigError(f"PROBLEM.SELF_SUPERVISED.NOISE: {ssl.NOISE} is out of range; expected a value in [0, 1]")
    _at_least("PROBLEM.SELF_SUPERVISED.MASK_BLOCK_SIZE", ssl.MASK_BLOCK_SIZE, 1)


def _check_patch(cfg):
    ndim = ndim_of(cfg)
    patch = cfg.DATA.PATCH_SIZE
    want = ndim + 1
    if len(patch) != want:
        layout = "(y, x, channels)" if ndim == 2 else "(z, y, x, channels)"
        raise ConfigError(f"DATA.PATCH_SIZE: {shown(tuple(patch))} has {len(patch)} values but PROBLEM.NDIM is "
                          f"{cfg.PROBLEM.NDIM}; expected {want} values {layout}")
    for value in patch:
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"DATA.PATCH_SIZE: {shown(tuple(patch))} must hold positive integers")
    spatial = tuple(patch[:-1])
    for split in ("TRAIN", "VAL", "TEST"):
        node = cfg.DATA[split]
        for name in ("OVERLAP", "PADDING"):
            value = tuple(node[name])
            key = f"DATA.{split}.{name}"
            if len(value) != ndim:
                raise ConfigError(f"{key}: {shown(value)} has {len(value)} values; expected one per spatial axis "
                                  f"({ndim})")
            if name == "OVERLAP":
                for v in value:
                    _in_open_range(key, v, 0, 1, include_low=True)
            else:
                for v, p in zip(value, spatial):
                    if not 0 <= v < p / 2 or int(v) != v:
                        raise ConfigError(f"{key}: {shown(value)} must be whole pixels below half the patch "
                                          f"{shown(spatial)}")


def _check_system(cfg):
    if not 0 <= cfg.SYSTEM.SEED < 2 ** 32:  # numpy's legacy seed range, which every generator here accepts
        raise ConfigError(f"SYSTEM.SEED: {cfg.SYSTEM.SEED} is out of range; expected 0..{2 ** 32 - 1}")
    _minus_one_or_at_least("SYSTEM.NUM_CPUS", cfg.SYSTEM.NUM_CPUS, 1)
    _minus_one_or_at_least("SYSTEM.NUM_WORKERS", cfg.SYSTEM.NUM_WORKERS, 0)


def _check_data(cfg):
    norm = cfg.DATA.NORMALIZATION
    _pick(norm, "TYPE", "DATA.NORMALIZATION.TYPE", ("zero_mean_unit_variance", "div", "scale_range", "custom"))
    fixed = norm.TYPE in ("custom", "zero_mean_unit_variance")  # the types that read MEAN_VAL/STD_VAL
    std = list(norm.ZERO_MEAN_UNIT_VAR.STD_VAL)
    if fixed and std and any(v != -1 for v in std) and not all(v > 0 for v in std):
        raise ConfigError(f"DATA.NORMALIZATION.ZERO_MEAN_UNIT_VAR.STD_VAL: {shown(std)} must hold positive values "
                          "(or be [-1.0] to measure them)")
    channels = int(cfg.DATA.PATCH_SIZE[-1])
    for name in ("MEAN_VAL", "STD_VAL"):
        values = list(norm.ZERO_MEAN_UNIT_VAR[name])
        if fixed and values != [-1.0] and len(values) not in (1, channels):
            raise ConfigError(f"DATA.NORMALIZATION.ZERO_MEAN_UNIT_VAR.{name}: {shown(values)} holds {len(values)} "
                              f"value(s) but DATA.PATCH_SIZE has {channels} channel(s); expected 1 value or one per "
                              "channel")
    clip = norm.PERC_CLIP
    if clip.ENABLE:
        for name in ("LOWER_PERC", "UPPER_PERC"):
            v = clip[name]
            if v != -1 and not 0 <= v <= 100:
                raise ConfigError(f"DATA.NORMALIZATION.PERC_CLIP.{name}: {v} is out of range; expected -1 or 0..100")
        if clip.LOWER_PERC != -1 and clip.UPPER_PERC != -1 and clip.LOWER_PERC >= clip.UPPER_PERC:
            raise ConfigError("DATA.NORMALIZATION.PERC_CLIP: LOWER_PERC must be below UPPER_PERC")
        lower, upper = list(clip.LOWER_VALUE), list(clip.UPPER_VALUE)
        if clip.LOWER_PERC == -1 and clip.UPPER_PERC == -1 and lower == [-1.0] and upper == [-1.0]:
            raise ConfigError("DATA.NORMALIZATION.PERC_CLIP.ENABLE is True but no bound is set, so nothing would be "
                              "clipped; set LOWER_PERC/UPPER_PERC (0..100) or LOWER_VALUE/UPPER_VALUE")
        if clip.LOWER_PERC == -1 and clip.UPPER_PERC == -1 and lower != [-1.0] and upper != [-1.0]:
            n = max(len(lower), len(upper))
            fits = all(len(v) in (1, n) for v in (lower, upper))  # a single value applies to every channel
            if not fits or any(lower[min(i, len(lower) - 1)] >= upper[min(i, len(upper) - 1)] for i in range(n)):
                raise ConfigError(f"DATA.NORMALIZATION.PERC_CLIP: LOWER_VALUE {shown(lower)} must be below UPPER_VALUE "
                                  f"{shown(upper)}, channel by channel (1 value, or one per channel)")
    _in_open_range("DATA.VAL.SPLIT_TRAIN", cfg.DATA.VAL.SPLIT_TRAIN, 0, 1)
    val = cfg.DATA.VAL
    if val.CROSS_VAL:
        if not val.FROM_TRAIN:
            raise ConfigError("DATA.VAL.CROSS_VAL: True needs DATA.VAL.FROM_TRAIN True (the folds are cut from the "
                              "training images); expected FROM_TRAIN True or CROSS_VAL False")
        _at_least("DATA.VAL.CROSS_VAL_NFOLD", val.CROSS_VAL_NFOLD, 2)
        if not 1 <= val.CROSS_VAL_FOLD <= val.CROSS_VAL_NFOLD:
            raise ConfigError(f"DATA.VAL.CROSS_VAL_FOLD: {val.CROSS_VAL_FOLD} is out of range; expected 1.."
                              f"{val.CROSS_VAL_NFOLD} (DATA.VAL.CROSS_VAL_NFOLD; folds count from 1)")
    ppi = cfg.DATA.TRAIN.PATCHES_PER_IMAGE
    if ppi != -1 and ppi < 1:
        raise ConfigError(f"DATA.TRAIN.PATCHES_PER_IMAGE: {ppi} is out of range; expected -1 or at least 1")


def _check_class_loss(cfg):
    loss, seg = cfg.LOSS, cfg.PROBLEM.TYPE == "SEMANTIC_SEG"
    _minus_one_or_at_least("LOSS.IGNORE_INDEX", loss.IGNORE_INDEX, 0)
    _pick(loss, "CLASS_REBALANCE", "LOSS.CLASS_REBALANCE", ("none", "manual"))
    weights = list(loss.CLASS_WEIGHTS)
    if not seg:
        changed = {"IGNORE_INDEX": loss.IGNORE_INDEX != -1, "CLASS_REBALANCE": loss.CLASS_REBALANCE != "none",
                   "CLASS_WEIGHTS": bool(weights)}
        for key, set_ in changed.items():
            if set_:
                raise ConfigError(f"LOSS.{key}: applies to semantic segmentation labels, not to {cfg.PROBLEM.TYPE}; "
                                  "expected its default")
        return
    n = cfg.MODEL.N_CLASSES
    if loss.CLASS_REBALANCE == "none" and weights:
        raise ConfigError(f"LOSS.CLASS_WEIGHTS: {shown(weights)} is set but LOSS.CLASS_REBALANCE is 'none', so it "
                          "would not be used; set LOSS.CLASS_REBALANCE 'manual'")
    if loss.CLASS_REBALANCE == "manual" and (len(weights) != n or not _weights(weights) or not sum(weights) > 0):
        raise ConfigError(f"LOSS.CLASS_WEIGHTS: {shown(weights)} must hold {n} non-negative weights (one per class of "
                          "MODEL.N_CLASSES), not all 0, with LOSS.CLASS_REBALANCE 'manual'")


def _check_model(cfg):
    m = cfg.MODEL
    task = cfg.PROBLEM.SELF_SUPERVISED.PRETEXT_TASK if cfg.PROBLEM.TYPE == "SELF_SUPERVISED" else None
    allowed = ARCHITECTURES[(cfg.PROBLEM.TYPE, task)]
    what = f"{cfg.PROBLEM.TYPE}" + (f" with PRETEXT_TASK {task}" if task else "")
    architecture = _named_choice(m.ARCHITECTURE, allowed)
    if architecture is None:
        raise ConfigError(f"MODEL.ARCHITECTURE: {shown(m.ARCHITECTURE)} is not available for {what}; "
                          f"expected one of {', '.join(allowed)}")
    _store(m, "ARCHITECTURE", architecture)
    levels = len(m.FEATURE_MAPS)
    _at_least("MODEL.FEATURE_MAPS (number of levels)", levels, 2)
    if not all(isinstance(f, int) and f >= 1 for f in m.FEATURE_MAPS):
        raise ConfigError(f"MODEL.FEATURE_MAPS: {shown(list(m.FEATURE_MAPS))} must hold positive integers")
    if len(m.DROPOUT_VALUES) != levels:
        raise ConfigError(f"MODEL.DROPOUT_VALUES: {shown(list(m.DROPOUT_VALUES))} must have one value per "
                          f"MODEL.FEATURE_MAPS level ({levels})")
    for p in m.DROPOUT_VALUES:
        _in_open_range("MODEL.DROPOUT_VALUES", p, 0, 1, include_low=True)
    _at_least("MODEL.KERNEL_SIZE", m.KERNEL_SIZE, 1)
    if m.KERNEL_SIZE % 2 == 0:  # 'same' padding of an even kernel is lopsided: skip and decoder features misalign
        raise ConfigError(f"MODEL.KERNEL_SIZE: {m.KERNEL_SIZE} must be odd (3, 5, ...) so that 'same' padding is "
                          "symmetric")
    vit = m.ARCHITECTURE in ("mae", "unetr")  # Z_DOWN pools a CNN encoder: a ViT's tokens are not pooled
    if cfg.PROBLEM.NDIM == "3D" and not vit and len(m.Z_DOWN) != levels - 1:
        raise ConfigError(f"MODEL.Z_DOWN: {shown(list(m.Z_DOWN))} must have {levels - 1} values "
                          f"(one per down-sampling of MODEL.FEATURE_MAPS)")
    for z in m.Z_DOWN:
        _one_of("MODEL.Z_DOWN values", z, (0, 1, 2))
    _pick(m, "NORMALIZATION", "MODEL.NORMALIZATION", ("bn", "in", "gn", "none"))
    _pick(m, "ACTIVATION", "MODEL.ACTIVATION", ("elu", "relu", "leaky_relu", "gelu", "silu"))
    _pick(m, "MAE_MASK_TYPE", "MODEL.MAE_MASK_TYPE", ("random", "grid"))
    _in_open_range("MODEL.MAE_MASK_RATIO", m.MAE_MASK_RATIO, 0, 1, include_low=True)
    _pick(m, "LOAD_CHECKPOINT_EPOCH", "MODEL.LOAD_CHECKPOINT_EPOCH", ("best_on_val", "last_on_train"))
    _at_least("MODEL.FREEZE_ENCODER_EPOCHS", m.FREEZE_ENCODER_EPOCHS, 0)
    if cfg.PROBLEM.TYPE == "SEMANTIC_SEG":
        _at_least("MODEL.N_CLASSES", m.N_CLASSES, 2)
        ignore = cfg.PROBLEM.SEMANTIC_SEG.IGNORE_CLASS_ID
        if ignore != -1 and not 0 <= ignore < m.N_CLASSES:
            raise ConfigError(f"PROBLEM.SEMANTIC_SEG.IGNORE_CLASS_ID: {ignore} is not a class of MODEL.N_CLASSES "
                              f"{m.N_CLASSES}; expected -1 (none) or 0..{m.N_CLASSES - 1}")
    if vit:
        _check_vit(cfg)
    if task == "masking":
        _check_masking(cfg)


def _check_masking(cfg):
    """A mask (random or grid, both hide hidden_count of the patch's blocks) must hide at least one block (U-Net)
    or token (MAE) of a patch, or nothing is learned."""
    m = cfg.MODEL
    if m.ARCHITECTURE == "mae":
        unit, unit_key = m.VIT_TOKEN_SIZE, "MODEL.VIT_TOKEN_SIZE"
    else:
        unit, unit_key = cfg.PROBLEM.SELF_SUPERVISED.MASK_BLOCK_SIZE, "PROBLEM.SELF_SUPERVISED.MASK_BLOCK_SIZE"
    spatial = tuple(cfg.DATA.PATCH_SIZE[:-1])
    blocks = math.prod(-(-s // min(unit, s)) for s in spatial)
    ratio = m.MAE_MASK_RATIO
    from biapy.models.masking import hidden_count  # late: torch (check_config imports it for check_patch_fits too)
    if hidden_count(blocks, ratio) < 1:
        raise ConfigError(f"MODEL.MAE_MASK_RATIO: {ratio} hides none of the {blocks} block(s) of {unit} pixels "
                          f"({unit_key}) in a DATA.PATCH_SIZE {spatial} patch, so masking would learn nothing; "
                          "raise the ratio or use smaller blocks")


def _check_vit(cfg):
    m = cfg.MODEL
    spatial = tuple(cfg.DATA.PATCH_SIZE[:-1])
    _at_least("MODEL.VIT_TOKEN_SIZE", m.VIT_TOKEN_SIZE, 1)
    if any(s % m.VIT_TOKEN_SIZE for s in spatial):
        raise ConfigError(f"DATA.PATCH_SIZE: spatial size {spatial} is not divisible by "
                          f"MODEL.VIT_TOKEN_SIZE {m.VIT_TOKEN_SIZE}")
    for width, heads in (("VIT_EMBED_DIM", "VIT_NUM_HEADS"), ("MAE_DEC_HIDDEN_SIZE", "MAE_DEC_NUM_HEADS")):
        _at_least(f"MODEL.{heads}", m[heads], 1)
        _at_least(f"MODEL.{width}", m[width], m[heads])  # at least one channel per head
        if m[width] % m[heads]:
            raise ConfigError(f"MODEL.{width}: {m[width]} is not divisible by MODEL.{heads} {m[heads]}")
    for key in ("VIT_NUM_LAYERS", "MAE_DEC_NUM_LAYERS", "MAE_DEC_MLP_DIMS"):
        _at_least(f"MODEL.{key}", m[key], 1)
    for key in ("VIT_MLP_RATIO", "VIT_NORM_EPS"):
        if m[key] <= 0:
            raise ConfigError(f"MODEL.{key}: {m[key]} is out of range; expected a positive number")


def _check_train(cfg):
    t = cfg.TRAIN
    if not t.ENABLE and not cfg.TEST.ENABLE:
        raise ConfigError("TRAIN.ENABLE and TEST.ENABLE are both False: the job would do nothing; set one to True")
    _pick(t, "OPTIMIZER", "TRAIN.OPTIMIZER", ("SGD", "ADAM", "ADAMW"))
    if t.LR <= 0:
        raise ConfigError(f"TRAIN.LR: {t.LR} is out of range; expected a positive number")
    _at_least("TRAIN.W_DECAY", t.W_DECAY, 0)
    if len(t.OPT_BETAS) != 2 or not all(0 <= b < 1 for b in t.OPT_BETAS):
        raise ConfigError(f"TRAIN.OPT_BETAS: {shown(tuple(t.OPT_BETAS))} must be two values in [0, 1)")
    _at_least("TRAIN.BATCH_SIZE", t.BATCH_SIZE, 1)
    _at_least("TRAIN.ACCUM_ITER", t.ACCUM_ITER, 1)
    _at_least("TRAIN.EPOCHS", t.EPOCHS, 1)
    if t.PATIENCE != -1:
        _at_least("TRAIN.PATIENCE", t.PATIENCE, 1)
    _at_least("TRAIN.GRADIENT_CLIP_NORM", t.GRADIENT_CLIP_NORM, 0)
    _pick(t, "AMP", "TRAIN.AMP", ("auto", "bf16", "fp16", "off"))
    s = t.LR_SCHEDULER
    _pick(s, "NAME", "TRAIN.LR_SCHEDULER.NAME", ("", "warmupcosine", "reduceonplateau", "onecycle"))
    if s.NAME == "warmupcosine" and s.WARMUP_COSINE_DECAY_EPOCHS > t.EPOCHS:  # equal: warmup only, as BiaPy allows
        raise ConfigError(f"TRAIN.LR_SCHEDULER.WARMUP_COSINE_DECAY_EPOCHS: {s.WARMUP_COSINE_DECAY_EPOCHS} "
                          f"must not exceed TRAIN.EPOCHS ({t.EPOCHS})")
    _minus_one_or_at_least("TRAIN.LR_SCHEDULER.REDUCEONPLATEAU_PATIENCE", s.REDUCEONPLATEAU_PATIENCE, 0)
    _minus_one_or_at_least("TRAIN.LR_SCHEDULER.WARMUP_COSINE_DECAY_EPOCHS", s.WARMUP_COSINE_DECAY_EPOCHS, 0)
    if s.MIN_LR != -1 and not 0 <= s.MIN_LR < t.LR:
        raise ConfigError(f"TRAIN.LR_SCHEDULER.MIN_LR: {s.MIN_LR} is out of range; expected -1 (automatic) or a "
                          f"value in [0, TRAIN.LR {t.LR})")
    if not 0 < s.REDUCEONPLATEAU_FACTOR < 1:
        raise ConfigError(f"TRAIN.LR_SCHEDULER.REDUCEONPLATEAU_FACTOR: {s.REDUCEONPLATEAU_FACTOR} is out of range; "
                          "expected a value in (0, 1)")
    if cfg.MODEL.SAVE_CKPT_FREQ != -1:
        _at_least("MODEL.SAVE_CKPT_FREQ", cfg.MODEL.SAVE_CKPT_FREQ, 1)


def _check_loss_and_metrics(cfg):
    problem = cfg.PROBLEM.TYPE
    if cfg.LOSS.TYPE:
        masking = problem == "SELF_SUPERVISED" and cfg.PROBLEM.SELF_SUPERVISED.PRETEXT_TASK == "masking"
        _pick(cfg.LOSS, "TYPE", "LOSS.TYPE", ("MAE", "MSE") if masking else LOSSES[problem])
    w = list(cfg.LOSS.WEIGHTS)
    if w and (len(w) != 2 or not _weights(w)):
        raise ConfigError(f"LOSS.WEIGHTS: {w} must hold two non-negative weights (or be empty)")
    if w and not sum(w) > 0:
        raise ConfigError(f"LOSS.WEIGHTS: {w} weighs both terms 0, so nothing would be learned; expected a "
                          "positive weight")
    _check_class_loss(cfg)
    for key in ("TRAIN.METRICS", "TEST.METRICS"):
        section, name = key.split(".")
        for metric in cfg[section][name]:
            _one_of(f"{key} entry", str(metric).lower(), METRICS[problem])
    if cfg.TEST.BATCH_SIZE != -1:
        _at_least("TEST.BATCH_SIZE", cfg.TEST.BATCH_SIZE, 1)
    if cfg.TEST.FULL_IMG and cfg.MODEL.ARCHITECTURE in ("mae", "unetr"):
        raise ConfigError("TEST.FULL_IMG: a ViT (MODEL.ARCHITECTURE mae/unetr) needs patches; set it to False")
    if cfg.TEST.AUGMENTATION and problem == "SELF_SUPERVISED" and cfg.PROBLEM.SELF_SUPERVISED.PRETEXT_TASK == "masking":
        raise ConfigError("TEST.AUGMENTATION: masking reconstructs what its random mask hides, so flipped views would "
                          "hide different pixels; set it to False (it applies to crappify and SEMANTIC_SEG)")


def _check_log(cfg):
    _at_least("LOG.CHART_CREATION_FREQ", cfg.LOG.CHART_CREATION_FREQ, 1)
    if cfg.LOG.RECONSTRUCTION_FREQ != -1:
        _at_least("LOG.RECONSTRUCTION_FREQ", cfg.LOG.RECONSTRUCTION_FREQ, 1)
    _at_least("LOG.RECONSTRUCTION_NUM_SAMPLES", cfg.LOG.RECONSTRUCTION_NUM_SAMPLES, 0)


def _check_augmentor(cfg):
    a = cfg.AUGMENTOR
    _at_least("AUGMENTOR.AUG_NUM_SAMPLES", a.AUG_NUM_SAMPLES, 0)
    if not 0 <= a.DA_PROB <= 1:
        raise ConfigError(f"AUGMENTOR.DA_PROB: {a.DA_PROB} is out of range; expected a value in [0, 1]")
    from biapy.data.augmentation import PROB_KEYS  # numpy only
    for key in PROB_KEYS.values():
        if a[key] != -1 and not 0 <= a[key] <= 1:
            raise ConfigError(f"AUGMENTOR.{key}: {a[key]} is out of range; expected a value in [0, 1], or -1 for "
                              "AUGMENTOR.DA_PROB")
    if not a.ENABLE:
        return  # the ranges of augmentations that never run are not read
    # (switch, its range key, lowest value, whether the lowest value itself is excluded)
    for switch, key, low, low_open in (("RANDOM_ROT", "RANDOM_ROT_RANGE", None, False),
                                       ("BRIGHTNESS", "BRIGHTNESS_FACTOR", None, False),
                                       ("CONTRAST", "CONTRAST_FACTOR", -1, True),  # multiplier 1 + factor > 0
                                       ("GAMMA_CONTRAST", "GC_GAMMA", 0, True),
                                       ("G_BLUR", "G_SIGMA", 0, False)):
        if a[switch]:
            _range_pair(f"AUGMENTOR.{key}", a[key], low, low_open)
    if a.GAUSSIAN_NOISE:
        _at_least("AUGMENTOR.GAUSSIAN_NOISE_VAR", a.GAUSSIAN_NOISE_VAR, 0)


def _fit_lengths_as_biapy(cfg):
    """All-zero lists mean 'nothing special' at any length, as BiaPy reads them: its 2D OVERLAP/PADDING pairs in
    3D, and Z_DOWN and DROPOUT_VALUES of another length than MODEL.FEATURE_MAPS asks (BiaPy's documentation
    pairs FEATURE_MAPS of 4 levels with its default 5 dropouts)."""
    ndim = ndim_of(cfg)
    for split in ("TRAIN", "VAL", "TEST"):
        for name in ("OVERLAP", "PADDING"):
            value = tuple(cfg.DATA[split][name])
            if ndim == 3 and len(value) == 2 and not any(value):
                cfg.DATA[split][name] = (0, 0, 0)
    levels = len(cfg.MODEL.FEATURE_MAPS)
    if ndim == 3 and levels >= 2 and len(cfg.MODEL.Z_DOWN) != levels - 1 and not any(cfg.MODEL.Z_DOWN):
        cfg.MODEL.Z_DOWN = [0] * (levels - 1)
    if levels >= 1 and len(cfg.MODEL.DROPOUT_VALUES) != levels and not any(cfg.MODEL.DROPOUT_VALUES):
        cfg.MODEL.DROPOUT_VALUES = [0.0] * levels


# The paths a user gives in the config; `~` in them is expanded here, before anything reads them.
USER_PATHS = tuple(f"DATA.{split}.{name}" for split in ("TRAIN", "VAL", "TEST")
                   for name in ("PATH", "GT_PATH", "SSL_SOURCE_DIR")) + ("PATHS.CHECKPOINT_FILE",)


def _expand_user_paths(cfg):
    for key in USER_PATHS:
        *parents, name = key.split(".")
        node = cfg
        for part in parents:
            node = node[part]
        if "\0" in node[name]:  # no system call takes it (Python raises ValueError), and it garbles the error line
            raise ConfigError(f"{key}: {shown(node[name])} holds a NUL character; expected a file system path")
        _store(node, name, os.path.expanduser(node[name]))


def check_config(cfg, check_paths=True):
    """Raise ConfigError on the first problem found, in the order a user would fix them."""
    _expand_user_paths(cfg)
    _check_problem(cfg)
    _check_system(cfg)
    _fit_lengths_as_biapy(cfg)
    _check_patch(cfg)
    _check_data(cfg)
    _check_model(cfg)
    _check_train(cfg)
    _check_loss_and_metrics(cfg)
    _check_log(cfg)
    _check_augmentor(cfg)
    # Late import: models depend on torch, the cheap checks above do not.
    from biapy.models import check_patch_fits
    check_patch_fits(cfg)
    if check_paths:
        check_folders(cfg)

