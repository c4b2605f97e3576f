"""Helpers for tests that build BIDS datasets in temporary folders."""

from __future__ import annotations

import json
import shutil
import stat
from pathlib import Path

import nibabel as nib
import numpy as np


def copy_layout(source: Path, dest: Path, subjects: list[str] | None = None) -> Path:
    """Copy a BIDS layout (optionally only some subjects), making every file writable."""

    def ignore(folder: str, names: list[str]) -> list[str]:
        if Path(folder) == source and subjects is not None:
            return [n for n in names if n.startswith("sub-") and n[4:] not in subjects]
        return []

    shutil.copytree(source, dest, ignore=ignore)
    for path in [dest, *dest.rglob("*")]:
        path.chmod(path.stat().st_mode | stat.S_IWUSR)
    return dest


def write_phantom_t1w(path: Path, shape=(40, 48, 40), zooms=(2.0, 2.0, 2.0), seed=0) -> Path:
    """A small head-like T1w phantom (ellipsoid 'brain' in a 'skull' shell) in LAS orientation."""
    rng = np.random.default_rng(seed)
    grid = np.indices(shape).astype(float)
    center = (np.asarray(shape) - 1) / 2
    radius = np.asarray(shape) * 0.38
    r = np.sqrt((((grid.T - center) / radius) ** 2).sum(-1)).T
    data = np.where(r < 0.8, 100.0, 0.0) + np.where((r >= 0.85) & (r < 1.0), 60.0, 0.0)
    data += rng.normal(0, 2, shape)
    affine = np.diag([-zooms[0], zooms[1], zooms[2], 1.0])
    affine[:3, 3] = -affine[:3, :3] @ center
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.clip(data, 0, None).astype(np.int16), affine), str(path))
    return path


def make_bids_dataset(root: Path, layout: dict[str, list[str]]) -> Path:
    """``{"01": ["ses-a"], "02": [""]}`` -> a raw BIDS dataset of phantom T1w images."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(
        json.dumps({"Name": "phantoms", "BIDSVersion": "1.10.0", "DatasetType": "raw"})
    )
    for index, (subject, sessions) in enumerate(sorted(layout.items())):
        for session in sessions:
            folder = root / f"sub-{subject}" / session / "anat"
            prefix = "_".join(p for p in (f"sub-{subject}", session) if p)
            write_phantom_t1w(folder / f"{prefix}_T1w.nii.gz", seed=index)
    return root


#: A real but quick chain for tests of execution mechanics (not of the algorithms):
#: no template registration and no NL-means, GMM tissue classes.
QUICK_CHAIN = [
    "--set", "registration.enabled=false",
    "--set", "denoise.method=none",
    "--set", "segmentation.method=gmm",
]  # fmt: skip
