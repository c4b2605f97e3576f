"""The group level: choose the subjects, run :func:`~mriflow.workflows.group.init_group_wf`, report.

Only subjects whose completion record (``logs/sub-XX_status.json``) says ``ok`` are
used; the others are listed as skipped, and the exit code is 1 when any selected
subject is missing or failed.
"""

from __future__ import annotations

import logging
from pathlib import Path

from mriflow.bids.layout import DerivativesLayout
from mriflow.bids.outputs import GROUP_OUTPUTS
from mriflow.bids.paths import subject_dirname, subject_label
from mriflow.cli.errors import EXIT_FAILED, EXIT_OK, UsageError
from mriflow.config import Config

log = logging.getLogger("mriflow")

__all__ = ["run_group", "select_group_subjects"]


def select_group_subjects(
    layout: DerivativesLayout, participant_labels: list[str] | None = None
) -> tuple[list[str], dict[str, str]]:
    """``(usable labels, {label: why skipped})`` of the selected subjects.

    Raises
    ------
    UsageError
        A ``participant_labels`` entry that OUT_DIR knows nothing about.
    """
    known = sorted(set(layout.subjects()) | set(layout.statuses()))
    selected = known
    if participant_labels:
        wanted = [subject_label(label) for label in participant_labels]
        unknown = [label for label in wanted if label not in known]
        if unknown:
            raise UsageError(
                f"--participant-label {' '.join(unknown)}: not in OUT_DIR {layout.root} "
                f"(it has {', '.join(known) or 'no subjects'})"
            )
        selected = sorted(set(wanted))
    usable, skipped = [], {}
    for label in selected:
        record = layout.status(label)
        if record is None:
            skipped[label] = "no completion record (participant level not run or interrupted)"
        elif record.get("status") != "ok":
            skipped[label] = f"participant level failed: {record.get('reason') or 'unknown'}"
        else:
            usable.append(label)
    return usable, skipped


def run_group(
    *,
    bids_dir: Path,
    out_dir: Path,
    work_dir: Path,
    config: Config,
    participant_labels: list[str] | None = None,
) -> int:
    from mriflow.ml.splits import ParticipantsError, read_participants

    layout = DerivativesLayout(out_dir)
    if not layout.group_file("dataset_description").is_file():
        raise UsageError(
            f"OUT_DIR {out_dir} has no participant outputs: run the participant level first"
        )
    subjects, skipped = select_group_subjects(layout, participant_labels)
    for label, reason in skipped.items():
        log.warning("%s: skipped: %s", subject_dirname(label), reason)
    if not subjects:
        raise UsageError(f"OUT_DIR {out_dir}: no subject with complete participant outputs")

    participants_tsv = bids_dir / "participants.tsv"
    split_cfg = config.split
    if participants_tsv.is_file():
        try:  # a broken table is a usage error, reported before any work
            read_participants(participants_tsv)
        except ParticipantsError as err:
            raise UsageError(str(err)) from None
    elif split_cfg.stratify_by or split_cfg.group_by:
        raise UsageError(
            f"{participants_tsv}: not found, but split.stratify_by/group_by need its columns"
        )

    from mriflow.cli.participant import FailureRecorder
    from mriflow.workflows.group import init_group_wf

    workflow = init_group_wf(
        out_dir=out_dir,
        subjects=subjects,
        config=config,
        participants_tsv=participants_tsv if participants_tsv.is_file() else None,
    )
    workflow.base_dir = str(work_dir)
    workflow.config["execution"].update(
        {"crashdump_dir": str(work_dir / "crash" / "group"), "crashfile_format": "pklz"}
    )
    recorder = FailureRecorder({workflow.name: "group"})
    try:
        graph = workflow.run(plugin="Linear", plugin_args={"status_callback": recorder})
    except RuntimeError:
        reason = recorder.failures.get("group", "a group step failed")
        print(f"mriflow group: FAILED  {reason}")
        return EXIT_FAILED
    results = {node.name: node.result.outputs for node in graph.nodes()}
    print(_summary(subjects, skipped, results))
    return EXIT_FAILED if skipped else EXIT_OK


def _summary(subjects: list[str], skipped: dict[str, str], results: dict) -> str:
    """What the group workflow wrote, from its nodes' results (node name -> outputs)."""

    def name(path) -> str:
        return Path(path).name

    splits, manifest = results["splits"], results["manifest"]
    lines = [
        f"mriflow group: {len(subjects)} subject(s); splits {splits.counts} "
        f"-> {name(splits.splits_file)}"
    ]
    if "nyul_apply" in results:
        lines.append(
            f"  Nyul: fitted on {len(results['select_training'].in_files)} training image(s) "
            f"-> {name(results['publish_standard'].out_file)}; "
            f"applied to {len(results['nyul_apply'].out_file)} image(s)"
        )
    else:
        lines.append("  Nyul: no native preprocessed T1w with a brain mask: not fitted")
    if manifest.manifest:
        lines.append(f"  manifest: {manifest.n_rows} row(s) -> {name(manifest.manifest)}")
    else:
        lines.append("  manifest: no model-ready volumes: not written")
    if manifest.slices_manifest:
        lines.append(f"  slices: -> {name(manifest.slices_manifest)}")
    lines.append(f"  QC: -> {GROUP_OUTPUTS['group_report']}")
    for label, reason in skipped.items():
        lines.append(f"  {subject_dirname(label)}  SKIPPED  {reason}")
    return "\n".join(lines)
