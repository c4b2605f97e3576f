"""Convert a folder of DICOM files into a BIDS raw dataset.

:func:`convert_dicom_to_bids` is what ``mriflow convert`` runs:

1. scan the folder and group the files into series (:mod:`mriflow.dicom.scan`);
2. convert each series with the primary converter, and with the other one
   as a cross-check compared in RAS (:mod:`mriflow.dicom.converters`);
3. de-identify sidecars (:mod:`mriflow.dicom.deid`);
4. name every image by the heuristic (:mod:`mriflow.dicom.heuristic`);
5. write each series atomically: its files are staged in a hidden folder
   inside the dataset and moved into place only when all of them are ready,
   so a series that fails leaves nothing behind, and never stops the others;
6. update ``dataset_description.json`` and ``participants.tsv``.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np
import pydicom

from mriflow.dicom.converters import (
    ConvertedImage,
    ConverterError,
    compare_images,
    dcm2niix_version,
    dicom2nifti_version,
    reorient_like,
    run_dcm2niix,
    run_dicom2nifti,
)
from mriflow.dicom.dataset import (
    update_bidsignore,
    update_participants,
    write_dataset_description,
)
from mriflow.dicom.deid import (
    acquisition_datetime,
    collect_phi_values,
    contains_phi,
    deidentify_sidecar,
    restrict_sidecar,
    write_nifti_gz,
)
from mriflow.dicom.heuristic import (
    BidsTarget,
    Dcm2BidsConfig,
    bids_basename,
    default_heuristic,
    load_dcm2bids_config,
    make_unique,
    sanitize_label,
)
from mriflow.dicom.scan import DicomSeries, FileProblem, scan_dicom_dir

__all__ = [
    "CONVERTERS",
    "DEFACE_SUFFIXES",
    "ConversionReport",
    "DefaceOptions",
    "MixedPatientsError",
    "SeriesOutcome",
    "assign_subjects",
    "convert_dicom_to_bids",
    "load_subject_map",
    "summary_lines",
]

logger = logging.getLogger("mriflow.dicom")

CONVERTERS = ("dcm2niix", "dicom2nifti")
_LABEL = re.compile(r"^[A-Za-z0-9]+$")
_PARTS = {"M": "mag", "P": "phase", "R": "real", "I": "imag"}


@dataclass
class SeriesOutcome:
    """What happened to one series.

    ``status`` is ``"converted"`` (written to BIDS), ``"unknown"`` (the
    heuristic does not name it: left out, or kept under ``sourcedata/``),
    ``"ambiguous"`` (several config descriptions match: left out) or
    ``"failed"`` (``reason`` says why). ``outputs`` are the files written.
    ``checks`` holds one cross-check record per image (see the sidecar's
    ``ConversionCheck``).
    """

    series: DicomSeries
    status: Literal["converted", "unknown", "ambiguous", "failed"]
    outputs: list[Path] = field(default_factory=list)
    reason: str = ""
    checks: list[dict[str, Any]] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    subject: str = ""


@dataclass
class ConversionReport:
    """The outcome of :func:`convert_dicom_to_bids`.

    ``skipped_files`` are non-DICOM files (warnings); ``failed_files`` are
    damaged DICOM files that belong to no readable series (errors).
    """

    bids_dir: Path
    outcomes: list[SeriesOutcome]
    skipped_files: list[FileProblem]
    failed_files: list[FileProblem]

    @property
    def failed(self) -> list[SeriesOutcome]:
        return [o for o in self.outcomes if o.status == "failed"]

    @property
    def converted(self) -> list[SeriesOutcome]:
        return [o for o in self.outcomes if o.status == "converted"]

    @property
    def disagreements(self) -> list[SeriesOutcome]:
        return [o for o in self.outcomes if any(c.get("Status") == "disagree" for c in o.checks)]

    @property
    def ok(self) -> bool:
        """True when no series and no file failed."""
        return not self.failed and not self.failed_files


@dataclass
class _Image:
    series_index: int
    nifti: Path
    sidecar: dict[str, Any]
    bval: Path | None
    bvec: Path | None
    n_volumes: int
    bvals: list[float] | None
    echo: int | None
    component: str | None
    check: dict[str, Any]
    target: BidsTarget | None = None
    matched: list[str] = field(default_factory=list)
    match_sidecar: dict[str, Any] = field(default_factory=dict)


class _SeriesFailure(RuntimeError):
    pass


class MixedPatientsError(ValueError):
    """The DICOM folder holds series of several patients and no subject map says whose is whose.

    The first line of the message is the error; the following lines list each
    series with its patient fingerprint (a keyed hash: never the identifiers).
    """


# Raw images that show a face: what ``--deface`` defaces.
DEFACE_SUFFIXES = ("T1w", "T2w", "FLAIR")


@dataclass(frozen=True)
class DefaceOptions:
    """How ``convert --deface`` defaces the raw T1w/T2w/FLAIR images.

    ``margin_mm`` is kept between the brain mask and anything removed;
    ``skull_strip`` is the backend making that mask
    (see :func:`mriflow.image.skullstrip.skull_strip`).
    """

    margin_mm: float = 5.0
    skull_strip: Literal["auto", "deepbet", "template"] = "auto"
    num_threads: int = 1
    random_seed: int = 42


def load_subject_map(path: str | Path) -> dict[str, str]:
    """Read a ``PatientID -> subject label`` table (TSV, two columns).

    A header line is allowed when its first cell is ``patient_id`` or
    ``PatientID``; blank lines and lines starting with ``#`` are skipped.

    Raises
    ------
    ValueError
        Unreadable file, a line without two columns, a repeated PatientID or
        an invalid subject label (the message names the file and line).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: cannot read the subject map ({err})") from None
    mapping: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        cells = [c.strip() for c in line.split("\t")]
        if len(cells) != 2 or not cells[0] or not cells[1]:
            raise ValueError(
                f"{path}: line {number}: expected two tab-separated columns "
                "(PatientID, subject label)"
            )
        if number == 1 and cells[0].lower() in ("patient_id", "patientid"):
            continue
        try:
            label = _check_label(cells[1], "subject")
        except ValueError as err:
            raise ValueError(f"{path}: line {number}: {err}") from None
        if cells[0] in mapping:
            raise ValueError(f"{path}: line {number}: PatientID listed twice")
        mapping[cells[0]] = str(label)
    if not mapping:
        raise ValueError(f"{path}: the subject map has no entries")
    return mapping


def _patient_lines(series_list: list[DicomSeries], indices: list[int]) -> list[str]:
    return [
        f"  {series_list[k].label} -> patient "
        f"{series_list[k].patient.fingerprint() if series_list[k].patient else '?'}"
        for k in indices
    ]


def assign_subjects(
    series_list: list[DicomSeries],
    *,
    subject: str | None,
    subject_map: dict[str, str] | None,
) -> dict[int, str]:
    """The subject label of each series (by index), refusing to mix patients.

    Parameters
    ----------
    series_list : list of DicomSeries
        From :func:`mriflow.dicom.scan.scan_dicom_dir`.
    subject : str, optional
        One label for everything: allowed only when all series belong to one
        patient (same PatientID, PatientName and PatientBirthDate).
    subject_map : dict, optional
        PatientID -> subject label, for a folder holding several patients.

    Returns
    -------
    dict
        Series index -> label. Series whose own files belong to several
        patients are left out (they fail on their own).

    Raises
    ------
    MixedPatientsError
        Several patients and no map, a patient missing from the map, or two
        patients sharing a PatientID; nothing has been written.
    """
    if (subject is None) == (subject_map is None):
        raise ValueError("give either a subject label or a subject map (PatientID -> label)")
    usable = [k for k, s in enumerate(series_list) if s.patient is not None]
    if subject_map is None:
        patients = {series_list[k].patient for k in usable}
        if len(patients) > 1:
            raise MixedPatientsError(
                "\n".join(
                    [
                        f"the DICOM folder holds series of {len(patients)} different patients "
                        "(PatientID/PatientName/PatientBirthDate differ); refusing to merge them "
                        "into one subject: convert each patient's folder separately, or give "
                        "--subject-map FILE (PatientID<TAB>label per line). Series:",
                        *_patient_lines(series_list, usable),
                    ]
                )
            )
        return {k: str(subject) for k in usable}

    by_id: dict[str, set] = defaultdict(set)
    for k in usable:
        patient = series_list[k].patient
        by_id[patient.patient_id].add(patient)
    shared = [pid for pid, who in by_id.items() if len(who) > 1]
    unmapped = [k for k in usable if series_list[k].patient.patient_id not in subject_map]
    if shared:
        bad = [k for k in usable if series_list[k].patient.patient_id in shared]
        raise MixedPatientsError(
            "\n".join(
                [
                    "series with the same PatientID but different PatientName or "
                    "PatientBirthDate: a subject map by PatientID cannot tell them apart; "
                    "convert them separately. Series:",
                    *_patient_lines(series_list, bad),
                ]
            )
        )
    if unmapped:
        raise MixedPatientsError(
            "\n".join(
                [
                    f"{len(unmapped)} series belong to patients whose PatientID is not in "
                    "the subject map (an empty PatientID cannot be mapped). Series:",
                    *_patient_lines(series_list, unmapped),
                ]
            )
        )
    return {k: subject_map[series_list[k].patient.patient_id] for k in usable}


def _deface_image(im: _Image, work: Path, options: DefaceOptions) -> None:
    """Deface ``im.nifti`` (a converted head) in ``work`` and record it in its sidecar.

    The brain mask comes from mriflow's skull stripper on the raw image; only
    voxels of the face mask change, written into a copy of the converted file
    byte for byte, so every other voxel, the header and the scaling stay exactly
    as converted.
    """
    from mriflow.image.deface import deface, write_defaced_nifti
    from mriflow.image.skullstrip import skull_strip

    img = nib.load(str(im.nifti))
    if len(img.shape) != 3:
        raise _SeriesFailure(f"cannot deface a {len(img.shape)}D image (expected 3D)")
    stripped = skull_strip(
        img,
        method=options.skull_strip,
        detect_stripped=False,
        random_seed=options.random_seed,
        num_threads=options.num_threads,
    )
    result = deface(img, stripped.mask, margin_mm=options.margin_mm)
    work.mkdir(parents=True, exist_ok=True)
    out = work / "defaced.nii"
    write_defaced_nifti(im.nifti, out, np.asarray(result.face_mask.dataobj) > 0)
    im.nifti = out
    im.sidecar["Defaced"] = True
    im.sidecar["DefacingMethod"] = {
        **result.description,
        "BrainMask": f"mriflow skull_strip ({stripped.method})",
    }


def _check_label(value: str | None, what: str) -> str | None:
    if value is None:
        return None
    value = str(value)
    prefix = "sub-" if what == "subject" else "ses-"
    if value.startswith(prefix):
        value = value[len(prefix) :]
    if not _LABEL.match(value):
        raise ValueError(f"{what} label must contain only letters and digits (BIDS), got {value!r}")
    return value


def _basic_sidecar(ds: pydicom.Dataset) -> dict[str, Any]:
    """Sidecar fields read directly from a header, when dcm2niix could not write one."""
    out: dict[str, Any] = {}
    for key in (
        "Modality",
        "Manufacturer",
        "ManufacturersModelName",
        "SeriesDescription",
        "ProtocolName",
        "ScanningSequence",
        "SequenceVariant",
        "MRAcquisitionType",
        "PatientPosition",
    ):
        if key in ds and str(ds.get(key)).strip():
            out[key] = str(ds.get(key))
    for key in ("MagneticFieldStrength", "FlipAngle", "SeriesNumber"):
        if key in ds and ds.get(key) not in (None, ""):
            out[key] = float(ds.get(key)) if key != "SeriesNumber" else int(ds.get(key))
    for key in ("EchoTime", "RepetitionTime", "InversionTime"):  # DICOM ms -> BIDS s
        if key in ds and ds.get(key) not in (None, ""):
            out[key] = float(ds.get(key)) / 1000.0
    if "ImageType" in ds:
        out["ImageType"] = [str(v) for v in ds.ImageType]
    return out


def _read_bvals(path: Path | None) -> list[float] | None:
    if path is None:
        return None
    try:
        return [float(v) for v in path.read_text().split()]
    except (OSError, ValueError):
        return None


def _n_volumes(path: Path) -> int:
    shape = nib.load(str(path)).shape
    return int(shape[3]) if len(shape) > 3 else 1


def _convert_series(
    index: int,
    series: DicomSeries,
    work: Path,
    *,
    converter: str,
    verify: bool,
    deidentify: bool,
    date_shift_days: int | None,
    affine_tolerance_mm: float,
    min_correlation: float,
) -> list[_Image]:
    """Convert one series into ``work``: images with final (de-identified) sidecars."""
    files = series.files
    try:
        ends = [files[0]] if len(files) == 1 else [files[0], files[-1]]
        heads = [pydicom.dcmread(str(f), stop_before_pixels=True) for f in ends]
    except Exception as err:
        raise _SeriesFailure(f"cannot read the DICOM header ({err})") from None
    phi = collect_phi_values(heads)
    acquired = acquisition_datetime(heads[0])

    secondary = "dicom2nifti" if converter == "dcm2niix" else "dcm2niix"
    versions = {"dcm2niix": dcm2niix_version(), "dicom2nifti": dicom2nifti_version()}
    check_base = {
        "Primary": f"{converter} {versions[converter]}",
        "Secondary": f"{secondary} {versions[secondary]}",
    }

    # dcm2niix always runs: it is the primary, or it writes the sidecar and
    # defines the voxel axes that PhaseEncodingDirection and SliceTiming refer to.
    dcm_images: list[ConvertedImage] = []
    dcm_error = ""
    try:
        dcm_images = run_dcm2niix(files, work / "dcm2niix", anonymize=deidentify, compress=False)
    except ConverterError as err:
        if converter == "dcm2niix":
            raise _SeriesFailure(str(err)) from None
        dcm_error = str(err)

    d2n_img = None
    d2n_error = ""
    if converter == "dicom2nifti" or verify:
        try:
            d2n_img = run_dicom2nifti(files, work / "dicom2nifti.nii")
        except ConverterError as err:
            if converter == "dicom2nifti":
                raise _SeriesFailure(str(err)) from None
            d2n_error = str(err)

    # (image, sidecar, bval, bvec, check) per image to write
    results: list[tuple[Path, dict[str, Any], Path | None, Path | None, dict[str, Any]]] = []
    if converter == "dcm2niix":
        for im in dcm_images:
            check = dict(check_base)
            if not verify:
                check["Status"] = "skipped"
            elif d2n_img is None:
                check.update(Status="not-run", Details=d2n_error)
            elif len(dcm_images) > 1:
                check.update(
                    Status="not-run",
                    Details=f"dcm2niix wrote {len(dcm_images)} images for this series, "
                    "dicom2nifti one; not comparable",
                )
            else:
                agreement = compare_images(
                    nib.load(str(im.nifti)),
                    d2n_img,
                    affine_tolerance_mm=affine_tolerance_mm,
                    min_correlation=min_correlation,
                )
                check.update(Status="agree" if agreement.agree else "disagree")
                check.update(agreement.as_sidecar())
            results.append((im.nifti, dict(im.sidecar), im.bval, im.bvec, check))
    else:
        assert d2n_img is not None
        check = dict(check_base)
        out = work / "primary.nii"
        if len(dcm_images) == 1:
            ref = dcm_images[0]
            if verify:
                agreement = compare_images(
                    d2n_img,
                    nib.load(str(ref.nifti)),
                    affine_tolerance_mm=affine_tolerance_mm,
                    min_correlation=min_correlation,
                )
                check.update(Status="agree" if agreement.agree else "disagree")
                check.update(agreement.as_sidecar())
            else:
                check["Status"] = "skipped"
            # Store dicom2nifti's voxels in dcm2niix's axis order so that the
            # axis-dependent sidecar fields (and bvecs) apply to them.
            nib.save(reorient_like(d2n_img, nib.load(str(ref.nifti)).affine), str(out))
            sidecar = dict(ref.sidecar)
            bval, bvec = ref.bval, ref.bvec
        else:
            reason = dcm_error or f"dcm2niix wrote {len(dcm_images)} images; not comparable"
            check.update(Status="not-run" if verify else "skipped", Details=reason)
            nib.save(d2n_img, str(out))
            sidecar = _basic_sidecar(heads[0])
            bval = bvec = None
        sidecar["ConversionSoftware"] = "dicom2nifti"
        sidecar["ConversionSoftwareVersion"] = versions["dicom2nifti"]
        results.append((out, sidecar, bval, bvec, check))

    images = []
    for nifti, sidecar, bval, bvec, check in results:
        if deidentify:
            sidecar, _removed = deidentify_sidecar(
                sidecar, phi, acquired=acquired, date_shift_days=date_shift_days
            )
        # dcm2bids criteria may test any field (StudyDescription too): they
        # match on this copy, which is never written.
        match_sidecar = dict(sidecar)
        if deidentify:
            sidecar, _removed = restrict_sidecar(sidecar)
            # Converter messages never quote header text, but check anyway.
            if contains_phi(json.dumps(check), phi):
                check.pop("Details", None)
        sidecar["ConversionCheck"] = check
        echo = sidecar.get("EchoNumber") if isinstance(sidecar.get("EchoNumber"), int) else None
        component = series.component
        image_type = [str(v).upper() for v in sidecar.get("ImageType", [])]
        if component is None and ("P" in image_type[2:3] or "PHASE" in image_type):
            component = "P"
        images.append(
            _Image(
                series_index=index,
                nifti=nifti,
                sidecar=sidecar,
                bval=bval,
                bvec=bvec,
                n_volumes=_n_volumes(nifti),
                bvals=_read_bvals(bval),
                echo=series.echo if series.echo is not None else echo,
                component=component,
                check=check,
                match_sidecar=match_sidecar,
            )
        )
    return images


def _protocol_label(sidecar: dict[str, Any]) -> str:
    return sanitize_label(sidecar.get("ProtocolName") or sidecar.get("SeriesDescription") or "")


def _sort_key(series: DicomSeries, sidecar: dict[str, Any]) -> tuple:
    return (
        series.series_number if series.series_number is not None else 1 << 30,
        str(sidecar.get("AcquisitionTime", "")),
        str(series.files[0]),
    )


def _name_images(
    images: list[_Image],
    series_list: list[DicomSeries],
    config: Dcm2BidsConfig | None,
) -> None:
    """Set ``target`` on every image the heuristic recognises, with unique names."""
    for im in images:
        if config is not None:
            im.target, im.matched = config.match(im.match_sidecar or im.sidecar)
        else:
            im.target = default_heuristic(
                im.match_sidecar or im.sidecar, n_volumes=im.n_volumes, bvals=im.bvals
            )

    # echo-/part- where one acquisition (same SeriesInstanceUID) holds several.
    by_uid: dict[str, list[_Image]] = defaultdict(list)
    for im in images:
        by_uid[series_list[im.series_index].uid].append(im)
    for group in by_uid.values():
        echoes = {im.echo for im in group if im.target is not None}
        components = {im.component for im in group if im.target is not None}
        for im in group:
            if im.target is None:
                continue
            extra = {}
            if len(echoes) > 1 and im.echo is not None:
                extra["echo"] = str(im.echo)
            if im.component in ("P", "R", "I") or (len(components) > 1 and im.component):
                extra["part"] = _PARTS[im.component or "M"]
            if extra:
                im.target = BidsTarget(
                    im.target.datatype,
                    im.target.suffix,
                    {
                        **im.target.entities,
                        **{k: v for k, v in extra.items() if k not in im.target.entities},
                    },
                    im.target.sidecar_changes,
                    im.target.rule,
                )

    known = [im for im in images if im.target is not None]
    unique = make_unique(
        [
            (
                im.target,
                _protocol_label(im.sidecar),
                _sort_key(series_list[im.series_index], im.sidecar),
            )
            for im in known
        ],
        add_acq=config is None,
    )
    for im, target in zip(known, unique, strict=True):
        im.target = target


def _unknown_name(
    subject: str, session: str | None, series: DicomSeries, im: _Image, k: int, n: int
) -> str:
    label = sanitize_label(im.sidecar.get("SeriesDescription") or "")[:40] or "unknown"
    number = f"{series.series_number:03d}" if series.series_number is not None else "000"
    ses = f"_ses-{session}" if session else ""
    extra = f"_{k + 1}" if n > 1 else ""
    if series.echo is not None:
        extra += f"_echo{series.echo}"
    if series.component is not None:
        extra += f"_{_PARTS[series.component]}"
    return f"sub-{subject}{ses}_series-{number}_{label}{extra}"


def _stage_and_move(
    files: list[tuple[Path, Path, str | None]],
    staging: Path,
    *,
    overwrite: bool,
    deidentify: bool,
) -> list[Path]:
    """Copy (source, target, json_text) into ``staging``, then move all into place.

    ``json_text`` set means ``source`` is ignored and the text is the file.
    If any step fails, every file already moved is removed again.
    """
    staging.mkdir(parents=True, exist_ok=True)
    for _, target, _ in files:
        if target.exists() and not overwrite:
            raise _SeriesFailure(f"{target} already exists (use --overwrite to replace it)")
    staged = []
    for k, (source, target, text) in enumerate(files):
        dst = staging / f"{k:03d}_{target.name}"
        if text is not None:
            dst.write_text(text, encoding="utf-8")
        elif dst.name.endswith(".nii.gz"):
            write_nifti_gz(source, dst, scrub=deidentify)
        else:
            shutil.copyfile(source, dst)
        staged.append((dst, target))
    moved: list[Path] = []
    try:
        for dst, target in staged:
            target.parent.mkdir(parents=True, exist_ok=True)
            dst.replace(target)
            moved.append(target)
    except BaseException:
        for target in moved:
            target.unlink(missing_ok=True)
        raise
    return moved


def _convert_subject(
    series_list: list[DicomSeries],
    bids_dir: Path,
    *,
    subject: str,
    session: str | None,
    config: Dcm2BidsConfig | None,
    converter: str,
    verify: bool,
    deidentify: bool,
    date_shift_days: int | None,
    keep_unknown: bool,
    overwrite: bool,
    affine_tolerance_mm: float,
    min_correlation: float,
    deface_options: DefaceOptions | None,
) -> tuple[list[SeriesOutcome], bool]:
    """Convert, name and write the series of one subject.

    Returns the outcomes (one per series, in order) and whether any series was
    kept under ``sourcedata/``.
    """
    outcomes = [SeriesOutcome(series=s, status="converted", subject=subject) for s in series_list]
    with tempfile.TemporaryDirectory(prefix="mriflow-convert-") as tmp:
        work = Path(tmp)
        images: list[_Image] = []
        for index, (series, outcome) in enumerate(zip(series_list, outcomes, strict=True)):
            if series.problems:
                outcome.status = "failed"
                outcome.reason = "; ".join(str(p) for p in series.problems)
                logger.error("Series failed: %s: %s", series.label, outcome.reason)
                continue
            try:
                converted = _convert_series(
                    index,
                    series,
                    work / f"series{index:04d}",
                    converter=converter,
                    verify=verify,
                    deidentify=deidentify,
                    date_shift_days=date_shift_days,
                    affine_tolerance_mm=affine_tolerance_mm,
                    min_correlation=min_correlation,
                )
            except Exception as err:  # one series never stops the others
                outcome.status = "failed"
                outcome.reason = str(err) or type(err).__name__
                logger.error("Series failed: %s: %s", series.label, outcome.reason)
                continue
            for im in converted:
                outcome.checks.append(im.check)
                if im.check.get("Status") == "disagree":
                    logger.warning(
                        "CONVERTERS DISAGREE on %s: %s vs %s: %s. The %s image is written; "
                        "inspect it before use.",
                        series.label,
                        im.check["Primary"],
                        im.check["Secondary"],
                        im.check.get("Details", ""),
                        converter,
                    )
                elif im.check.get("Status") == "not-run" and verify:
                    logger.warning(
                        "Could not cross-check %s: %s", series.label, im.check.get("Details")
                    )
            images.extend(converted)

        _name_images(images, series_list, config)

        staging: Path | None = None
        by_series: dict[int, list[_Image]] = defaultdict(list)
        for im in images:
            by_series[im.series_index].append(im)
        kept_unknown = False
        used_unknown: set[str] = set()
        try:
            for index, group in sorted(by_series.items()):
                series, outcome = series_list[index], outcomes[index]
                files: list[tuple[Path, Path, str | None]] = []
                if deface_options is not None:
                    try:
                        for k, im in enumerate(group):
                            if im.target is not None and im.target.datatype == "anat":
                                if im.target.suffix in DEFACE_SUFFIXES:
                                    _deface_image(
                                        im, work / f"deface{index:04d}_{k}", deface_options
                                    )
                    except Exception as err:  # never write a head that was to be defaced
                        outcome.status = "failed"
                        outcome.reason = f"defacing failed: {err}"
                        logger.error("Series failed: %s: %s", series.label, outcome.reason)
                        continue
                for k, im in enumerate(group):
                    if im.target is None:
                        if not keep_unknown:
                            continue
                        if deface_options is not None:
                            logger.warning(
                                "%s is kept under sourcedata/ NOT defaced: --deface applies "
                                "to the T1w/T2w/FLAIR images the heuristic names",
                                series.label,
                            )
                        name = _unknown_name(subject, session, series, im, k, len(group))
                        base, dup = name, 2
                        while name in used_unknown:  # same number and description
                            name, dup = f"{base}_{dup}", dup + 1
                        used_unknown.add(name)
                        folder = bids_dir / "sourcedata" / f"sub-{subject}"
                        folder = folder / f"ses-{session}" if session else folder
                        kept_unknown = True
                    else:
                        name = bids_basename(subject, session, im.target)
                        folder = bids_dir / f"sub-{subject}"
                        folder = folder / f"ses-{session}" if session else folder
                        folder = folder / im.target.datatype
                        outcome.names.append(name)
                    sidecar = {**im.sidecar, **(im.target.sidecar_changes if im.target else {})}
                    files.append((im.nifti, folder / f"{name}.nii.gz", None))
                    files.append(
                        (im.nifti, folder / f"{name}.json", json.dumps(sidecar, indent=2) + "\n")
                    )
                    if im.bval is not None and im.bvec is not None:
                        files.append((im.bval, folder / f"{name}.bval", None))
                        files.append((im.bvec, folder / f"{name}.bvec", None))
                if all(im.target is None for im in group):
                    matched = sorted({m for im in group for m in im.matched})
                    outcome.status = "ambiguous" if len(matched) > 1 else "unknown"
                    outcome.reason = ", ".join(matched)
                if not files:
                    continue
                if staging is None:
                    bids_dir.mkdir(parents=True, exist_ok=True)
                    # Inside the dataset, so that moving into place is a rename
                    # on one file system; hidden, so BIDS tools ignore it.
                    staging = Path(tempfile.mkdtemp(dir=bids_dir, prefix=".mriflow-staging-"))
                try:
                    outcome.outputs = _stage_and_move(
                        files,
                        staging / f"{index:04d}",
                        overwrite=overwrite,
                        deidentify=deidentify,
                    )
                except Exception as err:
                    outcome.status = "failed"
                    outcome.reason = f"writing the output failed: {err}"
                    outcome.outputs = []
                    logger.error("Series failed: %s: %s", series.label, outcome.reason)
        finally:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)

    for outcome in outcomes:
        if outcome.status == "unknown":
            logger.warning(
                "Not recognised by the %s: %s%s",
                "heuristic file" if config else "default heuristic",
                outcome.series.label,
                " (kept under sourcedata/)"
                if keep_unknown
                else " (left out; --keep-unknown keeps it under sourcedata/)",
            )
        elif outcome.status == "ambiguous":
            logger.warning(
                "Left out %s: it matches several heuristic descriptions (%s)",
                outcome.series.label,
                outcome.reason,
            )

    return outcomes, kept_unknown


def convert_dicom_to_bids(
    dicom_dir: str | Path,
    bids_dir: str | Path,
    *,
    subject: str | None = None,
    subject_map: dict[str, str] | None = None,
    session: str | None = None,
    heuristic: str | Path | None = None,
    converter: Literal["dcm2niix", "dicom2nifti"] = "dcm2niix",
    verify: bool = True,
    deidentify: bool = True,
    date_shift_days: int | None = None,
    keep_unknown: bool = False,
    overwrite: bool = False,
    affine_tolerance_mm: float = 1e-3,
    min_correlation: float = 0.99,
    deface: DefaceOptions | None = None,
) -> ConversionReport:
    """Convert every series under ``dicom_dir`` into the BIDS dataset ``bids_dir``.

    Parameters
    ----------
    dicom_dir : path
        Folder searched recursively (any file names, DICOMDIR, enhanced multi-frame).
    bids_dir : path
        BIDS raw dataset, created if missing; other subjects in it are kept.
    subject : str, optional
        Participant label (``01`` or ``sub-01``; letters and digits only) for a
        folder of one patient. A folder holding series of several patients
        (PatientID, PatientName or PatientBirthDate differ) is refused.
    subject_map : dict, optional
        PatientID -> participant label, instead of ``subject``, for a folder of
        several patients (see :func:`load_subject_map`).
    session : str, optional
        Session label; adds ``ses-<label>`` to folders and names.
    heuristic : path, optional
        A dcm2bids JSON config replacing the default naming rules.
    converter : {"dcm2niix", "dicom2nifti"}
        Primary converter; the other one cross-checks each series when ``verify``.
    verify : bool
        Convert with both and compare in RAS (shape, affine within
        ``affine_tolerance_mm``, voxel correlation >= ``min_correlation``).
        Disagreement is logged as a warning and recorded in the sidecar
        (``ConversionCheck``); the primary's image is written either way.
    deidentify : bool
        Remove PHI from sidecars and NIfTI headers (default). False keeps
        everything the converter writes (``--keep-phi``).
    date_shift_days : int, optional
        With ``deidentify``: None removes acquisition dates; an integer keeps
        ``AcquisitionDateTime`` shifted back by that many days.
    keep_unknown : bool
        Write series the heuristic does not name under ``sourcedata/`` instead
        of leaving them out.
    overwrite : bool
        Replace existing files with the same names (otherwise such a series fails).
    affine_tolerance_mm, min_correlation : float
        Agreement thresholds of the cross-check.
    deface : DefaceOptions, optional
        Deface the T1w, T2w and FLAIR images written (sidecar ``Defaced: true``
        and ``DefacingMethod``); a series whose defacing fails is not written.

    Returns
    -------
    ConversionReport
        One outcome per series; ``report.ok`` is False if any series or file failed.

    Raises
    ------
    MixedPatientsError
        Series of several patients without a map saying whose is whose
        (checked before anything is written).
    ValueError
        Invalid labels, converter name or thresholds.
    FileNotFoundError
        ``dicom_dir`` is not a folder.
    mriflow.dicom.heuristic.HeuristicError
        The heuristic file is missing or invalid.
    """
    if subject_map is None:
        subject = _check_label(subject, "subject")
        if not subject:
            raise ValueError("a subject label is required (for example --subject 01)")
    elif subject is not None:
        raise ValueError("give either a subject label or a subject map, not both")
    else:
        subject_map = {str(k): str(_check_label(v, "subject")) for k, v in subject_map.items()}
    session = _check_label(session, "session")
    if converter not in CONVERTERS:
        raise ValueError(f"converter must be one of {CONVERTERS}, got {converter!r}")
    if affine_tolerance_mm <= 0:
        raise ValueError(f"affine_tolerance_mm must be > 0, got {affine_tolerance_mm}")
    if not -1 <= min_correlation <= 1:
        raise ValueError(f"min_correlation must be in [-1, 1], got {min_correlation}")
    if date_shift_days is not None and not deidentify:
        raise ValueError("date_shift_days applies to de-identified output only (not with keep-PHI)")
    dicom_dir = Path(dicom_dir)
    bids_dir = Path(bids_dir)
    config = load_dcm2bids_config(heuristic) if heuristic is not None else None
    src, dst = dicom_dir.resolve(), bids_dir.resolve()
    if dst == src or src in dst.parents:
        raise ValueError(f"{bids_dir}: the BIDS folder must not be inside the DICOM folder")

    scan = scan_dicom_dir(dicom_dir)
    for problem in scan.problems:
        logger.error("Cannot use %s", problem)
    subjects = assign_subjects(scan.series, subject=subject, subject_map=subject_map)

    outcomes: list[SeriesOutcome] = []
    for label in sorted(set(subjects.values())):
        mine = [s for k, s in enumerate(scan.series) if subjects.get(k) == label]
        done, kept_unknown = _convert_subject(
            mine,
            bids_dir,
            subject=label,
            session=session,
            config=config,
            converter=converter,
            verify=verify,
            deidentify=deidentify,
            date_shift_days=date_shift_days,
            keep_unknown=keep_unknown,
            overwrite=overwrite,
            affine_tolerance_mm=affine_tolerance_mm,
            min_correlation=min_correlation,
            deface_options=deface,
        )
        outcomes.extend(done)
        if any(o.outputs for o in done):
            write_dataset_description(bids_dir)
            update_participants(bids_dir, label)
            if kept_unknown:
                update_bidsignore(bids_dir, ["sourcedata/"])
    # Series of no subject: their own files are damaged (they carry a problem).
    for k, s in enumerate(scan.series):
        if k not in subjects:
            reason = "; ".join(str(p) for p in s.problems) or "no subject"
            logger.error("Series failed: %s: %s", s.label, reason)
            outcomes.append(SeriesOutcome(series=s, status="failed", reason=reason))
    order = {id(s): k for k, s in enumerate(scan.series)}
    outcomes.sort(key=lambda o: order[id(o.series)])
    return ConversionReport(
        bids_dir=bids_dir,
        outcomes=outcomes,
        skipped_files=scan.skipped,
        failed_files=scan.problems,
    )


def summary_lines(report: ConversionReport) -> list[str]:
    """One line per series for the terminal: status, series, BIDS names or reason."""
    lines = []
    for o in report.outcomes:
        check = ""
        statuses = {c.get("Status") for c in o.checks}
        if "disagree" in statuses:
            check = "  [CONVERTERS DISAGREE]"
        elif statuses == {"agree"}:
            check = "  [cross-check ok]"
        if o.status == "converted":
            lines.append(f"ok       {o.series.label} -> {', '.join(o.names)}{check}")
        elif o.status == "failed":
            lines.append(f"FAILED   {o.series.label}: {o.reason}")
        else:
            lines.append(f"{o.status:<8} {o.series.label}")
    for p in report.failed_files:
        lines.append(f"FAILED   {p}")
    return lines
