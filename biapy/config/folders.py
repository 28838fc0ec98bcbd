"""Check the folders and files a config names, on the file system, before any work is done.

Image and label folders must exist and be folders, a checkpoint to load must be a file, and crappify's
copy folders must neither be an image folder nor be shared by two. `check_config` runs these checks
unless it is told not to look at paths (check_paths=False).
"""
from pathlib import Path

from biapy.config.derived import ssl_copy_dir
from biapy.errors import CheckpointError, ConfigError


def _kind(key, path) -> str:
    """'folder', 'file', 'other' or 'missing': what `path` names; ConfigError naming `key` where the system cannot
    look it up (a name longer than 255 bytes, a path longer than PATH_MAX: pathlib raises, not False)."""
    try:
        p = Path(path)
        if not p.exists():
            return "missing"
        return "folder" if p.is_dir() else "file" if p.is_file() else "other"
    except OSError as err:
        raise ConfigError(f"{key}: cannot look up {path} ({err.strerror or err}); expected a path the file system "
                          "can hold (each name in it at most 255 bytes, the whole at most 4096)") from None


def _check_folder(key, path):
    what = "label images" if key.endswith("GT_PATH") else "images"
    if not path:
        raise ConfigError(f"{key} is empty; expected the folder that holds the {what}")
    # Images are read from a folder (an HDF5 file or Zarr store is one image in it, as any other format).
    kind = _kind(key, path)
    if kind == "missing":
        raise ConfigError(f"{key}: folder {path} does not exist")
    if kind == "file":
        raise ConfigError(f"{key}: {path} is a file; expected a folder of {what} (put {Path(path).name} in a "
                          "folder of its own)")
    if kind == "other":
        raise ConfigError(f"{key}: {path} is not a folder; expected a folder of {what}")


def check_folders(cfg):
    seg = cfg.PROBLEM.TYPE == "SEMANTIC_SEG"
    if cfg.TRAIN.ENABLE:
        _check_folder("DATA.TRAIN.PATH", cfg.DATA.TRAIN.PATH)
        if seg:
            _check_folder("DATA.TRAIN.GT_PATH", cfg.DATA.TRAIN.GT_PATH)
        if not cfg.DATA.VAL.FROM_TRAIN:
            _check_folder("DATA.VAL.PATH", cfg.DATA.VAL.PATH)
            if seg:
                _check_folder("DATA.VAL.GT_PATH", cfg.DATA.VAL.GT_PATH)
    ckpt = cfg.PATHS.CHECKPOINT_FILE
    kind = _kind("PATHS.CHECKPOINT_FILE", ckpt) if cfg.MODEL.LOAD_CHECKPOINT and ckpt else None
    if kind == "folder":
        raise CheckpointError(f"PATHS.CHECKPOINT_FILE: {ckpt} is a folder; expected a checkpoint file (.pth)")
    if kind in ("missing", "other"):
        raise CheckpointError(f"{ckpt}: checkpoint file not found (PATHS.CHECKPOINT_FILE)")
    if cfg.TEST.ENABLE:
        _check_folder("DATA.TEST.PATH", cfg.DATA.TEST.PATH)
        if seg and cfg.DATA.TEST.LOAD_GT:
            _check_folder("DATA.TEST.GT_PATH", cfg.DATA.TEST.GT_PATH)
    if cfg.PROBLEM.TYPE == "SELF_SUPERVISED" and cfg.PROBLEM.SELF_SUPERVISED.PRETEXT_TASK == "crappify":
        _check_ssl_sources(cfg)


def _ssl_sources(cfg) -> dict:
    """{split: (copy folder, source folder)} of the splits this run degrades, with finalize's defaults."""
    splits = []
    if cfg.TRAIN.ENABLE:
        splits += ["TRAIN"] if cfg.DATA.VAL.FROM_TRAIN else ["TRAIN", "VAL"]
    if cfg.TEST.ENABLE:
        splits.append("TEST")
    return {split: (ssl_copy_dir(cfg.DATA, split), cfg.DATA[split].PATH) for split in splits}


def _check_ssl_sources(cfg):
    """Degraded copies are written under their source's file names: a copy folder that is an image folder
    would replace the user's images, and one shared by two source folders would mix their copies."""
    inputs = {f"DATA.{split}.{name}": cfg.DATA[split][name] for split in ("TRAIN", "VAL", "TEST")
              for name in ("PATH", "GT_PATH") if cfg.DATA[split][name]}
    seen = {}
    for split, (copies, source) in _ssl_sources(cfg).items():
        key, where = f"DATA.{split}.SSL_SOURCE_DIR", Path(copies).resolve()
        if _kind(key, where) in ("file", "other"):
            raise ConfigError(f"{key}: {copies} is a file; expected a folder for the degraded copies")
        for input_key, folder in inputs.items():
            if Path(folder).resolve() == where:
                raise ConfigError(f"{key}: {copies} is the image folder of {input_key}; the degraded copies would "
                                  "replace its images. Expected a folder of their own (or leave it empty)")
        other = seen.get(where)
        if other is not None and Path(other[1]).resolve() != Path(source).resolve():
            raise ConfigError(f"{key}: {copies} is also {other[0]}, which degrades another image folder; copies "
                              "of files with the same name would replace each other. Expected a folder per "
                              "image folder")
        seen[where] = (key, source)
