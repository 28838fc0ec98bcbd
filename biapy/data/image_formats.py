"""The image formats this tool knows, by file name, and the small helpers its image readers and writers share: the
extensions of each kind (TIFF, PNG/JPEG, chunked HDF5/Zarr), a path's image extension (`image_suffix`), the check of
`ndim` and the one-line wording of a reader's exception (`error_summary`).
"""
from __future__ import annotations

from pathlib import Path

TIFF_EXTS = (".tif", ".tiff")
PLAIN_EXTS = (".png", ".jpg", ".jpeg")
CHUNKED_EXTS = (".h5", ".hdf5", ".zarr")
IMAGE_EXTS = TIFF_EXTS + PLAIN_EXTS + (".nii", ".nii.gz") + CHUNKED_EXTS


def image_suffix(path) -> str:
    """A path's image extension, lower case: '.nii.gz' for a gzipped NIfTI, else its last suffix."""
    name = Path(path).name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def check_ndim(ndim):
    if ndim not in (2, 3):
        raise ValueError(f"ndim must be 2 or 3, got {ndim!r}")


def error_summary(error) -> str:
    """'Type: first line' of a reader's exception: imageio, for one, appends lines of plugins to install."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
