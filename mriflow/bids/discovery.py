"""Finding the anatomical inputs of a BIDS dataset with pybids."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mriflow.image.io import ImageError, check_readable

__all__ = [
    "ANAT_SUFFIXES",
    "AnatInput",
    "DiscoveryError",
    "SubjectInputs",
    "collect_inputs",
    "normalize_label",
]

#: Anatomical contrasts mriflow processes; T1w is the reference and is required.
ANAT_SUFFIXES: tuple[str, ...] = ("T1w", "T2w", "FLAIR")


class DiscoveryError(ValueError):
    """The BIDS folder or the selection cannot be used at all (a usage error)."""


@dataclass(frozen=True)
class AnatInput:
    """One anatomical image and its BIDS entities."""

    path: Path
    relpath: str
    suffix: str
    entities: dict[str, str]

    @property
    def key(self) -> str:
        """A short unique id of the image within its subject, safe for Nipype node names."""
        parts = [f"{k}_{v}" for k, v in self.entities.items() if k != "subject"]
        return "_".join([*parts, self.suffix]).replace("-", "")


@dataclass
class SubjectInputs:
    """The images of one subject, and why the subject cannot run, if it cannot."""

    subject: str
    images: list[AnatInput] = field(default_factory=list)
    error: str | None = None

    @property
    def t1w(self) -> list[AnatInput]:
        return [img for img in self.images if img.suffix == "T1w"]


def normalize_label(label: str, prefix: str = "sub-") -> str:
    """``sub-01`` and ``01`` both give ``01``."""
    label = label.strip()
    return label[len(prefix) :] if label.startswith(prefix) else label


def _check_raw_dataset(bids_dir: Path) -> None:
    if not bids_dir.is_dir():
        raise DiscoveryError(f"BIDS_DIR {bids_dir} does not exist or is not a folder")
    description = bids_dir / "dataset_description.json"
    if not description.is_file():
        raise DiscoveryError(
            f"{bids_dir} is not a BIDS dataset: dataset_description.json is missing"
        )
    try:
        meta = json.loads(description.read_text())
    except json.JSONDecodeError as err:
        raise DiscoveryError(f"{description}: not valid JSON ({err})") from None
    if meta.get("DatasetType") == "derivative" or "PipelineDescription" in meta:
        generated = meta.get("GeneratedBy") or [meta.get("PipelineDescription") or {}]
        tool = generated[0].get("Name", "another pipeline") if generated else "another pipeline"
        raise DiscoveryError(
            f"{bids_dir} is a BIDS derivatives dataset (made by {tool}), not raw data: "
            "give mriflow the raw BIDS dataset"
        )


def collect_inputs(
    bids_dir: str | Path,
    participant_labels: Sequence[str] | None = None,
    session_labels: Sequence[str] | None = None,
    *,
    check_images: bool = True,
) -> list[SubjectInputs]:
    """Anatomical images (T1w, T2w, FLAIR) per subject, over all sessions and runs.

    Raises
    ------
    DiscoveryError
        ``bids_dir`` is missing, not BIDS, a derivatives tree, or a requested
        participant/session does not exist. A subject whose images are
        unreadable, or who has no T1w, is returned with ``error`` set instead,
        so the other subjects can still run.
    """
    import bids  # pybids is slow to import; keep ``mriflow --help`` fast

    bids_dir = Path(bids_dir).resolve()
    _check_raw_dataset(bids_dir)
    try:
        layout = bids.BIDSLayout(str(bids_dir), validate=True, derivatives=False)
    except Exception as err:  # pybids raises several types for broken datasets
        raise DiscoveryError(f"{bids_dir}: pybids cannot index this dataset ({err})") from None

    available = sorted(layout.get_subjects())
    if not available:
        raise DiscoveryError(f"{bids_dir}: no subjects (sub-*) found")
    if participant_labels:
        wanted = list(dict.fromkeys(normalize_label(p) for p in participant_labels))
        missing = [p for p in wanted if p not in available]
        if missing:
            raise DiscoveryError(
                f"participant label(s) {', '.join('sub-' + m for m in missing)} not found in "
                f"{bids_dir} (available: {', '.join('sub-' + s for s in available)})"
            )
    else:
        wanted = available

    sessions = None
    if session_labels:
        sessions = list(dict.fromkeys(normalize_label(s, "ses-") for s in session_labels))
        known = set(layout.get_sessions())
        missing = [s for s in sessions if s not in known]
        if missing:
            raise DiscoveryError(
                f"session label(s) {', '.join('ses-' + m for m in missing)} not found in "
                f"{bids_dir} (available: {', '.join('ses-' + s for s in sorted(known)) or 'none'})"
            )

    results = []
    for subject in wanted:
        query = {
            "subject": subject,
            "datatype": "anat",
            "suffix": list(ANAT_SUFFIXES),
            "extension": [".nii", ".nii.gz"],
        }
        if sessions:
            query["session"] = sessions
        files = layout.get(**query)
        inputs = SubjectInputs(subject=subject)
        for bids_file in sorted(files, key=lambda f: f.path):
            entities = {
                k: str(v)
                for k, v in bids_file.get_entities().items()
                if k not in {"suffix", "extension", "datatype"}
            }
            entities = {"subject": entities.pop("subject"), **entities}
            inputs.images.append(
                AnatInput(
                    path=Path(bids_file.path),
                    relpath=Path(bids_file.path).relative_to(bids_dir).as_posix(),
                    suffix=bids_file.entities["suffix"],
                    entities=entities,
                )
            )
        if not inputs.t1w:
            where = f" in session(s) {', '.join(sessions)}" if sessions else ""
            inputs.error = f"sub-{subject}: no T1w image found{where}"
        elif check_images:
            for image in inputs.images:
                try:
                    check_readable(image.path)
                except ImageError as err:
                    inputs.error = str(err)
                    break
        results.append(inputs)
    if not any(s.t1w for s in results):
        raise DiscoveryError(f"{bids_dir}: no T1w images found for the selected participants")
    return results
