"""The BIDS App command line: exit codes, one-line errors, per-subject isolation."""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from mriflow.cli.run import main
from mriflow.config import load_config
from tests.helpers import QUICK_CHAIN, copy_layout, make_bids_dataset

# CLI mechanics on phantoms: the quick chain, and no brain extraction of an ellipsoid
FAST = ["--voxel-size", "2", "--nprocs", "2", *QUICK_CHAIN, "--set", "skull_strip.method=none"]


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_version_and_help_exit_zero():
    out = subprocess.run(
        [sys.executable, "-m", "mriflow.cli.run", "--version"], capture_output=True, text=True
    )
    assert out.returncode == 0 and out.stdout.startswith("mriflow ")


def test_missing_bids_dir_is_exit_2_with_one_line(tmp_path, capsys):
    assert main([str(tmp_path / "nope"), str(tmp_path / "out"), "participant"]) == 2
    assert "nope does not exist" in _error_line(capsys)


def test_out_dir_inside_bids_dir_is_refused(tmp_path, capsys):
    root = make_bids_dataset(tmp_path / "raw", {"01": [""]})
    assert main([str(root), str(root / "derivatives" / "mriflow"), "participant"]) == 2
    assert "inside BIDS_DIR" in _error_line(capsys)
    assert not (root / "derivatives").exists()


def test_unknown_participant_label_is_exit_2(tmp_path, capsys):
    root = make_bids_dataset(tmp_path / "raw", {"01": [""]})
    code = main([str(root), str(tmp_path / "out"), "participant", "--participant-label", "sub-09"])
    assert code == 2
    assert "sub-09 not found" in _error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_bad_usage_is_exit_2(tmp_path, capsys):
    root = make_bids_dataset(tmp_path / "raw", {"01": [""]})
    with pytest.raises(SystemExit) as info:
        main([str(root), str(tmp_path / "out"), "everything"])
    assert info.value.code == 2
    capsys.readouterr()
    assert main([str(root), str(tmp_path / "out"), "participant", "--set", "spatial.size=2"]) == 2
    assert "unknown setting 'spatial.size'" in _error_line(capsys)


def test_participant_run_writes_ras_isotropic_derivatives_and_config(tmp_path, capsys):
    root = make_bids_dataset(tmp_path / "raw", {"01": ["ses-a", "ses-b"], "02": [""]})
    out = tmp_path / "out"
    args = [str(root), str(out), "participant", "-w", str(tmp_path / "work"), "--seed", "3"]
    assert main([*args, *FAST, "--participant-label", "01", "sub-02"]) == 0
    summary = capsys.readouterr().out
    assert "2 of 2 subject(s) succeeded" in summary
    expected = [
        out / "sub-01/ses-a/anat/sub-01_ses-a_desc-preproc_T1w.nii.gz",
        out / "sub-01/ses-b/anat/sub-01_ses-b_desc-preproc_T1w.nii.gz",
        out / "sub-02/anat/sub-02_desc-preproc_T1w.nii.gz",
    ]
    for path in expected:
        img = nib.load(path)
        assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
        assert np.allclose(img.header.get_zooms()[:3], 2.0)
        sidecar = json.loads(path.with_name(path.name.replace(".nii.gz", ".json")).read_text())
        raw = path.name.replace("_desc-preproc", "")
        assert sidecar["Sources"] == [f"bids:raw:{path.relative_to(out).parent.as_posix()}/{raw}"]
        assert sidecar["SkullStripped"] is False
        assert [s["Name"] for s in sidecar["Steps"]] == ["denoise", "conform", "n4"]
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    config = load_config(out / "mriflow_config.toml")
    assert config.seed == 3 and config.spatial.voxel_size == 2.0
    # nothing temporary or staged leaks into the output folder
    leftovers = [p for p in out.rglob("*") if p.name.endswith(".part") or "staged" in str(p)]
    assert leftovers == []
    assert "*.html" in (out / ".bidsignore").read_text().splitlines()


def test_rerun_with_written_config_reproduces_outputs(tmp_path):
    root = make_bids_dataset(tmp_path / "raw", {"01": [""]})
    first, second = tmp_path / "out1", tmp_path / "out2"
    assert main([str(root), str(first), "participant", "-w", str(tmp_path / "w1"), *FAST]) == 0
    config = first / "mriflow_config.toml"
    assert (
        main(
            [
                str(root),
                str(second),
                "participant",
                "-w",
                str(tmp_path / "w2"),
                "--config",
                str(config),
            ]
        )
        == 0
    )
    assert load_config(second / "mriflow_config.toml") == load_config(config)
    name = "sub-01/anat/sub-01_desc-preproc_T1w.nii.gz"
    a, b = nib.load(first / name), nib.load(second / name)
    assert np.array_equal(a.affine, b.affine)
    assert np.array_equal(np.asanyarray(a.dataobj), np.asanyarray(b.dataobj))


def test_truncated_image_fails_its_subject_at_run_time(tmp_path, capsys):
    root = make_bids_dataset(tmp_path / "raw", {"01": [""], "02": [""]})
    broken = root / "sub-02" / "anat" / "sub-02_T1w.nii.gz"
    raw = gzip.decompress(broken.read_bytes())
    broken.write_bytes(gzip.compress(raw[: len(raw) // 2])[:-20])  # header fine, voxels cut
    out = tmp_path / "out"
    code = main([str(root), str(out), "participant", "-w", str(tmp_path / "work"), *FAST])
    assert code == 1
    summary = capsys.readouterr().out
    assert "sub-01  ok" in summary
    line = next(line for line in summary.splitlines() if "sub-02" in line)
    assert "FAILED" in line and str(broken) in line
    assert (out / "sub-01" / "anat" / "sub-01_desc-preproc_T1w.nii.gz").is_file()
    assert not (out / "sub-02").exists()


@pytest.mark.slow
def test_ds114_two_good_subjects_one_empty(data_dir, tmp_path, capsys):
    """The acceptance scenario: real images over two subjects' empty files, a third left empty."""
    root = copy_layout(data_dir / "bids_layouts" / "ds114", tmp_path / "ds114", ["01", "02", "03"])
    real = data_dir / "anat" / "T1_head.nii.gz"
    for subject in ("01", "02"):
        for session in ("test", "retest"):
            shutil.copyfile(
                real,
                root / f"sub-{subject}/ses-{session}/anat/sub-{subject}_ses-{session}_T1w.nii.gz",
            )
    out = tmp_path / "out"
    # empty files (sub-03's T1w, every func/dwi image) fail validation: the run is asked
    # to go on, so that each subject fails or succeeds alone
    args = [str(root), str(out), "participant", "-w", str(tmp_path / "work"), *FAST]
    assert main(args) == 2
    assert "EMPTY_FILE" in capsys.readouterr().err
    code = main([*args, "--skip-bids-validation"])
    assert code == 1
    summary = capsys.readouterr().out
    assert "2 of 3 subject(s) succeeded" in summary
    line = next(line for line in summary.splitlines() if "sub-03" in line)
    assert "FAILED" in line and "sub-03_ses-retest_T1w.nii.gz" in line and "0 bytes" in line
    for subject in ("01", "02"):
        for session in ("test", "retest"):
            name = f"sub-{subject}_ses-{session}_desc-preproc_T1w.nii.gz"
            assert (out / f"sub-{subject}/ses-{session}/anat" / name).is_file()
    assert not (out / "sub-03").exists()
    log = json.loads(next((out / "logs").glob("run-*_summary.json")).read_text())
    assert [s["status"] for s in log["Subjects"]] == ["ok", "ok", "failed"]
