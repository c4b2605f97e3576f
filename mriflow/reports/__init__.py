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

__all__ = [
    "graph_image",
    "native_qc",
    "template_qc",
    "write_group_report",
    "write_participant_reports",
    "write_subject_qc",
]


def write_subject_qc(
    out_dir: str | os.PathLike[str],
    subject: str,
    *,
    work_dir: str | os.PathLike[str] | None = None,
    bias_fields: Mapping[str, str | os.PathLike[str]] | None = None,
    templates: Mapping[str, Any] | None = None,
    graph_qc: Sequence[Mapping[str, Any]] = (),
) -> str:
    """IQM files, HTML report with figures and PROV record of one subject of ``out_dir``.

    ``out_dir`` may be the subject's staging folder (laid out like OUT_DIR): the
    publishing node calls this before moving the subject into place.
    ``bias_fields`` (raw image relative path -> N4 field) gives the INU metrics;
    ``work_dir`` (the subject's Nipype folder) the run time of each step.
    ``graph_qc``: records of :func:`native_qc` and :func:`template_qc` (the graph
    measured and drew an image from the files it publishes, figures already under
    ``out_dir``): what they hold is not measured or drawn again.

    Returns
    -------
    str
        The report, relative to ``out_dir``.
    """
    from mriflow.bids.outputs import report_relpath
    from mriflow.image.qc import IQMs
    from mriflow.reports.html import NATIVE_FIGURES, ReportFigure, write_subject_report
    from mriflow.reports.iqms import ImageCache, compute_subject_iqms
    from mriflow.reports.provenance import write_provenance

    iqms: dict[str, dict[str, IQMs]] = {"native": {}, "template": {}}
    drawn: dict[str, tuple[list[str], list]] = {}
    for record in graph_qc:
        part = record.get("part", "native")
        if record.get("iqms"):
            iqms[part][record["source"]] = IQMs(**record["iqms"])
        if record.get("figures") is not None:
            kinds, figures = drawn.setdefault(record["source"], ([], []))
            kinds += NATIVE_FIGURES if part == "native" else ["registration"]
            figures += [
                ReportFigure(Path(out_dir) / f["relpath"], f["title"], f["caption"], f["kind"])
                for f in record["figures"]
            ]
    load = ImageCache()  # the IQMs and the figures read each file once between them
    compute_subject_iqms(
        out_dir,
        subject,
        templates=templates,
        bias_fields=bias_fields,
        load=load,
        native=iqms["native"],
        template_space=iqms["template"],
    )
    write_subject_report(
        out_dir, subject, work_dir=work_dir, templates=templates, load=load, drawn=drawn
    )
    write_provenance(out_dir, subject)
    return report_relpath(subject)


def graph_image(
    raw_relpath: str,
    raw_file: str | os.PathLike[str] | None,
    plan: Sequence[Mapping[str, Any]],
    files: Mapping[str, str | os.PathLike[str]],
    metadata: Mapping[str, Mapping[str, Any]] | None = None,
):
    """One raw image's outputs as the graph produced them, named as they will be published.

    Parameters
    ----------
    raw_relpath : str
        The raw image, relative to the raw dataset.
    raw_file : path, optional
        The raw image itself (for the raw-vs-preprocessed figures).
    plan : sequence of dict
        The publishing plan's items (:func:`mriflow.workflows.base.publish_plan`):
        ``output``, ``relpath``, ``metadata``; those of other images are ignored.
    files : mapping
        ``output -> file`` the graph produced (e.g. ``preproc``, ``brain_mask``).
    metadata : mapping, optional
        ``output -> run-time sidecar fields`` (e.g. ``SkullStripped`` of ``preproc``).

    Returns
    -------
    mriflow.bids.layout.ImageDerivatives
        With the files' paths, their published relative paths and sidecars (without
        the step records, which exist only once every step ran).
    """
    from mriflow.bids.derivatives import derivative_sidecar
    from mriflow.bids.layout import Derivative, ImageDerivatives
    from mriflow.bids.paths import bids_uri, parse_entities

    raw_entities, contrast, _ = parse_entities(raw_relpath)
    group = ImageDerivatives(
        source=bids_uri(raw_relpath, "raw"),
        source_path=Path(raw_file) if raw_file else None,
        contrast=contrast,
        entities=raw_entities,
    )
    for item in plan:
        output = item["output"]
        if item["raw_relpath"] != raw_relpath or not files.get(output):
            continue
        entities, suffix, extension = parse_entities(item["relpath"])
        sidecar = derivative_sidecar(
            raw_relpath,
            metadata=item.get("metadata"),
            extra_metadata=(metadata or {}).get(output),
        )
        group.files.append(
            Derivative(
                path=Path(files[output]),
                relpath=item["relpath"],
                entities=entities,
                suffix=suffix,
                extension=extension,
                sidecar=sidecar,
                role=output,
            )
        )
    return group


def native_qc(
    image,
    out_dir: str | os.PathLike[str],
    *,
    reference=None,
    bias_field: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """The IQMs and figures of one image that need only its native outputs.

    The graph runs this as soon as an image's preproc image, brain mask, tissue
    classes and N4 field exist (beside registration, which the publishing node
    waits for anyway); :func:`write_subject_qc` adds the template-space metrics
    and figure. The values are those :func:`write_subject_qc` would measure from
    the published files (the same data: publishing only compresses them and
    stores masks and labels as integers).

    Parameters
    ----------
    image, reference : mriflow.bids.layout.ImageDerivatives
        The image (:func:`graph_image`) and, for a contrast co-registered to a T1w,
        that T1w (whose brain mask and tissue classes it is measured in).
    out_dir : path
        Figures are written here under the relative paths the report gives them.
    bias_field : path, optional
        The image's N4 field (INU metrics).

    Returns
    -------
    dict
        ``source`` (the raw image's BIDS URI), ``iqms`` (:meth:`IQMs.as_dict`, or
        ``None`` without a preproc image and brain mask) and ``figures`` (``relpath``
        under ``out_dir``, ``title``, ``caption``, ``kind``; ``None`` when they must
        be drawn from the published files: a defaced image).
    """
    from mriflow.reports.html import draw_native_figures
    from mriflow.reports.iqms import ImageCache, measure_native

    load = ImageCache()  # the IQMs and the figures read each file once between them
    iqms = measure_native(image, bias_field, load, reference)
    figures = draw_native_figures(image, reference, out_dir, load=load)
    return {
        "source": image.source,
        "part": "native",
        "iqms": iqms.as_dict() if iqms is not None else None,
        "figures": None if figures is None else _figure_records(figures, out_dir),
    }


def template_qc(
    image, out_dir: str | os.PathLike[str], *, templates: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The template-space IQMs (``reg_*``) and registration figure of one image.

    The graph runs this as soon as the image's ``std_preproc`` and ``std_mask``
    exist; see :func:`native_qc` (same arguments and record, ``part: "template"``).
    """
    from mriflow.reports.html import draw_template_figures
    from mriflow.reports.iqms import ImageCache, template_space_iqms

    load = ImageCache()
    iqms = template_space_iqms(image, templates, load)
    figures = draw_template_figures(image, out_dir, templates=templates, load=load)
    return {
        "source": image.source,
        "part": "template",
        "iqms": iqms.as_dict(),
        "figures": _figure_records(figures, out_dir),
    }


def _figure_records(figures, out_dir: str | os.PathLike[str]) -> list[dict[str, str]]:
    return [
        {
            "relpath": Path(f.path).relative_to(out_dir).as_posix(),
            "title": f.title,
            "caption": f.caption,
            "kind": f.kind,
        }
        for f in figures
    ]


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
    from mriflow.reports.provenance import write_provenance, write_workflow_graph

    errors = dict(errors or {})
    written: dict[str, list[Path]] = {}
    if subjects:
        # 0.3 s of imports (matplotlib, scipy.stats) at the end of every run; a
        # participant run has reports to write here only for its failed subjects
        from mriflow.reports.html import write_subject_report
        from mriflow.reports.iqms import compute_subject_iqms
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
