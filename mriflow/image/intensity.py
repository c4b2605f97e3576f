"""Intensity normalization inside a brain mask.

Every method here takes a 3D intensity array and a boolean brain mask of the
same shape, works on the in-mask voxels only and returns a ``float32`` array in
which every voxel outside the mask is exactly 0. The methods:

========== =============================================================
zscore      mean 0, sd 1 in the mask
minmax      in-mask range to [0, 1] or [-1, 1]
percentile  robust linear scaling of (p_low, p_high) to (0, 1), optional clip
whitestripe Shinohara et al. 2014: z-score on normal-appearing WM stripe
fcm         divide by the fuzzy C-means (membership-weighted) WM mean
binning     N bins (uniform or quantile edges), values 1..N
histeq      global histogram equalization (in-mask empirical CDF)
rmshe       recursive mean-separate HE, Chen & Ramli 2003 (r=0 is HE)
clahe       3D contrast-limited adaptive HE (scikit-image)
nyul        Nyúl & Udupa piecewise-linear standardization, learned on a group
========== =============================================================

:func:`normalize` dispatches by name and also returns the parameters and fitted
values for the output sidecar. Nyúl's standard scale is learned with
:func:`fit_nyul` (group level, training subjects only) and applied with
:func:`apply_nyul`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np

__all__ = [
    "METHODS",
    "IntensityMethod",
    "NyulStandard",
    "apply_nyul",
    "bin_intensities",
    "clahe",
    "fcm_normalize",
    "fit_nyul",
    "fuzzy_cmeans_1d",
    "histogram_equalize",
    "method_parameters",
    "minmax",
    "normalize",
    "percentile_scale",
    "rmshe",
    "whitestripe",
    "zscore",
]

IntensityMethod = Literal[
    "zscore",
    "minmax",
    "percentile",
    "whitestripe",
    "fcm",
    "binning",
    "histeq",
    "rmshe",
    "clahe",
    "nyul",
    "none",
]
METHODS: tuple[str, ...] = get_args(IntensityMethod)

CONTRASTS = ("T1w", "T2w", "FLAIR", "PDw")


# --------------------------------------------------------------------------- helpers


def _check_inputs(data: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate an image and its mask; return (float64 data, bool mask)."""
    data = np.asarray(data)
    mask = np.asarray(mask)
    if data.ndim != 3:
        raise ValueError(f"expected a 3D image, got an array of shape {data.shape}")
    if mask.shape != data.shape:
        raise ValueError(
            f"the mask's shape {mask.shape} does not match the image's shape {data.shape}"
        )
    if not np.issubdtype(data.dtype, np.number) or np.iscomplexobj(data):
        raise ValueError(f"expected real-valued image data, got dtype {data.dtype}")
    mask = mask.astype(bool) if mask.dtype != bool else mask
    if not mask.any():
        raise ValueError("the brain mask is empty: nothing to normalize")
    values = data[mask]
    if not np.all(np.isfinite(values)):
        raise ValueError("the image has NaN or infinite values inside the mask")
    return data.astype(np.float64, copy=False), mask


def _output(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Scatter in-mask values into a float32 volume with a zero background."""
    out = np.zeros(mask.shape, dtype=np.float32)
    out[mask] = values.astype(np.float32)
    return out


def _check_percentiles(p_low: float, p_high: float) -> None:
    if not (0.0 <= p_low < p_high <= 100.0):
        raise ValueError(
            f"expected percentiles 0 <= p_low < p_high <= 100, got p_low={p_low}, p_high={p_high}"
        )


def _check_contrast(contrast: str) -> None:
    if contrast not in CONTRASTS:
        raise ValueError(f"contrast must be one of {', '.join(CONTRASTS)}; got {contrast!r}")


def _ecdf(values: np.ndarray) -> np.ndarray:
    """Empirical CDF of every value among ``values``: fraction of values <= it (in (0, 1])."""
    sorted_values = np.sort(values, kind="stable")
    return np.searchsorted(sorted_values, values, side="right") / values.size


# --------------------------------------------------------------------------- linear scalings


def _zscore(data: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
    data, mask = _check_inputs(data, mask)
    values = data[mask]
    mean = float(values.mean())
    std = float(values.std())
    if std == 0.0:
        raise ValueError("the image is constant inside the mask (sd 0): cannot z-score")
    return _output((values - mean) / std, mask), {"mean": mean, "std": std}


def zscore(data: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Standardize intensities inside ``mask`` to mean 0 and sd 1.

    Parameters
    ----------
    data : (X, Y, Z) array
        Intensities.
    mask : (X, Y, Z) bool array
        Brain mask; statistics come from these voxels only.

    Returns
    -------
    (X, Y, Z) float32 array
        ``(data - mean) / sd`` in the mask (population sd, ``ddof=0``), 0 outside.
    """
    return _zscore(data, mask)[0]


def _minmax(
    data: np.ndarray, mask: np.ndarray, out_range: Sequence[float] = (0.0, 1.0)
) -> tuple[np.ndarray, dict[str, Any]]:
    out_range = tuple(float(v) for v in out_range)
    if out_range not in {(0.0, 1.0), (-1.0, 1.0)}:
        raise ValueError(f"out_range must be [0, 1] or [-1, 1]; got {list(out_range)}")
    data, mask = _check_inputs(data, mask)
    values = data[mask]
    vmin, vmax = float(values.min()), float(values.max())
    if vmax == vmin:
        raise ValueError("the image is constant inside the mask: cannot min-max scale")
    lo, hi = out_range
    scaled = lo + (values - vmin) * ((hi - lo) / (vmax - vmin))
    return _output(scaled, mask), {"min": vmin, "max": vmax, "out_range": list(out_range)}


def minmax(
    data: np.ndarray, mask: np.ndarray, out_range: Sequence[float] = (0.0, 1.0)
) -> np.ndarray:
    """Scale the in-mask range linearly to ``out_range`` ([0, 1] or [-1, 1]).

    Note that in [0, 1] the darkest in-mask voxel becomes 0 like the background;
    use [-1, 1] or ``percentile`` when that matters.
    """
    return _minmax(data, mask, out_range)[0]


def _percentile_scale(
    data: np.ndarray,
    mask: np.ndarray,
    p_low: float = 0.5,
    p_high: float = 99.5,
    clip: bool = True,
) -> tuple[np.ndarray, dict[str, Any]]:
    _check_percentiles(p_low, p_high)
    data, mask = _check_inputs(data, mask)
    values = data[mask]
    lo, hi = (float(v) for v in np.percentile(values, [p_low, p_high]))
    if hi == lo:
        raise ValueError(
            f"percentiles {p_low} and {p_high} have the same intensity ({lo}): cannot scale"
        )
    scaled = (values - lo) / (hi - lo)
    if clip:
        scaled = np.clip(scaled, 0.0, 1.0)
    info = {"p_low": p_low, "p_high": p_high, "clip": clip, "value_low": lo, "value_high": hi}
    return _output(scaled, mask), info


def percentile_scale(
    data: np.ndarray,
    mask: np.ndarray,
    p_low: float = 0.5,
    p_high: float = 99.5,
    clip: bool = True,
) -> np.ndarray:
    """Map the in-mask ``p_low`` and ``p_high`` percentiles to 0 and 1.

    Robust to a few extreme voxels (vessels, residual fat) that ruin min-max.
    With ``clip`` the result is limited to [0, 1].
    """
    return _percentile_scale(data, mask, p_low, p_high, clip)[0]


# --------------------------------------------------------------------------- WhiteStripe


def _smoothed_histogram(values: np.ndarray, n_grid: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """A binned Gaussian kernel density estimate (Scott's bandwidth) on a regular grid.

    Same estimate as ``scipy.stats.gaussian_kde`` (what intensity-normalization
    and WhiteStripe's smoothed histogram use), but linear in the number of voxels.
    """
    vmin, vmax = float(values.min()), float(values.max())
    if vmax == vmin:
        raise ValueError("the image is constant inside the mask: no histogram to smooth")
    counts, edges = np.histogram(values, bins=n_grid, range=(vmin, vmax))
    centers = 0.5 * (edges[:-1] + edges[1:])
    step = edges[1] - edges[0]
    bandwidth = float(values.std(ddof=1)) * values.size ** (-1.0 / 5.0)
    sigma_bins = max(bandwidth / step, 0.5)
    radius = int(math.ceil(4 * sigma_bins))
    offsets = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (offsets / sigma_bins) ** 2)
    density = np.convolve(counts.astype(np.float64), kernel / kernel.sum(), mode="same")
    return centers, density


def _histogram_modes(density: np.ndarray, rare_fraction: float) -> np.ndarray:
    """Indices of local maxima whose height is at least ``rare_fraction`` of the highest."""
    d = density
    interior = np.flatnonzero((d[1:-1] > d[:-2]) & (d[1:-1] >= d[2:])) + 1
    candidates = list(interior)
    if d.size > 1 and d[0] > d[1]:
        candidates.insert(0, 0)
    if d.size > 1 and d[-1] > d[-2]:
        candidates.append(d.size - 1)
    if not candidates:
        return np.array([int(np.argmax(d))])
    peaks = np.array(candidates)
    # Small bumps (a few vessels, partial-volume shoulders) are not tissue modes:
    # WhiteStripe's R code drops peaks below 1/5 of the largest (``rare.prop``).
    return peaks[d[peaks] >= rare_fraction * d.max()]


def _whitestripe(
    data: np.ndarray,
    mask: np.ndarray,
    contrast: str = "T1w",
    width: float = 0.05,
    tail_percentile: float = 99.0,
    rare_fraction: float = 0.2,
) -> tuple[np.ndarray, dict[str, Any]]:
    _check_contrast(contrast)
    if not 0.0 < width < 0.5:
        raise ValueError(f"width (tau) must be a quantile half-width in (0, 0.5); got {width}")
    if not 50.0 < tail_percentile <= 100.0:
        raise ValueError(f"tail_percentile must be in (50, 100]; got {tail_percentile}")
    data, mask = _check_inputs(data, mask)
    values = data[mask]
    # The bright tail (vessels, enhancement, fat) can form a spurious "last" mode.
    body = values[values <= np.percentile(values, tail_percentile)]
    grid, density = _smoothed_histogram(body)
    peaks = _histogram_modes(density, rare_fraction)
    if contrast == "T1w":
        # NAWM is the brightest tissue in T1w: the last (highest-intensity) mode.
        mode = float(grid[peaks[-1]])
        rule = "last mode"
    else:
        # T2w/FLAIR/PD: WM is not the brightest tissue but it is the largest one.
        mode = float(grid[peaks[np.argmax(density[peaks])]])
        rule = "largest mode"
    mode_quantile = float(np.mean(values < mode))
    q_low = max(mode_quantile - width, 0.0)
    q_high = min(mode_quantile + width, 1.0)
    stripe_low, stripe_high = (float(v) for v in np.quantile(values, [q_low, q_high]))
    stripe = values[(values > stripe_low) & (values < stripe_high)]
    if stripe.size < 2:
        raise ValueError(
            f"the white stripe ({stripe_low:.4g}, {stripe_high:.4g}) holds fewer than 2 voxels; "
            "increase width"
        )
    mean = float(stripe.mean())
    std = float(stripe.std())
    if std == 0.0:
        raise ValueError("the white stripe is constant (sd 0): increase width")
    info = {
        "contrast": contrast,
        "width": width,
        "rule": rule,
        "wm_mode": mode,
        "stripe": [stripe_low, stripe_high],
        "stripe_voxels": int(stripe.size),
        "mean": mean,
        "std": std,
    }
    return _output((values - mean) / std, mask), info


def whitestripe(
    data: np.ndarray,
    mask: np.ndarray,
    contrast: str = "T1w",
    width: float = 0.05,
    tail_percentile: float = 99.0,
    rare_fraction: float = 0.2,
) -> np.ndarray:
    """WhiteStripe normalization (Shinohara et al. 2014, NeuroImage Clin 6:9-19).

    Finds the normal-appearing white matter peak of the smoothed in-mask
    histogram (T1w: the last mode; T2w, FLAIR, PDw: the largest mode), takes the
    "white stripe" of voxels whose quantile lies within ``width`` (tau) of the
    peak's, and z-scores the image with the stripe's mean and sd, so the WM peak
    maps to about 0 and one WM sd to 1.

    Parameters
    ----------
    data, mask : (X, Y, Z) arrays
        Intensities and brain mask.
    contrast : {"T1w", "T2w", "FLAIR", "PDw"}
        Selects the peak rule.
    width : float
        Tau: half-width of the stripe in quantiles (0.05 in the paper).
    tail_percentile : float
        Voxels above this in-mask percentile are ignored when finding the peak.
    rare_fraction : float
        Histogram peaks lower than this fraction of the highest are not modes.
    """
    return _whitestripe(data, mask, contrast, width, tail_percentile, rare_fraction)[0]


# --------------------------------------------------------------------------- fuzzy C-means


def fuzzy_cmeans_1d(
    values: np.ndarray,
    weights: np.ndarray | None = None,
    n_clusters: int = 3,
    fuzziness: float = 2.0,
    max_iter: int = 200,
    tol: float = 1e-6,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Fuzzy C-means (Bezdek 1981) on scalar values, optionally with sample weights.

    Weights let the caller run FCM on a histogram (unique values and their
    counts) instead of on every voxel: the objective, and so the result, are the
    same as on the expanded data.

    Parameters
    ----------
    values : (N,) array
    weights : (N,) array or None
        Non-negative multiplicity of each value.
    n_clusters : int
    fuzziness : float
        The exponent m > 1.
    max_iter, tol : int, float
        Stop when no centre moves by more than ``tol`` times the value range.
    seed : int
        Seeds the random initial memberships.

    Returns
    -------
    centers : (n_clusters,) float64, sorted ascending
    memberships : (n_clusters, N) float64, rows in the order of ``centers``
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size < n_clusters:
        raise ValueError(f"need at least {n_clusters} values for {n_clusters} clusters")
    if n_clusters < 2:
        raise ValueError(f"n_clusters must be >= 2; got {n_clusters}")
    if fuzziness <= 1.0:
        raise ValueError(f"fuzziness (m) must be > 1; got {fuzziness}")
    w = np.ones_like(values) if weights is None else np.asarray(weights, dtype=np.float64).ravel()
    if w.shape != values.shape or np.any(w < 0):
        raise ValueError("weights must be non-negative and one per value")
    rng = np.random.default_rng(seed)
    u = rng.random((n_clusters, values.size))
    u /= u.sum(axis=0, keepdims=True)
    value_range = float(values.max() - values.min()) or 1.0
    exponent = 2.0 / (fuzziness - 1.0)
    centers = np.zeros(n_clusters)
    for _ in range(max_iter):
        um = u**fuzziness * w
        new_centers = um @ values / um.sum(axis=1)
        distance = np.abs(values[None, :] - new_centers[:, None])
        distance = np.fmax(distance, np.finfo(np.float64).eps)
        inv = distance ** (-exponent)
        u = inv / inv.sum(axis=0, keepdims=True)
        moved = float(np.max(np.abs(new_centers - centers)))
        centers = new_centers
        if moved <= tol * value_range:
            break
    order = np.argsort(centers)
    return centers[order], u[order]


_FCM_TISSUE_RANK = {
    # rank of each tissue's centre, ascending intensity, per contrast
    "T1w": {"csf": 0, "gm": 1, "wm": 2},
    "T2w": {"wm": 0, "gm": 1, "csf": 2},
    "PDw": {"wm": 0, "gm": 1, "csf": 2},
    "FLAIR": {"csf": 0, "wm": 1, "gm": 2},
}


def _fcm_normalize(
    data: np.ndarray,
    mask: np.ndarray,
    tissue: str = "wm",
    contrast: str = "T1w",
    n_clusters: int = 3,
    fuzziness: float = 2.0,
    max_iter: int = 200,
    seed: int = 0,
    max_histogram_bins: int = 4096,
) -> tuple[np.ndarray, dict[str, Any]]:
    _check_contrast(contrast)
    if tissue not in ("wm", "gm", "csf"):
        raise ValueError(f"tissue must be 'wm', 'gm' or 'csf'; got {tissue!r}")
    if n_clusters != 3:
        raise ValueError(f"tissue means need 3 clusters (CSF, GM, WM); got {n_clusters}")
    data, mask = _check_inputs(data, mask)
    values = data[mask]
    uniques, counts = np.unique(values, return_counts=True)
    exact = uniques.size <= max_histogram_bins
    if not exact:
        # Many distinct values (float data): cluster a fine histogram instead of
        # every voxel; the centres move by well under a bin width.
        counts, edges = np.histogram(values, bins=max_histogram_bins)
        uniques = 0.5 * (edges[:-1] + edges[1:])
        keep = counts > 0
        uniques, counts = uniques[keep], counts[keep]
    centers, _ = fuzzy_cmeans_1d(
        uniques, counts, n_clusters=n_clusters, fuzziness=fuzziness, max_iter=max_iter, seed=seed
    )
    rank = _FCM_TISSUE_RANK[contrast][tissue]
    # The cluster centre is the fuzzy tissue mean (sum u^m x / sum u^m). The
    # plain membership-weighted mean (intensity-normalization 3) is pulled
    # towards the neighbouring tissue by the partial memberships of its voxels.
    tissue_mean = float(centers[rank])
    if tissue_mean == 0.0:
        raise ValueError(f"the fuzzy {tissue.upper()} mean is 0: cannot divide by it")
    info = {
        "tissue": tissue,
        "contrast": contrast,
        "fuzziness": fuzziness,
        "seed": seed,
        "centers": centers.tolist(),
        "tissue_mean": tissue_mean,
        "clustered_on": "unique values" if exact else f"{max_histogram_bins}-bin histogram",
    }
    return _output(values / tissue_mean, mask), info


def fcm_normalize(
    data: np.ndarray,
    mask: np.ndarray,
    tissue: str = "wm",
    contrast: str = "T1w",
    fuzziness: float = 2.0,
    max_iter: int = 200,
    seed: int = 0,
) -> np.ndarray:
    """Divide by the fuzzy C-means mean of one tissue (WM by default).

    Three fuzzy clusters are fitted to the in-mask intensities; the tissue's
    cluster is chosen by its rank for the contrast (T1w: WM brightest). The
    divisor is that cluster's centre, the fuzzy mean of the tissue, so WM then
    has mean about 1. (intensity-normalization 3 divides by the
    membership-weighted mean instead, which partial memberships bias towards
    the neighbouring tissue by a few percent.)
    """
    return _fcm_normalize(
        data, mask, tissue, contrast, fuzziness=fuzziness, max_iter=max_iter, seed=seed
    )[0]


# --------------------------------------------------------------------------- binning and HE


def _bin_intensities(
    data: np.ndarray, mask: np.ndarray, n_bins: int = 64, edges: str = "uniform"
) -> tuple[np.ndarray, dict[str, Any]]:
    if not isinstance(n_bins, (int, np.integer)) or n_bins < 2:
        raise ValueError(f"n_bins must be an integer >= 2; got {n_bins!r}")
    if edges not in ("uniform", "quantile"):
        raise ValueError(f"edges must be 'uniform' or 'quantile'; got {edges!r}")
    data, mask = _check_inputs(data, mask)
    values = data[mask]
    if edges == "uniform":
        bin_edges = np.linspace(values.min(), values.max(), n_bins + 1)
    else:
        bin_edges = np.quantile(values, np.linspace(0.0, 1.0, n_bins + 1))
    # Interior edges only: the lowest value falls in bin 1 and the highest in bin N.
    labels = np.searchsorted(bin_edges[1:-1], values, side="right") + 1
    info = {
        "n_bins": int(n_bins),
        "edges": edges,
        "bin_edges": bin_edges.tolist(),
        "occupied_bins": int(np.unique(labels).size),
    }
    return _output(labels.astype(np.float64), mask), info


def bin_intensities(
    data: np.ndarray, mask: np.ndarray, n_bins: int = 64, edges: str = "uniform"
) -> np.ndarray:
    """Quantize in-mask intensities into ``n_bins`` bins labelled 1..n_bins.

    ``edges="uniform"`` splits the in-mask range evenly; ``"quantile"`` puts the
    same number of voxels in each bin (ties permitting). Labels start at 1 so
    that the lowest bin differs from the background (0). With continuous data
    every bin is occupied; with few distinct values some bins may stay empty.
    """
    return _bin_intensities(data, mask, n_bins, edges)[0]


def _histogram_equalize(data: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
    data, mask = _check_inputs(data, mask)
    return _output(_ecdf(data[mask]), mask), {}


def histogram_equalize(data: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Global histogram equalization: each in-mask voxel becomes its empirical CDF.

    Exact (no intensity binning): the output is the fraction of in-mask voxels
    at or below the voxel's intensity, in (0, 1]; equal inputs stay equal.
    """
    return _histogram_equalize(data, mask)[0]


def _rmshe(data: np.ndarray, mask: np.ndarray, level: int = 2) -> tuple[np.ndarray, dict[str, Any]]:
    if not isinstance(level, (int, np.integer)) or not 0 <= level <= 8:
        raise ValueError(f"level (r) must be an integer in 0..8; got {level!r}")
    data, mask = _check_inputs(data, mask)
    values = data[mask]
    vmin, vmax = float(values.min()), float(values.max())
    if vmax == vmin:
        raise ValueError("the image is constant inside the mask: nothing to equalize")
    # Work on [0, 1] so that the output range is the same for every r.
    x = (values - vmin) / (vmax - vmin)
    out = np.empty_like(x)
    separators: list[float] = []

    def equalize(index: np.ndarray, lo: float, hi: float, depth: int) -> None:
        sub = x[index]
        if depth == level or sub.size < 2 or sub.min() == sub.max():
            # Chen & Ramli: each sub-histogram is equalized onto its own input
            # range, so the mean brightness is preserved piecewise.
            out[index] = lo + (hi - lo) * _ecdf(sub)
            return
        mean = float(sub.mean())
        separators.append(mean)
        below = sub <= mean
        equalize(index[below], lo, mean, depth + 1)
        equalize(index[~below], mean, hi, depth + 1)

    equalize(np.arange(x.size), 0.0, 1.0, 0)
    return _output(out, mask), {"level": int(level), "separators": sorted(separators)}


def rmshe(data: np.ndarray, mask: np.ndarray, level: int = 2) -> np.ndarray:
    """Recursive mean-separate histogram equalization (Chen & Ramli 2003).

    The in-mask histogram (intensities scaled to [0, 1]) is split at its mean,
    each part again at its own mean, ``level`` (r) times, giving 2**r
    sub-histograms; each is equalized onto its own intensity range. r=0 is plain
    histogram equalization (:func:`histogram_equalize`), larger r preserves the
    mean brightness better.

    Returns
    -------
    (X, Y, Z) float32 array in [0, 1], 0 outside the mask.
    """
    return _rmshe(data, mask, level)[0]


def _clahe(
    data: np.ndarray,
    mask: np.ndarray,
    kernel_size: int | Sequence[int] = 32,
    clip_limit: float = 0.01,
    n_bins: int = 256,
    p_low: float = 0.5,
    p_high: float = 99.5,
) -> tuple[np.ndarray, dict[str, Any]]:
    from skimage.exposure import equalize_adapthist

    _check_percentiles(p_low, p_high)
    if not 0.0 < clip_limit <= 1.0:
        raise ValueError(f"clip_limit must be in (0, 1]; got {clip_limit}")
    kernel = [int(kernel_size)] * 3 if np.isscalar(kernel_size) else [int(k) for k in kernel_size]
    if len(kernel) != 3 or min(kernel) < 2:
        raise ValueError(f"kernel_size must be >= 2 voxels (one value or 3); got {kernel_size!r}")
    scaled, scale_info = _percentile_scale(data, mask, p_low, p_high, clip=True)
    # Crop to the mask's bounding box: tiles of background only cost time.
    idx = np.argwhere(mask)
    lo, hi = idx.min(axis=0), idx.max(axis=0) + 1
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    sub = scaled[box].astype(np.float64)
    kernel = [min(k, s) for k, s in zip(kernel, sub.shape, strict=True)]
    equalized = equalize_adapthist(sub, kernel_size=kernel, clip_limit=clip_limit, nbins=n_bins)
    out = np.zeros(mask.shape, dtype=np.float32)
    out[box] = equalized.astype(np.float32)
    out[~mask] = 0.0
    info = {
        "kernel_size": kernel,
        "clip_limit": clip_limit,
        "n_bins": n_bins,
        "input_scaling": {k: scale_info[k] for k in ("p_low", "p_high", "value_low", "value_high")},
    }
    return out, info


def clahe(
    data: np.ndarray,
    mask: np.ndarray,
    kernel_size: int | Sequence[int] = 32,
    clip_limit: float = 0.01,
    n_bins: int = 256,
    p_low: float = 0.5,
    p_high: float = 99.5,
) -> np.ndarray:
    """3D contrast-limited adaptive histogram equalization (scikit-image).

    Intensities are first scaled robustly to [0, 1] (``p_low``/``p_high``
    percentiles, clipped), then ``skimage.exposure.equalize_adapthist`` runs on
    the mask's bounding box with a ``kernel_size`` in voxels.
    """
    return _clahe(data, mask, kernel_size, clip_limit, n_bins, p_low, p_high)[0]


# --------------------------------------------------------------------------- Nyúl


@dataclass
class NyulStandard:
    """A learned Nyúl & Udupa standard histogram scale.

    Attributes
    ----------
    percentiles : list of float
        The landmark percentiles, ascending; the first and last bound the scale.
    landmarks : list of float
        The standard-scale intensity of each landmark (mean over the fit images).
    output_range : list of float
        Where the first and last landmark of each image were mapped before averaging.
    subjects : list of str
        The subjects (or images) the scale was fitted on.
    """

    percentiles: list[float]
    landmarks: list[float]
    output_range: list[float] = field(default_factory=lambda: [1.0, 100.0])
    subjects: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.percentiles) != len(self.landmarks) or len(self.percentiles) < 2:
            raise ValueError(
                "a Nyúl standard needs as many landmarks as percentiles (at least 2); got "
                f"{len(self.landmarks)} landmarks for {len(self.percentiles)} percentiles"
            )
        if np.any(np.diff(self.percentiles) <= 0):
            raise ValueError(f"percentiles must increase strictly; got {self.percentiles}")
        if np.any(np.diff(self.landmarks) < 0):
            raise ValueError(f"standard landmarks must not decrease; got {self.landmarks}")

    def to_dict(self) -> dict[str, Any]:
        return {"Method": "Nyul", **asdict(self)}

    def save(self, path: str | Path) -> Path:
        """Write the standard as JSON."""
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> NyulStandard:
        """Read a standard written by :meth:`save`; errors name the file."""
        path = Path(path)
        try:
            content = json.loads(path.read_text())
        except FileNotFoundError:
            raise ValueError(f"{path}: Nyúl landmarks file not found") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None
        try:
            return cls(
                percentiles=[float(v) for v in content["percentiles"]],
                landmarks=[float(v) for v in content["landmarks"]],
                output_range=[float(v) for v in content.get("output_range", [1.0, 100.0])],
                subjects=[str(s) for s in content.get("subjects", [])],
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}: not a Nyúl standard ({err})") from None


def _check_nyul_percentiles(percentiles: Sequence[float]) -> np.ndarray:
    p = np.asarray(percentiles, dtype=np.float64)
    if p.ndim != 1 or p.size < 2 or np.any(np.diff(p) <= 0) or p[0] < 0 or p[-1] > 100:
        raise ValueError(
            f"percentiles must be at least 2 strictly increasing values in [0, 100]; got {list(p)}"
        )
    return p


def fit_nyul(
    images: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    percentiles: Sequence[float] = (1, 10, 20, 30, 40, 50, 60, 70, 80, 90, 99),
    output_range: Sequence[float] = (1.0, 100.0),
    subjects: Sequence[str] | None = None,
) -> NyulStandard:
    """Learn a Nyúl & Udupa (1999) standard scale from a group of images.

    For each image the in-mask ``percentiles`` are its landmarks; they are
    mapped linearly so that the first and last land on ``output_range`` and the
    mapped landmarks are averaged over images. Fit on training subjects only:
    fitting on every image leaks the test images' histograms into training.

    Parameters
    ----------
    images, masks : sequences of (X, Y, Z) arrays
        One brain mask per image (shapes may differ between images).
    percentiles : sequence of float
        Strictly increasing, in [0, 100].
    output_range : (float, float)
        Standard intensities of the first and last landmark.
    subjects : sequence of str, optional
        Identifiers recorded in the standard (default ``image-0``, ``image-1``...).
    """
    p = _check_nyul_percentiles(percentiles)
    if len(images) == 0:
        raise ValueError("fit_nyul needs at least one image")
    if len(images) != len(masks):
        raise ValueError(f"got {len(images)} images but {len(masks)} masks")
    if subjects is not None and len(subjects) != len(images):
        raise ValueError(f"got {len(images)} images but {len(subjects)} subject ids")
    out_lo, out_hi = (float(v) for v in output_range)
    if not out_hi > out_lo:
        raise ValueError(f"output_range must increase; got {list(output_range)}")
    total = np.zeros(p.size)
    for i, (image, mask) in enumerate(zip(images, masks, strict=True)):
        data, m = _check_inputs(image, mask)
        landmarks = np.percentile(data[m], p)
        if landmarks[-1] == landmarks[0]:
            name = subjects[i] if subjects is not None else f"image {i}"
            raise ValueError(f"{name}: first and last landmark are equal (constant image?)")
        total += out_lo + (landmarks - landmarks[0]) * (
            (out_hi - out_lo) / (landmarks[-1] - landmarks[0])
        )
    ids = list(subjects) if subjects is not None else [f"image-{i}" for i in range(len(images))]
    return NyulStandard(
        percentiles=p.tolist(),
        landmarks=(total / len(images)).tolist(),
        output_range=[out_lo, out_hi],
        subjects=ids,
    )


def _piecewise_linear(x: np.ndarray, xp: np.ndarray, fp: np.ndarray) -> np.ndarray:
    """np.interp with linear extrapolation beyond both ends (as Nyúl's method maps them)."""
    y = np.interp(x, xp, fp)
    below = x < xp[0]
    above = x > xp[-1]
    if below.any():
        slope = (fp[1] - fp[0]) / (xp[1] - xp[0])
        y[below] = fp[0] + (x[below] - xp[0]) * slope
    if above.any():
        slope = (fp[-1] - fp[-2]) / (xp[-1] - xp[-2])
        y[above] = fp[-1] + (x[above] - xp[-1]) * slope
    return y


def _apply_nyul(
    data: np.ndarray, mask: np.ndarray, standard: NyulStandard
) -> tuple[np.ndarray, dict[str, Any]]:
    if not isinstance(standard, NyulStandard):
        raise ValueError(f"standard must be a NyulStandard; got {type(standard).__name__}")
    data, mask = _check_inputs(data, mask)
    values = data[mask]
    landmarks = np.percentile(values, standard.percentiles)
    target = np.asarray(standard.landmarks, dtype=np.float64)
    # Tied landmarks (few distinct intensities) would make the map a step; keep
    # the first of each run of equal landmarks so the map stays a function.
    keep = np.concatenate([[True], np.diff(landmarks) > 0])
    if keep.sum() < 2:
        raise ValueError("all Nyúl landmarks of the image are equal (constant image?)")
    mapped = _piecewise_linear(values, landmarks[keep], target[keep])
    info = {
        "percentiles": list(standard.percentiles),
        "standard_landmarks": list(standard.landmarks),
        "image_landmarks": landmarks.tolist(),
        "fitted_on": list(standard.subjects),
    }
    return _output(mapped, mask), info


def apply_nyul(data: np.ndarray, mask: np.ndarray, standard: NyulStandard) -> np.ndarray:
    """Map an image onto a learned Nyúl standard scale.

    The image's own in-mask landmarks (the standard's percentiles) are mapped
    piecewise-linearly onto the standard landmarks; intensities beyond the first
    and last landmark follow the end segments' slopes.
    """
    return _apply_nyul(data, mask, standard)[0]


# --------------------------------------------------------------------------- dispatcher

_DISPATCH = {
    "zscore": (_zscore, set()),
    "minmax": (_minmax, {"out_range"}),
    "percentile": (_percentile_scale, {"p_low", "p_high", "clip"}),
    "whitestripe": (_whitestripe, {"contrast", "width", "tail_percentile", "rare_fraction"}),
    "fcm": (
        _fcm_normalize,
        {"tissue", "contrast", "fuzziness", "max_iter", "seed", "n_clusters"},
    ),
    "binning": (_bin_intensities, {"n_bins", "edges"}),
    "histeq": (_histogram_equalize, set()),
    "rmshe": (_rmshe, {"level"}),
    "clahe": (_clahe, {"kernel_size", "clip_limit", "n_bins", "p_low", "p_high"}),
    "nyul": (_apply_nyul, {"standard"}),
}


def normalize(
    data: np.ndarray, mask: np.ndarray, method: str = "zscore", **params: Any
) -> tuple[np.ndarray, dict[str, Any]]:
    """Normalize with the named method; return the image and a record for the sidecar.

    Parameters
    ----------
    data, mask : (X, Y, Z) arrays
    method : str
        One of :data:`METHODS`. ``"none"`` returns the in-mask intensities as
        float32 (background 0) unchanged.
    **params
        The method's keyword parameters (see each function). ``nyul`` needs
        ``standard`` (a :class:`NyulStandard` or the path of a saved one).

    Returns
    -------
    normalized : (X, Y, Z) float32 array
    record : dict
        ``{"Method": method, "Parameters": {...}, "Fitted": {...}}``: what was
        asked for and the values estimated from the image (means, peaks, edges).
    """
    if method == "none":
        data, mask = _check_inputs(data, mask)
        return _output(data[mask], mask), {"Method": "none", "Parameters": {}, "Fitted": {}}
    if method not in _DISPATCH:
        raise ValueError(f"unknown normalization method {method!r}; expected one of {METHODS}")
    function, allowed = _DISPATCH[method]
    unknown = set(params) - allowed
    if unknown:
        raise ValueError(
            f"method {method!r} takes parameters {sorted(allowed) or 'none'}; "
            f"got unexpected {sorted(unknown)}"
        )
    if method == "nyul":
        if "standard" not in params:
            raise ValueError("method 'nyul' needs standard= (a NyulStandard or a JSON path)")
        standard = params["standard"]
        if isinstance(standard, (str, Path)):
            standard = NyulStandard.load(standard)
        out, fitted = _apply_nyul(data, mask, standard)
        recorded = {"standard": standard.to_dict()}
    else:
        out, fitted = function(data, mask, **params)
        recorded = {k: (list(v) if isinstance(v, tuple) else v) for k, v in params.items()}
    return out, {"Method": method, "Parameters": recorded, "Fitted": fitted}


def method_parameters(method: str, settings: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword parameters of ``method`` from the ``intensity`` config section.

    ``settings`` is the section as a mapping (``Config.section_dict("intensity")``);
    keys that do not concern ``method`` are ignored, missing keys keep the
    function defaults. ``nyul`` gets ``standard`` from ``nyul_landmarks_file``.
    """
    if method not in METHODS:
        raise ValueError(f"unknown normalization method {method!r}; expected one of {METHODS}")
    mapping = {
        "minmax": {"minmax_range": "out_range"},
        "percentile": {"percentiles": ("p_low", "p_high"), "percentile_clip": "clip"},
        "whitestripe": {"whitestripe_width": "width"},
        "binning": {"n_bins": "n_bins", "bin_edges": "edges"},
        "rmshe": {"rmshe_level": "level"},
        "clahe": {"clahe_kernel_size": "kernel_size", "clahe_clip_limit": "clip_limit"},
        "nyul": {"nyul_landmarks_file": "standard"},
    }.get(method, {})
    params: dict[str, Any] = {}
    for key, name in mapping.items():
        if key not in settings or settings[key] in ("", None):
            continue
        value = settings[key]
        if isinstance(name, tuple):
            if len(value) != len(name):
                raise ValueError(f"intensity.{key} must have {len(name)} values; got {value!r}")
            params.update(zip(name, (float(v) for v in value), strict=True))
        else:
            params[name] = list(value) if isinstance(value, (list, tuple)) else value
    return params
