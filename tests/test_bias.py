"""N4 bias-field correction on phantoms with a known smooth multiplicative field."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from mriflow.config import N4Config
from mriflow.image.bias import head_mask, n4_bias_correct, remove_bias_field


def _phantom(rng, n=96, voxel=2.0):
    """Two tissues (a sphere of 'WM' in a shell of 'GM') times a smooth field, plus noise."""
    grid = (np.indices((n, n, n)).astype(np.float32) - (n - 1) / 2) * voxel
    radius = np.sqrt((grid**2).sum(0))
    half = n * voxel / 2
    tissue = np.zeros((n, n, n), np.float32)
    tissue[radius < 0.85 * half] = 60.0
    tissue[radius < 0.6 * half] = 100.0
    x, y, z = grid / half
    field = np.exp(0.3 * x - 0.2 * y + 0.2 * z**2).astype(np.float32)
    data = np.abs(tissue * field + rng.normal(0, 1.5, tissue.shape)).astype(np.float32)
    affine = np.diag([voxel, voxel, voxel, 1.0])
    affine[:3, 3] = -half
    wm = radius < 0.55 * half  # away from the partial-volume edge
    return nib.Nifti1Image(data, affine), field, wm, tissue


def _cv(values):
    return values.std() / values.mean()


def test_n4_removes_known_field(rng):
    img, field, wm, tissue = _phantom(rng)
    defaults = N4Config()
    corrected, bias = n4_bias_correct(
        img,
        shrink_factor=defaults.shrink_factor,
        iterations=defaults.iterations,
        convergence_threshold=defaults.convergence_threshold,
        spline_distance_mm=defaults.spline_distance_mm,
    )
    data = img.get_fdata()
    out = corrected.get_fdata()
    before, after = _cv(data[wm]), _cv(out[wm])
    assert after <= 0.5 * before, (before, after)
    # the estimated field has the true field's shape (up to N4's free scale)
    inside = tissue > 0
    log_true, log_est = np.log(field[inside]), np.log(bias.get_fdata()[inside])
    assert np.corrcoef(log_true, log_est)[0, 1] > 0.98
    # the outputs are the model: corrected * field == input, on the input grid
    assert np.allclose(out * bias.get_fdata(), data, rtol=1e-4, atol=1e-3)
    assert corrected.shape == img.shape and np.allclose(corrected.affine, img.affine)
    assert corrected.get_data_dtype() == np.float32


def test_n4_keeps_zero_background_and_accepts_a_mask(rng):
    img, _, wm, tissue = _phantom(rng, n=64, voxel=3.0)
    data = img.get_fdata(dtype=np.float32)
    data[tissue == 0] = 0.0  # a skull-stripped image: exact zeros outside
    stripped = nib.Nifti1Image(data, img.affine)
    corrected, _ = n4_bias_correct(stripped, mask=tissue > 0, iterations=[20, 20, 20])
    out = corrected.get_fdata()
    assert (out[tissue == 0] == 0).all()
    assert _cv(out[wm]) < 0.5 * _cv(data[wm])


def test_head_mask_is_one_filled_piece(rng):
    img, _, _, tissue = _phantom(rng, n=48, voxel=4.0)
    mask = head_mask(img.get_fdata())
    inside = tissue > 0
    dice = 2 * (mask & inside).sum() / (mask.sum() + inside.sum())
    assert dice > 0.95


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"shrink_factor": 0}, "shrink_factor"),
        ({"iterations": []}, "iterations"),
        ({"convergence_threshold": 0.0}, "convergence_threshold"),
        ({"spline_distance_mm": -1.0}, "spline_distance_mm"),
        ({"num_threads": 0}, "num_threads"),
    ],
)
def test_n4_validates_parameters(rng, kwargs, message):
    img, *_ = _phantom(rng, n=16, voxel=8.0)
    with pytest.raises(ValueError, match=message):
        n4_bias_correct(img, **kwargs)


def test_field_fitted_on_the_raw_image_corrects_a_smoothed_copy(rng):
    """The workflow fits N4 on the raw image and removes that field from the denoised one."""
    from scipy import ndimage as ndi

    img, field, wm, _ = _phantom(rng, n=64, voxel=3.0)
    _, bias = n4_bias_correct(img, iterations=[20, 20, 20])
    smoothed = ndi.gaussian_filter(img.get_fdata(dtype=np.float32), 0.7)
    copy = nib.Nifti1Image(smoothed, img.affine)
    corrected = remove_bias_field(copy, bias)
    assert corrected.get_data_dtype() == np.float32
    out = corrected.get_fdata()
    assert _cv(out[wm]) <= 0.5 * _cv(smoothed[wm])
    assert np.allclose(out * bias.get_fdata(), smoothed, rtol=1e-4, atol=1e-3)

    shifted = nib.Nifti1Image(smoothed[1:], img.affine)
    with pytest.raises(ValueError, match="grid"):
        remove_bias_field(shifted, bias)
    zero = nib.Nifti1Image(np.zeros(img.shape, np.float32), img.affine)
    with pytest.raises(ValueError, match="positive"):
        remove_bias_field(copy, zero)
