"""DICOM to BIDS on synthetic series written with pydicom (no shared data needed).

Covers what real exports rarely let us test on purpose: planted PHI in every
text field, oblique geometry with a known landmark, truncated and non-DICOM
files, DICOMDIR, multi-echo and magnitude/phase series, dcm2bids configs,
the CLI exit codes and series-level atomic writes.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gzip
import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from mriflow.cli.convert import add_convert_arguments, run_convert
from mriflow.dicom import convert as convert_module
from mriflow.dicom.convert import convert_dicom_to_bids

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
UID_ROOT = "1.2.826.0.1.3680043.10.543."  # a private root: planted UIDs are recognisable

# PHI planted in every text field a converter might copy.
PHI = {
    "PatientName": "Zyxwvut^Qwertyuiop",
    "PatientID": "PID8675309X",
    "PatientBirthDate": "19450317",
    "PatientAddress": "42 Plantedstreet Lane Springfield",
    "OtherPatientIDs": "ALTID5551234",
    "PatientAge": "078Y",
    "PatientComments": "Allergic Zyxwvut",
    "InstitutionName": "Saint Plantedfield Hospital",
    "InstitutionAddress": "7 Hospitalplant Road Shelbyville",
    "InstitutionalDepartmentName": "Plantdept Neuroradiology",
    "ReferringPhysicianName": "Refdoctor^Plantwell",
    "PerformingPhysicianName": "Perfdoctor^Plantsome",
    "NameOfPhysiciansReadingStudy": "Readdoctor^Plantmore",
    "PhysiciansOfRecord": "Recdoctor^Plantless",
    "RequestingPhysician": "Reqdoctor^Plantfew",
    "OperatorsName": "Techplanter^Ursula",
    "AccessionNumber": "ACC99887766",
    "StudyID": "STUDY4242",
    "StationName": "STATIONPLANT7",
    "DeviceSerialNumber": "SN77341",
    "ImageComments": "Patient Zyxwvut Qwertyuiop comment",
    "StudyDescription": "Brain for Qwertyuiop",
    "SeriesDescription": "t1_mprage Qwertyuiop",
    "ProtocolName": "t1_mprage_Qwertyuiop",
}
DATE = "20230415"
TIME = "101112.250000"


def _rotation(rx_deg: float, rz_deg: float) -> np.ndarray:
    rx, rz = np.deg2rad(rx_deg), np.deg2rad(rz_deg)
    mx = np.array([[1, 0, 0], [0, np.cos(rx), -np.sin(rx)], [0, np.sin(rx), np.cos(rx)]])
    mz = np.array([[np.cos(rz), -np.sin(rz), 0], [np.sin(rz), np.cos(rz), 0], [0, 0, 1]])
    return mz @ mx


def phantom(rows: int = 20, cols: int = 16, slices: int = 12, seed: int = 0) -> np.ndarray:
    """Asymmetric smooth volume (rows, cols, slices) with noise, uint16."""
    rng = np.random.default_rng(seed)
    r, c, k = np.meshgrid(np.arange(rows), np.arange(cols), np.arange(slices), indexing="ij")
    vol = 200 + 20 * r + 7 * c + 3 * k * k + rng.integers(0, 30, size=r.shape)
    return vol.astype(np.uint16)


def write_series(
    folder: Path,
    *,
    data: np.ndarray | None = None,
    description: str = "t1_mprage",
    series_number: int = 2,
    rotation: np.ndarray | None = None,
    origin: tuple[float, float, float] = (-10.0, -12.0, -8.0),
    pixel_spacing: tuple[float, float] = (1.25, 1.0),
    thickness: float = 1.5,
    te_ms: float = 3.0,
    tr_ms: float = 8.0,
    flip: float = 8.0,
    echo: int | None = None,
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "M", "ND"),
    series_uid: str | None = None,
    study_uid: str | None = None,
    phi: dict[str, str] | None = None,
    prefix: str = "IM",
) -> list[Path]:
    """Write one 3D MR series, one file per slice, as a scanner would (LPS geometry).

    ``data`` is (rows, cols, slices). Returns the file paths.
    """
    data = phantom() if data is None else data
    rows, cols, slices = data.shape
    rot = np.eye(3) if rotation is None else rotation
    row_dir, col_dir = rot[:, 0], rot[:, 1]  # along a row (columns increase), along a column
    normal = np.cross(row_dir, col_dir)
    series_uid = series_uid or generate_uid(prefix=UID_ROOT)
    study_uid = study_uid or generate_uid(prefix=UID_ROOT)
    frame_uid = generate_uid(prefix=UID_ROOT)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(slices):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MR_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = generate_uid(prefix=UID_ROOT)
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = MR_IMAGE_STORAGE
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.Modality = "MR"
        ds.Manufacturer = "ACME"
        ds.ManufacturerModelName = "Phantom3T"
        ds.MagneticFieldStrength = 3
        ds.PatientPosition = "HFS"
        ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = DATE
        ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = TIME
        ds.SeriesDescription = description
        ds.ProtocolName = description
        ds.SeriesNumber = series_number
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = k + 1
        ds.ImageType = list(image_type)
        ds.ScanningSequence = "GR"
        ds.SequenceVariant = "SP"
        ds.MRAcquisitionType = "3D"
        ds.EchoTime = te_ms
        ds.RepetitionTime = tr_ms
        ds.FlipAngle = flip
        if echo is not None:
            ds.EchoNumbers = echo
        ds.SliceThickness = thickness
        ds.SpacingBetweenSlices = thickness
        ds.PixelSpacing = [pixel_spacing[0], pixel_spacing[1]]
        ds.ImageOrientationPatient = [float(round(v, 8)) for v in (*row_dir, *col_dir)]
        position = np.asarray(origin) + k * thickness * normal
        ds.ImagePositionPatient = [float(round(v, 6)) for v in position]
        ds.SliceLocation = float(round(float(position @ normal), 6))
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.PixelData = np.ascontiguousarray(data[:, :, k]).astype("<u2").tobytes()
        for key, value in (phi or {}).items():
            setattr(ds, key, value)
        path = folder / f"{prefix}{k + 1:04d}"  # no extension, as many exports
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def expected_ras(
    voxel_rck: tuple[int, int, int],
    *,
    rotation: np.ndarray,
    origin: tuple[float, float, float],
    pixel_spacing: tuple[float, float],
    thickness: float,
) -> np.ndarray:
    """World (RAS) position of voxel (row, col, slice) straight from the DICOM geometry."""
    r, c, k = voxel_rck
    row_dir, col_dir = rotation[:, 0], rotation[:, 1]
    normal = np.cross(row_dir, col_dir)
    lps = (
        np.asarray(origin)
        + c * pixel_spacing[1] * row_dir
        + r * pixel_spacing[0] * col_dir
        + k * thickness * normal
    )
    return lps * np.array([-1.0, -1.0, 1.0])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mriflow convert")
    add_convert_arguments(parser)
    return parser


def _run_cli(argv: list[str]) -> int:
    return run_convert(_parser().parse_args([str(a) for a in argv]))


def _all_bytes(root: Path) -> list[tuple[Path, bytes]]:
    """Every file under root, gz files also decompressed, plus the paths themselves."""
    out = []
    for path in sorted(root.rglob("*")):
        out.append((path, str(path.relative_to(root)).encode()))
        if path.is_file():
            data = path.read_bytes()
            out.append((path, data))
            if path.name.endswith(".gz"):
                out.append((path, gzip.decompress(data)))
    return out


def _planted_strings(files: list[Path]) -> list[str]:
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    values = set(PHI.values())
    for value in PHI.values():  # person names, and the invented words of every field
        values.update(
            p
            for p in value.replace("^", " ").split()
            if "^" in value or "plant" in p.lower() or p in ("Zyxwvut", "Qwertyuiop")
        )
    values.update({DATE, "2023-04-15", PHI["PatientBirthDate"], "1945-03-17"})
    values.update(
        {
            str(ds.StudyInstanceUID),
            str(ds.SeriesInstanceUID),
            str(ds.FrameOfReferenceUID),
            UID_ROOT.rstrip("."),
        }
    )
    for f in files:
        values.add(str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID))
    return sorted(values)


# --------------------------------------------------------------------------- de-identification


def test_planted_phi_appears_in_no_byte_of_the_output(tmp_path: Path) -> None:
    src = tmp_path / "dicom"
    files = write_series(src / "s2", phi=PHI, series_number=2)
    files += write_series(
        src / "s3",
        phi={**PHI, "SeriesDescription": "localizer Zyxwvut", "ProtocolName": "localizer"},
        series_number=3,
        data=phantom(seed=1),
    )
    out = tmp_path / "bids"
    code = _run_cli([src, out, "--subject", "01", "--keep-unknown"])
    assert code == 0
    # The T1 was recognised from its parameters (its name held PHI and was dropped).
    t1 = out / "sub-01" / "anat" / "sub-01_T1w.nii.gz"
    assert t1.exists()
    assert any((out / "sourcedata").rglob("*.nii.gz")), "the localizer is kept in sourcedata/"
    planted = _planted_strings(files)
    assert len(planted) > 30
    for path, data in _all_bytes(out):
        low = data.lower()
        for value in planted:
            assert value.lower().encode() not in low, f"PHI {value!r} found in {path}"
    hdr = nib.load(t1).header
    for field in ("descrip", "aux_file", "db_name", "intent_name"):
        assert hdr[field].item() == b"", field
    sidecar = json.loads(t1.with_suffix("").with_suffix(".json").read_text())
    assert sidecar["EchoTime"] == pytest.approx(0.003) and sidecar["FlipAngle"] == 8
    assert "AcquisitionDateTime" not in sidecar


def test_keep_phi_keeps_it_so_the_phi_test_can_fail(tmp_path: Path) -> None:
    src = tmp_path / "dicom"
    write_series(src, phi=PHI)
    out = tmp_path / "bids"
    assert _run_cli([src, out, "--subject", "01", "--keep-phi"]) == 0
    blob = b"".join(data for _, data in _all_bytes(out))
    assert b"Qwertyuiop" in blob and PHI["InstitutionName"].encode() in blob


def test_date_shift_keeps_shifted_acquisition_datetime(tmp_path: Path) -> None:
    src = tmp_path / "dicom"
    write_series(src, phi=PHI)
    out = tmp_path / "bids"
    assert _run_cli([src, out, "--subject", "01", "--date-shift", "1000"]) == 0
    (sidecar_path,) = out.rglob("*_T1w.json")
    sidecar = json.loads(sidecar_path.read_text())
    expected = dt.datetime(2023, 4, 15, 10, 11, 12, 250000) - dt.timedelta(days=1000)
    assert sidecar["AcquisitionDateTime"] == expected.isoformat()
    assert b"2023-04-15" not in sidecar_path.read_bytes()


# --------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("converter", ["dcm2niix", "dicom2nifti"])
def test_oblique_3d_series_keeps_world_coordinates(tmp_path: Path, converter: str) -> None:
    rotation = _rotation(20.0, 12.0)
    geometry = dict(
        rotation=rotation, origin=(-11.5, 30.25, -7.0), pixel_spacing=(1.25, 1.0), thickness=1.5
    )
    data = phantom()
    landmark = (13, 4, 9)  # row, col, slice: an asymmetric spot
    data[landmark] = 4000
    write_series(tmp_path / "dicom", data=data, **geometry)
    report = convert_dicom_to_bids(
        tmp_path / "dicom", tmp_path / "bids", subject="01", converter=converter
    )
    assert report.ok
    (outcome,) = report.outcomes
    check = outcome.checks[0]
    assert check["Status"] == "agree", check
    (nifti,) = [p for p in outcome.outputs if p.name.endswith(".nii.gz")]
    img = nib.load(nifti)
    arr = np.asanyarray(img.dataobj)
    assert sorted(arr.shape) == sorted(data.shape)
    vox = np.unravel_index(int(np.argmax(arr)), arr.shape)
    world = img.affine @ np.array([*vox, 1.0])
    np.testing.assert_allclose(world[:3], expected_ras(landmark, **geometry), atol=1e-3)
    # The affine is oblique, with the DICOM voxel sizes.
    np.testing.assert_allclose(
        sorted(nib.affines.voxel_sizes(img.affine)), [1.0, 1.25, 1.5], atol=1e-4
    )
    rot = img.affine[:3, :3] / nib.affines.voxel_sizes(img.affine)
    assert np.max(np.abs(np.abs(rot) - np.round(np.abs(rot)))) > 0.1  # really oblique


def test_cross_check_detects_a_mirrored_conversion(tmp_path: Path, monkeypatch) -> None:
    """If the secondary converter mirrors the data, the warning names the series."""
    write_series(tmp_path / "dicom", description="t1_mprage")
    real = convert_module.run_dicom2nifti

    def mirrored(files, out_file):
        img = real(files, out_file)
        return nib.Nifti1Image(np.asanyarray(img.dataobj)[::-1].copy(), img.affine)

    monkeypatch.setattr(convert_module, "run_dicom2nifti", mirrored)
    records = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logging.getLogger("mriflow.dicom").addHandler(handler)
    try:
        report = convert_dicom_to_bids(tmp_path / "dicom", tmp_path / "bids", subject="01")
    finally:
        logging.getLogger("mriflow.dicom").removeHandler(handler)
    (outcome,) = report.outcomes
    assert outcome.status == "converted" and report.disagreements == [outcome]
    messages = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert any("CONVERTERS DISAGREE" in m and "series 2 't1_mprage'" in m for m in messages)
    assert "mirrored" in outcome.checks[0]["Details"]


# --------------------------------------------------------------------------- broken inputs


def test_truncated_file_fails_its_series_by_name_and_others_convert(tmp_path: Path, capsys) -> None:
    src = tmp_path / "dicom"
    write_series(src / "good", series_number=2, description="t1_mprage")
    bad = write_series(src / "bad", series_number=3, description="t2_tse", te_ms=90, tr_ms=4000)
    cut = bad[4]
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size - 100])
    out = tmp_path / "bids"
    assert _run_cli([src, out, "--subject", "01"]) == 1
    captured = capsys.readouterr()
    assert "FAILED   series 3 't2_tse'" in captured.out
    assert str(cut) in captured.out and "truncated" in captured.out
    # The good series is there, the broken one left nothing, and no staging folder remains.
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == [
        "dataset_description.json",
        "participants.tsv",
        "sub-01/anat/sub-01_T1w.json",
        "sub-01/anat/sub-01_T1w.nii.gz",
    ]
    assert not list(out.glob(".mriflow-staging-*"))


def test_file_with_broken_header_is_reported_by_name(tmp_path: Path, capsys) -> None:
    src = tmp_path / "dicom"
    files = write_series(src, series_number=2)
    broken = src / "broken.dcm"
    broken.write_bytes(files[0].read_bytes()[:400])  # preamble and a few tags only
    assert _run_cli([src, tmp_path / "bids", "--subject", "01"]) == 1
    out = capsys.readouterr().out
    assert str(broken) in out and "FAILED" in out


def test_non_dicom_files_skipped_with_one_warning_each(tmp_path: Path, caplog) -> None:
    src = tmp_path / "dicom"
    write_series(src / "series", series_number=2)
    (src / "notes.txt").write_text("scan went fine\n")
    (src / "series" / "screenshot.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(300))
    (src / "empty").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="mriflow.dicom"):
        report = convert_dicom_to_bids(src, tmp_path / "bids", subject="01")
    assert report.ok and len(report.converted) == 1
    skipped = [r.getMessage() for r in caplog.records if "not a DICOM file" in r.getMessage()]
    assert sorted(skipped) == sorted(
        f"Skipping {p}: not a DICOM file"
        for p in (src / "notes.txt", src / "series" / "screenshot.png", src / "empty")
    )


def test_dicomdir_export_is_read(tmp_path: Path, caplog) -> None:
    from pydicom.fileset import FileSet

    staging = tmp_path / "plain"
    files = write_series(staging, phi={"PatientID": "P1", "PatientName": "Anon", "StudyID": "1"})
    fs = FileSet()
    for f in files:
        fs.add(f)
    export = tmp_path / "export"
    fs.write(export)
    assert (export / "DICOMDIR").exists()
    with caplog.at_level(logging.WARNING, logger="mriflow.dicom"):
        report = convert_dicom_to_bids(export, tmp_path / "bids", subject="01")
    assert report.ok and len(report.converted) == 1
    assert not [r for r in caplog.records if "DICOMDIR" in r.getMessage()]


# --------------------------------------------------------------------------- grouping, naming


def test_multi_echo_and_phase_series_are_split_and_named(tmp_path: Path) -> None:
    src = tmp_path / "dicom"
    uid = generate_uid(prefix=UID_ROOT)
    study = generate_uid(prefix=UID_ROOT)
    common = dict(series_uid=uid, study_uid=study, series_number=5, description="t1_gre_me")
    write_series(src, echo=1, te_ms=3.0, prefix="E1M", **common)
    write_series(src, echo=2, te_ms=6.0, prefix="E2M", data=phantom(seed=2), **common)
    write_series(
        src,
        echo=1,
        te_ms=3.0,
        prefix="E1P",
        data=phantom(seed=3),
        image_type=("ORIGINAL", "PRIMARY", "P", "ND"),
        **common,
    )
    report = convert_dicom_to_bids(src, tmp_path / "bids", subject="01")
    assert report.ok and len(report.outcomes) == 3
    names = sorted(n for o in report.outcomes for n in o.names)
    assert names == [
        "sub-01_echo-1_part-mag_T1w",
        "sub-01_echo-1_part-phase_T1w",
        "sub-01_echo-2_part-mag_T1w",
    ]
    echo2 = json.loads((tmp_path / "bids/sub-01/anat/sub-01_echo-2_part-mag_T1w.json").read_text())
    assert echo2["EchoTime"] == pytest.approx(0.006)


def test_repeats_get_runs_and_different_protocols_get_acq(tmp_path: Path) -> None:
    src = tmp_path / "dicom"
    write_series(src / "a", series_number=2, description="t1_mprage")
    write_series(src / "b", series_number=4, description="t1_mprage", data=phantom(seed=4))
    write_series(src / "c", series_number=3, description="t1_spgr", data=phantom(seed=5))
    report = convert_dicom_to_bids(src, tmp_path / "bids", subject="01", session="pre")
    by_number = {o.series.series_number: o.names for o in report.outcomes}
    assert by_number == {
        2: ["sub-01_ses-pre_acq-t1mprage_run-1_T1w"],
        3: ["sub-01_ses-pre_acq-t1spgr_T1w"],
        4: ["sub-01_ses-pre_acq-t1mprage_run-2_T1w"],
    }


def test_dcm2bids_config_names_series(tmp_path: Path) -> None:
    src = tmp_path / "dicom"
    write_series(src / "t1", series_number=2, description="T1_MPRAGE")
    write_series(
        src / "t2",
        series_number=3,
        description="T2_SPACE",
        te_ms=400,
        tr_ms=3200,
        data=phantom(seed=6),
    )
    write_series(src / "loc", series_number=1, description="AAHead_Scout", data=phantom(seed=7))
    config = {
        "descriptions": [
            {"datatype": "anat", "suffix": "T1w", "criteria": {"SeriesDescription": "*MPRAGE*"}},
            {
                "id": "t2",
                "datatype": "anat",
                "suffix": "T2w",
                "custom_entities": "acq-space",
                "criteria": {
                    "SeriesDescription": "T2_*",
                    "EchoTime": {"btwe": [0.1, 0.5]},
                    "ImageType": ["ORIGINAL", "PRIMARY", "M", "ND", "MAGNITUDE"],
                },
                "sidecar_changes": {"Note": "from config"},
            },
        ]
    }
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(config))
    out = tmp_path / "bids"
    assert _run_cli([src, out, "--subject", "01", "--heuristic", cfg]) == 0
    assert (out / "sub-01/anat/sub-01_T1w.nii.gz").exists()
    t2 = json.loads((out / "sub-01/anat/sub-01_acq-space_T2w.json").read_text())
    assert t2["Note"] == "from config"
    assert len(list(out.rglob("*.nii.gz"))) == 2  # the scout matches nothing: left out

    # A series matching two descriptions is ambiguous and left out, as dcm2bids does.
    config["descriptions"].append(
        {"datatype": "anat", "suffix": "PDw", "criteria": {"SeriesDescription": "T1*"}}
    )
    cfg.write_text(json.dumps(config))
    report = convert_dicom_to_bids(src, tmp_path / "bids2", subject="01", heuristic=cfg)
    statuses = {o.series.series_number: o.status for o in report.outcomes}
    assert statuses == {1: "unknown", 2: "ambiguous", 3: "converted"}


# --------------------------------------------------------------------------- CLI, atomicity


def test_cli_usage_errors_exit_2(tmp_path: Path, capsys) -> None:
    src = tmp_path / "dicom"
    write_series(src)
    assert _run_cli([tmp_path / "missing", tmp_path / "b", "--subject", "01"]) == 2
    assert "missing: DICOM folder not found" in capsys.readouterr().err
    assert _run_cli([src, tmp_path / "b", "--subject", "0-1"]) == 2
    assert "letters and digits" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text('{"descriptions": [{"datatype": "anat", "criteria": {}}]}')
    assert _run_cli([src, tmp_path / "b", "--subject", "01", "--heuristic", bad]) == 2
    assert "bad.json: descriptions[0]: needs 'datatype' and 'suffix'" in capsys.readouterr().err
    assert (
        _run_cli([src, tmp_path / "b", "--subject", "01", "--keep-phi", "--date-shift", "3"]) == 2
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("nothing here")
    assert _run_cli([empty, tmp_path / "b", "--subject", "01"]) == 2
    assert "no DICOM images found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        _parser().parse_args([str(src), str(tmp_path / "b")])  # --subject is required
    assert exc.value.code == 2
    assert not (tmp_path / "b").exists()


def test_existing_output_is_kept_unless_overwrite(tmp_path: Path) -> None:
    src = tmp_path / "dicom"
    write_series(src)
    out = tmp_path / "bids"
    assert _run_cli([src, out, "--subject", "01"]) == 0
    t1 = out / "sub-01" / "anat" / "sub-01_T1w.nii.gz"
    before = t1.read_bytes()
    assert _run_cli([src, out, "--subject", "01"]) == 1
    assert t1.read_bytes() == before
    assert _run_cli([src, out, "--subject", "01", "--overwrite", "--no-verify"]) == 0
    sidecar = json.loads(t1.with_suffix("").with_suffix(".json").read_text())
    assert sidecar["ConversionCheck"]["Status"] == "skipped"


def test_series_write_is_atomic(tmp_path: Path, monkeypatch) -> None:
    """A failure while writing one series leaves none of its files; others are complete."""
    src = tmp_path / "dicom"
    write_series(src / "a", series_number=2, description="t1_mprage")
    write_series(
        src / "b", series_number=3, description="t2_tse", te_ms=90, tr_ms=4000, data=phantom(seed=8)
    )
    real = convert_module.write_nifti_gz

    def failing(source, target, **kwargs):
        if "T2w" in Path(target).name:
            Path(target).write_bytes(b"half a file")
            raise OSError("disk full (simulated)")
        return real(source, target, **kwargs)

    monkeypatch.setattr(convert_module, "write_nifti_gz", failing)
    out = tmp_path / "bids"
    report = convert_dicom_to_bids(src, out, subject="01")
    assert [o.status for o in report.outcomes] == ["converted", "failed"]
    assert "disk full (simulated)" in report.outcomes[1].reason
    names = sorted(p.name for p in out.rglob("*") if p.is_file())
    assert names == [
        "dataset_description.json",
        "participants.tsv",
        "sub-01_T1w.json",
        "sub-01_T1w.nii.gz",
    ]
    assert not list(out.glob(".mriflow-staging-*"))


def _write_dwi(folder: Path) -> None:
    series_uid, study_uid = generate_uid(prefix=UID_ROOT), generate_uid(prefix=UID_ROOT)
    directions = [(0, (0.0, 0.0, 0.0)), (1000, (1.0, 0.0, 0.0)), (1000, (0.0, 0.6, 0.8))]
    for v, (bval, gradient) in enumerate(directions):
        files = write_series(
            folder,
            data=phantom(seed=10 + v),
            series_uid=series_uid,
            study_uid=study_uid,
            description="ep2d_diff_3dir",
            prefix=f"V{v}_",
            te_ms=80,
            tr_ms=5000,
        )
        for k, path in enumerate(files):
            ds = pydicom.dcmread(path)
            ds.ScanningSequence = "EP"
            ds.DiffusionBValue = float(bval)
            ds.DiffusionGradientOrientation = list(gradient)
            ds.AcquisitionNumber = v + 1
            ds.InstanceNumber = 100 * v + k + 1
            ds.save_as(path)


def test_dwi_series_gets_bval_bvec_with_either_converter(tmp_path: Path) -> None:
    _write_dwi(tmp_path / "dicom")
    outputs = {}
    for converter in ("dcm2niix", "dicom2nifti"):
        out = tmp_path / converter
        report = convert_dicom_to_bids(tmp_path / "dicom", out, subject="01", converter=converter)
        assert report.ok, [o.reason for o in report.outcomes]
        stem = out / "sub-01" / "dwi" / "sub-01_dwi"
        assert [float(b) for b in stem.with_suffix(".bval").read_text().split()] == [0, 1000, 1000]
        bvec = np.loadtxt(stem.with_suffix(".bvec"))
        assert bvec.shape == (3, 3)
        np.testing.assert_allclose(np.linalg.norm(bvec[:, 1:], axis=0), 1.0, atol=1e-4)
        img = nib.load(str(stem.with_suffix(".nii.gz")))
        assert img.shape == (16, 20, 12, 3)
        outputs[converter] = (img, bvec)
    # dicom2nifti's image is stored in dcm2niix's voxel order, so dcm2niix's bvecs apply to it.
    a, b = outputs["dcm2niix"], outputs["dicom2nifti"]
    np.testing.assert_allclose(a[0].affine, b[0].affine, atol=1e-4)
    np.testing.assert_array_equal(np.asanyarray(a[0].dataobj), np.asanyarray(b[0].dataobj))
    np.testing.assert_array_equal(a[1], b[1])


def test_files_without_preamble_are_read_and_text_files_are_not(tmp_path: Path) -> None:
    from mriflow.dicom.scan import read_dicom_file, scan_dicom_dir

    files = write_series(tmp_path / "s")
    for path in files:  # old exports: no 128-byte preamble and no "DICM" marker
        path.write_bytes(path.read_bytes()[132:])
    assert read_dicom_file(files[0]) is not None
    (tmp_path / "s" / "log.txt").write_text("\x08\x00 looks like a tag but is text\n")
    scan = scan_dicom_dir(tmp_path)
    assert [len(s.files) for s in scan.series] == [len(files)]
    assert [p.path.name for p in scan.skipped] == ["log.txt"]
