"""Hidden-Markov-random-field EM tissue classification (the FSL FAST model) in numpy/scipy.

The model of FAST (Zhang, Brady & Smith, IEEE TMI 2001) on a bias-corrected,
skull-stripped image:

1. three Gaussian classes, initialised by a 1-D k-means of the in-mask
   intensities (or by template priors in subject space);
2. EM where the E-step is a mean-field update of a Potts MRF: the log
   posterior of a class gains ``beta`` times the mean posterior of that class
   among the 26 neighbours (a separable [1 2 1] convolution of the posterior
   maps), so a voxel leans towards its neighbours' tissue;
3. partial-volume estimates (FAST's mixel model, piecewise linear): a voxel
   between two adjacent class means is a mixture of those two tissues, with
   fractions given by where its intensity lies between the pure means. The
   fractions are the ``probseg`` maps, smoothed once more by the MRF, and the
   ``dseg`` is their argmax, as FAST's ``pveseg`` that sMRIPrep publishes;
4. CSF is kept where it is sulcal or ventricular (inside the closed hull of GM
   and WM); a dark rim that the brain mask took in beyond that hull is labelled
   0, as sMRIPrep's Atropos-refined mask would leave it out.

Everything runs in float32 on the brain's bounding box, with no random
numbers, so the same input gives the same output.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from mriflow.image.masks import bounding_box
from mriflow.image.segmentation import (
    INTENSITY_ORDER,
    Segmentation,
    _assemble,
    _check_inputs,
    _check_priors,
    _robust_window,
)

__all__ = ["segment_hmrf"]


def _kmeans_1d(values: np.ndarray, n_bins: int = 512, n_iterations: int = 50) -> np.ndarray:
    """Three k-means centres (sorted) of scalar values, computed on their histogram.

    Lloyd's algorithm on bin centres weighted by counts: deterministic, and
    independent of the number of voxels. Started at the 1/6, 1/2 and 5/6 quantiles.
    """
    counts, edges = np.histogram(values, bins=n_bins)
    centres_of_bins = 0.5 * (edges[:-1] + edges[1:])
    centres = np.quantile(values, [1 / 6, 1 / 2, 5 / 6]).astype(np.float64)
    for _ in range(n_iterations):
        cuts = 0.5 * (centres[:-1] + centres[1:])
        assignment = np.searchsorted(cuts, centres_of_bins)
        weights = np.bincount(assignment, weights=counts, minlength=3)
        sums = np.bincount(assignment, weights=counts * centres_of_bins, minlength=3)
        updated = np.where(weights > 0, sums / np.maximum(weights, 1e-12), centres)
        if np.array_equal(updated, centres):
            break
        centres = updated
    return np.sort(centres)


def _neighbour_kernel(spacing: Sequence[float]) -> list[np.ndarray]:
    """Per-axis [w, 1, w] kernels, w = 0.5 at the finest spacing, less along coarser axes."""
    finest = min(spacing)
    return [np.array([0.5 * finest / s, 1.0, 0.5 * finest / s], dtype=np.float32) for s in spacing]


def _neighbour_mean(maps: np.ndarray, kernels: list[np.ndarray]) -> np.ndarray:
    """Weighted mean of each map over the 26 neighbours of every voxel (centre excluded).

    ``maps`` is (K, X, Y, Z), zero outside the mask; a separable convolution makes
    this a few passes over the box instead of a 27-tap filter.
    """
    total_weight = float(np.prod([k.sum() for k in kernels]))
    centre_weight = float(np.prod([k[1] for k in kernels]))
    out = np.empty_like(maps)
    for index, plane in enumerate(maps):
        smoothed = plane
        for axis, kernel in enumerate(kernels):
            smoothed = ndi.correlate1d(smoothed, kernel, axis=axis, mode="constant")
        out[index] = (smoothed - centre_weight * plane) / (total_weight - centre_weight)
    return out


def _softmax(log_p: np.ndarray) -> np.ndarray:
    """Normalised exp over axis 0 (in place)."""
    log_p -= log_p.max(axis=0, keepdims=True)
    np.exp(log_p, out=log_p)
    log_p /= log_p.sum(axis=0, keepdims=True)
    return log_p


def _log_likelihood(y: np.ndarray, means: np.ndarray, variances: np.ndarray) -> np.ndarray:
    """(3, N) float32 Gaussian log-likelihoods (without the constant)."""
    out = np.empty((3, y.size), dtype=np.float32)
    for k in range(3):
        np.subtract(y, np.float32(means[k]), out=out[k])
        np.square(out[k], out=out[k])
        out[k] *= np.float32(-0.5 / variances[k])
        out[k] -= np.float32(0.5 * np.log(variances[k]))
    return out


def _weighted_means(weights: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Class means under (3, N) weights; float64 sums (pairwise, thread-independent)."""
    totals = np.maximum(weights.sum(axis=1, dtype=np.float64), 1e-12)
    return np.array([np.sum(w * y, dtype=np.float64) for w in weights]) / totals


def _weighted_variances(
    weights: np.ndarray, y: np.ndarray, means: np.ndarray, floor: float
) -> np.ndarray:
    totals = np.maximum(weights.sum(axis=1, dtype=np.float64), 1e-12)
    sums = np.array(
        [np.sum(w * np.square(y - np.float32(m)), dtype=np.float64) for w, m in zip(weights, means)]
    )
    return np.maximum(sums / totals, floor)


def _pv_fractions(y: np.ndarray, means: np.ndarray) -> np.ndarray:
    """(3, ...) partial-volume fractions of intensities between sorted class means.

    A voxel at or beyond the darkest or brightest mean is pure; between two
    adjacent means it is a linear mixture of those two classes only.
    """
    fractions = np.zeros((3, *y.shape), dtype=np.float32)
    lower = y < means[1]
    # two classes with (almost) one mean: split at that mean, no division by zero
    gaps = np.maximum(np.diff(means), np.float32(1e-6) * max(float(np.abs(means).max()), 1.0))
    t_low = np.clip((y - means[0]) / gaps[0], 0.0, 1.0)
    t_high = np.clip((y - means[1]) / gaps[1], 0.0, 1.0)
    fractions[0] = np.where(lower, 1.0 - t_low, 0.0)
    fractions[1] = np.where(lower, t_low, 1.0 - t_high)
    fractions[2] = np.where(lower, 0.0, t_high)
    return fractions


def _closed_hull(tissue: np.ndarray, radius_mm: float, spacing: Sequence[float]) -> np.ndarray:
    """Morphological closing of ``tissue`` by a ball of ``radius_mm``, holes filled.

    Done with two Euclidean distance transforms (an exact ball at any voxel
    size) on a grid coarsened by 2 (a voxel is tissue when any of its 8 children
    is): the hull only has to tell sulci from the rim outside the brain, and the
    coarse grid makes it 8 times cheaper. The array is padded so the dilation is
    not cut at the box's edge.
    """
    factor = 2
    coarse_spacing = tuple(factor * s for s in spacing)
    pad = int(np.ceil(radius_mm / min(coarse_spacing))) + 1
    even = [(0, (-n) % factor) for n in tissue.shape]
    blocks = np.pad(tissue, even).reshape(
        tissue.shape[0] // factor + (tissue.shape[0] % factor > 0), factor,
        tissue.shape[1] // factor + (tissue.shape[1] % factor > 0), factor,
        tissue.shape[2] // factor + (tissue.shape[2] % factor > 0), factor,
    )  # fmt: skip
    coarse = np.pad(blocks.any(axis=(1, 3, 5)), pad)
    dilated = ndi.distance_transform_edt(~coarse, sampling=coarse_spacing) <= radius_mm
    closed = ndi.distance_transform_edt(dilated, sampling=coarse_spacing) > radius_mm
    closed = ndi.binary_fill_holes(closed | coarse)[tuple(slice(pad, -pad) for _ in range(3))]
    fine = closed.repeat(factor, 0).repeat(factor, 1).repeat(factor, 2)
    return fine[tuple(slice(0, n) for n in tissue.shape)]


def segment_hmrf(
    data: np.ndarray,
    mask: np.ndarray,
    *,
    contrast: str = "T1w",
    priors: Mapping[str, np.ndarray] | None = None,
    prior_weight: float = 0.5,
    mrf_beta: float = 1.0,
    n_iterations: int = 6,
    pv_beta: float = 0.3,
    csf_hull_mm: float = 7.0,
    pure_posterior: float | None = 0.8,
    clip_percentiles: Sequence[float] = (1.0, 99.0),
    outlier_fence: float | None = 4.0,
    spacing: Sequence[float] | None = None,
) -> Segmentation:
    """Three-class HMRF-EM segmentation with partial-volume estimates (the FAST model).

    Parameters
    ----------
    data, mask : (X, Y, Z) arrays
        Intensities (bias-corrected) and the brain mask (non-zero = brain).
    contrast : {"T1w", "T2w", "PDw", "FLAIR"}
        Names the classes from the order of their means.
    priors : mapping of "GM", "WM" (and optionally "CSF") to (X, Y, Z) arrays, optional
        Template tissue maps in subject space: they start the EM (class means
        weighted by the priors) and weight every E-step by ``prior ** prior_weight``.
        Off by default: on a real head (AOMIC) they lowered the Dice to FAST and
        FreeSurfer (docs/anatomical.md).
    prior_weight : float
        Exponent of the priors in the E-step, >= 0 (0: initialisation only).
    mrf_beta : float
        Potts MRF strength in the EM: log-odds added to a class when all 26
        neighbours are that class (scaled by their mean posterior). 0 turns the
        MRF off (a plain Gaussian mixture without mixing weights).
    n_iterations : int
        EM iterations (each: one mean-field E-step, then the class means and
        variances). A fixed count, as FAST's: on AOMIC the GM mean keeps creeping
        up past 6 iterations, which moves the labels towards FAST's and away from
        FreeSurfer's; 6 keeps both Dice bars (docs/anatomical.md).
    pv_beta : float
        Weight of the neighbours' mean partial-volume fractions added to a voxel's
        own before the argmax (0: the dseg is the nearest pure class by intensity).
    csf_hull_mm : float
        CSF outside the closing of GM and WM by a ball of this radius is labelled 0
        (the dark rim of a generous brain mask, not sulcal CSF). 0 keeps all CSF.
    pure_posterior : float or None
        The pure class means of the partial-volume model are the means of the
        voxels whose final posterior is at least this (FAST estimates them apart
        from the mixed voxels); None: the EM means themselves.
    clip_percentiles, outlier_fence
        The robust intensity window (see :func:`mriflow.image.segmentation.segment_gmm`).
    spacing : (3,) floats, optional
        Voxel size in mm (weights of the neighbours along each axis; the hull's ball).

    Returns
    -------
    Segmentation
        ``dseg`` (1=GM, 2=WM, 3=CSF, 0 outside the tissue), partial-volume maps
        (float32, summing to 1 where ``dseg > 0``) and the fitted parameters.
    """
    data, mask = _check_inputs(data, mask, contrast, clip_percentiles)
    if prior_weight < 0:
        raise ValueError(f"prior_weight must be >= 0; got {prior_weight}")
    if mrf_beta < 0 or pv_beta < 0:
        raise ValueError(f"mrf_beta and pv_beta must be >= 0; got {mrf_beta}, {pv_beta}")
    if not isinstance(n_iterations, (int, np.integer)) or n_iterations < 1:
        raise ValueError(f"n_iterations must be an integer >= 1; got {n_iterations!r}")
    if csf_hull_mm < 0:
        raise ValueError(f"csf_hull_mm must be >= 0; got {csf_hull_mm}")
    if pure_posterior is not None and not 0.0 < pure_posterior <= 1.0:
        raise ValueError(f"pure_posterior must be in (0, 1] or None; got {pure_posterior}")
    spacing = (1.0, 1.0, 1.0) if spacing is None else tuple(float(s) for s in spacing)
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing must be 3 positive voxel sizes; got {spacing}")
    prior_maps = _check_priors(priors, mask)

    values = data[mask]
    lo, hi = _robust_window(values, clip_percentiles, outlier_fence)
    box = bounding_box(mask, pad=1)
    inside = mask[box]
    shape = inside.shape
    # Flat indices: gathering and scattering with them is several times faster
    # than boolean indexing, and the E/M-steps then work on in-mask voxels only.
    index = np.flatnonzero(inside)
    y = np.clip(data[box].ravel()[index], lo, hi).astype(np.float32)
    kernels = _neighbour_kernel(spacing)

    # Class k starts as the k-th tissue in the contrast's intensity order (dark ->
    # bright): from the sorted k-means centres, or from that tissue's prior.
    if prior_maps is not None:
        order_names = INTENSITY_ORDER[contrast]
        full_prior = np.zeros((3, *mask.shape), dtype=np.float32)
        for rank, name in enumerate(order_names):
            full_prior[rank][mask] = prior_maps[name]
        prior_in = full_prior[(slice(None), *box)].reshape(3, -1)[:, index]
        means = _weighted_means(prior_in, y)
        log_prior = np.float32(prior_weight) * np.log(np.maximum(prior_in, 1e-6))
        initialization = "priors"
    else:
        means = _kmeans_1d(y)
        log_prior = None
        initialization = "kmeans"
    hard = np.searchsorted(0.5 * (means[:-1] + means[1:]), y)
    posteriors = np.stack([(hard == k).astype(np.float32) for k in range(3)])
    floor = 1e-4 * (hi - lo) ** 2
    variances = _weighted_variances(posteriors, y, means, floor)

    grid = np.zeros((3, shape[0] * shape[1] * shape[2]), dtype=np.float32)
    for _ in range(n_iterations):
        log_p = _log_likelihood(y, means, variances)
        if log_prior is not None:
            log_p += log_prior
        if mrf_beta > 0:
            grid[:, index] = posteriors
            neighbours = _neighbour_mean(grid.reshape(3, *shape), kernels)
            log_p += np.float32(mrf_beta) * neighbours.reshape(3, -1)[:, index]
        posteriors = _softmax(log_p)
        means = _weighted_means(posteriors, y)
        variances = _weighted_variances(posteriors, y, means, floor)
    if pure_posterior is not None:
        # FAST estimates the pure classes apart from the partial-volume voxels:
        # the means of the confidently classified voxels, not of every posterior.
        pure = posteriors >= pure_posterior
        means = np.array(
            [float(y[pure[k]].mean()) if pure[k].any() else means[k] for k in range(3)]
        )
    # Without priors the classes are named by their final intensity order; with
    # priors they keep the tissue the priors gave them.
    order = np.argsort(means, kind="stable")
    if log_prior is None:
        means, variances, posteriors = means[order], variances[order], posteriors[order]
        order = np.arange(3)
    by_rank = _pv_fractions(y, means[order].astype(np.float32))
    fractions = np.empty_like(by_rank)
    fractions[order] = by_rank
    for darker, brighter in zip(order[:-1], order[1:], strict=True):
        # Two classes less than a standard deviation apart cannot be told apart by
        # intensity: their joint fraction is shared by their posteriors (the
        # priors and the neighbours decide, as in the EM).
        if means[brighter] - means[darker] < np.sqrt(min(variances[darker], variances[brighter])):
            joint = fractions[darker] + fractions[brighter]
            share = posteriors[darker] / np.maximum(
                posteriors[darker] + posteriors[brighter], np.float32(1e-12)
            )
            fractions[darker] = joint * share
            fractions[brighter] = joint - fractions[darker]
    if pv_beta > 0:
        grid[:, index] = fractions
        neighbours = _neighbour_mean(grid.reshape(3, *shape), kernels)
        fractions += np.float32(pv_beta) * neighbours.reshape(3, -1)[:, index]
    fractions /= fractions.sum(axis=0, keepdims=True)
    names = INTENSITY_ORDER[contrast]
    label = np.argmax(fractions, axis=0)
    keep = np.ones(index.size, dtype=bool)
    if csf_hull_mm > 0:
        csf_rank = names.index("CSF")
        brain = np.zeros(inside.size, dtype=bool)
        brain[index[label != csf_rank]] = True
        hull = _closed_hull(brain.reshape(shape), csf_hull_mm, spacing).ravel()[index]
        keep = (label != csf_rank) | hull
    tissue = np.zeros(mask.shape, dtype=bool)
    tissue_box = np.zeros(inside.size, dtype=bool)
    tissue_box[index[keep]] = True
    tissue[box] = tissue_box.reshape(shape)
    posteriors_in = {name: fractions[rank][keep] for rank, name in enumerate(names)}
    trimmed = int(index.size - keep.sum())
    parameters: dict[str, Any] = {
        "method": "hmrf",
        "contrast": contrast,
        "initialization": initialization,
        "priors": prior_maps is not None,
        "prior_weight": prior_weight if prior_maps is not None else None,
        "mrf_beta": float(mrf_beta),
        "n_iterations": int(n_iterations),
        "pv_beta": float(pv_beta),
        "csf_hull_mm": float(csf_hull_mm),
        "clip_percentiles": [float(v) for v in clip_percentiles],
        "outlier_fence": outlier_fence,
        "clip_window": [lo, hi],
        "class_means": dict(zip(names, means.tolist(), strict=True)),
        "class_sds": dict(zip(names, np.sqrt(variances).tolist(), strict=True)),
        "rim_voxels_unlabelled": trimmed,
    }
    return _assemble(posteriors_in, tissue, parameters)
