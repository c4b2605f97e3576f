"""The official BIDS validator (``bids-validator-deno`` 3.x, OpenNeuro's) accepts what
mriflow ships and writes: the bundled raw example and ``mriflow convert`` output of real
DICOM series. The derivatives of the README example are validated in
``tests/test_example.py``, which runs that example once.

The validator runs as a subprocess with ``--json``; a test fails on any error and prints
them all. Without the executable (``pip install '.[test]'``) the tests skip and say so.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mriflow.dicom.convert import convert_dicom_to_bids
from tests.conftest import REPO_ROOT

EXAMPLE = REPO_ROOT / "bids_examples"
GZIP_FNAME = 0x08  # FLG bit: an original file name follows the header (RFC 1952)


def validator_executable() -> str:
    """The ``bids-validator-deno`` next to this interpreter, else on ``PATH``; skip if absent."""
    beside = Path(sys.executable).with_name("bids-validator-deno")
    found = str(beside) if beside.is_file() else shutil.which("bids-validator-deno")
    if not found:
        pytest.skip("bids-validator-deno not installed (it is in the 'test' extra)")
    return found


def validator_issues(dataset: Path) -> list[dict]:
    """All issues the official validator reports on ``dataset`` (offline, JSON output)."""
    proc = subprocess.run(
        [validator_executable(), "--json", str(dataset)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"validator gave no JSON (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return report["issues"]["issues"]


def assert_no_validator_errors(dataset: Path) -> list[dict]:
    """Fail listing every error (code, file, detail); return all issues for further checks."""
    issues = validator_issues(dataset)
    errors = [i for i in issues if i.get("severity") == "error"]
    listed = "\n".join(
        f"{i['code']} {i.get('location', '')} {i.get('subCode', '')} {i.get('issueMessage', '')}"
        for i in errors
    )
    assert not errors, f"{len(errors)} BIDS validator errors in {dataset}:\n{listed}"
    return issues


def gzip_files_with_names(root: Path) -> list[Path]:
    """The ``.gz`` files under ``root`` whose gzip header stores a file name (a privacy leak)."""
    named = []
    for path in sorted(root.rglob("*.gz")):
        with path.open("rb") as fh:
            header = fh.read(4)
        assert header[:2] == b"\x1f\x8b", f"{path} is not gzip"
        if header[3] & GZIP_FNAME:
            named.append(path)
    return named


def test_bundled_example_is_valid_bids():
    issues = assert_no_validator_errors(EXAMPLE)
    assert not [i for i in issues if i["code"] == "GZIP_HEADER_FILENAME"]


def test_bundled_example_gzip_headers_carry_no_file_name():
    assert list(EXAMPLE.rglob("*.nii.gz"))
    assert gzip_files_with_names(EXAMPLE) == []


@pytest.fixture(scope="module")
def converted(data_dir: Path, tmp_path_factory) -> Path:
    """Real anatomical DICOM (an enhanced multi-frame T1w and a 2D T1 in two patient
    positions, as two sessions) converted by mriflow into one raw dataset."""
    out = tmp_path_factory.mktemp("convert") / "rawdata"
    for name, subject, session in (
        ("xa30_t1w_enhanced", "01", None),
        ("decubitus_t1/HFS", "02", "hfs"),
        ("decubitus_t1/HFDL", "02", "hfdl"),
    ):
        src = data_dir / "dicom" / name
        if not src.is_dir():
            pytest.skip(f"{src} not found")
        report = convert_dicom_to_bids(src, out, subject=subject, session=session)
        assert report.converted, (src, report)
    return out


@pytest.mark.data
def test_converted_dicom_is_valid_bids(converted: Path):
    t1w = sorted(p.relative_to(converted).parts[:-2] for p in converted.rglob("*_T1w.nii.gz"))
    assert t1w == [("sub-01",), ("sub-02", "ses-hfdl"), ("sub-02", "ses-hfs")]
    assert_no_validator_errors(converted)


@pytest.mark.data
def test_converted_gzip_headers_carry_no_file_name(converted: Path):
    assert list(converted.rglob("*.nii.gz"))
    assert gzip_files_with_names(converted) == []
