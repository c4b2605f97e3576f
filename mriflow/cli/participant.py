"""The participant level: plan, run the Nipype graph, report per subject."""

from __future__ import annotations

import glob
import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from mriflow.bids.derivatives import atomic_write_json, write_dataset_description
from mriflow.config import Config

log = logging.getLogger("mriflow")

__all__ = ["SubjectOutcome", "run_participant", "plugin_settings"]


@dataclass
class SubjectOutcome:
    subject: str
    ok: bool
    reason: str = ""


def plugin_settings(config: Config) -> tuple[str, dict]:
    """The Nipype plugin name and arguments from the execution config."""
    execution = config.execution
    plugin = execution.plugin
    args = dict(execution.plugin_args)
    if plugin == "MultiProc":
        args.setdefault("n_procs", execution.nprocs or os.cpu_count() or 1)
        if execution.mem_gb > 0:
            args.setdefault("memory_gb", execution.mem_gb)
        args.setdefault("raise_insufficient", False)
        # forked workers inherit ITK/torch/OpenMP thread pools that the parent may
        # already have started, and can deadlock in them; forkserver starts clean
        args.setdefault("mp_context", "forkserver")
    if plugin in ("SLURMGraph", "SGEGraph"):
        # a rerun submits only the nodes not already done (resume); also, nipype's
        # SLURMGraph fails with an AttributeError when this key is absent
        args.setdefault("dont_resubmit_completed_jobs", True)
    if plugin == "SLURMGraph" and "--kill-on-invalid-dep" not in args.get("sbatch_args", ""):
        # jobs after a failed one would otherwise wait in the queue forever
        args["sbatch_args"] = f"--kill-on-invalid-dep=yes {args.get('sbatch_args', '')}".strip()
    return plugin, args


def run_participant(
    *,
    bids_dir: Path,
    out_dir: Path,
    work_dir: Path,
    config: Config,
    participant_labels: list[str] | None = None,
    session_labels: list[str] | None = None,
    database_dir: Path | None = None,
    bids_filter_file: Path | None = None,
) -> int:
    from mriflow.bids.discovery import DiscoveryError, collect_inputs, load_bids_filters
    from mriflow.cli.run import EXIT_FAILED, EXIT_OK, UsageError

    started = time.monotonic()
    started_wall = time.time()
    try:
        filters = load_bids_filters(bids_filter_file) if bids_filter_file else None
        subjects = collect_inputs(
            bids_dir,
            participant_labels,
            session_labels,
            database_dir=database_dir,
            bids_filters=filters,
        )
    except DiscoveryError as err:
        raise UsageError(str(err)) from None

    out_dir.mkdir(parents=True, exist_ok=True)
    write_dataset_description(out_dir, [bids_dir])
    config.write(out_dir / "mriflow_config.toml")
    if config.segmentation.method != "none":
        from mriflow.bids.derivatives import atomic_write_text
        from mriflow.image.segmentation import dseg_tsv

        # one lookup table at the root applies to every dseg (BIDS inheritance)
        atomic_write_text(out_dir / "dseg.tsv", dseg_tsv())

    run_id = time.strftime("%Y%m%d-%H%M%S") + "_" + uuid.uuid4().hex[:8]
    crash_dir = work_dir / "crash" / run_id
    runnable = [s for s in subjects if not s.error]
    for subject in subjects:
        if subject.error:
            log.error("sub-%s: %s", subject.subject, subject.error)

    workflow_name = "mriflow_wf"
    workflow = None
    if runnable:
        from mriflow.workflows.base import init_mriflow_wf

        workflow = init_mriflow_wf(
            runnable,
            config=config,
            bids_dir=bids_dir,
            out_dir=out_dir,
            work_dir=work_dir,
            name=workflow_name,
        )
        workflow.config["execution"].update(
            {
                "crashdump_dir": str(crash_dir),
                "crashfile_format": "pklz",
                "hash_method": "content",
                "stop_on_first_crash": config.execution.stop_on_first_crash,
                "remove_unnecessary_outputs": False,
                "parameterize_dirs": False,
            }
        )
        plugin, plugin_args = plugin_settings(config)
        from mriflow.execution import poll_interval

        workflow.config["execution"]["poll_sleep_duration"] = poll_interval(plugin)
        log.info(
            "mriflow: %d subject(s), plugin %s %s, work dir %s",
            len(runnable),
            plugin,
            plugin_args,
            work_dir,
        )
        try:
            workflow.run(plugin=plugin, plugin_args=plugin_args)
        except RuntimeError as err:
            # Nipype raises after the graph ran when some nodes failed; the
            # crash files say which subjects, the others are complete.
            log.debug("workflow finished with errors: %s", err)
        if plugin.endswith("Graph"):
            # graph plugins return once every job is queued; the jobs run later
            _wait_for_graph_jobs(
                work_dir / workflow_name, crash_dir, [s.subject for s in runnable], started_wall
            )

    crashes = subject_failures(crash_dir)
    outcomes = []
    for subject in subjects:
        label = subject.subject
        if subject.error:
            outcomes.append(SubjectOutcome(label, False, subject.error))
        elif label in crashes:
            outcomes.append(SubjectOutcome(label, False, crashes[label]))
        elif not _published(work_dir / workflow_name, label, since=started_wall):
            outcomes.append(SubjectOutcome(label, False, "did not complete (run stopped early)"))
        else:
            outcomes.append(SubjectOutcome(label, True))

    elapsed = time.monotonic() - started
    _write_summary(out_dir, run_id, outcomes, elapsed, crash_dir)
    # Reports of successful subjects were made inside the workflow; failed ones get
    # a report that shows their error, and the run gets its workflow graph.
    from mriflow.reports import write_participant_reports

    write_participant_reports(
        out_dir,
        [o.subject for o in outcomes if not o.ok],
        work_dir=work_dir,
        workflow=workflow,
        errors={o.subject: o.reason for o in outcomes if not o.ok},
    )
    print(format_summary(outcomes, elapsed))
    return EXIT_OK if all(o.ok for o in outcomes) else EXIT_FAILED


def _wait_for_graph_jobs(
    workflow_dir: Path, crash_dir: Path, subjects: list[str], since: float, poll: float = 5.0
) -> None:
    """Block until every subject's jobs published its outputs or one of them crashed.

    A job killed by the scheduler (time or memory limit) leaves no crash file: stop
    with Ctrl-C, fix the limits and rerun the command (done jobs are not resubmitted).
    """
    pending = set(subjects)
    log.info("mriflow: jobs submitted; waiting for %d subject(s) to finish", len(pending))
    while pending:
        crashed = subject_failures(crash_dir)
        pending = {
            s for s in pending if s not in crashed and not _published(workflow_dir, s, since)
        }
        if pending:
            time.sleep(poll)


def _published(workflow_dir: Path, subject: str, since: float) -> bool:
    """Whether the subject's publishing node ran in this run (it reruns every time)."""
    from mriflow.workflows.base import subject_workflow_name

    subject_dir = workflow_dir / subject_workflow_name(subject)
    result = subject_dir / "publish" / "result_publish.pklz"
    # the report runs after publishing (its own job under graph plugins); a rerun
    # keeps its result when the published files did not change
    report = subject_dir / "report" / "result_report.pklz"
    return result.is_file() and result.stat().st_mtime >= since - 1 and report.is_file()


def subject_failures(crash_dir: Path) -> dict[str, str]:
    """First failure reason per subject label, read from Nipype crash files."""
    from nipype.utils.filemanip import loadcrash

    failures: dict[str, str] = {}
    for crashfile in sorted(glob.glob(str(crash_dir / "crash-*.pklz")), key=os.path.getmtime):
        try:
            crash = loadcrash(crashfile)
            fullname = crash["node"].fullname
            traceback = crash.get("traceback") or []
        except Exception as err:  # an unreadable crash file must not hide the others
            log.warning("cannot read crash file %s: %s", crashfile, err)
            continue
        subject = next(
            (
                part[len("sub_") : -len("_wf")]
                for part in fullname.split(".")
                if part.startswith("sub_") and part.endswith("_wf")
            ),
            None,
        )
        if subject is None or subject in failures:
            continue
        node = fullname.split(".")[-1]
        failures[subject] = f"{_last_error_line(traceback)} [step {node}; crash file {crashfile}]"
    return failures


def _last_error_line(traceback: list[str]) -> str:
    lines = [line.strip() for chunk in traceback for line in str(chunk).splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        return "unknown error"
    last = lines[-1]
    kind, sep, message = last.partition(": ")
    # "mriflow.image.io.ImageError: /x.nii.gz: not readable" -> "/x.nii.gz: not readable"
    if sep and " " not in kind and kind.split(".")[-1].endswith(("Error", "Exception")):
        return message
    return last


def format_summary(outcomes: list[SubjectOutcome], elapsed: float) -> str:
    ok = sum(o.ok for o in outcomes)
    lines = [
        f"mriflow participant: {ok} of {len(outcomes)} subject(s) succeeded in {elapsed:.0f} s"
    ]
    for outcome in outcomes:
        status = "ok" if outcome.ok else f"FAILED  {outcome.reason}"
        lines.append(f"  sub-{outcome.subject}  {status}")
    return "\n".join(lines)


def _write_summary(
    out_dir: Path, run_id: str, outcomes: list[SubjectOutcome], elapsed: float, crash_dir: Path
) -> None:
    atomic_write_json(
        out_dir / "logs" / f"run-{run_id}_summary.json",
        {
            "RunID": run_id,
            "ElapsedSeconds": round(elapsed, 1),
            "CrashDir": str(crash_dir),
            "Subjects": [
                {
                    "participant_id": f"sub-{o.subject}",
                    "status": "ok" if o.ok else "failed",
                    "reason": o.reason,
                }
                for o in outcomes
            ],
        },
    )
