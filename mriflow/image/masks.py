"""Small operations on binary masks shared by the image steps."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

__all__ = ["bounding_box", "foreground_mask", "largest_component"]


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 6-connected piece of ``mask`` (bool; unchanged when it has one)."""
    labels, count = ndi.label(mask)
    if count <= 1:
        return mask.astype(bool)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def bounding_box(mask: np.ndarray, pad: int) -> tuple[slice, ...]:
    """Bounding box of ``mask`` grown by ``pad`` voxels (clipped to the array)."""
    if not mask.any():
        return tuple(slice(0, 0) for _ in mask.shape)
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        present = np.flatnonzero(np.any(mask, axis=other))
        box.append(slice(max(0, present[0] - pad), min(mask.shape[axis], present[-1] + pad + 1)))
    return tuple(box)


def foreground_mask(data: np.ndarray, dilate_voxels: int = 2) -> np.ndarray:
    """The whole head (or brain) against the air around it.

    Otsu's threshold on log intensities separates air noise from tissue even when
    the tissue histogram has a long bright tail (plain Otsu on a T1w with bright fat
    falls between tissues); the largest piece is kept, its holes filled, and it is
    dilated by ``dilate_voxels`` to keep the scalp edge.
    """
    from skimage.filters import threshold_otsu

    values = finite_values(data)
    shift = values.min()
    threshold = np.expm1(threshold_otsu(np.log1p(values - shift))) + shift
    mask = ndi.binary_fill_holes(largest_component(data > threshold))
    if dilate_voxels > 0:
        mask = ndi.binary_dilation(mask, iterations=int(dilate_voxels))
    return mask


def finite_values(data: np.ndarray) -> np.ndarray:
    """The finite voxel values; a constant or empty image has no foreground."""
    values = data[np.isfinite(data)]
    if values.size == 0 or values.max() <= values.min():
        raise ValueError("image is constant or empty: no foreground to find")
    return values
