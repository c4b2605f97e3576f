"""Input validation of BIDS_DIR before a participant run (``--skip-bids-validation`` skips it).

The official schema validator (PyPI ``bids-validator-deno``, the one OpenNeuro runs)
checks the dataset when it is installed; otherwise pybids' own checks do (dataset
description, names of the files, empty files). As fMRIPrep does, only the issues of
the dataset's root files and of the selected subjects count: a broken subject that is
not processed does not stop the run. Any error refuses the run before any work, in one
line naming the first problems (exit 2); warnings are left to the validator's own
report. The validator is offline (its schema is in its wheel) and takes about half a
second on a small dataset (docs/usage.md).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ValidationIssue", "validate_bids_dir", "validator_command", "format_issues"]

#: Errors shown in the one-line message (the rest are counted).
SHOWN = 3


@dataclass(frozen=True)
class ValidationIssue:
    """One error: its code, where (``/sub-01/anat/...``, relative to BIDS_DIR) and what."""

    code: str
    location: str
    message: str = ""


def validator_command() -> list[str] | None:
    """How to start the official validator here, or None when it is not installed.

    The ``bids-validator-deno`` script next to this interpreter (the same venv) comes
    first, then one on ``PATH``, then the Python package itself.
    """
    beside = Path(sys.executable).with_name("bids-validator-deno")
    if beside.is_file() and os.access(beside, os.X_OK):
        return [str(beside)]
    found = shutil.which("bids-validator-deno")
    if found:
        return [found]
    try:
        import bids_validator_deno  # noqa: F401
    except ImportError:
        return None
    return [sys.executable, "-c", "from bids_validator_deno import cli; cli()"]


def _selected(location: str, subjects: Sequence[str] | None) -> bool:
    """Whether an issue at ``location`` concerns the run: root files and selected subjects."""
    from mriflow.bids.paths import parse_subject_dirname

    parts = [p for p in location.split("/") if p]
    subject = parse_subject_dirname(parts[0]) if parts else None
    return not subjects or subject is None or subject in subjects


def _official(bids_dir: Path, command: list[str], subjects: Sequence[str] | None):
    try:
        proc = subprocess.run(
            [*command, "--format", "json", "--ignoreWarnings", str(bids_dir)],
            capture_output=True,
            text=True,
            timeout=3600,
        )
        report = json.loads(proc.stdout)
        issues = report["issues"]["issues"]
    except (OSError, subprocess.TimeoutExpired, ValueError, KeyError, TypeError) as err:
        # a validator that cannot run is not the dataset's fault: say so, check with pybids
        return None, f"bids-validator-deno did not give a report ({err}); pybids checks used"
    errors = []
    for issue in issues:
        location = issue.get("location") or ""
        if issue.get("severity") != "error" or not _selected(location, subjects):
            continue
        # the code says what is wrong; the validator's general text per code is long
        detail = " ".join(str(issue.get("issueMessage") or issue.get("subCode") or "").split())
        errors.append(ValidationIssue(issue.get("code", "ERROR"), location, detail[:120]))
    return sorted(set(errors), key=lambda e: (e.location, e.code)), None


def _pybids(bids_dir: Path, subjects: Sequence[str] | None) -> list[ValidationIssue]:
    """pybids' checks: its dataset-description validation, BIDS file names, empty files."""
    from bids.exceptions import BIDSValidationError
    from bids.layout.validation import validate_root
    from bids_validator import BIDSValidator

    try:
        validate_root(str(bids_dir), True)
    except BIDSValidationError as err:
        return [ValidationIssue("DATASET_DESCRIPTION", "/dataset_description.json", str(err))]
    validator = BIDSValidator()
    errors = []
    from mriflow.bids.paths import parse_subject_dirname

    for folder in sorted(p for p in bids_dir.iterdir() if p.is_dir()):
        subject = parse_subject_dirname(folder.name)
        if subject is None or (subjects and subject not in subjects):
            continue
        for path in sorted(folder.rglob("*")):
            if path.is_dir():
                continue
            location = "/" + path.relative_to(bids_dir).as_posix()
            if not validator.is_bids(location):
                errors.append(ValidationIssue("NOT_INCLUDED", location, "not a BIDS file name"))
            elif path.stat().st_size == 0:
                errors.append(ValidationIssue("EMPTY_FILE", location))
    return errors


def validate_bids_dir(
    bids_dir: str | os.PathLike[str], subjects: Sequence[str] | None = None
) -> tuple[str, list[ValidationIssue]]:
    """Errors of ``bids_dir`` that concern a run of ``subjects`` (all when None).

    Parameters
    ----------
    bids_dir : path
        The raw dataset.
    subjects : sequence of str, optional
        Labels without ``sub-``; issues inside other subjects' folders are ignored.

    Returns
    -------
    tuple
        ``(checker, errors)``: which checks ran (``"bids-validator-deno"`` or
        ``"pybids"``, with the reason when the validator could not run) and the errors.
    """
    bids_dir = Path(bids_dir)
    from mriflow.bids.paths import subject_label

    subjects = [subject_label(s) for s in subjects] if subjects else None
    command = validator_command()
    note = "bids-validator-deno not installed"
    if command is not None:
        errors, note = _official(bids_dir, command, subjects)
        if errors is not None:
            return "bids-validator-deno", errors
    return f"pybids ({note})", _pybids(bids_dir, subjects)


def format_issues(bids_dir: str | os.PathLike[str], checker: str, errors: Sequence) -> str:
    """The one line that refuses the run: counts, the first files and their problems, how
    to go on."""
    by_file: dict[str, list[str]] = {}
    for error in errors:
        text = error.code + (f" ({error.message})" if error.message else "")
        by_file.setdefault(error.location or "/", []).append(text)
    shown = "; ".join(
        f"{where}: {', '.join(codes)}" for where, codes in list(by_file.items())[:SHOWN]
    )
    more = f"; and {len(by_file) - SHOWN} more file(s)" if len(by_file) > SHOWN else ""
    return (
        f"BIDS_DIR {bids_dir} is not valid BIDS ({len(errors)} error(s) in {len(by_file)} "
        f"file(s), {checker}): {shown}{more} - fix them, leave those subjects out "
        "(--participant-label) or run with --skip-bids-validation"
    )
