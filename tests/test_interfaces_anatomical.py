"""The anatomical Nipype interfaces: files land in the node cwd, steps are recorded."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi

from mriflow.image.template import load_template
from mriflow.interfaces.anatomical import (
    ApplyTransforms,
    Denoise,
    N4BiasFieldCorrection,
    RegisterToTemplate,
    SkullStrip,
)


def _phantom(path, n=48, voxel=3.0, background=0.0, seed=0):
    rng = np.random.default_rng(seed)
    grid = (np.indices((n, n, n)) - (n - 1) / 2) * voxel
    radius = np.sqrt((grid**2).sum(0))
    data = np.where(radius < 50, 100.0, background) * np.exp(grid[0] / 200)
    data = data + np.where(radius < 50, rng.normal(0, 2, data.shape), 0)
    img = nib.Nifti1Image(data.astype(np.float32), np.diag([voxel, voxel, voxel, 1.0]))
    nib.save(img, str(path))
    return path


def _check_step(result, name):
    step = result.outputs.step
    assert step["Name"] == name
    assert "mriflow" in step["Software"]
    json.dumps(step)  # it must go into a JSON sidecar as is


def test_denoise_and_n4_write_into_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    in_file = _phantom(tmp_path / "sub-01_T1w.nii.gz")
    den = Denoise(in_file=str(in_file), method="ants").run()
    assert Path(den.outputs.out_file).parent == tmp_path
    assert Path(den.outputs.out_file).name == "sub-01_T1w_denoised.nii"
    _check_step(den, "denoise")
    assert den.outputs.step["Parameters"] == {
        "method": "ants",
        "noise_model": "Rician",
        "patch_radius": 1,
        "search_radius": 1,
    }

    n4 = N4BiasFieldCorrection(in_file=den.outputs.out_file, iterations=[20, 20]).run()
    _check_step(n4, "n4")
    assert n4.outputs.step["Parameters"]["iterations"] == [20, 20]
    assert n4.outputs.step["Parameters"]["shrink_factor"] == 6  # the config default
    field = nib.load(n4.outputs.bias_field)
    assert field.shape == (48, 48, 48)
    assert Path(n4.outputs.out_file).is_file()


def test_skullstrip_passes_a_stripped_image_through(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    in_file = _phantom(tmp_path / "brain.nii.gz")  # zero background, ~520 ml
    res = SkullStrip(in_file=str(in_file), method="template").run()
    assert res.outputs.skull_stripped is True
    assert res.outputs.method == "passthrough"
    _check_step(res, "skull_strip")
    mask = nib.load(res.outputs.out_mask)
    assert mask.get_data_dtype() == np.uint8
    assert np.array_equal(nib.load(res.outputs.out_file).get_fdata(), nib.load(in_file).get_fdata())


def test_register_and_apply_transforms(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tpl = load_template(2)
    # the template shifted by 5 mm: a quick rigid registration recovers it
    shifted = ndi.shift(np.asarray(tpl.t1w.dataobj), (2.5, 0, 0), order=1)
    in_file = tmp_path / "sub-01_desc-brain_T1w.nii.gz"
    nib.save(nib.Nifti1Image(shifted.astype(np.float32), tpl.t1w.affine), str(in_file))
    mask_file = tmp_path / "sub-01_desc-brain_mask.nii.gz"
    nib.save(nib.Nifti1Image((shifted > 0).astype(np.uint8), tpl.t1w.affine), str(mask_file))

    reg = RegisterToTemplate(
        in_file=str(in_file), transform="rigid", template_resolution=2, num_threads=1
    ).run()
    _check_step(reg, "registration")
    assert reg.outputs.template == "MNI152NLin2009aSym"
    (forward,) = reg.outputs.forward_transforms
    (reverse,) = reg.outputs.reverse_transforms
    assert forward.endswith("Composite.h5") and reverse.endswith("InverseComposite.h5")
    assert nib.load(reg.outputs.out_file).shape == tpl.t1w.shape

    app = ApplyTransforms(
        in_file=str(mask_file), transforms=[forward], interpolation="nearest",
        template_resolution=2,
    ).run()  # fmt: skip
    _check_step(app, "apply_transforms")
    warped = nib.load(app.outputs.out_file)
    assert warped.get_data_dtype() == np.uint8
    a, b = np.asarray(warped.dataobj) > 0, np.asarray(tpl.mask.dataobj) > 0
    assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.97

    back = ApplyTransforms(
        in_file=reg.outputs.out_file, transforms=[reverse], reference_file=str(in_file)
    ).run()
    assert nib.load(back.outputs.out_file).shape == shifted.shape


def test_interface_reports_a_bad_input_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "empty.nii.gz"
    bad.write_bytes(b"")
    with pytest.raises(Exception, match="empty.nii.gz"):
        Denoise(in_file=str(bad)).run()
