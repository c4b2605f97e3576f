"""Input discovery with pybids on real BIDS layouts and generated datasets."""

from __future__ import annotations

import json

import pytest

from mriflow.bids.discovery import DiscoveryError, collect_inputs
from tests.helpers import make_bids_dataset


def test_sessions_and_labels_with_or_without_prefix(tmp_path):
    root = make_bids_dataset(tmp_path / "raw", {"01": ["ses-a", "ses-b"], "02": [""]})
    subjects = collect_inputs(root, ["sub-01", "02"])
    assert [s.subject for s in subjects] == ["01", "02"]
    assert [i.relpath for i in subjects[0].images] == [
        "sub-01/ses-a/anat/sub-01_ses-a_T1w.nii.gz",
        "sub-01/ses-b/anat/sub-01_ses-b_T1w.nii.gz",
    ]
    assert subjects[0].images[0].entities == {"subject": "01", "session": "a"}
    assert all(s.error is None for s in subjects)
    only_b = collect_inputs(root, ["01"], ["ses-b"])
    assert [i.entities["session"] for i in only_b[0].images] == ["b"]


def test_unknown_participant_is_a_usage_error(tmp_path):
    root = make_bids_dataset(tmp_path / "raw", {"01": [""]})
    with pytest.raises(DiscoveryError, match=r"sub-07 not found in .*available: sub-01"):
        collect_inputs(root, ["07"])


def test_unreadable_image_fails_only_its_subject(tmp_path):
    root = make_bids_dataset(tmp_path / "raw", {"01": [""], "02": [""]})
    broken = root / "sub-02" / "anat" / "sub-02_T1w.nii.gz"
    broken.write_bytes(b"")
    subjects = {s.subject: s for s in collect_inputs(root)}
    assert subjects["01"].error is None
    assert str(broken) in subjects["02"].error and "0 bytes" in subjects["02"].error


@pytest.mark.parametrize(
    "layout,n_subjects,first_t1w",
    [
        ("ds001", 16, ["sub-01/anat/sub-01_T1w.nii.gz"]),
        (
            "ds114",
            10,
            [
                "sub-01/ses-retest/anat/sub-01_ses-retest_T1w.nii.gz",
                "sub-01/ses-test/anat/sub-01_ses-test_T1w.nii.gz",
            ],
        ),
        # 7t_trt: sub-01's second session has no anat folder
        ("7t_trt", 22, ["sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz"]),
        (
            "synthetic",
            5,
            [
                "sub-01/ses-01/anat/sub-01_ses-01_T1w.nii",
                "sub-01/ses-02/anat/sub-01_ses-02_T1w.nii",
            ],
        ),
    ],
)
def test_real_layouts(data_dir, layout, n_subjects, first_t1w):
    subjects = collect_inputs(data_dir / "bids_layouts" / layout)
    assert len(subjects) == n_subjects
    assert [i.relpath for i in subjects[0].t1w] == first_t1w
    # the layouts hold empty files: each subject fails with the file named
    for subject in subjects:
        assert subject.error and "sub-" + subject.subject in subject.error
        assert "0 bytes" in subject.error or "truncated" in subject.error


def test_7t_trt_finds_only_anatomical_contrasts(data_dir):
    subject = collect_inputs(data_dir / "bids_layouts" / "7t_trt", ["01"], check_images=False)[0]
    assert {i.suffix for i in subject.images} == {"T1w"}  # not T1map, not fmap magnitudes


def test_derivatives_tree_is_refused(data_dir):
    with pytest.raises(DiscoveryError, match="derivatives dataset .*fMRIPrep.* raw"):
        collect_inputs(data_dir / "bids_layouts" / "ds000001-fmriprep")


def test_dataset_without_t1w_is_refused(data_dir):
    with pytest.raises(DiscoveryError, match="no T1w images"):
        collect_inputs(data_dir / "bids_layouts" / "qmri_mp2rage")


def _add_t1w(root, subject, name):
    """Another T1w of ``subject``, a copy of its first one under a new BIDS name."""
    anat = root / f"sub-{subject}" / "anat"
    target = anat / name
    target.write_bytes((anat / f"sub-{subject}_T1w.nii.gz").read_bytes())
    return target


def test_one_subject_job_indexes_only_that_subject(tmp_path):
    from mriflow.bids.discovery import _open_layout

    root = make_bids_dataset(tmp_path / "raw", {"01": [""], "02": [""], "10": [""]})
    layout = _open_layout(root.resolve(), None, ["01"])
    # "01" must not also keep "010"-like prefixes; the others are never indexed
    assert layout.get_subjects() == ["01"]
    assert [s.subject for s in collect_inputs(root, ["sub-01"])] == ["01"]


def test_broken_sidecar_fails_only_its_subject(tmp_path):
    root = make_bids_dataset(tmp_path / "raw", {"01": [""], "02": [""]})
    sidecar = root / "sub-02" / "anat" / "sub-02_T1w.json"
    sidecar.write_text('{"RepetitionTime": 2.3,')
    # selecting another subject does not even read it
    assert collect_inputs(root, ["01"])[0].error is None
    subjects = {s.subject: s for s in collect_inputs(root)}
    assert subjects["01"].error is None
    assert str(sidecar) in subjects["02"].error and "invalid JSON" in subjects["02"].error


def test_inherited_sidecar_at_the_top_is_checked_too(tmp_path):
    root = make_bids_dataset(tmp_path / "raw", {"01": [""]})
    (root / "T1w.json").write_text("{not json")
    (root / "task-rest_bold.json").write_text("{not json")  # not inherited by a T1w
    (subject,) = collect_inputs(root)
    assert subject.error.startswith(f"{root.resolve() / 'T1w.json'}: invalid JSON")


def test_skipped_subject_folders_are_reported_in_one_line(tmp_path, caplog):
    root = make_bids_dataset(tmp_path / "raw", {"01": [""]})
    (root / "sub-02 copy" / "anat").mkdir(parents=True)
    (root / "sub-03" / "anat").mkdir(parents=True)
    (root / "sub-03" / "anat" / "notes.txt").write_text("no BIDS file")
    with caplog.at_level("WARNING", logger="mriflow"):
        assert [s.subject for s in collect_inputs(root)] == ["01"]
    warnings = [r.getMessage() for r in caplog.records if "pybids skips" in r.getMessage()]
    assert len(warnings) == 1
    assert "'sub-02 copy' (not a BIDS label)" in warnings[0]
    assert "'sub-03' (no file pybids accepts)" in warnings[0]


def test_database_is_built_once_and_reused(tmp_path):
    root = make_bids_dataset(tmp_path / "raw", {"01": [""], "02": [""]})
    database = tmp_path / "db"
    assert [s.subject for s in collect_inputs(root, database_dir=database)] == ["01", "02"]
    assert (database / "layout_index.sqlite").is_file()
    # a subject added afterwards is not seen: the tree is not indexed again
    make_bids_dataset(root, {"03": [""]})
    assert [s.subject for s in collect_inputs(root, database_dir=database)] == ["01", "02"]
    assert [s.subject for s in collect_inputs(root, ["02"], database_dir=database)] == ["02"]
    other = make_bids_dataset(tmp_path / "other", {"01": [""]})
    with pytest.raises(DiscoveryError, match=r"indexes .*raw, not .*other"):
        collect_inputs(other, database_dir=database)


def test_filter_file_selects_images_as_fmriprep(tmp_path):
    from mriflow.bids.discovery import load_bids_filters

    root = make_bids_dataset(tmp_path / "raw", {"01": [""]})
    _add_t1w(root, "01", "sub-01_acq-fast_T1w.nii.gz")
    _add_t1w(root, "01", "sub-01_part-phase_T1w.nii.gz")

    def selected(filters: dict) -> list[str]:
        path = tmp_path / "filter.json"
        path.write_text(json.dumps(filters))
        return [
            i.path.name for i in collect_inputs(root, bids_filters=load_bids_filters(path))[0].t1w
        ]

    # as fMRIPrep: phase images are never anatomical references
    assert selected({}) == ["sub-01_T1w.nii.gz", "sub-01_acq-fast_T1w.nii.gz"]
    assert selected({"t1w": {"acquisition": None}}) == ["sub-01_T1w.nii.gz"]
    assert selected({"t1w": {"acquisition": "fast"}, "bold": {"task": "x"}}) == [
        "sub-01_acq-fast_T1w.nii.gz"
    ]
    assert selected({"t1w": {"acquisition": "*"}}) == ["sub-01_acq-fast_T1w.nii.gz"]


def test_filter_file_errors_name_the_file(tmp_path):
    from mriflow.bids.discovery import load_bids_filters

    path = tmp_path / "filter.json"
    path.write_text('{"t1w": {"session": "1",}}')
    with pytest.raises(DiscoveryError, match=rf"{path}: not valid JSON"):
        load_bids_filters(path)
    path.write_text('{"t1w": ["session"]}')
    with pytest.raises(DiscoveryError, match="'t1w' must be an object"):
        load_bids_filters(path)
    root = make_bids_dataset(tmp_path / "raw", {"01": [""]})
    path.write_text('{"t1w": {"sesion": "1"}}')
    with pytest.raises(DiscoveryError, match="invalid filter for T1w"):
        collect_inputs(root, bids_filters=load_bids_filters(path))


def test_filter_file_on_7t_trt(data_dir, tmp_path):
    from mriflow.bids.discovery import load_bids_filters

    layout = data_dir / "bids_layouts" / "7t_trt"
    path = tmp_path / "filter.json"
    # fMRIPrep's documented example shape: one session, no acquisition entity
    path.write_text(json.dumps({"t1w": {"session": "1", "acquisition": None}}))
    subjects = collect_inputs(layout, bids_filters=load_bids_filters(path), check_images=False)
    assert len(subjects) == 22
    assert all([i.entities.get("session") for i in s.t1w] == ["1"] for s in subjects)
    # the T1w of every subject is in session 1: asking for session 2 finds none
    path.write_text(json.dumps({"t1w": {"session": "2"}}))
    with pytest.raises(DiscoveryError, match="no T1w images"):
        collect_inputs(layout, bids_filters=load_bids_filters(path), check_images=False)
