"""The participant level: plan, run the Nipype graph, report per subject."""

from __future__ import annotations

import logging
import os
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path

from mriflow.bids.derivatives import write_derivatives_description
from mriflow.bids.layout import DerivativesLayout
from mriflow.bids.outputs import GROUP_OUTPUTS
from mriflow.bids.paths import atomic_write_json, atomic_write_text
from mriflow.bids.publish import write_status
from mriflow.cli.errors import EXIT_FAILED, EXIT_OK, UsageError
from mriflow.config import Config

log = logging.getLogger("mriflow")

#: The top workflow of a participant run (its folder in the work dir).
WORKFLOW_NAME = "mriflow_wf"

__all__ = [
    "FailureRecorder",
    "SubjectOutcome",
    "plugin_settings",
    "run_participant",
]


@dataclass
class SubjectOutcome:
    subject: str
    ok: bool
    reason: str = ""
    left_out: dict[str, str] = field(default_factory=dict)
    """Images of a published subject that failed (raw path -> reason): the rest of
    the subject's images ran without them."""


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


class FailureRecorder:
    """Nipype ``status_callback``: the first failed node of each subject, with its error.

    The failures come from the run itself (the node's own result), not from crash
    files; nodes are attributed to subjects by the sub-workflow the graph put them
    in (``prefixes``: ``mriflow_wf.sub_01_wf`` -> ``01``). A reason that names a
    work-dir file, or none, names the subject's raw image instead (``subjects``).
    """

    def __init__(self, prefixes: dict[str, str], subjects: list | None = None) -> None:
        self.prefixes = prefixes
        self.subjects = subjects or []
        self.failures: dict[str, str] = {}
        self.failed_images: dict[str, dict[str, str]] = {}
        """Per subject: raw path of each image whose own chain failed -> reason."""
        self.shared_failures: set[str] = set()
        """Subjects with a failed node outside any image's chain (e.g. publishing)."""

    def __call__(self, node, status: str) -> None:
        if status != "exception":
            return
        try:
            traceback = getattr(node.result.runtime, "traceback", None) or ""
        except Exception:  # the node died before writing its result (killed worker)
            traceback = ""
        self.record(node.fullname, traceback)

    def record(self, fullname: str, traceback: str) -> None:
        """Note the failure of node ``fullname`` for its subject (the first one wins)."""
        from mriflow.execution import disk_error

        subject = next((s for p, s in self.prefixes.items() if fullname.startswith(p + ".")), None)
        if subject is None:
            return
        # a full work disk shows as a missing result file last: say what happened first
        reason = disk_error(traceback) or _last_error_line([traceback])
        image = _image_of_node(fullname, subject, self.subjects)
        reason = _name_raw_image(reason, image)
        reason = f"{reason} [step {fullname.split('.')[-1]}]"
        if image is not None:
            self.failed_images.setdefault(subject, {}).setdefault(str(image.path), reason)
        else:
            self.shared_failures.add(subject)
        self.failures.setdefault(subject, reason)

    def without_failed_contrasts(self, subjects: list, reference: str = "") -> list:
        """The failed subjects whose failures all lie in images aligned to a reference
        T1w, without those images (run again, they publish everything else); the failed
        images and reasons go to ``image_errors``."""
        retry = []
        for subject in subjects:
            failed = self.failed_images.get(subject.subject, {})
            if not failed or subject.subject in self.shared_failures:
                continue
            references = {str(s.reference.path) for s in subject.sessions(reference)}
            if references & set(failed):
                continue
            kept = [i for i in subject.images if str(i.path) not in failed]
            errors = {**subject.image_errors, **failed}
            retry.append(replace(subject, images=kept, image_errors=errors))
        return retry


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
    build_only: str | None = None,
    show_progress: bool = True,
) -> int:
    """Run the participant level; exit code 0 (all ok), 1 (some failed) or 2 (usage).

    ``build_only`` (``"boilerplate"`` or ``"graph"``) builds the workflow of the run,
    writes its methods text (``logs/CITATION.md``, ``.bib``) or its graph
    (``provenance/workflow.dot``) into OUT_DIR and returns without running it.
    ``show_progress`` shows the progress line on stderr (:mod:`mriflow.cli.progress`).
    """
    started = time.monotonic()
    run_id = time.strftime("%Y%m%d-%H%M%S") + "_" + uuid.uuid4().hex[:8]
    arguments = dict(
        bids_dir=bids_dir,
        out_dir=out_dir,
        work_dir=work_dir,
        config=config,
        participant_labels=participant_labels,
        session_labels=session_labels,
        database_dir=database_dir,
        bids_filter_file=bids_filter_file,
        build_only=build_only,
        show_progress=show_progress,
        run_id=run_id,
        started=started,
    )
    if build_only:
        return _run_participant(**arguments)
    from mriflow.execution import prestarted_workers

    # the workers boot while the inputs are indexed and the graph is built
    with prestarted_workers(
        *plugin_settings(config), cwd=work_dir, log_file=_log_file(out_dir, run_id)
    ):
        return _run_participant(**arguments)


def _log_file(out_dir: Path, run_id: str) -> Path:
    """Where the run's Nipype log and tracebacks go."""
    return out_dir / "logs" / f"run-{run_id}.log"


def _run_participant(
    *,
    bids_dir: Path,
    out_dir: Path,
    work_dir: Path,
    config: Config,
    participant_labels: list[str] | None,
    session_labels: list[str] | None,
    database_dir: Path | None,
    bids_filter_file: Path | None,
    build_only: str | None,
    show_progress: bool,
    run_id: str,
    started: float,
) -> int:
    from mriflow.bids.discovery import DiscoveryError, collect_inputs, load_bids_filters

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
    if build_only:
        return _build_only(build_only, subjects, config, bids_dir, out_dir, work_dir)
    from mriflow.cli.preflight import check_free_space

    runnable_images = [(i.path, i.suffix) for s in subjects if not s.error for i in s.images]
    check_free_space(runnable_images, config, out_dir, work_dir)  # exit 2 before any work

    out_dir.mkdir(parents=True, exist_ok=True)
    write_derivatives_description(out_dir, [bids_dir])
    config.write(out_dir / GROUP_OUTPUTS["config"])
    if config.segmentation.method != "none":
        from mriflow.image.segmentation import dseg_tsv

        # one lookup table at the root applies to every dseg (BIDS inheritance)
        atomic_write_text(out_dir / GROUP_OUTPUTS["dseg_lut"], dseg_tsv())

    crash_dir = work_dir / "crash" / run_id
    runnable = [s for s in subjects if not s.error]
    for subject in subjects:
        if subject.error:
            log.error("sub-%s: %s", subject.subject, subject.error)

    workflow, recorder = _run_graph(
        runnable, subjects, config, bids_dir, out_dir, work_dir, run_id, crash_dir,
        show_progress=show_progress, first=True,
    )  # fmt: skip
    retry = recorder.without_failed_contrasts(runnable, config.coregistration.reference)
    if retry and not config.execution.stop_on_first_crash:
        # an image aligned to a reference failed: the subject's other images are
        # done (cached); run those subjects again without it, so they are published
        for subject in retry:
            log.error(
                "sub-%s: running again without %s", subject.subject, ", ".join(subject.image_errors)
            )
        _, again = _run_graph(
            retry, subjects, config, bids_dir, out_dir, work_dir, run_id, crash_dir
        )
        for subject in retry:
            recorder.failures.pop(subject.subject, None)
            if subject.subject in again.failures:
                recorder.failures[subject.subject] = again.failures[subject.subject]
        retried = {s.subject: s for s in retry}
        subjects = [retried.get(s.subject, s) for s in subjects]

    layout = DerivativesLayout(out_dir)
    outcomes = []
    for subject in subjects:
        label = subject.subject
        record = layout.status(label) or {}
        if subject.error:
            outcomes.append(SubjectOutcome(label, False, subject.error))
        elif record.get("run_id") == run_id and record.get("status") == "ok":
            outcomes.append(SubjectOutcome(label, True, left_out=dict(subject.image_errors)))
        elif label in recorder.failures:
            outcomes.append(SubjectOutcome(label, False, recorder.failures[label]))
        else:
            reason = f"did not complete (run stopped early; crash files in {crash_dir})"
            outcomes.append(SubjectOutcome(label, False, reason))
    for outcome in outcomes:
        if not outcome.ok:
            write_status(out_dir, outcome.subject, ok=False, run_id=run_id, reason=outcome.reason)
        elif outcome.left_out:
            # published without these images: the group level may use the subject
            reason = "left out: " + "; ".join(outcome.left_out.values())
            write_status(out_dir, outcome.subject, ok=True, run_id=run_id, reason=reason)

    elapsed = time.monotonic() - started
    _write_summary(out_dir, run_id, outcomes, elapsed, crash_dir)
    # Reports of successful subjects were made when they were published; failed
    # ones get a report that shows their error, and the run gets its workflow graph.
    from mriflow.reports import write_participant_reports

    write_participant_reports(
        out_dir,
        [o.subject for o in outcomes if not o.ok],
        work_dir=work_dir,
        workflow=workflow,
        errors={o.subject: o.reason for o in outcomes if not o.ok},
    )
    print(format_summary(outcomes, elapsed))
    return EXIT_OK if all(o.ok and not o.left_out for o in outcomes) else EXIT_FAILED


def _run_graph(
    runnable: list,
    subjects: list,
    config: Config,
    bids_dir: Path,
    out_dir: Path,
    work_dir: Path,
    run_id: str,
    crash_dir: Path,
    *,
    show_progress: bool = False,
    first: bool = False,
):
    """Build and run the Nipype graph of ``runnable``; the workflow and its failures.

    ``first``: the run's first graph (it writes the methods boilerplate); a rerun of
    subjects without their failed contrasts is not.
    """
    workflow = None
    recorder = FailureRecorder({}, subjects)
    if runnable:
        from mriflow.workflows.base import subject_workflow_name

        workflow = _init_workflow(runnable, config, bids_dir, out_dir, work_dir, run_id)
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
        if first:
            from mriflow.reports.boilerplate import write_boilerplate

            try:  # the methods text of what is about to run; it must never stop the run
                write_boilerplate(workflow, out_dir)
            except Exception as err:
                log.warning("mriflow: methods boilerplate (logs/CITATION.md) not written: %s", err)
        prefixes = {
            f"{WORKFLOW_NAME}.{subject_workflow_name(s.subject)}": s.subject for s in runnable
        }
        recorder = FailureRecorder(prefixes, subjects)
        progress = None
        if not plugin.endswith("Graph"):  # graph plugins cannot call back
            callback = recorder
            if show_progress:
                from mriflow.cli.progress import Progress

                failed_early = [s.subject for s in subjects if s.error]
                progress = Progress(prefixes, len(subjects), failed=failed_early)
                callback = _Callbacks(recorder, progress)
            plugin_args = {**plugin_args, "status_callback": callback}
        from mriflow.execution import run_workflow

        # failed nodes are reported, not raised; tracebacks go to the log file
        try:
            graph_run = run_workflow(
                workflow, plugin, plugin_args, log_file=_log_file(out_dir, run_id)
            )
        finally:
            if progress is not None:
                progress.close()
        # nodes whose result could not even be written (a full work disk) never
        # reach the callback: the watched plugin kept their reasons
        for fullname, reason in graph_run.failures.items():
            recorder.record(fullname, reason)
        if graph_run.fatal:
            log.error("mriflow: %s", graph_run.fatal)
        if plugin.endswith("Graph") and not graph_run.fatal:
            # graph plugins return once every job is queued; the jobs run later
            _wait_for_graph_jobs(
                out_dir, [s.subject for s in runnable], run_id, crash_dir, recorder
            )

    return workflow, recorder


def _init_workflow(runnable, config, bids_dir, out_dir, work_dir, run_id: str = ""):
    """The Nipype graph of a participant run (what runs, or what --boilerplate describes)."""
    from mriflow.workflows.base import init_mriflow_wf

    return init_mriflow_wf(
        runnable,
        config=config,
        bids_dir=bids_dir,
        out_dir=out_dir,
        work_dir=work_dir,
        run_id=run_id,
        name=WORKFLOW_NAME,
    )


class _Callbacks:
    """Several Nipype status callbacks as one (failures first: the progress reads none)."""

    def __init__(self, *callbacks) -> None:
        self.callbacks = callbacks

    def __call__(self, node, status: str) -> None:
        for callback in self.callbacks:
            callback(node, status)


def _build_only(
    what: str, subjects: list, config: Config, bids_dir: Path, out_dir: Path, work_dir: Path
) -> int:
    """``--boilerplate`` / ``--write-graph``: build the run's workflow, write it, run nothing."""
    runnable = [s for s in subjects if not s.error]
    for subject in subjects:
        if subject.error:
            log.warning("sub-%s: not in the workflow: %s", subject.subject, subject.error)
    if not runnable:
        raise UsageError(f"BIDS_DIR {bids_dir}: no subject with usable inputs to build a workflow")
    workflow = _init_workflow(runnable, config, bids_dir, out_dir, work_dir)
    if what == "boilerplate":
        from mriflow.reports.boilerplate import write_boilerplate

        written = write_boilerplate(workflow, out_dir)
    else:
        from mriflow.reports.provenance import write_workflow_graph

        written = write_workflow_graph(workflow, out_dir)
    for path in written:
        print(f"mriflow: wrote {path}")
    return EXIT_OK


def _wait_for_graph_jobs(
    out_dir: Path,
    subjects: list[str],
    run_id: str,
    crash_dir: Path,
    recorder: FailureRecorder,
    poll: float = 5.0,
) -> None:
    """Block until every subject's publishing job wrote its completion record for
    ``run_id``, or one of its jobs failed.

    Graph plugins cannot call back, so a failed job is known by the crash file its
    job wrote; it is attributed to its subject as the callback would (by the
    sub-workflow the graph put its node in). A job killed by the scheduler (time
    or memory limit) writes nothing: stop with Ctrl-C, fix the limits and rerun
    (done jobs are not resubmitted).
    """
    from nipype.utils.filemanip import loadcrash

    layout = DerivativesLayout(out_dir)
    pending = set(subjects)
    seen: set[Path] = set()
    log.info("mriflow: jobs submitted; waiting for %d subject(s) to finish", len(pending))
    while pending:
        for crashfile in sorted(crash_dir.glob("*.pklz")) if crash_dir.is_dir() else []:
            if crashfile not in seen:
                seen.add(crashfile)
                try:
                    crash = loadcrash(str(crashfile))
                except Exception as err:  # an unreadable crash file must not hide the others
                    log.warning("cannot read crash file %s: %s", crashfile, err)
                    continue
                recorder.record(crash["node"].fullname, "".join(crash.get("traceback") or []))
        pending = {
            s
            for s in pending
            if s not in recorder.failures and (layout.status(s) or {}).get("run_id") != run_id
        }
        if pending:
            time.sleep(poll)


def _image_of_node(fullname: str, subject: str, subjects: list):
    """The raw image (AnatInput) whose chain of steps (``anat_<key>_wf``) holds a node."""
    keys = [p[len("anat_") : -len("_wf")] for p in fullname.split(".") if p.startswith("anat_")]
    inputs = next((s for s in subjects if s.subject == subject), None)
    return next((i for i in inputs.images if i.key in keys), None) if inputs and keys else None


def _name_raw_image(reason: str, image) -> str:
    """``"<raw image>: <problem>"`` for a failure inside an image's chain of steps."""
    if image is None or str(image.path) in reason:
        return reason
    named, sep, problem = reason.partition(": ")
    if sep and "/" in named and " " not in named:  # a work-dir file: the user never saw it
        reason = problem
    return f"{image.path}: {reason}"


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
        for reason in outcome.left_out.values():
            lines.append(f"  sub-{outcome.subject}  LEFT OUT  {reason}")
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
