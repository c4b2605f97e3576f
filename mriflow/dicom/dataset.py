"""Dataset-level files of a BIDS raw dataset: description, participants, .bidsignore."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from mriflow import CODE_URL, __version__
from mriflow.bids.paths import atomic_write_text

__all__ = [
    "BIDS_VERSION",
    "write_dataset_description",
    "update_participants",
    "update_bidsignore",
]

BIDS_VERSION = "1.9.0"


def write_dataset_description(bids_dir: str | Path, *, name: str | None = None) -> Path:
    """Create ``dataset_description.json`` unless the dataset already has one.

    An existing description is the user's and is left unchanged, except that
    mriflow is added to its ``GeneratedBy`` list when missing.

    Returns
    -------
    Path
        The description file.
    """
    bids_dir = Path(bids_dir)
    path = bids_dir / "dataset_description.json"
    generated = {
        "Name": "mriflow",
        "Version": __version__,
        "Description": "DICOM to BIDS conversion (mriflow convert: dcm2niix, "
        "cross-checked with dicom2nifti; de-identified)",
        "CodeURL": CODE_URL,
    }
    if path.exists():
        try:
            with open(path, encoding="utf-8") as fh:
                desc: dict[str, Any] = json.load(fh)
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: not a readable dataset_description.json ({err})") from None
        entries = desc.get("GeneratedBy")
        if isinstance(entries, list) and not any(
            isinstance(e, dict) and e.get("Name") == "mriflow" for e in entries
        ):
            desc["GeneratedBy"] = [*entries, generated]
            atomic_write_text(path, json.dumps(desc, indent=2) + "\n")
        return path
    desc = {
        "Name": name or bids_dir.resolve().name,
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "raw",
        "GeneratedBy": [generated],
    }
    atomic_write_text(path, json.dumps(desc, indent=2) + "\n")
    return path


def update_participants(bids_dir: str | Path, subject: str) -> Path:
    """Add ``sub-<subject>`` to ``participants.tsv`` (created if missing).

    Other columns of an existing file are kept; the new row gets ``n/a`` in them.
    No demographic column is written: age, sex and the like come from the
    DICOM header only when the user asks to keep PHI, and then not here.
    """
    bids_dir = Path(bids_dir)
    path = bids_dir / "participants.tsv"
    participant = f"sub-{subject}"
    header = ["participant_id"]
    rows: list[list[str]] = []
    if path.exists():
        with open(path, encoding="utf-8", newline="") as fh:
            table = [r for r in csv.reader(fh, delimiter="\t") if r]
        if not table or table[0][0] != "participant_id":
            raise ValueError(f"{path}: expected a TSV whose first column is participant_id")
        header, rows = table[0], table[1:]
    if any(r and r[0] == participant for r in rows):
        return path
    rows.append([participant] + ["n/a"] * (len(header) - 1))
    rows.sort(key=lambda r: r[0])
    text = "\n".join("\t".join(r) for r in [header, *rows]) + "\n"
    atomic_write_text(path, text)
    return path


def update_bidsignore(bids_dir: str | Path, patterns: list[str]) -> Path | None:
    """Add ``patterns`` to ``.bidsignore`` (created if missing); None when nothing to add."""
    if not patterns:
        return None
    path = Path(bids_dir) / ".bidsignore"
    existing = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    new = [p for p in patterns if p not in existing]
    if new:
        atomic_write_text(path, "\n".join([*existing, *new]) + "\n")
    return path
