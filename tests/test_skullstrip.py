"""Skull stripping: both backends against the SPM avg152 brain mask, real heads, pass-through."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi

from mriflow.image.skullstrip import (
    clean_mask,
    deepbet_available,
    is_skull_stripped,
    skull_strip,
)

needs_deepbet = pytest.mark.skipif(not deepbet_available(), reason="deepbet/torch not installed")


def _dice(a, b):
    return 2 * (a & b).sum() / (a.sum() + b.sum())


def _load(path):
    img = nib.load(str(path))
    return nib.Nifti1Image(img.get_fdata(dtype=np.float32), img.affine, img.header)


def _volume_ml(mask_img):
    mask = np.asarray(mask_img.dataobj) > 0
    return mask.sum() * abs(np.linalg.det(mask_img.affine[:3, :3])) / 1000


def _assert_one_piece_without_holes(mask_img):
    mask = np.asarray(mask_img.dataobj) > 0
    assert ndi.label(mask)[1] == 1
    assert not (ndi.binary_fill_holes(mask) & ~mask).any()


@pytest.fixture(scope="module")
def spm(data_dir):
    folder = data_dir / "ground_truth" / "spm_avg152"
    truth = nib.load(str(folder / "brainmask.nii")).get_fdata() > 0.5
    return _load(folder / "avg152T1.nii"), truth


# ------------------------------------------------------------ detection
def _sphere(n=64, voxel=2.0, radius_mm=60.0, noise=0.0, seed=0):
    grid = (np.indices((n, n, n)) - (n - 1) / 2) * voxel
    inside = np.sqrt((grid**2).sum(0)) < radius_mm
    data = np.where(inside, 100.0, 0.0).astype(np.float32)
    if noise:
        data += np.abs(np.random.default_rng(seed).normal(0, noise, data.shape)).astype(np.float32)
    return nib.Nifti1Image(data, np.diag([voxel, voxel, voxel, 1.0]))


def test_detection_on_phantoms():
    assert is_skull_stripped(_sphere(radius_mm=60))  # 905 ml, zero background
    assert not is_skull_stripped(_sphere(radius_mm=60, noise=2.0))  # air has noise
    assert not is_skull_stripped(_sphere(n=96, radius_mm=95))  # 3.6 l: a head, not a brain
    assert not is_skull_stripped(_sphere(n=40, radius_mm=60))  # fills the field of view


def test_detection_on_real_images(data_dir, spm):
    anat = data_dir / "anat"
    assert is_skull_stripped(_load(anat / "T1_gadolinium.nii.gz"))
    assert not is_skull_stripped(_load(anat / "T1_head.nii.gz"))  # air zeroed, but a head
    assert not is_skull_stripped(_load(anat / "T2w.nii.gz"))
    assert not is_skull_stripped(spm[0])


def test_stripped_input_passes_through_unchanged(data_dir):
    img = _load(data_dir / "anat" / "T1_gadolinium.nii.gz")
    # "template" would register and erode; detection must prevent that (and be quick)
    result = skull_strip(img, method="template")
    assert result.input_was_stripped and result.method == "passthrough"
    data = img.get_fdata()
    assert np.array_equal(result.brain.get_fdata(), data)
    mask = np.asarray(result.mask.dataobj) > 0
    # nothing eroded: every nonzero voxel of the input is in the mask
    assert mask[data != 0].all()
    _assert_one_piece_without_holes(result.mask)
    assert 1000 < _volume_ml(result.mask) < 1800


def test_clean_mask_removes_islands_and_holes():
    mask = np.zeros((40, 40, 40), bool)
    mask[5:30, 5:30, 5:30] = True
    mask[15:18, 15:18, 15:18] = False  # a hole
    mask[35:38, 35:38, 35:38] = True  # an island
    out = clean_mask(mask, (1.0, 1.0, 1.0))
    assert ndi.label(out)[1] == 1
    assert out[16, 16, 16] and not out[36, 36, 36]


# ------------------------------------------------------------ backends
@needs_deepbet
def test_deepbet_matches_spm_brainmask(spm):
    img, truth = spm
    result = skull_strip(img, method="deepbet")
    assert result.method == "deepbet" and not result.input_was_stripped
    assert _dice(np.asarray(result.mask.dataobj) > 0, truth) >= 0.95
    assert np.allclose(result.mask.affine, img.affine)


@pytest.mark.slow
def test_template_backend_matches_spm_brainmask(spm):
    img, truth = spm
    result = skull_strip(img, method="template", random_seed=42)
    assert result.method == "template"
    assert _dice(np.asarray(result.mask.dataobj) > 0, truth) >= 0.95


@needs_deepbet
@pytest.mark.parametrize("name", ["T1_head", "T2w"])
def test_deepbet_on_real_heads(data_dir, name):
    img = _load(data_dir / "anat" / f"{name}.nii.gz")
    result = skull_strip(img, method="auto")
    assert result.method == "deepbet"
    _assert_one_piece_without_holes(result.mask)
    assert 1000 <= _volume_ml(result.mask) <= 1800
    brain = result.brain.get_fdata()
    assert (brain[np.asarray(result.mask.dataobj) == 0] == 0).all()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["T1_head", "T2w"])
def test_template_backend_on_real_heads(data_dir, name):
    img = _load(data_dir / "anat" / f"{name}.nii.gz")
    result = skull_strip(img, method="template", random_seed=42)
    _assert_one_piece_without_holes(result.mask)
    assert 1000 <= _volume_ml(result.mask) <= 1800
    if deepbet_available():  # the two backends agree on where the brain is
        reference = skull_strip(img, method="deepbet").mask
        overlap = _dice(np.asarray(result.mask.dataobj) > 0, np.asarray(reference.dataobj) > 0)
        assert overlap >= 0.85, overlap


def test_skull_strip_validates():
    img = _sphere()
    with pytest.raises(ValueError, match="skull-strip method"):
        skull_strip(img, method="bet")
    with pytest.raises(ValueError, match="deepbet_threshold"):
        skull_strip(img, deepbet_threshold=1.5)
