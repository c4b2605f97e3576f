"""Subject-level train/val/test splits and k folds: seeded, stratified, grouped.

Splitting by subject (not by scan or slice) is what keeps a test set honest:
slice-level splits of the same brains inflate accuracy by tens of points
(Yagis et al., Sci Rep 2021). Every session and every slice of a subject
inherits the subject's split.

Guarantees of :func:`make_splits` (tested in ``tests/test_splits.py``):

- each subject is in exactly one split (and at most one fold);
- the same subjects, parameters and seed give the same splits, whatever the
  order the subjects are listed in;
- without grouping, each split holds ``floor`` or ``ceil`` of ``fraction * n``
  subjects, and with stratification each class holds ``floor`` or ``ceil`` of
  ``fraction * n_class`` in every split (a controlled rounding of the table of
  targets, which always exists; found here with a small max-flow);
- with grouping, no group straddles two splits; groups are placed largest
  first, so a split misses its target by less than the largest group without
  stratification and by less than ``(n_splits - 1) *`` the largest group with it.

Why not scikit-learn's splitters: ``GroupShuffleSplit`` counts its fractions
in groups, not subjects, and ``StratifiedShuffleSplit`` makes two-way splits,
so a three-way split by two calls can miss the class counts by more than one.
"""

from __future__ import annotations

import csv
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from mriflow.bids.paths import atomic_write_json, atomic_write_table

__all__ = [
    "SPLIT_NAMES",
    "MISSING",
    "ParticipantsError",
    "ParticipantsTable",
    "SplitError",
    "SplitResult",
    "read_participants",
    "normalize_participant_id",
    "quantile_bins",
    "make_splits",
    "split_participants",
    "write_splits",
    "read_splits",
]

SPLIT_NAMES: tuple[str, ...] = ("train", "val", "test")
MISSING = "n/a"
_MISSING_VALUES = {"", "n/a", "na", "nan", "none", "null"}


class ParticipantsError(ValueError):
    """participants.tsv cannot be used; the message names the file, line or column."""


class SplitError(ValueError):
    """Split parameters or inputs are invalid; the message says what was expected."""


# --- participants.tsv ----------------------------------------------------------------


def normalize_participant_id(value: str) -> str:
    """``"01"`` or ``"sub-01"`` -> ``"sub-01"``."""
    value = str(value).strip()
    if not value:
        raise ValueError("participant_id must not be empty")
    return value if value.startswith("sub-") else f"sub-{value}"


@dataclass(frozen=True)
class ParticipantsTable:
    """The rows of a participants.tsv, keyed by ``participant_id`` (``sub-`` prefixed).

    Missing values (empty, ``n/a``) are stored as :data:`MISSING`.
    """

    path: Path | None
    columns: tuple[str, ...]
    rows: dict[str, dict[str, str]]

    @property
    def participants(self) -> list[str]:
        return list(self.rows)

    def column(self, name: str, subjects: Iterable[str] | None = None) -> dict[str, str]:
        """``{participant_id: value}`` of column ``name`` for ``subjects`` (default: all).

        Raises
        ------
        ParticipantsError
            The column does not exist, or a subject has no row.
        """
        where = str(self.path) if self.path else "participants table"
        if name not in self.columns:
            raise ParticipantsError(
                f"{where}: no column {name!r} (columns: {', '.join(self.columns)})"
            )
        ids = (
            list(self.rows) if subjects is None else [normalize_participant_id(s) for s in subjects]
        )
        absent = [s for s in ids if s not in self.rows]
        if absent:
            shown = ", ".join(absent[:10]) + (" ..." if len(absent) > 10 else "")
            raise ParticipantsError(
                f"{where}: no row for {len(absent)} subject(s) with data: {shown}"
            )
        return {s: self.rows[s][name] for s in ids}


def read_participants(path: str | Path) -> ParticipantsTable:
    """Read a BIDS ``participants.tsv`` with errors that name the file and line.

    Accepts a UTF-8 byte-order mark, CRLF line ends, surrounding spaces and ids
    without the ``sub-`` prefix; rejects comma-separated files, ragged rows,
    empty or duplicate ids.
    """
    path = Path(path)
    if not path.is_file():
        raise ParticipantsError(f"{path}: participants file not found")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise ParticipantsError(f"{path}: not UTF-8 text ({err})") from None
    lines = [(n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if not lines:
        raise ParticipantsError(f"{path}: file is empty (expected a header with participant_id)")
    header_line = lines[0][1]
    if "\t" not in header_line and "," in header_line:
        raise ParticipantsError(
            f"{path}: the header looks comma-separated; BIDS participants.tsv is tab-separated"
        )
    header = [h.strip() for h in next(csv.reader([header_line], delimiter="\t"))]
    if "participant_id" not in header:
        raise ParticipantsError(
            f"{path}: no 'participant_id' column in the header (got: {', '.join(header)})"
        )
    duplicated = [c for c, n in Counter(header).items() if n > 1]
    if duplicated:
        raise ParticipantsError(f"{path}: repeated column(s) in the header: {duplicated}")
    id_col = header.index("participant_id")
    rows: dict[str, dict[str, str]] = {}
    first_line: dict[str, int] = {}
    for number, line in lines[1:]:
        values = [v.strip() for v in next(csv.reader([line], delimiter="\t"))]
        if len(values) != len(header):
            raise ParticipantsError(
                f"{path}, line {number}: expected {len(header)} tab-separated values, "
                f"got {len(values)}"
            )
        raw_id = values[id_col]
        if raw_id.lower() in _MISSING_VALUES:
            raise ParticipantsError(f"{path}, line {number}: empty participant_id")
        pid = normalize_participant_id(raw_id)
        if pid in rows:
            raise ParticipantsError(
                f"{path}, line {number}: participant_id {pid} repeats line {first_line[pid]}"
            )
        first_line[pid] = number
        rows[pid] = {
            col: (MISSING if val.lower() in _MISSING_VALUES else val)
            for col, val in zip(header, values, strict=True)
        }
        rows[pid]["participant_id"] = pid
    return ParticipantsTable(path=path, columns=tuple(header), rows=rows)


def quantile_bins(values: Mapping[str, str], n_bins: int) -> dict[str, str]:
    """Bin a numeric column into ``n_bins`` quantile classes (``q1``..``qN``) for stratifying.

    Missing values stay :data:`MISSING` (a class of their own). Use this for
    continuous columns such as age, which would otherwise make one class per value.
    """
    if n_bins < 2:
        raise SplitError(f"n_bins must be >= 2, got {n_bins}")
    numeric: dict[str, float] = {}
    for key, value in values.items():
        if value == MISSING:
            continue
        try:
            numeric[key] = float(value)
        except ValueError:
            raise SplitError(
                f"cannot bin non-numeric value {value!r} of {key} into quantiles"
            ) from None
    out = {key: MISSING for key in values}
    if numeric:
        data = np.array(list(numeric.values()))
        edges = np.quantile(data, np.linspace(0, 1, n_bins + 1)[1:-1])
        for key, x in numeric.items():
            out[key] = f"q{int(np.searchsorted(edges, x, side='right')) + 1}"
    return out


# --- splitting -----------------------------------------------------------------------


@dataclass(frozen=True)
class SplitResult:
    """Subject -> split (and fold) with the parameters that produced it.

    ``split`` is ``train``, ``val`` or ``test``. With k folds, the subjects of the
    cross-validation pool have split ``train`` and ``fold`` 0..k-1 (the fold in
    which they are validation subjects); held-out test subjects have fold ``None``.
    """

    split: dict[str, str]
    fold: dict[str, int | None]
    parameters: dict[str, Any] = field(default_factory=dict)
    strata: dict[str, str] | None = None
    groups: dict[str, str] | None = None

    @property
    def subjects(self) -> list[str]:
        return sorted(self.split)

    def members(self, split: str, fold: int | None = None) -> list[str]:
        """Sorted subjects of ``split`` (and ``fold``, if given)."""
        return sorted(
            s
            for s, name in self.split.items()
            if name == split and (fold is None or self.fold[s] == fold)
        )

    def counts(self) -> dict[str, int]:
        return dict(Counter(self.split.values()))


def _as_fraction(value: float) -> Fraction:
    return Fraction(repr(float(value))).limit_denominator(10**6)


def _check_fractions(fractions: Sequence[float]) -> list[Fraction]:
    if len(fractions) not in (2, 3):
        raise SplitError(
            f"fractions must be (train, val) or (train, val, test), got {list(fractions)}"
        )
    values = [float(f) for f in fractions]
    if any(not math.isfinite(f) or f < 0 or f > 1 for f in values):
        raise SplitError(f"fractions must each be in [0, 1], got {list(fractions)}")
    if abs(sum(values) - 1.0) > 1e-6:
        raise SplitError(f"fractions must sum to 1, got {list(fractions)} (sum {sum(values)})")
    exact = [_as_fraction(f) for f in values]
    total = sum(exact)
    return [f / total for f in exact]


def _max_flow_rounding(
    counts: list[int], fractions: list[Fraction], rng: np.random.Generator
) -> np.ndarray:
    """Integer table x[c, s] with x in {floor, ceil}(counts[c] * f[s]), rows summing to
    counts[c] and column sums in {floor, ceil}(sum(counts) * f[s]).

    Start from the floors; the remainders (< n_splits per class) are routed from
    classes to splits with a max-flow that first fills each split up to the floor
    of its total target, then up to the ceiling. Controlled rounding of a
    two-way table always exists (Bacharach 1966), so the flow saturates. The
    seeded shuffles decide which split gets a spare subject.
    """
    n_classes, n_splits = len(counts), len(fractions)
    target = [[n * f for f in fractions] for n in counts]
    base = np.array([[math.floor(t) for t in row] for row in target], dtype=int)
    remainder = [counts[c] - int(base[c].sum()) for c in range(n_classes)]
    totals = [sum(counts) * f for f in fractions]
    lower = [math.floor(totals[s]) - int(base[:, s].sum()) for s in range(n_splits)]
    upper = [math.ceil(totals[s]) - int(base[:, s].sum()) for s in range(n_splits)]
    allowed = [[s for s in range(n_splits) if target[c][s] != base[c][s]] for c in range(n_classes)]
    extra = np.zeros_like(base)
    sent = [0] * n_classes  # flow source -> class
    received = [0] * n_splits  # flow split -> sink
    class_order = list(rng.permutation(n_classes))
    split_order = [list(rng.permutation(n_splits)) for _ in range(n_classes)]

    def augment(capacity: list[int]) -> bool:
        # Breadth-first search over source -> class -> split -> sink, with residual
        # edges split -> class where flow was already sent (to reroute it).
        parent: dict[tuple[str, int], tuple[str, int] | None] = {}
        queue: list[tuple[str, int]] = []
        for c in class_order:
            if sent[c] < remainder[c]:
                parent[("c", c)] = None
                queue.append(("c", c))
        while queue:
            kind, node = queue.pop(0)
            if kind == "c":
                for s in split_order[node]:
                    if s in allowed[node] and extra[node, s] == 0 and ("s", s) not in parent:
                        parent[("s", s)] = ("c", node)
                        if received[s] < capacity[s]:
                            # Found a path to the sink: push one unit along it.
                            received[s] += 1
                            step: tuple[str, int] | None = ("s", s)
                            while step is not None:
                                prev = parent[step]
                                if prev is None:
                                    sent[step[1]] += 1
                                elif step[0] == "s":
                                    extra[prev[1], step[1]] += 1
                                else:
                                    extra[step[1], prev[1]] -= 1
                                step = prev
                            return True
                        queue.append(("s", s))
            else:
                for c in class_order:
                    if extra[c, node] == 1 and ("c", c) not in parent:
                        parent[("c", c)] = ("s", node)
                        queue.append(("c", c))
        return False

    for capacity in (lower, upper):
        while augment(capacity):
            pass
    if sent != remainder:  # cannot happen for valid input; a guard, not a fallback
        raise RuntimeError("controlled rounding failed; please report this as a bug")
    return base + extra


def _greedy_groups(
    units: list[list[str]],
    strata: Mapping[str, str] | None,
    fractions: list[Fraction],
    rng: np.random.Generator,
) -> list[int]:
    """Place each unit (a group of subjects) in one split, largest first."""
    n_splits = len(fractions)
    n_total = sum(len(u) for u in units)
    totals = np.array([float(n_total * f) for f in fractions])
    classes = sorted({strata[s] for u in units for s in u}) if strata else []
    class_index = {c: i for i, c in enumerate(classes)}
    class_totals = np.zeros(len(classes))
    unit_classes = []
    for unit in units:
        vec = np.zeros(len(classes))
        for s in unit:
            if strata:
                vec[class_index[strata[s]]] += 1
        unit_classes.append(vec)
        class_totals += vec
    class_targets = np.outer(class_totals, [float(f) for f in fractions])  # (classes, splits)
    filled = np.zeros(n_splits)
    class_filled = np.zeros((len(classes), n_splits))
    # Largest first (ties in seeded random order): large groups are hard to fit late.
    shuffled = list(rng.permutation(len(units)))
    order = sorted(shuffled, key=lambda i: -len(units[i]))
    placement = [0] * len(units)
    for i in order:
        size = len(units[i])
        deficit = totals - filled
        tie_break = rng.random(n_splits)
        if strata:
            # Among splits still short of their target, add the group where it moves
            # the class counts closest to their targets.
            vec = unit_classes[i][:, None]
            cost = ((class_filled + vec - class_targets) ** 2) - (class_filled - class_targets) ** 2
            cost = cost.sum(axis=0)
            candidates = [s for s in range(n_splits) if deficit[s] > 1e-9]
            best = min(candidates, key=lambda s: (cost[s], -deficit[s], tie_break[s]))
        else:
            best = max(range(n_splits), key=lambda s: (deficit[s], tie_break[s]))
        placement[i] = best
        filled[best] += size
        if strata:
            class_filled[:, best] += unit_classes[i]
    return placement


def make_splits(
    subjects: Iterable[str],
    *,
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    n_folds: int = 0,
    seed: int = 42,
    strata: Mapping[str, str] | None = None,
    groups: Mapping[str, str] | None = None,
) -> SplitResult:
    """Assign subjects to train/val/test, or to k cross-validation folds.

    Parameters
    ----------
    subjects : iterable of str
        Participant ids (``sub-`` prefix optional); duplicates are an error.
    fractions : (train, val[, test]) floats summing to 1
        Shares of subjects per split. With ``n_folds > 1`` only the test share
        is used: that share is held out and the rest is divided into folds.
    n_folds : int
        0 (or 1) for a single split by ``fractions``; k > 1 for k folds.
    seed : int
        Seed of the shuffles; the input order of ``subjects`` does not matter.
    strata : mapping subject -> class, optional
        Keep the class ratios in every split (e.g. diagnosis, sex, binned age).
    groups : mapping subject -> group, optional
        Keep each group (site, family) in one split. A missing group
        (:data:`MISSING`) makes the subject a group of its own.

    Returns
    -------
    SplitResult
    """
    ids = [normalize_participant_id(s) for s in subjects]
    repeated = sorted(s for s, n in Counter(ids).items() if n > 1)
    if repeated:
        raise SplitError(f"subjects must be unique, repeated: {repeated[:10]}")
    if not ids:
        raise SplitError("no subjects to split")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise SplitError(f"seed must be an integer, got {seed!r}")
    if isinstance(n_folds, bool) or not isinstance(n_folds, (int, np.integer)) or n_folds < 0:
        raise SplitError(f"n_folds must be 0 (no folds) or an integer >= 2, got {n_folds!r}")
    exact = _check_fractions(fractions)
    strata = _per_subject(strata, ids, "strata")
    groups = _per_subject(groups, ids, "groups")

    if n_folds > 1:
        test = exact[2] if len(exact) == 3 else Fraction(0)
        pool = 1 - test
        if pool == 0:
            raise SplitError("with folds, the test fraction must leave subjects for the folds")
        bins = [pool / n_folds] * n_folds + ([test] if test > 0 else [])
        n_pool = len(ids) - math.ceil(len(ids) * test)
        if n_pool < n_folds:
            raise SplitError(f"{len(ids)} subjects are too few for {n_folds} folds")
    else:
        bins = exact

    ordered = sorted(ids)
    rng = np.random.default_rng(seed)
    if groups is None or all(
        n == 1 for n in Counter(g for g in groups.values() if g != MISSING).values()
    ):
        # Every subject is its own group: exact controlled rounding.
        labels = [strata[s] for s in ordered] if strata else ["all"] * len(ordered)
        classes = sorted(set(labels))
        members = {
            c: [s for s, lab in zip(ordered, labels, strict=True) if lab == c] for c in classes
        }
        table = _max_flow_rounding([len(members[c]) for c in classes], bins, rng)
        placement: dict[str, int] = {}
        for ci, c in enumerate(classes):
            shuffled = [members[c][i] for i in rng.permutation(len(members[c]))]
            start = 0
            for b, n in enumerate(table[ci]):
                for s in shuffled[start : start + int(n)]:
                    placement[s] = b
                start += int(n)
    else:
        unit_of: dict[str, str] = {}
        for s in ordered:
            g = groups[s]
            unit_of[s] = f"\0{s}" if g == MISSING else g
        grouped: dict[str, list[str]] = defaultdict(list)
        for s in ordered:
            grouped[unit_of[s]].append(s)
        units = [grouped[k] for k in sorted(grouped)]
        where = _greedy_groups(units, strata, bins, rng)
        placement = {s: where[i] for i, unit in enumerate(units) for s in unit}

    if n_folds > 1:
        split = {s: ("test" if b == n_folds else "train") for s, b in placement.items()}
        fold = {s: (None if b == n_folds else b) for s, b in placement.items()}
    else:
        split = {s: SPLIT_NAMES[b] for s, b in placement.items()}
        fold = {s: None for s in placement}
    parameters = {
        "Seed": int(seed),
        "Fractions": [float(f) for f in fractions],
        "NFolds": int(n_folds),
    }
    return SplitResult(
        split=dict(sorted(split.items())),
        fold=dict(sorted(fold.items())),
        parameters=parameters,
        strata=strata,
        groups=groups,
    )


def _per_subject(
    mapping: Mapping[str, str] | None, ids: list[str], name: str
) -> dict[str, str] | None:
    if mapping is None:
        return None
    normalized = {normalize_participant_id(k): str(v) for k, v in mapping.items()}
    absent = [s for s in ids if s not in normalized]
    if absent:
        raise SplitError(f"{name} has no value for {len(absent)} subject(s): {absent[:10]}")
    return {s: normalized[s] for s in ids}


def split_participants(
    subjects: Iterable[str],
    participants: ParticipantsTable | str | Path | None = None,
    *,
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    n_folds: int = 0,
    seed: int = 42,
    stratify_by: str = "",
    group_by: str = "",
    stratify_bins: int = 0,
) -> SplitResult:
    """:func:`make_splits` with the strata and groups taken from participants.tsv columns.

    Parameters
    ----------
    subjects : iterable of str
        The subjects that have data (participants.tsv may list more; they are ignored).
    participants : ParticipantsTable or path, optional
        Needed when ``stratify_by`` or ``group_by`` is set.
    stratify_by, group_by : str
        Column names ("" for none).
    stratify_bins : int
        > 1 to bin a numeric ``stratify_by`` column into that many quantile classes.
    """
    subjects = [normalize_participant_id(s) for s in subjects]
    table: ParticipantsTable | None
    if isinstance(participants, (str, Path)):
        table = read_participants(participants)
    else:
        table = participants
    if (stratify_by or group_by) and table is None:
        raise SplitError(
            f"stratify_by={stratify_by!r} / group_by={group_by!r} need a participants.tsv"
        )
    strata = table.column(stratify_by, subjects) if stratify_by and table else None
    if strata is not None and stratify_bins > 1:
        strata = quantile_bins(strata, stratify_bins)
    groups = table.column(group_by, subjects) if group_by and table else None
    result = make_splits(
        subjects, fractions=fractions, n_folds=n_folds, seed=seed, strata=strata, groups=groups
    )
    result.parameters.update(
        {
            "StratifyBy": stratify_by or None,
            "StratifyBins": stratify_bins if stratify_by and stratify_bins > 1 else None,
            "GroupBy": group_by or None,
            "ParticipantsFile": str(table.path) if table is not None and table.path else None,
        }
    )
    return result


# --- files ---------------------------------------------------------------------------


def write_splits(
    result: SplitResult, tsv_path: str | Path, json_path: str | Path | None = None
) -> tuple[Path, Path]:
    """Write ``splits.tsv`` (participant_id, split[, fold]) and its JSON (seed, parameters).

    The JSON defaults to the TSV's name with ``.json``; it also records the counts
    per split, per class and the number of groups, so a reader can check the split.
    """
    from mriflow import __version__

    tsv_path = Path(tsv_path)
    json_path = Path(json_path) if json_path else tsv_path.with_suffix(".json")
    with_folds = result.parameters.get("NFolds", 0) > 1
    columns = ["participant_id", "split"] + (["fold"] if with_folds else [])
    rows = [
        {
            "participant_id": s,
            "split": result.split[s],
            "fold": MISSING if result.fold[s] is None else result.fold[s],
        }
        for s in result.subjects
    ]
    atomic_write_table(tsv_path, rows, columns, delimiter="\t")

    counts: dict[str, Any] = {name: len(result.members(name)) for name in SPLIT_NAMES}
    summary: dict[str, Any] = {
        "Description": "Subject-level data split; every session and slice of a subject "
        "belongs to the subject's split.",
        "GeneratedBy": {"Name": "mriflow", "Version": __version__},
        **result.parameters,
        "Counts": {k: v for k, v in counts.items() if v or k != "test"},
    }
    if with_folds:
        summary["FoldCounts"] = {
            str(k): len(result.members("train", k)) for k in range(result.parameters["NFolds"])
        }
    if result.strata is not None:
        summary["ClassCounts"] = {
            name: dict(sorted(Counter(result.strata[s] for s in result.members(name)).items()))
            for name in SPLIT_NAMES
            if result.members(name)
        }
    if result.groups is not None:
        summary["GroupCounts"] = {
            name: len(
                {result.groups[s] for s in result.members(name) if result.groups[s] != MISSING}
            )
            for name in SPLIT_NAMES
            if result.members(name)
        }
    summary["Columns"] = {
        "participant_id": "BIDS participant id",
        "split": "train, val or test",
        **(
            {
                "fold": "cross-validation fold in which the subject is a validation subject "
                "(n/a for test subjects)"
            }
            if with_folds
            else {}
        ),
    }
    atomic_write_json(json_path, summary)
    return tsv_path, json_path


def read_splits(path: str | Path) -> dict[str, tuple[str, int | None]]:
    """Read ``splits.tsv``: ``{participant_id: (split, fold or None)}``."""
    path = Path(path)
    if not path.is_file():
        raise SplitError(f"{path}: splits file not found")
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle, delimiter="\t")
        fields = reader.fieldnames or []
        if "participant_id" not in fields or "split" not in fields:
            raise SplitError(f"{path}: expected columns participant_id and split, got {fields}")
        out: dict[str, tuple[str, int | None]] = {}
        for number, row in enumerate(reader, start=2):
            split = (row["split"] or "").strip()
            if split not in SPLIT_NAMES:
                raise SplitError(f"{path}, line {number}: split must be one of {SPLIT_NAMES}")
            raw_fold = (row.get("fold") or "").strip()
            fold = None if raw_fold.lower() in _MISSING_VALUES else int(raw_fold)
            out[normalize_participant_id(row["participant_id"])] = (split, fold)
    return out
