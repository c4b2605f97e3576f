"""``--submit slurm`` without a cluster: sbatch options, the array script, status reading.

The end-to-end run through a real Slurm is tests/cluster/test_array.py.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from mriflow.cli.submit import SubmitError, array_script, parse_submit_args, subject_results


def test_submit_args_are_sbatch_options_only():
    assert parse_submit_args("--partition=short --time=02:00:00 -p gpu --qos 'high prio'") == [
        "--partition=short", "--time=02:00:00", "-p", "gpu", "--qos", "high prio",
    ]  # fmt: skip
    assert parse_submit_args(None) == []
    for bad, why in [
        ("--array=1-5", "set by mriflow"),
        ("-a 1-5", "set by mriflow"),
        ("--dependency=afterok:1", "set by mriflow"),
        ("--wrap='rm -rf /'", "set by mriflow"),
        ("--time=60 ; rm -rf ~", "not an sbatch option"),
        ("short", "not an sbatch option"),
        ("--time='60", "No closing quotation"),
    ]:
        with pytest.raises(SubmitError, match=why):
            parse_submit_args(bad)


def test_array_script_runs_line_i_of_the_subject_list(tmp_path):
    """The script, run by bash as Slurm would for task 2, starts sub-02 with its own work dir."""
    folder = tmp_path / "a folder with spaces"
    folder.mkdir()
    subjects = folder / "subjects.txt"
    subjects.write_text("01\n02\n03\n")
    script = folder / "array.sbatch"
    script.write_text(
        array_script(
            subjects_file=subjects,
            command=["echo", "run", str(folder / "raw"), "participant"],
            work_dir=folder / "work",
            resources=["--cpus-per-task=4", "--mem=8192M"],
            log_dir=folder / "logs",
            job_name="mriflow-x",
        )
    )
    text = script.read_text()
    assert "#SBATCH --cpus-per-task=4\n#SBATCH --mem=8192M" in text
    result = subprocess.run(
        ["bash", str(script)],
        env={**os.environ, "SLURM_ARRAY_TASK_ID": "2"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.splitlines()[-1] == (
        f"run {folder}/raw participant --participant-label 02 -w {folder}/work/sub-02"
    )


def _summary(out: Path, name: str, rows: dict[str, str], mtime: float) -> None:
    path = out / "logs" / f"run-{name}_summary.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    subjects = [
        {"participant_id": f"sub-{s}", "status": "ok" if r == "ok" else "failed", "reason": r}
        for s, r in rows.items()
    ]
    path.write_text(json.dumps({"RunID": name, "Subjects": subjects}))
    os.utime(path, (mtime, mtime))


def _submission(out: Path, name: str, job: str, subjects: list[str], when: float) -> None:
    path = out / "logs" / f"submit-{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps(
            {"JobID": job, "Submitted": when, "Subjects": subjects, "LogPattern": "/l/7_%a.out"}
        )
    )


def test_status_newest_event_per_subject_wins(tmp_path):
    out = tmp_path / "out"
    _submission(out, "a", "7", ["01", "02", "03", "04"], when=1000.0)
    _summary(out, "1", {"01": "ok", "02": "x.nii.gz: not a readable image"}, mtime=1100.0)
    _summary(out, "2", {"03": "sidecar.json: invalid JSON"}, mtime=1200.0)
    _submission(out, "b", "9", ["03"], when=1300.0)  # resubmitted after its failure

    # Slurm still lists task 4 of the first array and the resubmitted one
    results = subject_results(out, queued={"7_4", "9_1"})
    assert {s: r.state for s, r in results.items()} == {
        "01": "ok", "02": "failed", "03": "pending", "04": "pending",
    }  # fmt: skip
    assert "not a readable image" in results["02"].detail
    assert results["03"].job == "9_1"

    # later: task 4 is gone without a result (killed at its time limit), 03 ran again
    _summary(out, "3", {"03": "ok"}, mtime=1400.0)
    results = subject_results(out, queued=set())
    assert {s: r.state for s, r in results.items()} == {
        "01": "ok", "02": "failed", "03": "ok", "04": "missing",
    }  # fmt: skip
    assert "7_4 ended without a result" in results["04"].detail
    assert "/l/7_4.out" in results["04"].detail


def test_status_command_exit_codes(tmp_path, capsys):
    from mriflow.cli.run import main

    out = tmp_path / "out"
    assert main(["status", str(out)]) == 2  # nothing recorded: a usage error
    assert "no mriflow runs or submissions recorded" in capsys.readouterr().err
    _summary(out, "1", {"01": "ok"}, mtime=1000.0)
    assert main([str(out), "status"]) == 0
    assert "1 subject(s): 1 ok, 0 failed" in capsys.readouterr().out
    _summary(out, "2", {"02": "broken"}, mtime=1100.0)
    assert main(["status", str(out)]) == 1
    assert "sub-02  failed   broken" in capsys.readouterr().out
