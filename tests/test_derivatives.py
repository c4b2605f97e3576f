"""Derivative names, sidecars and atomic writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mriflow.bids.derivatives import dataset_description
from mriflow.bids.paths import (
    DerivativeNameError,
    atomic_write_bytes,
    bids_uri,
    build_path,
    parse_entities,
    staged_relpath,
)


@pytest.mark.parametrize(
    "entities,suffix,ext,expected",
    [
        (
            {"subject": "01", "desc": "preproc"},
            "T1w",
            ".nii.gz",
            "sub-01/anat/sub-01_desc-preproc_T1w.nii.gz",
        ),
        (
            {"desc": "brain", "ses": "retest", "sub": "01", "run": "2"},
            "mask",
            ".nii.gz",
            "sub-01/ses-retest/anat/sub-01_ses-retest_run-2_desc-brain_mask.nii.gz",
        ),
        (
            {"sub": "01", "space": "MNI152NLin2009aSym", "desc": "preproc", "acq": "mprage"},
            "T1w",
            ".nii.gz",
            "sub-01/anat/sub-01_acq-mprage_space-MNI152NLin2009aSym_desc-preproc_T1w.nii.gz",
        ),
        (
            {"sub": "01", "label": "GM", "space": "MNI152NLin2009aSym"},
            "probseg",
            ".nii.gz",
            "sub-01/anat/sub-01_space-MNI152NLin2009aSym_label-GM_probseg.nii.gz",
        ),
        (
            {"sub": "01", "from": "T1w", "to": "MNI152NLin2009aSym", "mode": "image"},
            "xfm",
            ".h5",
            "sub-01/anat/sub-01_from-T1w_to-MNI152NLin2009aSym_mode-image_xfm.h5",
        ),
    ],
)
def test_build_path_follows_smriprep_naming(entities, suffix, ext, expected):
    assert build_path(entities, suffix=suffix, extension=ext) == expected


@pytest.mark.parametrize(
    "entities,match",
    [
        ({"desc": "preproc"}, "subject"),
        ({"sub": "01", "desc": "pre_proc"}, "alphanumeric"),
        ({"sub": "01", "colour": "red"}, "unknown BIDS entity"),
    ],
)
def test_build_path_rejects_invalid_entities(entities, match):
    with pytest.raises(DerivativeNameError, match=match):
        build_path(entities, suffix="T1w", extension=".nii.gz")


def test_parse_entities_round_trips_build_path():
    rel = build_path(
        {"sub": "02", "ses": "hfs", "run": "1", "desc": "preproc"},
        suffix="T1w",
        extension=".nii.gz",
    )
    entities, suffix, ext = parse_entities(rel)
    assert entities == {"subject": "02", "session": "hfs", "run": "1", "description": "preproc"}
    assert (suffix, ext) == ("T1w", ".nii.gz")
    assert build_path(entities, suffix=suffix, extension=ext) == rel


def test_bids_uri_and_staged_relpath():
    assert bids_uri("sub-01/anat/sub-01_T1w.nii.gz") == "bids:raw:sub-01/anat/sub-01_T1w.nii.gz"
    assert bids_uri("sub-01/anat/x.nii.gz", "") == "bids::sub-01/anat/x.nii.gz"
    staged = "/w/_mriflow_staged/x/_mriflow_staged/sub-01/anat/sub-01_T1w.json"
    assert staged_relpath(staged) == "sub-01/anat/sub-01_T1w.json"


def test_dataset_description_is_a_bids_derivative(tmp_path):
    desc = dataset_description([tmp_path])
    assert desc["DatasetType"] == "derivative"
    generated = desc["GeneratedBy"][0]
    assert generated["Name"] == "mriflow" and generated["Version"] and generated["CodeURL"]
    assert desc["SourceDatasets"][0]["URL"] == tmp_path.resolve().as_uri()
    assert desc["DatasetLinks"]["raw"] == tmp_path.resolve().as_uri()
    json.dumps(desc)


def test_atomic_write_never_leaves_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "sub-01" / "out.nii.gz"
    atomic_write_bytes(target, b"old content")

    class Interrupted(Exception):
        pass

    def failing_fsync(fd):
        raise Interrupted

    monkeypatch.setattr("os.fsync", failing_fsync)
    with pytest.raises(Interrupted):
        atomic_write_bytes(target, b"new content that is interrupted")
    assert target.read_bytes() == b"old content"
    assert [p.name for p in Path(target.parent).iterdir()] == ["out.nii.gz"]
