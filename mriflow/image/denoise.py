"""Non-local means denoising of structural images.

``ants`` (default, as sMRIPrep): ANTs' ``DenoiseImage`` (adaptive non-local means,
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
from mriflow.image.masks import foreground_mask

__all__ = ["DENOISE_METHODS", "denoise"]

DENOISE_METHODS = ("ants", "skimage", "none")


def denoise(
    img: nib.spatialimages.SpatialImage,
    *,
    method: Literal["ants", "skimage", "none"] = "ants",
    noise_model: Literal["Rician", "Gaussian"] = "Rician",
    mask: nib.spatialimages.SpatialImage | np.ndarray | None = None,
    patch_radius: int = 1,
    search_radius: int = 1,
    num_threads: int = 1,
) -> nib.Nifti1Image:
    """Denoise a 3D image with non-local means.

    Parameters
    ----------
    img : nibabel image, 3D
    method : {"ants", "skimage", "none"}
    noise_model : {"Rician", "Gaussian"}
        Magnitude MR images have Rician noise; used by ``ants`` only.
    mask : nibabel image or array, optional
        Denoise only inside (``ants``); outside voxels are returned unchanged.
        Default for ``ants``: the head (:func:`mriflow.image.masks.foreground_mask`),
        as denoising the air around it costs most of the time and changes nothing
        downstream.
    patch_radius, search_radius : int
        Voxel radii of the compared patches and of the neighbourhood searched for
        similar patches (``ants``; DenoiseImage's ``-p`` and ``-r``). The cost grows
        with ``(2 r + 1)^3``.
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
    if method == "ants":
        if mask_arr is None:
            mask_arr = foreground_mask(data)
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
