"""Tissue segmentation (CSF, GM, WM) inside a brain mask.

Three methods, all returning a :class:`Segmentation` (a ``dseg`` label map in
sMRIPrep's order 1=GM, 2=WM, 3=CSF, plus one probability map per tissue):

- :func:`mriflow.image.hmrf.segment_hmrf` (the default): FSL FAST's model, a
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


# --------------------------------------------------------------------------- dispatch, QC


def segment(
    data: np.ndarray, mask: np.ndarray, method: str = "hmrf", **params: Any
) -> Segmentation:
    """Segment with ``method`` ("hmrf", "gmm" or "atropos"); ``params`` go to that function."""
    if method == "hmrf":
        # imported here: mriflow.image.hmrf builds on this module's helpers
        from mriflow.image.hmrf import segment_hmrf

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
