"""Packed slices: one .npy stack per axis and kind, the same pixels as the PNG form."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from mriflow.config import Config
from mriflow.image.slices import extract_slice, slice_layout
from mriflow.ml.slice_stack import open_stack, write_stack
from mriflow.ml.slices import export_slices, load_slice, load_slice_batch, read_slice_index

SHAPE = (30, 34, 26)
AXES = ["axial", "coronal", "sagittal"]


def _phantom(seed: int = 0):
    """A noisy LPS-ish volume (not RAS: axes come from the affine), a box mask, a dseg."""
    rng = np.random.default_rng(seed)
    affine = np.array([[-1.0, 0, 0, 20.0], [0, 0, 1.2, -30.0], [0, -1.5, 0, 40.0], [0, 0, 0, 1.0]])
    data = rng.normal(100.0, 30.0, size=SHAPE).astype(np.float32)
    mask = np.zeros(SHAPE, dtype=np.uint8)
    mask[5:25, 6:28, 4:22] = 1
    dseg = np.zeros(SHAPE, dtype=np.uint8)
    dseg[mask > 0] = rng.integers(1, 4, size=int(mask.sum()))
    return tuple(nib.Nifti1Image(a, affine) for a in (data, mask, dseg))


def _export(tmp_path, fmt, image, mask, dseg, **options):
    return export_slices(
        image,
        tmp_path / fmt,
        "sub-01_desc-model",
        subject="01",
        space="T1w",
        mask=mask,
        dseg=dseg,
        axes=AXES,
        fmt=fmt,
        **options,
    )


def test_a_batch_from_the_stacks_has_the_pixels_of_the_png_form(tmp_path):
    image, mask, dseg = _phantom()
    png = _export(tmp_path, "png", image, mask, dseg)
    stack = _export(tmp_path, "stack", image, mask, dseg)
    png_rows = read_slice_index(png.index_file)
    stack_rows = read_slice_index(stack.index_file)
    # the same slices, in the same order, whatever the form
    key = ("participant_id", "axis", "index", "world_mm", "brain_fraction")
    assert [[r[k] for k in key] for r in png_rows] == [[r[k] for k in key] for r in stack_rows]

    rng = np.random.default_rng(1)
    data = np.asanyarray(image.dataobj)
    for axis in AXES:
        positions = [i for i, r in enumerate(stack_rows) if r["axis"] == axis]
        batch = sorted(rng.choice(positions, size=8, replace=False))  # a loader's batch
        s_rows = [stack_rows[i] for i in batch]
        p_rows = [png_rows[i] for i in batch]
        from_stack = load_slice_batch(stack.index_file, s_rows)
        from_png = load_slice_batch(png.index_file, p_rows)
        assert from_stack.shape == from_png.shape == (8, *from_stack.shape[1:])
        # the stack holds the values themselves ...
        layout = slice_layout(image.affine, axis)
        expected = np.stack([extract_slice(data, layout, r["index"]) for r in s_rows])
        np.testing.assert_array_equal(from_stack, expected)
        # ... which quantised with the PNG's documented scaling are the PNG's pixels
        offset, scale = p_rows[0]["value_offset"], p_rows[0]["value_scale"]
        stored = np.clip(np.rint((from_stack.astype(np.float64) - offset) / scale), 0, 65535)
        png_stored = np.stack(
            [load_slice(png.index_file.parent / r["file"], labels=True) for r in p_rows]
        )
        np.testing.assert_array_equal(stored, png_stored)
        assert np.abs(from_png - from_stack).max() <= scale / 2 + 1e-3
        for kind in ("mask", "dseg"):
            np.testing.assert_array_equal(
                load_slice_batch(stack.index_file, s_rows, kind),
                load_slice_batch(png.index_file, p_rows, kind),
            )


def test_stacks_do_not_grow_in_files_with_the_slices(tmp_path):
    image, mask, dseg = _phantom(2)
    stack = _export(tmp_path, "stack", image, mask, dseg, min_brain_fraction=0.0)
    png = _export(tmp_path, "png", image, mask, dseg, min_brain_fraction=0.0)
    n_slices = sum(SHAPE)
    assert len(stack.rows) == len(png.rows) == n_slices
    on_disk = sorted(p.name for p in (tmp_path / "stack").iterdir())
    # one image, mask and dseg stack per axis, the index and its JSON
    assert len(on_disk) == 3 * len(AXES) + 2
    assert len(list((tmp_path / "png").iterdir())) == 3 * n_slices + 2
    index_files = {stack.index_file.name, stack.json_file.name}
    assert {p.name for p in stack.files} | index_files == set(on_disk)
    axial = open_stack(tmp_path / "stack" / "sub-01_desc-model_axis-axial_T1w.npy")
    assert isinstance(axial, np.memmap) and axial.dtype == np.float32
    assert axial.shape[0] == sum(r["axis"] == "axial" for r in stack.rows)


def test_switching_format_leaves_no_stale_files(tmp_path):
    image, mask, dseg = _phantom(3)
    out = tmp_path / "slices"
    for fmt in ("png", "stack"):
        export_slices(
            image, out, "sub-01", subject="01", space="T1w", mask=mask, dseg=dseg, fmt=fmt
        )
    assert not list(out.glob("*.png"))
    export_slices(image, out, "sub-01", subject="01", space="T1w", mask=mask, fmt="png")
    assert not list(out.glob("*.npy"))


def test_stack_errors_name_the_file(tmp_path):
    with pytest.raises(ValueError, match="share a shape"):
        write_stack(tmp_path / "x.npy", [np.zeros((2, 3)), np.zeros((3, 2))], np.float32)
    np.save(tmp_path / "flat.npy", np.zeros(4))
    with pytest.raises(ValueError, match=r"flat\.npy: a slice stack is 3D"):
        open_stack(tmp_path / "flat.npy")
    with pytest.raises(FileNotFoundError, match=r"none\.npy: slice stack not found"):
        open_stack(tmp_path / "none.npy")


def test_packed_slices_are_the_default():
    assert Config().export.slice_format == "stack"
