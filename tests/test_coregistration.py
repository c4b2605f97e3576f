"""Within-session co-registration of a second contrast onto the reference T1w."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi

from mriflow.image.coregistration import (
    coregister,
    read_itk_affine,
    rms_deviation,
    write_itk_affine,
)
from mriflow.image.registration import apply_transforms
from mriflow.image.template import load_template


def rigid(degrees: float, axis: int, shift_mm) -> np.ndarray:
    """A RAS rigid matrix: rotation about a world axis through the origin, then a shift."""
    angle = np.deg2rad(degrees)
    c, s = np.cos(angle), np.sin(angle)
    i, j = [a for a in range(3) if a != axis]
    matrix = np.eye(4)
    matrix[i, i], matrix[i, j], matrix[j, i], matrix[j, j] = c, -s, s, c
    matrix[:3, 3] = shift_mm
    return matrix


def moved_header(img: nib.Nifti1Image, matrix: np.ndarray) -> nib.Nifti1Image:
    """The same voxels, placed elsewhere in the world by ``matrix``."""
    return nib.Nifti1Image(np.asarray(img.dataobj), matrix @ img.affine)


@pytest.fixture(scope="module")
def template_pair(tmp_path_factory):
    """Fixed: the 2 mm template brain. Moving: a T2-like contrast of the same head on
    another grid (2.5 mm, LAS, larger field of view), so the metric must be MI."""
    tpl = load_template(2)
    t1 = tpl.t1w.get_fdata(dtype=np.float32)
    mask = np.asarray(tpl.mask.dataobj) > 0
    # T2-like: CSF bright, WM dark; a smooth scalp-like shell around the brain
    t2 = np.where(mask, 1.2 - t1, 0.0)
    shell = ndi.binary_dilation(mask, iterations=4) & ~ndi.binary_dilation(mask, iterations=2)
    t2 = (t2 + 0.6 * shell).astype(np.float32)
    grid_affine = np.diag([-2.5, 2.5, 2.5, 1.0])
    grid_affine[:3, 3] = [100.0, -130.0, -85.0]
    grid = nib.Nifti1Image(np.zeros((80, 96, 78), np.float32), grid_affine)
    moving = apply_transforms(
        nib.Nifti1Image(t2, tpl.t1w.affine),
        write_itk_affine(np.eye(4), tmp_path_factory.mktemp("identity") / "identity.txt"),
        grid,
        interpolation="linear",
    )
    return tpl.t1w, tpl.mask, moving


def test_itk_text_transform_round_trip_and_ants_reads_it(tmp_path):
    matrix = rigid(8.0, 0, [6.0, -3.0, 2.0])
    matrix[:3, :3] *= [1.02, 0.98, 1.0]  # an affine, not only rigid
    path = write_itk_affine(matrix, tmp_path / "xfm.txt", centre=np.array([10.0, -20.0, 5.0]))
    assert np.allclose(read_itk_affine(path), matrix, atol=1e-12)
    # same bytes for the same transform (HDF5 files carry timestamps; this does not)
    again = write_itk_affine(matrix, tmp_path / "again.txt", centre=np.array([10.0, -20.0, 5.0]))
    assert path.read_bytes() == again.read_bytes()

    # antsApplyTransforms samples the moving image where the matrix sends each point
    rng = np.random.default_rng(0)
    data = ndi.gaussian_filter(rng.random((30, 32, 28)).astype(np.float32), 2)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [-30.0, -32.0, -28.0]
    img = nib.Nifti1Image(data, affine)
    out = apply_transforms(img, [path], img, interpolation="linear").get_fdata()
    ijk = np.array([[15, 16, 14], [12, 18, 15], [17, 14, 12]], dtype=float)
    xyz = ijk @ affine[:3, :3].T + affine[:3, 3]
    source = (xyz @ matrix[:3, :3].T + matrix[:3, 3] - affine[:3, 3]) / 2.0
    expected = ndi.map_coordinates(data, source.T, order=1)
    assert np.allclose(out[tuple(ijk.astype(int).T)], expected, atol=1e-4)


def test_unreadable_transform_names_the_file(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("not a transform\n")
    with pytest.raises(ValueError, match="bad.txt"):
        read_itk_affine(bad)


def test_recovers_a_known_header_offset_across_contrasts(template_pair):
    fixed, mask, moving = template_pair  # aligned by construction
    truth = rigid(8.0, 0, [6.0, 0.0, 0.0])
    moved = coregister(moved_header(moving, truth), fixed, mask)
    assert rms_deviation(moved.fixed_to_moving, truth, mask) < 0.5
    again = coregister(moved_header(moving, truth), fixed, mask)
    assert np.array_equal(again.fixed_to_moving, moved.fixed_to_moving)  # deterministic


def test_far_off_header_needs_the_moments_start(template_pair):
    fixed, mask, moving = template_pair
    truth = rigid(10.0, 2, [40.0, -35.0, 50.0])
    result = coregister(moved_header(moving, truth), fixed, mask)
    assert set(result.candidates) == {"header", "moments"}
    assert rms_deviation(result.fixed_to_moving, truth, mask) < 0.5


def test_affine_option_refines_the_rigid_fit_without_inventing_a_scaling(template_pair):
    fixed, mask, moving = template_pair
    truth = rigid(8.0, 0, [6.0, 0.0, 0.0])
    result = coregister(moved_header(moving, truth), fixed, mask, transform="affine")
    assert rms_deviation(result.fixed_to_moving, truth, mask) < 0.5
    assert np.allclose(np.linalg.svd(result.fixed_to_moving[:3, :3])[1], 1.0, atol=0.02)


def test_rejects_a_mask_off_the_fixed_grid(template_pair):
    fixed, _, moving = template_pair
    other = load_template(1).mask
    with pytest.raises(ValueError, match="fixed image's grid"):
        coregister(moving, fixed, other)


@pytest.mark.data
@pytest.mark.slow
def test_real_t2w_onto_real_t1w_with_a_moved_header(data_dir, tmp_path):
    """The shared T1_head/T2w pair (one head; 1.6 mm RAS vs 1x1x2 mm LAS slab, 27 mm apart
    by their headers): moving the T2w header by 8 degrees and 6 mm changes the recovered
    transform by exactly that motion (< 0.5 mm RMS over the brain), and the two aligned
    T2w images agree inside the brain (r >= 0.98)."""
    from mriflow.image.bias import n4_bias_correct
    from mriflow.image.skullstrip import skull_strip

    t1, _ = n4_bias_correct(nib.load(data_dir / "anat" / "T1_head.nii.gz"))
    t2, _ = n4_bias_correct(nib.load(data_dir / "anat" / "T2w.nii.gz"))
    stripped = skull_strip(t1)
    brain, mask = stripped.brain, stripped.mask
    truth = rigid(8.0, 0, [6.0, 0.0, 0.0])
    moved = moved_header(t2, truth)
    unmoved_fit = coregister(t2, brain, mask)
    moved_fit = coregister(moved, brain, mask)
    assert rms_deviation(moved_fit.fixed_to_moving, truth @ unmoved_fit.fixed_to_moving, mask) < 0.5

    aligned = []
    for image, fit, name in ((t2, unmoved_fit, "a.txt"), (moved, moved_fit, "b.txt")):
        xfm = write_itk_affine(fit.fixed_to_moving, tmp_path / name)
        aligned.append(apply_transforms(image, [xfm], t1).get_fdata()[mask.get_fdata() > 0])
    covered = (aligned[0] > 0) & (aligned[1] > 0)  # inside both slabs
    assert covered.mean() > 0.5
    assert np.corrcoef(aligned[0][covered], aligned[1][covered])[0, 1] >= 0.98


def test_a_fine_reference_is_matched_on_the_working_grid_and_keeps_its_mask_in_place():
    """A 1 mm reference (the conformed default) is matched on WORKING_VOXEL_MM voxels; its
    brain mask lands on the same tissue (centre of mass within a voxel), a coarser
    reference is used as it is."""
    from mriflow.image.coregistration import WORKING_VOXEL_MM, _working_grid

    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = [-40.0, -50.0, -30.0]
    brain = np.zeros((80, 96, 64), bool)
    brain[20:55, 30:70, 15:45] = True
    fixed = nib.Nifti1Image(brain.astype(np.float32) * 100, affine)
    working, working_brain = _working_grid(fixed, brain)
    zooms = np.sqrt((working.affine[:3, :3] ** 2).sum(axis=0))
    assert np.allclose(zooms, WORKING_VOXEL_MM)
    assert working_brain.shape == working.shape

    def centre(mask, aff):
        return aff[:3, :3] @ np.asarray(ndi.center_of_mass(mask)) + aff[:3, 3]

    assert np.linalg.norm(centre(working_brain, working.affine) - centre(brain, affine)) < 1.0
    coarse = nib.Nifti1Image(np.zeros((10, 10, 10), np.float32), np.diag([2.0, 2.0, 2.0, 1.0]))
    same, same_brain = _working_grid(coarse, np.ones((10, 10, 10), bool))
    assert same is coarse and same_brain.all()
