"""A user template with a known geometry: the embedded one moved by a known affine."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi
from scipy.spatial.transform import Rotation

from mriflow.image.template import load_template

#: The user template's point ``y`` (mm) shows the embedded template's point ``MOVE @ y``.
MOVE = np.eye(4)
MOVE[:3, :3] = Rotation.from_euler("xyz", [6.0, -4.0, 8.0], degrees=True).as_matrix() @ np.diag(
    [1.05, 0.97, 1.02]
)
MOVE[:3, 3] = [5.0, -3.0, 4.0]


def write_moved_template(folder: Path, *, priors: bool = True) -> dict[str, str]:
    """The 2 mm embedded template resampled through :data:`MOVE`, as NIfTI files.

    Returns ``registration.template_files`` (t1w, mask and, with ``priors``, gm and wm).
    The T1w keeps a dark 'skull' shell outside the mask, so a test sees that the
    mask (not the T1w's support) defines the brain.
    """
    tpl = load_template(2)
    affine = tpl.t1w.affine
    voxel_map = np.linalg.inv(affine) @ MOVE @ affine

    def moved(img, order):
        data = np.asarray(img.dataobj, dtype=np.float32)
        return ndi.affine_transform(data, voxel_map[:3, :3], voxel_map[:3, 3], order=order)

    folder.mkdir(parents=True, exist_ok=True)
    mask = moved(tpl.mask, 0) > 0.5
    shell = ndi.binary_dilation(mask, iterations=3) & ~ndi.binary_dilation(mask, iterations=1)
    t1w = moved(tpl.t1w, 1) * mask * 800 + shell * 300
    maps = {"t1w": t1w.astype(np.float32), "mask": mask.astype(np.uint8)}
    if priors:
        maps["gm"] = moved(tpl.gm, 1)
        maps["wm"] = moved(tpl.wm, 1)
    files = {}
    for key, data in maps.items():
        path = folder / f"tpl-Moved_{key}.nii.gz"
        nib.save(nib.Nifti1Image(data, affine), str(path))
        files[key] = str(path)
    return files


def write_template_subject(root: Path) -> Path:
    """A raw BIDS dataset whose one T1w is the embedded 2 mm template (brain only, int16)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(
        json.dumps({"Name": "template subject", "BIDSVersion": "1.10.0", "DatasetType": "raw"})
    )
    tpl = load_template(2)
    img = nib.Nifti1Image((np.asarray(tpl.t1w.dataobj) * 1000).astype(np.int16), tpl.t1w.affine)
    img.set_sform(tpl.t1w.affine, code=1)
    img.set_qform(tpl.t1w.affine, code=1)
    folder = root / "sub-01" / "anat"
    folder.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(folder / "sub-01_T1w.nii.gz"))
    return root
