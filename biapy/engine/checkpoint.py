"""Checkpoint files: atomic saving, safe loading (`weights_only=True`) and tolerant weight loading.

A checkpoint is a dict of plain tensors and Python values (the config as YAML text, RNG states as
tensors/lists), so `torch.load(path, weights_only=True)` reads it without unpickling code.
"""
import errno
import logging
import pickle
import random
import re
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from biapy.data.normalization import Normalizer
from biapy.errors import BiapyError, CheckpointError, ConfigError, first_line
from biapy.utils.files import atomic_path, remove_stale_temporaries

log = logging.getLogger(__name__)

# Architectures whose checkpoints share parameter names (an MAE encoder loads into UNETR).
_FAMILIES = {"unet": "unet", "resunet": "resunet", "mae": "vit", "unetr": "vit"}
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def to_plain(value):
    """numpy arrays -> tensors, numpy scalars/Paths -> Python values, recursively (weights_only-safe)."""
    if isinstance(value, dict):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_plain(v) for v in value)
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value


@contextmanager
def _without_crc32():
    """torch.save spent 22 of its 30 ms on a 23 MB checkpoint (the 2D U-Net [16..256] with its AdamW state,
    saved every epoch) computing the CRC-32 of each record. The file is written beside its place and renamed,
    so a torn write never replaces a checkpoint, and a truncated one is still refused on loading."""
    try:
        from torch.utils.serialization import config as serialization
        config = serialization.save
        config.compute_crc32  # noqa: B018 (present since torch 2.6)
    except (ImportError, AttributeError):  # older torch: always computed
        yield
        return
    saved, config.compute_crc32 = config.compute_crc32, False
    try:
        yield
    finally:
        config.compute_crc32 = saved


def save_checkpoint(path, payload: dict) -> None:
    """Write `payload` to a temporary file beside `path`, then rename: a failure leaves the old file intact."""
    remove_stale_temporaries(path)
    try:
        with atomic_path(path) as tmp, _without_crc32():
            torch.save(payload, tmp)
    except (OSError, RuntimeError) as err:  # torch reports a full disk as RuntimeError("... file write failed")
        reason = err.strerror if isinstance(err, OSError) and err.strerror else first_line(err)
        # Asked only where the disk may be full: an OS reason of its own (a file name too long, a read-only
        # folder) is named alone. torch's writer and a short write give no errno: a full disk, most likely.
        code = getattr(err, "errno", None)
        full = code is None or code in (errno.ENOSPC, errno.EDQUOT)
        raise BiapyError(f"{path}: cannot write the checkpoint ({reason[:200]})"
                         f"{'; is the disk full?' if full else ''}") from None


def load_checkpoint(path, mmap=False) -> dict:
    """The payload of a checkpoint on CPU; CheckpointError if missing, unreadable or not a checkpoint.
    `mmap`: tensors stay in the file until used (to read a checkpoint's config without its weights)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # truncated zip, random bytes, pickled objects...
        # torch < 2.14: "Unsupported global: GLOBAL builtins.getattr"; 2.14: "unsupported GLOBAL posix.system whose..."
        found = re.search(r"unsupported (?:global: )?GLOBAL (\S+)", str(err), re.IGNORECASE)
        if isinstance(err, pickle.UnpicklingError) and found:
            raise CheckpointError(f"{path}: holds a pickled Python object ({found.group(1)}), not loaded for safety "
                                  "(torch.load weights_only=True); expected plain tensors and values") from None
        reason = first_line(err)
        if reason.startswith("Weights only load failed"):  # torch's advice to load unsafely does not apply here
            reason = "not torch data"
        elif " " not in reason and reason != type(err).__name__:  # a bare value (a text file: KeyError 101)
            reason = f"{type(err).__name__}: {reason}"
        raise CheckpointError(f"{path}: not a readable checkpoint (corrupt, truncated or not saved by "
                              f"torch with plain values): {reason}") from None
    if isinstance(state, dict) and "model" not in state and state and all(torch.is_tensor(v) for v in state.values()):
        state = {"model": state}  # a bare state_dict
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise CheckpointError(f"{path}: not a model checkpoint (no 'model' weights inside)")
    for key, value in state["model"].items():
        if not (isinstance(key, str) and torch.is_tensor(value)):
            raise CheckpointError(f"{path}: not a model checkpoint: its 'model' entry {key!r} holds a "
                                  f"{type(value).__name__}; expected tensors only")
    return _without_foreign_fields(state, path)


# This tool's checkpoint fields and metadata entries, by the type it writes them with (resume.build_payload).
_FIELD_TYPES = {"config": str, "metadata": dict, "extras": dict,
                "optimizer": dict, "scheduler": dict, "scaler": dict, "rng": dict, "began": dict, "val_split": dict,
                "epoch": int, "step_in_epoch": int, "bad_epochs": int,
                "epoch_steps": int, "world_size": int, "batch_size": int, "accum_iter": int,
                "best_val": float, "stopped_early": bool, "partial_loss": (list, tuple), "history": (list, tuple)}
_METADATA_TYPES = {"ndim": int, "in_channels": int, "n_classes": int, "architecture": str, "problem": str,
                   "pretext_task": str}


def _without_foreign_fields(state, path) -> dict:
    """`state` less the fields (and metadata entries) of another type than this tool writes: another program's
    checkpoint (a 'config' dict, say) still gives its weights, each tensor checked against the model."""
    ignored = [k for k, kind in _FIELD_TYPES.items() if state.get(k) is not None and not _of_type(state[k], kind)]
    # None stands for a field left unset (this tool's own scaler without AMP, 'began' of older runs): as absent.
    state = {k: v for k, v in state.items() if k not in ignored and not (k in _FIELD_TYPES and v is None)}
    meta = state.get("metadata") or {}
    odd = [k for k, kind in _METADATA_TYPES.items() if k in meta and not _of_type(meta[k], kind)]
    if odd:
        state["metadata"] = {k: v for k, v in meta.items() if k not in odd}
    ignored += [f"metadata {k!r}" for k in odd]
    if ignored:
        log.warning("%s: ignoring %s (not of the types this tool writes)", Path(path).name, ", ".join(ignored))
    return state


def _of_type(value, kind) -> bool:
    """`value` is of `kind` as this tool writes it: a bool is no count (True is an int to Python)."""
    return isinstance(value, kind) and (kind is bool or not isinstance(value, bool))


def _strip(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix):], True
    return name


def is_step_counter(name: str) -> bool:
    """Batch norm's update counter: a scalar of the same shape in every model, so its match proves nothing."""
    return name.endswith("num_batches_tracked")


def load_weights(model, state_dict, skip_unmatched=False, source="checkpoint", fresh=()):
    """Copy matching tensors of `state_dict` into `model`; those under the name prefixes `fresh` (another task's
    output head) are made anew whatever their shape.

    Returns (loaded_keys, skipped) where skipped lists 'name (reason)' strings. Without
    `skip_unmatched`, any tensor whose name or shape does not fit is a CheckpointError listing them.
    """
    own = model.state_dict()
    given = {_strip(k): v for k, v in state_dict.items()}
    loadable, skipped, renewed = {}, [], []
    for name, tensor in given.items():
        if name.startswith(tuple(fresh)):
            renewed.append(f"{name} (the pretraining task's output layer; made anew for this task)")
        elif name not in own:
            skipped.append(f"{name} (not in the model)")
        elif tuple(own[name].shape) != tuple(tensor.shape):
            skipped.append(f"{name} (checkpoint {tuple(tensor.shape)} vs model {tuple(own[name].shape)})")
        else:
            loadable[name] = tensor
    missing = [f"{name} (not in the checkpoint)" for name in own if name not in given]
    problems = skipped + missing
    if problems and not skip_unmatched:
        shown = "; ".join(problems[:6]) + (f"; ... {len(problems) - 6} more" if len(problems) > 6 else "")
        raise CheckpointError(f"{source}: {len(problems)} tensor(s) do not fit the model: {shown}. "
                              "Set MODEL.SKIP_UNMATCHED_LAYERS True to load the rest")
    # Weights proper: convolution and linear kernels. Counters, biases and normalization vectors fit any model
    # of the same widths (a 2D U-Net's batch norms load into the 3D one, every convolution skipped).
    if not any(tensor.dim() >= 2 for tensor in loadable.values()):
        raise CheckpointError(f"{source}: no weight matches the model by name and shape "
                              "(a checkpoint of a different architecture or other MODEL.FEATURE_MAPS?)")
    model.load_state_dict(loadable, strict=False)
    return sorted(loadable), renewed + problems


# Config keys that lay out a family's weights: their shapes, or (ViT heads) how they are read.
_LAYOUT_KEYS = {"unet": ("MODEL.FEATURE_MAPS", "MODEL.KERNEL_SIZE", "MODEL.Z_DOWN"),
                "resunet": ("MODEL.FEATURE_MAPS", "MODEL.KERNEL_SIZE", "MODEL.Z_DOWN"),
                "vit": ("MODEL.VIT_TOKEN_SIZE", "MODEL.VIT_EMBED_DIM", "MODEL.VIT_NUM_LAYERS", "MODEL.VIT_NUM_HEADS",
                        "MODEL.VIT_MLP_RATIO")}


# What build_model reads that changes what trained weights compute, by architecture: without changing
# their shapes (a fine-tune is told), and shapes outside the family's shared layout (the run's own decoder).
# MODEL.NORMALIZATION only where read: the MAE has layer norms of its own, UNETR's convolutional decoder reads it.
_FUNCTION_KEYS = {"unet": ("MODEL.ACTIVATION", "MODEL.NORMALIZATION"),
                  "resunet": ("MODEL.ACTIVATION", "MODEL.NORMALIZATION"),
                  "mae": ("MODEL.VIT_NORM_EPS", "MODEL.MAE_DEC_NUM_HEADS"),
                  "unetr": ("MODEL.ACTIVATION", "MODEL.VIT_NORM_EPS", "MODEL.NORMALIZATION")}
_OWN_LAYOUT_KEYS = {"mae": ("MODEL.MAE_DEC_HIDDEN_SIZE", "MODEL.MAE_DEC_NUM_LAYERS", "MODEL.MAE_DEC_MLP_DIMS"),
                    "unetr": ("MODEL.FEATURE_MAPS", "MODEL.KERNEL_SIZE")}


def saved_config_tree(saved_config: str) -> dict:
    """A checkpoint's own config (YAML text) as nested dicts; {} when absent or unreadable."""
    import yaml

    try:
        saved = yaml.safe_load(saved_config or "") or {}
    except yaml.YAMLError:
        return {}
    return saved if isinstance(saved, dict) else {}


def layout_key_differences(saved: dict, cfg) -> list:
    """'KEY value in the checkpoint, value here' for the layout keys on which the checkpoint's config
    (`saved_config_tree`) and `cfg` differ: why its tensors do not fit, or (head count) fit but are read another way."""
    return key_differences(saved, cfg, _LAYOUT_KEYS.get(_FAMILIES.get(str(cfg.MODEL.ARCHITECTURE), ""), ()))


def function_key_differences(saved: dict, meta: dict, cfg) -> list:
    """`key_differences` of the settings a checkpoint's weights were trained under (its inputs' normalization, and
    the _FUNCTION_KEYS its architecture and this one both read): a fine-tune may change them, and is told."""
    mine = str(cfg.MODEL.ARCHITECTURE)
    theirs = _FUNCTION_KEYS.get(str(meta.get("architecture", mine)), ())
    shared = tuple(k for k in _FUNCTION_KEYS.get(mine, ()) if k in theirs)
    return normalization_differences(saved, cfg) + key_differences(saved, cfg, shared)


_NORM = "DATA.NORMALIZATION."


def normalization_differences(saved: dict, cfg) -> list:
    """'KEY value in the checkpoint, value here' for the DATA.NORMALIZATION settings that changed what the network
    saw: those of `Normalizer.settings` (what it reads, where it reads it) that both sides read, so a clip bound only
    with clipping on in both (else ENABLE differs), MEAN_VAL only where both types read it. A checkpoint's config
    without a key predates it, so trained with its default; none without a TYPE (no config)."""
    data = saved.get("DATA")
    norm = data.get("NORMALIZATION") if isinstance(data, dict) else None
    if not (isinstance(norm, dict) and isinstance(norm.get("TYPE"), str)):
        return []
    try:
        theirs = _saved_normalizer(norm).settings()
    except (BiapyError, TypeError, ValueError) as err:  # a value this version refuses: trained otherwise for sure
        return [f"{_NORM[:-1]} in the checkpoint, not readable here ({first_line(err)})"]
    mine = Normalizer.from_cfg(cfg).settings()
    return [f"{_NORM}{key} {theirs[key]} in the checkpoint, {mine[key]} here"
            for key in theirs if key in mine and theirs[key] != mine[key]]


def _saved_normalizer(norm: dict):
    """The Normalizer a checkpoint's DATA.NORMALIZATION tree (nested dicts) describes, its absent keys at their
    defaults."""
    from biapy.config.defaults import get_defaults

    cfg = get_defaults()
    _overlay(cfg.DATA.NORMALIZATION, norm)
    return Normalizer.from_cfg(cfg)


def _overlay(node, tree: dict) -> None:
    """Set `node`'s keys (a config node) to `tree`'s values where it holds them (not None), recursively."""
    for key, default in node.items():
        given = tree.get(key)
        if isinstance(default, dict):
            if isinstance(given, dict):
                _overlay(default, given)
        elif given is not None:
            node[key] = given


def key_differences(saved: dict, cfg, keys) -> list:
    """'KEY value in the checkpoint, value here' for those of `keys` set differently in the checkpoint's config."""
    out = []
    for key in keys:
        theirs, mine = saved, cfg
        for part in key.split("."):
            theirs = theirs.get(part) if isinstance(theirs, dict) else None
            mine = mine[part]
        if theirs is None:
            continue
        theirs, mine = (list(v) if isinstance(v, (list, tuple)) else v for v in (theirs, mine))
        if theirs != mine:
            out.append(f"{key} {theirs} in the checkpoint, {mine} here")
    return out


def checkpoint_metadata(cfg) -> dict:
    ndim = 3 if str(cfg.PROBLEM.NDIM).upper() == "3D" else 2
    return {"ndim": ndim, "in_channels": int(cfg.DATA.PATCH_SIZE[-1]), "architecture": str(cfg.MODEL.ARCHITECTURE),
            "problem": str(cfg.PROBLEM.TYPE), "pretext_task": str(cfg.PROBLEM.SELF_SUPERVISED.PRETEXT_TASK),
            "n_classes": int(cfg.MODEL.N_CLASSES)}


def check_compatible(meta: dict, cfg, path) -> None:
    """CheckpointError (naming both values) when the checkpoint's ndim, channels or architecture family differ."""
    if not meta:
        return  # a bare state_dict: shapes are checked tensor by tensor
    mine = checkpoint_metadata(cfg)
    if "ndim" in meta and int(meta["ndim"]) != mine["ndim"]:
        raise CheckpointError(f"{path}: checkpoint is {meta['ndim']}D but PROBLEM.NDIM is {mine['ndim']}D")
    if "in_channels" in meta and int(meta["in_channels"]) != mine["in_channels"]:
        raise CheckpointError(f"{path}: checkpoint takes {meta['in_channels']} input channel(s) but "
                              f"DATA.PATCH_SIZE asks for {mine['in_channels']}")
    theirs = str(meta.get("architecture", mine["architecture"]))
    if _FAMILIES.get(theirs, theirs) != _FAMILIES.get(mine["architecture"], mine["architecture"]):
        raise CheckpointError(f"{path}: checkpoint is a '{theirs}' model but MODEL.ARCHITECTURE is "
                              f"'{mine['architecture']}'")


def task_name(meta) -> str:
    """'SELF_SUPERVISED masking', 'SEMANTIC_SEG': the task of a checkpoint's metadata (`checkpoint_metadata`)."""
    if meta.get("problem") == "SELF_SUPERVISED":
        return f"SELF_SUPERVISED {meta.get('pretext_task')}"
    return str(meta.get("problem"))


def other_task(meta: dict, cfg) -> bool:
    """The checkpoint was trained for another task than `cfg` asks (its output layer means something else)."""
    return bool(meta) and "problem" in meta and task_name(meta) != task_name(checkpoint_metadata(cfg))


def check_own_run(state: dict, cfg, path, run) -> None:
    """A run's own checkpoint goes on (resumed, or tested) only under the settings it was trained with: its task,
    inputs and weight layout. CheckpointError/ConfigError otherwise: testing crappify weights as masking, or with
    another DATA.NORMALIZATION.TYPE, would replace the run's outputs with meaningless ones."""
    meta = state.get("metadata") or {}
    if meta and "problem" in meta:
        theirs, mine = task_name(meta), task_name(checkpoint_metadata(cfg))
        if theirs != mine:
            raise CheckpointError(f"{path}: run {run} was trained for {theirs} but this config asks for {mine}; "
                                  "use a new --run_id or --name")
    saved = saved_config_tree(state.get("config"))
    arch = str(cfg.MODEL.ARCHITECTURE)
    keys = _FUNCTION_KEYS.get(arch, ()) + _OWN_LAYOUT_KEYS.get(arch, ())
    if cfg.PROBLEM.TYPE == "SEMANTIC_SEG":
        keys += ("MODEL.N_CLASSES",)
    if cfg.TRAIN.ENABLE:  # a resume restores the optimizer's state, which only its own TRAIN.OPTIMIZER reads
        keys += ("TRAIN.OPTIMIZER",)
        if cfg.PROBLEM.TYPE == "SEMANTIC_SEG":  # which pixels are unlabelled, and whether 0/255 masks' 255 is class 1
            keys += ("LOSS.IGNORE_INDEX",)  # (a test may score with another: it trains nothing)
    differ = (normalization_differences(saved, cfg) + key_differences(saved, cfg, keys)
              + layout_key_differences(saved, cfg))
    if differ:
        raise ConfigError(f"run {run} was trained with other settings than these ({'; '.join(differ)}): set them "
                          f"as in its training to go on with {Path(path).name}, or pass a new --run_id to train anew")


# ------------------------------------------------------------------ RNG states as plain values
def rng_states() -> dict:
    np_state = np.random.get_state()
    py_state = random.getstate()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss": py_state[2]},
        # This process's own GPU only: under torchrun rank 0's copies of the other GPUs' generators were never
        # drawn from, and restoring them reset every other rank's stream. Only once CUDA is in use: asking
        # earlier would start it (and map its libraries) in a CPU job on a GPU machine.
        "cuda": [torch.cuda.get_rng_state()] if torch.cuda.is_initialized() else [],
    }
    return states


def set_rng_states(states: dict) -> None:
    if not states:
        return
    if "torch" in states:
        torch.set_rng_state(states["torch"])
    npst = states.get("numpy")
    if npst:
        np.random.set_state(("MT19937", npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"],
                             npst["cached_gaussian"]))
    pyst = states.get("python")
    if pyst:
        random.setstate((pyst["version"], tuple(pyst["state"]), pyst["gauss"]))
    cuda = states.get("cuda") or []
    if cuda and torch.cuda.is_available():
        # One state: this process's GPU (every rank draws alike). Older checkpoints hold one per visible GPU.
        device = torch.cuda.current_device()
        torch.cuda.set_rng_state(cuda[0] if len(cuda) == 1 else cuda[min(device, len(cuda) - 1)], device)
