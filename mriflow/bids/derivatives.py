"""BIDS derivatives: the one place where output names, sidecars and dataset files are made.

Names follow sMRIPrep (``sub-01_ses-a_space-MNI152NLin2009aSym_desc-preproc_T1w.nii.gz``);
every write is atomic (temporary file in the same folder, then ``os.replace``), so
an interrupted run never leaves a half-written file under its final name.
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

from mriflow import CODE_URL, __version__

__all__ = [
    "ENTITY_ORDER",
    "STAGING_DIRNAME",
    "DerivativeNameError",
    "atomic_copy",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_table",
    "atomic_write_text",
    "bids_uri",
    "build_path",
    "parse_entities",
    "dataset_description",
    "staged_relpath",
    "write_dataset_description",
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
    canonical = _canonical_entities(entities)
    if "subject" not in canonical:
        raise DerivativeNameError("a derivative name needs the 'subject' entity")
    if not suffix.isalnum():
        raise DerivativeNameError(f"BIDS suffix must be alphanumeric, got {suffix!r}")
    if extension and not extension.startswith("."):
        raise DerivativeNameError(f"extension must start with '.', got {extension!r}")
    parts = [f"{ENTITY_KEYS[name]}-{canonical[name]}" for name in ENTITY_ORDER if name in canonical]
    filename = "_".join([*parts, suffix]) + extension
    folders = [f"sub-{canonical['subject']}"]
    if "session" in canonical:
        folders.append(f"ses-{canonical['session']}")
    if datatype:
        folders.append(datatype)
    return "/".join([*folders, filename])


def bids_uri(relpath: str | os.PathLike[str], dataset: str = "raw") -> str:
    """A BIDS URI such as ``bids:raw:sub-01/anat/sub-01_T1w.nii.gz`` (``dataset=""``: this one)."""
    return f"bids:{dataset}:{Path(relpath).as_posix()}"


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
        prefix=f".{path.name}.", suffix=f".part{''.join(path.suffixes)}", dir=path.parent
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


def dataset_description(
    source_datasets: Iterable[str | os.PathLike[str]] = (),
    *,
    name: str = "mriflow derivatives",
) -> dict[str, Any]:
    """The ``dataset_description.json`` of an mriflow derivatives dataset."""
    sources = [Path(p).resolve() for p in source_datasets]
    description: dict[str, Any] = {
        "Name": name,
        "BIDSVersion": "1.10.0",
        "DatasetType": "derivative",
        "GeneratedBy": [
            {
                "Name": "mriflow",
                "Version": __version__,
                "CodeURL": CODE_URL,
                "Description": "Fast, offline anatomical MRI preprocessing to ML-ready volumes",
            }
        ],
        "HowToAcknowledge": "Please cite mriflow and the tools listed in each sidecar's Steps.",
    }
    if sources:
        description["SourceDatasets"] = [{"URL": src.as_uri()} for src in sources]
        description["DatasetLinks"] = {"raw": sources[0].as_uri()}
    return description


#: Files of an mriflow output folder that are not BIDS derivatives (reports, ML export).
BIDSIGNORE = (
    "logs/",
    "provenance/",
    "figures/",
    "slices/",
    "*.html",
    "splits.*",
    "dataset.csv",
    "dataset.json",
    "dataset_slices.csv",
    "group_*",
    "mriflow_config.toml",
    "nyul_standard.json",
)


def write_dataset_description(
    out_dir: str | os.PathLike[str], source_datasets: Iterable[str | os.PathLike[str]] = ()
) -> Path:
    """``dataset_description.json`` and the ``.bidsignore`` of the non-BIDS files."""
    atomic_write_text(Path(out_dir) / ".bidsignore", "\n".join(BIDSIGNORE) + "\n")
    return atomic_write_json(
        Path(out_dir) / "dataset_description.json", dataset_description(source_datasets)
    )


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
