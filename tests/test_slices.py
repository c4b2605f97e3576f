"""2D slice export: axis from the affine, PNG round-trip, CSV index = files on disk."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mriflow.image.slices import (
    extract_slice,
    linear_scaling,
    select_slices,
    slice_layout,
    slice_world_coordinate,
)
from mriflow.ml.slices import (
    SliceExportError,
    export_slices,
    load_slice,
    read_slice_index,
)

SHAPE = (12, 14, 10)


def _phantom(affine: np.ndarray, rng: np.random.Generator):
    """A noisy volume with a box 'brain' (mask) and a 3-label dseg inside it."""
    data = rng.normal(100.0, 30.0, size=SHAPE).astype(np.float32)
    mask = np.zeros(SHAPE, dtype=np.uint8)
    mask[3:9, 4:11, 2:7] = 1
    dseg = np.zeros(SHAPE, dtype=np.uint8)
    dseg[mask > 0] = rng.integers(1, 4, size=int(mask.sum()))
    return (
        nib.Nifti1Image(data, affine),
        nib.Nifti1Image(mask, affine),
        nib.Nifti1Image(dseg, affine),
    )


def _orientations():
    """All 48 axis permutations/flips as affines (2 mm voxels, shifted origin)."""
    perms = st.permutations([0, 1, 2])
    signs = st.lists(st.sampled_from([-1.0, 1.0]), min_size=3, max_size=3)
    return st.tuples(perms, signs)


def _affine(perm, signs, zooms=(2.0, 1.5, 3.0)) -> np.ndarray:
    affine = np.zeros((4, 4))
    for voxel_axis, world_axis in enumerate(perm):
        affine[world_axis, voxel_axis] = signs[voxel_axis] * zooms[voxel_axis]
    affine[:3, 3] = [-20.0, 13.0, 7.5]
    affine[3, 3] = 1.0
    return affine


# --- pure array part -----------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(_orientations(), st.sampled_from(["axial", "coronal", "sagittal"]))
def test_slice_is_the_same_anatomy_whatever_the_voxel_order(orientation, axis):
    """Reordering/flipping voxel axes (same world grid) must give the identical 2D slice."""
    perm, signs = orientation
    rng = np.random.default_rng(1)
    ras_data = rng.normal(size=SHAPE)
    ras_affine = np.diag([2.0, 1.5, 3.0, 1.0])
    ras_affine[:3, 3] = [-20.0, 13.0, 7.5]
    ras = nib.Nifti1Image(ras_data, ras_affine)
    # Build the same image in another voxel order with nibabel's own orientation tools.
    target = np.array([[p, s] for p, s in zip(perm, signs, strict=True)])
    transform = nib.orientations.ornt_transform(nib.orientations.io_orientation(ras_affine), target)
    data = nib.orientations.apply_orientation(ras_data, transform)
    affine = ras_affine @ nib.orientations.inv_ornt_aff(transform, ras.shape)

    ref_layout = slice_layout(ras_affine, axis)
    layout = slice_layout(affine, axis)
    world_axis = {"sagittal": 0, "coronal": 1, "axial": 2}[axis]
    for ref_index in (0, 3, ras.shape[ref_layout.voxel_axis] - 1):
        world = slice_world_coordinate(ras_affine, ras.shape, ref_layout, ref_index)
        # The voxel index of the same world plane in the reordered image.
        candidates = [
            i
            for i in range(data.shape[layout.voxel_axis])
            if abs(slice_world_coordinate(affine, data.shape, layout, i) - world) < 1e-6
        ]
        assert len(candidates) == 1
        got = extract_slice(data, layout, candidates[0])
        np.testing.assert_array_equal(got, extract_slice(ras_data, ref_layout, ref_index))
    # The normal of the slice really is the named world axis.
    col = np.abs(affine[:3, layout.voxel_axis])
    assert int(np.argmax(col)) == world_axis


def test_display_orientation_of_a_ras_image():
    """Axial: anterior at the top, left on the left; pixel -> voxel mapping is documented."""
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    layout = slice_layout(affine, "axial")
    assert (layout.voxel_axis, layout.rows, layout.columns) == (2, "A->P", "L->R")
    data = np.zeros((4, 5, 3))
    data[0, 4, 1] = 1.0  # most left (x=0) and most anterior (y=4) voxel
    plane = extract_slice(data, layout, 1)
    assert plane.shape == (5, 4)
    assert plane[0, 0] == 1.0 and plane.sum() == 1.0
    assert layout.voxel_index(1, 0, 0, data.shape) == (0, 4, 1)
    sag = slice_layout(affine, "sagittal")
    assert (sag.voxel_axis, sag.rows, sag.columns) == (0, "S->I", "P->A")


def test_scaling_round_trip_error_is_at_most_half_a_step():
    rng = np.random.default_rng(3)
    values = rng.normal(0, 1000, size=1000)
    for bits in (8, 16):
        scaling = linear_scaling(values, bits)
        stored = scaling.to_stored(values)
        assert stored.min() == 0 and stored.max() == 2**bits - 1
        err = np.abs(scaling.to_values(stored) - values)
        assert err.max() <= scaling.scale / 2 + 1e-9
    constant = linear_scaling(np.full(5, 7.0), 8)
    np.testing.assert_array_equal(constant.to_values(constant.to_stored(np.full(5, 7.0))), 7.0)
    clipped = linear_scaling(values, 8, value_range=(-10.0, 10.0))
    assert clipped.to_stored(np.array([-1e6, 1e6])).tolist() == [0, 255]


def test_select_slices_validates_and_filters():
    fractions = np.array([0.0, 0.01, 0.2, 0.5, 0.0])
    assert select_slices(5, fractions=fractions, min_brain_fraction=0.05) == [2, 3]
    assert select_slices(5, index_range=(1, 4)) == [1, 2, 3]
    assert select_slices(5, fractions=fractions, index_range=(3, 5), min_brain_fraction=0.1) == [3]
    with pytest.raises(ValueError, match="index_range"):
        select_slices(5, index_range=(3, 9))
    with pytest.raises(ValueError, match="mask"):
        select_slices(5, min_brain_fraction=0.1)


# --- export --------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [8, 16])
def test_png_round_trip_equals_the_volume_slice_after_the_documented_scaling(tmp_path, bits):
    affine = _affine((1, 0, 2), (-1.0, 1.0, -1.0))  # not RAS: axis found from the affine
    image, mask, dseg = _phantom(affine, np.random.default_rng(0))
    result = export_slices(
        image,
        tmp_path,
        "sub-01_space-T1w",
        subject="01",
        space="T1w",
        mask=mask,
        dseg=dseg,
        axes=["axial", "coronal", "sagittal"],
        png_bit_depth=bits,
        min_brain_fraction=0.0,
    )
    data = np.asanyarray(image.dataobj).astype(np.float64)
    rows = read_slice_index(result.index_file)
    assert len(rows) == sum(SHAPE)  # every slice of every axis
    for row in rows:
        layout = slice_layout(affine, row["axis"])
        expected = extract_slice(data, layout, row["index"])
        offset, scale = row["value_offset"], row["value_scale"]
        png = load_slice(tmp_path / row["file"], labels=True)
        assert png.dtype == (np.uint8 if bits == 8 else np.uint16)
        # The stored integers are exactly the documented formula ...
        documented = np.clip(np.rint((expected - offset) / scale), 0, 2**bits - 1)
        np.testing.assert_array_equal(png, documented)
        # ... so unscaling gives the slice back to within half a quantisation step.
        restored = load_slice(tmp_path / row["file"], offset, scale)
        assert np.abs(restored - expected).max() <= scale / 2 + 1e-9
        # Labels are exported unscaled on the same pixels.
        dseg_png = load_slice(tmp_path / row["dseg_file"], labels=True)
        np.testing.assert_array_equal(
            dseg_png, extract_slice(np.asanyarray(dseg.dataobj), layout, row["index"])
        )
        mask_png = load_slice(tmp_path / row["mask_file"], labels=True) > 0
        np.testing.assert_array_equal(
            mask_png, extract_slice(np.asanyarray(mask.dataobj), layout, row["index"]) > 0
        )
        assert row["world_mm"] == pytest.approx(
            slice_world_coordinate(affine, SHAPE, layout, row["index"])
        )
    info = json.loads(result.json_file.read_text())
    assert info["Space"] == "T1w"
    assert info["Scaling"]["Offset"] == rows[0]["value_offset"]


def test_npy_slices_are_exact(tmp_path):
    image, mask, _ = _phantom(np.diag([1.0, 1.0, 1.0, 1.0]), np.random.default_rng(2))
    result = export_slices(
        image, tmp_path, "sub-02", subject="sub-02", space="T1w", mask=mask, fmt="npy"
    )
    layout = slice_layout(image.affine, "axial")
    for row in read_slice_index(result.index_file):
        got = load_slice(tmp_path / row["file"], row["value_offset"], row["value_scale"])
        want = extract_slice(np.asanyarray(image.dataobj), layout, row["index"])
        np.testing.assert_array_equal(got, want)


def test_brain_only_export_skips_empty_slices_and_csv_matches_disk(tmp_path):
    image, mask, dseg = _phantom(np.diag([1.0, 1.0, 1.0, 1.0]), np.random.default_rng(4))
    out = tmp_path / "slices"
    result = export_slices(
        image,
        out,
        "sub-03_ses-1_space-MNI152NLin2009aSym",
        subject="03",
        session="1",
        space="MNI152NLin2009aSym",
        mask=mask,
        dseg=dseg,
        axes=["axial", "coronal"],
        min_brain_fraction=0.05,
    )
    rows = read_slice_index(result.index_file)
    mask_data = np.asanyarray(mask.dataobj)
    for axis, voxel_axis in (("axial", 2), ("coronal", 1)):
        brain = [i for i in range(SHAPE[voxel_axis]) if np.take(mask_data, i, voxel_axis).any()]
        exported = sorted(r["index"] for r in rows if r["axis"] == axis)
        assert exported == brain  # every brain slice of the box passes 5 %, no empty slice does
    assert all(r["brain_fraction"] >= 0.05 for r in rows)
    assert {r["participant_id"] for r in rows} == {"sub-03"}
    assert {r["session_id"] for r in rows} == {"ses-1"}
    assert {r["space"] for r in rows} == {"MNI152NLin2009aSym"}
    listed = {r[k] for r in rows for k in ("file", "mask_file", "dseg_file")}
    on_disk = {p.name for p in out.iterdir() if p.suffix == ".png"}
    assert listed == on_disk
    # A second export with a stricter threshold leaves no stale slice behind.
    export_slices(
        image,
        out,
        "sub-03_ses-1_space-MNI152NLin2009aSym",
        subject="03",
        session="1",
        space="MNI152NLin2009aSym",
        mask=mask,
        axes=["axial"],
        min_brain_fraction=0.5,
    )
    rows = read_slice_index(result.index_file)
    listed = {r[k] for r in rows for k in ("file", "mask_file") if r[k]}
    assert listed == {p.name for p in out.iterdir() if p.suffix == ".png"}
    assert not list(out.glob(".*tmp*"))  # no temporary files left behind


def test_export_errors_name_the_problem(tmp_path):
    image, mask, _ = _phantom(np.eye(4), np.random.default_rng(5))
    with pytest.raises(SliceExportError, match="needs a mask"):
        export_slices(image, tmp_path, "s", subject="01", space="T1w")
    shifted = nib.Nifti1Image(np.asanyarray(mask.dataobj), np.diag([2.0, 1.0, 1.0, 1.0]))
    with pytest.raises(SliceExportError, match="mask affine differs"):
        export_slices(image, tmp_path, "s", subject="01", space="T1w", mask=shifted)
    small = nib.Nifti1Image(np.zeros((3, 3, 3), np.uint8), np.eye(4))
    with pytest.raises(SliceExportError, match="dseg has shape"):
        export_slices(
            image, tmp_path, "s", subject="01", space="T1w", dseg=small, min_brain_fraction=0
        )
    with pytest.raises(SliceExportError, match="axes"):
        export_slices(image, tmp_path, "s", subject="01", space="T1w", mask=mask, axes=["top"])
    assert not any(Path(tmp_path).iterdir())  # nothing written when the inputs are wrong


def test_real_las_t2w_slices_match_the_ras_volume_and_round_trip_losslessly(data_dir, tmp_path):
    """On a real LAS image: 16-bit PNGs of 12-bit data are lossless after unscaling, and
    each sagittal/axial slice equals the slice of the RAS-reoriented volume at its world x/z."""
    image = nib.load(data_dir / "anat" / "T2w.nii.gz")
    assert nib.aff2axcodes(image.affine) == ("L", "A", "S")
    data = np.asanyarray(image.dataobj)
    mask = nib.Nifti1Image((data > 100).astype(np.uint8), image.affine)
    result = export_slices(
        image,
        tmp_path,
        "sub-t2",
        subject="t2",
        space="T1w",
        mask=mask,
        axes=["sagittal", "axial"],
        min_brain_fraction=0.05,
    )
    rows = read_slice_index(result.index_file)
    canonical = nib.as_closest_canonical(image)
    ras = np.asanyarray(canonical.dataobj)
    for axis in ("sagittal", "axial"):
        layout = slice_layout(image.affine, axis)
        ras_layout = slice_layout(canonical.affine, axis)
        fractions = np.take(
            data > 100, range(data.shape[layout.voxel_axis]), layout.voxel_axis
        ).mean(axis=tuple(a for a in range(3) if a != layout.voxel_axis))
        axis_rows = [r for r in rows if r["axis"] == axis]
        assert [r["index"] for r in axis_rows] == [
            i for i, f in enumerate(fractions) if f >= 0.05 and f > 0
        ]
        for row in axis_rows[:: max(1, len(axis_rows) // 8)]:
            restored = load_slice(tmp_path / row["file"], row["value_offset"], row["value_scale"])
            want = extract_slice(data, layout, row["index"])
            np.testing.assert_array_equal(np.rint(restored), want)  # lossless for 12-bit data
            # The same world plane of the RAS volume gives the same picture.
            ras_index = [
                i
                for i in range(ras.shape[ras_layout.voxel_axis])
                if abs(
                    slice_world_coordinate(canonical.affine, ras.shape, ras_layout, i)
                    - row["world_mm"]
                )
                < 1e-3
            ]
            assert len(ras_index) == 1
            np.testing.assert_array_equal(want, extract_slice(ras, ras_layout, ras_index[0]))
