"""Tissue segmentation (CSF, GM, WM) inside a brain mask.

Three methods, all returning a :class:`Segmentation` (a ``dseg`` label map in
sMRIPrep's order 1=GM, 2=WM, 3=CSF, plus one probability map per tissue):

- :func:`segment_hmrf` (the default): FSL FAST's model, a
  hidden-Markov-random-field EM with partial-volume estimates, in numpy/scipy.
- :func:`segment_gmm`: a Gaussian mixture (scikit-learn, seeded) on the in-mask
  intensities; classes are named by the order of their means for the contrast.
- :func:`segment_atropos`: ANTs Atropos (antspyx) with an MRF prior, k-means
  initialization or, better, template tissue priors already in subject space.

Both are made robust to images with a bright minority class (enhancing vessels
and dura after gadolinium, residual fat) by fitting on the in-mask intensities
inside a robust percentile window and clamping the rest to it, so that the
outliers join the nearest tissue instead of taking a class of their own. The GMM
uses one variance shared by the classes ("tied"), which keeps a broad outlier
tail from being absorbed by a wide class that swallows GM and WM together.
:func:`check_plausibility` reports when the classes still look wrong.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from mriflow.image.masks import bounding_box

__all__ = [
    "DSEG_LABELS",
    "FRACTION_RANGES",
    "TISSUES",
    "Segmentation",
    "check_plausibility",
    "dseg_tsv",
    "segment",
    "segment_atropos",
    "segment_gmm",
    "segment_hmrf",
    "tissue_fractions",
]

#: dseg label of each tissue, sMRIPrep's BIDS_TISSUE_ORDER (GM, WM, CSF).
DSEG_LABELS: dict[str, int] = {"GM": 1, "WM": 2, "CSF": 3}
#: Tissues in the order of the probseg outputs.
TISSUES: tuple[str, ...] = ("CSF", "GM", "WM")
#: Tissues by increasing mean intensity, per contrast.
INTENSITY_ORDER: dict[str, tuple[str, str, str]] = {
    "T1w": ("CSF", "GM", "WM"),
    "T2w": ("WM", "GM", "CSF"),
    "PDw": ("WM", "GM", "CSF"),
    "FLAIR": ("CSF", "WM", "GM"),
}
#: Plausible fraction of the brain mask for each tissue in an adult brain.
FRACTION_RANGES: dict[str, tuple[float, float]] = {
    "GM": (0.35, 0.60),
    "WM": (0.25, 0.50),
    "CSF": (0.02, 0.40),
}


@dataclass
class Segmentation:
    """The result of a tissue segmentation.

    Attributes
    ----------
    dseg : (X, Y, Z) uint8
        0 outside the mask, then 1=GM, 2=WM, 3=CSF.
    probabilities : dict of str to (X, Y, Z) float32
        Posterior probability of each tissue (keys ``CSF``, ``GM``, ``WM``);
        they sum to 1 in the mask and are 0 outside.
    parameters : dict
        The method, its parameters and fitted values, for the sidecar.
    """

    dseg: np.ndarray
    probabilities: dict[str, np.ndarray]
    parameters: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- validation


def _check_inputs(
    data: np.ndarray, mask: np.ndarray, contrast: str, clip_percentiles: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    data = np.asarray(data)
    mask = np.asarray(mask)
    if data.ndim != 3:
        raise ValueError(f"expected a 3D image, got an array of shape {data.shape}")
    if mask.shape != data.shape:
        raise ValueError(
            f"the mask's shape {mask.shape} does not match the image's shape {data.shape}"
        )
    if contrast not in INTENSITY_ORDER:
        raise ValueError(f"contrast must be one of {', '.join(INTENSITY_ORDER)}; got {contrast!r}")
    lo, hi = (float(v) for v in clip_percentiles)
    if not 0.0 <= lo < hi <= 100.0:
        raise ValueError(
            f"clip_percentiles must be (low, high) with 0 <= low < high <= 100; got {lo}, {hi}"
        )
    mask = mask.astype(bool)
    if mask.sum() < 100:
        raise ValueError(f"the brain mask has {int(mask.sum())} voxels; need at least 100")
    values = data[mask]
    if not np.all(np.isfinite(values)):
        raise ValueError("the image has NaN or infinite values inside the mask")
    if values.min() == values.max():
        raise ValueError("the image is constant inside the mask: no tissues to separate")
    return data.astype(np.float64, copy=False), mask


def _check_priors(
    priors: Mapping[str, np.ndarray] | None, mask: np.ndarray
) -> dict[str, np.ndarray] | None:
    """Priors as CSF/GM/WM float64 arrays in the mask, rows summing to 1.

    A missing CSF prior is ``1 - GM - WM`` (the embedded template has no CSF map).
    """
    if priors is None:
        return None
    unknown = set(priors) - set(TISSUES)
    if unknown or not {"GM", "WM"} <= set(priors):
        raise ValueError(
            "priors must map 'GM', 'WM' (and optionally 'CSF') to probability arrays; "
            f"got keys {sorted(priors)}"
        )
    out: dict[str, np.ndarray] = {}
    for name in ("GM", "WM", "CSF"):
        if name not in priors:
            continue
        p = np.asarray(priors[name], dtype=np.float64)
        if p.shape != mask.shape:
            raise ValueError(
                f"the {name} prior's shape {p.shape} does not match the image's {mask.shape}"
            )
        if not np.all(np.isfinite(p[mask])) or p[mask].min() < 0 or p[mask].max() > 1.0 + 1e-3:
            raise ValueError(f"the {name} prior must hold probabilities in [0, 1]")
        out[name] = np.clip(p[mask], 0.0, 1.0)
    if "CSF" not in out:
        out["CSF"] = np.clip(1.0 - out["GM"] - out["WM"], 0.0, 1.0)
    stacked = np.stack([out[t] for t in TISSUES])
    # A small floor: a voxel where the template says "impossible" can still be
    # that tissue if the registration is a little off.
    stacked = stacked + 1e-3
    stacked /= stacked.sum(axis=0, keepdims=True)
    return dict(zip(TISSUES, stacked, strict=True))


def _robust_window(
    values: np.ndarray, clip_percentiles: Sequence[float], outlier_fence: float | None
) -> tuple[float, float]:
    """The intensity window the classes are fitted in.

    The percentile window alone lets through outliers that are more than
    ``100 - high`` percent of the brain (3 % of enhancing vessels); the fence at
    ``median +- outlier_fence`` robust sd (1.4826 MAD) removes such a bright or
    dark minority while keeping every tissue's bulk (CSF in T1w lies about
    3 robust sd below the median).
    """
    lo, hi = (float(v) for v in np.percentile(values, clip_percentiles))
    if outlier_fence is not None:
        median = float(np.median(values))
        robust_sd = 1.4826 * float(np.median(np.abs(values - median)))
        if robust_sd > 0:
            lo = max(lo, median - outlier_fence * robust_sd)
            hi = min(hi, median + outlier_fence * robust_sd)
    if hi <= lo:
        lo, hi = float(values.min()), float(values.max())
    return lo, hi


def _assemble(
    posteriors: Mapping[str, np.ndarray], mask: np.ndarray, parameters: dict[str, Any]
) -> Segmentation:
    """In-mask posteriors (by tissue name) to a dseg and full-size probability maps."""
    stacked = np.stack([posteriors[t] for t in TISSUES])
    stacked = stacked / np.maximum(stacked.sum(axis=0, keepdims=True), 1e-12)
    labels = np.array([DSEG_LABELS[t] for t in TISSUES], dtype=np.uint8)
    dseg = np.zeros(mask.shape, dtype=np.uint8)
    dseg[mask] = labels[np.argmax(stacked, axis=0)]
    probabilities = {}
    for name, p in zip(TISSUES, stacked, strict=True):
        full = np.zeros(mask.shape, dtype=np.float32)
        full[mask] = p.astype(np.float32)
        probabilities[name] = full
    return Segmentation(dseg=dseg, probabilities=probabilities, parameters=parameters)


# --------------------------------------------------------------------------- GMM


def _posteriors(
    x: np.ndarray, means: np.ndarray, variances: np.ndarray, mix: np.ndarray
) -> np.ndarray:
    """(3, N) class posteriors of scalar values under Gaussians and mixing weights."""
    log_post = -0.5 * (
        np.log(2 * np.pi * variances)[:, None]
        + (x[None, :] - means[:, None]) ** 2 / variances[:, None]
    ) + np.log(np.maximum(mix, 1e-300))
    post = np.exp(log_post - log_post.max(axis=0, keepdims=True))
    return post / post.sum(axis=0, keepdims=True)


def segment_gmm(
    data: np.ndarray,
    mask: np.ndarray,
    *,
    contrast: str = "T1w",
    clip_percentiles: Sequence[float] = (1.0, 99.0),
    outlier_fence: float | None = 4.0,
    covariance: str = "tied",
    priors: Mapping[str, np.ndarray] | None = None,
    prior_weight: float = 0.5,
    prior_em_iterations: int = 10,
    seed: int = 0,
    max_fit_voxels: int = 200_000,
) -> Segmentation:
    """Three-class Gaussian mixture segmentation of the in-mask intensities.

    Parameters
    ----------
    data, mask : (X, Y, Z) arrays
        Intensities (bias-corrected, skull-stripped) and the brain mask.
    contrast : {"T1w", "T2w", "PDw", "FLAIR"}
        Names the classes from the order of their means (T1w: CSF < GM < WM;
        T2w, PDw: WM < GM < CSF; FLAIR: CSF < WM < GM).
    clip_percentiles : (low, high)
        The mixture is fitted on voxels inside this in-mask percentile window and
        every voxel is classified with its intensity clamped to it, so a few
        percent of outliers (enhancing vessels) join the nearest tissue.
    outlier_fence : float or None
        Also narrow the window to ``median +- outlier_fence`` robust sd (MAD):
        catches a larger outlier minority than the percentiles. None: off.
    covariance : {"tied", "full"}
        One variance for all classes (default, robust) or one per class.
    priors : mapping of "GM", "WM" (and optionally "CSF") to (X, Y, Z) arrays, optional
        Tissue probability maps already in subject space. They replace the
        global mixing weights voxel by voxel, ``(1 - w) * weight + w * prior``,
        in ``prior_em_iterations`` EM iterations that refine the class means and
        variances started from the plain mixture.
    prior_weight : float
        ``w`` above, in [0, 1]; ignored without priors.
    prior_em_iterations : int
        EM iterations with the priors (0: priors only weight the final posterior).
    seed : int
        Seeds the voxel subsample and the mixture's k-means initialization.
    max_fit_voxels : int
        The mixture is fitted on at most this many in-mask voxels (a seeded
        random subset); every voxel is then classified.

    Returns
    -------
    Segmentation
    """
    from sklearn.mixture import GaussianMixture

    data, mask = _check_inputs(data, mask, contrast, clip_percentiles)
    if covariance not in ("tied", "full"):
        raise ValueError(f"covariance must be 'tied' or 'full'; got {covariance!r}")
    if not 0.0 <= prior_weight <= 1.0:
        raise ValueError(f"prior_weight must be in [0, 1]; got {prior_weight}")
    if not isinstance(prior_em_iterations, (int, np.integer)) or prior_em_iterations < 0:
        raise ValueError(
            f"prior_em_iterations must be an integer >= 0; got {prior_em_iterations!r}"
        )
    if max_fit_voxels < 1000:
        raise ValueError(f"max_fit_voxels must be >= 1000; got {max_fit_voxels}")
    prior_maps = _check_priors(priors, mask)
    values = data[mask]
    lo, hi = _robust_window(values, clip_percentiles, outlier_fence)
    fit_values = values[(values >= lo) & (values <= hi)]
    rng = np.random.default_rng(seed)
    if fit_values.size > max_fit_voxels:
        fit_values = np.sort(rng.choice(fit_values, size=max_fit_voxels, replace=False))
    gmm = GaussianMixture(
        n_components=3, covariance_type=covariance, random_state=seed, n_init=1, max_iter=200
    )
    gmm.fit(fit_values.reshape(-1, 1))
    # Components by tissue name, from the order of their means for the contrast.
    order = np.argsort(gmm.means_.ravel())
    names = INTENSITY_ORDER[contrast]
    by_tissue = {names[rank]: component for rank, component in enumerate(order)}
    means = np.array([gmm.means_.ravel()[by_tissue[t]] for t in TISSUES])
    all_variances = np.broadcast_to(np.asarray(gmm.covariances_).ravel(), (3,))
    variances = np.array([all_variances[by_tissue[t]] for t in TISSUES])
    weights = np.array([gmm.weights_[by_tissue[t]] for t in TISSUES])
    x = np.clip(values, lo, hi)
    em_iterations = 0
    if prior_maps is not None:
        # EM with spatially varying mixing weights (as SPM and Atropos do): the
        # priors shape the class parameters too, not only the final posterior.
        prior_stack = np.stack([prior_maps[t] for t in TISSUES])
        inside = (values >= lo) & (values <= hi)
        for em_iterations in range(1, prior_em_iterations + 1):  # noqa: B007
            mix = (1 - prior_weight) * weights[:, None] + prior_weight * prior_stack[:, inside]
            post = _posteriors(x[inside], means, variances, mix)
            total = post.sum(axis=1)
            means = post @ x[inside] / total
            squared = post * (x[inside][None, :] - means[:, None]) ** 2
            if covariance == "tied":
                variances = np.full(3, squared.sum() / total.sum())
            else:
                variances = squared.sum(axis=1) / total
            variances = np.maximum(variances, 1e-12 * (hi - lo) ** 2)
            weights = total / total.sum()
        mix = (1 - prior_weight) * weights[:, None] + prior_weight * prior_stack
    else:
        mix = weights[:, None]
    stacked = _posteriors(x, means, variances, mix)
    parameters = {
        "method": "gmm",
        "contrast": contrast,
        "clip_percentiles": [float(v) for v in clip_percentiles],
        "outlier_fence": outlier_fence,
        "clip_window": [lo, hi],
        "covariance": covariance,
        "seed": seed,
        "fit_voxels": int(fit_values.size),
        "priors": prior_maps is not None,
        "prior_weight": prior_weight if prior_maps is not None else None,
        "prior_em_iterations": em_iterations,
        "class_means": dict(zip(TISSUES, means.tolist(), strict=True)),
        "class_sds": dict(zip(TISSUES, np.sqrt(variances).tolist(), strict=True)),
        "class_weights": dict(zip(TISSUES, weights.tolist(), strict=True)),
        "converged": bool(gmm.converged_),
    }
    return _assemble(dict(zip(TISSUES, stacked, strict=True)), mask, parameters)


# --------------------------------------------------------------------------- Atropos


def segment_atropos(
    data: np.ndarray,
    mask: np.ndarray,
    *,
    contrast: str = "T1w",
    priors: Mapping[str, np.ndarray] | None = None,
    prior_weight: float = 0.25,
    mrf_weight: float = 0.2,
    mrf_radius: int = 1,
    n_iterations: int = 3,
    clip_percentiles: Sequence[float] = (1.0, 99.0),
    outlier_fence: float | None = 4.0,
    spacing: Sequence[float] | None = None,
) -> Segmentation:
    """ANTs Atropos three-class segmentation with an MRF prior (antspyx).

    Parameters
    ----------
    data, mask : (X, Y, Z) arrays
    contrast : {"T1w", "T2w", "PDw", "FLAIR"}
        Names k-means classes from their intensity order (unused with priors:
        then the classes are the priors' tissues).
    priors : mapping of "GM", "WM" (and optionally "CSF") to arrays, optional
        Template tissue probability maps already warped to the subject. Without
        them Atropos starts from k-means.
    prior_weight : float
        Atropos' prior weight in [0, 1]: 0 uses the priors for initialization
        only; 0.25 (default) also keeps them in the posterior.
    mrf_weight : float
        MRF smoothing factor (ANTs' ``-m [weight, radius]``); 0 disables it.
    mrf_radius : int
        MRF neighbourhood radius in voxels.
    n_iterations : int
        EM iterations (``-c [n, 0]``: always run them all, for reproducibility).
    clip_percentiles : (low, high)
        Intensities are clamped to this in-mask percentile window first.
    outlier_fence : float or None
        And to ``median +- outlier_fence`` robust sd (see :func:`segment_gmm`).
    spacing : (3,) floats, optional
        Voxel size in mm (MRF neighbour weights depend on it); default 1 mm.

    Notes
    -----
    Atropos is run with a constant internal random seed (``-r 0``) and one ITK
    thread, so the same input gives the same output.
    """
    data, mask = _check_inputs(data, mask, contrast, clip_percentiles)
    if not 0.0 <= prior_weight <= 1.0:
        raise ValueError(f"prior_weight must be in [0, 1]; got {prior_weight}")
    if mrf_weight < 0:
        raise ValueError(f"mrf_weight must be >= 0; got {mrf_weight}")
    if not isinstance(mrf_radius, (int, np.integer)) or mrf_radius < 1:
        raise ValueError(f"mrf_radius must be an integer >= 1; got {mrf_radius!r}")
    if not isinstance(n_iterations, (int, np.integer)) or n_iterations < 1:
        raise ValueError(f"n_iterations must be an integer >= 1; got {n_iterations!r}")
    spacing = (1.0, 1.0, 1.0) if spacing is None else tuple(float(s) for s in spacing)
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing must be 3 positive voxel sizes; got {spacing}")
    prior_maps = _check_priors(priors, mask)

    values = data[mask]
    lo, hi = _robust_window(values, clip_percentiles, outlier_fence)
    clamped = np.zeros(mask.shape, dtype=np.float32)
    clamped[mask] = np.clip(values, lo, hi)
    posteriors, class_names = _run_atropos(
        clamped,
        mask,
        spacing,
        prior_maps,
        prior_weight,
        mrf_weight,
        mrf_radius,
        n_iterations,
        INTENSITY_ORDER[contrast],
    )
    parameters = {
        "method": "atropos",
        "contrast": contrast,
        "initialization": "priors" if prior_maps is not None else "kmeans",
        "prior_weight": prior_weight if prior_maps is not None else None,
        "mrf_weight": mrf_weight,
        "mrf_radius": int(mrf_radius),
        "n_iterations": int(n_iterations),
        "clip_percentiles": [float(v) for v in clip_percentiles],
        "outlier_fence": outlier_fence,
        "clip_window": [lo, hi],
    }
    in_mask = {name: posteriors[name][mask] for name in class_names}
    means = {name: float(np.average(values, weights=in_mask[name] + 1e-12)) for name in TISSUES}
    parameters["class_means"] = means
    return _assemble(in_mask, mask, parameters)


def _run_atropos(
    clamped: np.ndarray,
    mask: np.ndarray,
    spacing: tuple[float, float, float],
    prior_maps: dict[str, np.ndarray] | None,
    prior_weight: float,
    mrf_weight: float,
    mrf_radius: int,
    n_iterations: int,
    intensity_order: tuple[str, str, str],
) -> tuple[dict[str, np.ndarray], tuple[str, ...]]:
    """Call antspyx's Atropos; return full-size posteriors by tissue name."""
    import ants

    def to_ants(array: np.ndarray) -> Any:
        img = ants.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
        img.set_spacing(spacing)
        return img

    # Atropos walks the whole grid; the brain's bounding box (plus the MRF
    # neighbourhood) gives the same result in a third of the time at 1 mm.
    box = bounding_box(mask, pad=mrf_radius + 1)
    image = to_ants(clamped[box])
    ants_mask = to_ants(mask[box].astype(np.float32))
    radius = "x".join([str(int(mrf_radius))] * 3)
    if prior_maps is not None:
        ordered = []
        for name in TISSUES:
            full = np.zeros(mask.shape, dtype=np.float32)
            full[mask] = prior_maps[name]
            ordered.append(to_ants(full[box]))
        init: Any = ordered
        class_names: tuple[str, ...] = TISSUES  # with priors, classes follow their order
    else:
        init = "Kmeans[3]"
        class_names = intensity_order  # k-means classes are sorted by intensity
    previous = os.environ.get("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS")
    # antspyx writes the posteriors to files in the temp dir and globs for them:
    # a private directory keeps concurrent runs from picking up each other's files.
    with tempfile.TemporaryDirectory(prefix="mriflow_atropos_") as tmp:
        old_tmp = tempfile.tempdir
        tempfile.tempdir = tmp
        os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = "1"
        try:
            result = ants.atropos(
                a=image,
                x=ants_mask,
                i=init,
                m=f"[{mrf_weight},{radius}]",
                c=f"[{int(n_iterations)},0]",
                priorweight=prior_weight,
                r=0,
            )
        finally:
            tempfile.tempdir = old_tmp
            if previous is None:
                os.environ.pop("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", None)
            else:
                os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = previous
        probabilities = []
        for cropped in result["probabilityimages"]:
            full = np.zeros(mask.shape, dtype=np.float64)
            full[box] = cropped.numpy()
            probabilities.append(full)
    if len(probabilities) != 3:
        raise RuntimeError(f"Atropos returned {len(probabilities)} probability maps, expected 3")
    return dict(zip(class_names, probabilities, strict=True)), class_names


# --------------------------------------------------------------------------- HMRF (FAST)
# Hidden-Markov-random-field EM tissue classification (the FSL FAST model) in numpy/scipy.
#
# The model of FAST (Zhang, Brady & Smith, IEEE TMI 2001) on a bias-corrected,
# skull-stripped image:
#
# 1. three Gaussian classes, initialised by a 1-D k-means of the in-mask
#    intensities (or by template priors in subject space);
# 2. EM where the E-step is a mean-field update of a Potts MRF: the log
#    posterior of a class gains ``beta`` times the mean posterior of that class
#    among the 26 neighbours (a separable [1 2 1] convolution of the posterior
#    maps), so a voxel leans towards its neighbours' tissue;
# 3. partial-volume estimates (FAST's mixel model, piecewise linear): a voxel
#    between two adjacent class means is a mixture of those two tissues, with
#    fractions given by where its intensity lies between the pure means. The
#    fractions are the ``probseg`` maps, smoothed once more by the MRF, and the
#    ``dseg`` is their argmax, as FAST's ``pveseg`` that sMRIPrep publishes;
# 4. CSF is kept where it is sulcal or ventricular (inside the closed hull of GM
#    and WM); a dark rim that the brain mask took in beyond that hull is labelled
#    0, as sMRIPrep's Atropos-refined mask would leave it out.
#
# Everything runs in float32 on the brain's bounding box, with no random
# numbers, so the same input gives the same output.


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


# --------------------------------------------------------------------------- dispatch, QC


def segment(
    data: np.ndarray, mask: np.ndarray, method: str = "hmrf", **params: Any
) -> Segmentation:
    """Segment with ``method`` ("hmrf", "gmm" or "atropos"); ``params`` go to that function."""
    if method == "hmrf":
        return segment_hmrf(data, mask, **params)
    if method == "gmm":
        return segment_gmm(data, mask, **params)
    if method == "atropos":
        return segment_atropos(data, mask, **params)
    raise ValueError(f"unknown segmentation method {method!r}; expected 'hmrf', 'gmm' or 'atropos'")


def tissue_fractions(dseg: np.ndarray) -> dict[str, float]:
    """Fraction of the labelled voxels (dseg > 0) in each tissue."""
    dseg = np.asarray(dseg)
    total = int(np.count_nonzero(dseg))
    if total == 0:
        raise ValueError("the dseg has no labelled voxels")
    return {
        name: float(np.count_nonzero(dseg == label)) / total for name, label in DSEG_LABELS.items()
    }


def check_plausibility(
    segmentation: Segmentation,
    data: np.ndarray | None = None,
    *,
    contrast: str = "T1w",
    fraction_ranges: Mapping[str, tuple[float, float]] = FRACTION_RANGES,
    min_separation: float = 1.0,
) -> list[str]:
    """Warnings, in plain words for the report, when the tissue classes look wrong.

    Checks each tissue's fraction of the brain against ``fraction_ranges`` and,
    given the intensities, that the class means follow the contrast's order and
    that neighbouring classes are separated by at least ``min_separation``
    pooled standard deviations (GM and WM merged into one class fail this).

    Returns
    -------
    list of str
        Empty when nothing looks wrong.
    """
    if contrast not in INTENSITY_ORDER:
        raise ValueError(f"contrast must be one of {', '.join(INTENSITY_ORDER)}; got {contrast!r}")
    warnings: list[str] = []
    fractions = tissue_fractions(segmentation.dseg)
    for name, (low, high) in fraction_ranges.items():
        f = fractions[name]
        if not low <= f <= high:
            warnings.append(
                f"{name} is {100 * f:.1f} % of the brain mask, outside the plausible "
                f"{100 * low:.0f}-{100 * high:.0f} %: check the segmentation"
            )
    if data is not None:
        data = np.asarray(data, dtype=np.float64)
        if data.shape != segmentation.dseg.shape:
            raise ValueError(
                f"data shape {data.shape} does not match the dseg's {segmentation.dseg.shape}"
            )
        stats = {}
        for name, label in DSEG_LABELS.items():
            v = data[segmentation.dseg == label]
            if v.size < 2:
                warnings.append(f"{name} class is empty or almost empty ({v.size} voxels)")
                return warnings
            stats[name] = (float(v.mean()), float(v.std()))
        order = INTENSITY_ORDER[contrast]
        for darker, brighter in zip(order[:-1], order[1:], strict=True):
            (m1, s1), (m2, s2) = stats[darker], stats[brighter]
            separation = (m2 - m1) / max(np.sqrt(0.5 * (s1**2 + s2**2)), 1e-12)
            if separation < 0:
                warnings.append(
                    f"{brighter} is darker than {darker} on average, against the {contrast} "
                    "contrast: the classes are probably mislabelled"
                )
            elif separation < min_separation:
                warnings.append(
                    f"{darker} and {brighter} are poorly separated (means {separation:.2f} "
                    "sd apart): the classes may be merged"
                )
    return warnings


def dseg_tsv() -> str:
    """Content of the ``dseg.tsv`` lookup table for the dseg labels (BIDS, sMRIPrep order)."""
    rows = ["index\tname"] + [f"{label}\t{name}" for name, label in DSEG_LABELS.items()]
    return "\n".join(rows) + "\n"
