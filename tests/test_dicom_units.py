"""Unit tests of the DICOM-to-BIDS building blocks (milliseconds each, no DICOM files)."""

from __future__ import annotations

import datetime as dt
import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mriflow.dicom.converters import compare_images, reorient_like
from mriflow.dicom.dataset import update_participants, write_dataset_description
from mriflow.dicom.deid import (
    acquisition_datetime,
    collect_phi_values,
    contains_phi,
    deidentify_sidecar,
    scrub_nifti_header,
    write_nifti_gz,
)
from mriflow.dicom.heuristic import (
    BidsTarget,
    HeuristicError,
    bids_basename,
    default_heuristic,
    load_dcm2bids_config,
    make_unique,
)

# --------------------------------------------------------------------------- default heuristic

EPI = {"ScanningSequence": "EP", "EchoTime": 0.03, "RepetitionTime": 2.0}


@pytest.mark.parametrize(
    ("sidecar", "n_volumes", "bvals", "expected"),
    [
        ({"SeriesDescription": "t1_mprage_sag_p2"}, 1, None, ("anat", "T1w")),
        ({"ProtocolName": "T1w_MPR"}, 1, None, ("anat", "T1w")),
        ({"SeriesDescription": "t1_fl2d_sag"}, 1, None, ("anat", "T1w")),
        ({"SeriesDescription": "t2_tse_tra"}, 1, None, ("anat", "T2w")),
        ({"SeriesDescription": "T2W_SPACE"}, 1, None, ("anat", "T2w")),
        ({"SeriesDescription": "t2_tirm_tra_dark-fluid"}, 1, None, ("anat", "FLAIR")),
        ({"SeriesDescription": "3D FLAIR"}, 1, None, ("anat", "FLAIR")),
        ({"SeriesDescription": "t2*_gre"}, 1, None, ("anat", "T2starw")),
        ({"SeriesDescription": "ep2d_diff_mddw", **EPI}, 30, [0, 1000, 1000], ("dwi", "dwi")),
        ({"SeriesDescription": "ep2d_bold_rest", **EPI}, 200, None, ("func", "bold")),
        ({"SeriesDescription": "cor_asc_35sl", **EPI}, 2, None, ("func", "bold")),
        ({"ProtocolName": "anat-T1w_acq-tfl"}, 1, None, ("anat", "T1w")),
        ({"ProtocolName": "func_task-nback_run-02"}, 150, None, ("func", "bold")),
        # names say nothing: contrast from the acquisition parameters
        ({"EchoTime": 0.003, "RepetitionTime": 0.008}, 1, None, ("anat", "T1w")),
        (
            {"EchoTime": 0.003, "RepetitionTime": 2.3, "InversionTime": 0.9},
            1,
            None,
            ("anat", "T1w"),
        ),
        ({"EchoTime": 0.1, "RepetitionTime": 5.0}, 1, None, ("anat", "T2w")),
        (
            {"EchoTime": 0.1, "RepetitionTime": 9.0, "InversionTime": 2.5},
            1,
            None,
            ("anat", "FLAIR"),
        ),
        # never data: localizers, derived maps, one EPI volume, unknown contrast
        ({"SeriesDescription": "AAHead_Scout_64ch"}, 1, None, None),
        (
            {"SeriesDescription": "localizer", "EchoTime": 0.003, "RepetitionTime": 0.008},
            1,
            None,
            None,
        ),
        (
            {"SeriesDescription": "t1_mprage", "ImageType": ["DERIVED", "PRIMARY", "MPR"]},
            1,
            None,
            None,
        ),
        ({"SeriesDescription": "ep2d_diff_ADC"}, 1, None, None),
        ({"SeriesDescription": "dwi_no_bvals", **EPI}, 30, None, None),
        ({"SeriesDescription": "epi_single", **EPI}, 1, None, None),
        ({"SeriesDescription": "mystery", "EchoTime": 0.03, "RepetitionTime": 1.0}, 1, None, None),
        ({"Modality": "CT", "SeriesDescription": "t1"}, 1, None, None),
    ],
)
def test_default_heuristic(sidecar, n_volumes, bvals, expected) -> None:
    target = default_heuristic(sidecar, n_volumes=n_volumes, bvals=bvals)
    if expected is None:
        assert target is None
    else:
        assert target is not None and (target.datatype, target.suffix) == expected


def test_default_heuristic_entities_and_task() -> None:
    t = default_heuristic({"ProtocolName": "func_task-nback_acq-mb4_run-02"}, n_volumes=150)
    assert t.entities == {"task": "nback", "acq": "mb4"}  # runs are numbered by mriflow
    assert t.sidecar_changes == {"TaskName": "nback"}
    t = default_heuristic({"SeriesDescription": "rsfMRI rest", **EPI}, n_volumes=100)
    assert t.entities == {"task": "rest"}
    t = default_heuristic({"ProtocolName": "cor_asc_35sl", **EPI}, n_volumes=2)
    assert t.entities == {"task": "corasc35sl"} and t.sidecar_changes["TaskName"] == "corasc35sl"
    with pytest.raises(ValueError, match="n_volumes must be >= 1"):
        default_heuristic({}, n_volumes=0)


def test_bids_basename_orders_entities() -> None:
    target = BidsTarget("func", "bold", {"run": "2", "echo": "1", "task": "rest", "acq": "mb"})
    assert bids_basename("01", "pre", target) == "sub-01_ses-pre_task-rest_acq-mb_run-2_echo-1_bold"
    with pytest.raises(HeuristicError, match="unknown BIDS entities"):
        bids_basename("01", None, BidsTarget("anat", "T1w", {"foo": "x"}))


def test_make_unique_adds_acq_then_run() -> None:
    t1 = BidsTarget("anat", "T1w")
    items = [(t1, "mprage", (3,)), (t1, "mprage", (1,)), (t1, "spgr", (2,))]
    names = [bids_basename("01", None, t) for t in make_unique(items)]
    assert names == [
        "sub-01_acq-mprage_run-2_T1w",
        "sub-01_acq-mprage_run-1_T1w",
        "sub-01_acq-spgr_T1w",
    ]
    # dcm2bids configs only get runs
    names = [bids_basename("01", None, t) for t in make_unique(items, add_acq=False)]
    assert names == ["sub-01_run-3_T1w", "sub-01_run-1_T1w", "sub-01_run-2_T1w"]
    # a unique name is left alone
    assert make_unique([(t1, "x", (1,))]) == [t1]


# --------------------------------------------------------------------------- dcm2bids configs


def _config(tmp_path: Path, cfg: dict) -> Path:
    path = tmp_path / "dcm2bids_config.json"
    path.write_text(json.dumps(cfg))
    return path


def test_dcm2bids_criteria_semantics(tmp_path: Path) -> None:
    cfg = load_dcm2bids_config(
        _config(
            tmp_path,
            {
                "case_sensitive": False,
                "extractors": {"SeriesDescription": ["task-(?P<task>[a-zA-Z0-9]+)"]},
                "descriptions": [
                    {
                        "id": "t1",
                        "dataType": "anat",
                        "modalityLabel": "T1w",
                        "criteria": {
                            "SeriesDescription": "*mprage*",
                            "ImageType": ["ORIGINAL", "PRIMARY", "*"],
                            "EchoTime": {"lt": 0.01},
                        },
                    },
                    {
                        "id": "bold",
                        "datatype": "func",
                        "suffix": "bold",
                        "custom_entities": ["task", "acq-mb"],
                        "criteria": {
                            "SeriesDescription": {"any": ["*bold*", "*fmri*"]},
                            "RepetitionTime": {"btwe": [0.5, 3.0]},
                        },
                    },
                ],
            },
        )
    )
    t1 = {"SeriesDescription": "T1_MPRAGE", "ImageType": ["ORIGINAL", "PRIMARY", "M"]}
    target, ids = cfg.match({**t1, "EchoTime": 0.003})
    assert ids == ["t1"] and (target.datatype, target.suffix) == ("anat", "T1w")
    assert cfg.match({**t1, "EchoTime": 0.03})[0] is None  # lt fails
    assert cfg.match({**t1, "ImageType": ["ORIGINAL", "PRIMARY"], "EchoTime": 0.003})[0] is None
    bold, _ = cfg.match({"SeriesDescription": "fmri_task-nback", "RepetitionTime": 3.0})
    assert bold.entities == {"task": "nback", "acq": "mb"}
    assert bold.sidecar_changes["TaskName"] == "nback"
    assert cfg.match({"SeriesDescription": "fmri_task-nback", "RepetitionTime": 3.5})[0] is None


def test_dcm2bids_regex_and_case(tmp_path: Path) -> None:
    desc = [{"datatype": "anat", "suffix": "T2w", "criteria": {"ProtocolName": "T2.*SPACE$"}}]
    cfg = load_dcm2bids_config(_config(tmp_path, {"search_method": "re", "descriptions": desc}))
    assert cfg.match({"ProtocolName": "T2_SPACE"})[0] is not None
    assert cfg.match({"ProtocolName": "t2_space"})[0] is None  # case-sensitive by default
    assert cfg.match({"ProtocolName": "T2_SPACE_ND"})[0] is None


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json", "not a readable JSON dcm2bids config"),
        ("[]", "a JSON object with a 'descriptions' list"),
        ('{"descriptions": [{"suffix": "T1w", "criteria": {"a": "b"}}]}', "needs 'datatype'"),
        ('{"descriptions": [{"datatype": "anat", "suffix": "T1w"}]}', "non-empty 'criteria'"),
        (
            '{"descriptions": [{"datatype": "anat", "suffix": "T1w", '
            '"criteria": {"E": {"eq": 1}}}]}',
            "criterion 'E' must be",
        ),
        ('{"search_method": "glob", "descriptions": []}', "search_method must be"),
    ],
)
def test_dcm2bids_config_errors_name_the_file(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(HeuristicError, match=message) as exc:
        load_dcm2bids_config(path)
    assert str(path) in str(exc.value)
    with pytest.raises(HeuristicError, match="heuristic file not found"):
        load_dcm2bids_config(tmp_path / "missing.json")


# --------------------------------------------------------------------------- de-identification


def _dataset(**kw) -> pydicom.Dataset:
    ds = pydicom.Dataset()
    for k, v in kw.items():
        setattr(ds, k, v)
    return ds


def test_collect_phi_values_and_matching() -> None:
    ds = _dataset(
        PatientName="Doe^Jonathan",
        PatientID="ID1",
        PatientBirthDate="19450317",
        InstitutionName="Mercy General",
        SeriesInstanceUID="1.2.3.4.5",
    )
    phi = collect_phi_values([ds])
    assert {"Doe^Jonathan", "Doe", "Jonathan", "ID1", "1945-03-17", "Mercy General"} <= phi
    assert "1.2.3.4.5" in phi
    assert contains_phi("scan of jonathan, left", phi)
    assert contains_phi("t1_DOE_sag", phi)  # underscores separate words
    assert not contains_phi("Doest", phi)  # whole words only
    assert not contains_phi("t1_mprage", phi)


def test_deidentify_sidecar_removes_keys_and_phi_values() -> None:
    sidecar = {
        "PatientName": "Doe^Jonathan",
        "PatientPosition": "HFS",
        "InstitutionName": "Mercy",
        "StationName": "MR1",
        "DeviceSerialNumber": "123",
        "SeriesInstanceUID": "1.2.3",
        "AcquisitionDateTime": "2023-04-15T10:11:12",
        "StudyDescription": "Research for Jonathan",
        "ImageComments": "anything",
        "SeriesDescription": "t1_mprage",
        "EchoTime": 0.003,
        "ImageType": ["ORIGINAL", "PRIMARY", "HFS"],
    }
    # PatientName "HFS" must not remove the coded PatientPosition "HFS".
    phi = collect_phi_values([_dataset(PatientName="HFS", OperatorsName="Jonathan")])
    clean, removed = deidentify_sidecar(sidecar, phi)
    assert clean == {
        "PatientPosition": "HFS",
        "SeriesDescription": "t1_mprage",
        "EchoTime": 0.003,
        "ImageType": ["ORIGINAL", "PRIMARY", "HFS"],
    }
    assert "StudyDescription" in removed and "AcquisitionDateTime" in removed
    assert sidecar["PatientName"] == "Doe^Jonathan"  # input untouched
    acquired = dt.datetime(2023, 4, 15, 10, 11, 12)
    shifted, _ = deidentify_sidecar(sidecar, phi, acquired=acquired, date_shift_days=30)
    assert shifted["AcquisitionDateTime"] == "2023-03-16T10:11:12"


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        (
            {"AcquisitionDateTime": "20230415101112.25"},
            dt.datetime(2023, 4, 15, 10, 11, 12, 250000),
        ),
        (
            {"AcquisitionDate": "20230415", "AcquisitionTime": "0910"},
            dt.datetime(2023, 4, 15, 9, 10),
        ),
        ({"StudyDate": "20230415"}, dt.datetime(2023, 4, 15)),
        ({"StudyDate": "2023x"}, None),
        ({}, None),
    ],
)
@pytest.mark.filterwarnings("ignore:Invalid value for VR DA")
def test_acquisition_datetime(fields, expected) -> None:
    assert acquisition_datetime(_dataset(**fields)) == expected


def _nifti_with_text(path: Path, *, slope: float = 2.0) -> np.ndarray:
    data = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    img = nib.Nifti1Image(data, np.diag([1.5, 2.0, 2.5, 1.0]))
    img.header["descrip"] = b"TE=30;Time=101112;Doe"
    img.header["aux_file"] = b"Jonathan"
    img.header["db_name"] = b"dbname"
    img.header["intent_name"] = b"intent"
    img.header.extensions.append(nib.nifti1.Nifti1Extension(6, b"Patient Doe^Jonathan"))
    img.header.set_slope_inter(slope, 1.0)
    nib.save(img, str(path))
    return data


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_scrub_nifti_header_keeps_voxels_and_scaling(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"img{suffix}"
    _nifti_with_text(path)
    before = nib.load(str(path))
    expected = before.get_fdata()
    scrub_nifti_header(path)
    after = nib.load(str(path))
    for field in ("descrip", "aux_file", "db_name", "intent_name"):
        assert after.header[field].item() == b"", field
    assert len(after.header.extensions) == 0
    np.testing.assert_array_equal(after.get_fdata(), expected)
    np.testing.assert_array_equal(after.affine, before.affine)
    raw = path.read_bytes()
    raw = gzip.decompress(raw) if suffix == ".nii.gz" else raw
    assert b"Jonathan" not in raw and b"Doe" not in raw


def test_write_nifti_gz(tmp_path: Path) -> None:
    src = tmp_path / "img.nii"
    _nifti_with_text(src)
    dst = tmp_path / "out.nii.gz"
    write_nifti_gz(src, dst, scrub=False)
    assert nib.load(str(dst)).header["descrip"].item() == b"TE=30;Time=101112;Doe"
    write_nifti_gz(src, dst, scrub=True)
    assert b"Doe" not in gzip.decompress(dst.read_bytes())
    np.testing.assert_array_equal(nib.load(str(dst)).get_fdata(), nib.load(str(src)).get_fdata())
    assert dst.read_bytes()[4:8] == b"\0\0\0\0"  # no time stamp in the gzip header
    with pytest.raises(ValueError, match="not a NIfTI file"):
        bad = tmp_path / "bad.nii"
        bad.write_bytes(b"\0" * 400)
        scrub_nifti_header(bad)


# --------------------------------------------------------------------------- cross-check


def _phantom_img(affine: np.ndarray | None = None) -> nib.Nifti1Image:
    rng = np.random.default_rng(0)
    data = rng.normal(size=(12, 10, 8)).cumsum(axis=0) + np.arange(8)[None, None, :] ** 2
    return nib.Nifti1Image(
        data.astype(np.float32), np.diag([2.0, 2.0, 3.0, 1.0]) if affine is None else affine
    )


def test_compare_images_agree_across_orientations_and_scaling() -> None:
    a = _phantom_img()
    # same voxels stored LAS, different scale and integer type: still the same image
    las = nib.Nifti1Image(
        (np.asanyarray(a.dataobj)[::-1] * 10 + 500).astype(np.int32),
        a.affine @ np.array([[-1, 0, 0, 11], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]]),
    )
    agreement = compare_images(a, las)
    assert agreement.agree and agreement.max_affine_difference_mm < 1e-9
    assert agreement.correlation == pytest.approx(1.0, abs=1e-4)  # int rounding only


def test_compare_images_flags_mirrored_data_and_shape() -> None:
    a = _phantom_img()
    mirrored = nib.Nifti1Image(np.asanyarray(a.dataobj)[:, ::-1].copy(), a.affine)
    agreement = compare_images(a, mirrored)
    assert not agreement.agree and agreement.shape_equal
    assert "posterior-anterior (mirrored)" in agreement.details
    assert agreement.as_sidecar()["Agreement"] is False
    shifted = nib.Nifti1Image(
        np.asanyarray(a.dataobj), a.affine + np.diag([0, 0, 0, 0]) + 0.01 * (np.arange(4) == 3)
    )
    assert "affines differ" in compare_images(a, shifted).details
    smaller = nib.Nifti1Image(np.asanyarray(a.dataobj)[:-1], a.affine)
    result = compare_images(a, smaller)
    assert not result.agree and not result.shape_equal and result.correlation is None
    with pytest.raises(ValueError, match="affine_tolerance_mm must be > 0"):
        compare_images(a, a, affine_tolerance_mm=0)


@settings(max_examples=30, deadline=None)
@given(
    perm=st.permutations([0, 1, 2]),
    flips=st.lists(st.sampled_from([-1, 1]), min_size=3, max_size=3),
    voxel=st.tuples(st.integers(0, 11), st.integers(0, 9), st.integers(0, 7)),
)
def test_reorient_like_keeps_world_coordinates(perm, flips, voxel) -> None:
    """Property: after reorienting to any axis order, a voxel keeps its world position."""
    img = _phantom_img(np.array([[0, 0, 3.0, -5], [2.0, 0, 0, 7], [0, -2.0, 0, 1], [0, 0, 0, 1]]))
    target = np.eye(4)
    target[:3, :3] = np.eye(3)[list(perm)].T * np.array(flips)
    out = reorient_like(img, target)
    assert (
        nib.orientations.io_orientation(out.affine) == nib.orientations.io_orientation(target)
    ).all()
    world = img.affine @ np.array([*voxel, 1.0])
    ijk = np.round(np.linalg.inv(out.affine) @ world).astype(int)[:3]
    assert np.asanyarray(out.dataobj)[tuple(ijk)] == np.asanyarray(img.dataobj)[voxel]


# --------------------------------------------------------------------------- dataset files


def test_dataset_description_and_participants(tmp_path: Path) -> None:
    path = write_dataset_description(tmp_path)
    desc = json.loads(path.read_text())
    assert desc["DatasetType"] == "raw" and desc["GeneratedBy"][0]["Name"] == "mriflow"
    # an existing description is the user's: kept, mriflow added to GeneratedBy once
    path.write_text(json.dumps({"Name": "Mine", "BIDSVersion": "1.8.0", "GeneratedBy": []}))
    write_dataset_description(tmp_path)
    write_dataset_description(tmp_path)
    desc = json.loads(path.read_text())
    assert desc["Name"] == "Mine" and [g["Name"] for g in desc["GeneratedBy"]] == ["mriflow"]

    tsv = tmp_path / "participants.tsv"
    tsv.write_text("participant_id\tage\nsub-02\t30\n")
    update_participants(tmp_path, "01")
    update_participants(tmp_path, "02")
    assert tsv.read_text() == "participant_id\tage\nsub-01\tn/a\nsub-02\t30\n"
    tsv.write_text("id\tage\n")
    with pytest.raises(ValueError, match="first column is participant_id"):
        update_participants(tmp_path, "03")
