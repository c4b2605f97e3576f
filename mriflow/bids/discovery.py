"""Finding the anatomical inputs of a BIDS dataset with pybids.

Start-up must not grow with the dataset (issue 15): a one-subject job indexes only
that subject's folder (every other ``sub-*`` is given to pybids as ignored), or
reuses a pybids database built once (``--bids-database-dir``). Sidecar metadata is
not indexed by pybids (mriflow reads none of it to plan): the JSON sidecars a
subject's images inherit are parsed per subject instead, so one broken sidecar
fails its subject only.
"""

from __future__ import annotations

import json
import logging
import os
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mriflow.image.io import ImageError, check_readable

__all__ = [
    "ANAT_SUFFIXES",
    "AnatInput",
    "DATABASE_FILENAME",
    "VALIDATED_FILENAME",
    "DiscoveryError",
    "FILTER_KEYS",
    "SubjectInputs",
    "build_database",
    "collect_inputs",
    "load_bids_filters",
    "normalize_label",
    "run_summary_files",
    "subject_folders",
    "submission_record_files",
    "submission_record_path",
]

log = logging.getLogger("mriflow")

#: Anatomical contrasts mriflow processes; each session needs a T1w, its reference.
ANAT_SUFFIXES: tuple[str, ...] = ("T1w", "T2w", "FLAIR", "PDw", "T2starw", "PD")

#: ``--bids-filter-file`` keys (fMRIPrep's lower-case query names) -> BIDS suffix.
FILTER_KEYS: dict[str, str] = {s.lower(): s for s in ANAT_SUFFIXES}

#: The file pybids keeps its index in, inside ``--bids-database-dir``.
DATABASE_FILENAME = "layout_index.sqlite"

#: Written beside the index once the whole dataset passed BIDS validation: later jobs
#: that reuse the database skip it (the validator reads the whole tree every time).
VALIDATED_FILENAME = "bids_validation.json"

_LABEL = re.compile(r"^[A-Za-z0-9]+$")
# how many labels an error message lists before it says "... (N in all)"
_MAX_LISTED = 10


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


@dataclass(frozen=True)
class SessionInputs:
    """The images of one session: the reference T1w and the contrasts aligned to it."""

    reference: AnatInput
    others: tuple[AnatInput, ...] = ()

    @property
    def key(self) -> str:
        """A short id for Nipype node names (``ses_a``, or ``nosession``)."""
        session = self.reference.entities.get("session")
        return f"ses_{session}" if session else "nosession"


@dataclass
class SubjectInputs:
    """The images of one subject, and why the subject cannot run, if it cannot."""

    subject: str
    images: list[AnatInput] = field(default_factory=list)
    error: str | None = None
    image_errors: dict[str, str] = field(default_factory=dict)
    """Images left out before the run (unreadable): raw path -> one-line reason."""

    @property
    def t1w(self) -> list[AnatInput]:
        return [img for img in self.images if img.suffix == "T1w"]

    def sessions(self, reference: str = "") -> list[SessionInputs]:
        """The images grouped per session, each with its reference (:func:`choose_reference`).

        Raises
        ------
        DiscoveryError
            A session has no T1w to align its other images to (or none matching
            ``reference``).
        """
        by_session: dict[str, list[AnatInput]] = {}
        for image in self.images:
            by_session.setdefault(image.entities.get("session", ""), []).append(image)
        sessions = []
        for images in by_session.values():
            chosen = choose_reference(images, reference)
            others = tuple(img for img in images if img is not chosen)
            sessions.append(SessionInputs(chosen, others))
        return sessions


#: Entities that make a T1w less suited as the reference (contrast agent, then runs).
_REFERENCE_ORDER = ("ceagent", "run")


def choose_reference(images: Sequence[AnatInput], reference: str = "") -> AnatInput:
    """The reference T1w of one session's images.

    With ``reference`` (entities such as ``"acq-mprage"`` or ``"run-2"``, BIDS keys),
    the first T1w whose name has all of them. Otherwise the T1w without a contrast
    agent (``ce-``), then with the finest voxels (smallest voxel volume, read from the
    header), then the lowest run, then the first by name.

    Raises
    ------
    DiscoveryError
        No T1w (or none matching ``reference``); the message names the session's files.
    """
    from mriflow.bids.paths import ENTITY_KEYS
    from mriflow.image.io import load_header_quietly

    t1w = [img for img in images if img.suffix == "T1w"]
    if reference:
        wanted = dict(pair.partition("-")[::2] for pair in reference.split("_") if pair)
        keys = {short: long for long, short in ENTITY_KEYS.items()}
        t1w = [
            img
            for img in t1w
            if all(img.entities.get(keys.get(k, k)) == v for k, v in wanted.items())
        ]
    if not t1w:
        names = ", ".join(img.relpath for img in images)
        rule = f" matching coregistration.reference {reference!r}" if reference else ""
        raise DiscoveryError(f"{names}: no T1w{rule} in this session to align the others to")

    def voxel_volume(img: AnatInput) -> float:
        try:
            return float(np.prod(load_header_quietly(img.path).header.get_zooms()[:3]))
        except Exception:  # an unreadable image is named by the input check
            return float("inf")

    def rank(img: AnatInput) -> tuple:
        run = img.entities.get("run", "")
        return (
            "ceagent" in img.entities,
            round(voxel_volume(img), 3),
            int(run) if run.isdigit() else 0,
            img.relpath,
        )

    return min(t1w, key=rank)


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


def _listed(labels: Sequence[str], prefix: str = "sub-") -> str:
    shown = ", ".join(prefix + label for label in labels[:_MAX_LISTED])
    more = len(labels) - _MAX_LISTED
    return f"{shown}, ... ({len(labels)} in all)" if more > 0 else shown


def subject_folders(bids_dir: str | Path) -> list[str]:
    """Names of the ``sub-*`` folders at the top of ``bids_dir``, sorted.

    One directory listing: cheap even for tens of thousands of subjects.
    """
    with os.scandir(bids_dir) as entries:
        return sorted(
            e.name for e in entries if e.name.startswith("sub-") and e.is_dir(follow_symlinks=True)
        )


def load_bids_filters(path: str | Path) -> dict[str, dict[str, Any]]:
    """Read a ``--bids-filter-file`` (fMRIPrep's format) into pybids queries per suffix.

    The file is a JSON object of queries by lower-case suffix, each a mapping of
    pybids entity names to a value, a list of values, ``null`` (the entity must be
    absent) or ``"*"`` (any value), e.g. ``{"t1w": {"acquisition": null, "session":
    "1"}}``. Keys for images mriflow does not use (``bold``, ``fmap``...) are
    ignored with a warning, so one filter file can serve fMRIPrep and mriflow.

    Returns
    -------
    dict
        ``{"T1w": {...}, ...}``: the queries with ``null``/``"*"`` as pybids'
        ``Query.NONE``/``Query.ANY``.

    Raises
    ------
    DiscoveryError
        The file is missing, not JSON, or not shaped as above.
    """
    from bids.layout import Query

    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise DiscoveryError(f"--bids-filter-file {path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DiscoveryError(f"--bids-filter-file {path}: not valid JSON ({err})") from None
    if not isinstance(raw, dict):
        raise DiscoveryError(f"--bids-filter-file {path}: expected a JSON object of queries")

    def convert(value: Any, where: str) -> Any:
        if value is None:
            return Query.NONE
        if value == "*":
            return Query.ANY
        if isinstance(value, list):
            return [convert(v, where) for v in value]
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            return value
        raise DiscoveryError(
            f"--bids-filter-file {path}: {where} must be a string, number, null, '*' or a "
            f"list of those, got {value!r}"
        )

    filters: dict[str, dict[str, Any]] = {}
    ignored = []
    for key, query in raw.items():
        if key.lower() not in FILTER_KEYS:
            ignored.append(key)
            continue
        if not isinstance(query, dict):
            raise DiscoveryError(
                f"--bids-filter-file {path}: '{key}' must be an object of entity filters"
            )
        filters[FILTER_KEYS[key.lower()]] = {
            entity: convert(value, f"'{key}.{entity}'") for entity, value in query.items()
        }
    if ignored:
        log.warning(
            "--bids-filter-file %s: ignoring %s (mriflow uses %s)",
            path,
            ", ".join(repr(k) for k in ignored),
            ", ".join(FILTER_KEYS),
        )
    return filters


def _indexer(ignore: Iterable[Any] = ()) -> Any:
    from bids.layout import BIDSLayoutIndexer
    from bids.layout.validation import DEFAULT_LOCATIONS_TO_IGNORE

    # index_metadata=False: parsing every JSON sidecar is most of the indexing time
    # and one broken sidecar would refuse the whole dataset; see _check_sidecars
    return BIDSLayoutIndexer(
        validate=True, index_metadata=False, ignore=[*DEFAULT_LOCATIONS_TO_IGNORE, *ignore]
    )


def _only_subjects(labels: Sequence[str]) -> re.Pattern[str]:
    """A pybids ignore pattern matching every top-level ``sub-*`` but ``labels``."""
    keep = "|".join(re.escape(label) for label in labels)
    return re.compile(rf"^/sub-(?!(?:{keep})(?:/|$))")


def build_database(bids_dir: str | Path, database_dir: str | Path) -> Path:
    """Index the whole of ``bids_dir`` once into ``database_dir`` (fMRIPrep's meaning).

    The index is written under a temporary name and renamed into place, so that
    jobs starting at the same time never read half a database. An existing
    database is kept (delete the folder to re-index after the dataset changed).

    Returns
    -------
    Path
        The database file.
    """
    import bids

    bids_dir = Path(bids_dir).resolve()
    database_dir = Path(database_dir).resolve()
    target = database_dir / DATABASE_FILENAME
    if target.is_file():
        return target
    _check_raw_dataset(bids_dir)
    staging = database_dir / f".staging-{uuid.uuid4().hex[:8]}"
    try:
        staging.mkdir(parents=True)
        bids.BIDSLayout(
            str(bids_dir), derivatives=False, database_path=str(staging), indexer=_indexer()
        )
        os.replace(staging / DATABASE_FILENAME, target)
    except OSError as err:
        raise DiscoveryError(f"--bids-database-dir {database_dir}: cannot write ({err})") from None
    except Exception as err:  # pybids raises several types for broken datasets
        raise DiscoveryError(f"{bids_dir}: pybids cannot index this dataset ({err})") from None
    finally:
        if staging.is_dir():
            for leftover in staging.iterdir():
                leftover.unlink()
            staging.rmdir()
    return target


def _open_layout(
    bids_dir: Path, database_dir: Path | None, participant_labels: Sequence[str] | None
) -> Any:
    import bids

    if database_dir is not None:
        build_database(bids_dir, database_dir)
        try:
            layout = bids.BIDSLayout(database_path=str(database_dir))
        except Exception as err:
            raise DiscoveryError(
                f"--bids-database-dir {database_dir}: not a usable pybids database ({err}); "
                "delete it to re-index"
            ) from None
        if Path(layout.root).resolve() != bids_dir:
            raise DiscoveryError(
                f"--bids-database-dir {database_dir} indexes {layout.root}, not {bids_dir}: "
                "give one database folder per dataset"
            )
        return layout
    ignore = [_only_subjects(participant_labels)] if participant_labels else []
    try:
        return bids.BIDSLayout(str(bids_dir), derivatives=False, indexer=_indexer(ignore))
    except Exception as err:  # pybids raises several types for broken datasets
        raise DiscoveryError(f"{bids_dir}: pybids cannot index this dataset ({err})") from None


def _indexed_subjects(layout: Any, labels: Sequence[str] | None) -> list[str]:
    """Subject labels in the index (only among ``labels`` when given), by one SQL query.

    ``layout.get_subjects()`` loads every file's entities: O(dataset) Python objects,
    measured 78 s for 2,000 subjects on a loaded machine, which a database must avoid.
    """
    from bids.layout.models import Tag

    query = layout.connection_manager.session.query(Tag._value).filter(Tag.entity_name == "subject")
    if labels:
        query = query.filter(Tag._value.in_(list(labels)))
    return sorted({value for (value,) in query.distinct()})


def _entities_of(name: str) -> tuple[dict[str, str], str] | None:
    """``sub-01_ses-1_T1w.json`` -> ({"sub": "01", "ses": "1"}, "T1w"); None if not BIDS-like."""
    stem = name.split(".", 1)[0]
    *pairs, suffix = stem.split("_")
    entities = {}
    for pair in pairs:
        key, sep, value = pair.partition("-")
        if not sep:
            return None
        entities[key] = value
    return entities, suffix


def _inherited_sidecars(image: Path, bids_dir: Path) -> list[Path]:
    """The JSON sidecars ``image`` inherits (BIDS inheritance principle), nearest last."""
    parsed = _entities_of(image.name)
    if parsed is None:
        return []
    entities, suffix = parsed
    found = []
    folder = image.parent
    while True:
        for candidate in sorted(folder.glob(f"*{suffix}.json")):
            meta = _entities_of(candidate.name)
            if meta and meta[1] == suffix and meta[0].items() <= entities.items():
                found.append(candidate)
        if folder == bids_dir or bids_dir not in folder.parents:
            break
        folder = folder.parent
    return found[::-1]


def _check_sidecars(images: Sequence[AnatInput], bids_dir: Path) -> str | None:
    """The first unreadable JSON sidecar of these images, as an error line."""
    for image in images:
        for sidecar in _inherited_sidecars(image.path, bids_dir):
            try:
                json.loads(sidecar.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                return f"{sidecar}: invalid JSON sidecar ({err})"
            except OSError as err:
                return f"{sidecar}: cannot read JSON sidecar ({err.strerror})"
    return None


def _report_skipped_folders(
    bids_dir: Path, folders: Sequence[str], indexed: set[str], in_scope: set[str] | None
) -> None:
    """One warning line for ``sub-*`` folders pybids did not index (bad names, no BIDS files)."""
    skipped = []
    for name in folders:
        label = name[len("sub-") :]
        if not _LABEL.match(label):
            skipped.append(f"{name!r} (not a BIDS label)")
        elif (in_scope is None or label in in_scope) and label not in indexed:
            skipped.append(f"{name!r} (no file pybids accepts)")
    if skipped:
        log.warning(
            "%s: pybids skips %d sub-* folder(s): %s",
            bids_dir,
            len(skipped),
            "; ".join(skipped[:_MAX_LISTED]) + (" ..." if len(skipped) > _MAX_LISTED else ""),
        )


def collect_inputs(
    bids_dir: str | Path,
    participant_labels: Sequence[str] | None = None,
    session_labels: Sequence[str] | None = None,
    *,
    check_images: bool = True,
    database_dir: str | Path | None = None,
    bids_filters: Mapping[str, Mapping[str, Any]] | None = None,
    reference: str = "",
) -> list[SubjectInputs]:
    """Anatomical images (T1w, T2w, FLAIR, PDw, T2starw, PD) per subject, over all
    sessions and runs.

    Parameters
    ----------
    bids_dir : path
        The raw BIDS dataset.
    participant_labels, session_labels : sequence of str, optional
        Subjects / sessions to use (with or without ``sub-``/``ses-``); default all.
        With ``participant_labels`` and no database, pybids indexes only those
        subjects' folders.
    check_images : bool
        Read each image's header now, so an unreadable image fails its subject
        before any processing.
    database_dir : path, optional
        A pybids database folder (``--bids-database-dir``): built on first use,
        then reused without touching the tree.
    bids_filters : mapping, optional
        Per-suffix pybids queries (:func:`load_bids_filters`) that narrow which
        images are used.
    reference : str
        Entities picking each session's reference T1w (:func:`choose_reference`).

    Raises
    ------
    DiscoveryError
        ``bids_dir`` is missing, not BIDS, a derivatives tree, or a requested
        participant/session does not exist. A subject whose images are
        unreadable, whose JSON sidecars are invalid, or who has a session without
        a T1w, is returned with ``error`` set instead, so the other subjects can
        still run. Other unreadable images are left out, their reasons in
        ``image_errors``.
    """
    bids_dir = Path(bids_dir).resolve()
    _check_raw_dataset(bids_dir)
    folders = subject_folders(bids_dir)
    if not folders:
        raise DiscoveryError(f"{bids_dir}: no subjects (sub-*) found")
    wanted: list[str] | None = None
    if participant_labels:
        wanted = list(dict.fromkeys(normalize_label(p) for p in participant_labels))
        present = {name[len("sub-") :] for name in folders}
        missing = [p for p in wanted if p not in present]
        if missing:
            raise DiscoveryError(
                f"participant label(s) {', '.join('sub-' + m for m in missing)} not found in "
                f"{bids_dir} (available: {_listed([f[len('sub-') :] for f in folders])})"
            )
    layout = _open_layout(bids_dir, Path(database_dir).resolve() if database_dir else None, wanted)

    indexed = _indexed_subjects(layout, wanted)
    _report_skipped_folders(bids_dir, folders, set(indexed), set(wanted) if wanted else None)
    if wanted is None:
        wanted = indexed
    if not wanted:
        raise DiscoveryError(f"{bids_dir}: no subjects (sub-*) found")

    sessions = None
    if session_labels:
        sessions = list(dict.fromkeys(normalize_label(s, "ses-") for s in session_labels))
        known = set(layout.get_sessions(subject=wanted))
        missing = [s for s in sessions if s not in known]
        if missing:
            raise DiscoveryError(
                f"session label(s) {', '.join('ses-' + m for m in missing)} not found in "
                f"{bids_dir} (available: {_listed(sorted(known), 'ses-') or 'none'})"
            )

    results = []
    for subject in wanted:
        inputs = SubjectInputs(subject=subject)
        inputs.images = _query_images(layout, bids_dir, subject, sessions, bids_filters or {})
        if not inputs.t1w:
            where = f" in session(s) {', '.join(sessions)}" if sessions else ""
            matching = " matching --bids-filter-file" if bids_filters else ""
            inputs.error = f"sub-{subject}: no T1w image found{where}{matching}"
        else:
            inputs.error = _check_sidecars(inputs.images, bids_dir)
        if inputs.error is None:
            _check_images(inputs, reference, check_images)
        results.append(inputs)
    if not any(s.t1w for s in results):
        raise DiscoveryError(f"{bids_dir}: no T1w images found for the selected participants")
    return results


def _check_images(inputs: SubjectInputs, reference: str, read_headers: bool) -> None:
    """Fail the subject on a session without a T1w or an unreadable reference; leave out
    (with its reason) any other unreadable image, so the rest of the subject still runs."""
    if read_headers:
        for image in inputs.images:
            try:
                check_readable(image.path)
            except ImageError as err:
                inputs.image_errors[str(image.path)] = str(err)
    try:
        sessions = inputs.sessions(reference)
    except DiscoveryError as err:
        inputs.error = str(err)
        return
    for session in sessions:
        reason = inputs.image_errors.get(str(session.reference.path))
        if reason:
            inputs.error = reason
            return
    inputs.images = [i for i in inputs.images if str(i.path) not in inputs.image_errors]


def _query_images(
    layout: Any,
    bids_dir: Path,
    subject: str,
    sessions: Sequence[str] | None,
    bids_filters: Mapping[str, Mapping[str, Any]],
) -> list[AnatInput]:
    from bids.layout import Query

    files = []
    for suffix in ANAT_SUFFIXES:
        # fMRIPrep's default anatomical query: magnitude images (or no part entity)
        query: dict[str, Any] = {
            "datatype": "anat",
            "part": ["mag", Query.NONE],
            **bids_filters.get(suffix, {}),
            "subject": subject,
            "suffix": suffix,
            "extension": [".nii", ".nii.gz"],
        }
        if sessions:
            query["session"] = list(sessions)
        try:
            files.extend(layout.get(invalid_filters="error", **query))
        except ValueError as err:
            raise DiscoveryError(
                f"--bids-filter-file: invalid filter for {suffix} ({err})"
            ) from None
    images = []
    for bids_file in sorted(files, key=lambda f: f.path):
        entities = {
            k: str(v)
            for k, v in bids_file.get_entities().items()
            if k not in {"suffix", "extension", "datatype"}
        }
        entities = {"subject": entities.pop("subject"), **entities}
        images.append(
            AnatInput(
                path=Path(bids_file.path),
                relpath=Path(bids_file.path).relative_to(bids_dir).as_posix(),
                suffix=bids_file.entities["suffix"],
                entities=entities,
            )
        )
    return images


# --- records of runs and submissions under OUT_DIR/logs (read by ``mriflow status``) ---


def run_summary_files(out_dir: str | Path) -> list[Path]:
    """Every run summary the participant level wrote (``logs/run-<id>_summary.json``)."""
    return sorted((Path(out_dir) / "logs").glob("run-*_summary.json"))


def submission_record_path(out_dir: str | Path, submit_id: str) -> Path:
    """Where ``--submit`` records what it submitted: ``logs/submit-<id>.json``."""
    if not re.fullmatch(r"[A-Za-z0-9-]+", submit_id):
        raise ValueError(f"submission id must be alphanumeric with dashes, got {submit_id!r}")
    return Path(out_dir) / "logs" / f"submit-{submit_id}.json"


def submission_record_files(out_dir: str | Path) -> list[Path]:
    """Every submission record under ``out_dir``, oldest name first."""
    return sorted((Path(out_dir) / "logs").glob("submit-*.json"))
