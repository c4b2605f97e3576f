"""Geometry of the spatial steps: a landmark keeps its world coordinate, masks stay binary."""

from __future__ import annotations

import itertools

import nibabel as nib
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mriflow.image.spatial import (
    crop_or_pad,
    crop_to_mask,
    fit_to_shape,
    reorient_to_ras,
    resample_to_voxel_size,
    resize_to_shape,
    voxel_to_world,
    zero_outside_mask,
)

ORIENTATIONS = [
    (perm, signs)
    for perm in itertools.permutations(range(3))
    for signs in itertools.product((1, -1), repeat=3)
]


def _affine(perm, signs, zooms, origin, angle=0.0):
    linear = np.zeros((3, 3))
    for col, (axis, sign, zoom) in enumerate(zip(perm, signs, zooms)):
        linear[axis, col] = sign * zoom
    c, s = np.cos(angle), np.sin(angle)
    rotation = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    return nib.affines.from_matvec(rotation @ linear, origin)


def _blob_image(shape, center, affine, sigma=1.5):
    grid = np.indices(shape).reshape(3, -1).T
    dist2 = ((grid - np.asarray(center)) ** 2).sum(axis=1)
    data = (1000 * np.exp(-dist2 / (2 * sigma**2))).reshape(shape).astype(np.float32)
    return nib.Nifti1Image(data, affine)


def _world_centroid(img):
    data = np.asanyarray(img.dataobj).astype(float)
    ijk = np.argwhere(data > 0)
    weights = data[data > 0]
    return voxel_to_world(img.affine, (ijk * weights[:, None]).sum(0) / weights.sum())


def _within_half_voxel(a, b, voxel_size):
    """Each world axis off by at most half an output voxel."""
    return np.max(np.abs(np.asarray(a) - np.asarray(b))) <= voxel_size / 2 + 1e-6


def _max_zoom(img):
    return float(np.sqrt((img.affine[:3, :3] ** 2).sum(axis=0)).max())


@pytest.mark.parametrize("perm,signs", ORIENTATIONS)
def test_reorient_to_ras_all_48_orientations(perm, signs):
    affine = _affine(perm, signs, (1.0, 1.5, 2.0), (10.0, -20.0, 5.0))
    img = _blob_image((12, 14, 16), (3, 5, 9), affine)
    out = reorient_to_ras(img)
    assert nib.aff2axcodes(out.affine) == ("R", "A", "S")
    # pure permutation/flip: voxel values unchanged, landmark exactly in place
    assert np.allclose(_world_centroid(out), _world_centroid(img), atol=1e-6)
    assert sorted(np.asarray(out.dataobj).ravel()) == sorted(np.asarray(img.dataobj).ravel())


orientation = st.sampled_from(ORIENTATIONS)
zooms = st.tuples(*[st.floats(0.7, 2.5) for _ in range(3)])


@settings(max_examples=25, deadline=None)
@given(
    orientation,
    zooms,
    st.floats(0.8, 2.0),
    st.floats(-0.3, 0.3),
    st.sampled_from(["linear", "bspline"]),
)
def test_resample_keeps_landmark_world_coordinate(ornt, zoom, voxel_size, angle, interp):
    affine = _affine(*ornt, zoom, (-30.0, 12.0, 40.0), angle)
    img = _blob_image((24, 22, 20), (11.3, 9.7, 10.2), affine, sigma=2.5)
    out = resample_to_voxel_size(img, voxel_size, interp)
    assert np.allclose(np.sqrt((out.affine[:3, :3] ** 2).sum(0)), voxel_size, atol=1e-4)
    assert _within_half_voxel(_world_centroid(out), _world_centroid(img), voxel_size)
    # the field of view is kept: the output covers the input's extent
    extent_in = np.asarray(img.shape) * np.asarray(zoom)
    extent_out = np.asarray(out.shape) * voxel_size
    assert np.all(extent_out >= extent_in - 1e-3)
    assert np.all(extent_out < extent_in + voxel_size + 1e-3)


@settings(max_examples=25, deadline=None)
@given(orientation, zooms, st.floats(0.6, 2.0))
def test_resample_mask_stays_binary_and_in_place(ornt, zoom, voxel_size):
    affine = _affine(*ornt, zoom, (5.0, 5.0, 5.0))
    mask = np.zeros((20, 20, 20), np.uint8)
    mask[6:12, 7:13, 8:14] = 1
    img = nib.Nifti1Image(mask, affine)
    out = resample_to_voxel_size(img, voxel_size, "nearest")
    values = np.unique(np.asarray(out.dataobj))
    assert set(values.tolist()) <= {0, 1}
    assert out.get_data_dtype() == np.uint8
    assert _within_half_voxel(_world_centroid(out), _world_centroid(img), voxel_size)


def test_label_values_survive_nearest_resampling():
    labels = np.zeros((10, 10, 10), np.uint8)
    labels[2:5] = 1
    labels[5:8] = 2
    labels[8:] = 3
    out = resample_to_voxel_size(nib.Nifti1Image(labels, np.diag([2, 2, 2, 1])), 0.7, "nearest")
    assert set(np.unique(np.asarray(out.dataobj)).tolist()) == {0, 1, 2, 3}


@settings(max_examples=30, deadline=None)
@given(
    orientation,
    st.tuples(*[st.integers(4, 40) for _ in range(3)]),
    st.tuples(*[st.floats(0.2, 0.8) for _ in range(3)]),
)
def test_crop_or_pad_keeps_world_coordinates(ornt, shape, rel_center):
    affine = _affine(*ornt, (1.0, 1.2, 0.9), (0.0, 0.0, 0.0))
    source_shape = (20, 24, 18)
    center = tuple(int(r * s) for r, s in zip(rel_center, source_shape))
    img = _blob_image(source_shape, center, affine, sigma=0.8)
    out = crop_or_pad(img, shape)
    assert out.shape == shape
    data_in = np.asanyarray(img.dataobj)
    data_out = np.asanyarray(out.dataobj)
    # every output voxel shows the input value at the same world position
    ijk_out = np.argwhere(data_out > 0)
    ijk_in = np.rint(
        nib.affines.apply_affine(np.linalg.inv(img.affine) @ out.affine, ijk_out)
    ).astype(int)
    assert np.array_equal(data_out[tuple(ijk_out.T)], data_in[tuple(ijk_in.T)])
    # nothing appears from nowhere: the sum never grows
    assert data_out.sum(dtype=np.float64) <= data_in.sum(dtype=np.float64) * (1 + 1e-6)


def test_crop_or_pad_is_centered():
    img = nib.Nifti1Image(np.ones((10, 10, 10), np.float32), np.eye(4))
    padded = crop_or_pad(img, (14, 10, 6))
    data = np.asanyarray(padded.dataobj)
    assert data[:2].sum() == 0 and data[12:].sum() == 0 and data[2:12].all()
    assert np.allclose(padded.affine[:3, 3], [-2, 0, 2])


@settings(max_examples=20, deadline=None)
@given(orientation, st.floats(0, 8))
def test_crop_to_mask_keeps_mask_and_margin(ornt, margin):
    affine = _affine(*ornt, (1.0, 1.0, 2.0), (3.0, -4.0, 8.0))
    data = np.random.default_rng(1).random((30, 30, 20)).astype(np.float32)
    mask = np.zeros((30, 30, 20), np.uint8)
    mask[10:15, 12:20, 5:9] = 1
    img, mask_img = nib.Nifti1Image(data, affine), nib.Nifti1Image(mask, affine)
    out = crop_to_mask(img, mask_img, margin_mm=margin)
    out_mask = crop_to_mask(mask_img, mask_img, margin_mm=margin)
    assert out_mask.get_fdata().sum() == mask.sum()  # the whole mask is inside the box
    expected = np.minimum(
        np.array([5, 8, 4]) + 2 * np.ceil(margin / np.array([1, 1, 2])), (30, 30, 20)
    )
    assert np.all(np.asarray(out.shape) <= expected)
    # voxel (0,0,0) of the crop is the same world point and value as in the input
    ijk_in = np.rint(nib.affines.apply_affine(np.linalg.inv(affine), out.affine[:3, 3])).astype(int)
    assert np.asanyarray(out.dataobj)[0, 0, 0] == data[tuple(ijk_in)]


def test_crop_to_empty_mask_is_an_error():
    img = nib.Nifti1Image(np.ones((5, 5, 5), np.float32), np.eye(4))
    with pytest.raises(ValueError, match="mask is empty"):
        crop_to_mask(img, np.zeros((5, 5, 5)))


@settings(max_examples=20, deadline=None)
@given(orientation, st.tuples(*[st.integers(12, 48) for _ in range(3)]))
def test_resize_to_shape_keeps_landmark(ornt, shape):
    affine = _affine(*ornt, (1.0, 1.0, 1.0), (0.0, 10.0, -10.0))
    img = _blob_image((30, 30, 30), (12.4, 16.1, 14.0), affine, sigma=3.0)
    out = resize_to_shape(img, shape)
    assert out.shape == shape
    tolerance = max(_max_zoom(out), _max_zoom(img)) / 2
    assert _within_half_voxel(_world_centroid(out), _world_centroid(img), 2 * tolerance)


def test_resize_mask_nearest_stays_binary():
    mask = np.zeros((20, 20, 20), np.uint8)
    mask[5:15, 5:15, 5:15] = 1
    out = resize_to_shape(nib.Nifti1Image(mask, np.eye(4)), (13, 27, 9), "nearest")
    assert set(np.unique(np.asarray(out.dataobj)).tolist()) == {0, 1}


@pytest.mark.parametrize("bad", [0, -1.0, float("nan")])
def test_bad_voxel_size_is_rejected(bad):
    img = nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4))
    with pytest.raises(ValueError, match="voxel_size"):
        resample_to_voxel_size(img, bad)


@pytest.mark.parametrize("mode", ["crop_or_pad", "resize"])
def test_fit_to_shape_keeps_brain_and_world_coordinates(mode):
    affine = _affine((0, 1, 2), (-1, 1, 1), (1.0, 1.0, 1.0), (90.0, -126.0, -72.0))
    img = _blob_image((90, 100, 80), (40.2, 55.7, 38.1), affine, sigma=4.0)
    mask = nib.Nifti1Image((np.asanyarray(img.dataobj) > 1).astype(np.uint8), affine)
    out = fit_to_shape(img, mask, (64, 64, 64), margin_mm=5, mode=mode)
    out_mask = fit_to_shape(
        mask, mask, (64, 64, 64), margin_mm=5, mode=mode, interpolation="nearest"
    )
    assert out.shape == out_mask.shape == (64, 64, 64)
    assert np.allclose(out.affine, out_mask.affine)
    assert set(np.unique(np.asanyarray(out_mask.dataobj)).tolist()) == {0, 1}
    tolerance = max(_max_zoom(out), 1.0)
    assert _within_half_voxel(_world_centroid(out), _world_centroid(img), tolerance)
    if mode == "crop_or_pad":  # nothing of the brain is lost, voxel size kept
        assert np.asanyarray(out_mask.dataobj).sum() == np.asanyarray(mask.dataobj).sum()
        assert np.allclose(out.header.get_zooms()[:3], 1.0)


def test_zero_outside_mask_keeps_the_inside_and_refuses_another_grid():
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    data = np.random.default_rng(0).random((6, 7, 8)).astype(np.float32) + 1
    mask = np.zeros((6, 7, 8), np.uint8)
    mask[1:4, 2:5, 3:6] = 1
    out = zero_outside_mask(nib.Nifti1Image(data, affine), nib.Nifti1Image(mask, affine))
    values = np.asanyarray(out.dataobj)
    assert np.array_equal(values[mask > 0], data[mask > 0])
    assert not values[mask == 0].any()
    assert np.allclose(out.affine, affine) and values.dtype == np.float32
    with pytest.raises(ValueError, match="different grids"):
        zero_outside_mask(nib.Nifti1Image(data, affine), nib.Nifti1Image(mask, np.eye(4)))
