"""DICOM to BIDS conversion: plain functions, no Nipype.

The entry point is :func:`convert_dicom_to_bids` (what ``mriflow convert``
runs). The steps are importable on their own: :func:`scan_dicom_dir` groups
files into series, :func:`run_dcm2niix` / :func:`run_dicom2nifti` convert one
series, :func:`compare_images` cross-checks two conversions in RAS,
:func:`deidentify_sidecar` / :func:`restrict_sidecar` / :func:`scrub_nifti_header`
remove PHI, and
:func:`default_heuristic` / :func:`load_dcm2bids_config` name series in BIDS.
"""

from mriflow.dicom.convert import (
    ConversionReport,
    DefaceOptions,
    MixedPatientsError,
    SeriesOutcome,
    convert_dicom_to_bids,
    load_subject_map,
)
from mriflow.dicom.converters import (
    ConverterError,
    compare_images,
    run_dcm2niix,
    run_dicom2nifti,
)
from mriflow.dicom.deid import deidentify_sidecar, restrict_sidecar, scrub_nifti_header
from mriflow.dicom.heuristic import BidsTarget, default_heuristic, load_dcm2bids_config
from mriflow.dicom.scan import DicomSeries, scan_dicom_dir

__all__ = [
    "BidsTarget",
    "ConversionReport",
    "ConverterError",
    "DefaceOptions",
    "DicomSeries",
    "MixedPatientsError",
    "SeriesOutcome",
    "compare_images",
    "convert_dicom_to_bids",
    "default_heuristic",
    "deidentify_sidecar",
    "load_dcm2bids_config",
    "load_subject_map",
    "restrict_sidecar",
    "run_dcm2niix",
    "run_dicom2nifti",
    "scan_dicom_dir",
    "scrub_nifti_header",
]
