"""Spatial steps on nibabel images: reorient, resample, crop, pad, resize.

Every function returns a new image whose affine maps its voxels to the same
world (scanner) coordinates as the input, so a landmark keeps its world position.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import nibabel as nib
import numpy as np
from nibabel.processing import resample_from_to

__all__ = [
    "INTERPOLATION_ORDER",
    "reorient_to_ras",
    "resample_to_voxel_size",
    "crop_to_mask",
    "crop_or_pad",
    "resize_to_shape",
    "fit_to_shape",
    "zero_outside_mask",
    "fit_masked_to_shape",
    "world_to_voxel",
    "voxel_to_world",
]

Interpolation = Literal["nearest", "linear", "bspline"]
INTERPOLATION_ORDER: dict[str, int] = {"nearest": 0, "linear": 1, "bspline": 3}


def _order(interpolation: str) -> int:
    try:
        return INTERPOLATION_ORDER[interpolation]
    except KeyError:
        raise ValueError(
            f"interpolation must be one of {sorted(INTERPOLATION_ORDER)}, got {interpolation!r}"
        ) from None


def _new_image(
    data: np.ndarray, affine: np.ndarray, like: nib.spatialimages.SpatialImage
) -> nib.Nifti1Image:
    """A NIfTI image with ``like``'s header fields but a new grid; qform and sform agree."""
    header = like.header.copy() if isinstance(like, nib.Nifti1Image) else None
    img = nib.Nifti1Image(data, affine, header)
    img.set_data_dtype(data.dtype)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    return img


def voxel_to_world(affine: np.ndarray, ijk: np.ndarray) -> np.ndarray:
    """World coordinates (mm) of voxel indices ``ijk`` of shape (..., 3)."""
    return nib.affines.apply_affine(affine, ijk)


def world_to_voxel(affine: np.ndarray, xyz: np.ndarray) -> np.ndarray:
    """Continuous voxel indices of world coordinates ``xyz`` of shape (..., 3)."""
    return nib.affines.apply_affine(np.linalg.inv(affine), xyz)


def reorient_to_ras(img: nib.spatialimages.SpatialImage) -> nib.Nifti1Image:
    """Reorder and flip the voxel axes so that they run Right, Anterior, Superior.

    Only axis permutations and flips are applied (no interpolation), so voxel
    values are unchanged; any of the 48 axis orientations maps to RAS+.
    """
    ornt = nib.orientations.io_orientation(img.affine)
    ras = nib.orientations.axcodes2ornt(("R", "A", "S"))
    if np.array_equal(ornt, ras):
        return _new_image(np.asanyarray(img.dataobj), img.affine.copy(), img)
    transform = nib.orientations.ornt_transform(ornt, ras)
    data = nib.orientations.apply_orientation(np.asanyarray(img.dataobj), transform)
    affine = img.affine @ nib.orientations.inv_ornt_aff(transform, img.shape[:3])
    return _new_image(np.ascontiguousarray(data), affine, img)


def resample_to_voxel_size(
    img: nib.spatialimages.SpatialImage,
    voxel_size: float | Sequence[float] = 1.0,
    interpolation: Interpolation = "linear",
) -> nib.Nifti1Image:
    """Resample to (isotropic) voxels of ``voxel_size`` mm over the same field of view.

    The new grid keeps the input's axis directions and the outer edge of its
    first voxel, and covers at least the input's extent. ``nearest`` keeps label
    values (use it for masks and segmentations); ``linear`` and ``bspline`` are for
    intensity images (B-spline output is clipped to the input's range to avoid
    overshoot at sharp edges).

    Parameters
    ----------
    img : 3D image
    voxel_size : float or sequence of 3 floats, mm, > 0
    interpolation : {"nearest", "linear", "bspline"}
    """
    order = _order(interpolation)
    target = np.broadcast_to(np.asarray(voxel_size, dtype=float), (3,))
    if np.any(target <= 0) or not np.all(np.isfinite(target)):
        raise ValueError(f"voxel_size must be positive, got {voxel_size!r}")
    shape = np.asarray(img.shape[:3])
    zooms = np.sqrt((img.affine[:3, :3] ** 2).sum(axis=0))
    if np.allclose(zooms, target, rtol=1e-4, atol=1e-5):
        return _new_image(np.asanyarray(img.dataobj), img.affine.copy(), img)
    new_shape = np.maximum(np.ceil(shape * zooms / target - 1e-3).astype(int), 1)
    affine = _rescaled_affine(img.affine, target / zooms)
    return _resample(img, tuple(int(s) for s in new_shape), affine, order)


def _rescaled_affine(affine: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Affine of a grid whose voxel steps are ``scale`` old voxels, outer edges aligned.

    New voxel i sits at old-voxel coordinate ``-0.5 + scale/2 + i*scale``.
    """
    new_to_old = np.eye(4)
    new_to_old[:3, :3] = np.diag(scale)
    new_to_old[:3, 3] = -0.5 + scale / 2
    return affine @ new_to_old


def _resample(
    img: nib.spatialimages.SpatialImage,
    shape: tuple[int, int, int],
    affine: np.ndarray,
    order: int,
) -> nib.Nifti1Image:
    data = np.asanyarray(img.dataobj)
    is_label = order == 0
    src = nib.Nifti1Image(data if is_label else data.astype(np.float32), img.affine)
    out = resample_from_to(src, (shape, affine), order=order, mode="constant", cval=0.0)
    result = np.asanyarray(out.dataobj)
    if is_label:
        result = result.astype(data.dtype)
    else:
        if order > 1:  # B-spline overshoots at sharp edges
            result = np.clip(result, float(data.min()), float(data.max()))
        result = result.astype(np.float32)
    return _new_image(result, affine, img)


def crop_to_mask(
    img: nib.spatialimages.SpatialImage,
    mask: nib.spatialimages.SpatialImage | np.ndarray,
    margin_mm: float = 0.0,
) -> nib.Nifti1Image:
    """Crop to the bounding box of the nonzero voxels of ``mask`` plus a margin.

    ``mask`` is an image on the same grid as ``img`` (or an array of its shape).
    The margin is converted to voxels per axis and the box is clipped to the image.
    """
    mask_data = np.asanyarray(getattr(mask, "dataobj", mask))
    if mask_data.shape[:3] != img.shape[:3]:
        raise ValueError(f"mask shape {mask_data.shape} does not match image shape {img.shape}")
    if margin_mm < 0:
        raise ValueError(f"margin_mm must be >= 0, got {margin_mm}")
    if isinstance(mask, nib.spatialimages.SpatialImage) and not np.allclose(
        mask.affine, img.affine, atol=1e-3
    ):
        raise ValueError("mask and image are not on the same grid (affines differ)")
    nonzero = np.argwhere(mask_data != 0)
    if nonzero.size == 0:
        raise ValueError("mask is empty: nothing to crop to")
    zooms = np.sqrt((img.affine[:3, :3] ** 2).sum(axis=0))
    margin = np.ceil(margin_mm / zooms).astype(int)
    lo = np.maximum(nonzero.min(axis=0) - margin, 0)
    hi = np.minimum(nonzero.max(axis=0) + 1 + margin, img.shape[:3])
    return _window(img, lo, hi - lo)


def _window(
    img: nib.spatialimages.SpatialImage, start: np.ndarray, shape: Sequence[int]
) -> nib.Nifti1Image:
    """The box of ``shape`` voxels starting at voxel ``start`` (may reach outside: zero-filled)."""
    data = np.asanyarray(img.dataobj)
    shape = tuple(int(s) for s in shape)
    out = np.zeros(shape + data.shape[3:], dtype=data.dtype)
    src_lo = np.maximum(start, 0)
    src_hi = np.minimum(start + np.asarray(shape), data.shape[:3])
    if np.all(src_hi > src_lo):
        dst_lo = src_lo - start
        dst_hi = dst_lo + (src_hi - src_lo)
        out[tuple(slice(a, b) for a, b in zip(dst_lo, dst_hi))] = data[
            tuple(slice(a, b) for a, b in zip(src_lo, src_hi))
        ]
    affine = img.affine @ nib.affines.from_matvec(np.eye(3), np.asarray(start, dtype=float))
    return _new_image(out, affine, img)


def crop_or_pad(img: nib.spatialimages.SpatialImage, shape: Sequence[int]) -> nib.Nifti1Image:
    """Center-crop and/or zero-pad to ``shape`` voxels, keeping world coordinates.

    Like TorchIO's ``CropOrPad``: when a dimension shrinks by an odd number of
    voxels, the extra voxel is taken from the end.
    """
    target = np.asarray(shape, dtype=int)
    if target.shape != (3,) or np.any(target < 1):
        raise ValueError(f"shape must be 3 positive integers, got {tuple(shape)!r}")
    start = (np.asarray(img.shape[:3]) - target) // 2
    return _window(img, start, target)


def resize_to_shape(
    img: nib.spatialimages.SpatialImage,
    shape: Sequence[int],
    interpolation: Interpolation = "linear",
) -> nib.Nifti1Image:
    """Resample to exactly ``shape`` voxels over the same field of view.

    Voxel sizes change by ``old_shape / shape`` per axis; the affine is updated so
    the image still covers the same world box.
    """
    order = _order(interpolation)
    target = np.asarray(shape, dtype=int)
    if target.shape != (3,) or np.any(target < 1):
        raise ValueError(f"shape must be 3 positive integers, got {tuple(shape)!r}")
    affine = _rescaled_affine(img.affine, np.asarray(img.shape[:3]) / target)
    return _resample(img, tuple(int(s) for s in target), affine, order)


def fit_to_shape(
    img: nib.spatialimages.SpatialImage,
    mask: nib.spatialimages.SpatialImage,
    shape: Sequence[int],
    *,
    margin_mm: float = 10.0,
    mode: Literal["crop_or_pad", "resize"] = "crop_or_pad",
    interpolation: Interpolation = "linear",
) -> nib.Nifti1Image:
    """A fixed-shape, model-ready grid: crop to the brain box (+ margin), then fit ``shape``.

    ``crop_or_pad`` keeps the voxel size (centered on the brain box; a brain larger
    than ``shape`` loses its outermost margin first); ``resize`` resamples the box
    to ``shape`` (voxel size changes). Apply with the same ``mask`` to an image, its
    mask and its labels (``interpolation="nearest"``) to get them on one grid.
    """
    if mode not in ("crop_or_pad", "resize"):
        raise ValueError(f"mode must be 'crop_or_pad' or 'resize', got {mode!r}")
    cropped = crop_to_mask(img, mask, margin_mm=margin_mm)
    if mode == "resize":
        return resize_to_shape(cropped, shape, interpolation)
    return crop_or_pad(cropped, shape)


def zero_outside_mask(
    img: nib.spatialimages.SpatialImage, mask: nib.spatialimages.SpatialImage
) -> nib.Nifti1Image:
    """``img`` with every voxel outside ``mask`` (nonzero = inside, same grid) set to 0.

    A skull-stripped image resampled with linear interpolation spreads a rim of small
    values past the nearest-neighbour-resampled mask; a model-ready volume and its mask
    must agree voxel for voxel.
    """
    if img.shape[:3] != mask.shape[:3] or not np.allclose(img.affine, mask.affine, atol=1e-4):
        raise ValueError("zero_outside_mask: the image and the mask are on different grids")
    data = np.asanyarray(img.dataobj)
    inside = np.asanyarray(mask.dataobj).reshape(mask.shape[:3]) > 0
    out = np.where(inside.reshape(inside.shape + (1,) * (data.ndim - 3)), data, 0)
    return _new_image(out.astype(data.dtype, copy=False), img.affine, img)


def fit_masked_to_shape(
    img: nib.spatialimages.SpatialImage,
    mask: nib.spatialimages.SpatialImage,
    shape: Sequence[int],
    *,
    dseg: nib.spatialimages.SpatialImage | None = None,
    margin_mm: float = 10.0,
    mode: Literal["crop_or_pad", "resize"] = "crop_or_pad",
) -> tuple[nib.Nifti1Image, nib.Nifti1Image, nib.Nifti1Image | None]:
    """A model-ready triple on one fixed-shape grid (:func:`fit_to_shape`): the image
    (linear, zero outside the fitted mask), its brain mask and labels (nearest)."""
    fitted_mask = fit_to_shape(
        mask, mask, shape, margin_mm=margin_mm, mode=mode, interpolation="nearest"
    )
    fitted = fit_to_shape(img, mask, shape, margin_mm=margin_mm, mode=mode)
    fitted_dseg = None
    if dseg is not None:
        fitted_dseg = fit_to_shape(
            dseg, mask, shape, margin_mm=margin_mm, mode=mode, interpolation="nearest"
        )
    return zero_outside_mask(fitted, fitted_mask), fitted_mask, fitted_dseg
