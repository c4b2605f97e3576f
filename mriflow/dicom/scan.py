"""Find DICOM files under a folder and group them into series.

A scanner export is a tree of files with any extension (or none), sometimes with
a ``DICOMDIR`` index, screenshots, reports or NIfTI files mixed in. This module
walks the tree, reads every file that is DICOM, checks that its pixel data is
complete, and groups the images by ``SeriesInstanceUID`` (split further by echo
number and magnitude/phase where one series mixes them), so that each group
can be converted on its own and a broken file fails only its own series.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import unicodedata
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import MediaStorageDirectoryStorage

__all__ = [
    "DicomSeries",
    "PatientIdentity",
    "printable",
    "FileProblem",
    "ScanResult",
    "scan_dicom_dir",
    "read_dicom_file",
    "DicomReadError",
]

logger = logging.getLogger("mriflow.dicom")

# ImageType values (DICOM value 3, or the complex component of enhanced files)
# that mark a magnitude / phase / real / imaginary image. One series with both
# magnitude and phase images must become two NIfTI files.
_COMPONENTS = {
    "M": "M",
    "MAGNITUDE": "M",
    "P": "P",
    "PHASE": "P",
    "R": "R",
    "REAL": "R",
    "I": "I",
    "IMAGINARY": "I",
}


# Per-process key of the patient fingerprints: a short unkeyed hash of a
# PatientID could be reversed by hashing every candidate ID (hospital IDs are
# short numbers), so the hash is keyed with a secret that never leaves memory.
_FINGERPRINT_KEY = secrets.token_bytes(16)


def printable(text: object, max_length: int = 64) -> str:
    """``text`` made safe to print on one terminal line.

    DICOM text fields are written by people and scanners: they can hold
    newlines, escape sequences that rewrite the terminal, or kilobytes of
    notes. Control and format characters become spaces, runs of spaces
    collapse, and the result is cut to ``max_length`` characters (ending in
    ``...`` when cut).
    """
    if max_length < 4:
        raise ValueError(f"max_length must be >= 4, got {max_length}")
    chars = [" " if unicodedata.category(c)[0] in "CZ" else c for c in str(text)]
    clean = " ".join("".join(chars).split())
    return clean if len(clean) <= max_length else clean[: max_length - 3] + "..."


@dataclass(frozen=True)
class PatientIdentity:
    """Who a DICOM file belongs to: PatientID, PatientName, PatientBirthDate.

    Kept in memory only, to refuse mixing patients in one subject; messages
    show :meth:`fingerprint`, never the values (``repr`` hides them too).
    """

    patient_id: str = field(repr=False)
    name: str = field(repr=False)
    birth_date: str = field(repr=False)

    @classmethod
    def from_dataset(cls, ds: pydicom.Dataset) -> PatientIdentity:
        def text(keyword: str) -> str:
            value = ds.get(keyword)
            return " ".join(str(value).split()) if value is not None else ""

        return cls(text("PatientID"), text("PatientName"), text("PatientBirthDate"))

    @property
    def empty(self) -> bool:
        """True when the header carries none of the three fields (an anonymised export)."""
        return not (self.patient_id or self.name or self.birth_date)

    def fingerprint(self) -> str:
        """8 hex digits that differ between patients, keyed per process (not reversible)."""
        if self.empty:
            return "no-patient-fields"
        message = "\x1f".join((self.patient_id, self.name, self.birth_date)).encode()
        return hmac.new(_FINGERPRINT_KEY, message, hashlib.sha256).hexdigest()[:8]


class DicomReadError(ValueError):
    """A DICOM file cannot be used; the message names the file and the problem."""


@dataclass
class FileProblem:
    """A file that could not be used, with the reason (one line, names the file)."""

    path: Path
    reason: str
    series_uid: str | None = None

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass
class DicomSeries:
    """The files of one series (one echo, one image component) and its key headers.

    Attributes
    ----------
    uid : str
        ``SeriesInstanceUID`` (kept in memory only; never written to the output).
    files : list of Path
        The DICOM files, sorted by instance number then name.
    series_number : int or None
    description : str
        ``SeriesDescription`` (or ``ProtocolName``) for messages.
    echo : int or None
        ``EchoNumbers`` when the series was split by echo, else None.
    component : str or None
        ``"M"``, ``"P"``, ``"R"`` or ``"I"`` when the series was split by image component.
    problems : list of FileProblem
        Files of this series that are damaged; a series with problems is not converted.
    patient : PatientIdentity or None
        The patient of the series' files (in memory only; never printed).
    """

    uid: str
    files: list[Path]
    series_number: int | None
    description: str
    modality: str
    echo: int | None = None
    component: str | None = None
    problems: list[FileProblem] = field(default_factory=list)
    root: Path | None = None
    patient: PatientIdentity | None = field(default=None, repr=False)

    @property
    def label(self) -> str:
        """A human-readable name for messages: number, description, folder."""
        number = f"series {self.series_number}" if self.series_number is not None else "series"
        parts = [f"{number} '{printable(self.description)}'"]
        if self.echo is not None:
            parts.append(f"echo {self.echo}")
        if self.component is not None:
            parts.append(f"component {self.component}")
        folder = self.files[0].parent if self.files else None
        if folder is not None and self.root is not None:
            try:
                folder = folder.relative_to(self.root)
            except ValueError:
                pass
        n = len(self.files)
        where = f"{n} file{'s' if n != 1 else ''} in {printable(folder, 120)}"
        return f"{', '.join(parts)} ({where})"


@dataclass
class ScanResult:
    """What :func:`scan_dicom_dir` found.

    ``skipped`` are files that are not DICOM (warned about, not an error);
    ``problems`` are damaged DICOM files that belong to no readable series
    (errors: the conversion reports them and exits non-zero).
    """

    series: list[DicomSeries]
    skipped: list[FileProblem]
    problems: list[FileProblem]
    n_files: int


def _expected_pixel_bytes(ds: pydicom.Dataset) -> int:
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    bits = int(ds.BitsAllocated)
    n = int(ds.Rows) * int(ds.Columns) * frames * samples
    return (n * bits + 7) // 8


def read_dicom_file(path: str | Path) -> pydicom.Dataset | None:
    """Read one file and check that it is a complete DICOM image.

    Parameters
    ----------
    path : str or Path
        Any file.

    Returns
    -------
    pydicom.Dataset or None
        The dataset, or None when the file is not DICOM at all (the caller
        skips it with a warning). A ``DICOMDIR`` index is returned as is.

    Raises
    ------
    DicomReadError
        The file is DICOM but damaged: truncated, missing its pixel data or
        the attributes needed to place it in space.
    """
    path = Path(path)
    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError:
        # Old exports write no 128-byte preamble; accept such a file only when
        # it starts like a DICOM data set (group 0002 or 0008, either byte
        # order), parses and carries the attributes every image needs.
        with open(path, "rb") as fh:
            start = fh.read(2)
        if start not in (b"\x02\x00", b"\x08\x00", b"\x00\x02", b"\x00\x08"):
            return None
        try:
            ds = pydicom.dcmread(path, force=True)
        except Exception:
            return None
        if "SOPClassUID" not in ds or "SeriesInstanceUID" not in ds:
            return None
    except Exception as err:  # pydicom raises many types for damaged files
        raise DicomReadError(f"{path}: damaged DICOM file ({type(err).__name__}: {err})") from None

    if _is_dicomdir(ds):
        return ds
    missing = [k for k in ("SeriesInstanceUID", "Rows", "Columns", "BitsAllocated") if k not in ds]
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        missing.append("PixelData")
    if missing:
        raise DicomReadError(
            f"{path}: truncated or incomplete DICOM file (missing {', '.join(missing)})"
        )
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if ts is None or not ts.is_compressed:
        # Native pixel data has a known size: a shorter element means the file
        # was cut (an interrupted copy), which a converter may silently zero-fill.
        expected = _expected_pixel_bytes(ds)
        got = len(ds.PixelData) if "PixelData" in ds else expected
        if got < expected:
            raise DicomReadError(
                f"{path}: truncated DICOM file (pixel data has {got} of {expected} bytes)"
            )
    return ds


def _is_dicomdir(ds: pydicom.Dataset) -> bool:
    meta = getattr(ds, "file_meta", None)
    sop = ds.get("SOPClassUID") or (meta.get("MediaStorageSOPClassUID") if meta else None)
    return sop == MediaStorageDirectoryStorage or "DirectoryRecordSequence" in ds


def _as_int(value: object) -> int | None:
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _component(ds: pydicom.Dataset) -> str | None:
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    if len(image_type) >= 3 and image_type[2] in _COMPONENTS:
        return _COMPONENTS[image_type[2]]
    complex_component = str(ds.get("ComplexImageComponent", "")).upper()
    return _COMPONENTS.get(complex_component)


def _walk(root: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        for name in sorted(filenames):
            files.append(Path(dirpath) / name)
    return files


def scan_dicom_dir(root: str | Path) -> ScanResult:
    """Walk ``root`` recursively and group its DICOM images into series.

    Every file is tried whatever its extension. Files that are not DICOM are
    listed in ``skipped`` with one warning line each; a ``DICOMDIR`` index is
    ignored (its images are found by the walk). Damaged DICOM files are
    attached to their series (which then fails as a whole, so a volume with a
    missing slice is never written) or, when even the series cannot be read,
    listed in ``problems``.

    Parameters
    ----------
    root : str or Path
        The folder to search.

    Returns
    -------
    ScanResult
        Series sorted by series number, then description.

    Raises
    ------
    FileNotFoundError
        ``root`` is not a folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: DICOM folder not found (expected a directory)")

    groups: dict[tuple, list[tuple[int | None, Path]]] = defaultdict(list)
    first: dict[tuple, pydicom.Dataset] = {}
    patients: dict[tuple, set[PatientIdentity]] = defaultdict(set)
    skipped: list[FileProblem] = []
    problems: list[FileProblem] = []
    files = _walk(root)
    for path in files:
        try:
            ds = read_dicom_file(path)
        except DicomReadError as err:
            uid = None
            try:  # the header may still say which series the damaged file belongs to
                head = pydicom.dcmread(path, stop_before_pixels=True, force=True)
                uid = str(head.SeriesInstanceUID) if "SeriesInstanceUID" in head else None
            except Exception:
                uid = None
            problems.append(FileProblem(path, str(err).split(": ", 1)[-1], uid))
            continue
        if ds is None:
            logger.warning("Skipping %s: not a DICOM file", path)
            skipped.append(FileProblem(path, "not a DICOM file"))
            continue
        if _is_dicomdir(ds):
            logger.info("Ignoring DICOMDIR index %s (images are found by walking the folder)", path)
            continue
        echo = _as_int(ds.get("EchoNumbers"))
        key = (str(ds.SeriesInstanceUID), echo, _component(ds))
        groups[key].append((_as_int(ds.get("InstanceNumber")), path))
        first.setdefault(key, ds)
        patients[key].add(PatientIdentity.from_dataset(ds))
        del ds  # pixel data is not kept: converters read the files themselves

    # Split by echo / component only where a series really mixes them, so that
    # ordinary series keep ``echo=None`` and one name.
    per_uid: dict[str, list[tuple]] = defaultdict(list)
    for key in groups:
        per_uid[key[0]].append(key)

    series: list[DicomSeries] = []
    for uid, keys in per_uid.items():
        several_echoes = len({k[1] for k in keys}) > 1
        several_components = len({k[2] for k in keys}) > 1
        merged: dict[tuple, list[tuple[int | None, Path]]] = defaultdict(list)
        heads: dict[tuple, pydicom.Dataset] = {}
        owners: dict[tuple, set[PatientIdentity]] = defaultdict(set)
        for key in keys:
            sub = (key[1] if several_echoes else None, key[2] if several_components else None)
            merged[sub].extend(groups[key])
            heads.setdefault(sub, first[key])
            owners[sub] |= patients[key]
        for (echo, component), members in merged.items():
            ds = heads[(echo, component)]
            members.sort(key=lambda m: (m[0] if m[0] is not None else 1 << 30, m[1].name))
            description = str(ds.get("SeriesDescription") or ds.get("ProtocolName") or "")
            who = owners[(echo, component)]
            one = DicomSeries(
                uid=uid,
                files=[p for _, p in members],
                series_number=_as_int(ds.get("SeriesNumber")),
                description=description,
                modality=str(ds.get("Modality", "")),
                echo=echo,
                component=component,
                root=root,
                patient=next(iter(who)) if len(who) == 1 else None,
            )
            if len(who) > 1:  # one volume made of two people's slices: never convert it
                prints = ", ".join(sorted(p.fingerprint() for p in who))
                one.problems.append(
                    FileProblem(
                        one.files[0].parent,
                        f"the files of this series belong to {len(who)} different patients "
                        f"(patient fingerprints {prints})",
                        uid,
                    )
                )
            series.append(one)

    orphans = []
    for problem in problems:
        owners_of = [s for s in series if problem.series_uid and s.uid == problem.series_uid]
        if owners_of:
            for s in owners_of:
                s.problems.append(problem)
        else:
            orphans.append(problem)
    series.sort(
        key=lambda s: (
            s.series_number if s.series_number is not None else 1 << 30,
            s.description,
            s.echo or 0,
            s.component or "",
            str(s.files[0]),
        )
    )
    return ScanResult(series=series, skipped=skipped, problems=orphans, n_files=len(files))
