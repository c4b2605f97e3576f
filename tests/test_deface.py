"""Defacing: phantoms with a known face, ears and brain, then real heads in MNI space.

The phantom tests check the promises on any geometry (oblique grids, tilted
heads): the face and ears go, no brain-mask voxel changes, nothing within the
margin of the brain is removed, the skull cap stays. The data tests check the
issue's acceptance on real heads after registration to the MNI template.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi

from mriflow.image.deface import deface, face_mask, write_defaced_nifti
from mriflow.reports.figures import defacing_sections, plot_defacing

MARGIN = 5.0


def _rotation_x(deg: float) -> np.ndarray:
    r = np.deg2rad(deg)
    return np.array([[1, 0, 0], [0, np.cos(r), -np.sin(r)], [0, np.sin(r), np.cos(r)]])


def _rotation_z(deg: float) -> np.ndarray:
    r = np.deg2rad(deg)
    return np.array([[np.cos(r), -np.sin(r), 0], [np.sin(r), np.cos(r), 0], [0, 0, 1]])


def phantom_head(
    *, pitch_deg: float = 0.0, grid_rotation_deg: float = 0.0, voxel: float = 3.0, seed: int = 0
) -> dict:
    """A head (ellipsoid) with a brain, a nose, two eyes and two ears, on a possibly oblique grid.

    The anatomy is defined in a head frame (RAS mm) tilted by ``pitch_deg``
    (nose up for positive) relative to the world; the voxel grid is rotated
    by ``grid_rotation_deg`` about the world z axis. Returns the images and the
    boolean parts on the grid.
    """
    rng = np.random.default_rng(seed)
    shape = (int(240 / voxel),) * 3
    rot = _rotation_z(grid_rotation_deg)
    affine = np.eye(4)
    affine[:3, :3] = rot * voxel
    affine[:3, 3] = -rot @ (np.array(shape) * voxel / 2)
    ijk = np.indices(shape).reshape(3, -1).T
    world = ijk @ affine[:3, :3].T + affine[:3, 3]
    head_frame = world @ _rotation_x(-pitch_deg).T  # world -> head frame
    x, y, z = (head_frame[:, i].reshape(shape) for i in range(3))

    def ellipsoid(cx, cy, cz, ax, ay, az):
        return ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 + ((z - cz) / az) ** 2 <= 1

    brain = ellipsoid(0, -5, 20, 60, 75, 55)
    head = ellipsoid(0, 0, 5, 75, 95, 90)
    nose = ellipsoid(0, 95, -25, 10, 14, 18)
    eyes = ellipsoid(32, 72, -8, 11, 11, 11) | ellipsoid(-32, 72, -8, 11, 11, 11)
    ears = ellipsoid(80, -15, -10, 8, 14, 22) | ellipsoid(-80, -15, -10, 8, 14, 22)
    cap = head & (z > 70)  # skull cap above the brain: must stay
    data = np.zeros(shape, np.float32)
    data[head | nose | ears] = 300
    data[eyes] = 150
    data[brain] = 600
    data += rng.normal(0, 5, shape).astype(np.float32)
    data = np.clip(data, 0, None).astype(np.int16)
    img = nib.Nifti1Image(data, affine)
    mask = nib.Nifti1Image(brain.astype(np.uint8), affine)
    return {
        "img": img,
        "mask": mask,
        "brain": brain,
        "face": (nose | eyes) & ~brain,
        "nose": nose,
        "ears": ears,
        "cap": cap,
        "zooms": np.full(3, voxel),
    }


@pytest.mark.parametrize(
    ("pitch", "grid_rot", "voxel"),
    [(0.0, 0.0, 3.0), (12.0, 20.0, 3.0), (-10.0, -35.0, 4.0)],
)
def test_face_and_ears_removed_brain_and_cap_kept(pitch, grid_rot, voxel) -> None:
    ph = phantom_head(pitch_deg=pitch, grid_rotation_deg=grid_rot, voxel=voxel)
    defaced, removed_img = deface(ph["img"], ph["mask"], margin_mm=MARGIN)
    before = np.asarray(ph["img"].dataobj)
    after = np.asarray(defaced.dataobj)
    removed = np.asarray(removed_img.dataobj) > 0

    assert defaced.get_data_dtype() == ph["img"].get_data_dtype()
    assert np.array_equal(before[ph["brain"]], after[ph["brain"]]), "a brain voxel changed"
    assert np.array_equal(before[~removed], after[~removed]), "a voxel outside the mask changed"
    assert (after[removed] == 0).all()
    # Nothing within the margin of the brain is removed.
    dist = ndi.distance_transform_edt(~ph["brain"], sampling=ph["zooms"])
    assert dist[removed].min() > MARGIN
    # The face and the ears go (what lies within the margin of the brain may stay).
    face = ph["face"] & (dist > MARGIN)
    assert (after[face] == 0).mean() >= 0.95
    assert (after[ph["ears"] & (dist > MARGIN)] == 0).mean() >= 0.95
    # The skull cap stays: defacing is not skull stripping.
    assert np.array_equal(before[ph["cap"]], after[ph["cap"]])


def test_plane_alone_is_quickshear_and_keeps_the_ears() -> None:
    ph = phantom_head()
    remove, record = face_mask(ph["img"], ph["mask"], margin_mm=MARGIN, shave=False)
    assert not (remove & ph["brain"]).any()
    assert remove[ph["face"]].mean() > 0.5, "the plane cuts the nose and most of the eyes"
    assert remove[ph["ears"]].mean() < 0.05, "a plane cannot reach the ears"
    normal = np.asarray(record["PlaneNormalAS"])
    assert normal[0] > 0 and normal[1] < 0, "the plane faces anterior-inferior"


def test_empty_or_mismatched_mask_is_refused() -> None:
    ph = phantom_head(voxel=6.0)
    empty = nib.Nifti1Image(np.zeros(ph["img"].shape, np.uint8), ph["img"].affine)
    with pytest.raises(ValueError, match="empty"):
        deface(ph["img"], empty)
    shifted = ph["img"].affine.copy()
    shifted[0, 3] += 5
    with pytest.raises(ValueError, match="different grids"):
        deface(ph["img"], nib.Nifti1Image(np.asarray(ph["mask"].dataobj), shifted))
    with pytest.raises(ValueError, match="margin_mm"):
        deface(ph["img"], ph["mask"], margin_mm=0)


@pytest.mark.parametrize("slope_inter", [(1.0, 0.0), (2.0, -100.0)])
def test_write_defaced_nifti_changes_only_the_face_bytes(tmp_path: Path, slope_inter) -> None:
    ph = phantom_head(voxel=6.0)
    img = nib.Nifti1Image(np.asarray(ph["img"].dataobj), ph["img"].affine)
    img.header.set_slope_inter(*slope_inter)
    img.header["descrip"] = b"kept header"
    src = tmp_path / "head.nii"
    nib.save(img, src)
    remove, _ = face_mask(img, ph["mask"], margin_mm=MARGIN)
    out = tmp_path / "defaced.nii"
    write_defaced_nifti(src, out, remove)
    a, b = nib.load(src), nib.load(out)
    assert src.read_bytes()[:352] == out.read_bytes()[:352], "header bytes changed"
    raw_a, raw_b = a.dataobj.get_unscaled(), b.dataobj.get_unscaled()
    assert np.array_equal(raw_a[~remove], raw_b[~remove])
    assert np.allclose(np.asarray(b.dataobj)[remove], 0.0, atol=abs(slope_inter[0]) / 2)
    # gzip input gives the same result
    gz = tmp_path / "head.nii.gz"
    gz.write_bytes(gzip.compress(src.read_bytes()))
    write_defaced_nifti(gz, tmp_path / "defaced2.nii", remove)
    assert (tmp_path / "defaced2.nii").read_bytes() == out.read_bytes()


def test_defacing_figure_outlines_the_removed_region_and_never_shows_the_face(
    tmp_path: Path,
) -> None:
    ph = phantom_head(voxel=4.0)
    defaced, removed = deface(ph["img"], ph["mask"])
    gone = np.asarray(removed.dataobj) > 0
    assert (np.asarray(ph["img"].dataobj)[gone] > 0).any()  # there was a face to remove
    # even handed the undefaced head by mistake, the figure shows no removed voxel
    for head in (ph["img"], defaced):
        sections = defacing_sections(head, removed, brain_mask=ph["mask"])
        assert [s.title.split()[0] for s in sections] == ["sagittal", "sagittal", "axial"]
        for section in sections:
            assert section.image.shape == section.removed.shape == section.brain.shape
            assert not section.image[section.removed].any()
            assert not (section.removed & section.brain).any()
        assert all(s.removed.any() for s in sections)
    # midline: the removed part is in front (right-hand columns) and low (origin lower)
    rows, cols = np.nonzero(sections[0].removed)
    height, width = sections[0].removed.shape
    assert cols.mean() > width / 2 and rows.mean() < height / 2
    out = plot_defacing(defaced, removed, tmp_path / "deface.svg", brain_mask=ph["mask"])
    assert out.stat().st_size > 1000 and b"<svg" in out.read_bytes()[:500]
    with pytest.raises(ValueError, match="removed voxels is empty"):
        plot_defacing(defaced, nib.Nifti1Image(np.zeros(gone.shape, np.uint8), defaced.affine),
                      tmp_path / "none.png")  # fmt: skip


def test_deface_workflow_runs(tmp_path: Path) -> None:
    from mriflow.workflows.deface import init_deface_wf

    ph = phantom_head(voxel=6.0)
    head, mask = tmp_path / "head.nii.gz", tmp_path / "mask.nii.gz"
    nib.save(ph["img"], head)
    nib.save(ph["mask"], mask)
    wf = init_deface_wf()
    wf.base_dir = str(tmp_path / "work")
    wf.inputs.inputnode.in_file = str(head)
    wf.inputs.inputnode.brain_mask = str(mask)
    graph = wf.run()
    (node,) = [n for n in graph.nodes() if n.name == "deface"]
    res = node.result.outputs
    assert res.metadata["Defaced"] is True
    assert res.metadata["DefacingMethod"]["MarginMM"] == 5.0
    json.dumps(res.metadata)  # sidecar-ready
    out = np.asarray(nib.load(res.out_file).dataobj)
    assert np.array_equal(out[ph["brain"]], np.asarray(ph["img"].dataobj)[ph["brain"]])


# --------------------------------------------------------------------------- real heads

FACE_BOX = ((-50.0, 50.0), (60.0, 100.0), (-60.0, -10.0))  # MNI mm, from issue 18


def _in_mni(img, transforms, interpolation="linear") -> np.ndarray:
    from mriflow.image.registration import apply_transforms
    from mriflow.image.template import load_template

    if interpolation == "linear":
        img = nib.Nifti1Image(np.asarray(img.dataobj, dtype=np.float32), img.affine)
    out = apply_transforms(img, transforms, load_template(1).t1w, interpolation=interpolation)
    return np.asarray(out.dataobj)


def _face_box() -> tuple[np.ndarray, np.ndarray]:
    from mriflow.image.template import load_template

    tpl = load_template(1).t1w
    ijk = np.indices(tpl.shape).reshape(3, -1).T
    xyz = ijk @ tpl.affine[:3, :3].T + tpl.affine[:3, 3]
    inside = np.ones(len(xyz), dtype=bool)
    for axis, (lo, hi) in enumerate(FACE_BOX):
        inside &= (xyz[:, axis] >= lo) & (xyz[:, axis] <= hi)
    return inside.reshape(tpl.shape), np.asarray(tpl.header.get_zooms()[:3], dtype=float)


def _check_real_head(head, defaced, stripped, tmp_path: Path) -> dict:
    """Brain-mask voxels bit-identical; in MNI space the face box is cleared outside the brain."""
    from mriflow.image.registration import register_to_template

    brain = np.asarray(stripped.mask.dataobj) > 0
    before, after = np.asarray(head.dataobj), np.asarray(defaced.dataobj)
    assert np.array_equal(before[brain], after[brain]), "brain-mask voxels changed"
    changed = before != after
    assert (after[changed] == 0).all(), "defacing only sets voxels to zero"

    reg = register_to_template(
        stripped.brain, tmp_path / "reg_", transform="affine", preset="fast", compute_warped=False
    )
    box, zooms = _face_box()
    brain_mni = _in_mni(stripped.mask, reg.forward_transforms, "nearest") > 0
    zero = np.abs(_in_mni(defaced, reg.forward_transforms)) < 1e-6
    dist = ndi.distance_transform_edt(~brain_mni, sampling=zooms)
    far = box & (dist > MARGIN + 2.0)
    figures = {
        "box_zero": float(zero[box].mean()),
        "box_brain": float(brain_mni[box].mean()),
        "face_zero": float(zero[far].mean()),
    }
    # The face box of the issue reaches into the orbitofrontal brain (3.8 % of it in the
    # template, 4.5-5 % in these heads), which is never removed, and the margin is kept:
    # so the box is >= 99 % zero outside brain + margin, and as a whole up to the brain.
    assert figures["face_zero"] >= 0.99, figures
    assert figures["box_zero"] >= 0.85, figures
    assert figures["box_zero"] <= 1.0 - figures["box_brain"] + 0.01, figures
    return figures


@pytest.mark.data
@pytest.mark.parametrize(
    "relpath", ["anat/T1_head.nii.gz", "ground_truth/aomic_piop2/sub-0001_T1w.nii.gz"]
)
def test_real_head_face_box_cleared_in_mni_and_brain_bit_identical(
    data_dir: Path, tmp_path: Path, relpath: str
) -> None:
    from mriflow.image.skullstrip import skull_strip

    head = nib.load(data_dir / relpath)
    stripped = skull_strip(head, method="auto", detect_stripped=False)
    defaced, _ = deface(head, stripped.mask, margin_mm=MARGIN)
    _check_real_head(head, defaced, stripped, tmp_path)


@pytest.mark.data
def test_convert_deface_on_a_real_dicom_t1(data_dir: Path, tmp_path: Path) -> None:
    from mriflow.dicom.convert import DefaceOptions, convert_dicom_to_bids
    from mriflow.image.skullstrip import skull_strip

    src = data_dir / "dicom" / "xa30_t1w_enhanced" / "In"
    if not src.is_dir():
        pytest.skip(f"{src} not found")
    plain = convert_dicom_to_bids(src, tmp_path / "plain", subject="01", verify=False)
    faced = convert_dicom_to_bids(
        src, tmp_path / "defaced", subject="01", verify=False, deface=DefaceOptions()
    )
    assert plain.ok and faced.ok
    (a,) = (tmp_path / "plain").rglob("*_T1w.nii.gz")
    (b,) = (tmp_path / "defaced").rglob("*_T1w.nii.gz")
    sidecar = json.loads(b.with_name(b.name.replace(".nii.gz", ".json")).read_text())
    assert sidecar["Defaced"] is True
    assert sidecar["DefacingMethod"]["MarginMM"] == MARGIN
    assert "skull_strip" in sidecar["DefacingMethod"]["BrainMask"]
    assert "Defaced" not in json.loads(a.with_name(a.name.replace(".nii.gz", ".json")).read_text())
    img_a, img_b = nib.load(a), nib.load(b)
    assert img_a.header.binaryblock == img_b.header.binaryblock, "header unchanged"
    # the mask convert used internally: same skull stripper, same image, deterministic
    stripped = skull_strip(img_a, method="auto", detect_stripped=False)
    _check_real_head(img_a, img_b, stripped, tmp_path)


def test_template_face_mask_through_a_kept_transform_spares_the_brain(tmp_path: Path) -> None:
    """pydeface's way: the MNI face region brought back by a transform (identity here)."""
    from mriflow.image.deface import template_face_mask

    identity = tmp_path / "identity.txt"
    identity.write_text(
        "#Insight Transform File V1.0\n#Transform 0\n"
        "Transform: AffineTransform_double_3_3\n"
        "Parameters: 1 0 0 0 1 0 0 0 1 0 0 0\nFixedParameters: 0 0 0\n"
    )
    ph = phantom_head(voxel=4.0)
    remove = template_face_mask(ph["img"], ph["mask"], [identity], margin_mm=MARGIN)
    dist = ndi.distance_transform_edt(~ph["brain"], sampling=ph["zooms"])
    assert remove.any() and dist[remove].min() > MARGIN
    assert remove[ph["nose"]].mean() > 0.9, "the nose is in the template face region"
    assert not remove[ph["cap"]].any()
    # deface() adds it to the brain-mask method and says so
    result = deface(ph["img"], ph["mask"], template_to_subject=[identity])
    assert "template face mask" in result.description["Method"]
    assert (np.asarray(result.face_mask.dataobj)[remove] == 1).all()


@pytest.mark.parametrize("pitch", [-15.0, 0.0, 20.0])
def test_head_tilt_is_read_from_the_brain_mask(pitch: float) -> None:
    from mriflow.image.deface import brain_pitch

    ph = phantom_head(pitch_deg=pitch, grid_rotation_deg=25.0, voxel=4.0)
    # the phantom brain is an ellipsoid whose long axis is the head's anterior axis
    assert brain_pitch(ph["mask"]) == pytest.approx(pitch, abs=1.0)


def test_template_pitch_constant_matches_the_template() -> None:
    from mriflow.image import deface as deface_module
    from mriflow.image.template import load_template

    measured = deface_module.brain_pitch(load_template(1).mask)
    assert measured == pytest.approx(deface_module._TEMPLATE_PITCH_DEG, abs=0.3)
