"""BIDS file names both ways, BIDS URIs and atomic writes: the leaf of ``mriflow/bids/``.

Every name mriflow writes or reads (raw names from DICOM conversion, derivative
names, QC files) is made by :func:`build_path` / :func:`build_filename` and read by
:func:`parse_entities`; nothing outside ``mriflow/bids/`` joins or splits names.
Every write is atomic (temporary file in the same folder, then ``os.replace``), so
an interrupted run never leaves a half-written file under its final name.

This module imports nothing of mriflow: dicom/, ml/ and reports/ may all use it.
"""

from __future__ import annotations

import csv
import filecmp
import io
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "ENTITY_KEYS",
    "ENTITY_ORDER",
    "PART_MARKER",
    "STAGING_DIRNAME",
    "DerivativeNameError",
    "entity_tag",
    "slice_stack_filename",
    "work_filename",
    "atomic_copy",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_table",
    "atomic_write_text",
    "bids_uri",
    "build_filename",
    "build_path",
    "parse_bids_uri",
    "parse_entities",
    "parse_subject_dirname",
    "remove_partial_files",
    "session_dirname",
    "session_label",
    "sidecar_path",
    "slice_filename",
    "slices_index_name",
    "subject_dirname",
    "subject_folders",
    "subject_label",
    "staged_relpath",
]

#: Entity order of the BIDS specification (entity table), with the transform
#: entities ``from``/``to``/``mode`` last, as sMRIPrep writes them.
ENTITY_ORDER: tuple[str, ...] = (
    "subject",
    "session",
    "sample",
    "task",
    "tracksys",
    "acquisition",
    "nucleus",
    "volume",
    "ceagent",
    "tracer",
    "stain",
    "reconstruction",
    "direction",
    "run",
    "modality",
    "echo",
    "flip",
    "inversion",
    "mtransfer",
    "part",
    "processing",
    "hemisphere",
    "space",
    "split",
    "recording",
    "chunk",
    "segmentation",
    "resolution",
    "density",
    "label",
    "description",
    "from",
    "to",
    "mode",
)

ENTITY_KEYS: dict[str, str] = {
    "subject": "sub",
    "session": "ses",
    "sample": "sample",
    "task": "task",
    "tracksys": "tracksys",
    "acquisition": "acq",
    "nucleus": "nuc",
    "volume": "voi",
    "ceagent": "ce",
    "tracer": "trc",
    "stain": "stain",
    "reconstruction": "rec",
    "direction": "dir",
    "run": "run",
    "modality": "mod",
    "echo": "echo",
    "flip": "flip",
    "inversion": "inv",
    "mtransfer": "mt",
    "part": "part",
    "processing": "proc",
    "hemisphere": "hemi",
    "space": "space",
    "split": "split",
    "recording": "recording",
    "chunk": "chunk",
    "segmentation": "seg",
    "resolution": "res",
    "density": "den",
    "label": "label",
    "description": "desc",
    "from": "from",
    "to": "to",
    "mode": "mode",
}
# Short keys (``desc``, ``ses``) are accepted wherever long names are.
_ALIASES = {short: long for long, short in ENTITY_KEYS.items()}

#: Sinks stage outputs under ``<node dir>/_mriflow_staged/<relative BIDS path>``.
STAGING_DIRNAME = "_mriflow_staged"

#: Temporary files of :func:`atomic_write` carry this marker (``.name.XXXX.part.nii.gz``);
#: one left by a killed run is removed by :func:`remove_partial_files`.
PART_MARKER = ".part"


class DerivativeNameError(ValueError):
    """Entities that cannot make a valid BIDS derivative name."""


def _canonical_entities(entities: Mapping[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in entities.items():
        if value is None or value == "":
            continue
        name = _ALIASES.get(key, key)
        if name not in ENTITY_KEYS:
            raise DerivativeNameError(f"unknown BIDS entity {key!r}")
        text = str(value)
        if not text.isalnum():
            raise DerivativeNameError(
                f"BIDS entity {key}={value!r} must be alphanumeric (no '_', '-', '.')"
            )
        out[name] = text
    return out


def build_filename(
    entities: Mapping[str, Any], *, suffix: str, extension: str = "", require_subject: bool = True
) -> str:
    """A BIDS file name such as ``sub-01_desc-preproc_T1w.nii.gz`` (entities in spec order).

    ``extension=""`` gives the stem. ``require_subject=False`` allows the
    dataset-level files (``desc-qc_metrics.tsv`` of the group).
    """
    canonical = _canonical_entities(entities)
    if require_subject and "subject" not in canonical:
        raise DerivativeNameError("a BIDS name needs the 'subject' entity")
    if not suffix.isalnum():
        raise DerivativeNameError(f"BIDS suffix must be alphanumeric, got {suffix!r}")
    if extension and not extension.startswith("."):
        raise DerivativeNameError(f"extension must start with '.', got {extension!r}")
    parts = [f"{ENTITY_KEYS[name]}-{canonical[name]}" for name in ENTITY_ORDER if name in canonical]
    return "_".join([*parts, suffix]) + extension


def build_path(
    entities: Mapping[str, Any],
    *,
    suffix: str,
    extension: str,
    datatype: str | None = "anat",
) -> str:
    """Relative path of a derivative, e.g. ``sub-01/anat/sub-01_desc-preproc_T1w.nii.gz``.

    Parameters
    ----------
    entities : mapping
        BIDS entities by long (``description``) or short (``desc``) name; ``subject`` is required.
        Empty values are left out.
    suffix : str
        ``T1w``, ``mask``, ``dseg``, ``probseg``, ``xfm``, ...
    extension : str
        With the leading dot: ``.nii.gz``, ``.json``, ``.h5``; ``""`` for a stem.
    datatype : str or None
        Folder under the subject/session (``anat``); ``None`` puts the file in the subject folder.
    """
    filename = build_filename(entities, suffix=suffix, extension=extension)
    canonical = _canonical_entities(entities)
    return "/".join([*subject_folders(canonical), *([datatype] if datatype else []), filename])


def entity_tag(*, suffix: str | None = None, **entities: str) -> str:
    """``space-X``, ``label-GM_probseg``: entities (spec order) and a suffix, no subject.

    For names of intermediate files in a work folder that say which BIDS output
    they will become.
    """
    canonical = _canonical_entities(entities)
    parts = [f"{ENTITY_KEYS[name]}-{canonical[name]}" for name in ENTITY_ORDER if name in canonical]
    if suffix:
        parts.append(suffix)
    return "_".join(parts)


def work_filename(
    stem: str, *, suffix: str | None = None, extension: str = "", **entities: str
) -> str:
    """``<stem>_label-GM_probseg.nii``: an intermediate file named after its input."""
    return f"{stem}_{entity_tag(suffix=suffix, **entities)}{extension}"


def subject_folders(entities: Mapping[str, Any]) -> list[str]:
    """``["sub-01", "ses-a"]``: the folders of a subject (and session) in a BIDS dataset."""
    canonical = _canonical_entities(entities)
    folders = [f"sub-{canonical['subject']}"]
    if "session" in canonical:
        folders.append(f"ses-{canonical['session']}")
    return folders


def subject_dirname(subject: str) -> str:
    """``sub-01`` for ``01`` or ``sub-01``."""
    return subject_folders({"subject": subject_label(subject)})[0]


def session_dirname(entities: Mapping[str, Any]) -> str:
    """``ses-a`` for entities with ``session=a``; ``""`` without a session."""
    session = entities.get("session") or entities.get("ses")
    return f"ses-{session}" if session else ""


def session_label(session: str) -> str:
    """``a`` for ``ses-a`` or ``a``."""
    return session.removeprefix("ses-")


def subject_label(subject: str) -> str:
    """``01`` for ``sub-01`` or ``01``."""
    return subject.removeprefix("sub-")


def parse_subject_dirname(name: str) -> str | None:
    """``"01"`` for a folder named ``sub-01``; ``None`` for anything else."""
    label = name.removeprefix("sub-")
    return label if label != name and label.isalnum() else None


def slice_filename(stem: str, axis: str, index: int, suffix: str, ext: str, width: int = 3) -> str:
    """``<stem>_axis-<axis>_slice-<index, zero padded>_<suffix>.<ext>`` (2D slices of a volume)."""
    return f"{stem}_axis-{axis}_slice-{index:0{width}d}_{suffix}.{ext}"


def bids_uri(relpath: str | os.PathLike[str], dataset: str = "raw") -> str:
    """A BIDS URI such as ``bids:raw:sub-01/anat/sub-01_T1w.nii.gz`` (``dataset=""``: this one)."""
    return f"bids:{dataset}:{Path(relpath).as_posix()}"


def sidecar_path(relpath: str) -> str:
    """The JSON sidecar of a data file: ``.../sub-01_T1w.nii.gz`` -> ``.../sub-01_T1w.json``."""
    folder, sep, name = relpath.rpartition("/")
    return folder + sep + name.split(".", 1)[0] + ".json"


def slice_stack_filename(stem: str, axis: str, suffix: str) -> str:
    """``<stem>_axis-<axis>_<suffix>.npy``: the packed slices of one axis (ml/slice_stack)."""
    if axis not in ("axial", "coronal", "sagittal"):
        raise ValueError(f"axis must be axial, coronal or sagittal, got {axis!r}")
    return f"{stem}_axis-{axis}_{suffix}.npy"


def slices_index_name(stem: str, extension: str) -> str:
    """``<stem>_slices.csv`` / ``.json``: the index of the 2D slices named ``<stem>_...``."""
    return f"{stem}_slices{extension}"


def parse_bids_uri(uri: str) -> tuple[str, str] | None:
    """``("raw", "sub-01/anat/sub-01_T1w.nii.gz")`` for a BIDS URI; ``None`` if it is not one."""
    if not uri.startswith("bids:") or uri.count(":") < 2:
        return None
    _, dataset, relpath = uri.split(":", 2)
    return dataset, relpath


def staged_relpath(path: str | os.PathLike[str]) -> str:
    """The BIDS relative path of a file a sink staged under :data:`STAGING_DIRNAME`."""
    posix = Path(path).as_posix()
    marker = f"/{STAGING_DIRNAME}/"
    if marker not in posix:
        raise ValueError(f"{path}: not a staged derivative (no {STAGING_DIRNAME}/ in path)")
    return posix.rsplit(marker, 1)[1]


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` and move the result onto ``path`` atomically.

    The temporary file sits in the target folder (``os.replace`` is atomic only
    within one file system) and keeps the target's suffixes, so writers that pick
    a format by extension (nibabel, Pillow, numpy) behave as for the final name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=f"{PART_MARKER}{''.join(path.suffixes)}", dir=path.parent
    )
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def remove_partial_files(folder: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary files a killed :func:`atomic_write` left under ``folder``."""
    removed = []
    for path in Path(folder).rglob(f".*{PART_MARKER}*"):
        if path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    path = Path(path)
    # Leave a file that already holds these bytes alone: a rerun with nothing
    # changed must not touch outputs (mtime-based tools would see a change).
    if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return path
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], payload: Any) -> Path:
    return atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=False) + "\n")


def atomic_write_table(
    path: str | os.PathLike[str],
    rows: Iterable[Mapping[str, Any]],
    columns: Sequence[str],
    *,
    delimiter: str = ",",
) -> Path:
    """Write ``rows`` as CSV/TSV with a header; ``None`` is written as an empty field."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter=delimiter, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow(["" if row.get(c) is None else row.get(c) for c in columns])
    return atomic_write_text(path, buffer.getvalue())


def atomic_copy(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Path:
    """Copy ``src`` to ``dst`` so that ``dst`` is either absent, old, or complete.

    A ``dst`` that already holds the same bytes is left untouched (see
    :func:`atomic_write_bytes`).
    """
    dst = Path(dst)
    if dst.is_file() and filecmp.cmp(src, dst, shallow=False):  # sizes first, then bytes
        return dst
    return atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))


_SHORT_TO_LONG = {short: long for long, short in ENTITY_KEYS.items()}


def parse_entities(path: str | os.PathLike[str]) -> tuple[dict[str, str], str, str]:
    """Entities, suffix and extension of a BIDS file name.

    ``sub-01_ses-a_run-2_T1w.nii.gz`` gives
    ``({"subject": "01", "session": "a", "run": "2"}, "T1w", ".nii.gz")``.
    """
    name = Path(path).name
    stem, dot, rest = name.partition(".")
    extension = dot + rest if dot else ""
    *pairs, suffix = stem.split("_")
    entities: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("-")
        if not sep or key not in _SHORT_TO_LONG:
            raise DerivativeNameError(f"{name}: '{pair}' is not a BIDS entity")
        entities[_SHORT_TO_LONG[key]] = value
    if "subject" not in entities:
        raise DerivativeNameError(f"{name}: a BIDS file name starts with sub-<label>")
    return entities, suffix, extension
