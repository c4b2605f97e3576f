"""``--reports-only``: redraw the QC reports of OUT_DIR's published subjects, run nothing."""

from __future__ import annotations

import logging
from pathlib import Path

from mriflow.bids.layout import DerivativesLayout
from mriflow.cli.errors import EXIT_FAILED, EXIT_OK, UsageError
from mriflow.cli.group import select_group_subjects
from mriflow.cli.participant import WORKFLOW_NAME

log = logging.getLogger("mriflow")

__all__ = ["rebuild_reports"]


def rebuild_reports(
    out_dir: Path, work_dir: Path, participant_labels: list[str] | None = None
) -> int:
    """``--reports-only``: QC reports, IQMs and provenance of OUT_DIR's published subjects.

    No Nipype node runs: the reports are drawn from the published files, as the
    publishing node draws them from the staged ones. The work dir of the run, when it
    is still there, gives the run time of each step and the N4 bias fields (INU
    metrics); the publishing node's saved inputs say which field belongs to which image.
    """
    from mriflow.bids.paths import subject_dirname
    from mriflow.reports import write_subject_qc

    # the subjects the group level would use: completion record ok
    published, skipped = select_group_subjects(DerivativesLayout(out_dir), participant_labels)
    for label, reason in skipped.items():
        log.warning("%s: no report rebuilt: %s", subject_dirname(label), reason)
    if not published:
        raise UsageError(f"OUT_DIR {out_dir}: no published subject to report on")
    from mriflow.workflows.base import subject_workflow_name

    failed = []
    for label in published:
        subject_work = work_dir / WORKFLOW_NAME / subject_workflow_name(label)
        try:
            write_subject_qc(
                out_dir,
                label,
                work_dir=subject_work if subject_work.is_dir() else None,
                bias_fields=_saved_bias_fields(subject_work),
            )
        except Exception as err:  # one subject's report must not stop the others
            log.error("sub-%s: report not rebuilt: %s", label, err)
            failed.append(label)
    print(
        f"mriflow participant --reports-only: {len(published) - len(failed)} of "
        f"{len(published)} report(s) rebuilt in {out_dir}"
    )
    return EXIT_FAILED if failed else EXIT_OK


def _saved_bias_fields(subject_work: Path) -> dict[str, str]:
    """Raw image -> N4 field, from the publishing node's result in the work dir ({} if gone)."""
    from nipype.utils.filemanip import loadpkl

    result_file = subject_work / "publish" / "result_publish.pklz"
    if not result_file.is_file():
        return {}
    try:
        inputs = loadpkl(str(result_file)).inputs
    except Exception as err:  # a foreign or stale pickle: report without INU metrics
        log.warning("%s: unreadable (%s); no INU metrics", result_file, err)
        return {}
    fields = inputs.get("bias_fields") or {}
    found = {raw: inputs.get(name) for raw, name in fields.items()}
    return {raw: path for raw, path in found.items() if path and Path(path).is_file()}
