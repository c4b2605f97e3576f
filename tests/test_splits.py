"""Subject-level splits: no leakage, reproducible, fractions and class ratios met."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mriflow.ml.splits import (
    SPLIT_NAMES,
    ParticipantsError,
    SplitError,
    make_splits,
    read_participants,
    read_splits,
    split_participants,
    write_splits,
)

FRACTIONS = st.sampled_from(
    [
        (0.7, 0.15, 0.15),
        (0.8, 0.1, 0.1),
        (0.6, 0.2, 0.2),
        (0.5, 0.5),
        (1 / 3, 1 / 3, 1 / 3),
        (0.9, 0.0, 0.1),
        (0.75, 0.25, 0.0),
    ]
)


def _subjects(n: int) -> list[str]:
    return [f"sub-{i:03d}" for i in range(n)]


def _within_one(count: int, target: float) -> bool:
    """count is floor or ceil of target (with a tolerance for float targets)."""
    return math.floor(target + 1e-9) <= count <= math.ceil(target - 1e-9)


@settings(max_examples=150, deadline=None)
@given(n=st.integers(1, 80), fractions=FRACTIONS, seed=st.integers(0, 2**31))
def test_every_subject_in_exactly_one_split_and_fractions_met_within_one(n, fractions, seed):
    subjects = _subjects(n)
    result = make_splits(subjects, fractions=fractions, seed=seed)
    assert sorted(result.split) == subjects  # nobody lost, nobody added
    members = [set(result.members(name)) for name in SPLIT_NAMES]
    assert sum(len(m) for m in members) == n  # so the splits are disjoint
    for name, fraction in zip(SPLIT_NAMES, fractions, strict=False):
        assert _within_one(len(result.members(name)), n * fraction), (name, n, fractions)


@settings(max_examples=150, deadline=None)
@given(
    labels=st.lists(st.sampled_from(["AD", "CN", "MCI", "n/a"]), min_size=1, max_size=90),
    fractions=FRACTIONS,
    seed=st.integers(0, 2**31),
)
def test_stratification_keeps_class_ratios_within_one_subject_per_split(labels, fractions, seed):
    subjects = _subjects(len(labels))
    strata = dict(zip(subjects, labels, strict=True))
    result = make_splits(subjects, fractions=fractions, seed=seed, strata=strata)
    n_class = Counter(labels)
    for name, fraction in zip(SPLIT_NAMES, fractions, strict=False):
        in_split = Counter(strata[s] for s in result.members(name))
        for cls, total in n_class.items():
            assert _within_one(in_split[cls], total * fraction), (name, cls, in_split, n_class)
        # ... and the split's size is still met within one subject.
        assert _within_one(len(result.members(name)), len(labels) * fraction)


def test_same_seed_same_split_other_seed_other_split_input_order_irrelevant():
    subjects = _subjects(60)
    strata = {s: ("F" if i % 3 else "M") for i, s in enumerate(subjects)}
    a = make_splits(subjects, seed=7, strata=strata)
    b = make_splits(list(reversed(subjects)), seed=7, strata=strata)
    c = make_splits(subjects, seed=8, strata=strata)
    assert a.split == b.split
    assert a.split != c.split
    # The same with groups and with folds.
    groups = {s: f"site{i % 9}" for i, s in enumerate(subjects)}
    assert (
        make_splits(subjects, seed=1, groups=groups).split
        == make_splits(subjects[::-1], seed=1, groups=groups).split
    )
    assert (
        make_splits(subjects, seed=1, groups=groups).split
        != make_splits(subjects, seed=2, groups=groups).split
    )
    assert (
        make_splits(subjects, seed=3, n_folds=5).fold
        == make_splits(subjects, seed=3, n_folds=5).fold
    )
    assert (
        make_splits(subjects, seed=3, n_folds=5).fold
        != make_splits(subjects, seed=4, n_folds=5).fold
    )


@settings(max_examples=100, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 6), min_size=2, max_size=30),
    stratify=st.booleans(),
    fractions=FRACTIONS,
    seed=st.integers(0, 2**31),
)
def test_groups_never_straddle_splits_and_sizes_stay_close(sizes, stratify, fractions, seed):
    subjects, groups, strata = [], {}, {}
    for g, size in enumerate(sizes):
        for k in range(size):
            s = f"sub-g{g:02d}m{k}"
            subjects.append(s)
            groups[s] = f"family{g}"
            strata[s] = "AB"[(g + k) % 2]
    result = make_splits(
        subjects, fractions=fractions, seed=seed, groups=groups, strata=strata if stratify else None
    )
    split_of_group: dict[str, set[str]] = {}
    for s in subjects:
        split_of_group.setdefault(groups[s], set()).add(result.split[s])
    assert all(len(v) == 1 for v in split_of_group.values())
    largest = max(sizes)
    n_splits = len(fractions)
    bound = largest if not stratify else (n_splits - 1) * largest
    for name, fraction in zip(SPLIT_NAMES, fractions, strict=False):
        assert abs(len(result.members(name)) - fraction * len(subjects)) <= bound + 1e-9


@settings(max_examples=60, deadline=None)
@given(n=st.integers(10, 60), k=st.integers(2, 5), seed=st.integers(0, 2**31))
def test_k_folds_partition_the_pool_and_hold_out_the_test_share(n, k, seed):
    subjects = _subjects(n)
    strata = {s: "XY"[i % 2] for i, s in enumerate(subjects)}
    result = make_splits(subjects, fractions=(0.7, 0.15, 0.15), n_folds=k, seed=seed, strata=strata)
    test = result.members("test")
    assert set(result.split.values()) <= {"train", "test"}
    assert all(result.fold[s] is None for s in test)
    pool = [s for s in subjects if result.split[s] == "train"]
    folds = Counter(result.fold[s] for s in pool)
    assert set(folds) == set(range(k))
    # Each fold and the test set are within one subject of their share.
    assert _within_one(len(test), n * 0.15)
    for fold in range(k):
        assert _within_one(folds[fold], n * 0.85 / k)


def test_participants_tsv_drives_stratify_and_group_and_files_round_trip(tmp_path):
    tsv = tmp_path / "participants.tsv"
    lines = ["participant_id\tdiagnosis\tsite\tage"]
    for i in range(40):
        lines.append(f"sub-{i:02d}\t{'AD' if i % 4 == 0 else 'CN'}\tsite{i % 5}\t{50 + i}")
    lines.append("sub-99\tCN\tsite0\t70")  # listed but without data: ignored
    tsv.write_text("\ufeff" + "\r\n".join(lines) + "\r\n")  # BOM and CRLF are accepted
    subjects = [f"{i:02d}" for i in range(40)]  # ids without the sub- prefix are fine
    result = split_participants(subjects, tsv, seed=5, stratify_by="diagnosis", group_by="site")
    assert "sub-99" not in result.split
    for site in range(5):
        members = [f"sub-{i:02d}" for i in range(40) if i % 5 == site]
        assert len({result.split[s] for s in members}) == 1
    tsv_out, json_out = write_splits(result, tmp_path / "splits.tsv")
    assert read_splits(tsv_out) == {s: (result.split[s], None) for s in result.split}
    info = json.loads(json_out.read_text())
    assert info["Seed"] == 5 and info["StratifyBy"] == "diagnosis" and info["GroupBy"] == "site"
    assert sum(info["Counts"].values()) == 40
    binned = split_participants(subjects, tsv, seed=5, stratify_by="age", stratify_bins=4)
    assert set(binned.strata.values()) == {"q1", "q2", "q3", "q4"}
    folds = make_splits(subjects, n_folds=4, seed=1)
    write_splits(folds, tmp_path / "folds.tsv")
    header = (tmp_path / "folds.tsv").read_text().splitlines()[0]
    assert header == "participant_id\tsplit\tfold"
    assert read_splits(tmp_path / "folds.tsv") == {
        s: (folds.split[s], folds.fold[s]) for s in folds.split
    }


def test_participants_errors_name_the_file_and_the_problem(tmp_path):
    path = tmp_path / "participants.tsv"
    with pytest.raises(ParticipantsError, match="not found"):
        read_participants(path)
    path.write_text("participant_id,age\nsub-01,30\n")
    with pytest.raises(ParticipantsError, match="comma-separated"):
        read_participants(path)
    path.write_text("subject\tage\nsub-01\t30\n")
    with pytest.raises(ParticipantsError, match="no 'participant_id' column"):
        read_participants(path)
    path.write_text("participant_id\tage\nsub-01\t30\nsub-02\n")
    with pytest.raises(ParticipantsError, match=r"line 3: expected 2 tab-separated values"):
        read_participants(path)
    path.write_text("participant_id\tage\nsub-01\t30\n01\t31\n")
    with pytest.raises(ParticipantsError, match="repeats line 2"):
        read_participants(path)
    path.write_text("participant_id\tage\nsub-01\tn/a\nsub-02\t31\n")
    table = read_participants(path)
    with pytest.raises(ParticipantsError, match=r"participants.tsv: no column 'sex'"):
        table.column("sex")
    with pytest.raises(ParticipantsError, match="no row for 1 subject"):
        table.column("age", ["sub-01", "sub-03"])
    assert table.column("age") == {"sub-01": "n/a", "sub-02": "31"}


def test_parameters_are_validated():
    with pytest.raises(SplitError, match="sum to 1"):
        make_splits(_subjects(5), fractions=(0.5, 0.2, 0.2))
    with pytest.raises(SplitError, match=r"\(train, val\)"):
        make_splits(_subjects(5), fractions=(1.0,))
    with pytest.raises(SplitError, match="repeated"):
        make_splits(["sub-01", "01"])
    with pytest.raises(SplitError, match="too few"):
        make_splits(_subjects(3), n_folds=5)
    with pytest.raises(SplitError, match="strata has no value"):
        make_splits(_subjects(3), strata={"sub-000": "a"})
    with pytest.raises(SplitError, match="need a participants.tsv"):
        split_participants(_subjects(3), None, stratify_by="sex")


def test_bids_examples_participants_split(data_dir):
    """The real bids-examples participants.tsv files read and split by sex."""
    for name in ("ds001", "7t_trt", "synthetic"):
        table = read_participants(data_dir / "bids_layouts" / name / "participants.tsv")
        result = split_participants(
            table.participants, table, seed=0, stratify_by="sex", fractions=(0.6, 0.2, 0.2)
        )
        assert sorted(result.split) == sorted(table.participants)
