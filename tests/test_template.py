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
