"""The embedded MNI152NLin2009aSym template: derived mask, CSF prior, 2 mm grid."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi

from mriflow.image.template import TEMPLATE_SPACE, load_template


@pytest.mark.parametrize("resolution", [1, 2])
def test_template_maps_are_consistent(resolution):
    tpl = load_template(resolution)
    assert tpl.space == TEMPLATE_SPACE == "MNI152NLin2009aSym"
    assert tpl.resolution == resolution
    assert np.allclose(np.abs(np.diag(tpl.t1w.affine)[:3]), resolution)
    mask = np.asarray(tpl.mask.dataobj)
    assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1}
    brain = mask > 0
    # one piece, no enclosed holes, an adult brain with its CSF rim
    assert ndi.label(brain)[1] == 1
    assert not (ndi.binary_fill_holes(brain) & ~brain).any()
    volume_ml = brain.sum() * resolution**3 / 1000
    assert 1800 < volume_ml < 2000
    for img in (tpl.t1w, tpl.gm, tpl.wm, tpl.csf):
        assert img.shape == tpl.mask.shape
        assert np.allclose(img.affine, tpl.mask.affine)
        data = np.asarray(img.dataobj)
        assert data.dtype == np.float32 and data.min() >= 0 and data.max() <= 1
    # the three tissue priors partition the brain (up to GM/WM spill outside it)
    gm, wm, csf = (np.asarray(i.dataobj) for i in (tpl.gm, tpl.wm, tpl.csf))
    total = (gm + wm + csf)[brain]
    assert np.percentile(total, 5) > 0.95
    assert csf[~brain].max() <= 0.5  # only partial-volume spill at 2 mm
    # the CSF prior is high in the ventricles: MNI (0, 0, 18)-ish lateral ventricle
    ijk = np.rint(nib.affines.apply_affine(np.linalg.inv(tpl.csf.affine), [-4, -2, 18]))
    assert csf[tuple(ijk.astype(int))] > 0.5


def test_template_is_cached_and_read_only():
    a, b = load_template(2), load_template(2)
    assert a is b
    with pytest.raises(ValueError):
        np.asarray(a.t1w.dataobj)[0, 0, 0] = 1.0


def test_two_mm_grid_keeps_world_positions():
    t1, t2 = load_template(1), load_template(2)
    # centre of mass of the brain mask, in world mm, agrees across resolutions
    com = []
    for tpl in (t1, t2):
        ijk = ndi.center_of_mass(np.asarray(tpl.mask.dataobj, dtype=float))
        com.append(nib.affines.apply_affine(tpl.mask.affine, ijk))
    assert np.linalg.norm(com[0] - com[1]) < 0.5
    vol1 = np.asarray(t1.mask.dataobj).sum()
    vol2 = np.asarray(t2.mask.dataobj).sum() * 8
    assert abs(vol2 - vol1) / vol1 < 0.02


def test_template_rejects_unknown_resolution():
    with pytest.raises(ValueError, match="resolution must be one of"):
        load_template(3)


def test_template_grid_is_the_loaded_templates_grid(tmp_path):
    """Resampling onto a template needs its grid only: read from the header, it is the
    loaded template's, for the 2 mm grid too (odd sizes padded as the block mean pads)."""
    from mriflow.image.template import get_template, template_grid

    for resolution in (1, 2):
        grid, tpl = template_grid(resolution=resolution), load_template(resolution)
        assert grid.shape == tpl.t1w.shape and np.array_equal(grid.affine, tpl.t1w.affine)
        assert grid.resolution == tpl.resolution
    one = load_template(1)
    files = {"t1w": _write(one.t1w, tmp_path / "t1w.nii.gz"),
             "mask": _write(one.mask, tmp_path / "mask.nii.gz", np.uint8)}  # fmt: skip
    user, grid = get_template("Mine", None, files), template_grid("Mine", None, files)
    assert grid.shape == user.t1w.shape and np.allclose(grid.affine, user.t1w.affine)
    with pytest.raises(ValueError, match="resolution must be one of"):
        template_grid(resolution=3)
    with pytest.raises(ValueError, match="is not embedded"):
        template_grid("Other")


def _write(img, path, dtype=None):
    out = nib.Nifti1Image(np.asarray(img.dataobj, dtype=dtype or np.float32), img.affine)
    nib.save(out, str(path))
    return str(path)


def test_user_template_from_files_matches_the_embedded_maps(tmp_path):
    """The embedded 1 mm maps given back as user files give the same template, and its
    2x block-mean grid is the embedded 2 mm one (the grid the fast preset registers on)."""
    from mriflow.image.template import downsampled, load_user_template

    tpl = load_template(1)
    files = {
        "t1w": _write(tpl.t1w, tmp_path / "t1w.nii.gz"),
        "mask": _write(tpl.mask, tmp_path / "mask.nii.gz", np.uint8),
        "gm": _write(tpl.gm, tmp_path / "gm.nii.gz"),
        "wm": _write(tpl.wm, tmp_path / "wm.nii.gz"),
    }
    user = load_user_template("Mine", files)
    assert user.space == "Mine" and user.resolution == pytest.approx(1.0)
    assert np.array_equal(np.asarray(user.mask.dataobj), np.asarray(tpl.mask.dataobj))
    # CSF derived exactly as for the embedded template
    assert np.allclose(np.asarray(user.csf.dataobj), np.asarray(tpl.csf.dataobj), atol=1e-6)
    # T1w scaled by its 99.9th percentile in the mask: the same image up to one factor
    a, b = np.asarray(user.t1w.dataobj), np.asarray(tpl.t1w.dataobj)
    brain = b > 0
    assert np.corrcoef(a[brain], b[brain])[0, 1] > 0.9999 and a.max() <= 1.0
    coarse, two = downsampled(user), load_template(2)
    assert coarse.resolution == pytest.approx(2.0)
    assert np.allclose(coarse.t1w.affine, two.t1w.affine)
    assert np.array_equal(np.asarray(coarse.mask.dataobj), np.asarray(two.mask.dataobj))
    assert np.allclose(np.asarray(coarse.gm.dataobj), np.asarray(two.gm.dataobj), atol=1e-6)


def test_user_template_without_priors_says_so(tmp_path):
    from mriflow.image.template import load_user_template

    tpl = load_template(2)
    files = {
        "t1w": _write(tpl.t1w, tmp_path / "t1w.nii.gz"),
        "mask": _write(tpl.mask, tmp_path / "mask.nii.gz", np.uint8),
    }
    user = load_user_template("NoPriors", files)
    assert not user.has_priors and load_template(2).has_priors
    with pytest.raises(ValueError, match="without tissue priors"):
        user.probseg("GM")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("no_mask", "'mask' file is required"),
        ("missing", "nope.nii.gz: mask file not found"),
        ("grid", "mask is not on the grid of"),
        ("gm_only", "gm and wm"),
        ("4d", "must be a 3D image"),
        ("text", "is not a NIfTI image"),
    ],
)
def test_bad_user_template_files_are_named(tmp_path, change, message):
    from mriflow.image.template import TemplateError, check_template_files

    tpl = load_template(2)
    files = {
        "t1w": _write(tpl.t1w, tmp_path / "t1w.nii.gz"),
        "mask": _write(tpl.mask, tmp_path / "mask.nii.gz", np.uint8),
    }
    if change == "no_mask":
        del files["mask"]
    elif change == "missing":
        files["mask"] = str(tmp_path / "nope.nii.gz")
    elif change == "grid":
        files["mask"] = _write(load_template(1).mask, tmp_path / "mask1.nii.gz", np.uint8)
    elif change == "gm_only":
        files["gm"] = files["t1w"]
    elif change == "4d":
        nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 2), np.float32), np.eye(4)), tmp_path / "m.nii")
        files["mask"] = str(tmp_path / "m.nii")
    elif change == "text":
        (tmp_path / "m.nii.gz").write_text("not an image")
        files["mask"] = str(tmp_path / "m.nii.gz")
    with pytest.raises(TemplateError, match=message) as info:
        check_template_files(files)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("resolution", [1, 2])
def test_cropped_template_keeps_every_brain_voxel_in_place_with_its_margin(resolution):
    from mriflow.image.template import cropped_to_brain

    full = load_template(resolution)
    crop = cropped_to_brain(full, 20.0)
    assert crop.space == full.space and crop.resolution == full.resolution
    # voxel (0, 0, 0) of the crop is a voxel of the full grid: an integer offset
    offset = np.linalg.inv(full.t1w.affine) @ crop.t1w.affine @ [0, 0, 0, 1]
    start = np.round(offset[:3]).astype(int)
    assert np.allclose(offset[:3], start)
    box = tuple(slice(s, s + n) for s, n in zip(start, crop.t1w.shape))
    for key in ("t1w", "mask", "gm", "wm", "csf"):
        assert np.array_equal(
            np.asarray(getattr(crop, key).dataobj), np.asarray(getattr(full, key).dataobj)[box]
        ), key
    brain = np.asarray(full.mask.dataobj) > 0
    assert (np.asarray(crop.mask.dataobj) > 0).sum() == brain.sum()
    # 20 mm of the empty border kept on every side (or the grid's edge)
    kept = np.argwhere(np.asarray(crop.mask.dataobj) > 0)
    border_mm = np.minimum(kept.min(0), np.array(crop.t1w.shape) - 1 - kept.max(0)) * resolution
    edge = (start == 0) | (start + np.array(crop.t1w.shape) == brain.shape)
    assert np.all((border_mm >= 20) | edge)
    assert np.prod(crop.t1w.shape) < 0.9 * np.prod(full.t1w.shape)
