"""nibabel (RAS) <-> ITK/ANTs (LPS) conversion keeps every voxel's world position."""

from __future__ import annotations

import ants
import nibabel as nib
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.transform import Rotation

from mriflow.image._itk import affine_to_itk, from_ants, itk_to_affine, to_ants

angles = st.floats(-180, 180, allow_nan=False)
zooms = st.floats(0.5, 3.0, allow_nan=False)
shifts = st.floats(-150, 150, allow_nan=False)


def _affine(rx, ry, rz, zx, zy, zz, tx, ty, tz, flip):
    affine = np.eye(4)
    rot = Rotation.from_euler("xyz", [rx, ry, rz], degrees=True).as_matrix()
    affine[:3, :3] = rot @ np.diag([zx * (-1 if flip else 1), zy, zz])
    affine[:3, 3] = [tx, ty, tz]
    return affine


@settings(max_examples=50, deadline=None)
@given(angles, angles, angles, zooms, zooms, zooms, shifts, shifts, shifts, st.booleans())
def test_affine_round_trip(rx, ry, rz, zx, zy, zz, tx, ty, tz, flip):
    affine = _affine(rx, ry, rz, zx, zy, zz, tx, ty, tz, flip)
    origin, spacing, direction = affine_to_itk(affine)
    assert np.allclose(spacing, [zx, zy, zz])
    assert np.allclose(itk_to_affine(origin, spacing, direction), affine, atol=1e-9)


@settings(max_examples=10, deadline=None)
@given(angles, angles, zooms, shifts, st.booleans())
def test_landmark_keeps_world_position_in_ants(rx, rz, zoom, shift, flip):
    affine = _affine(rx, 0.0, rz, zoom, 1.0, 1.5, shift, -shift, 10.0, flip)
    data = np.zeros((9, 11, 7), np.float32)
    landmark = (6, 3, 2)
    data[landmark] = 1.0
    img = nib.Nifti1Image(data, affine)
    aimg = to_ants(img)
    world_ras = nib.affines.apply_affine(affine, landmark)
    world_lps = np.asarray(ants.transform_index_to_physical_point(aimg, landmark))
    assert np.allclose(world_lps * [-1, -1, 1], world_ras, atol=1e-4)
    back = from_ants(aimg, like=img)
    assert np.allclose(back.affine, affine, atol=1e-5)
    assert np.array_equal(np.argwhere(back.get_fdata() == 1.0)[0], landmark)
