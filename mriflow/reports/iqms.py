"""IQM files per image (``sub-XX_desc-qc_metrics.json`` and ``.tsv``) and reading them back.

:func:`write_iqms` writes what :func:`mriflow.image.qc.compute_iqms` returned;
:func:`compute_subject_iqms` is the convenience the CLI can call after a
participant run: it measures each image from its published derivatives.
"""

from __future__ import annotations

import copy
import csv
import io
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from mriflow import __version__
from mriflow.bids.layout import DerivativesLayout, ImageDerivatives
from mriflow.bids.outputs import iqm_relpath
from mriflow.bids.paths import (
    atomic_write_json,
    atomic_write_text,
    bids_uri,
    parse_bids_uri,
    session_dirname,
    subject_dirname,
)
from mriflow.image.qc import NO_TEMPLATE_SPACE, IQMs, add_registration_metrics, compute_iqms
from mriflow.image.template import TEMPLATE_SPACE

log = logging.getLogger("mriflow")

__all__ = [
    "IQM_INFO",
    "ImageCache",
    "add_template_space_iqms",
    "compute_subject_iqms",
    "load_template_for",
    "resolve_template",
    "measure_native",
    "merge_iqms",
    "read_iqms",
    "template_space_iqms",
    "write_iqms",
]

#: The headline IQMs: description and which direction is better (None: a range).
IQM_INFO: dict[str, tuple[str, str | None]] = {
    "cjv": ("coefficient of joint variation of GM and WM", "lower"),
    "cnr": ("contrast-to-noise ratio of GM and WM", "higher"),
    "efc": ("entropy focus criterion (ghosting, blur)", "lower"),
    "fber": ("foreground-to-background energy ratio", "higher"),
    "wm2max": ("WM median / 99.95th percentile (0.6-0.8 expected)", None),
    "snr_total": ("SNR, mean over tissues", "higher"),
    "snr_gm": ("SNR in GM", "higher"),
    "snr_wm": ("SNR in WM", "higher"),
    "snr_csf": ("SNR in CSF", "higher"),
    "snrd_total": ("Dietrich SNR (noise from air), mean over tissues", "higher"),
    "icvs_gm": ("GM fraction of the intracranial volume", None),
    "icvs_wm": ("WM fraction of the intracranial volume", None),
    "icvs_csf": ("CSF fraction of the intracranial volume", None),
    "inu_med": ("median of the N4 bias field", None),
    "inu_range": ("P95-P5 range of the N4 bias field", "lower"),
    "reg_dice": ("Dice of the brain mask with the template mask", "higher"),
    "reg_ncc": ("correlation with the template inside its mask", "higher"),
}


def write_iqms(
    out_dir: str | os.PathLike[str],
    iqms: IQMs,
    *,
    raw_relpath: str,
    measured: str | None = None,
    entities: Mapping[str, str] | None = None,
    contrast: str | None = None,
) -> tuple[Path, Path]:
    """Write one image's IQMs as JSON (with provenance) and a one-row TSV.

    Parameters
    ----------
    out_dir : path
        The derivatives dataset.
    iqms : IQMs
        From :func:`mriflow.image.qc.compute_iqms`.
    raw_relpath : str
        The raw image, relative to the raw dataset (``sub-01/anat/sub-01_T1w.nii.gz``).
    measured : str, optional
        The derivative that was measured, relative to ``out_dir``.
    entities, contrast : optional
        Default: parsed from ``raw_relpath``.

    Returns
    -------
    (json_path, tsv_path)
    """
    from mriflow.bids.paths import parse_entities

    raw_entities, raw_contrast, _ = parse_entities(raw_relpath)
    entities = dict(entities or raw_entities)
    contrast = contrast or raw_contrast
    sources = [bids_uri(raw_relpath, "raw")]
    if measured:
        sources.append(bids_uri(measured, ""))
    payload: dict[str, Any] = {
        "Sources": sources,
        **{k: _finite(v) for k, v in sorted(iqms.metrics.items())},
        "Skipped": dict(sorted(iqms.skipped.items())),
        "Warnings": list(iqms.warnings),
        "Software": {"mriflow": __version__},
        "Description": "Image-quality metrics as MRIQC defines them (mriflow.image.qc)",
    }
    json_path = atomic_write_json(Path(out_dir) / iqm_relpath(entities, contrast), payload)
    row = {
        "participant_id": f"sub-{entities['subject']}",
        "session_id": entities.get("session", ""),
        "source": raw_relpath,
        **{k: _finite(v) for k, v in sorted(iqms.metrics.items())},
    }
    tsv_path = atomic_write_text(
        Path(out_dir) / iqm_relpath(entities, contrast, ".tsv"), _tsv([row])
    )
    return json_path, tsv_path


def _finite(value: float) -> float | None:
    value = float(value)
    return value if np.isfinite(value) else None


def _tsv(rows: list[dict[str, Any]]) -> str:
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, delimiter="\t", lineterminator="\n", restval="n/a")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "n/a" if v is None else v for k, v in row.items()})
    return buffer.getvalue()


def read_iqms(
    out_dir: str | os.PathLike[str], subjects: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """The IQM files of ``subjects`` (default: every subject), as flat rows for a group table.

    Each row has ``participant_id``, ``session_id``, ``source`` (raw relative path),
    ``file`` (the JSON, relative to ``out_dir``) and the numeric metrics.
    """
    layout = DerivativesLayout(out_dir)
    rows = []
    for subject in layout.subjects() if subjects is None else subjects:
        for group in layout.find(subject):
            for derivative in group.all("iqms"):
                entities = derivative.entities
                row: dict[str, Any] = {
                    "participant_id": subject_dirname(entities["subject"]),
                    "session_id": session_dirname(entities),
                    "source": parse_bids_uri(group.source)[1],
                    "file": derivative.relpath,
                }
                for key, value in derivative.sidecar.items():
                    if isinstance(value, (int, float)) and not isinstance(value, bool):
                        row[key] = float(value)
                rows.append(row)
    return rows


def load_template_for(space: str, like: nib.spatialimages.SpatialImage | None = None):
    """The embedded template image and brain mask for ``space``, or ``None`` if unknown.

    From :mod:`mriflow.image.template` (its derived mask). The resolution (1 or 2 mm)
    follows the voxel size of ``like``. Loaded once per process: the IQMs and the
    registration figure of every image of a subject both need it.
    """
    if space != TEMPLATE_SPACE:
        return None
    resolution = 1
    if like is not None and float(np.sqrt((like.affine[:3, :3] ** 2).sum(0)).mean()) > 1.5:
        resolution = 2
    return _template(resolution)


def resolve_template(
    space: str,
    like: nib.spatialimages.SpatialImage,
    templates: Mapping[str, Any] | None = None,
) -> tuple[nib.spatialimages.SpatialImage, Any] | None:
    """``(template image, mask or None)`` of ``space``: ``templates[space]`` (image, path
    or ``(image, mask)``) when given, else :func:`load_template_for`; ``None`` if unknown."""
    found = (templates or {}).get(space) or load_template_for(space, like)
    if found is None:
        return None
    template, mask = found if isinstance(found, tuple) else (found, None)
    if isinstance(template, (str, Path)):
        template = nib.load(str(template))
    return template, mask


@lru_cache(maxsize=2)
def _template(resolution: int):
    from mriflow.image.template import load_template

    template = load_template(resolution)
    return template.t1w, template.mask


class ImageCache:
    """Images read from disk once and kept in memory, read-only: ``cache(path) -> image``.

    A subject's report measures (IQMs) and draws (figures) the same files; reading a
    ``.nii.gz`` is mostly decompression, so each file is read once per report. The
    arrays are read-only so no consumer can change what another one sees.
    """

    def __init__(self) -> None:
        self._images: dict[str, nib.Nifti1Image] = {}

    def __call__(self, path: str | os.PathLike[str]) -> nib.Nifti1Image:
        key = os.fspath(path)
        if key not in self._images:
            img = nib.load(key)
            data = np.asanyarray(img.dataobj)
            data.setflags(write=False)
            self._images[key] = nib.Nifti1Image(data, img.affine, img.header)
        return self._images[key]


def _load_with(load: Callable[[Path], Any] | None):
    def _load(derivative) -> nib.spatialimages.SpatialImage | None:
        if derivative is None:
            return None
        return load(derivative.path) if load is not None else nib.load(str(derivative.path))

    return _load


def _measure(
    group: ImageDerivatives,
    templates: Mapping[str, Any] | None,
    bias_field: str | os.PathLike[str] | None = None,
    load: Callable[[Path], Any] | None = None,
    reference: ImageDerivatives | None = None,
) -> IQMs | None:
    """Every IQM of one image: the native ones, then those of its template-space image."""
    result = measure_native(group, bias_field, load, reference)
    if result is not None:
        add_template_space_iqms(result, group, templates, load, reference)
    return result


def measure_native(
    group: ImageDerivatives,
    bias_field: str | os.PathLike[str] | None = None,
    load: Callable[[Path], Any] | None = None,
    reference: ImageDerivatives | None = None,
) -> IQMs | None:
    """The IQMs of one image that need only its native outputs (``None``: no preproc or mask).

    Everything but ``reg_*``: the graph measures them as soon as the preproc image,
    brain mask, tissue classes and N4 field exist, beside registration
    (:class:`mriflow.interfaces.reports.ImageQC`); :func:`add_template_space_iqms`
    completes them. ``group`` and ``reference`` as in :func:`compute_subject_iqms`.
    """
    _load = _load_with(load)
    preproc = group.get("preproc")
    # a contrast co-registered to a T1w is measured in the T1w's masks and tissues
    # (same grid): it has none of its own
    masks_from = group if group.get("brain_mask") is not None or reference is None else reference
    mask = masks_from.get("brain_mask")
    if preproc is None or mask is None:
        return None
    img = _load(preproc)
    dseg = _load(masks_from.get("dseg"))
    probs = {d.entities["label"].lower(): _load(d) for d in masks_from.all("probseg_")}
    tissue_probs = probs if {"gm", "wm", "csf"} <= set(probs) else None
    field = nib.load(os.fspath(bias_field)) if bias_field else None
    field_elsewhere = field is not None and (
        field.shape[:3] != img.shape[:3] or not np.allclose(field.affine, img.affine, atol=1e-3)
    )
    skull_stripped = preproc.sidecar.get("SkullStripped")
    result = compute_iqms(
        img,
        _load(mask),
        dseg,
        tissue_probs=tissue_probs,
        bias_field=None if field_elsewhere else field,
        skull_stripped=bool(skull_stripped) if skull_stripped is not None else None,
    )
    if field_elsewhere:
        result.skipped["inu"] = "the N4 bias field is not on the grid of the measured image"
    return result


def add_template_space_iqms(
    result: IQMs,
    group: ImageDerivatives,
    templates: Mapping[str, Any] | None,
    load: Callable[[Path], Any] | None = None,
    reference: ImageDerivatives | None = None,
) -> None:
    """Complete :func:`measure_native`'s ``result`` with ``reg_dice`` and ``reg_ncc``.

    From the image in template space (``space-X_desc-preproc``) against the template
    of ``X``; the same values as measuring everything at once.
    """
    _load = _load_with(load)
    std = group.get("std_preproc")
    if std is None:
        return
    if group.contrast != "T1w":
        # the template is a T1w: its correlation with another contrast measures nothing
        result.skipped["reg"] = f"the template is a T1w: not comparable with a {group.contrast}"
        return
    registered = _load(std)
    space = std.entities["space"]
    found = resolve_template(space, registered, templates)
    if found is None:
        return  # an unknown space: measure_native's "reg" reason stands
    template, template_mask = found
    std_mask = group.get("std_mask") or (
        reference.get("std_mask") if reference is not None else None
    )
    result.skipped.pop("reg", None)
    add_registration_metrics(result, registered, template, template_mask, _load(std_mask))


def template_space_iqms(
    group: ImageDerivatives,
    templates: Mapping[str, Any] | None = None,
    load: Callable[[Path], Any] | None = None,
    reference: ImageDerivatives | None = None,
) -> IQMs:
    """Only the ``reg_*`` part of an image's IQMs (what :func:`add_template_space_iqms` adds).

    The graph measures it as soon as the image's template-space outputs exist;
    :func:`merge_iqms` puts it together with :func:`measure_native`'s result.
    """
    part = IQMs(skipped={"reg": NO_TEMPLATE_SPACE})
    add_template_space_iqms(part, group, templates, load, reference)
    return part


def merge_iqms(native: IQMs, template_space: IQMs) -> IQMs:
    """:func:`measure_native`'s result completed by :func:`template_space_iqms`'s.

    The same values as :func:`add_template_space_iqms` on ``native`` (it only sets
    the ``reg`` keys); the inputs are not changed.
    """
    merged = copy.deepcopy(native)
    merged.skipped.pop("reg", None)
    merged.metrics.update(template_space.metrics)
    merged.skipped.update(template_space.skipped)
    merged.warnings += [w for w in template_space.warnings if w not in merged.warnings]
    return merged


def compute_subject_iqms(
    out_dir: str | os.PathLike[str],
    subject: str,
    *,
    templates: Mapping[str, Any] | None = None,
    bias_fields: Mapping[str, str | os.PathLike[str]] | None = None,
    load: Callable[[Path], Any] | None = None,
    native: Mapping[str, IQMs] | None = None,
    template_space: Mapping[str, IQMs] | None = None,
) -> list[Path]:
    """Measure every image of ``subject`` from its published derivatives; write the IQM files.

    ``bias_fields`` maps a raw image (relative to the raw dataset) to the N4 field
    the graph estimated for it (on the preproc grid), for ``inu_med``/``inu_range``.

    Per raw image it uses ``desc-preproc_<contrast>`` (measured image; its sidecar's
    ``SkullStripped`` decides whether air metrics are possible), ``desc-brain_mask``,
    ``dseg`` or ``label-{GM,WM,CSF}_probseg`` when present, and
    ``space-<X>_desc-preproc_<contrast>`` with the template of space ``X``
    (``templates[X]`` as image, path or ``(image, mask)``; the embedded template
    otherwise). A contrast co-registered to a T1w (in its space, without a brain mask
    of its own: :meth:`~mriflow.bids.layout.DerivativesLayout.reference_of`) is
    measured in that T1w's brain mask and tissue classes; the registration metrics
    (a T1w template) are for T1w images only. Images without a preproc image and
    brain mask are skipped (logged).
    ``load`` (``path -> image``, e.g. an :class:`ImageCache` shared with the figures)
    reads the derivatives; default :func:`nibabel.load`.
    ``native`` (raw image's BIDS URI -> :func:`measure_native` result the graph
    already measured on the same files) leaves only the template-space metrics to
    measure for those images, and ``template_space`` (the same for
    :func:`template_space_iqms`) those too.

    Returns
    -------
    list of Path
        The JSON and TSV files written.
    """
    written: list[Path] = []
    layout = DerivativesLayout(out_dir)
    groups = layout.find(subject)
    for group in groups:
        try:
            raw_relpath = parse_bids_uri(group.source)[1]
            field = (bias_fields or {}).get(raw_relpath)
            reference = layout.reference_of(group, groups)
            if native is not None and group.source in native:
                if template_space is not None and group.source in template_space:
                    result = merge_iqms(native[group.source], template_space[group.source])
                else:
                    result = copy.deepcopy(native[group.source])
                    add_template_space_iqms(result, group, templates, load, reference)
            else:
                result = _measure(group, templates, field, load, reference)
        except (ValueError, OSError) as err:
            log.warning("%s: IQMs not computed: %s", group.source, err)
            continue
        if result is None:
            log.info("%s: no preproc image and brain mask yet; IQMs not computed", group.source)
            continue
        preproc = group.get("preproc")
        written += write_iqms(
            out_dir,
            result,
            raw_relpath=parse_bids_uri(group.source)[1],
            measured=preproc.relpath if preproc else None,
            entities=group.entities,
            contrast=group.contrast,
        )
    return written
