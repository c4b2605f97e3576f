"""Helpers shared by the tests on the real anatomical volumes (not a test module)."""

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
