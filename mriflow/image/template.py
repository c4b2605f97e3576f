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
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

__all__ = [
    "TEMPLATE_SPACE",
    "TEMPLATE_RESOLUTIONS",
    "Template",
    "load_template",
    "template_files",
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
        BIDS space label, ``"MNI152NLin2009aSym"``.
    resolution : int
        Voxel size in mm (1 or 2).
    t1w : nibabel.Nifti1Image
        Brain-extracted T1w, float32 in [0, 1].
    mask : nibabel.Nifti1Image
        Brain mask, uint8 {0, 1}.
    gm, wm, csf : nibabel.Nifti1Image
        Tissue probability maps, float32 in [0, 1] (CSF derived, see module docs).
    """

    space: str
    resolution: int
    t1w: nib.Nifti1Image
    mask: nib.Nifti1Image
    gm: nib.Nifti1Image
    wm: nib.Nifti1Image
    csf: nib.Nifti1Image

    def probseg(self, label: str) -> nib.Nifti1Image:
        """The probability map of ``label`` (``"GM"``, ``"WM"`` or ``"CSF"``)."""
        maps = {"GM": self.gm, "WM": self.wm, "CSF": self.csf}
        try:
            return maps[label.upper()]
        except KeyError:
            raise ValueError(f"label must be one of GM, WM, CSF; got {label!r}") from None


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
    if resolution not in TEMPLATE_RESOLUTIONS:
        raise ValueError(
            f"template resolution must be one of {TEMPLATE_RESOLUTIONS} (mm), got {resolution!r}"
        )
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


def _downsample(t1: Template) -> Template:
    affine = t1.t1w.affine.copy()
    # The centre of 2 mm voxel (0, 0, 0) is the centre of 1 mm voxels 0 and 1.
    affine[:3, 3] = affine[:3, 3] + 0.5 * affine[:3, :3].sum(axis=1)
    affine[:3, :3] = affine[:3, :3] * 2.0
    maps = {
        key: _block_mean(np.asarray(getattr(t1, key).dataobj, dtype=np.float32))
        for key in ("t1w", "mask", "gm", "wm", "csf")
    }
    mask = (maps["mask"] >= 0.5).astype(np.uint8)
    return _freeze(
        2,
        affine,
        maps["t1w"].astype(np.float32),
        mask,
        maps["gm"].astype(np.float32),
        maps["wm"].astype(np.float32),
        maps["csf"].astype(np.float32),
    )


def _freeze(resolution: int, affine: np.ndarray, *arrays: np.ndarray) -> Template:
    images = []
    for data in arrays:
        data = np.ascontiguousarray(data)
        data.setflags(write=False)
        img = nib.Nifti1Image(data, affine)
        img.set_data_dtype(data.dtype)
        img.set_qform(affine, code=4)  # 4: MNI152 space
        img.set_sform(affine, code=4)
        images.append(img)
    t1w, mask, gm, wm, csf = images
    return Template(TEMPLATE_SPACE, resolution, t1w, mask, gm, wm, csf)
