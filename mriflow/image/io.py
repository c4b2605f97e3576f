"""Loading images with errors that name the file and the problem."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

__all__ = ["ImageError", "load_image", "check_readable"]


class ImageError(ValueError):
    """An input image cannot be used; the message names the file and the problem."""


def load_image(path: str | Path, *, ndim: int | None = 3) -> nib.Nifti1Image:
    """Load a NIfTI image, check it is readable and has the expected dimensionality.

    A 4D image with a single volume is squeezed to 3D. The voxel data are read
    once here so that a truncated file fails now, with its name, not in a later step.

    Raises
    ------
    ImageError
        Missing, empty, truncated or unparsable file, or wrong dimensionality.
    """
    path = Path(path)
    if not path.exists():
        raise ImageError(f"{path}: file not found")
    if path.stat().st_size < 348:  # smaller than a NIfTI-1 header
        raise ImageError(f"{path}: not a readable image (file is {path.stat().st_size} bytes)")
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as err:  # nibabel raises many types for damaged files
        raise ImageError(f"{path}: not a readable image ({err})") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        img = nib.Nifti1Image(data, img.affine, img.header)
    if ndim is not None:
        if data.ndim == ndim + 1 and data.shape[-1] == 1:
            img = nib.Nifti1Image(data[..., 0], img.affine, img.header)
            data = data[..., 0]
        if data.ndim != ndim:
            raise ImageError(f"{path}: expected a {ndim}D image, got shape {data.shape}")
    if not np.all(np.isfinite(img.affine)) or abs(np.linalg.det(img.affine[:3, :3])) < 1e-8:
        raise ImageError(f"{path}: the header's affine is degenerate ({img.affine.tolist()})")
    return img


def check_readable(path: str | Path) -> None:
    """Raise :class:`ImageError` if ``path`` is not a readable 3D image."""
    load_image(path)
