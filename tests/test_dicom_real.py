"""DICOM to BIDS on real scanner data, checked against dcm2niix reference conversions.

Needs ../shared/data/dicom (skips when absent). The three folders are
converted once per module (about 15 s together) and every test reads the result.
"""

from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from mriflow.dicom.convert import ConversionReport, convert_dicom_to_bids
from mriflow.dicom.converters import dcm2niix_binary

pytestmark = pytest.mark.data

# dcm2niix's reference conversions of siemens_orientation/, named <protocol>_<series number>.
REFERENCES = [
    "ax_asc_35sl_6",
    "ax_desc_35sl_7",
    "ax_int_35sl_8",
    "ax_asc_36sl_9",
    "ax_desc_36sl_10",
    "ax_asc_36sl_11",
    "ax_int_36sl_12",
    "cor_asc_36sl_13",
    "cor_desc_36sl_14",
    "cor_int_36sl_15",
    "cor_asc_35sl_16",
    "cor_desc_35sl_17",
    "cor_int_35sl_18",
    "sag_asc_36sl_19",
    "sag_desc_36sl_20",
    "sag_int_36sl_21",
    "sag_asc_35sl_22",
    "sag_desc_35sl_23",
    "sag_int_35sl_24",
    "fMRI_MB_asc_25",
    "fMRI_MB_int_26",
]


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _convert(src: Path, out: Path, **kwargs) -> tuple[ConversionReport, list[str]]:
    handler = _Records()
    log = logging.getLogger("mriflow.dicom")
    log.addHandler(handler)
    try:
        report = convert_dicom_to_bids(src, out, **kwargs)
    finally:
        log.removeHandler(handler)
    return report, [f"{r.levelname} {r.getMessage()}" for r in handler.records]


@pytest.fixture(scope="module")
def siemens(data_dir: Path, tmp_path_factory) -> dict:
    src = data_dir / "dicom" / "siemens_orientation"
    if not src.is_dir():
        pytest.skip(f"{src} not found")
    out = tmp_path_factory.mktemp("bids") / "rawdata"
    report, messages = _convert(src, out, subject="01")
    return {"src": src, "out": out, "report": report, "messages": messages}


@pytest.fixture(scope="module")
def anat(data_dir: Path, siemens: dict) -> dict:
    """decubitus_t1 (sub-02, ses-pos) and xa30 (sub-03) converted into the same dataset."""
    out = siemens["out"]
    deco, deco_msgs = _convert(
        data_dir / "dicom" / "decubitus_t1", out, subject="02", session="pos"
    )
    xa30, xa30_msgs = _convert(data_dir / "dicom" / "xa30_t1w_enhanced", out, subject="03")
    return {"out": out, "decubitus": deco, "xa30": xa30, "messages": deco_msgs + xa30_msgs}


def _outcome(report: ConversionReport, series_number: int):
    hits = [o for o in report.outcomes if o.series.series_number == series_number]
    assert len(hits) == 1, f"expected one series {series_number}, got {len(hits)}"
    return hits[0]


def _nifti(outcome) -> Path:
    niftis = [p for p in outcome.outputs if p.name.endswith(".nii.gz")]
    assert len(niftis) == 1, outcome.outputs
    return niftis[0]


def _assert_same_image(ours: Path, ref: Path) -> None:
    a = nib.as_closest_canonical(nib.load(ours))
    b = nib.as_closest_canonical(nib.load(ref))
    assert a.shape == b.shape
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-3)
    np.testing.assert_array_equal(np.asanyarray(a.dataobj), np.asanyarray(b.dataobj))


@pytest.mark.parametrize("ref_name", REFERENCES)
def test_series_matches_dcm2niix_reference(siemens: dict, ref_name: str) -> None:
    ref_dir = siemens["src"] / "reference"
    outcome = _outcome(siemens["report"], int(ref_name.rsplit("_", 1)[1]))
    assert outcome.status == "converted", outcome.reason
    ours = _nifti(outcome)
    _assert_same_image(ours, ref_dir / f"{ref_name}.nii.gz")

    sidecar = json.loads(ours.with_name(ours.name.replace(".nii.gz", ".json")).read_text())
    reference = json.loads((ref_dir / f"{ref_name}.json").read_text())
    for key in ("RepetitionTime", "EchoTime", "FlipAngle", "SliceTiming", "PhaseEncodingDirection"):
        assert sidecar[key] == reference[key], key
    # A BIDS bold file: in func/, with the TaskName its task entity says.
    assert ours.parent.name == "func" and ours.name.endswith("_bold.nii.gz")
    assert f"task-{sidecar['TaskName']}_" in ours.name


@pytest.mark.parametrize("ref_name", REFERENCES)
def test_cross_check_flags_mirrored_mosaics(siemens: dict, ref_name: str) -> None:
    """dicom2nifti mirrors coronal and sagittal Siemens mosaics: the cross-check must say so."""
    outcome = _outcome(siemens["report"], int(ref_name.rsplit("_", 1)[1]))
    sidecar = json.loads(_nifti(outcome).with_suffix("").with_suffix(".json").read_text())
    check = sidecar["ConversionCheck"]
    warnings = [
        m
        for m in siemens["messages"]
        if m.startswith("WARNING CONVERTERS DISAGREE") and outcome.series.label in m
    ]
    if ref_name.startswith(("cor", "sag")):
        assert check["Status"] == "disagree"
        assert check["Correlation"] < 0.9
        assert "mirrored" in check["Details"]
        assert len(warnings) == 1
    else:
        assert check["Status"] == "agree"
        assert check["Correlation"] > 0.999 and check["MaxAffineDifferenceMm"] < 1e-3
        assert not warnings


def test_non_dicom_files_skipped_with_one_warning_each(siemens: dict) -> None:
    # The real export has a stray NIfTI next to the DICOM files of ax/axasc35.
    stray = siemens["src"] / "ax" / "axasc35" / "6_ax_asc_35sl.nii"
    skipped = {p.path for p in siemens["report"].skipped_files}
    assert stray in skipped
    lines = [m for m in siemens["messages"] if str(stray) in m]
    assert lines == [f"WARNING Skipping {stray}: not a DICOM file"]
    assert siemens["report"].ok
    assert len(siemens["report"].converted) == len(REFERENCES)


def test_xa30_enhanced_multiframe_matches_reference(anat: dict, data_dir: Path) -> None:
    ref_dir = data_dir / "dicom" / "xa30_t1w_enhanced" / "Ref"
    (outcome,) = anat["xa30"].outcomes
    assert outcome.status == "converted"
    ours = _nifti(outcome)
    assert ours.relative_to(anat["out"]).as_posix() == "sub-03/anat/sub-03_acq-tfl_T1w.nii.gz"
    _assert_same_image(ours, ref_dir / "5_anat-T1w_acq-tfl.nii")
    sidecar = json.loads(ours.with_suffix("").with_suffix(".json").read_text())
    reference = json.loads((ref_dir / "5_anat-T1w_acq-tfl.json").read_text())
    for key in ("RepetitionTime", "EchoTime", "FlipAngle", "InversionTime"):
        assert sidecar[key] == reference[key], key
    assert sidecar["ConversionCheck"]["Status"] == "agree"


@pytest.mark.parametrize("position", ["HFS", "HFDL"])
def test_decubitus_t1_found_and_matches_dcm2niix(
    anat: dict, data_dir: Path, tmp_path: Path, position: str
) -> None:
    src = data_dir / "dicom" / "decubitus_t1"
    report = anat["decubitus"]
    assert len(report.outcomes) == 2 and report.ok
    reference = json.loads((src / "reference" / f"t1_fl2d_sag_{position}.json").read_text())
    outcome = _outcome(report, reference["SeriesNumber"])
    ours = _nifti(outcome)
    assert ours.parent == anat["out"] / "sub-02" / "ses-pos" / "anat"
    assert ours.name.endswith("_T1w.nii.gz")
    sidecar = json.loads(ours.with_suffix("").with_suffix(".json").read_text())
    assert sidecar["PatientPosition"] == position
    for key in (
        "RepetitionTime",
        "EchoTime",
        "FlipAngle",
        "SliceTiming",
        "PhaseEncodingDirection",
        "ImageOrientationPatientDICOM",
    ):
        assert sidecar[key] == reference[key], key

    # Geometry: dcm2niix run directly on this position's folder is the reference.
    folder = next((src / position).iterdir())
    subprocess.run(
        [dcm2niix_binary(), "-z", "n", "-b", "n", "-f", "ref", "-o", str(tmp_path), str(folder)],
        check=True,
        capture_output=True,
    )
    _assert_same_image(ours, tmp_path / "ref.nii")


def test_output_is_valid_bids_for_pybids(anat: dict) -> None:
    bids = pytest.importorskip("bids")
    layout = bids.BIDSLayout(anat["out"], validate=True)
    t1w = layout.get(suffix="T1w", extension=".nii.gz", return_type="filename")
    assert sorted(Path(f).name for f in t1w) == [
        "sub-02_ses-pos_run-1_T1w.nii.gz",
        "sub-02_ses-pos_run-2_T1w.nii.gz",
        "sub-03_acq-tfl_T1w.nii.gz",
    ]
    assert len(layout.get(suffix="bold", extension=".nii.gz")) == len(REFERENCES)
    assert sorted(layout.get_subjects()) == ["01", "02", "03"]
    assert layout.get_sessions() == ["pos"]
    # Sidecar metadata is reachable through pybids, as the workflow will read it.
    meta = layout.get_metadata(t1w[0])
    assert meta["RepetitionTime"] > 0 and "ConversionCheck" in meta
    participants = (anat["out"] / "participants.tsv").read_text().split()
    assert participants == ["participant_id", "sub-01", "sub-02", "sub-03"]


def test_real_output_has_no_source_phi(anat: dict, data_dir: Path) -> None:
    """The real headers hold an institution, address, station, UIDs and dates: none may remain."""
    import gzip

    import pydicom

    files = sorted((data_dir / "dicom" / "decubitus_t1" / "HFS").rglob("*.dcm"))
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    date = str(ds.StudyDate)
    planted = [
        str(ds.InstitutionName),
        str(ds.InstitutionAddress),
        str(ds.StationName),
        str(ds.SeriesInstanceUID),
        str(ds.StudyInstanceUID),
        str(ds.PatientID),
        date,
        f"{date[:4]}-{date[4:6]}-{date[6:]}",
    ]
    for path in anat["out"].rglob("*"):
        if path.is_dir():
            continue
        data = path.read_bytes()
        if path.name.endswith(".gz"):
            data = gzip.decompress(data)
        for value in planted:
            assert value.encode() not in data, f"{value!r} found in {path}"
