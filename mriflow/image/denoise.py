"""Non-local means denoising of structural images.

``nlm`` (default): a vectorised voxelwise non-local means in numpy/scipy (Buades
2005, with Manjón 2008's unbiased estimate for Rician noise): for each of the
``(2 r + 1)^3 - 1`` search offsets, the patch distance of every voxel to its
shifted copy is one box filter of the squared difference, so the whole image is
done in a few dozen array passes. Weights ``exp(-max(d - 2 sigma^2, 0) / h^2)``
with ``d`` the mean squared patch difference, ``h = h_factor * sigma``, the centre
voxel weighted as its most similar neighbour; ``sigma`` is estimated from the
image (median absolute 3D Haar detail coefficient inside the mask). With the
Rician model, the squared magnitudes are averaged and ``2 sigma^2`` subtracted
(the noise floor of a magnitude image). On the phantoms of
benchmarks/bench_denoise.py it leaves a lower error than ANTs' adaptive NLM in
about a tenth of its time (docs/anatomical.md).
``ants`` (sMRIPrep's choice): ANTs' ``DenoiseImage`` (adaptive non-local means,
Manjón 2010) through antspyx, with a Rician or Gaussian noise model. Its search
radius defaults to 1 voxel, not DenoiseImage's 2: on 1 mm phantoms with Rician
noise the smaller search left a lower error in 2.7x less time
(benchmarks/bench_denoise.py, docs/anatomical.md).
``skimage``: scikit-image's ``denoise_nl_means`` (3D, fast mode, patch 5,
search distance 6, ``h = 0.8 * sigma`` with sigma estimated from the data); it
runs on one core and is 3-5x slower than ANTs here, kept as a torch- and
ITK-free option. ``none`` returns the image unchanged (as float32).

Voxels that are exactly zero (the background of a skull-stripped or masked image)
stay exactly zero, so later steps can still recognise a stripped input.
"""

from __future__ import annotations

from typing import Literal

import nibabel as nib
import numpy as np

from mriflow.image._itk import itk_threads, new_like, to_ants
from mriflow.image.masks import bounding_box, foreground_mask

__all__ = ["DENOISE_METHODS", "denoise", "estimate_noise_sd"]

DENOISE_METHODS = ("nlm", "ants", "skimage", "none")


def denoise(
    img: nib.spatialimages.SpatialImage,
    *,
    method: Literal["nlm", "ants", "skimage", "none"] = "nlm",
    noise_model: Literal["Rician", "Gaussian"] = "Rician",
    mask: nib.spatialimages.SpatialImage | np.ndarray | None = None,
    patch_radius: int = 1,
    search_radius: int = 1,
    h_factor: float = 1.5,
    num_threads: int = 1,
) -> nib.Nifti1Image:
    """Denoise a 3D image with non-local means.

    Parameters
    ----------
    img : nibabel image, 3D
    method : {"nlm", "ants", "skimage", "none"}
    noise_model : {"Rician", "Gaussian"}
        Magnitude MR images have Rician noise (``nlm`` and ``ants``).
    mask : nibabel image or array, optional
        Denoise only inside (``nlm``, ``ants``); outside voxels are returned
        unchanged. Default: the head (:func:`mriflow.image.masks.foreground_mask`),
        as denoising the air around it costs most of the time and changes nothing
        downstream (``nlm`` also works on the mask's bounding box only).
    patch_radius, search_radius : int
        Voxel radii of the compared patches and of the neighbourhood searched for
        similar patches (``nlm``, ``ants``: DenoiseImage's ``-p`` and ``-r``). The
        cost grows with ``(2 r + 1)^3``.
    h_factor : float
        ``nlm`` filtering strength in units of the estimated noise sd (1.5 had the
        lowest phantom error of 1, 1.5 and 2; larger smooths more).
    num_threads : int
        ITK threads for ``ants`` (see :func:`mriflow.image._itk.itk_threads`).

    Returns
    -------
    nibabel.Nifti1Image
        float32, same grid and header as ``img``.
    """
    if method not in DENOISE_METHODS:
        raise ValueError(f"denoise method must be one of {DENOISE_METHODS}, got {method!r}")
    if noise_model not in ("Rician", "Gaussian"):
        raise ValueError(f"noise_model must be 'Rician' or 'Gaussian', got {noise_model!r}")
    if len(img.shape) != 3:
        raise ValueError(f"denoising expects a 3D image, got shape {img.shape}")
    if num_threads < 1:
        raise ValueError(f"num_threads must be >= 1, got {num_threads}")
    for name, radius in (("patch_radius", patch_radius), ("search_radius", search_radius)):
        if not isinstance(radius, (int, np.integer)) or radius < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {radius!r}")
    if not h_factor > 0:
        raise ValueError(f"h_factor must be > 0, got {h_factor!r}")
    data = img.get_fdata(dtype=np.float32)
    if not np.isfinite(data).all():
        raise ValueError("image has non-finite values (NaN/inf)")
    mask_arr = None
    if mask is not None:
        mask_arr = np.asarray(mask.dataobj if hasattr(mask, "dataobj") else mask) > 0
        if mask_arr.shape != data.shape:
            raise ValueError(f"mask shape {mask_arr.shape} differs from image shape {data.shape}")
    if method == "none":
        return new_like(data, img.affine, img)
    zeros = data == 0
    if method in ("nlm", "ants") and mask_arr is None:
        mask_arr = foreground_mask(data)
    if method == "nlm":
        out = _numpy_nlm(data, mask_arr, noise_model, patch_radius, search_radius, h_factor)
    elif method == "ants":
        out = _ants_nlm(data, img, noise_model, mask_arr, patch_radius, search_radius, num_threads)
    else:
        out = _skimage_nlm(data)
    if mask_arr is not None:
        out = np.where(mask_arr, out, data)
    # Keep exact zeros (stripped/masked background) and never invent negative values.
    out[zeros] = 0.0
    if data.min() >= 0:
        np.maximum(out, 0.0, out=out)
    return new_like(out.astype(np.float32), img.affine, img)


def estimate_noise_sd(data: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Noise sd from the finest 3D Haar detail (the HHH band) of an image.

    Each coefficient is the alternating sum over a 2x2x2 block divided by
    ``sqrt(8)``: white noise of sd ``sigma`` gives coefficients of sd ``sigma``,
    while smooth anatomy cancels. The median absolute coefficient over blocks
    inside ``mask`` (all blocks when None), over 0.6745, is robust to the edges
    that do not cancel (Donoho's wavelet estimator).

    Parameters
    ----------
    data : (X, Y, Z) float array
    mask : (X, Y, Z) bool array, optional

    Returns
    -------
    float
        0.0 for a noise-free or too small image.
    """
    even = tuple(slice(0, n - n % 2) for n in data.shape)
    block = data[even].astype(np.float32, copy=False)
    detail = np.zeros([n // 2 for n in block.shape], np.float32)
    for i, j, k in np.ndindex(2, 2, 2):
        sign = -1.0 if (i + j + k) % 2 else 1.0
        detail += sign * block[i::2, j::2, k::2]
    if mask is not None:
        inside = mask[even]
        detail = detail[inside[0::2, 0::2, 0::2] & inside[1::2, 1::2, 1::2]]
    if detail.size == 0:
        return 0.0
    return float(np.median(np.abs(detail)) / np.sqrt(8.0) / 0.6745)


def _numpy_nlm(
    data: np.ndarray,
    mask: np.ndarray,
    noise_model: str,
    patch_radius: int,
    search_radius: int,
    h_factor: float,
) -> np.ndarray:
    from scipy import ndimage as ndi

    out = data.copy()
    box = bounding_box(mask, pad=patch_radius + search_radius)
    # the object only: voxels outside the mask are returned unchanged anyway
    crop = data[box].astype(np.float32)
    sigma = estimate_noise_sd(crop, mask[box])
    if sigma <= 0 or crop.size == 0:
        return out
    rician = noise_model == "Rician"
    r, size = search_radius, 2 * patch_radius + 1
    padded = np.pad(crop, r, mode="reflect")
    # Rician: average squared magnitudes, whose noise adds 2 sigma^2 (Manjón 2008)
    values = padded**2 if rician else padded
    noise_floor = np.float32(2.0 * sigma**2)
    inv_h2 = np.float32(1.0 / (h_factor * sigma) ** 2)
    total = np.zeros_like(crop)
    weights = np.zeros_like(crop)
    best = np.zeros_like(crop)
    nx, ny, nz = crop.shape
    for dx, dy, dz in np.ndindex(2 * r + 1, 2 * r + 1, 2 * r + 1):
        if dx == dy == dz == r:
            continue
        window = (slice(dx, dx + nx), slice(dy, dy + ny), slice(dz, dz + nz))
        distance = ndi.uniform_filter((crop - padded[window]) ** 2, size, mode="reflect")
        weight = np.exp(-np.maximum(distance - noise_floor, 0.0) * inv_h2)
        total += weight * values[window]
        weights += weight
        np.maximum(best, weight, out=best)
    # the centre voxel counts as much as its most similar neighbour (Buades 2005)
    centre = np.where(best > 0, best, np.float32(1.0))
    total += centre * (crop**2 if rician else crop)
    weights += centre
    estimate = total / weights
    if rician:
        estimate = np.sqrt(np.maximum(estimate - noise_floor, 0.0))
    out[box] = estimate
    return out


def _ants_nlm(
    data: np.ndarray,
    img: nib.spatialimages.SpatialImage,
    noise_model: str,
    mask: np.ndarray | None,
    patch_radius: int,
    search_radius: int,
    num_threads: int,
) -> np.ndarray:
    import ants

    with itk_threads(num_threads):
        # Rician modelling assumes non-negative magnitudes.
        shift = float(min(0.0, data.min()))
        work = nib.Nifti1Image(data - shift, img.affine)
        a_mask = None
        if mask is not None:
            a_mask = to_ants(nib.Nifti1Image(mask.astype(np.float32), img.affine))
        out = ants.denoise_image(
            to_ants(work),
            mask=a_mask,
            p=int(patch_radius),
            r=int(search_radius),
            noise_model=noise_model,
        )
    return out.numpy().astype(np.float32) + shift


def _skimage_nlm(data: np.ndarray) -> np.ndarray:
    from skimage.restoration import denoise_nl_means, estimate_sigma

    scale = float(np.percentile(np.abs(data), 99.5)) or 1.0
    norm = data / scale
    sigma = float(np.mean(estimate_sigma(norm, channel_axis=None)))
    if sigma <= 0:
        return data.copy()
    out = denoise_nl_means(
        norm,
        patch_size=5,
        patch_distance=6,
        h=0.8 * sigma,
        sigma=sigma,
        fast_mode=True,
        channel_axis=None,
    )
    return (out * scale).astype(np.float32)
