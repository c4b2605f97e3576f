"""The dataset manifest loads with plain numpy/nibabel; no subject leaks across splits."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from mriflow.ml.manifest import (
    ManifestEntry,
    ManifestError,
    build_manifest,
    load_manifest,
    select,
    write_manifest,
    write_slices_manifest,
    write_split_bundles,
)
from mriflow.ml.slices import export_slices
from mriflow.ml.splits import make_splits, read_participants, read_splits, write_splits

SHAPE = (8, 10, 6)
SPACE = "MNI152NLin2009aSym"


def _derivatives(root: Path, sessions: dict[str, list[str]]) -> list[ManifestEntry]:
    """A small derivatives tree: model-ready image, mask, dseg and slices per subject/session."""
    rng = np.random.default_rng(0)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [-8.0, -10.0, -6.0]
    entries = []
    for sub, sess in sessions.items():
        for ses in sess or [""]:
            folder = root / f"sub-{sub}" / (f"ses-{ses}" if ses else "") / "anat"
            folder.mkdir(parents=True)
            stem = f"sub-{sub}" + (f"_ses-{ses}" if ses else "") + f"_space-{SPACE}"
            data = rng.normal(size=SHAPE).astype(np.float32)
            mask = np.zeros(SHAPE, np.uint8)
            mask[2:6, 2:8, 1:5] = 1
            dseg = (mask * rng.integers(1, 4, size=SHAPE)).astype(np.uint8)
            images = {}
            for name, array in (
                ("desc-model_T1w", data),
                ("desc-model_mask", mask),
                ("desc-model_dseg", dseg),
            ):
                path = folder / f"{stem}_{name}.nii.gz"
                nib.save(nib.Nifti1Image(array, affine), path)
                images[name] = nib.load(path)
            export = export_slices(
                images["desc-model_T1w"],
                folder / "slices",
                stem,
                subject=sub,
                session=ses or None,
                space=SPACE,
                mask=images["desc-model_mask"],
                dseg=images["desc-model_dseg"],
            )
            entries.append(
                ManifestEntry(
                    participant_id=f"sub-{sub}",
                    session_id=ses,
                    image=folder / f"{stem}_desc-model_T1w.nii.gz",
                    mask=(folder / f"{stem}_desc-model_mask.nii.gz").relative_to(root),
                    dseg=folder / f"{stem}_desc-model_dseg.nii.gz",
                    slices=export.index_file,
                )
            )
    return entries


SESSIONS = {f"{i:02d}": (["1", "2"] if i % 3 == 0 else []) for i in range(12)}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    # Built once: the tests only add manifest files next to the derivatives.
    root = tmp_path_factory.mktemp("manifest") / "derivatives"
    entries = _derivatives(root, SESSIONS)
    (root / "participants.tsv").write_text(
        "participant_id\tdiagnosis\tage\n"
        + "".join(f"sub-{s}\t{'AD' if int(s) % 2 else 'CN'}\t{60 + int(s)}\n" for s in SESSIONS)
    )
    return root, entries


def test_manifest_loads_with_numpy_and_nibabel(dataset):
    root, entries = dataset
    participants = read_participants(root / "participants.tsv")
    splits = make_splits(
        participants.participants,
        seed=0,
        fractions=(0.5, 0.25, 0.25),
        strata=participants.column("diagnosis"),
    )
    write_splits(splits, root / "splits.tsv")
    rows = build_manifest(
        entries,
        read_splits(root / "splits.tsv"),
        root,
        participants=participants,
        columns=["diagnosis", "age"],
    )
    csv_path, json_path = write_manifest(rows, root, metadata={"Space": SPACE, "Shape": SHAPE})
    assert len(rows) == sum(max(1, len(s)) for s in SESSIONS.values())

    # Plain json + nibabel, as a user without mriflow would do.
    payload = json.loads(json_path.read_text())
    items = payload["training"] + payload["validation"] + payload["test"]
    assert len(items) == len(rows)
    assert payload["numTraining"] == len(payload["training"])
    for item in items:
        for key in ("image", "mask", "dseg", "slices"):
            assert not Path(item[key]).is_absolute()
        image = nib.load(root / item["image"])
        mask = nib.load(root / item["mask"])
        assert image.shape == mask.shape == nib.load(root / item["dseg"]).shape == SHAPE
        np.testing.assert_allclose(image.affine, mask.affine)
        assert item["diagnosis"] in ("AD", "CN") and isinstance(item["age"], int)
        assert isinstance(item["participant_id"], str) and item["participant_id"].startswith("sub-")
    # The CSV has the same rows, and load_manifest gives absolute paths that exist.
    with open(csv_path, newline="") as handle:
        csv_rows = list(csv.DictReader(handle))
    assert [r["image"] for r in csv_rows] == [r["image"] for r in rows]
    loaded = load_manifest(json_path, split="train")
    assert loaded and all(Path(d["image"]).is_file() for d in loaded)
    assert {d["split"] for d in loaded} == {"train"}

    # Sessions of one subject share the subject's split, and no subject is in two splits.
    split_of: dict[str, set[str]] = {}
    for row in rows:
        split_of.setdefault(row["participant_id"], set()).add(row["split"])
    assert all(len(v) == 1 for v in split_of.values())

    # Every exported slice carries its subject's split and points to a file on disk.
    slices_csv = write_slices_manifest(rows, root)
    with open(slices_csv, newline="") as handle:
        slice_rows = list(csv.DictReader(handle))
    assert slice_rows
    subject_split = {r["participant_id"]: r["split"] for r in rows}
    for row in slice_rows:
        assert row["split"] == subject_split[row["participant_id"]]
        for key in ("file", "mask_file", "dseg_file"):
            assert (root / row[key]).is_file()
    assert {r["space"] for r in slice_rows} == {SPACE}


def test_split_bundles_are_memory_mappable_and_match_the_volumes(dataset, tmp_path):
    root, entries = dataset
    splits = make_splits(dict.fromkeys(e.participant_id for e in entries), seed=1)
    rows = build_manifest(entries, splits, root)
    written = write_split_bundles(rows, root, tmp_path / "bundles")
    for name, files in written.items():
        members = [r for r in rows if r["split"] == name]
        image = np.load(files["image"], mmap_mode="r")
        dseg = np.load(files["dseg"], mmap_mode="r")
        assert isinstance(image, np.memmap)
        assert image.shape == (len(members), *SHAPE) and image.dtype == np.float32
        assert dseg.dtype == np.uint8
        with open(files["index"], newline="") as handle:
            order = [(r["participant_id"], r["session_id"]) for r in csv.DictReader(handle)]
        assert order == [(r["participant_id"], r["session_id"]) for r in members]
        for i, row in enumerate(members):
            np.testing.assert_array_equal(
                image[i], np.asanyarray(nib.load(root / row["image"]).dataobj)
            )
            np.testing.assert_array_equal(
                dseg[i], np.asanyarray(nib.load(root / row["dseg"]).dataobj)
            )


def test_folds_select_train_and_val_without_overlap(dataset):
    root, entries = dataset
    splits = make_splits(dict.fromkeys(e.participant_id for e in entries), seed=2, n_folds=3)
    rows = build_manifest(entries, splits, root)
    _, json_path = write_manifest(rows, root)
    loaded = load_manifest(json_path)
    pool = {r["participant_id"] for r in loaded if r["split"] == "train"}
    for fold in range(3):
        train = {r["participant_id"] for r in select(loaded, "train", fold)}
        val = {r["participant_id"] for r in select(loaded, "val", fold)}
        assert train and val and not train & val and train | val == pool
    assert all(r["fold"] == -1 for r in select(loaded, "test"))


def test_manifest_errors_name_the_subject_or_file(dataset):
    root, entries = dataset
    splits = make_splits(dict.fromkeys(e.participant_id for e in entries), seed=0)
    with pytest.raises(ManifestError, match="sub-99: has model-ready files but no split"):
        build_manifest([*entries, ManifestEntry("sub-99", entries[0].image)], splits, root)
    with pytest.raises(ManifestError, match="have no model-ready files"):
        build_manifest([e for e in entries if e.participant_id != "sub-01"], splits, root)
    missing = ManifestEntry(entries[0].participant_id, root / "nope.nii.gz", entries[0].session_id)
    with pytest.raises(ManifestError, match="nope.nii.gz: .*image not found"):
        build_manifest([missing, *entries[1:]], splits, root)
    no_dseg = ManifestEntry(
        entries[0].participant_id, entries[0].image, entries[0].session_id, mask=entries[0].mask
    )
    with pytest.raises(ManifestError, match="dseg is missing for 1 of"):
        build_manifest([no_dseg, *entries[1:]], splits, root)
    with pytest.raises(ManifestError, match="listed twice"):
        build_manifest([*entries, entries[0]], splits, root)
