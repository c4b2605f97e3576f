"""The dataset manifest: one list of subjects (and sessions) with files and split.

:func:`build_manifest` joins the model-ready files of each subject/session with
the subject-level split; :func:`write_manifest` writes

- ``dataset.csv``: one row per subject/session, columns ``participant_id``,
  ``session_id``, ``split``, ``fold`` (with k folds), ``image``, ``mask``,
  ``dseg``, ``slices``, ``image_<channel>`` (other contrasts; or, with
  :func:`select_stacks`, ``image`` is the session's 4D stack) and any
  participants.tsv columns asked for;
- ``dataset.json``: the same rows as a list of dicts under ``"training"``,
  ``"validation"`` and ``"test"`` (the key names of MONAI's Decathlon-style
  data lists) plus the split parameters and a description of every key.

All paths are relative to the derivatives root, with ``/`` separators, so the
folder can be moved. A list of dicts with absolute paths is exactly what MONAI's
``Dataset`` and, wrapped in ``tio.Subject``, TorchIO's ``SubjectsDataset`` take;
:func:`load_manifest` returns that list (see ``docs/ml.md``).

:func:`write_slices_manifest` concatenates the per-subject slice indices into one
``dataset_slices.csv`` with the split of every slice, and
:func:`write_split_bundles` stacks the fixed-shape volumes of each split into
memory-mappable ``.npy`` arrays for quick experiments.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from mriflow.bids.outputs import GROUP_OUTPUTS
from mriflow.bids.paths import (
    atomic_write,
    atomic_write_json,
    atomic_write_table,
    session_dirname,
    session_label,
)
from mriflow.image.slices import label_dtype
from mriflow.ml.slices import SLICE_INDEX_COLUMNS, read_slice_index
from mriflow.ml.splits import (
    MISSING,
    SPLIT_NAMES,
    ParticipantsTable,
    SplitResult,
    normalize_participant_id,
)

__all__ = [
    "FILE_KEYS",
    "ManifestEntry",
    "ManifestError",
    "ManifestRows",
    "build_manifest",
    "write_manifest",
    "load_manifest",
    "select",
    "select_channels",
    "select_rows",
    "select_stacks",
    "write_slices_manifest",
    "write_split_bundles",
]

FILE_KEYS: tuple[str, ...] = ("image", "mask", "dseg", "slices")
LIST_KEYS = {"train": "training", "val": "validation", "test": "test"}
KEY_DESCRIPTIONS = {
    "participant_id": "BIDS participant id (sub-<label>)",
    "session_id": "BIDS session id (ses-<label>), empty without sessions",
    "split": "train, val or test; every session and slice of a subject has the subject's split",
    "fold": "with k folds: the fold in which the subject is a validation subject (-1: test)",
    "image": "model-ready image (NIfTI), relative to the derivatives root",
    "mask": "brain mask on the image's grid",
    "dseg": "tissue labels on the image's grid (1=GM, 2=WM, 3=CSF)",
    "slices": "CSV index of the subject's 2D slices (see dataset_slices.csv for all)",
}


class ManifestError(ValueError):
    """The manifest's inputs do not fit together; the message names the subject or file."""


@dataclass
class ManifestEntry:
    """The model-ready files of one subject (and session).

    Paths may be absolute or relative to the derivatives root; ``None`` when a
    file was not produced (then no entry of the manifest may have it).
    """

    participant_id: str
    image: str | Path
    session_id: str = ""
    mask: str | Path | None = None
    dseg: str | Path | None = None
    slices: str | Path | None = None
    channels: dict[str, str | Path] = field(default_factory=dict)
    """Other contrasts on the image's grid: channel name -> model-ready volume (the
    ``image_<name>`` columns, in this order)."""
    stack: str | Path | None = None
    """The session's 4D model-ready volume (channels last), when one was published."""
    stack_channels: list[str] = field(default_factory=list)
    """Its channel names in order, the reference first (its sidecar's ``Channels``)."""
    extra: dict[str, Any] = field(default_factory=dict)


def _where(entry: ManifestEntry) -> str:
    """``sub-01 ses-1`` (or ``sub-01``): an entry in a warning."""
    return f"{entry.participant_id} {entry.session_id}".strip()


def select_channels(
    entries: Sequence[ManifestEntry], wanted: Sequence[str] = ()
) -> tuple[list[ManifestEntry], list[str], list[str]]:
    """Apply the missing-channel rule of the multi-channel export.

    A data loader needs the same channels, in the same order, in every row, so a
    channel is never filled in or shifted: with ``wanted`` (names of the channels
    besides the reference ``image``, e.g. ``["T2w", "FLAIR"]``), entries lacking one
    of them are dropped; without it, the channels are those every entry has, and
    channels only some entries have are left out.

    Returns
    -------
    kept : list of ManifestEntry
        With ``channels`` restricted to the chosen ones, in order.
    channels : list of str
        The chosen channel names.
    notes : list of str
        ``"sub-01 ses-a: no FLAIR"`` for every dropped entry; without ``wanted``,
        ``"FLAIR: only 3 of 5 entries have it"`` for every left-out channel.
    """
    notes: list[str] = []
    channels = list(wanted)
    if not wanted:
        counts: dict[str, int] = {}
        for entry in entries:
            for name in entry.channels:
                counts[name] = counts.get(name, 0) + 1
        channels = [name for name, n in counts.items() if n == len(entries)]
        notes += [
            f"{name}: only {n} of {len(entries)} entries have it"
            for name, n in counts.items()
            if n < len(entries)
        ]
    kept = []
    for entry in entries:
        missing = [name for name in channels if name not in entry.channels]
        if missing:
            where = _where(entry)
            notes.append(f"{where}: no {', '.join(missing)}")
            continue
        kept.append(dataclasses.replace(entry, channels={n: entry.channels[n] for n in channels}))
    return kept, channels, notes


def select_stacks(
    entries: Sequence[ManifestEntry], channels: Sequence[str]
) -> tuple[list[ManifestEntry], list[str], list[str]]:
    """The stacked layout of the multi-channel export: ``image`` is each session's 4D stack.

    Apply after :func:`select_channels`, with the channels it chose: an entry is kept
    when its stack holds exactly the reference and ``channels``, in that order; its
    ``image`` becomes the stack and its separate channels are dropped (the stack holds
    them). Any other entry is left out: a stack is never cut, padded or reordered.

    Returns
    -------
    kept : list of ManifestEntry
    order : list of str
        The channel names along the stacks' last axis (the reference's first).
    notes : list of str
        ``"sub-02 ses-a: its stack has channels [...], not [...]"`` or
        ``"sub-03: no multi-channel stack"`` for every entry left out.
    """
    reference = next((e.stack_channels[0] for e in entries if e.stack_channels), "")
    order = [reference, *channels]
    kept, notes = [], []
    for entry in entries:
        where = _where(entry)
        if entry.stack is None:
            notes.append(f"{where}: no multi-channel stack")
        elif list(entry.stack_channels) != order:
            notes.append(
                f"{where}: its stack has channels {list(entry.stack_channels)}, not {order}"
            )
        else:
            kept.append(dataclasses.replace(entry, image=entry.stack, channels={}))
    return kept, order, notes


@dataclass(frozen=True)
class ManifestRows:
    """What :func:`select_rows` keeps for the manifest."""

    entries: list[ManifestEntry]
    columns: list[str]
    """The image columns in channel order (``dataset.json``'s ``Channels``)."""
    stacked: bool
    """``image`` is each session's 4D stack."""
    notes: list[str]
    """Warnings: every channel or entry left out, and why."""

    @property
    def descriptions(self) -> dict[str, str]:
        """Column descriptions that differ from :data:`KEY_DESCRIPTIONS`'s."""
        if not self.stacked:
            return {}
        return {"image": "model-ready 4D image (NIfTI), channels last, in the order of Channels"}


def select_rows(
    entries: Sequence[ManifestEntry], wanted: Sequence[str] = (), layout: str = "files"
) -> ManifestRows:
    """The missing-channel rule (:func:`select_channels`), then, for the ``stacked``
    layout, the stacks (:func:`select_stacks`).

    Raises
    ------
    ManifestError
        When no entry is left.
    """
    kept, channels, notes = select_channels(entries, wanted)
    notes = [f"{note} (left out)" for note in notes]
    if not kept:
        raise ManifestError(f"no session has every channel of {list(wanted)}: {'; '.join(notes)}")
    columns = ["image", *(f"image_{name}" for name in channels)]
    if layout != "stacked":
        return ManifestRows(kept, columns, False, notes)
    if not channels:
        notes.append("no channel besides the reference to stack")
        return ManifestRows(kept, columns, False, notes)
    kept, order, stack_notes = select_stacks(kept, channels)
    notes += [f"{note} (left out)" for note in stack_notes]
    if not kept:
        raise ManifestError(f"no session has a stack of the channels {channels}: {stack_notes[0]}")
    return ManifestRows(kept, order, True, notes)


def _relative(path: str | Path, root: Path, what: str) -> str:
    path = Path(path)
    full = path if path.is_absolute() else root / path
    if not full.is_file():
        raise ManifestError(f"{full}: {what} not found")
    try:
        rel = full.resolve().relative_to(root.resolve())
    except ValueError:
        raise ManifestError(
            f"{full}: {what} is outside the derivatives root {root}; the manifest "
            "lists paths relative to the root"
        ) from None
    return rel.as_posix()


def _split_lookup(
    splits: SplitResult | Mapping[str, Any],
) -> tuple[dict[str, str], dict[str, int | None], bool]:
    if isinstance(splits, SplitResult):
        with_folds = splits.parameters.get("NFolds", 0) > 1
        return dict(splits.split), dict(splits.fold), with_folds
    split: dict[str, str] = {}
    fold: dict[str, int | None] = {}
    for key, value in splits.items():
        pid = normalize_participant_id(key)
        name, number = (value, None) if isinstance(value, str) else value
        if name not in SPLIT_NAMES:
            raise ManifestError(f"{pid}: split must be one of {SPLIT_NAMES}, got {name!r}")
        split[pid], fold[pid] = name, number
    return split, fold, any(f is not None for f in fold.values())


def _json_value(value: Any) -> Any:
    """participants.tsv strings to JSON numbers where they are numbers; n/a to null."""
    if value is None or value == MISSING:
        return None
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return value
        if math.isfinite(number):
            return int(number) if number.is_integer() and "." not in value else number
    return value


def build_manifest(
    entries: Iterable[ManifestEntry],
    splits: SplitResult | Mapping[str, Any],
    root: str | Path,
    *,
    participants: ParticipantsTable | None = None,
    columns: Sequence[str] = (),
    left_out: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """Join files and splits into the manifest rows (sorted by subject and session).

    Parameters
    ----------
    entries : iterable of ManifestEntry
        One per subject/session with its model-ready files.
    splits : SplitResult or mapping
        From :func:`mriflow.ml.splits.make_splits`, or ``{participant_id: split}`` /
        ``{participant_id: (split, fold)}`` as :func:`mriflow.ml.splits.read_splits` gives.
    root : path
        The derivatives root; all paths in the rows are relative to it.
    participants, columns
        Copy these participants.tsv columns (e.g. a diagnosis as a target) into each row.
    left_out : sequence of str
        Participant ids in the splits left out of this manifest on purpose (a missing
        channel, :func:`select_channels`).

    Returns
    -------
    list of dict
        Keys ``participant_id``, ``session_id``, ``split``, [``fold``,] the file keys
        that every entry has, and ``columns``.

    Raises
    ------
    ManifestError
        A file is missing or outside ``root``, a subject has no split (or a split
        names a subject without files), a file key is present for some entries
        only, or a subject/session is listed twice.
    """
    root = Path(root)
    if not root.is_dir():
        raise ManifestError(f"{root}: derivatives root not found")
    split, fold, with_folds = _split_lookup(splits)
    if participants is None and columns:
        raise ManifestError(f"columns {list(columns)} need the participants table")
    rows: list[dict[str, Any]] = []
    seen: set[tuple[str, str]] = set()
    for entry in entries:
        pid = normalize_participant_id(entry.participant_id)
        ses = session_dirname({"session": session_label(str(entry.session_id or ""))})
        if (pid, ses) in seen:
            raise ManifestError(f"{pid} {ses}: listed twice in the manifest entries".strip())
        seen.add((pid, ses))
        if pid not in split:
            raise ManifestError(f"{pid}: has model-ready files but no split (splits.tsv)")
        row: dict[str, Any] = {"participant_id": pid, "session_id": ses, "split": split[pid]}
        if with_folds:
            row["fold"] = -1 if fold[pid] is None else int(fold[pid])
        for key in FILE_KEYS:
            value = getattr(entry, key)
            if value is not None:
                row[key] = _relative(value, root, f"{pid} {ses} {key}".replace("  ", " "))
        for name, value in entry.channels.items():
            row[f"image_{name}"] = _relative(value, root, f"{pid} {ses} {name}".strip())
        for column in columns:
            row[column] = participants.column(column, [pid])[pid]
        for key, value in entry.extra.items():
            if key in row or key in FILE_KEYS or key == "fold":
                raise ManifestError(f"{pid}: extra key {key!r} would overwrite a manifest key")
            row[key] = value
        rows.append(row)
    if not rows:
        raise ManifestError("no subjects with model-ready files to list in the manifest")
    left = {normalize_participant_id(p) for p in left_out}
    without_files = sorted(set(split) - {pid for pid, _ in seen} - left)
    if without_files:
        raise ManifestError(
            f"{len(without_files)} subject(s) in the splits have no model-ready files: "
            f"{without_files[:10]}"
        )
    for key in FILE_KEYS:
        having = [r for r in rows if key in r]
        if having and len(having) != len(rows):
            lacking = [
                f"{r['participant_id']} {r['session_id']}".strip() for r in rows if key not in r
            ]
            raise ManifestError(
                f"{key} is missing for {len(lacking)} of {len(rows)} entries: {lacking[:10]}; "
                "a data loader needs the same keys for every entry"
            )
    rows.sort(key=lambda r: (r["participant_id"], r["session_id"]))
    return rows


def write_manifest(
    rows: Sequence[Mapping[str, Any]],
    root: str | Path,
    *,
    csv_name: str = GROUP_OUTPUTS["manifest"],
    json_name: str = GROUP_OUTPUTS["manifest_json"],
    metadata: Mapping[str, Any] | None = None,
    descriptions: Mapping[str, str] | None = None,
) -> tuple[Path, Path]:
    """Write ``dataset.csv`` and ``dataset.json`` into the derivatives ``root``.

    ``metadata`` (e.g. the space, the target shape, the split parameters) is
    stored at the top of the JSON; ``descriptions`` replace those of keys under
    ``"Keys"`` (e.g. ``image`` when it is a 4D stack).
    """
    from mriflow import __version__

    root = Path(root)
    if not rows:
        raise ManifestError("the manifest has no rows")
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    csv_path = atomic_write_table(root / csv_name, rows, columns)
    listed = {LIST_KEYS[name]: [] for name in SPLIT_NAMES}
    for row in rows:
        item = {k: (_json_value(v) if k not in FILE_KEYS else v) for k, v in row.items()}
        # Identifiers stay strings even when they look like numbers.
        item["participant_id"], item["session_id"] = row["participant_id"], row["session_id"]
        item["split"] = row["split"]
        listed[LIST_KEYS[row["split"]]].append(item)
    payload: dict[str, Any] = {
        "Name": "mriflow model-ready dataset",
        "GeneratedBy": {"Name": "mriflow", "Version": __version__},
        "PathsRelativeTo": "the folder of this file (the derivatives root)",
        **(dict(metadata) if metadata else {}),
        "Keys": {k: (descriptions or {}).get(k) or _key_description(k) for k in columns},
        "numTraining": len(listed["training"]),
        "numValidation": len(listed["validation"]),
        "numTest": len(listed["test"]),
        **listed,
    }
    json_path = atomic_write_json(root / json_name, payload)
    return csv_path, json_path


def _key_description(key: str) -> str:
    if key in KEY_DESCRIPTIONS:
        return KEY_DESCRIPTIONS[key]
    if key.startswith("image_"):
        return f"model-ready {key[len('image_') :]} aligned to the image (same grid and mask)"
    return "participants.tsv column"


def load_manifest(path: str | Path, split: str | None = None) -> list[dict[str, Any]]:
    """Read ``dataset.json`` and return its entries with absolute file paths.

    Parameters
    ----------
    path : path
        The ``dataset.json`` (its folder is the root of the relative paths).
    split : {"train", "val", "test"}, optional
        Only this split (default: all entries).
    """
    import json

    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found")
    payload = json.loads(path.read_text(encoding="utf-8"))
    if split is not None and split not in LIST_KEYS:
        raise ManifestError(f"split must be one of {SPLIT_NAMES}, got {split!r}")
    names = [split] if split else list(SPLIT_NAMES)
    root = path.parent
    out = []
    for name in names:
        for item in payload.get(LIST_KEYS[name], []):
            item = dict(item)
            for key in FILE_KEYS:
                if item.get(key):
                    item[key] = str(root / item[key])
            out.append(item)
    return out


def select(rows: Iterable[Mapping[str, Any]], split: str, fold: int | None = None) -> list[dict]:
    """Rows of a split; with k folds, ``fold`` turns the pool into that fold's train/val.

    ``select(rows, "train", fold=f)`` are the pool subjects outside fold ``f``,
    ``select(rows, "val", fold=f)`` those in fold ``f``; ``select(rows, "test")``
    the held-out test subjects.
    """
    if split not in SPLIT_NAMES:
        raise ManifestError(f"split must be one of {SPLIT_NAMES}, got {split!r}")
    rows = [dict(r) for r in rows]
    if fold is None or split == "test":
        return [r for r in rows if r["split"] == split]
    if not any("fold" in r for r in rows):
        raise ManifestError("fold given but the manifest has no folds")
    pool = [r for r in rows if r["split"] == "train"]
    if split == "val":
        return [r for r in pool if int(r["fold"]) == fold]
    return [r for r in pool if int(r["fold"]) != fold]


def write_slices_manifest(
    rows: Sequence[Mapping[str, Any]],
    root: str | Path,
    *,
    csv_name: str = GROUP_OUTPUTS["slices_manifest"],
) -> Path:
    """One CSV of every exported slice of every subject, with its subject's split.

    File paths are rewritten relative to ``root``. Slices inherit the split (and
    fold) of their subject, so no subject's slices can land in two splits.
    """
    root = Path(root)
    columns = ["split", "fold"] if any("fold" in r for r in rows) else ["split"]
    columns += list(SLICE_INDEX_COLUMNS)
    out: list[dict[str, Any]] = []
    for row in rows:
        if not row.get("slices"):
            continue
        index_path = root / row["slices"]
        folder = Path(row["slices"]).parent
        for item in read_slice_index(index_path):
            if item.get("participant_id") != row["participant_id"]:
                raise ManifestError(
                    f"{index_path}: lists {item.get('participant_id')}, expected "
                    f"{row['participant_id']}"
                )
            item = dict(item)
            for key in ("file", "mask_file", "dseg_file"):
                if item.get(key):
                    item[key] = (folder / item[key]).as_posix()
            item["split"] = row["split"]
            if "fold" in row:
                item["fold"] = row["fold"]
            out.append(item)
    if not out:
        raise ManifestError("no slice index is listed in the manifest (nothing to write)")
    return atomic_write_table(root / csv_name, out, columns)


def write_split_bundles(
    rows: Sequence[Mapping[str, Any]],
    root: str | Path,
    out_dir: str | Path,
    *,
    keys: Sequence[str] = ("image", "mask", "dseg"),
) -> dict[str, dict[str, Path]]:
    """Stack each split's volumes into ``<split>_<key>.npy`` of shape (n, X, Y, Z)
    (``(n, X, Y, Z, C)`` when ``image`` is a 4D multi-channel stack).

    Images are stored as float32, masks and dseg as the smallest unsigned integer
    type. ``<split>_index.csv`` gives the row order (participant_id, session_id[, fold]).
    Open with ``np.load(path, mmap_mode="r")`` to read subjects without loading the
    whole array. Volumes are written one at a time into a memory-mapped file, so
    memory stays at one volume.

    Raises
    ------
    ManifestError
        A volume's shape differs from the split's first volume (bundles need the
        fixed-shape export), or a key is not in the manifest.
    """
    root, out_dir = Path(root), Path(out_dir)
    rows = list(rows)
    for key in keys:
        if key not in ("image", "mask", "dseg"):
            raise ManifestError(f"bundle keys must be among image, mask, dseg; got {key!r}")
        if rows and key not in rows[0]:
            raise ManifestError(f"the manifest has no {key!r} files to bundle")
    written: dict[str, dict[str, Path]] = {}
    for name in SPLIT_NAMES:
        members = [r for r in rows if r["split"] == name]
        if not members:
            continue
        written[name] = {}
        for key in keys:
            written[name][key] = _write_bundle(
                [root / r[key] for r in members], out_dir / f"{name}_{key}.npy", key
            )
        index_cols = ["participant_id", "session_id"] + (["fold"] if "fold" in members[0] else [])
        written[name]["index"] = atomic_write_table(
            out_dir / f"{name}_index.csv", members, index_cols
        )
    return written


def _write_bundle(paths: list[Path], target: Path, key: str) -> Path:
    first = nib.load(str(paths[0]))
    # a multi-channel stack keeps its channels (last axis); a trailing axis of 1 goes
    shape = first.shape[:3] if first.shape[3:] in ((), (1,)) else first.shape
    if key == "image":
        dtype = np.dtype(np.float32)
    else:
        dtype = np.dtype(label_dtype(np.asanyarray(first.dataobj)))

    def write(tmp: Path) -> None:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(len(paths), *shape))
        for i, path in enumerate(paths):
            img = first if i == 0 else nib.load(str(path))
            data = np.asanyarray(img.dataobj)
            if data.ndim == 4 and len(shape) == 3 and data.shape[3] == 1:
                data = data[..., 0]
            if data.shape != shape:
                raise ManifestError(
                    f"{path}: shape {data.shape} differs from {shape} of {paths[0]}; "
                    "bundles need volumes of one fixed shape"
                )
            if key != "image":
                label_dtype(data)  # integer labels in range, else a clear error
                if data.max(initial=0) > np.iinfo(dtype).max:
                    raise ManifestError(f"{path}: label values exceed {dtype}")
            array[i] = data.astype(dtype)
        array.flush()
        del array

    os.makedirs(target.parent, exist_ok=True)
    return atomic_write(target, write)
