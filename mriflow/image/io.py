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
        raise ImageError(f"{path}: not a readable image ({_one_line(err)})") from None
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
    """Raise :class:`ImageError` if ``path`` is not an image with a 3D grid.

    Reads the header only (fast enough for planning hundreds of subjects); an
    uncompressed file shorter than its header promises is caught here too, a
    truncated ``.nii.gz`` only when :func:`load_image` reads the voxels.
    """
    path = Path(path)
    if not path.exists():
        raise ImageError(f"{path}: file not found")
    size = path.stat().st_size
    if size < 348:
        raise ImageError(f"{path}: not a readable image (file is {size} bytes)")
    try:
        img = nib.load(str(path))
    except Exception as err:
        raise ImageError(f"{path}: not a readable image ({_one_line(err)})") from None
    shape = img.shape
    if len(shape) < 3 or (len(shape) > 3 and int(np.prod(shape[3:])) != 1):
        raise ImageError(f"{path}: expected a 3D image, got shape {shape}")
    if not str(path).endswith(".gz") and hasattr(img.header, "get_data_offset"):
        expected = int(img.header.get_data_offset()) + int(
            np.prod(shape) * img.get_data_dtype().itemsize
        )
        if size < expected:
            raise ImageError(
                f"{path}: truncated image (file is {size} bytes, header needs {expected})"
            )


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())
