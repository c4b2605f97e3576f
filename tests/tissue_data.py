"""Test data shared by the intensity and segmentation tests (not a test module).

A three-tissue phantom with known intensities, loading of the real T1 volumes
with a brain mask, and the AOMIC ground truth (FAST and FreeSurfer labels) put
on the grid of a dseg.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu
from skimage.morphology import ball


def otsu_brain_mask(data: np.ndarray, erode: int = 4, close: int = 3) -> np.ndarray:
    """A crude but robust brain mask for a whole-head T1w (test use only).

    Otsu foreground, eroded until the brain detaches from the scalp, largest
    component, dilated back inside the foreground, closed (sulcal CSF) and filled.
    """
    foreground = data > threshold_otsu(data)
    structure = ndi.generate_binary_structure(3, 1)
    core = ndi.binary_erosion(foreground, structure, iterations=erode)
    labels, _ = ndi.label(core)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    brain = ndi.binary_dilation(labels == sizes.argmax(), structure, iterations=erode) & foreground
    brain = ndi.binary_closing(np.pad(brain, close), ball(close))[
        close:-close, close:-close, close:-close
    ]
    return ndi.binary_fill_holes(brain)


def load_t1(data_dir: Path, name: str) -> tuple[np.ndarray, np.ndarray, nib.Nifti1Image]:
    """(data, brain mask, image) of ``anat/T1_head`` or ``anat/T1_gadolinium``."""
    img = nib.load(str(data_dir / "anat" / f"{name}.nii.gz"))
    data = img.get_fdata()
    mask = otsu_brain_mask(data) if name == "T1_head" else data > 0
    return data, mask, img


#: FreeSurfer aseg labels grouped as issue 14 does: cortex + deep GM (incl. cerebellar
#: cortex) against cerebral + cerebellar WM + brainstem + ventral DC.
ASEG_GM = (3, 42, 8, 47, 10, 49, 11, 50, 12, 51, 13, 52, 17, 53, 18, 54, 26, 58)
ASEG_WM = (2, 41, 7, 46, 16, 28, 60)


def labels_onto(labels: nib.Nifti1Image, reference: nib.Nifti1Image) -> np.ndarray:
    """``labels`` resampled onto ``reference``'s grid (nearest neighbour, world space)."""
    voxel_to_voxel = np.linalg.inv(labels.affine) @ reference.affine
    return ndi.affine_transform(
        np.asanyarray(labels.dataobj),
        voxel_to_voxel[:3, :3],
        voxel_to_voxel[:3, 3],
        output_shape=reference.shape[:3],
        order=0,
    )


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two boolean arrays (0 when both are empty)."""
    total = np.count_nonzero(a) + np.count_nonzero(b)
    return float(2 * np.count_nonzero(a & b) / total) if total else 0.0


T1_INTENSITY = {"CSF": 30.0, "GM": 70.0, "WM": 100.0}
T2_INTENSITY = {"WM": 50.0, "GM": 80.0, "CSF": 150.0}


def tissue_phantom(
    intensities: dict[str, float],
    radii: tuple[float, float, float] = (10.0, 15.0, 17.0),
    noise: float = 5.0,
    shape: tuple[int, int, int] = (40, 40, 40),
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Concentric WM sphere, GM shell, CSF shell (radii), Gaussian noise, dark background.

    With the default radii GM is the largest class (about 9900 voxels against
    4200 WM and 6400 CSF), so "largest mode" and "last mode" differ for T1w.
    """
    grid = np.indices(shape, dtype=np.float64)
    center = (np.array(shape, dtype=np.float64) - 1) / 2
    r = np.sqrt(((grid - center[:, None, None, None]) ** 2).sum(axis=0))
    r_wm, r_gm, r_csf = radii
    tissues = {"WM": r <= r_wm, "GM": (r > r_wm) & (r <= r_gm), "CSF": (r > r_gm) & (r <= r_csf)}
    rng = np.random.default_rng(seed)
    data = rng.normal(5.0, 2.0, shape)  # background: noise, not zeros, so masking matters
    for name, region in tissues.items():
        data[region] = intensities[name] + rng.normal(0.0, noise, int(region.sum()))
    mask = r <= r_csf
    return data, mask, tissues
