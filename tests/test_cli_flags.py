"""The BIDS-App flags: --help defaults, input validation, --boilerplate / CITATION.md,
--reports-only, --write-graph and the progress line (docs/usage.md)."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mriflow.cli import validation
from mriflow.cli.progress import Progress, format_elapsed
from mriflow.cli.run import CONFIG_FLAGS, main
from mriflow.config import Config
from mriflow.reports.boilerplate import bibtex_entries
from tests.conftest import REPO_ROOT
from tests.helpers import QUICK_CHAIN, make_bids_dataset

FAST = ["--voxel-size", "2", "--nprocs", "2", *QUICK_CHAIN, "--set", "skull_strip.method=none"]
CLI = [sys.executable, "-m", "mriflow.cli.run"]


def _env() -> dict[str, str]:
    env = dict(os.environ, COLUMNS="200")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    return env


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def _files(folder: Path) -> dict[str, float]:
    """Every file and folder below ``folder`` with its mtime (the folder itself excluded)."""
    return {str(p.relative_to(folder)): p.stat().st_mtime for p in folder.rglob("*")}


# ------------------------------------------------------------------------------ --help
def test_help_shows_the_real_defaults():
    out = subprocess.run([*CLI, "--help"], capture_output=True, text=True, env=_env())
    assert out.returncode == 0
    text = " ".join(out.stdout.split())  # argparse wraps lines
    assert "(default: None)" not in text and "(default: False)" not in text
    assert "(default: [])" not in text
    defaults = Config()
    flags = {"voxel_size": "--voxel-size", "seed": "--seed", "nprocs": "--nprocs"}
    flags |= {"omp_nthreads": "--omp-nthreads", "mem_gb": "--mem-gb", "plugin": "--plugin"}
    assert set(flags) == set(CONFIG_FLAGS)
    for dest, flag in flags.items():
        value = defaults
        for part in CONFIG_FLAGS[dest].split("."):
            value = getattr(value, part)
        help_text = text[text.index(f" {flag} ") :][:150]  # the option and its help
        found = re.search(r"\(default: ([^)]*)\)", help_text)
        assert found, f"{flag} shows no default: {help_text}"
        assert found.group(1) == str(value), (flag, found.group(1), value)
    assert "-w WORK_DIR, --work-dir WORK_DIR Nipype work dir (default: work)" in text
    convert = subprocess.run(
        [*CLI, "convert", "--help"], capture_output=True, text=True, env=_env()
    )
    text = " ".join(convert.stdout.split())
    assert convert.returncode == 0 and "--min-correlation R cross-check" in text
    for shown in ("(default: None)", "(default: False)", "(default: True)"):
        assert shown not in text
    assert "smallest voxel correlation (default: 0.99)" in text


# ------------------------------------------------------------------ input validation
@pytest.fixture
def broken_dataset(tmp_path: Path) -> Path:
    """Two phantom subjects; sub-02's T1w is an empty file."""
    root = make_bids_dataset(tmp_path / "raw", {"01": [""], "02": [""]})
    (root / "sub-02" / "anat" / "sub-02_T1w.nii.gz").write_bytes(b"")
    return root


@pytest.fixture(params=["bids-validator-deno", "pybids"])
def checker(request, monkeypatch) -> str:
    if request.param == "pybids":
        monkeypatch.setattr(validation, "validator_command", lambda: None)
    elif validation.validator_command() is None:
        pytest.skip("bids-validator-deno not installed (it is in the 'test' extra)")
    return request.param


def test_valid_datasets_pass(tmp_path, checker):
    phantoms = make_bids_dataset(tmp_path / "raw", {"01": ["ses-a", "ses-b"], "02": [""]})
    for dataset in (phantoms, REPO_ROOT / "bids_examples"):
        used, errors = validation.validate_bids_dir(dataset)
        assert used.startswith(checker)
        assert errors == [], (dataset, errors)


def test_errors_name_the_file_and_only_selected_subjects_count(broken_dataset, checker):
    _, errors = validation.validate_bids_dir(broken_dataset)
    assert errors and {e.location for e in errors} == {"/sub-02/anat/sub-02_T1w.nii.gz"}
    assert "EMPTY_FILE" in {e.code for e in errors}
    assert validation.validate_bids_dir(broken_dataset, ["sub-01"])[1] == []
    assert validation.validate_bids_dir(broken_dataset, ["02"])[1]


def test_pybids_checks_names_and_the_description(tmp_path, monkeypatch):
    monkeypatch.setattr(validation, "validator_command", lambda: None)
    root = make_bids_dataset(tmp_path / "raw", {"01": [""]})
    (root / "sub-01" / "anat" / "sub-01_brain.nii.gz").write_bytes(b"x")
    _, errors = validation.validate_bids_dir(root)
    assert [(e.code, e.location) for e in errors] == [
        ("NOT_INCLUDED", "/sub-01/anat/sub-01_brain.nii.gz")
    ]
    (root / "dataset_description.json").unlink()
    _, errors = validation.validate_bids_dir(root)
    assert [e.code for e in errors] == ["DATASET_DESCRIPTION"]


def test_invalid_dataset_is_refused_in_one_line_unless_skipped(
    broken_dataset, tmp_path, capsys, monkeypatch
):
    ran = []
    monkeypatch.setattr(
        "mriflow.cli.participant.run_participant", lambda **kwargs: ran.append(kwargs) or 0
    )
    out = tmp_path / "out"
    args = [str(broken_dataset), str(out), "participant", "-w", str(tmp_path / "w")]
    assert main(args) == 2
    line = _error_line(capsys)
    assert "not valid BIDS" in line and "/sub-02/anat/sub-02_T1w.nii.gz" in line
    assert "--skip-bids-validation" in line
    assert ran == [] and not out.exists()
    assert main([*args, "--skip-bids-validation"]) == 0 and len(ran) == 1
    assert main([*args, "--participant-label", "01"]) == 0 and len(ran) == 2


def test_a_dataset_validated_once_is_not_validated_again_by_jobs_sharing_the_database(
    tmp_path, monkeypatch
):
    ran, checked = [], []
    monkeypatch.setattr(
        "mriflow.cli.participant.run_participant", lambda **kwargs: ran.append(kwargs) or 0
    )
    real = validation.validate_bids_dir
    monkeypatch.setattr(
        validation, "validate_bids_dir", lambda *a, **k: checked.append(a) or real(*a, **k)
    )
    root = make_bids_dataset(tmp_path / "raw", {"01": [""], "02": [""]})
    database = tmp_path / "db"
    args = [str(root), str(tmp_path / "out"), "participant", "-w", str(tmp_path / "w")]
    args += ["--bids-database-dir", str(database)]
    assert main([*args, "--participant-label", "01"]) == 0  # one subject: no marker
    assert main(args) == 0  # the whole dataset passed: marked
    assert main([*args, "--participant-label", "02"]) == 0  # an array task: skipped
    assert len(checked) == 2 and len(ran) == 3


# ------------------------------------------------ --boilerplate, --write-graph (no run)
def _no_processing(out: Path, work: Path) -> None:
    assert not list(out.glob("sub-*")), "a subject was processed"
    assert not (work / "mriflow_wf").exists(), "a Nipype node ran"


def test_boilerplate_only_describes_the_configured_steps_and_runs_nothing(tmp_path):
    root = make_bids_dataset(tmp_path / "raw", {"01": [""]})
    out, work = tmp_path / "out", tmp_path / "work"
    base = [str(root), str(out), "participant", "-w", str(work), "--boilerplate"]
    assert main(base) == 0
    _no_processing(out, work)
    full = (out / "logs" / "CITATION.md").read_text()
    for words in ("N4", "MNI152NLin2009aSym", "non-local means", "normalized", "segmented"):
        assert words in full
    for step in ("conform", "denoise", "n4", "skull_strip", "registration", "std_preproc"):
        assert f"| {step} |" in full
    assert main([*base, "--set", "registration.enabled=false", "--set", "denoise.method=none"]) == 0
    reduced = (out / "logs" / "CITATION.md").read_text()
    for gone in ("MNI152NLin2009aSym", "denoised", "| registration |", "| denoise |", "SyN"):
        assert gone not in reduced
    assert "| n4 |" in reduced and "| tissue_segmentation |" in reduced
    # every cited key has its BibTeX entry, and nothing else is in the .bib
    cited = set(re.findall(r"@(\w+)", reduced.split("## Steps")[0]))
    bib = (out / "logs" / "CITATION.bib").read_text()
    assert set(re.findall(r"@\w+\{(\w+),", bib)) == cited
    assert cited <= set(bibtex_entries())


def test_write_graph_writes_the_graph_and_runs_nothing(tmp_path):
    root = make_bids_dataset(tmp_path / "raw", {"01": [""], "02": [""]})
    out, work = tmp_path / "out", tmp_path / "work"
    assert main([str(root), str(out), "participant", "-w", str(work), "--write-graph", *FAST]) == 0
    _no_processing(out, work)
    dot = (out / "provenance" / "workflow.dot").read_text()
    assert "sub_01_wf" in dot and "sub_02_wf" in dot and "n4" in dot
    assert "register" not in dot  # registration.enabled=false in FAST


def test_actions_are_exclusive_and_participant_level(tmp_path, capsys):
    root = make_bids_dataset(tmp_path / "raw", {"01": [""]})
    base = [str(root), str(tmp_path / "out")]
    assert main([*base, "participant", "--boilerplate", "--write-graph"]) == 2
    assert "cannot be combined" in _error_line(capsys)
    assert main([*base, "group", "--reports-only"]) == 2
    assert "participant level" in _error_line(capsys)


# --------------------------------------------- a real run: CITATION, reports, progress
@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One subject through the quick chain, as a user runs it (stderr is not a terminal)."""
    tmp = tmp_path_factory.mktemp("flags")
    root = make_bids_dataset(tmp / "raw", {"01": [""]})
    out, work = tmp / "out", tmp / "work"
    done = subprocess.run(
        [*CLI, str(root), str(out), "participant", "-w", str(work), *FAST],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out, work, root, done


def test_citation_names_every_step_that_ran_and_no_other(quick_run):
    out, *_ = quick_run
    ran, disabled = set(), set()
    for sidecar in (out / "sub-01").rglob("*.json"):
        for step in json.loads(sidecar.read_text()).get("Steps", []):
            # a step the config turned off is recorded as a pass-through ("method": "none")
            off = step.get("Parameters", {}).get("method") == "none"
            (disabled if off else ran).add(step["Name"])
    if list((out / "sub-01" / "slices").glob("*_T1w.npy")):  # their index has no Steps
        ran.add("slices")
    assert {"conform", "n4", "tissue_segmentation", "slices"} <= ran
    assert disabled == {"denoise", "skull_strip"}
    text = (out / "logs" / "CITATION.md").read_text()
    listed = set(re.findall(r"^\| (\w+) \|", text, flags=re.M)) - {"step"}
    # remove_bias_field has no step record of its own (it is part of n4's output)
    assert listed - {"remove_bias_field"} == ran
    assert not listed & (disabled | {"registration"})
    assert "denoised" not in text and "skull-stripped" not in text


def test_progress_is_plain_lines_when_not_a_terminal(quick_run):
    *_, done = quick_run
    lines = [line for line in done.stderr.splitlines() if re.match(r"mriflow: \d+/\d+ done", line)]
    assert lines and "\r" not in done.stderr
    assert lines[-1].startswith("mriflow: 1/1 done")
    assert len(lines) <= 3  # a short run: first state, final state (30 s apart at most)


def test_reports_only_rebuilds_the_reports_without_running_a_node(quick_run, capsys):
    out, work, root, _ = quick_run
    iqms = out / "sub-01" / "anat" / "sub-01_desc-qc_metrics.tsv"
    reports = [out / "sub-01.html", iqms, out / "provenance" / "sub-01_prov.jsonld"]
    original_iqms = iqms.read_text()
    figures = sorted(p.name for p in (out / "sub-01" / "figures").iterdir())
    for path in reports:
        path.unlink()
    for path in (out / "sub-01" / "figures").iterdir():
        path.unlink()
    before = _files(work)
    assert main([str(root), str(out), "participant", "-w", str(work), "--reports-only"]) == 0
    assert "1 of 1 report(s) rebuilt" in capsys.readouterr().out
    assert all(path.is_file() and path.stat().st_size for path in reports)
    assert sorted(p.name for p in (out / "sub-01" / "figures").iterdir()) == figures
    # the same metrics as the run's, INU ones included (bias fields from the work dir)
    assert iqms.read_text() == original_iqms and "inu_med" in original_iqms
    assert _files(work) == before  # no node ran: nothing in the work dir changed


def test_reports_only_refuses_unknown_subjects(quick_run, capsys):
    out, work, root, _ = quick_run
    args = [str(root), str(out), "participant", "-w", str(work), "--reports-only"]
    assert main([*args, "--participant-label", "07"]) == 2
    assert "--participant-label 07: not in OUT_DIR" in _error_line(capsys)


# ------------------------------------------------------------------- progress display
class _Node:
    def __init__(self, subject: str, name: str) -> None:
        self.fullname = f"mriflow_wf.sub_{subject}_wf.anat_T1w_wf.{name}"
        self.name = name


def _progress(tty: bool):
    clock = [0.0]
    stream = io.StringIO()
    prefixes = {"mriflow_wf.sub_01_wf": "01", "mriflow_wf.sub_02_wf": "02"}
    progress = Progress(prefixes, 3, failed=["03"], stream=stream, tty=tty, clock=lambda: clock[0])
    return progress, stream, clock


def test_progress_lines_are_rate_limited_off_a_terminal():
    progress, stream, clock = _progress(tty=False)
    progress(_Node("01", "n4"), "start")
    assert stream.getvalue() == "mriflow: 0/3 done, 1 failed | running: sub-01 n4 | 0s\n"
    for t, event in ((5, "end"), (6, "start"), (20, "end")):
        clock[0] = t
        progress(_Node("02", "denoise"), event)
    assert stream.getvalue().count("\n") == 1  # changes within 30 s wait
    clock[0] = 95
    progress(_Node("01", "n4"), "end")
    progress(_Node("01", "publish"), "end")
    clock[0] = 130
    progress(_Node("02", "segment"), "exception")
    progress.close()
    lines = stream.getvalue().splitlines()
    assert lines[1] == "mriflow: 0/3 done, 1 failed | 1m35s"
    assert lines[-1] == "mriflow: 1/3 done, 2 failed | 2m10s"
    assert len(lines) == 3


def test_progress_rewrites_one_line_on_a_terminal(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    progress, stream, clock = _progress(tty=True)
    for t in range(5):
        clock[0] = t
        progress(_Node("01", f"step{t}"), "start")
    progress.close()
    text = stream.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n") and text.count("\r") == 6
    assert "running: sub-01 step0, sub-01 step1, sub-01 step2 +2" in text
    monkeypatch.setenv("COLUMNS", "40")  # a longer line would wrap and break the rewrite
    progress.show(force=True)
    last = stream.getvalue().rsplit("\r", 1)[-1]
    assert last.startswith("mriflow: 0/3 done") and len(last.rstrip()) <= 39


def test_elapsed_time_format():
    assert [format_elapsed(s) for s in (5, 125, 3725)] == ["5s", "2m05s", "1h02m"]
