"""QC reports, image-quality metric files and provenance of an mriflow run.

The two calls the CLI needs (both read what the participant run published in
``OUT_DIR``; see ``docs/reports.md``):

- :func:`write_participant_reports` after the participant level;
- :func:`mriflow.reports.html.write_group_report` at the group level.

Submodules are imported lazily: ``import mriflow.reports`` does not load matplotlib.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("mriflow")

__all__ = ["write_participant_reports", "write_group_report", "write_subject_qc"]


def write_subject_qc(
    out_dir: str | os.PathLike[str],
    subject: str,
    *,
    work_dir: str | os.PathLike[str] | None = None,
    bias_fields: Mapping[str, str | os.PathLike[str]] | None = None,
    templates: Mapping[str, Any] | None = None,
) -> str:
    """IQM files, HTML report with figures and PROV record of one subject of ``out_dir``.

    ``out_dir`` may be the subject's staging folder (laid out like OUT_DIR): the
    publishing node calls this before moving the subject into place.
    ``bias_fields`` (raw image relative path -> N4 field) gives the INU metrics;
    ``work_dir`` (the subject's Nipype folder) the run time of each step.

    Returns
    -------
    str
        The report, relative to ``out_dir``.
    """
    from mriflow.bids.outputs import report_relpath
    from mriflow.reports.html import write_subject_report
    from mriflow.reports.iqms import ImageCache, compute_subject_iqms
    from mriflow.reports.provenance import write_provenance

    load = ImageCache()  # the IQMs and the figures read each file once between them
    compute_subject_iqms(out_dir, subject, templates=templates, bias_fields=bias_fields, load=load)
    write_subject_report(out_dir, subject, work_dir=work_dir, templates=templates, load=load)
    write_provenance(out_dir, subject)
    return report_relpath(subject)


def write_participant_reports(
    out_dir: str | os.PathLike[str],
    subjects: Sequence[str],
    *,
    work_dir: str | os.PathLike[str] | None = None,
    workflow: Any = None,
    errors: Mapping[str, str] | None = None,
    templates: Mapping[str, Any] | None = None,
    graph_name: str = "workflow",
) -> dict[str, list[Path]]:
    """IQM files, HTML report and PROV record of each subject; the workflow graph.

    Parameters
    ----------
    out_dir : path
        The derivatives dataset the participant run wrote.
    subjects : sequence of str
        Labels (with or without ``sub-``) of every subject of the run, failed ones
        included: their report shows the error.
    work_dir : path, optional
        Nipype work folder (run time per step in the reports).
    workflow : nipype Workflow, optional
        Written as ``OUT_DIR/provenance/<graph_name>.dot`` (and ``.svg`` with graphviz).
    errors : mapping, optional
        ``label -> reason`` of failed subjects (also read from ``OUT_DIR/logs``).
    templates : mapping, optional
        ``space -> image | path | (image, mask)`` for registration figures and IQMs.

    Returns
    -------
    dict
        ``label -> files written`` (``"_run"`` for the workflow graph). A subject
        whose report fails is logged and skipped; the others are still written.
    """
    from mriflow.reports.html import write_subject_report
    from mriflow.reports.iqms import compute_subject_iqms
    from mriflow.reports.provenance import write_provenance, write_workflow_graph

    errors = dict(errors or {})
    written: dict[str, list[Path]] = {}
    for subject in subjects:
        label = subject[4:] if subject.startswith("sub-") else subject
        files: list[Path] = []
        try:
            if label not in errors:
                files += compute_subject_iqms(out_dir, label, templates=templates)
            files.append(
                write_subject_report(
                    out_dir,
                    label,
                    work_dir=work_dir,
                    errors=[errors[label]] if label in errors else (),
                    templates=templates,
                )
            )
            files.append(write_provenance(out_dir, label))
        except Exception as err:  # a report must never turn a good run into a failed one
            log.warning("sub-%s: QC report not (fully) written: %s", label, err)
        written[label] = files
    if workflow is not None:
        try:
            written["_run"] = write_workflow_graph(workflow, out_dir, name=graph_name)
        except Exception as err:
            log.warning("workflow graph not written: %s", err)
    return written


def write_group_report(out_dir: str | os.PathLike[str], **kwargs: Any) -> Path:
    """See :func:`mriflow.reports.html.write_group_report`."""
    from mriflow.reports.html import write_group_report as _write

    return _write(out_dir, **kwargs)
