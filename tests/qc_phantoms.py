"""Phantoms for QC tests: a magnitude-MR head with known noise, and a small derivatives dataset."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

from mriflow.bids.derivatives import write_derivatives_description
from mriflow.bids.paths import atomic_write_json, build_path
from mriflow.interfaces.base import step_record

MU = {"wm": 110.0, "gm": 70.0, "csf": 30.0, "scalp": 80.0}


def radius(shape) -> np.ndarray:
    grid = np.indices(shape).astype(float)
    center = (np.asarray(shape) - 1) / 2
    return np.sqrt(((grid.T - center) ** 2).sum(-1)).T


def make_head(
    sigma: float = 5.0,
    seed: int = 0,
    ghost: float = 0.0,
    shape: tuple[int, int, int] = (64, 64, 64),
    scale: float = 1.0,
):
    """A magnitude-MR head phantom: WM core, GM shell, CSF shell, scalp; air around.

    Complex Gaussian noise of SD ``sigma`` per channel, so tissues are Rician (~normal,
    SD sigma) and air is Rayleigh, as in real magnitude images. ``ghost`` adds an
    N/2 ghost of that relative amplitude along the second axis (phase encoding).
    Radii are in voxels of a 64-cube and scale with ``shape[0] / 64``.

    Returns
    -------
    data, brain (bool), dseg (uint8; 1=GM, 2=WM, 3=CSF)
    """
    r = radius(shape) * 64.0 / shape[0]
    truth = np.zeros(shape)
    dseg = np.zeros(shape, np.uint8)
    truth[r < 12] = MU["wm"]
    dseg[r < 12] = 2
    truth[(r >= 12) & (r < 18)] = MU["gm"]
    dseg[(r >= 12) & (r < 18)] = 1
    truth[(r >= 18) & (r < 21)] = MU["csf"]
    dseg[(r >= 18) & (r < 21)] = 3
    truth[(r >= 23) & (r < 27)] = MU["scalp"]
    truth *= scale
    if ghost:
        truth = truth + ghost * np.roll(truth, shape[1] // 2, axis=1)
    rng = np.random.default_rng(seed)
    noisy = np.abs(truth + rng.normal(0, sigma, shape) + 1j * rng.normal(0, sigma, shape))
    return noisy, dseg > 0, dseg


STEPS = [
    step_record("conform", {"voxel_size_mm": 2.0, "input_voxel_size_mm": [2.0, 2.0, 2.0]},
                ["nibabel"]),
    step_record("n4", {"shrink_factor": 4, "iterations": [50, 50]}, ["SimpleITK"]),
    step_record("skull_strip", {"method": "deepbet", "threshold": 0.5}, ["deepbet"]),
    step_record("segmentation", {"method": "gmm", "seed": 0}, ["scikit-learn"]),
    step_record("registration", {"template": "MNI152NLin2009aSym", "preset": "fast"},
                ["antspyx"]),
]  # fmt: skip
CHAINS = {
    "preproc": ["conform", "n4"],
    "brain_mask": ["conform", "n4", "skull_strip"],
    "dseg": ["conform", "n4", "skull_strip", "segmentation"],
    "std_preproc": ["conform", "n4", "skull_strip", "registration"],
}
SPACE = "MNI152NLin2009aSym"


def template_image(shape=(40, 40, 40)) -> nib.Nifti1Image:
    """A noise-free 'template': the phantom brain only, on a 2 mm grid."""
    data, brain, _ = make_head(sigma=0.01, seed=99, shape=shape)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = -np.asarray(shape) + 1
    return nib.Nifti1Image((data * brain).astype(np.float32), affine)


def build_derivatives(
    root: Path,
    subjects: dict[str, float] | None = None,
    shape: tuple[int, int, int] = (40, 40, 40),
) -> tuple[Path, Path]:
    """A raw dataset and an mriflow-like derivatives dataset of head phantoms.

    ``subjects`` maps labels to the noise SD of each subject's image. Returns
    ``(raw_dir, out_dir)``. Sidecars carry ``Sources`` and ``Steps`` as the
    derivatives sink writes them.
    """
    subjects = subjects or {"01": 4.0, "02": 5.0}
    raw_dir, out_dir = root / "raw", root / "out"
    raw_dir.mkdir(parents=True, exist_ok=True)
    (raw_dir / "dataset_description.json").write_text(
        json.dumps({"Name": "phantoms", "BIDSVersion": "1.10.0"})
    )
    write_derivatives_description(out_dir, [raw_dir])
    (out_dir / "mriflow_config.toml").write_text("seed = 0\n")
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = -np.asarray(shape) + 1
    template = template_image(shape)
    by_name = {s["Name"]: s for s in STEPS}
    for index, (label, sigma) in enumerate(sorted(subjects.items())):
        data, brain, dseg = make_head(sigma=sigma, seed=index, shape=shape)
        raw_rel = f"sub-{label}/anat/sub-{label}_T1w.nii.gz"
        bias = np.linspace(0.85, 1.15, shape[1])[None, :, None]
        (raw_dir / raw_rel).parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image((data * bias).astype(np.float32), affine),
                 str(raw_dir / raw_rel))  # fmt: skip
        entities = {"subject": label}
        images = {
            "preproc": (build_path({**entities, "desc": "preproc"}, suffix="T1w",
                                   extension=".nii.gz"), data.astype(np.float32),
                        {"SkullStripped": False}),
            "brain_mask": (build_path({**entities, "desc": "brain"}, suffix="mask",
                                      extension=".nii.gz"), brain.astype(np.uint8),
                           {"Type": "Brain"}),
            "dseg": (build_path(entities, suffix="dseg", extension=".nii.gz"), dseg, {}),
            "std_preproc": (build_path({**entities, "space": SPACE, "desc": "preproc"},
                                       suffix="T1w", extension=".nii.gz"),
                            np.asarray(template.dataobj) * (1 + 0.01 * index), {}),
        }  # fmt: skip
        for role, (relpath, array, meta) in images.items():
            path = out_dir / relpath
            path.parent.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(array, affine), str(path))
            sidecar = {
                "Sources": [f"bids:raw:{raw_rel}"],
                **meta,
                "Steps": [by_name[name] for name in CHAINS[role]],
            }
            atomic_write_json(path.with_name(path.name.replace(".nii.gz", ".json")), sidecar)
    return raw_dir, out_dir
