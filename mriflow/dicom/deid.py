"""De-identification of converted images: sidecars, NIfTI header text fields, dates.

Three layers, because each alone leaks:

1. dcm2niix runs with ``-ba y`` (it drops patient fields and dates itself),
   but it keeps institution, station and device fields, and copies free-text
   DICOM fields (descriptions, comments) that technicians sometimes fill with
   a patient's name.
2. :func:`deidentify_sidecar` removes every key that is PHI by its name
   (patient, institution, physicians, operators, accession, IDs, UIDs, dates)
   and every free-text value that contains one of the series' own PHI values
   (:func:`collect_phi_values` reads them from the DICOM headers).
3. :func:`restrict_sidecar` keeps only the fields of an explicit allow-list
   (:data:`SIDECAR_ALLOWLIST`: BIDS metadata and dcm2niix's technical
   fields), as DICOM PS3.15's Basic Profile does: free text such as
   StudyDescription, (Performed)ProcedureStepDescription, ImageComments,
   RequestedProcedureDescription or AdditionalPatientHistory is removed, and
   any field a converter adds in a future version is removed until it is
   reviewed. SeriesDescription and ProtocolName are kept under the profile's
   Clean Descriptors Option (BIDS tools and heuristics use them): only when
   no PHI value of the series is in them, on one line, at most 64 characters.
4. :func:`scrub_nifti_header` blanks the NIfTI text fields (``descrip``,
   ``aux_file``, ``db_name``, ``intent_name``) and any header extension,
   byte for byte, so the voxel data and scaling stay exactly as converted.
"""

from __future__ import annotations

import datetime as _dt
import gzip
import re
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pydicom

__all__ = [
    "PHI_KEYS",
    "SIDECAR_ALLOWLIST",
    "restrict_sidecar",
    "collect_phi_values",
    "deidentify_sidecar",
    "acquisition_datetime",
    "scrub_nifti_header",
    "write_nifti_gz",
    "contains_phi",
]

# Sidecar keys that identify a person, place, device or study (after the
# DICOM PS3.15 Basic Application Confidentiality Profile and HIPAA's list).
PHI_KEYS = frozenset(
    {
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientBirthTime",
        "PatientSex",
        "PatientAge",
        "PatientSize",
        "PatientWeight",
        "PatientAddress",
        "PatientTelephoneNumbers",
        "OtherPatientIDs",
        "OtherPatientNames",
        "PatientMotherBirthName",
        "PatientComments",
        "EthnicGroup",
        "MilitaryRank",
        "ResponsiblePerson",
        "InstitutionName",
        "InstitutionAddress",
        "InstitutionalDepartmentName",
        "StationName",
        "DeviceSerialNumber",
        "ReferringPhysicianName",
        "PerformingPhysicianName",
        "PhysiciansOfRecord",
        "NameOfPhysiciansReadingStudy",
        "RequestingPhysician",
        "OperatorsName",
        "AccessionNumber",
        "StudyID",
        "ImageComments",
        "AcquisitionDateTime",
        "AcquisitionDate",
        "StudyDate",
        "SeriesDate",
        "ContentDate",
        "StudyTime",
        "SeriesTime",
        "ContentTime",
        "InstanceCreationDate",
        "InstanceCreationTime",
        "BidsGuess",
    }
)

# Coded or numeric fields: never PHI, and short coded values ("HFS", "M")
# must not be removed because a patient name happens to equal them.
_CODED_KEYS = frozenset(
    {
        "Modality",
        "PatientPosition",
        "ImageType",
        "ScanningSequence",
        "SequenceVariant",
        "ScanOptions",
        "MRAcquisitionType",
        "PhaseEncodingDirection",
        "SliceEncodingDirection",
        "InPlanePhaseEncodingDirectionDICOM",
        "ImageOrientationText",
        "ConversionSoftware",
        "ConversionSoftwareVersion",
        "Manufacturer",
        "ManufacturersModelName",
        "SoftwareVersions",
        "BodyPartExamined",
        "BodyPart",
        "MatrixCoilMode",
        "CoilCombinationMethod",
        "PulseSequenceType",
        "ConsistencyInfo",
        "RawImage",
    }
)

# The sidecar fields a de-identified conversion keeps: BIDS metadata (MRI
# "Scanner hardware", "Sequence specifics", "In- and out-of-plane spatial
# encoding", "Timing parameters", "RF & contrast") and dcm2niix's technical
# fields. Values are numbers, codes or vendor strings. Everything else is
# removed: free text (descriptions, comments, histories) and fields a new
# converter version adds, until someone reviews them and adds them here.
SIDECAR_ALLOWLIST = frozenset(
    {
        # scanner hardware
        "Modality",
        "Manufacturer",
        "ManufacturersModelName",
        "SoftwareVersions",
        "MagneticFieldStrength",
        "ImagingFrequency",
        "ReceiveCoilName",
        "ReceiveCoilActiveElements",
        "CoilString",
        "GradientSetType",
        "MRTransmitCoilSequence",
        "MatrixCoilMode",
        "CoilCombinationMethod",
        "ConsistencyInfo",
        "BodyPart",
        "BodyPartExamined",
        "PatientPosition",
        # sequence
        "PulseSequenceType",
        "ScanningSequence",
        "SequenceVariant",
        "ScanOptions",
        "SequenceName",
        "PulseSequenceName",
        "PulseSequenceDetails",
        "NonlinearGradientCorrection",
        "MRAcquisitionType",
        "MTState",
        "MTOffsetFrequency",
        "MTPulseBandwidth",
        "MTNumberOfPulses",
        "MTPulseShape",
        "MTPulseDuration",
        "SpoilingState",
        "SpoilingType",
        "SpoilingRFPhaseIncrement",
        "SpoilingGradientMoment",
        "SpoilingGradientDuration",
        "SeriesDescription",  # Clean Descriptors Option (checked below)
        "ProtocolName",  # Clean Descriptors Option (checked below)
        "SeriesNumber",
        "AcquisitionNumber",
        "ImageType",
        "ImageTypeText",
        "RawImage",
        "ComplexImageComponent",
        "EchoNumber",
        "EchoTrainLength",
        "NumberShots",
        "WaterFatShift",
        # spatial encoding
        "SliceThickness",
        "SpacingBetweenSlices",
        "NumberOfAverages",
        "AcquisitionMatrixPE",
        "BaseResolution",
        "ReconMatrixPE",
        "PhaseResolution",
        "PhaseOversampling",
        "PercentPhaseFOV",
        "PercentSampling",
        "PhaseEncodingSteps",
        "PhaseEncodingStepsOutOfPlane",
        "FrequencyEncodingSteps",
        "ParallelReductionFactorInPlane",
        "ParallelReductionFactorOutOfPlane",
        "ParallelAcquisitionTechnique",
        "PartialFourier",
        "PartialFourierDirection",
        "PhaseEncodingDirection",
        "SliceEncodingDirection",
        "InPlanePhaseEncodingDirectionDICOM",
        "ImageOrientationPatientDICOM",
        "ImageOrientationText",
        "EffectiveEchoSpacing",
        "DerivedVendorReportedEchoSpacing",
        "EstimatedEffectiveEchoSpacing",
        "EstimatedTotalReadoutTime",
        "TotalReadoutTime",
        "PixelBandwidth",
        "BandwidthPerPixelPhaseEncode",
        "DwellTime",
        "RefLinesPE",
        "MultibandAccelerationFactor",
        "ShimSetting",
        "TablePosition",
        # timing and contrast
        "EchoTime",
        "EchoTime1",
        "EchoTime2",
        "InversionTime",
        "RepetitionTime",
        "RepetitionTimeExcitation",
        "RepetitionTimePreparation",
        "FlipAngle",
        "SliceTiming",
        "AcquisitionTime",
        "AcquisitionDuration",
        "VolumeTiming",
        "DelayTime",
        "DelayAfterTrigger",
        "NumberOfVolumesDiscardedByScanner",
        "MixingTime",
        "SAR",
        "TxRefAmp",
        "NegativeContrast",
        "ContrastBolusIngredient",
        "DiffusionScheme",
        "PhaseEncodingPolarityGE",
        "PhilipsRescaleSlope",
        "PhilipsRescaleIntercept",
        "PhilipsScaleSlope",
        "UsePhilipsFloatNotDisplayScaling",
        # provenance (ours and the converter's)
        "ConversionSoftware",
        "ConversionSoftwareVersion",
        "AcquisitionDateTime",  # only written back shifted by --date-shift
        "ConversionCheck",
        "Defaced",
        "DefacingMethod",
    }
)

# Free-text descriptors kept under PS3.15's Clean Descriptors Option.
_DESCRIPTORS = ("SeriesDescription", "ProtocolName")
_DESCRIPTOR_MAX = 64  # DICOM LO length: longer text is notes, not a protocol name

# DICOM attributes whose values are PHI wherever else they show up.
_PHI_ATTRIBUTES = (
    "PatientName",
    "PatientID",
    "OtherPatientIDs",
    "OtherPatientNames",
    "PatientBirthDate",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "PatientMotherBirthName",
    "PatientComments",
    "InstitutionName",
    "InstitutionAddress",
    "InstitutionalDepartmentName",
    "StationName",
    "DeviceSerialNumber",
    "ReferringPhysicianName",
    "PerformingPhysicianName",
    "PhysiciansOfRecord",
    "NameOfPhysiciansReadingStudy",
    "RequestingPhysician",
    "OperatorsName",
    "AccessionNumber",
    "StudyID",
    "ResponsiblePerson",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "FrameOfReferenceUID",
    "StudyDate",
    "SeriesDate",
    "AcquisitionDate",
    "ContentDate",
    "AcquisitionDateTime",
)

_MIN_TOKEN = 3  # shorter fragments ("Li", "1") match too much unrelated text


def _values(ds: pydicom.Dataset, keyword: str) -> list[str]:
    if keyword not in ds:
        return []
    value = ds.data_element(keyword).value
    if value is None:
        return []
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        return [str(v) for v in value if str(v).strip()]
    return [str(value)] if str(value).strip() else []


def collect_phi_values(datasets: Iterable[pydicom.Dataset]) -> set[str]:
    """The PHI strings of a series, as they could appear in any converted file.

    Parameters
    ----------
    datasets : iterable of pydicom.Dataset
        Headers of the series (the first and last file are enough: PHI does
        not change within a series).

    Returns
    -------
    set of str
        Whole values, name components (``Doe^John`` gives ``Doe`` and
        ``John``), and dates in both DICOM (``19450317``) and ISO
        (``1945-03-17``) form. Fragments shorter than 3 characters are left
        out: they would match unrelated text.
    """
    found: set[str] = set()
    for ds in datasets:
        for keyword in _PHI_ATTRIBUTES:
            for value in _values(ds, keyword):
                value = value.strip()
                found.add(value)
                for part in re.split(r"[\^=,;\\]+|\s+", value):
                    found.add(part.strip())
                if re.fullmatch(r"\d{8}", value):
                    found.add(f"{value[:4]}-{value[4:6]}-{value[6:]}")
    return {v for v in found if len(v) >= _MIN_TOKEN}


def contains_phi(text: str, phi_values: Iterable[str]) -> bool:
    """True when ``text`` contains any PHI value as a whole word (case-insensitive)."""
    lowered = text.lower()
    for value in phi_values:
        v = value.lower()
        start = lowered.find(v)
        while start >= 0:
            before = lowered[start - 1] if start > 0 else " "
            end = start + len(v)
            after = lowered[end] if end < len(lowered) else " "
            # Word boundaries keep "Ann" from removing "scanner"; digits count
            # as word characters so a 5-digit ID inside a longer number is kept.
            if not (before.isalnum() or after.isalnum()):
                return True
            start = lowered.find(v, start + 1)
    return False


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in _strings(v)]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    return []


def acquisition_datetime(ds: pydicom.Dataset) -> _dt.datetime | None:
    """The acquisition date and time of a DICOM image, or None if the header has none."""
    text = str(ds.get("AcquisitionDateTime") or "")
    if not text:
        date = str(ds.get("AcquisitionDate") or ds.get("SeriesDate") or ds.get("StudyDate") or "")
        time = str(ds.get("AcquisitionTime") or ds.get("SeriesTime") or ds.get("StudyTime") or "")
        text = date + time if date else ""
    m = re.match(r"(\d{8})(\d{2})?(\d{2})?(\d{2})?(\.\d+)?", text)
    if not m:
        return None
    try:
        stamp = _dt.datetime.strptime(m.group(1), "%Y%m%d")
    except ValueError:
        return None
    hour, minute, second = (int(g) if g else 0 for g in m.groups()[1:4])
    micro = int(float(m.group(5)) * 1e6) if m.group(5) else 0
    try:
        return stamp.replace(hour=hour, minute=minute, second=second, microsecond=micro)
    except ValueError:
        return None


def deidentify_sidecar(
    sidecar: dict[str, Any],
    phi_values: Iterable[str],
    *,
    acquired: _dt.datetime | None = None,
    date_shift_days: int | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """Remove PHI from a BIDS sidecar.

    Parameters
    ----------
    sidecar : dict
        The converter's sidecar (not modified).
    phi_values : iterable of str
        From :func:`collect_phi_values`; free-text values containing one are dropped.
    acquired : datetime, optional
        Acquisition date and time read from the DICOM header.
    date_shift_days : int, optional
        None (default) removes every date. An integer keeps the acquisition
        date as ``AcquisitionDateTime`` moved back by this many days (time of
        day kept), so intervals between sessions survive but dates do not.

    Returns
    -------
    (dict, list of str)
        The de-identified sidecar and the names of the keys removed.
    """
    phi = [v for v in phi_values if v]
    out: dict[str, Any] = {}
    removed: list[str] = []
    for key, value in sidecar.items():
        drop = (
            key in PHI_KEYS
            or key.endswith("UID")
            or key.endswith("Date")
            or key.endswith("DateTime")
            or (key.startswith("Patient") and key != "PatientPosition")
        )
        if not drop and key not in _CODED_KEYS:
            drop = any(contains_phi(s, phi) for s in _strings(value))
        if drop:
            removed.append(key)
        else:
            out[key] = value
    if date_shift_days is not None and acquired is not None:
        shifted = acquired - _dt.timedelta(days=int(date_shift_days))
        out["AcquisitionDateTime"] = shifted.isoformat()
    return out, removed


def restrict_sidecar(sidecar: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Keep only the allow-listed fields of a sidecar (PS3.15 Basic Profile on free text).

    Parameters
    ----------
    sidecar : dict
        A sidecar already passed through :func:`deidentify_sidecar` (not modified).

    Returns
    -------
    (dict, list of str)
        The sidecar with only :data:`SIDECAR_ALLOWLIST` fields, and the names
        of the fields removed. ``SeriesDescription`` and ``ProtocolName`` are
        kept only as one line of at most 64 printable characters (else removed).
    """
    out: dict[str, Any] = {}
    removed: list[str] = []
    for key, value in sidecar.items():
        keep = key in SIDECAR_ALLOWLIST
        if keep and key in _DESCRIPTORS:
            text = str(value)
            keep = (
                isinstance(value, str)
                and len(text) <= _DESCRIPTOR_MAX
                and text.isprintable()
                and text.strip() == text
            )
        if keep:
            out[key] = value
        else:
            removed.append(key)
    return out, removed


# NIfTI text fields: (offset, length) in the NIfTI-1 and NIfTI-2 headers.
_NIFTI1_FIELDS = {
    "db_name": (14, 18),
    "descrip": (148, 80),
    "aux_file": (228, 24),
    "intent_name": (328, 16),
}
_NIFTI2_FIELDS = {"descrip": (240, 80), "aux_file": (320, 24), "intent_name": (508, 16)}


def _patch_header(raw: bytearray, path: Path, descrip: bytes) -> bytearray:
    if len(raw) < 352:
        raise ValueError(f"{path}: not a NIfTI file (only {len(raw)} bytes)")
    vox_offset = _vox_offset(raw, path)
    sizes = (struct.unpack("<i", bytes(raw[:4]))[0], struct.unpack(">i", bytes(raw[:4]))[0])
    size = 348 if 348 in sizes else 540
    fields = _NIFTI1_FIELDS if size == 348 else _NIFTI2_FIELDS
    for name, (offset, length) in fields.items():
        value = descrip if name == "descrip" else b""
        raw[offset : offset + length] = value[:length].ljust(length, b"\0")
    # Extensions (DICOM headers, comments) sit between the header and the
    # voxels; zero them and clear the flag, keeping the voxel offset.
    if vox_offset > size and len(raw) >= vox_offset:
        raw[size:vox_offset] = b"\0" * (vox_offset - size)
    return raw


def scrub_nifti_header(path: str | Path, *, descrip: str = "") -> None:
    """Blank the free-text fields and extensions of a NIfTI file in place.

    ``descrip``, ``aux_file``, ``db_name`` and ``intent_name`` can carry
    acquisition times, comments or names copied from the DICOM header
    (dcm2niix writes ``TE=..;Time=..`` into ``descrip`` and ImageComments into
    ``aux_file``). Only header bytes change; voxels, affine and scaling are
    untouched. ``.nii.gz`` files are rewritten with no name or time stamp in
    the gzip header.

    Raises
    ------
    ValueError
        The file is not NIfTI-1 or NIfTI-2.
    """
    path = Path(path)
    text = descrip.encode("ascii", "replace")
    if path.name.endswith(".gz"):
        with gzip.open(path, "rb") as fh:
            raw = bytearray(fh.read())
        raw = _patch_header(raw, path, text)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as fh_out:
            with gzip.GzipFile(
                filename="", mode="wb", fileobj=fh_out, mtime=0, compresslevel=6
            ) as gz:
                gz.write(raw)
        tmp.replace(path)
    else:
        with open(path, "r+b") as fh:
            raw = bytearray(fh.read(544))
            fh.seek(0)
            raw = bytearray(fh.read(max(_vox_offset(raw, path), len(raw))))
            raw = _patch_header(raw, path, text)
            fh.seek(0)
            fh.write(raw)


def write_nifti_gz(
    source: str | Path, target: str | Path, *, scrub: bool = True, compresslevel: int = 6
) -> None:
    """Write ``source`` (``.nii`` or ``.nii.gz``) to ``target`` as ``.nii.gz``.

    With ``scrub`` the header's text fields and extensions are blanked as in
    :func:`scrub_nifti_header`. The gzip header carries no file name or time.
    """
    source, target = Path(source), Path(target)
    if not 0 <= compresslevel <= 9:
        raise ValueError(f"compresslevel must be in 0..9, got {compresslevel}")
    opener = gzip.open if source.name.endswith(".gz") else open
    with opener(source, "rb") as fh:
        raw = bytearray(fh.read())
    if scrub:
        raw = _patch_header(raw, source, b"")
    with open(target, "wb") as fh_out:
        with gzip.GzipFile(
            filename="", mode="wb", fileobj=fh_out, mtime=0, compresslevel=compresslevel
        ) as gz:
            gz.write(raw)


def _vox_offset(raw: bytearray, path: Path) -> int:
    for endian in ("<", ">"):
        size = struct.unpack(endian + "i", bytes(raw[:4]))[0]
        if size == 348:
            return int(struct.unpack(endian + "f", bytes(raw[108:112]))[0])
        if size == 540:
            return int(struct.unpack(endian + "q", bytes(raw[168:176]))[0])
    raise ValueError(f"{path}: not a NIfTI file (header size field is not 348 or 540)")
