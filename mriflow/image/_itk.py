"""Conversions between nibabel images (RAS world) and ANTs / SimpleITK images (LPS world).

ITK-based libraries describe geometry by origin, spacing and a direction matrix in
LPS coordinates; nibabel uses one 4x4 affine in RAS. The conversion is exact for any
affine without shear (every scanner affine), so a voxel keeps its world position
through a round trip. Kept in memory (no temporary files) because writing and
re-reading a 1 mm volume costs about as much as a fast processing step.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import nibabel as nib
import numpy as np

__all__ = [
    "LPS",
    "affine_to_itk",
    "itk_to_affine",
    "to_ants",
    "from_ants",
    "to_sitk",
    "new_like",
    "itk_threads",
]

# RAS <-> LPS flips the first two world axes; it is its own inverse.
LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def affine_to_itk(affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split a RAS voxel-to-world affine into ITK's LPS origin, spacing and direction.

    Returns
    -------
    origin : (3,) float array, world position (LPS, mm) of voxel (0, 0, 0)
    spacing : (3,) float array, voxel size (mm) along each array axis
    direction : (3, 3) float array, unit column vectors of the array axes (LPS)
    """
    lps = LPS @ np.asarray(affine, dtype=float)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    if np.any(spacing <= 0):
        raise ValueError(f"affine has a zero-length voxel axis: {affine.tolist()}")
    direction = lps[:3, :3] / spacing
    return lps[:3, 3].copy(), spacing, direction


def itk_to_affine(origin: Any, spacing: Any, direction: Any) -> np.ndarray:
    """The RAS voxel-to-world affine of an ITK image geometry (inverse of :func:`affine_to_itk`)."""
    direction = np.asarray(direction, dtype=float).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction * np.asarray(spacing, dtype=float)
    lps[:3, 3] = np.asarray(origin, dtype=float)
    return LPS @ lps


def to_ants(img: nib.spatialimages.SpatialImage) -> Any:
    """A float32 ``ants.ANTsImage`` with the voxels and world geometry of a 3D nibabel image."""
    import ants

    data = img.get_fdata(dtype=np.float32)
    origin, spacing, direction = affine_to_itk(img.affine)
    return ants.from_numpy(
        np.ascontiguousarray(data),
        origin=origin.tolist(),
        spacing=spacing.tolist(),
        direction=direction,
    )


def to_sitk(data: np.ndarray, affine: np.ndarray) -> Any:
    """A ``SimpleITK.Image`` of a 3D array (nibabel's x, y, z order) on a RAS affine."""
    import SimpleITK as sitk

    # SimpleITK arrays are indexed (z, y, x); nibabel's (x, y, z).
    img = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(2, 1, 0)))
    origin, spacing, direction = affine_to_itk(affine)
    img.SetOrigin(origin.tolist())
    img.SetSpacing(spacing.tolist())
    img.SetDirection(direction.ravel().tolist())
    return img


def from_ants(
    aimg: Any, like: nib.spatialimages.SpatialImage | None = None, dtype: Any = np.float32
) -> nib.Nifti1Image:
    """A nibabel image from an ``ants.ANTsImage``; header fields are copied from ``like``."""
    data = aimg.numpy()
    if dtype is not None:
        data = data.astype(dtype, copy=False)
    affine = itk_to_affine(aimg.origin, aimg.spacing, aimg.direction)
    if like is not None and np.allclose(like.affine, affine, atol=1e-4):
        affine = like.affine  # keep the exact float values of the input header
    return new_like(data, affine, like)


def new_like(
    data: np.ndarray, affine: np.ndarray, like: nib.spatialimages.SpatialImage | None
) -> nib.Nifti1Image:
    """A NIfTI image on ``affine`` with ``like``'s header fields; qform and sform agree.

    The data type is the array's (scaling slope/intercept reset), so a float result is
    never written back into an 8-bit input's type.
    """
    header = like.header.copy() if isinstance(like, nib.Nifti1Image) else None
    img = nib.Nifti1Image(data, affine, header)
    img.set_data_dtype(data.dtype)
    img.header.set_slope_inter(None, None)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    return img


@contextmanager
def itk_threads(num_threads: int) -> Iterator[None]:
    """Run ANTs/ITK code with ``num_threads`` threads.

    antspyx exposes no thread setting; its ITK reads
    ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS`` when a filter is created, so the
    variable is set for the duration of the call and restored afterwards. SimpleITK's
    own global default is set too when SimpleITK is loaded: its registration method's
    thread setting does not reach every filter inside it, and the others' threads
    summing in a varying order made repeated fits differ in the last digits.
    """
    if num_threads < 1:
        raise ValueError(f"num_threads must be >= 1, got {num_threads}")
    keys = ("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "ITK_NUMBER_OF_THREADS")
    saved = {key: os.environ.get(key) for key in keys}
    sitk = sys.modules.get("SimpleITK")
    saved_sitk = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() if sitk else None
    try:
        for key in keys:
            os.environ[key] = str(num_threads)
        if sitk:
            sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(num_threads)
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if sitk:
            sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(saved_sitk)
