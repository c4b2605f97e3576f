"""Privacy of ``mriflow convert``: one patient per subject, free text removed, safe terminal output.

Synthetic series come from :mod:`tests.test_dicom_synthetic`'s writer; the
real-series test plants canaries in a copy of a real Siemens T1 (shared data).
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from mriflow.dicom.deid import SIDECAR_ALLOWLIST, restrict_sidecar
from mriflow.dicom.scan import PatientIdentity, printable, scan_dicom_dir
from tests.test_dicom_synthetic import PHI, _all_bytes, _run_cli, phantom, write_series

ALICE = {
    "PatientID": "PIDALICE4411",
    "PatientName": "Alphaplant^Anna",
    "PatientBirthDate": "19700101",
}
BOB = {"PatientID": "PIDBOB7722", "PatientName": "Betaplant^Bert", "PatientBirthDate": "19811111"}

# Free-text DICOM fields of the PS3.15 Basic Profile (removed, or cleaned), each
# with its own canary: none of them is a patient value, so only the allow-list
# (not the PHI-value search) can catch them.
FREE_TEXT = {
    "StudyDescription": "CanaryStudyDesc Kowalski follow-up",
    "PerformedProcedureStepDescription": "CanaryPerfStep Kowalski",
    "ScheduledProcedureStepDescription": "CanarySchedStep Kowalski",
    "RequestedProcedureDescription": "CanaryRequested Kowalski",
    "ImageComments": "CanaryImageComment Kowalski tremor",
    "AdditionalPatientHistory": "CanaryHistory Kowalski diabetic",
    "DerivationDescription": "CanaryDerivation Kowalski",
    "AcquisitionComments": "CanaryAcqComment Kowalski",
}
CANARIES = [v.split()[0] for v in FREE_TEXT.values()] + ["Kowalski"]


def _identifiers(*people: dict[str, str]) -> list[str]:
    out = []
    for p in people:
        out += [p["PatientID"], p["PatientBirthDate"], *p["PatientName"].split("^")]
    return out


# ------------------------------------------------------------------ one patient per subject


def test_two_patients_in_one_folder_are_refused_and_nothing_written(tmp_path: Path, capsys) -> None:
    src = tmp_path / "dicom"
    write_series(src / "a", phi=ALICE, series_number=2)
    write_series(src / "b", phi=BOB, series_number=3, data=phantom(seed=1))
    out = tmp_path / "bids"
    code = _run_cli([src, out, "--subject", "01"])
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert lines[0].startswith("mriflow convert: error: the DICOM folder holds series of 2")
    series_lines = [line for line in lines if "-> patient " in line]
    assert len(series_lines) == 2
    prints = {line.rsplit("-> patient ", 1)[1] for line in series_lines}
    assert len(prints) == 2 and all(len(p) == 8 for p in prints), prints
    for value in _identifiers(ALICE, BOB):
        assert value not in captured.err + captured.out, f"identifier {value!r} printed"
    assert not out.exists(), "nothing may be written"


def test_subject_map_converts_each_patient_into_its_own_subject(tmp_path: Path) -> None:
    src = tmp_path / "dicom"
    write_series(src / "a", phi=ALICE, series_number=2)
    write_series(src / "b", phi=BOB, series_number=3, data=phantom(seed=1))
    table = tmp_path / "map.tsv"
    table.write_text(f"patient_id\tsubject\n{ALICE['PatientID']}\t01\n{BOB['PatientID']}\tsub-02\n")
    out = tmp_path / "bids"
    assert _run_cli([src, out, "--subject-map", table]) == 0
    assert (out / "sub-01" / "anat" / "sub-01_T1w.nii.gz").exists()
    assert (out / "sub-02" / "anat" / "sub-02_T1w.nii.gz").exists()
    import nibabel as nib

    a = np.asarray(nib.load(out / "sub-01" / "anat" / "sub-01_T1w.nii.gz").dataobj)
    b = np.asarray(nib.load(out / "sub-02" / "anat" / "sub-02_T1w.nii.gz").dataobj)
    assert not np.array_equal(a, b), "each subject got its own patient's images"
    with open(out / "participants.tsv", newline="") as fh:
        rows = [r[0] for r in csv.reader(fh, delimiter="\t")]
    assert rows == ["participant_id", "sub-01", "sub-02"]
    for path, data in _all_bytes(out):
        for value in _identifiers(ALICE, BOB):
            assert value.encode() not in data, f"{value!r} in {path}"


def test_subject_map_missing_a_patient_is_refused(tmp_path: Path, capsys) -> None:
    src = tmp_path / "dicom"
    write_series(src / "a", phi=ALICE, series_number=2)
    write_series(src / "b", phi=BOB, series_number=3, data=phantom(seed=1))
    table = tmp_path / "map.tsv"
    table.write_text(f"{ALICE['PatientID']}\t01\n")
    out = tmp_path / "bids"
    assert _run_cli([src, out, "--subject-map", table]) == 2
    err = capsys.readouterr().err
    assert "not in the subject map" in err and BOB["PatientID"] not in err
    assert not out.exists()
    bad = tmp_path / "bad.tsv"
    bad.write_text(f"{ALICE['PatientID']}\t0-1\n")
    assert _run_cli([src, out, "--subject-map", bad]) == 2
    assert "bad.tsv: line 1" in capsys.readouterr().err


def test_series_mixing_two_patients_fails_alone(tmp_path: Path, capsys) -> None:
    src = tmp_path / "dicom"
    files = write_series(src / "mixed", phi=ALICE, series_number=2)
    for f in files[:3]:  # three slices of someone else in the same series
        ds = pydicom.dcmread(f)
        for key, value in BOB.items():
            setattr(ds, key, value)
        ds.save_as(f)
    write_series(src / "ok", phi=ALICE, series_number=3, data=phantom(seed=2))
    scan = scan_dicom_dir(src)
    (mixed,) = [s for s in scan.series if s.series_number == 2]
    assert mixed.patient is None and "2 different patients" in str(mixed.problems[0])
    out = tmp_path / "bids"
    assert _run_cli([src, out, "--subject", "01"]) == 1
    stdout = capsys.readouterr().out
    assert "FAILED   series 2" in stdout and "2 different patients" in stdout
    assert len(list(out.rglob("*.nii.gz"))) == 1, "the other series converts"


def test_patient_fingerprint_is_keyed_and_hides_identifiers() -> None:
    a = PatientIdentity("PIDALICE4411", "Alphaplant^Anna", "19700101")
    b = PatientIdentity("PIDALICE4411", "Alphaplant^Anna", "19700102")
    assert (
        a.fingerprint()
        == PatientIdentity(*("PIDALICE4411", "Alphaplant^Anna", "19700101")).fingerprint()
    )
    assert a.fingerprint() != b.fingerprint()
    import hashlib

    unkeyed = hashlib.sha256(b"PIDALICE4411").hexdigest()
    assert a.fingerprint() not in unkeyed
    assert "PIDALICE" not in repr(a) and "Alphaplant" not in repr(a)
    assert PatientIdentity("", "", "").fingerprint() == "no-patient-fields"


# --------------------------------------------------------------------------- free text


def _canaries_in(root: Path) -> list[tuple[Path, str]]:
    hits = []
    for path, data in _all_bytes(root):
        low = data.lower()
        hits += [(path, c) for c in CANARIES if c.lower().encode() in low]
    return hits


def test_free_text_fields_never_reach_an_output_byte(tmp_path: Path) -> None:
    src = tmp_path / "dicom"
    write_series(src, phi={**PHI, **FREE_TEXT, "SeriesDescription": "t1_mprage"})
    out = tmp_path / "bids"
    assert _run_cli([src, out, "--subject", "01"]) == 0
    assert _canaries_in(out) == []
    (sidecar,) = out.rglob("*_T1w.json")
    fields = json.loads(sidecar.read_text())
    assert set(fields) <= SIDECAR_ALLOWLIST
    assert fields["SeriesDescription"] == "t1_mprage", "clean descriptors are kept for BIDS tools"
    # The test can fail: without de-identification the converter does copy free text.
    kept = tmp_path / "kept"
    assert _run_cli([src, kept, "--subject", "01", "--keep-phi"]) == 0
    found = {c for _, c in _canaries_in(kept)}
    assert {"CanaryStudyDesc", "CanaryImageComment"} <= found, found


def test_restrict_sidecar_drops_unknown_and_unclean_descriptors() -> None:
    sidecar = {
        "EchoTime": 0.003,
        "StudyDescription": "x",
        "SomeFutureVendorField": "free text",
        "SeriesDescription": "t1 " + "notes " * 20,
        "ProtocolName": "t1\nsecond line",
    }
    kept, removed = restrict_sidecar(sidecar)
    assert kept == {"EchoTime": 0.003}
    assert set(removed) == set(sidecar) - {"EchoTime"}


@pytest.mark.data
def test_canaries_in_a_real_series_reach_no_output_byte(data_dir: Path, tmp_path: Path) -> None:
    series = data_dir / "dicom" / "decubitus_t1" / "HFS" / "3_t1_fl2d_sag"
    if not series.is_dir():
        pytest.skip(f"{series} not found")
    src = tmp_path / "dicom"
    src.mkdir()
    for f in sorted(series.iterdir()):
        ds = pydicom.dcmread(f)
        for key, value in FREE_TEXT.items():
            setattr(ds, key, value)
        ds.save_as(src / f.name)
    out = tmp_path / "bids"
    assert _run_cli([src, out, "--subject", "01", "--no-verify"]) == 0
    assert list(out.rglob("*.nii.gz")), "the real T1 was converted"
    assert _canaries_in(out) == []
    kept = tmp_path / "kept"
    assert _run_cli([src, kept, "--subject", "01", "--no-verify", "--keep-phi"]) == 0
    assert _canaries_in(kept), "the real converter copies some free text: the check can fail"


# --------------------------------------------------------------------------- terminal


def test_printable_strips_controls_and_caps_length() -> None:
    assert printable("t1\nmprage\x1b[31m\r\tok") == "t1 mprage [31m ok"
    long = printable("x" * 500, 64)
    assert len(long) == 64 and long.endswith("...")
    with pytest.raises(ValueError):
        printable("x", 2)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_descriptions_are_printed_on_one_safe_line(tmp_path: Path, capsys, caplog) -> None:
    src = tmp_path / "dicom"
    nasty = "t1\nFAKE: all series ok\x1b[2J\x07" + "y" * 300
    write_series(src, description=nasty, series_number=7)
    shutil.copy(Path(__file__), src / "notes.txt")  # one warning line too
    with caplog.at_level(logging.INFO, logger="mriflow.dicom"):
        code = _run_cli([src, tmp_path / "bids", "--subject", "01", "--keep-unknown"])
    assert code == 0
    captured = capsys.readouterr()
    text = captured.out + captured.err + "\n".join(r.getMessage() for r in caplog.records)
    assert "\x1b" not in text and "\x07" not in text
    lines = [line for line in text.splitlines() if "series 7" in line]
    assert lines, text
    for line in lines:
        assert "y" * 70 not in line, "description not capped"
    assert not any(line.startswith("FAKE") for line in text.splitlines())


def test_deface_margin_must_be_positive(tmp_path: Path, capsys) -> None:
    src = tmp_path / "dicom"
    write_series(src)
    out = tmp_path / "bids"
    assert _run_cli([src, out, "--subject", "01", "--deface", "--deface-margin", "0"]) == 2
    assert "--deface-margin must be > 0" in capsys.readouterr().err
    assert not out.exists()
