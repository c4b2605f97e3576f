"""Raw-input checks: every unusable image is refused in one line naming the file and the
problem; usable but doubtful ones pass with a warning; NaN voxels are repaired and counted."""

from __future__ import annotations

import logging

import nibabel as nib
import numpy as np
import pytest

from mriflow.image.io import (
    MIN_VOXELS_PER_AXIS,
    ImageError,
    check_readable,
    load_image,
    load_input_image,
)
from mriflow.interfaces.base import MriflowInterface, StepError, failure_message


def _head(shape=(20, 24, 20), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    data = rng.normal(100, 10, shape).astype(np.float32)
    data[:2] = 0
    return data


def _save(tmp_path, data, name="sub-01_T1w.nii.gz", affine=None, dtype=None):
    img = nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0]) if affine is None else affine)
    if dtype is not None:
        img.set_data_dtype(dtype)
    path = tmp_path / name
    nib.save(img, str(path))
    return path


def _one_line_naming(err: pytest.ExceptionInfo, path) -> str:
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    return message


def test_complex_image_is_refused_not_truncated(tmp_path):
    data = _head().astype(np.complex64) * (1 + 1j)
    path = _save(tmp_path, data)
    for check in (check_readable, load_input_image, load_image):
        with pytest.raises(ImageError) as err:
            check(path)
        assert "complex" in _one_line_naming(err, path)


def test_rgb_image_is_refused(tmp_path):
    rgb = np.zeros((20, 24, 20), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    rgb["R"] = 100
    path = tmp_path / "sub-01_T1w.nii.gz"
    nib.save(nib.Nifti1Image(rgb, np.eye(4)), str(path))
    for check in (check_readable, load_input_image):
        with pytest.raises(ImageError) as err:
            check(path)
        assert "RGB" in _one_line_naming(err, path)


@pytest.mark.parametrize(
    ("shape", "words"),
    [((3, 3, 3), "too small to process"), ((64, 64, 1), "a single slice")],
)
def test_small_grids_say_what_is_needed(tmp_path, shape, words):
    path = _save(tmp_path, _head(shape))
    for check in (check_readable, load_input_image):
        with pytest.raises(ImageError) as err:
            check(path)
        message = _one_line_naming(err, path)
        assert words in message and f"at least {MIN_VOXELS_PER_AXIS} voxels" in message
        assert "not a readable image" not in message


def test_negative_scl_slope_is_refused(tmp_path):
    path = _save(tmp_path, _head().astype(np.int16), name="sub-01_T1w.nii")
    raw = bytearray(path.read_bytes())
    raw[112:116] = np.float32(-1.0).tobytes()  # scl_slope (nibabel would rescale on save)
    path.write_bytes(bytes(raw))
    with pytest.raises(ImageError) as err:
        check_readable(path)
    assert "negative scl_slope (-1)" in _one_line_naming(err, path)


@pytest.mark.parametrize("value", [0.0, 7.0])
def test_constant_image_is_refused(tmp_path, value):
    path = _save(tmp_path, np.full((20, 20, 20), value, np.float32))
    check_readable(path)  # the header is fine: only the voxels tell
    with pytest.raises(ImageError) as err:
        load_input_image(path)
    assert f"constant (every voxel is {value:g})" in _one_line_naming(err, path)


def test_nan_voxels_are_zeroed_counted_and_warned(tmp_path, caplog):
    data = _head()
    data[5:7, 5:7, 5:7] = np.nan
    data[0, 0, 0] = np.inf
    path = _save(tmp_path, data)
    with caplog.at_level(logging.WARNING, logger="mriflow"):
        img, report = load_input_image(path)
    out = np.asanyarray(img.dataobj)
    assert np.isfinite(out).all()
    assert out[5, 5, 5] == 0 and out[0, 0, 0] == 0
    assert np.array_equal(out[10:], data[10:])  # finite voxels untouched
    assert report.nonfinite_voxels == 9
    assert report.as_record()["NonFiniteVoxelsSetToZero"] == 9
    assert any(str(path) in r.message and "9 non-finite" in r.message for r in caplog.records)


def test_all_nan_image_is_refused(tmp_path):
    path = _save(tmp_path, np.full((20, 20, 20), np.nan, np.float32))
    with pytest.raises(ImageError) as err:
        load_input_image(path)
    assert "NaN or infinite" in _one_line_naming(err, path)


def test_thick_slices_pass_with_a_warning(tmp_path, caplog):
    path = _save(tmp_path, _head((40, 40, 10)), affine=np.diag([0.5, 0.5, 10.0, 1.0]))
    with caplog.at_level(logging.WARNING, logger="mriflow"):
        check_readable(path)
        _, report = load_input_image(path)
    assert any("20x anisotropic" in w and w.startswith(str(path)) for w in report.warnings)
    assert any("anisotropic" in r.message for r in caplog.records)


def test_moderate_anisotropy_passes_silently(tmp_path):
    path = _save(tmp_path, _head(), affine=np.diag([1.0, 1.0, 2.0, 1.0]))
    _, report = load_input_image(path)
    assert report.warnings == [] and report.as_record() == {}


def test_qform_sform_90_degrees_apart_warns(tmp_path):
    img = nib.Nifti1Image(_head(), np.diag([2.0, 2.0, 2.0, 1.0]))
    rotated = np.array([[0, -2.0, 0, 0], [2.0, 0, 0, 0], [0, 0, 2.0, 0], [0, 0, 0, 1]])
    img.set_qform(rotated, code=1)
    img.set_sform(np.diag([2.0, 2.0, 2.0, 1.0]), code=2)
    path = tmp_path / "sub-01_T1w.nii.gz"
    nib.save(img, str(path))
    _, report = load_input_image(path)
    assert any("90 degrees apart" in w for w in report.warnings)


def test_interface_failures_name_the_input(tmp_path):
    from nipype.interfaces.base import BaseInterfaceInputSpec, File, TraitedSpec

    class _In(BaseInterfaceInputSpec):
        in_file = File(exists=True, mandatory=True)

    class Broken(MriflowInterface):
        input_spec = _In
        output_spec = TraitedSpec

        def _run_interface(self, runtime):
            raise ValueError("image is constant or empty\n(second line)")

    path = _save(tmp_path, _head())
    with pytest.raises(StepError) as err:
        Broken(in_file=str(path)).run()
    assert str(err.value) == f"{path}: image is constant or empty (second line)"


def test_failure_message_keeps_a_message_that_names_its_file():
    err = ImageError("/data/sub-01_T1w.nii.gz: the image is constant")
    assert failure_message(err, "/work/conformed.nii") == str(err)
    nospace = OSError(28, "No space left on device", "/work/n4/result.pklz")
    assert failure_message(nospace, "/raw/x.nii") == (
        "/raw/x.nii: No space left on device (writing or reading /work/n4/result.pklz)"
    )
