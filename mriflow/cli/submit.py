"""One Slurm job array per participant run (``--submit slurm``), and ``mriflow status``.

A large dataset is run as one array task per subject, each a normal one-subject
``mriflow ... participant`` with MultiProc inside, as fMRIPrep, FastSurfer and BABS
users do. Slurm is the scheduler: mriflow writes the subject list and one sbatch
script, submits it once with ``sbatch --array=1-N%M``, optionally chains the group
level with ``--dependency=afterany``, and returns. Nothing here retries or waits:
``mriflow status OUT`` reads what the tasks wrote, and ``--only-failed`` resubmits
the subjects without a successful result.
"""

from __future__ import annotations

import getpass
import json
import logging
import math
import re
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mriflow.bids.derivatives import atomic_write_json, atomic_write_text
from mriflow.bids.discovery import (
    build_database,
    collect_inputs,
    run_summary_files,
    submission_record_files,
    submission_record_path,
)
from mriflow.config import Config

log = logging.getLogger("mriflow")

__all__ = [
    "SubjectResult",
    "SubmitError",
    "array_script",
    "parse_submit_args",
    "run_status",
    "subject_results",
    "submit_participant",
]

#: sbatch options mriflow sets itself; a user value would silently change the array.
_RESERVED = ("--array", "-a", "--parsable", "--wrap", "--dependency", "-d")
_SETTLED = ("ok", "pending")
_OPTION = re.compile(r"^--?[A-Za-z][A-Za-z0-9-]*(=.*)?$")


class SubmitError(ValueError):
    """The submission cannot be made; the message says what to change."""


@dataclass(frozen=True)
class SubjectResult:
    """The newest known state of one subject: ok, failed, pending, missing or not run."""

    subject: str
    state: str
    detail: str = ""
    time: float = 0.0
    job: str = ""


def parse_submit_args(text: str | None) -> list[str]:
    """Split ``--submit-args`` into sbatch options, refusing what would break the array.

    The tokens are passed to ``sbatch`` as a list (no shell), so quoting is
    shlex's; each must be an option (``--time=60``, ``-p short``'s ``-p``) or the
    value right after one.
    """
    if not text:
        return []
    try:
        tokens = shlex.split(text)
    except ValueError as err:
        raise SubmitError(f"--submit-args {text!r}: {err}") from None
    previous_takes_value = False
    for token in tokens:
        if any(c in token for c in "\n\r\0"):
            raise SubmitError(f"--submit-args: {token!r} contains a line break or NUL")
        name = token.split("=", 1)[0]
        if name in _RESERVED or (name.startswith("-a") and not name.startswith("--")):
            raise SubmitError(
                f"--submit-args: {name} is set by mriflow (use --max-parallel / --group-after)"
            )
        if _OPTION.match(token):
            previous_takes_value = "=" not in token
        elif previous_takes_value:
            previous_takes_value = False
        else:
            raise SubmitError(
                f"--submit-args: {token!r} is not an sbatch option (expected e.g. "
                "'--partition=short --time=02:00:00')"
            )
    return tokens


def _slurm_resources(config: Config) -> tuple[int, list[str]]:
    """CPUs of one array task and its sbatch resource options, from --nprocs/--mem-gb."""
    cpus = config.execution.nprocs if config.execution.nprocs > 0 else 1
    options = [f"--cpus-per-task={cpus}"]
    if config.execution.mem_gb > 0:
        options.append(f"--mem={math.ceil(config.execution.mem_gb * 1024)}M")
    return cpus, options


def array_script(
    *,
    subjects_file: Path,
    command: Sequence[str],
    work_dir: Path,
    resources: Sequence[str],
    log_dir: Path,
    job_name: str,
) -> str:
    """The sbatch script of the array: task ``i`` runs ``command`` for line ``i`` of the list.

    ``command`` is the one-subject mriflow command without ``--participant-label``
    and ``-w``: the task adds them, with a work dir per subject so that concurrent
    tasks never share Nipype's top-level workflow files.
    """
    quoted = " ".join(shlex.quote(str(part)) for part in command)
    directives = [f"#SBATCH --job-name={job_name}", f"#SBATCH --output={log_dir}/%A_%a.out"]
    directives += [f"#SBATCH {option}" for option in resources]
    return "\n".join(
        [
            "#!/bin/bash",
            "# Written by mriflow --submit slurm: one array task per line of the subject list.",
            *directives,
            "set -euo pipefail",
            f'subject="$(sed -n "${{SLURM_ARRAY_TASK_ID}}p" {shlex.quote(str(subjects_file))})"',
            'echo "mriflow: array task ${SLURM_ARRAY_TASK_ID}: sub-${subject}"',
            f'exec {quoted} --participant-label "$subject" \\',
            f'    -w {shlex.quote(str(work_dir))}/"sub-$subject"',
            "",
        ]
    )


def _group_script(command: Sequence[str], log_dir: Path, job_name: str) -> str:
    quoted = " ".join(shlex.quote(str(part)) for part in command)
    return "\n".join(
        [
            "#!/bin/bash",
            "# Written by mriflow --submit slurm --group-after: the group level after the array.",
            f"#SBATCH --job-name={job_name}",
            f"#SBATCH --output={log_dir}/%j_group.out",
            "set -euo pipefail",
            f"exec {quoted}",
            "",
        ]
    )


def _sbatch(args: list[str]) -> str:
    """Run sbatch (list, no shell) and return the job id it printed."""
    try:
        result = subprocess.run(args, capture_output=True, text=True, timeout=120)
    except OSError as err:
        raise SubmitError(f"cannot run sbatch: {err}") from None
    if result.returncode != 0:
        message = (result.stderr or result.stdout).strip().splitlines()
        raise SubmitError(f"sbatch refused the job: {message[-1] if message else 'no message'}")
    # --parsable prints "<id>" or "<id>;<cluster>"
    return result.stdout.strip().split(";")[0]


def submit_participant(
    *,
    bids_dir: Path,
    out_dir: Path,
    work_dir: Path,
    config: Config,
    participant_labels: Sequence[str] | None = None,
    session_labels: Sequence[str] | None = None,
    database_dir: Path | None = None,
    bids_filter_file: Path | None = None,
    submit_args: str | None = None,
    max_parallel: int | None = None,
    group_after: bool = False,
    only_failed: bool = False,
) -> int:
    """Index the dataset, write the array script and submit it; print the job id(s).

    Returns the exit code (0 submitted or nothing to do). Raises
    :class:`SubmitError` (a usage error) when Slurm or the options are unusable.
    """
    from mriflow.bids.discovery import load_bids_filters

    if shutil.which("sbatch") is None:
        raise SubmitError("--submit slurm: sbatch is not on PATH (is Slurm installed here?)")
    if max_parallel is not None and max_parallel < 1:
        raise SubmitError(f"--max-parallel must be at least 1, got {max_parallel}")
    extra = parse_submit_args(submit_args)

    # the one full index of the dataset: every task then opens it without walking the tree
    database_dir = (database_dir or work_dir / "bids_database").resolve()
    build_database(bids_dir, database_dir)
    filters = load_bids_filters(bids_filter_file) if bids_filter_file else None
    subjects = [
        s.subject
        for s in collect_inputs(
            bids_dir,
            participant_labels,
            session_labels,
            check_images=False,  # each task checks its own images: errors land in its result
            database_dir=database_dir,
            bids_filters=filters,
        )
    ]
    if only_failed:
        results = subject_results(out_dir, queued=_queued_jobs())
        # failed, missing (the task died without a result) or never run; not ok, not queued
        subjects = [s for s in subjects if s not in results or results[s].state not in _SETTLED]
        if not subjects:
            print(f"mriflow: nothing to resubmit: every subject is ok or pending in {out_dir}")
            return 0

    submit_id = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
    submit_dir = (work_dir / "submit" / submit_id).resolve()
    log_dir = submit_dir / "logs"
    log_dir.mkdir(parents=True)
    subjects_file = atomic_write_text(submit_dir / "subjects.txt", "\n".join(subjects) + "\n")

    cpus, resources = _slurm_resources(config)
    task_config = Config.from_dict(config.to_dict())
    # each task is one subject with MultiProc inside, sized to what Slurm gave it
    task_config.set("execution.plugin", "MultiProc")
    task_config.set("execution.plugin_args", {})
    task_config.set("execution.nprocs", cpus)
    config_file = task_config.write(submit_dir / "mriflow_config.toml")

    python = [sys.executable, "-m", "mriflow.cli.run"]
    common = ["--config", str(config_file), "--bids-database-dir", str(database_dir)]
    # the dataset was validated once, before this submission: not again in every task
    common.append("--skip-bids-validation")
    if bids_filter_file:
        common += ["--bids-filter-file", str(Path(bids_filter_file).resolve())]
    participant = [*python, str(bids_dir), str(out_dir), "participant", *common]
    if session_labels:
        participant += ["--session-label", *session_labels]
    script = submit_dir / "participant.sbatch"
    atomic_write_text(
        script,
        array_script(
            subjects_file=subjects_file,
            command=participant,
            work_dir=(work_dir / "tasks").resolve(),
            resources=resources,
            log_dir=log_dir,
            job_name=f"mriflow-{submit_id}",
        ),
    )
    array = f"--array=1-{len(subjects)}" + (f"%{max_parallel}" if max_parallel else "")
    job_id = _sbatch(["sbatch", "--parsable", array, *extra, str(script)])
    record = {
        "SubmitID": submit_id,
        "Submitted": time.time(),
        "JobID": job_id,
        "Subjects": subjects,
        "Script": str(script),
        "SubjectsFile": str(subjects_file),
        "LogPattern": str(log_dir / f"{job_id}_%a.out"),
        "SbatchArgs": [array, *extra],
    }
    group_id = ""
    if group_after:
        group = [*python, str(bids_dir), str(out_dir), "group", "--config", str(config_file)]
        group += ["-w", str((work_dir / "group").resolve())]
        group_script = submit_dir / "group.sbatch"
        atomic_write_text(group_script, _group_script(group, log_dir, f"mriflow-{submit_id}-group"))
        # afterany: the group level runs on the subjects that succeeded, even if some failed
        group_id = _sbatch(
            ["sbatch", "--parsable", f"--dependency=afterany:{job_id}", *extra, str(group_script)]
        )
        record["GroupJobID"] = group_id
    atomic_write_json(submission_record_path(out_dir, submit_id), record)

    limit = f", at most {max_parallel} at once" if max_parallel else ""
    print(
        f"mriflow: submitted array job {job_id}: {len(subjects)} subject(s), "
        f"{cpus} CPU(s) each{limit}; script {script}"
    )
    if group_id:
        print(f"mriflow: submitted group job {group_id} (after array job {job_id} ends)")
    print(f"mriflow: follow it with: mriflow status {out_dir}")
    return 0


# --- status ------------------------------------------------------------------------------


def _queued_jobs() -> set[str] | None:
    """Array tasks of this user still queued or running (``"<job>_<task>"``), None if unknown."""
    if shutil.which("squeue") is None:
        return None
    try:
        result = subprocess.run(
            ["squeue", "-h", "-r", "-o", "%i", "-u", getpass.getuser()],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if result.returncode != 0:
        return None
    return set(result.stdout.split())


def subject_results(out_dir: Path, queued: set[str] | None = None) -> dict[str, SubjectResult]:
    """The newest state of every subject mriflow ran or submitted into ``out_dir``.

    Reads the run summaries (``logs/run-*_summary.json``, written by each
    participant run) and the submission records (``logs/submit-*.json``): per
    subject the newest event wins, a submission meaning "pending". A pending
    subject whose array task is no longer in Slurm's queue (``queued``: the
    ``<job>_<task>`` ids ``squeue`` lists; None when unknown) is "missing": the
    task ended without writing a result (time or memory limit, node failure).

    This is the one place that reads per-subject results, so that a later
    per-subject completion record only changes this function.
    """
    events: dict[str, SubjectResult] = {}

    def offer(result: SubjectResult) -> None:
        current = events.get(result.subject)
        if current is None or result.time >= current.time:
            events[result.subject] = result

    for path in run_summary_files(out_dir):
        try:
            summary = json.loads(path.read_text())
            when = path.stat().st_mtime
            rows = summary["Subjects"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            log.warning("%s: unreadable run summary, skipped (%s)", path, err)
            continue
        for row in rows:
            subject = str(row.get("participant_id", "")).removeprefix("sub-")
            status = "ok" if row.get("status") == "ok" else "failed"
            offer(SubjectResult(subject, status, row.get("reason", ""), when))
    for path in submission_record_files(out_dir):
        try:
            record = json.loads(path.read_text())
            when, job, subjects = (
                float(record["Submitted"]),
                str(record["JobID"]),
                record["Subjects"],
            )
            log_pattern = record.get("LogPattern", "")
        except (OSError, ValueError, KeyError, TypeError) as err:
            log.warning("%s: unreadable submission record, skipped (%s)", path, err)
            continue
        for task, subject in enumerate(subjects, start=1):
            task_id = f"{job}_{task}"
            if queued is not None and task_id not in queued:
                detail = (
                    f"array task {task_id} ended without a result; its log: "
                    f"{log_pattern.replace('%a', str(task))}"
                )
                offer(SubjectResult(subject, "missing", detail, when, task_id))
            else:
                offer(SubjectResult(subject, "pending", f"array task {task_id}", when, task_id))
    return dict(sorted(events.items()))


def format_status(out_dir: Path, results: dict[str, SubjectResult]) -> str:
    counts = {state: 0 for state in ("ok", "failed", "pending", "missing")}
    for result in results.values():
        counts[result.state] = counts.get(result.state, 0) + 1
    lines = [
        f"mriflow status {out_dir}: {len(results)} subject(s): "
        + ", ".join(f"{n} {state}" for state, n in counts.items())
    ]
    for result in results.values():
        lines.append(f"  sub-{result.subject}  {result.state:<8} {result.detail}".rstrip())
    return "\n".join(lines)


def run_status(out_dir: Path) -> int:
    """Print the per-subject state; exit 0 when every subject is ok."""
    out_dir = out_dir.resolve()
    if not (out_dir / "logs").is_dir():
        raise SubmitError(f"OUT_DIR {out_dir}: no mriflow runs or submissions recorded (no logs/)")
    results = subject_results(out_dir, queued=_queued_jobs())
    print(format_status(out_dir, results))
    return 0 if results and all(r.state == "ok" for r in results.values()) else 1
