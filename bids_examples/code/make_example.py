"""Rebuild this example dataset from the public dcm_qa DICOM (run once; output is committed).

    python bids_examples/code/make_example.py /path/to/shared/data/dicom bids_examples

sub-01: dcm_qa_xa30 enhanced multi-frame T1w (its dcm2niix reference NIfTI).
sub-02: dcm_qa_decubitus t1_fl2d_sag, head-first supine (ses-hfs) and decubitus left (ses-hfdl),
converted with the dcm2niix PyPI package. Identifying fields are removed from the sidecars.
"""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import dcm2niix

IDENTIFYING = {
    "InstitutionName",
    "InstitutionalDepartmentName",
    "InstitutionAddress",
    "DeviceSerialNumber",
    "StationName",
    "ProcedureStepDescription",
    "StudyDescription",
    "AcquisitionDateTime",
    "AcquisitionTime",
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "ReferringPhysicianName",
    "PerformingPhysicianName",
    "OperatorsName",
    "AccessionNumber",
    "StudyInstanceUID",
    "SeriesInstanceUID",
}


def scrub(sidecar: dict) -> dict:
    return {k: v for k, v in sidecar.items() if k not in IDENTIFYING}


def write_pair(nifti: Path, sidecar: Path, dest_stem: Path) -> None:
    dest_stem.parent.mkdir(parents=True, exist_ok=True)
    # Always (re)compress with an empty gzip file name and mtime 0: GzipFile(path) would
    # store the source name in the header (validator warning GZIP_HEADER_FILENAME).
    opener = gzip.open if nifti.suffix == ".gz" else open
    with (
        opener(nifti, "rb") as src,
        open(f"{dest_stem}.nii.gz", "wb") as raw,
        gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) as dst,
    ):
        shutil.copyfileobj(src, dst)
    meta = scrub(json.loads(sidecar.read_text()))
    Path(f"{dest_stem}.json").write_text(json.dumps(meta, indent=2) + "\n")


def main(dicom_root: Path, out: Path) -> None:
    xa30 = dicom_root / "xa30_t1w_enhanced"
    write_pair(
        xa30 / "Ref" / "5_anat-T1w_acq-tfl.nii",
        xa30 / "Ref" / "5_anat-T1w_acq-tfl.json",
        out / "sub-01" / "anat" / "sub-01_T1w",
    )
    source = out / "sourcedata" / "sub-01" / "5_anat-T1w_acq-tfl"
    source.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(xa30 / "In" / "5_anat-T1w_acq-tfl", source, dirs_exist_ok=True)
    binary = str(Path(dcm2niix.__file__).parent / "dcm2niix")
    for session, folder in (("hfs", "HFS/3_t1_fl2d_sag"), ("hfdl", "HFDL/2_t1_fl2d_sag")):
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(
                [
                    binary,
                    "-z",
                    "y",
                    "-ba",
                    "y",
                    "-f",
                    "series",
                    "-o",
                    tmp,
                    str(dicom_root / "decubitus_t1" / folder),
                ],
                check=True,
                capture_output=True,
            )
            write_pair(
                Path(tmp) / "series.nii.gz",
                Path(tmp) / "series.json",
                out / "sub-02" / f"ses-{session}" / "anat" / f"sub-02_ses-{session}_T1w",
            )


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
