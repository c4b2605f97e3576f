"""Input discovery with pybids on real BIDS layouts and generated datasets."""

from __future__ import annotations

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
