"""Registration to MNI152NLin2009aSym: known-transform recovery, Dice after warping, labels."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi
from scipy.spatial.transform import Rotation

from mriflow.image._hdf5 import clear_timestamps, lookup3
from mriflow.image.registration import (
    apply_transforms,
    apply_transforms_many,
    register_to_template,
    transform_points,
)
from mriflow.image.template import load_template

REPO_ROOT = Path(__file__).resolve().parents[1]


def _dice(a, b):
    return 2 * (a & b).sum() / (a.sum() + b.sum())


def _known_transform():
    """World map M (mm): the synthetic image's point y shows template point M @ y."""
    rotation = Rotation.from_euler("xyz", [8.0, -5.0, 10.0], degrees=True).as_matrix()
    matrix = np.eye(4)
    matrix[:3, :3] = rotation @ np.diag([1.08, 0.95, 1.03])  # rigid + scaling
    matrix[:3, 3] = [6.0, -4.0, 5.0]
    return matrix


@pytest.fixture(scope="module")
def moved_template():
    """The 2 mm template T1w resampled through a known rigid + affine transform."""
    tpl = load_template(2)
    matrix = _known_transform()
    affine = tpl.t1w.affine
    voxel_map = np.linalg.inv(affine) @ matrix @ affine
    data = ndi.affine_transform(
        np.asarray(tpl.t1w.dataobj), voxel_map[:3, :3], voxel_map[:3, 3], order=1
    )
    return nib.Nifti1Image(data.astype(np.float32), affine), matrix


@pytest.fixture(scope="module")
def affine_result(moved_template, tmp_path_factory):
    img, _ = moved_template
    out = tmp_path_factory.mktemp("reg") / "synthetic_"
    return register_to_template(
        img, out, transform="affine", preset="fast", output_resolution=2, random_seed=7
    )


def _brain_points(tpl, step=40):
    ijk = np.argwhere(np.asarray(tpl.mask.dataobj) > 0)[::step]
    return nib.affines.apply_affine(tpl.mask.affine, ijk)


def test_known_affine_is_recovered_within_1mm(moved_template, affine_result):
    _, matrix = moved_template
    tpl = load_template(2)
    points = _brain_points(tpl)
    # forward transform maps a template point to where the synthetic image shows it
    mapped = transform_points(points, affine_result.forward_transforms)
    expected = nib.affines.apply_affine(np.linalg.inv(matrix), points)
    rms = np.sqrt(((mapped - expected) ** 2).sum(axis=1).mean())
    print(f"landmark rms {rms:.3f} mm")
    assert rms < 1.0, rms
    # the reverse transform takes them back
    back = transform_points(mapped, affine_result.reverse_transforms)
    assert np.sqrt(((back - points) ** 2).sum(axis=1).mean()) < 0.1
    # and the synthetic image lands on the template
    brain = np.asarray(tpl.mask.dataobj) > 0
    warped = affine_result.warped.get_fdata()[brain]
    assert np.corrcoef(warped, np.asarray(tpl.t1w.dataobj)[brain])[0, 1] > 0.95


def test_transform_files_are_composites(affine_result):
    (forward,) = affine_result.forward_transforms
    (reverse,) = affine_result.reverse_transforms
    assert forward.name.endswith("Composite.h5") and forward.is_file()
    assert reverse.name.endswith("InverseComposite.h5") and reverse.is_file()


_REPEAT_SCRIPT = """
import sys, time
import nibabel as nib, numpy as np
from mriflow.image.registration import register_to_template, transform_points
from mriflow.image.template import load_template
img = nib.load(sys.argv[1])
ijk = np.argwhere(np.asarray(load_template(2).mask.dataobj) > 0)[::400]
points = nib.affines.apply_affine(load_template(2).mask.affine, ijk)
mapped = []
for run in ("a", "b"):
    result = register_to_template(img, sys.argv[2] + run, transform="affine",
                                  output_resolution=2, random_seed=7, num_threads=1)
    mapped.append(transform_points(points, result.forward_transforms))
    time.sleep(1.1)  # HDF5 records object times in seconds
files = [(sys.argv[2] + run + name) for run in ("a", "b")
         for name in ("Composite.h5", "InverseComposite.h5")]
same = [open(files[i], "rb").read() == open(files[i + 2], "rb").read() for i in (0, 1)]
print("IDENTICAL_FILES", all(same))
print("MAXDIFF", float(np.abs(mapped[0] - mapped[1]).max()))
"""


def test_same_seed_gives_the_same_transform(moved_template, tmp_path):
    # ITK fixes its thread count at its first use in a process, and a
    # multi-threaded metric sums in a varying order (results then differ by
    # ~0.02 mm), so reproducibility is checked in a fresh single-thread process.
    img, _ = moved_template
    nib.save(img, str(tmp_path / "moved.nii.gz"))
    env = dict(os.environ, ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS="1")
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-c", _REPEAT_SCRIPT, str(tmp_path / "moved.nii.gz"), str(tmp_path) + "/"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    maxdiff = float(proc.stdout.split("MAXDIFF")[-1])
    assert maxdiff == 0.0, maxdiff
    # the published transform files themselves are byte-identical (no HDF5 times)
    assert "IDENTICAL_FILES True" in proc.stdout, proc.stdout


def test_hdf5_checksum_matches_reference_vectors():
    # lookup3.c's own driver: hashlittle("Four score and seven years ago", 30, 0 / 1)
    text = b"Four score and seven years ago"
    assert lookup3(b"") == 0xDEADBEEF
    assert lookup3(text) == 0x17770551
    assert lookup3(text, 1) == 0xCD628161


def test_transform_written_twice_is_byte_identical_and_unchanged(tmp_path):
    import time

    import ants

    matrix = _known_transform()
    tx = ants.create_ants_transform(
        transform_type="AffineTransform",
        dimension=3,
        matrix=matrix[:3, :3],
        translation=matrix[:3, 3],
    )
    paths = [tmp_path / "a.h5", tmp_path / "b.h5"]
    raw = []
    for path in paths:
        ants.write_transform(tx, str(path))
        raw.append(path.read_bytes())
        assert clear_timestamps(path) > 0
        time.sleep(1.1)  # HDF5 records object times in seconds
    assert raw[0] != raw[1]  # ITK's files differ by their times alone...
    assert paths[0].read_bytes() == paths[1].read_bytes()  # ...and no longer after clearing
    assert len(paths[0].read_bytes()) == len(raw[0])
    cleared = ants.read_transform(str(paths[0])).parameters
    assert np.array_equal(cleared, tx.parameters)
    with pytest.raises(ValueError, match="not an HDF5 file"):
        (tmp_path / "x.h5").write_bytes(b"text")
        clear_timestamps(tmp_path / "x.h5")


@pytest.fixture(scope="module")
def real_brain(data_dir):
    """A real skull-stripped T1w (post-gadolinium) and its brain mask."""
    img = nib.load(str(data_dir / "anat" / "T1_gadolinium.nii.gz"))
    data = img.get_fdata(dtype=np.float32)
    mask = nib.Nifti1Image((data > 0).astype(np.uint8), img.affine)
    return nib.Nifti1Image(data, img.affine), mask


@pytest.mark.slow
@pytest.mark.parametrize(("transform", "min_dice"), [("syn", 0.95), ("affine", 0.90)])
def test_warped_brain_mask_overlaps_template_mask(real_brain, tmp_path, transform, min_dice):
    img, mask = real_brain
    result = register_to_template(
        img, tmp_path / "sub_", transform=transform, preset="fast", output_resolution=2
    )
    tpl = load_template(2)
    warped_mask = apply_transforms(
        mask, result.forward_transforms, tpl.mask, interpolation="nearest"
    )
    assert warped_mask.get_data_dtype() == np.uint8
    dice = _dice(np.asarray(warped_mask.dataobj) > 0, np.asarray(tpl.mask.dataobj) > 0)
    print(f"{transform} dice {dice:.4f}")
    assert dice >= min_dice, dice


@pytest.mark.slow
def test_resampling_many_images_at_once_matches_ants(real_brain, affine_result, tmp_path):
    """One evaluation of a SyN chain for several images gives what antsApplyTransforms
    gives each (the template-space outputs are made this way), whatever their types;
    the 2 mm grid's 99 planes are resampled in five slabs."""
    img, mask = real_brain
    syn = register_to_template(img, tmp_path / "sub_", preset="fast", output_resolution=2)
    labels = np.digitize(img.get_fdata(), [1.0, 200.0, 400.0]).astype(np.int16)  # 0..3
    empty = nib.Nifti1Image(np.zeros(img.shape, np.uint8), img.affine)
    images = [img, mask, nib.Nifti1Image(labels, img.affine), empty]
    interpolations = ["linear", "nearest", "genericLabel", "nearest"]
    reference = load_template(2).t1w
    # a chain of two files, the last applied first, as ANTs reads a list
    chains = [syn.forward_transforms, [*syn.forward_transforms, *affine_result.forward_transforms]]
    for chain in chains:
        together = apply_transforms_many(images, chain, reference, interpolations=interpolations)
        for image, interpolation, out in zip(images, interpolations, together, strict=True):
            ants = apply_transforms(image, chain, reference, interpolation=interpolation)
            assert out.get_data_dtype() == ants.get_data_dtype()
            assert np.array_equal(out.affine, reference.affine)
            expected, got = np.asarray(ants.dataobj), np.asarray(out.dataobj)
            if interpolation == "linear":
                assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()
            else:
                assert set(np.unique(got)) == set(np.unique(expected))
                assert (got != expected).mean() < 1e-4, (got != expected).sum()
    with pytest.raises(ValueError, match="2 interpolations given for 4 images"):
        apply_transforms_many(images, chains[0], reference, interpolations=["linear"] * 2)


def test_nearest_neighbour_keeps_label_values(affine_result, moved_template):
    img, _ = moved_template
    labels = np.digitize(img.get_fdata(), [0.05, 0.5, 0.75]).astype(np.int16)  # 0..3
    label_img = nib.Nifti1Image(labels, img.affine)
    tpl = load_template(2)
    out = apply_transforms(
        label_img, affine_result.forward_transforms, tpl.t1w, interpolation="nearest"
    )
    values = np.asarray(out.dataobj)
    assert out.get_data_dtype() == np.int16
    assert set(np.unique(values)) <= {0, 1, 2, 3}
    assert np.allclose(out.affine, tpl.t1w.affine)
    # labels land where the template has brain
    inside = np.asarray(tpl.mask.dataobj) > 0
    assert (values[inside] > 0).mean() > 0.95


def test_apply_transforms_names_a_missing_file(moved_template, tmp_path):
    img, _ = moved_template
    missing = tmp_path / "nowhere_Composite.h5"
    with pytest.raises(ValueError, match="nowhere_Composite.h5: transform file not found"):
        apply_transforms(img, [missing], img)


def test_register_validates(moved_template, tmp_path):
    img, _ = moved_template
    with pytest.raises(ValueError, match="preset"):
        register_to_template(img, tmp_path / "x_", preset="sloppy")
    with pytest.raises(ValueError, match="transform"):
        register_to_template(img, tmp_path / "x_", transform="bspline")
    with pytest.raises(ValueError, match="output folder does not exist"):
        register_to_template(img, tmp_path / "no" / "x_")


def test_user_template_known_affine_is_recovered(tmp_path):
    """Registration to a template given as files: the embedded template (as the subject)
    registered to a copy of itself moved by a known affine recovers that affine, and the
    warped image lands on the user template's own grid."""
    from mriflow.image.template import load_user_template
    from tests.spaces_helpers import MOVE, write_moved_template

    files = write_moved_template(tmp_path / "tpl")
    user = load_user_template("Moved", files)
    subject = load_template(2).t1w
    result = register_to_template(
        subject, tmp_path / "sub_", transform="affine", preset="fast", random_seed=7,
        template=user,
    )  # fmt: skip
    points = _brain_points(user)
    # forward maps a user-template point to the subject (= embedded template) point it shows
    mapped = transform_points(points, result.forward_transforms)
    expected = nib.affines.apply_affine(MOVE, points)
    rms = np.sqrt(((mapped - expected) ** 2).sum(axis=1).mean())
    print(f"user template landmark rms {rms:.3f} mm")
    assert rms < 1.0, rms
    assert np.allclose(result.warped.affine, user.t1w.affine)
    assert result.warped.shape == user.t1w.shape
    brain = np.asarray(user.mask.dataobj) > 0
    warped = result.warped.get_fdata()[brain]
    assert np.corrcoef(warped, np.asarray(user.t1w.dataobj)[brain])[0, 1] > 0.95
