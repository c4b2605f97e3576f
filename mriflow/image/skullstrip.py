"""Brain extraction (skull stripping), offline, with two backends and pass-through.

Backends
--------
``deepbet``
    deepbet (Fisch et al. 2024; MIT; its wheel ships the two TorchScript models,
    so nothing is downloaded): a 3D U-Net that finds a bounding box on a 128^3
    copy and segments the brain on a 256^3 crop, then keeps the largest component
    and fills voids. Imported lazily (needs torch; ``pip install mriflow[deep]``).
    Runs on CPU in 3-10 s for a 1 mm head.
``template``
    Atlas-based, torch-free, in the spirit of antsBrainExtraction.sh. The embedded
    template is brain-only, and an unmasked whole-head registration to it squeezes
    the head into the brain (measured: a 2.6 l "brain"). So the subject's head is
    registered (similarity + coarse SyN at 8 and 4 mm, Mattes MI, fixed seed) to a
    *pseudo-head* built from the 2 mm template: the brain, then concentric shells
    standing in for the CSF rim (0-2 mm, dark), the skull (2-8 mm, darker) and
    the scalp (8-14 mm, bright), with the metric restricted to 20 mm around the
    brain. The linear stage is a similarity transform (rigid + one scale): a
    full affine's anisotropic scales stretched the template into the orbits and
    skull base on some heads (Dice with deepbet 0.83 instead of 0.93). Mutual
    information needs only that the layers exist, not their exact intensities,
    so T2w heads work too. The template brain mask is pulled back to the subject
    with the inverse transform (linear interpolation, so it is a probability)
    and refined: thresholded at 0.5, opened with a 2 mm ball to cut thin
    bridges to the dura or eyes, reduced to its largest component, closed with a
    2 mm ball, and holes filled. About 20-45 s on 2 cores. It is less exact than
    deepbet (Dice 0.90-0.95 against deepbet's masks on real heads; see
    docs/anatomical.md); prefer deepbet where it is installed.
``none``
    The input is taken to be brain-only: the mask is its nonzero support.

Pass-through
------------
An input that :func:`is_skull_stripped` recognises is not stripped again (that would
erode it): its mask is its nonzero support, cleaned as above, and the brain image is
the input unchanged. This is sMRIPrep's ``--skull-strip-mode auto`` idea with a
detector that does not rely on the image borders alone (sMRIPrep's ``_is_skull_stripped``
checks that the six faces of the volume are all zero, which fails for a head
whose air was zeroed by the scanner and for a brain that touches the FoV).
"""

from __future__ import annotations

import importlib.util
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from mriflow.image._itk import new_like
from mriflow.image.masks import largest_component
from mriflow.image.registration import apply_transforms, register
from mriflow.image.template import load_template

__all__ = [
    "SKULL_STRIP_METHODS",
    "SkullStripResult",
    "deepbet_available",
    "is_skull_stripped",
    "clean_mask",
    "skull_strip",
]

SKULL_STRIP_METHODS = ("auto", "deepbet", "template", "none")

# Brain-only images hold between a neonatal brain and a large adult brain with
# its CSF rim; a whole head (with scalp) is 3-6 l.
_STRIPPED_VOLUME_ML = (300.0, 2500.0)
_MIN_BACKGROUND_FRACTION = 0.2
_MAX_BORDER_FOREGROUND = 0.1


@dataclass(frozen=True)
class SkullStripResult:
    """What :func:`skull_strip` returns.

    Attributes
    ----------
    mask : nibabel.Nifti1Image
        uint8 brain mask {0, 1} on the input grid: one connected piece, no holes.
    brain : nibabel.Nifti1Image
        float32 input multiplied by the mask.
    method : str
        Backend that made the mask: ``"deepbet"``, ``"template"``, ``"none"``,
        or ``"passthrough"`` (input detected as already skull-stripped).
    input_was_stripped : bool
        Whether the input was detected as already skull-stripped.
    """

    mask: nib.Nifti1Image
    brain: nib.Nifti1Image
    method: str
    input_was_stripped: bool


def deepbet_available() -> bool:
    """Whether the deepbet backend can be imported (deepbet and torch installed)."""
    return (
        importlib.util.find_spec("deepbet") is not None
        and importlib.util.find_spec("torch") is not None
    )


def _voxel_ml(img: nib.spatialimages.SpatialImage) -> float:
    return float(abs(np.linalg.det(img.affine[:3, :3]))) / 1000.0


def is_skull_stripped(img: nib.spatialimages.SpatialImage) -> bool:
    """Whether ``img`` already holds only the brain (skull and scalp removed).

    A brain-extracted image has a background of exact zeros. The rule, all of
    which must hold:

    1. at least 20 % of the voxels are zero (up to float round-off: below
       1e-6 of the 99.9th percentile of ``|image|``): a raw scan has noise in
       its air, not zeros;
    2. at most 10 % of the voxels on the six faces of the volume are nonzero:
       the brain sits inside the field of view;
    3. the nonzero voxels, holes filled, occupy 300-2500 ml: a brain with its CSF
       rim, not a head (a whole head whose air the scanner zeroed is 3-6 l).

    A head that fits 2.5 l (a small child's) with a zeroed background would be
    taken as stripped; turn detection off (``skull_strip.detect_stripped``) there.
    """
    if len(img.shape) != 3:
        raise ValueError(f"expected a 3D image, got shape {img.shape}")
    data = np.abs(img.get_fdata(dtype=np.float32))
    top = float(np.percentile(data, 99.9))
    if top <= 0:
        return False
    foreground = data > 1e-6 * top
    if 1.0 - foreground.mean() < _MIN_BACKGROUND_FRACTION:
        return False
    faces = [
        foreground[0], foreground[-1],
        foreground[:, 0], foreground[:, -1],
        foreground[:, :, 0], foreground[:, :, -1],
    ]  # fmt: skip
    border = sum(f.sum() for f in faces) / sum(f.size for f in faces)
    if border > _MAX_BORDER_FOREGROUND:
        return False
    volume = ndi.binary_fill_holes(foreground).sum() * _voxel_ml(img)
    return bool(_STRIPPED_VOLUME_ML[0] <= volume <= _STRIPPED_VOLUME_ML[1])


def _ball(radius_mm: float, zooms: np.ndarray) -> np.ndarray:
    """An ellipsoidal structuring element of ``radius_mm`` on a grid of voxel size ``zooms``."""
    r = np.maximum(np.floor(radius_mm / zooms), 1).astype(int)
    grid = np.ogrid[tuple(slice(-ri, ri + 1) for ri in r)]
    return sum((g * z / radius_mm) ** 2 for g, z in zip(grid, zooms, strict=True)) <= 1.0 + 1e-9


def clean_mask(
    mask: np.ndarray, zooms: tuple[float, ...] | np.ndarray, *, smooth_mm: float = 0.0
) -> np.ndarray:
    """One connected piece without holes; optionally opened and closed by a ball.

    Parameters
    ----------
    mask : (X, Y, Z) array, nonzero inside
    zooms : voxel size in mm per axis
    smooth_mm : float
        Radius of the ball for a morphological opening (cuts bridges thinner than
        the ball) before, and a closing (fills notches) after, keeping the largest
        component. 0 skips both.

    Returns
    -------
    (X, Y, Z) bool array
    """
    mask = np.asarray(mask) > 0
    if not mask.any():
        raise ValueError("the brain mask is empty")
    zooms = np.asarray(zooms, dtype=float)[:3]
    if smooth_mm > 0:
        ball = _ball(smooth_mm, zooms)
        opened = ndi.binary_opening(mask, structure=ball)
        if opened.any():
            mask = opened
    mask = largest_component(mask)
    if smooth_mm > 0:
        pad = max(ball.shape)
        padded = np.pad(mask, pad)
        closed = ndi.binary_closing(padded, structure=ball)
        mask = closed[pad:-pad, pad:-pad, pad:-pad] | mask
    return ndi.binary_fill_holes(mask)


def _support_mask(data: np.ndarray, zooms: np.ndarray) -> np.ndarray:
    top = float(np.percentile(np.abs(data), 99.9))
    if top <= 0:
        raise ValueError("the image is all zeros: no brain to mask")
    return clean_mask(np.abs(data) > 1e-6 * top, zooms)


@lru_cache(maxsize=1)
def _deepbet_model():  # -> deepbet.BrainExtraction
    try:
        from deepbet import BrainExtraction
    except ImportError as err:
        raise ImportError(
            "skull-strip method 'deepbet' needs the deepbet and torch packages "
            "(pip install 'mriflow[deep]'); or use method 'template'"
        ) from err
    # no_gpu: CPU only, so results do not depend on the machine's GPU.
    return BrainExtraction(no_gpu=True)


def _deepbet_mask(
    img: nib.spatialimages.SpatialImage, *, threshold: float, n_dilate: int, num_threads: int
) -> np.ndarray:
    import torch

    model = _deepbet_model()
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        data = img.get_fdata(dtype=np.float32)
        # In memory: deepbet's ``run`` accepts a nibabel image and writes nothing
        # when no output paths are given; it reorients to RAS and back itself.
        _, mask_img, _ = model.run(
            nib.Nifti1Image(data, img.affine), threshold=threshold, n_dilate=n_dilate
        )
    finally:
        torch.set_num_threads(previous)
    return np.asarray(mask_img.dataobj) > 0


@lru_cache(maxsize=1)
def _pseudo_head() -> tuple[nib.Nifti1Image, nib.Nifti1Image, nib.Nifti1Image]:
    """The 2 mm template with CSF/skull/scalp shells, its metric mask and brain mask."""
    tpl = load_template(2)
    brain = np.asarray(tpl.mask.dataobj) > 0
    zooms = np.asarray(tpl.mask.header.get_zooms()[:3], dtype=float)
    outside = ndi.distance_transform_edt(~brain, sampling=zooms)
    head = np.array(tpl.t1w.dataobj, dtype=np.float32)
    head[(outside > 0) & (outside <= 2)] = 0.25  # CSF rim and meninges
    head[(outside > 2) & (outside <= 8)] = 0.05  # skull
    head[(outside > 8) & (outside <= 14)] = 0.75  # scalp
    metric_mask = (outside <= 20).astype(np.uint8)
    affine = tpl.t1w.affine
    return (
        nib.Nifti1Image(head, affine),
        nib.Nifti1Image(metric_mask, affine),
        nib.Nifti1Image(brain.astype(np.float32), affine),
    )


def _template_mask(
    img: nib.spatialimages.SpatialImage, *, random_seed: int, num_threads: int
) -> np.ndarray:
    head, metric_mask, brain = _pseudo_head()
    moving = nib.Nifti1Image(img.get_fdata(dtype=np.float32), img.affine)
    with tempfile.TemporaryDirectory(prefix="mriflow_bet_") as tmp:
        result = register(
            moving,
            head,
            f"{tmp}/bet_",
            transform="syn",
            preset="coarse",
            fixed_mask=metric_mask,
            random_seed=random_seed,
            num_threads=num_threads,
            compute_warped=False,
        )
        prob = apply_transforms(
            brain, result.reverse_transforms, moving, num_threads=num_threads
        ).get_fdata(dtype=np.float32)
    zooms = np.asarray(img.header.get_zooms()[:3], dtype=float)
    return clean_mask(prob >= 0.5, zooms, smooth_mm=2.0)


def skull_strip(
    img: nib.spatialimages.SpatialImage,
    *,
    method: Literal["auto", "deepbet", "template", "none"] = "auto",
    detect_stripped: bool = True,
    deepbet_threshold: float = 0.5,
    deepbet_n_dilate: int = 0,
    random_seed: int = 42,
    num_threads: int = 1,
) -> SkullStripResult:
    """Brain mask and brain image of a 3D head image.

    Parameters
    ----------
    img : nibabel image, 3D
        Bias-corrected T1w or T2w (any orientation and voxel size).
    method : {"auto", "deepbet", "template", "none"}
        ``auto`` uses deepbet when it is importable, else ``template``.
    detect_stripped : bool
        Pass an input that :func:`is_skull_stripped` recognises through unchanged.
    deepbet_threshold : float in (0, 1)
        Probability above which a voxel is brain (deepbet).
    deepbet_n_dilate : int
        Voxel layers to dilate (> 0) or erode (< 0) deepbet's mask by.
    random_seed : int
        Seed of the template backend's registration.
    num_threads : int
        Threads for torch (deepbet) or ITK (template).

    Returns
    -------
    SkullStripResult
    """
    if method not in SKULL_STRIP_METHODS:
        raise ValueError(f"skull-strip method must be one of {SKULL_STRIP_METHODS}, got {method!r}")
    if not 0.0 < deepbet_threshold < 1.0:
        raise ValueError(f"deepbet_threshold must be in (0, 1), got {deepbet_threshold}")
    if num_threads < 1:
        raise ValueError(f"num_threads must be >= 1, got {num_threads}")
    if len(img.shape) != 3:
        raise ValueError(f"skull stripping expects a 3D image, got shape {img.shape}")
    data = img.get_fdata(dtype=np.float32)
    if not np.isfinite(data).all():
        raise ValueError("image has non-finite values (NaN/inf)")
    zooms = np.asarray(img.header.get_zooms()[:3], dtype=float)

    stripped = bool(detect_stripped) and is_skull_stripped(img)
    if stripped or method == "none":
        mask = _support_mask(data, zooms)
        brain = data
        used = "passthrough" if stripped else "none"
    else:
        if method == "auto":
            method = "deepbet" if deepbet_available() else "template"
        if method == "deepbet":
            raw = _deepbet_mask(
                img,
                threshold=deepbet_threshold,
                n_dilate=int(deepbet_n_dilate),
                num_threads=num_threads,
            )
            mask = clean_mask(raw, zooms)
        else:
            mask = _template_mask(img, random_seed=random_seed, num_threads=num_threads)
        brain = np.where(mask, data, 0.0).astype(np.float32)
        used = method
    mask_img = new_like(mask.astype(np.uint8), img.affine, img)
    return SkullStripResult(mask_img, new_like(brain, img.affine, img), used, stripped)
