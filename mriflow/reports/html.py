"""Per-subject and group HTML QC reports.

Layout in the derivatives folder (as sMRIPrep)::

    OUT_DIR/sub-01.html                 # the subject's report, links are relative
    OUT_DIR/sub-01/figures/*.png|svg    # its figures
    OUT_DIR/group.html                  # IQMs across subjects, outliers, links
    OUT_DIR/figures/group_<iqm>.png     # one strip plot per IQM
    OUT_DIR/group_desc-qc_metrics.tsv   # every IQM of every image

A report is rendered from plain dataclasses (:class:`SubjectReport`,
:class:`ReportSection`, :class:`ReportFigure`) so a caller can build one from any
source; :func:`write_subject_report` builds it from the published derivatives
(sidecars' ``Sources`` and ``Steps``), the IQM files and, optionally, the Nipype
work folder (run time per step). HTML is rendered by jinja2 with autoescaping
(every value from files is escaped); all writes are atomic.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from mriflow import __version__
from mriflow.bids.layout import (
    DerivativesLayout,
    ImageDerivatives,
    find_subject_derivatives,
    find_subjects,
)
from mriflow.bids.outputs import GROUP_OUTPUTS, figure_relpath, figure_relpath_of, report_relpath
from mriflow.bids.paths import atomic_copy, atomic_write_text
from mriflow.reports.iqms import IQM_INFO, ImageCache, _tsv, read_iqms, resolve_template

log = logging.getLogger("mriflow")

__all__ = [
    "ImageSummary",
    "ReportFigure",
    "ReportSection",
    "StepSummary",
    "SubjectReport",
    "collect_subject_report",
    "draw_native_figures",
    "draw_template_figures",
    "make_standard_figures",
    "read_step_runtimes",
    "render_group_html",
    "render_subject_html",
    "robust_z",
    "write_group_report",
    "write_subject_report",
]

#: A robust z-score beyond this flags an outlier in the group report.
OUTLIER_Z = 3.0


# --------------------------------------------------------------------------------------
# data model
# --------------------------------------------------------------------------------------


@dataclass
class ReportFigure:
    """One figure: an image file (PNG/SVG) and what the reviewer should look for."""

    path: Path
    """The file; copied under ``sub-XX/figures/`` unless it is already there."""
    title: str
    caption: str = ""
    kind: str = ""
    """Which standard figure it is (``brain``, ``registration``, ...; empty: another one)."""


@dataclass
class ReportSection:
    """A section of the report, usually one preprocessing step."""

    title: str
    figures: list[ReportFigure] = field(default_factory=list)
    text: str = ""
    image: str = ""
    """The image (``ImageSummary.key``) it belongs to; empty: the subject."""


@dataclass
class StepSummary:
    name: str
    parameters: dict[str, Any]
    software: dict[str, str]
    seconds: float | None = None


@dataclass
class ImageSummary:
    """What happened to one raw image."""

    key: str
    source: str
    outputs: list[str] = field(default_factory=list)
    voxel_size_before: list[float] | None = None
    voxel_size_after: list[float] | None = None
    shape_before: list[int] | None = None
    shape_after: list[int] | None = None
    steps: list[StepSummary] = field(default_factory=list)
    iqms: dict[str, float] = field(default_factory=dict)
    iqms_skipped: dict[str, str] = field(default_factory=dict)


@dataclass
class SubjectReport:
    subject: str
    images: list[ImageSummary] = field(default_factory=list)
    sections: list[ReportSection] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def software(self) -> dict[str, str]:
        versions: dict[str, str] = {"mriflow": __version__}
        for image in self.images:
            for step in image.steps:
                versions.update(step.software)
        return dict(sorted(versions.items(), key=lambda item: item[0].lower()))


# --------------------------------------------------------------------------------------
# collecting
# --------------------------------------------------------------------------------------


def read_step_runtimes(
    work_dir: str | os.PathLike[str] | None, subject: str
) -> list[tuple[dict, float]]:
    """(step record, seconds) of every node of ``subject`` in a Nipype work folder.

    ``work_dir`` is the subject's own workflow folder (what the publishing node
    passes) or a whole work folder, searched for ``**/sub_<label>_wf``. Nodes are
    its ``result_*.pklz`` whose outputs carry a ``step`` record (every mriflow
    interface does); the time is Nipype's ``runtime.duration``. Unreadable result
    files are skipped.
    """
    if work_dir is None or not Path(work_dir).is_dir():
        return []
    from nipype.utils.filemanip import loadpkl

    label = subject[4:] if subject.startswith("sub-") else subject
    found = []
    wf_name = f"sub_{label}_wf"
    work_dir = Path(work_dir)
    wf_dirs = [work_dir] if work_dir.name == wf_name else work_dir.rglob(wf_name)
    for wf_dir in wf_dirs:
        for result_file in sorted(wf_dir.rglob("result_*.pklz")):
            try:
                result = loadpkl(str(result_file))
                step = getattr(result.outputs, "step", None)
                duration = getattr(result.runtime, "duration", None)
            except Exception as err:  # a stale or foreign pickle must not break the report
                log.debug("%s: unreadable (%s)", result_file, err)
                continue
            if isinstance(step, dict) and "Name" in step and duration is not None:
                found.append((step, float(duration)))
    return found


def _seconds_for(step: dict, runtimes: list[tuple[dict, float]]) -> float | None:
    for key in ("ElapsedSeconds", "RunTimeSeconds"):
        if isinstance(step.get(key), (int, float)):
            return float(step[key])
    matches = [
        s
        for record, s in runtimes
        if record.get("Name") == step.get("Name")
        and record.get("Parameters") == step.get("Parameters")
    ]
    return matches[-1] if matches else None


def _geometry(path: Path | None) -> tuple[list[float] | None, list[int] | None]:
    if path is None or not path.is_file():
        return None, None
    try:
        img = nib.load(str(path))
    except Exception:
        return None, None
    zooms = np.sqrt((img.affine[:3, :3] ** 2).sum(0))
    return [round(float(z), 3) for z in zooms], [int(n) for n in img.shape[:3]]


def _summarize_image(group: ImageDerivatives, runtimes: list[tuple[dict, float]]) -> ImageSummary:
    summary = ImageSummary(key=group.key, source=group.source)
    summary.outputs = [d.relpath for d in group.files if d.role != "iqms"]
    summary.voxel_size_before, summary.shape_before = _geometry(group.source_path)
    preproc = group.get("preproc")
    summary.voxel_size_after, summary.shape_after = _geometry(preproc.path if preproc else None)
    for step in group.steps:
        params = step.get("Parameters", {})
        if summary.voxel_size_before is None and "input_voxel_size_mm" in params:
            summary.voxel_size_before = list(params["input_voxel_size_mm"])
            summary.shape_before = list(params.get("input_shape") or []) or None
        summary.steps.append(
            StepSummary(
                name=str(step.get("Name", "?")),
                parameters=dict(params),
                software=dict(step.get("Software", {})),
                seconds=_seconds_for(step, runtimes),
            )
        )
    iqm_file = group.get("iqms")
    if iqm_file is not None:
        payload = iqm_file.sidecar
        summary.iqms = {
            k: float(v)
            for k, v in payload.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        summary.iqms_skipped = dict(payload.get("Skipped", {}))
    return summary


def _run_errors(out_dir: Path, subject: str) -> list[str]:
    """The subject's failure reason from its completion record, if it failed."""
    record = DerivativesLayout(out_dir).status(subject)
    if not record or record.get("status") == "ok":
        return []
    return [f"{record.get('reason') or 'failed'} (run {record.get('run_id', '?')})"]


def collect_subject_report(
    out_dir: str | os.PathLike[str],
    subject: str,
    *,
    work_dir: str | os.PathLike[str] | None = None,
    errors: Iterable[str] = (),
    warnings: Iterable[str] = (),
) -> SubjectReport:
    """A :class:`SubjectReport` (no figures yet) from what is published in ``out_dir``."""
    out_dir = Path(out_dir)
    label = subject[4:] if subject.startswith("sub-") else subject
    runtimes = read_step_runtimes(work_dir, label)
    groups = find_subject_derivatives(out_dir, label)
    report = SubjectReport(subject=label)
    report.images = [_summarize_image(g, runtimes) for g in groups]
    report.errors = [*_run_errors(out_dir, label), *errors]
    report.warnings = list(warnings)
    for image in report.images:
        for name, reason in image.iqms_skipped.items():
            report.warnings.append(f"{image.key}: IQM {name} not computed: {reason}")
    if not groups and not report.errors:
        report.errors.append(f"no derivatives of sub-{label} found in {out_dir}")
    return report


# --------------------------------------------------------------------------------------
# figures from published derivatives
# --------------------------------------------------------------------------------------


def make_standard_figures(
    out_dir: str | os.PathLike[str],
    subject: str,
    *,
    templates: Mapping[str, Any] | None = None,
    fmt: str = "png",
    display_mm: float | None = 2.0,
    load: Callable[[Path], Any] | None = None,
    drawn: Mapping[str, tuple[Collection[str], Sequence[ReportFigure]]] | None = None,
) -> list[ReportSection]:
    """Draw the standard QC figures from the subject's published derivatives.

    Images are drawn at ``display_mm`` voxels or finer (every k-th voxel of each
    axis, the affine kept: :func:`mriflow.reports.figures.reduced`): a 1 mm head
    costs an eighth as much to resample and draw, and the panels are thumbnails.
    ``None`` draws at full resolution. ``load`` (``path -> image``) reads the files
    (default: an :class:`~mriflow.reports.iqms.ImageCache` of this call).

    Per raw image, whichever inputs exist: defacing (when the ``desc-preproc``
    sidecar says ``Defaced``: the removed region on the defaced head), raw vs
    preprocessed (``desc-preproc``; a defaced run shows the raw only where the
    defaced image is nonzero), brain mask contour (``desc-brain_mask``), co-registration
    to the reference T1w (contrasts in the T1w's space, see
    :meth:`~mriflow.bids.layout.DerivativesLayout.reference_of`; they use its brain
    mask), tissue segmentation (``dseg``), registration (``space-X_desc-preproc``
    over the template of ``X``) and intensity histograms raw vs preprocessed inside
    the brain mask. Figures are
    written to ``OUT_DIR/sub-XX/figures/``; a figure that fails is logged and left out.

    ``drawn`` (raw image's BIDS URI -> ``(kinds, figures)``): figures of those kinds
    (see :data:`NATIVE_FIGURES`; ``"registration"``) the graph already drew for that
    image from the same files (:func:`draw_native_figures`,
    :func:`draw_template_figures`), under ``OUT_DIR``; only the others are drawn here.
    """
    if fmt not in ("png", "svg"):
        raise ValueError(f"fmt must be 'png' or 'svg', got {fmt!r}")
    out_dir = Path(out_dir)
    label = subject[4:] if subject.startswith("sub-") else subject
    read = load if load is not None else ImageCache()
    sections: list[ReportSection] = []
    layout = DerivativesLayout(out_dir)
    groups = layout.find(label)
    for group in groups:
        if group.get("preproc") is None:
            continue
        # a co-registered contrast (T2w, FLAIR, ce-T1w) is masked by its reference T1w's
        # brain mask, on the same grid
        reference = layout.reference_of(group, groups)
        covered, done = (drawn or {}).get(group.source, ((), ()))
        kinds = [k for k in _FIGURE_ORDER if k and k not in covered] if covered else None
        new = []
        if kinds is None or kinds:  # all drawn in the graph: not even matplotlib is loaded
            jobs = _figure_jobs(
                group, reference, label, read=read, templates=templates, display_mm=display_mm,
                kinds=kinds,
            )  # fmt: skip
            new = _draw(jobs, out_dir, label, fmt)
        # the report's order of figures whoever drew them
        figures = sorted([*done, *new], key=lambda f: _FIGURE_ORDER.index(f.kind))
        if figures:
            sections.append(ReportSection(title=group.key, figures=figures, image=group.key))
    return sections


#: The kinds of figure of an image, in report order; all but "registration" need only
#: the image's native outputs.
_FIGURE_ORDER = (
    "deface", "conform", "brain", "coreg", "dseg", "registration", "histogram", "",
)  # fmt: skip
NATIVE_FIGURES = tuple(k for k in _FIGURE_ORDER if k and k != "registration")


def draw_native_figures(
    group: ImageDerivatives,
    reference: ImageDerivatives | None,
    out_dir: str | os.PathLike[str],
    *,
    fmt: str = "png",
    display_mm: float | None = 2.0,
    load: Callable[[Path], Any] | None = None,
) -> list[ReportFigure] | None:
    """The figures of :func:`make_standard_figures` that need only native outputs.

    ``group`` (and its ``reference`` T1w, for a co-registered contrast) may hold the
    files the graph produced before they are published: the figures are written
    under ``out_dir`` with the names the report gives them. ``None`` for a defaced
    image: its figures redraw the removed region from the recorded step parameters,
    which only the published sidecar holds.
    """
    preproc = group.get("preproc")
    if preproc is None or preproc.sidecar.get("Defaced"):
        return None
    label = group.entities["subject"]
    read = load if load is not None else ImageCache()
    jobs = _figure_jobs(
        group, reference, label, read=read, templates=None, display_mm=display_mm,
        kinds=NATIVE_FIGURES,
    )  # fmt: skip
    return _draw(jobs, Path(out_dir), label, fmt)


def draw_template_figures(
    group: ImageDerivatives,
    out_dir: str | os.PathLike[str],
    *,
    templates: Mapping[str, Any] | None = None,
    fmt: str = "png",
    display_mm: float | None = 2.0,
    load: Callable[[Path], Any] | None = None,
) -> list[ReportFigure]:
    """The registration figure of :func:`make_standard_figures` (``group`` as in
    :func:`draw_native_figures`, with its ``std_preproc``), written under ``out_dir``."""
    std_d = group.get("std_preproc")
    if std_d is None:
        return []
    read = load if load is not None else ImageCache()
    jobs = _registration_job(group, std_d, read, templates, display_mm)
    return _draw([_Job(*job) for job in jobs], Path(out_dir), group.entities["subject"], fmt)


@dataclass
class _Job:
    kind: str
    title: str
    entities: dict[str, str]
    suffix: str
    draw: Callable[..., Any]
    caption: str


def _draw(jobs: list[_Job], out_dir: Path, label: str, fmt: str) -> list[ReportFigure]:
    figures = []
    for job in jobs:
        relpath = figure_relpath(label, job.entities, job.suffix, f".{fmt}")
        try:
            job.draw(out_path=out_dir / relpath)
        except Exception as err:  # one bad figure must not cost the whole report
            log.warning("sub-%s: figure %r failed: %s", label, job.title, err)
            continue
        figures.append(ReportFigure(out_dir / relpath, job.title, job.caption, kind=job.kind))
    return figures


def _figure_jobs(
    group: ImageDerivatives,
    reference: ImageDerivatives | None,
    label: str,
    *,
    read: Callable[[Path], Any],
    templates: Mapping[str, Any] | None,
    display_mm: float | None,
    kinds: Sequence[str] | None = None,
) -> list[_Job]:
    """The figures of one image (those of ``kinds``; all when ``None``), not drawn yet."""
    from mriflow.reports import figures as F

    def wanted(kind: str) -> bool:
        return kinds is None or kind in kinds

    preproc = group.get("preproc")
    entities = {k: v for k, v in group.entities.items()}
    load = partial(_load_reduced, read=read, display_mm=display_mm)
    jobs: list[tuple] = []
    std_d = group.get("std_preproc")
    if std_d is not None and wanted("registration"):
        jobs += _registration_job(group, std_d, read, templates, display_mm)
    if not any(map(wanted, NATIVE_FIGURES)):
        return [_Job(*job) for job in jobs]
    t1w = load(preproc.path)
    own_mask = group.get("brain_mask")
    mask_d = own_mask or (reference.get("brain_mask") if reference else None)
    dseg_d = group.get("dseg")
    mask = load(mask_d.path) if mask_d else None
    dseg = load(dseg_d.path) if dseg_d else None
    raw_path = group.source_path
    raw = load(raw_path) if raw_path and raw_path.is_file() else None
    removed = None
    if preproc.sidecar.get("Defaced") and mask is not None:
        full_size = int(np.prod(read(preproc.path).shape[:3]))
        try:
            removed, note = _removed_region(t1w, mask, preproc, full_size)
        except ValueError as err:  # e.g. an empty mask: no figure, the rest still drawn
            log.warning("sub-%s: defacing figure of %s left out: %s", label, group.key, err)
    if removed is not None:
        jobs.append((
            "deface", "Defacing", {**entities, "desc": "deface"}, group.contrast,
            partial(F.plot_defacing, t1w, removed, brain_mask=mask),
            "The published (defaced) head; red: the region defacing removed (recomputed "
            "from the brain mask and the step's recorded parameters), cyan: the brain "
            "mask. Look for: face and ears inside the red region, a margin between it "
            "and the brain everywhere, no facial surface left in front of the brain. "
            + note,
        ))  # fmt: skip
    if raw is not None and preproc.sidecar.get("Defaced"):
        # the report may leave the building: the raw head must not put the face back
        raw = _hide_removed(raw, t1w, removed)
    if raw is not None:
        jobs.append((
            "conform", "Raw vs preprocessed", {**entities, "desc": "conform"}, group.contrast,
            partial(
                F.plot_bias_correction, raw, t1w, title="Raw vs preprocessed",
                labels=("raw", "preprocessed"),
            ),
            "Middle slices of the raw image (resampled to the output grid) and the "
            "preprocessed one. Look for: same anatomy and orientation (R on the right), "
            "no clipped or folded field of view, more even white matter after correction."
            + (" The raw image is shown only where the defaced one is not 0."
               if preproc.sidecar.get("Defaced") else ""),
        ))  # fmt: skip
    if mask is not None:
        whose = "" if own_mask else " of the reference T1w"
        jobs.append((
            # a reference's mask drawn on a contrast: named after the contrast, not
            # "mask" (that name is the reference's own figure)
            "brain", "Brain mask", {**entities, "desc": "brain"},
            "mask" if own_mask else group.contrast,
            partial(F.plot_mask_contour, t1w, mask),
            f"Brain mask{whose} contour on the preprocessed image. Look for: the contour "
            "on the brain surface; no skull, dura or eyes inside; no cortex cut off (top "
            "of the head, temporal poles, cerebellum).",
        ))  # fmt: skip
    if reference is not None:
        ref_preproc = reference.get("preproc")
        if ref_preproc is not None:
            jobs.append((
                "coreg", f"Co-registration to {reference.key}", {**entities, "desc": "coreg"},
                group.contrast,
                partial(
                    F.plot_coregistration, t1w, load(ref_preproc.path), brain_mask=mask,
                    title=f"Co-registration of {group.key} to {reference.key}",
                ),
                "Top: the reference T1w with the contrast's edges (red); bottom: the "
                "co-registered contrast with the T1w's edges (cyan) and its brain mask "
                "(yellow). Look for: ventricles, brain outline and major sulci on the "
                "same structures; the mask on the contrast's brain surface.",
            ))  # fmt: skip
    if dseg is not None:
        jobs.append((
            "dseg", "Tissue segmentation", entities, "dseg",
            partial(F.plot_segmentation, t1w, dseg),
            "GM (green), WM (yellow) and CSF (blue). Look for: WM following the gyri, "
            "an even cortical ribbon, CSF in ventricles and sulci only.",
        ))  # fmt: skip
    if raw is not None and mask is not None:
        jobs.append((
            "histogram", "Intensity histograms", {**entities, "desc": "histogram"}, group.contrast,
            partial(_histograms, raw, t1w, mask=mask, dseg=dseg),
            "Intensities inside the brain mask before (raw) and after preprocessing. "
            "After normalization the tissue peaks should sit at the method's targets "
            "and be as separated as before.",
        ))  # fmt: skip
    return [_Job(*job) for job in jobs if wanted(job[0])]


def _registration_job(
    group: ImageDerivatives,
    std_d,
    read: Callable[[Path], Any],
    templates: Mapping[str, Any] | None,
    display_mm: float | None,
) -> list[tuple]:
    """The registration figure's job: the image in template space over its template."""
    from mriflow.reports import figures as F

    entities = dict(group.entities)
    space = std_d.entities["space"]
    std = read(std_d.path)
    found = resolve_template(space, std, templates)
    if found is not None:
        template = found[0]
        std, template = F.reduced(std, display_mm), F.reduced(template, display_mm)
        return [(
            "registration", f"Registration to {space}", {**entities, "space": space},
            group.contrast,
            partial(F.plot_registration, std, template),
            "Top: the template with the subject's edges (red); bottom: the subject in "
            "template space with the template's edges (cyan). Look for: ventricles, "
            "brain outline and major sulci on the same structures.",
        )]  # fmt: skip
    return []


def _removed_region(
    defaced: nib.spatialimages.SpatialImage,
    brain_mask: nib.spatialimages.SpatialImage,
    preproc,
    full_size: int,
) -> tuple[nib.Nifti1Image, str]:
    """The voxels defacing removed, recomputed on the figure's grid, and a note for the caption.

    The face mask is not published (it is the face's silhouette); it follows from the
    head's grid and the brain mask alone (:func:`mriflow.image.deface.face_mask`), with
    the ``deface`` step's recorded parameters. On the published grid it is exact
    (measured: 3,018,053 voxels recomputed and recorded on T1_head at 1 mm, 2.4 s);
    on the figure's coarser grid it costs a tenth and differs only along the region's
    boundary (1 % of its voxels). The recorded count of removed voxels checks it.
    """
    from mriflow.image.deface import face_mask

    step = next((s for s in preproc.sidecar.get("Steps") or [] if s.get("Name") == "deface"), {})
    params = step.get("Parameters") or {}
    remove, _ = face_mask(
        defaced,
        brain_mask,
        margin_mm=float(params.get("margin_mm", 5.0)),
        ear_depth_mm=float(params.get("ear_depth_mm", 45.0)),
        shave=bool(params.get("shave", True)),
    )
    note = ""
    recorded = params.get("removed_voxels")
    if params.get("template_face_mask"):
        note = "The template face mask that was also removed is not drawn."
    elif recorded is not None:
        expected = float(recorded) / max(full_size, 1)
        if abs(float(remove.mean()) - expected) > 0.05 * max(expected, 1e-6):
            note = (
                f"Warning: the red region is {100 * remove.mean():.1f} % of the image, "
                f"the step recorded {100 * expected:.1f} %: it may not be what was removed."
            )
    img = nib.Nifti1Image(remove.astype(np.uint8), defaced.affine)
    return img, note


def _hide_removed(raw, shown, removed) -> nib.Nifti1Image:
    """``raw`` on ``shown``'s grid, 0 where ``shown`` is 0 or defacing removed voxels."""
    from nibabel.processing import resample_from_to

    on_grid = np.asanyarray(resample_from_to(raw, shown, order=1).dataobj).astype(np.float32)
    hidden = np.asanyarray(shown.dataobj) == 0
    if removed is not None:
        hidden |= np.asanyarray(removed.dataobj) > 0
    on_grid[hidden] = 0
    return nib.Nifti1Image(on_grid, shown.affine)


def _load_reduced(path: Path, *, read: Callable[[Path], Any], display_mm: float | None):
    from mriflow.reports.figures import reduced

    return reduced(read(path), display_mm)


def _histograms(before, after, *, out_path, mask, dseg):
    from mriflow.reports.figures import plot_histograms

    return plot_histograms(before, after, out_path, mask=mask, dseg=dseg)


# --------------------------------------------------------------------------------------
# rendering
# --------------------------------------------------------------------------------------


def _resource(name: str) -> str:
    return (resources.files("mriflow") / "data" / name).read_text(encoding="utf-8")


def _env():
    import jinja2

    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    env.globals.update(
        fmt_list=lambda v: (
            "n/a" if not v else " x ".join(f"{x:g}" if isinstance(x, float) else str(x) for x in v)
        ),
        fmt_value=_fmt_value,
        fmt_seconds=lambda s: "n/a" if s is None else f"{s:.1f}",
        total_seconds=lambda im: (
            sum(s.seconds for s in im.steps)
            if all(s.seconds is not None for s in im.steps)
            else None
        ),
    )
    return env


def _fmt_value(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        if not np.isfinite(value):
            return "n/a"
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_fmt_value(v) for v in value) + "]"
    return str(value)


def _now() -> str:
    return _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")


def _relative(path: Path, start: Path) -> str:
    return Path(os.path.relpath(path, start)).as_posix()


def render_subject_html(report: SubjectReport, out_dir: str | os.PathLike[str]) -> str:
    """The HTML text of ``report``, with figure links relative to ``out_dir``."""
    out_dir = Path(out_dir)
    sections = []
    for section in report.sections:
        figures = [
            {"src": _relative(Path(f.path), out_dir), "title": f.title, "caption": f.caption}
            for f in section.figures
        ]
        sections.append({"title": section.title, "text": section.text, "figures": figures})
    view = {
        "subject": report.subject,
        "images": report.images,
        "sections": sections,
        "errors": report.errors,
        "warnings": report.warnings,
        "software": report.software,
    }
    group_report = GROUP_OUTPUTS["group_report"]
    group_link = group_report if (out_dir / group_report).exists() else ""
    return (
        _env()
        .from_string(_resource("report_subject.html.j2"))
        .render(
            r=view,
            css=_resource("report.css"),
            generated=_now(),
            version=__version__,
            iqm_info=IQM_INFO,
            group_link=group_link,
        )
    )


def _place_figure(figure: ReportFigure, out_dir: Path, subject: str) -> ReportFigure:
    """Copy a figure into ``sub-XX/figures/`` unless it already lives under ``out_dir``."""
    src = Path(figure.path)
    if not src.is_file():
        raise FileNotFoundError(f"{src}: report figure not found")
    try:
        src.resolve().relative_to(out_dir.resolve())
        return figure
    except ValueError:
        target = out_dir / Path(figure_relpath_of(subject, src.name))
        atomic_copy(src, target)
        return ReportFigure(target, figure.title, figure.caption)


def write_subject_report(
    out_dir: str | os.PathLike[str],
    subject: str,
    *,
    sections: Sequence[ReportSection] = (),
    make_figures: bool = True,
    work_dir: str | os.PathLike[str] | None = None,
    errors: Iterable[str] = (),
    warnings: Iterable[str] = (),
    templates: Mapping[str, Any] | None = None,
    fmt: str = "png",
    load: Callable[[Path], Any] | None = None,
    drawn: Mapping[str, tuple[Collection[str], Sequence[ReportFigure]]] | None = None,
) -> Path:
    """Write ``OUT_DIR/sub-<subject>.html`` (figures under ``OUT_DIR/sub-<subject>/figures/``).

    Parameters
    ----------
    out_dir : path
        The derivatives dataset written by the participant run.
    subject : str
        Label with or without ``sub-``.
    sections : sequence of ReportSection
        Extra sections with figures made elsewhere (e.g. reportlets of workflow
        nodes: N4 bias field); files outside ``out_dir`` are copied in.
    make_figures : bool
        Draw the standard figures from the published derivatives
        (:func:`make_standard_figures`).
    work_dir : path, optional
        The Nipype work folder, to show the run time of each step.
    errors, warnings : iterable of str
        Messages to show besides the ones found in ``OUT_DIR/logs`` and the IQM files.
    templates : mapping, optional
        ``space -> image | path | (image, mask)`` for the registration figure; the
        embedded template is used for ``MNI152NLin2009aSym`` by default.
    fmt : {"png", "svg"}
    load : callable, optional
        ``path -> image`` for the figures (e.g. the :class:`~mriflow.reports.iqms.ImageCache`
        the IQMs used).
    drawn : mapping, optional
        Figures already drawn per image (see :func:`make_standard_figures`).

    Returns
    -------
    Path
        The HTML file.
    """
    out_dir = Path(out_dir)
    label = subject[4:] if subject.startswith("sub-") else subject
    report = collect_subject_report(
        out_dir, label, work_dir=work_dir, errors=errors, warnings=warnings
    )
    if make_figures:
        report.sections.extend(
            make_standard_figures(
                out_dir, label, templates=templates, fmt=fmt, load=load, drawn=drawn
            )
        )
    for section in sections:
        placed = []
        for figure in section.figures:
            try:
                placed.append(_place_figure(figure, out_dir, label))
            except FileNotFoundError as err:
                report.warnings.append(str(err))
        report.sections.append(ReportSection(section.title, placed, section.text, section.image))
    return atomic_write_text(out_dir / report_relpath(label), render_subject_html(report, out_dir))


# --------------------------------------------------------------------------------------
# group
# --------------------------------------------------------------------------------------


def robust_z(values: Sequence[float]) -> np.ndarray:
    r"""Robust z-scores: :math:`z = (x - \operatorname{median}) / (1.4826\,\mathrm{MAD})`.

    When the MAD is 0 (more than half the values equal) the mean absolute
    deviation times 1.2533 is used instead; when that is 0 too (or at rounding
    level, below 1e-9 of the median), every z is 0.
    NaN stays NaN.
    """
    x = np.asarray(values, dtype=float)
    z = np.full(x.shape, np.nan)
    finite = np.isfinite(x)
    if finite.sum() < 3:  # no meaningful spread from fewer than 3 values
        z[finite] = 0.0
        return z
    center = np.median(x[finite])
    deviation = np.abs(x[finite] - center)
    # spreads at rounding level (e.g. NCC 1.0 +- 1e-16) count as no spread at all
    tiny = 1e-9 * max(1.0, abs(center))
    scale = 1.4826 * np.median(deviation)
    if scale <= tiny:
        scale = 1.2533 * deviation.mean()
    z[finite] = 0.0 if scale <= tiny else (x[finite] - center) / scale
    return z


def _group_plot(
    name: str, values: np.ndarray, z: np.ndarray, labels: list[str], path: Path
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mriflow.reports.figures import _save

    fig, ax = plt.subplots(figsize=(6.5, 1.6), dpi=90)
    rng = np.random.default_rng(0)  # fixed jitter: the same data give the same figure
    jitter = rng.uniform(-0.25, 0.25, len(values))
    outlier = np.abs(np.nan_to_num(z)) > OUTLIER_Z
    ax.scatter(values[~outlier], jitter[~outlier], s=18, color="#2b6cb0", alpha=0.8)
    ax.scatter(values[outlier], jitter[outlier], s=30, color="#d62728", marker="D")
    for x, y, text in zip(values[outlier], jitter[outlier], np.asarray(labels)[outlier]):
        ax.annotate(
            text, (x, y), fontsize=7, color="#d62728", xytext=(3, 3), textcoords="offset points"
        )
    finite = values[np.isfinite(values)]
    if finite.size:
        ax.axvline(np.median(finite), color="#555", linewidth=1, linestyle="--")
    ax.set_yticks([])
    ax.set_ylim(-0.6, 0.6)
    direction = IQM_INFO.get(name, ("", None))[1]
    ax.set_title(f"{name}" + (f"  ({direction} is better)" if direction else ""), fontsize=9)
    ax.tick_params(labelsize=8)
    for spine in ("top", "right", "left"):
        ax.spines[spine].set_visible(False)
    fig.tight_layout()
    return _save(fig, path)


def render_group_html(
    rows: list[dict[str, Any]],
    columns: list[str],
    plots: list[dict[str, str]],
    subjects: list[dict[str, Any]],
    tsv: str,
    threshold: float = OUTLIER_Z,
) -> str:
    """The group report's HTML from prepared rows (see :func:`write_group_report`)."""
    outliers = [(row["participant_id"], c, z) for row in rows for c, z in row["flags"].items()]
    return (
        _env()
        .from_string(_resource("report_group.html.j2"))
        .render(
            rows=rows,
            columns=columns,
            plots=plots,
            subjects=subjects,
            tsv=tsv,
            css=_resource("report.css"),
            generated=_now(),
            version=__version__,
            iqm_info=IQM_INFO,
            threshold=threshold,
            outliers=outliers,
        )
    )


def write_group_report(
    out_dir: str | os.PathLike[str],
    *,
    subjects: Sequence[str] | None = None,
    metrics: Sequence[str] | None = None,
    threshold: float = OUTLIER_Z,
) -> Path:
    """Write ``OUT_DIR/group.html``: IQMs of every image, plots, outliers, subject links.

    Parameters
    ----------
    out_dir : path
        The derivatives dataset (reads every ``sub-*/**/*_desc-qc*_metrics.json``).
    subjects : sequence of str, optional
        Subjects to link (default: every ``sub-*`` folder in ``out_dir``).
    metrics : sequence of str, optional
        IQMs shown in the table and plots (default: the headline IQMs of
        :data:`mriflow.reports.iqms.IQM_INFO` present in any row). Every metric is in
        ``OUT_DIR/group_desc-qc_metrics.tsv`` anyway.
    threshold : float
        |robust z| above which a value is flagged.

    Returns
    -------
    Path
        The HTML file.
    """
    out_dir = Path(out_dir)
    rows = read_iqms(out_dir)
    present = {k for row in rows for k in row}
    columns = list(metrics) if metrics else [k for k in IQM_INFO if k in present]

    tsv_rel = GROUP_OUTPUTS["group_iqms"]
    atomic_write_text(
        out_dir / tsv_rel,
        _tsv([{k: v for k, v in row.items() if k != "file"} for row in rows])
        if rows
        else "participant_id\n",
    )

    view_rows = []
    for row in rows:
        view_rows.append(
            {
                "participant_id": row["participant_id"],
                "source": row["source"] or row["file"],
                "link": report_relpath(row["participant_id"]),
                "cells": {c: row.get(c) for c in columns},
                "flags": {},
            }
        )
    plots = []
    figures_dir = out_dir / "figures"
    expected = set()
    labels = [
        r["participant_id"] + (f" {r['session_id']}" if r["session_id"] else "") for r in rows
    ]
    for column in columns:
        values = np.array(
            [np.nan if row.get(column) is None else row[column] for row in rows], dtype=float
        )
        z = robust_z(values)
        for view, score in zip(view_rows, z):
            if np.isfinite(score) and abs(score) > threshold:
                view["flags"][column] = float(score)
        if np.isfinite(values).any():
            path = figures_dir / f"group_{column}.png"
            _group_plot(column, values, z, labels, path)
            expected.add(path.name)
            plots.append(
                {
                    "src": _relative(path, out_dir),
                    "title": column,
                    "caption": IQM_INFO.get(column, ("",))[0],
                }
            )
    for view in view_rows:
        view["flagged"] = bool(view["flags"])
    if figures_dir.is_dir():  # plots of metrics no longer shown must not linger
        for stale in figures_dir.glob("group_*.png"):
            if stale.name not in expected:
                stale.unlink()

    labels_all = [
        s[4:] if s.startswith("sub-") else s for s in (subjects or find_subjects(out_dir))
    ]
    subject_links = [
        {"label": s, "link": report_relpath(s), "exists": (out_dir / report_relpath(s)).is_file()}
        for s in labels_all
    ]
    html = render_group_html(view_rows, columns, plots, subject_links, tsv_rel, threshold)
    return atomic_write_text(out_dir / GROUP_OUTPUTS["group_report"], html)
