"""The embedded template: ICBM152 2009a nonlinear symmetric, as nilearn's wheel ships it.

nilearn bundles three maps of the ICBM152 2009a symmetric template at 1 mm
(197x233x189, RAS, uint8): the T1w (already brain-extracted: no scalp, no skull)
and the GM and WM probability maps. mriflow uses them as its only template, so a
run needs no network and no TemplateFlow. The space name is ``MNI152NLin2009aSym``
(not fMRIPrep's default ``MNI152NLin2009cAsym``: a different template).

What mriflow derives from them (at first use, then cached in memory):

brain mask
    No mask file ships. The T1w is zero outside the brain (it was masked by its
    makers), so the mask is ``T1w > 0``, cleaned to be safe against stray voxels
    in a future nilearn release: keep the largest connected component, then fill
    enclosed holes. On nilearn 0.14 this is one piece of 1887 ml, with no holes,
    hugging the brain with its thin CSF rim. (nilearn's own ``load_mni152_brain_mask``
    thresholds the rescaled T1w at 0.2, which drops dark CSF voxels inside the
    brain; the support of the masked T1w is the definition its makers used.)
CSF prior
    ``clip(mask - GM - WM, 0, 1)``: inside the brain mask, what is neither GM
    nor WM. This gives the ventricles, the sulci and the CSF rim (about 220 ml of
    probability mass). It is a reasonable prior, not a measured CSF map; the
    GM and WM maps extend slightly (about 130 ml of low probability) outside
    the T1w support, which this construction ignores.
2 mm version
    Each 2 mm voxel is the mean of a 2x2x2 block of 1 mm voxels (the 1 mm grid
    is padded by one zero plane where a dimension is odd), which is exact
    partial-volume averaging: no interpolation. The 2 mm grid's origin is
    therefore half a 1 mm voxel off the 1 mm grid's. The 2 mm mask is the block
    mean of the 1 mm mask thresholded at 0.5.

All arrays are float32 (T1w scaled to [0, 1], probabilities in [0, 1]) except
the mask (uint8), and are read-only: they are shared by every caller.

A user template (``registration.template_files``) is read by
:func:`load_user_template` into the same :class:`Template`: its T1w is masked by
its brain mask (mriflow registers skull-stripped brains to brain-only templates)
and scaled to [0, 1] by its 99.9th percentile inside the mask; priors are optional
(CSF derived as above when GM and WM are given). It keeps its own grid, and
:func:`downsampled` gives the 2x block-mean grid the ``fast`` registration preset
computes its metric on, exactly as for the embedded 2 mm version.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from mriflow.image.masks import bounding_box

__all__ = [
    "TEMPLATE_SPACE",
    "TEMPLATE_RESOLUTIONS",
    "Template",
    "TemplateError",
    "check_template_files",
    "cropped_to_brain",
    "downsampled",
    "Grid",
    "get_template",
    "load_template",
    "load_user_template",
    "template_files",
    "template_grid",
]

TEMPLATE_SPACE = "MNI152NLin2009aSym"
"""BIDS ``space-`` label of the embedded template."""
TEMPLATE_RESOLUTIONS = (1, 2)

_FILES = {
    "t1w": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}


@dataclass(frozen=True)
class Template:
    """The embedded template at one resolution.

    Attributes
    ----------
    space : str
        BIDS space label, ``"MNI152NLin2009aSym"`` or a user template's name.
    resolution : float
        Voxel size in mm (1 or 2 for the embedded template; the mean voxel size of
        a user template).
    t1w : nibabel.Nifti1Image
        Brain-extracted T1w, float32 in [0, 1].
    mask : nibabel.Nifti1Image
        Brain mask, uint8 {0, 1}.
    gm, wm, csf : nibabel.Nifti1Image or None
        Tissue probability maps, float32 in [0, 1] (CSF derived, see module docs);
        ``None`` for a user template given without priors.
    """

    space: str
    resolution: float
    t1w: nib.Nifti1Image
    mask: nib.Nifti1Image
    gm: nib.Nifti1Image | None
    wm: nib.Nifti1Image | None
    csf: nib.Nifti1Image | None

    @property
    def has_priors(self) -> bool:
        return self.gm is not None and self.wm is not None and self.csf is not None

    def probseg(self, label: str) -> nib.Nifti1Image:
        """The probability map of ``label`` (``"GM"``, ``"WM"`` or ``"CSF"``)."""
        maps = {"GM": self.gm, "WM": self.wm, "CSF": self.csf}
        try:
            found = maps[label.upper()]
        except KeyError:
            raise ValueError(f"label must be one of GM, WM, CSF; got {label!r}") from None
        if found is None:
            raise ValueError(f"template {self.space} was given without tissue priors")
        return found


class TemplateError(ValueError):
    """A user template whose files cannot be used (the message names the file)."""


def template_files() -> dict[str, Path]:
    """Paths of the template maps inside the installed nilearn wheel.

    Found without importing nilearn (its import pulls in scikit-learn and pandas).

    Raises
    ------
    FileNotFoundError
        nilearn is not installed, or its wheel lacks a template file.
    """
    spec = importlib.util.find_spec("nilearn")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the embedded template comes from the nilearn package, which is not installed"
        )
    data_dir = Path(spec.origin).parent / "datasets" / "data"
    paths = {key: data_dir / name for key, name in _FILES.items()}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"template file(s) missing from the nilearn installation: {', '.join(missing)}"
        )
    return paths


def load_template(resolution: int = 1) -> Template:
    """The embedded ``MNI152NLin2009aSym`` template at ``resolution`` mm (1 or 2).

    The first call per resolution reads and derives the maps (about 1 s); later
    calls return the same cached, read-only images.
    """
    _check_resolution(resolution)
    return _load(int(resolution))


@lru_cache(maxsize=2)
def _load(resolution: int) -> Template:
    if resolution == 2:
        return _downsample(_load(1))
    paths = template_files()
    raw = {key: nib.load(str(path)) for key, path in paths.items()}
    affine = raw["t1w"].affine
    for key, img in raw.items():
        if img.shape != raw["t1w"].shape or not np.allclose(img.affine, affine):
            raise ValueError(f"{paths[key]}: grid differs from the template T1w's")
    # uint8 maps: 255 is probability (or intensity) 1.
    t1w = _scaled(raw["t1w"])
    gm = _scaled(raw["gm"])
    wm = _scaled(raw["wm"])
    mask = _brain_mask(t1w)
    csf = np.clip(mask - gm - wm, 0.0, 1.0).astype(np.float32)
    return _freeze(resolution, affine, t1w, mask.astype(np.uint8), gm, wm, csf)


def _scaled(img: nib.spatialimages.SpatialImage) -> np.ndarray:
    return (np.asanyarray(img.dataobj).astype(np.float32) / 255.0).astype(np.float32)


def _brain_mask(t1w: np.ndarray) -> np.ndarray:
    """Support of the brain-extracted T1w: largest component, holes filled (float32)."""
    support = t1w > 0
    labels, n = ndi.label(support)
    if n == 0:
        raise ValueError("the template T1w is empty")
    if n > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        support = labels == sizes.argmax()
    return ndi.binary_fill_holes(support).astype(np.float32)


def _block_mean(data: np.ndarray) -> np.ndarray:
    pad = [(0, s % 2) for s in data.shape]
    padded = np.pad(data, pad)
    sx, sy, sz = (s // 2 for s in padded.shape)
    return padded.reshape(sx, 2, sy, 2, sz, 2).mean(axis=(1, 3, 5), dtype=np.float64)


def _coarser_affine(affine: np.ndarray) -> np.ndarray:
    """The affine of the grid made of ``affine``'s 2x2x2 blocks (:func:`_block_mean`)."""
    coarse = np.asarray(affine, dtype=float).copy()
    # The centre of coarse voxel (0, 0, 0) is the centre of fine voxels 0 and 1.
    coarse[:3, 3] = coarse[:3, 3] + 0.5 * coarse[:3, :3].sum(axis=1)
    coarse[:3, :3] = coarse[:3, :3] * 2.0
    return coarse


def _downsample(t1: Template) -> Template:
    return downsampled(t1, resolution=2)


def downsampled(template: Template, *, resolution: float | None = None) -> Template:
    """``template`` on a grid twice as coarse: exact 2x2x2 block means, world positions kept.

    The mask is the block mean of the mask thresholded at 0.5; maps a template lacks
    stay ``None``. ``resolution`` labels the result (default: twice the voxel size).
    """
    affine = _coarser_affine(template.t1w.affine)
    maps = {
        key: None
        if getattr(template, key) is None
        else _block_mean(np.asarray(getattr(template, key).dataobj, dtype=np.float32))
        for key in ("t1w", "mask", "gm", "wm", "csf")
    }
    maps["mask"] = (maps["mask"] >= 0.5).astype(np.uint8)
    for key in ("t1w", "gm", "wm", "csf"):
        if maps[key] is not None:
            maps[key] = maps[key].astype(np.float32)
    label = resolution if resolution is not None else 2 * template.resolution
    return _freeze(
        label,
        affine,
        maps["t1w"],
        maps["mask"],
        maps["gm"],
        maps["wm"],
        maps["csf"],
        space=template.space,
        sform_code=int(template.t1w.header["sform_code"]),
    )


def cropped_to_brain(template: Template, margin_mm: float) -> Template:
    """``template`` on the part of its grid within ``margin_mm`` of its brain mask's
    bounding box; voxels keep their world positions.

    Raises
    ------
    ValueError
        The brain mask is empty, or ``margin_mm`` is negative.
    """
    if margin_mm < 0:
        raise ValueError(f"margin_mm must be >= 0, got {margin_mm}")
    mask = np.asarray(template.mask.dataobj) > 0
    if not mask.any():
        raise ValueError(f"template {template.space}: the brain mask is empty")
    zoom = float(np.min(template.mask.header.get_zooms()[:3]))
    box = bounding_box(mask, int(np.ceil(margin_mm / zoom)))
    affine = template.t1w.affine.copy()
    affine[:3, 3] = affine[:3, :3] @ [s.start for s in box] + affine[:3, 3]
    maps = [
        None if getattr(template, key) is None else np.asarray(getattr(template, key).dataobj)[box]
        for key in ("t1w", "mask", "gm", "wm", "csf")
    ]
    return _freeze(
        template.resolution,
        affine,
        *maps,
        space=template.space,
        sform_code=int(template.t1w.header["sform_code"]),
    )


def check_template_files(files: Mapping[str, str | os.PathLike[str]]) -> None:
    """Check a user template's files from their headers (fast: no voxel data read).

    Raises
    ------
    TemplateError
        One line naming the file and the problem: ``t1w`` or ``mask`` missing, a GM
        map without a WM map (or the reverse), a file that is absent, not a 3D NIfTI,
        or on another grid than the T1w.
    """
    for key in ("t1w", "mask"):
        if key not in files:
            raise TemplateError(f"the '{key}' file is required (t1w, mask[, gm, wm, csf])")
    if ("gm" in files) != ("wm" in files) or ("csf" in files and "gm" not in files):
        raise TemplateError("tissue priors come as gm and wm (and optionally csf) together")
    reference = None
    for key, path in files.items():
        try:
            img = nib.load(os.fspath(path))
        except FileNotFoundError:
            raise TemplateError(f"{path}: {key} file not found") from None
        except Exception as err:  # nibabel raises several types for non-images
            raise TemplateError(f"{path}: {key} is not a NIfTI image ({err})") from None
        if len(img.shape) != 3:
            raise TemplateError(f"{path}: {key} must be a 3D image, got shape {img.shape}")
        if reference is None:
            reference = (img.shape, img.affine, path)
        elif img.shape != reference[0] or not np.allclose(img.affine, reference[1], atol=1e-3):
            raise TemplateError(f"{path}: {key} is not on the grid of {reference[2]}")


def load_user_template(name: str, files: Mapping[str, str | os.PathLike[str]]) -> Template:
    """A template given as files (``registration.template_files``), named ``name``.

    Read once per process (cached by name, paths and modification times).

    Raises
    ------
    TemplateError
        As :func:`check_template_files`, or an empty mask.
    """
    check_template_files(files)
    key = tuple(sorted((k, os.fspath(v), os.stat(v).st_mtime_ns) for k, v in files.items()))
    return _load_user(name, key)


@lru_cache(maxsize=4)
def _load_user(name: str, key: tuple) -> Template:
    paths = {k: path for k, path, _ in key}
    images = {k: nib.load(p) for k, p in paths.items()}
    affine = images["t1w"].affine
    mask = np.asanyarray(images["mask"].dataobj) > 0
    if not mask.any():
        raise TemplateError(f"{paths['mask']}: the brain mask is empty")
    t1w = np.asanyarray(images["t1w"].dataobj).astype(np.float32) * mask
    top = float(np.percentile(t1w[mask], 99.9))
    if top <= 0:
        raise TemplateError(f"{paths['t1w']}: no positive intensity inside the mask")
    t1w = np.clip(t1w / top, 0.0, 1.0).astype(np.float32)
    priors: dict[str, np.ndarray | None] = {}
    for label in ("gm", "wm", "csf"):
        priors[label] = (
            np.clip(np.asanyarray(images[label].dataobj).astype(np.float32), 0.0, 1.0)
            if label in images
            else None
        )
    if priors["csf"] is None and priors["gm"] is not None:
        priors["csf"] = np.clip(mask - priors["gm"] - priors["wm"], 0.0, 1.0).astype(np.float32)
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    code = int(images["t1w"].header["sform_code"]) or 2  # 2: aligned to some other space
    return _freeze(
        float(zooms.mean()),
        affine,
        t1w,
        mask.astype(np.uint8),
        priors["gm"],
        priors["wm"],
        priors["csf"],
        space=name,
        sform_code=code,
    )


def get_template(
    name: str = TEMPLATE_SPACE,
    resolution: int | None = None,
    files: Mapping[str, str | os.PathLike[str]] | None = None,
) -> Template:
    """The registration template of a run: the user's files when given, else the embedded one.

    Parameters
    ----------
    name : str
        Space label (the user's template name when ``files`` are given).
    resolution : int or None
        Grid (mm) of the embedded template (default 1); must be ``None`` with ``files``
        (a user template has one grid, its own).
    files : mapping or None
        ``registration.template_files``.
    """
    _check_request(name, resolution, files)
    if files:
        return load_user_template(name, files)
    return load_template(1 if resolution is None else resolution)


def _check_request(
    name: str, resolution: int | None, files: Mapping[str, str | os.PathLike[str]] | None
) -> None:
    if files and resolution is not None:
        raise ValueError(f"template {name} given as files has one grid: no resolution")
    if not files and name != TEMPLATE_SPACE:
        raise ValueError(f"template {name!r} is not embedded: give it as files")
    if not files and resolution is not None:
        _check_resolution(resolution)


def _check_resolution(resolution: int) -> None:
    if resolution not in TEMPLATE_RESOLUTIONS:
        raise ValueError(
            f"template resolution must be one of {TEMPLATE_RESOLUTIONS} (mm), got {resolution!r}"
        )


@dataclass(frozen=True)
class Grid:
    """A voxel grid: what resampling onto a template needs of it, without its voxels."""

    shape: tuple[int, int, int]
    affine: np.ndarray

    @property
    def resolution(self) -> float:
        """Mean voxel size (mm), as :attr:`Template.resolution`."""
        return float(np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0)).mean())


def template_grid(
    name: str = TEMPLATE_SPACE,
    resolution: int | None = None,
    files: Mapping[str, str | os.PathLike[str]] | None = None,
) -> Grid:
    """The grid of :func:`get_template`'s template, from the T1w file's header alone
    (loading the template derives every map: 0.7-1.5 s in a new process)."""
    _check_request(name, resolution, files)
    if files:
        check_template_files(files)
        header = nib.load(os.fspath(files["t1w"]))
        return Grid(tuple(int(n) for n in header.shape[:3]), header.affine)
    header = nib.load(str(template_files()["t1w"]))
    shape, affine = tuple(int(n) for n in header.shape[:3]), header.affine
    if resolution == 2:
        # _block_mean pads odd sizes by one voxel
        shape, affine = tuple((n + 1) // 2 for n in shape), _coarser_affine(affine)
    return Grid(shape, affine)


def _freeze(
    resolution: float,
    affine: np.ndarray,
    *arrays: np.ndarray | None,
    space: str = TEMPLATE_SPACE,
    sform_code: int = 4,  # 4: MNI152 space
) -> Template:
    images = []
    for data in arrays:
        if data is None:
            images.append(None)
            continue
        data = np.ascontiguousarray(data)
        data.setflags(write=False)
        img = nib.Nifti1Image(data, affine)
        img.set_data_dtype(data.dtype)
        img.set_qform(affine, code=sform_code)
        img.set_sform(affine, code=sform_code)
        images.append(img)
    t1w, mask, gm, wm, csf = images
    return Template(space, resolution, t1w, mask, gm, wm, csf)
