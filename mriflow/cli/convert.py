"""``mriflow convert DICOM_DIR BIDS_DIR --subject 01``: DICOM to a BIDS raw dataset.

This module only parses options and reports; the work is done by
:func:`mriflow.dicom.convert.convert_dicom_to_bids`. The main console script
adds these arguments to its ``convert`` sub-command parser and calls
:func:`run_convert` with the parsed namespace.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

__all__ = ["add_convert_arguments", "run_convert"]

logger = logging.getLogger("mriflow.dicom")


def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``mriflow convert`` positionals and options to ``parser``."""
    parser.add_argument(
        "dicom_dir",
        metavar="DICOM_DIR",
        type=Path,
        help="folder of DICOM files, searched recursively (any file names, "
        "DICOMDIR, enhanced multi-frame); other files are skipped with a warning",
    )
    parser.add_argument(
        "bids_dir",
        metavar="BIDS_DIR",
        type=Path,
        help="BIDS raw dataset to write into (created if missing)",
    )
    who = parser.add_mutually_exclusive_group(required=True)
    who.add_argument(
        "--subject",
        "--participant-label",
        dest="subject",
        metavar="LABEL",
        help="participant label, e.g. 01 (the sub- prefix is optional; letters and digits "
        "only); the folder must hold one patient's series",
    )
    who.add_argument(
        "--subject-map",
        metavar="FILE",
        type=Path,
        default=None,
        help="TSV of PatientID<TAB>participant label, one patient a line: converts a "
        "folder holding several patients, each into its own subject",
    )
    parser.add_argument(
        "--session",
        metavar="LABEL",
        default=None,
        help="session label, e.g. pre: adds ses-<label> to folders and names",
    )
    parser.add_argument(
        "--heuristic",
        metavar="FILE",
        type=Path,
        default=None,
        help="dcm2bids JSON config (descriptions with criteria on sidecar fields) "
        "replacing mriflow's default naming rules",
    )
    parser.add_argument(
        "--converter",
        choices=("dcm2niix", "dicom2nifti"),
        default="dcm2niix",
        help="primary converter (default: %(default)s); the other one "
        "cross-checks every series unless --no-verify",
    )
    parser.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="skip the cross-check conversion with the second converter",
    )
    parser.add_argument(
        "--keep-phi",
        action="store_true",
        help="do NOT de-identify: keep patient, institution and date fields in "
        "sidecars and NIfTI headers (de-identification is on by default)",
    )
    parser.add_argument(
        "--date-shift",
        dest="date_shift_days",
        metavar="DAYS",
        type=int,
        default=None,
        help="keep AcquisitionDateTime, moved back by DAYS days "
        "(default: acquisition dates are removed)",
    )
    parser.add_argument(
        "--keep-unknown",
        action="store_true",
        help="write series the heuristic does not recognise under sourcedata/ "
        "instead of leaving them out",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace existing files of the same name (default: such a series "
        "fails and the existing files are kept)",
    )
    parser.add_argument(
        "--deface",
        action="store_true",
        help="remove the face and ears of the T1w, T2w and FLAIR images written "
        "(a plane and a shave outside the brain mask plus a margin; never a brain voxel); "
        "the sidecar says Defaced: true and how",
    )
    parser.add_argument(
        "--deface-margin",
        dest="deface_margin_mm",
        metavar="MM",
        type=float,
        default=5.0,
        help="defacing: distance kept between the brain mask and anything removed "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--affine-tolerance",
        dest="affine_tolerance_mm",
        metavar="MM",
        type=float,
        default=1e-3,
        help="cross-check: largest affine difference in mm (default: %(default)s)",
    )
    parser.add_argument(
        "--min-correlation",
        metavar="R",
        type=float,
        default=0.99,
        help="cross-check: smallest voxel correlation (default: %(default)s)",
    )


def _ensure_log_output() -> None:
    # Warnings (skipped files, disagreements) must reach the terminal even if
    # the caller configured no logging; never add a second handler.
    root = logging.getLogger()
    mriflow_logger = logging.getLogger("mriflow")
    if not root.handlers and not mriflow_logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        mriflow_logger.addHandler(handler)
        mriflow_logger.setLevel(logging.INFO)


def run_convert(args: argparse.Namespace) -> int:
    """Run ``mriflow convert`` with parsed arguments.

    Returns
    -------
    int
        0 when every series converted (or was deliberately left out), 1 when
        some series or files failed, 2 for a usage error (bad folder, label,
        heuristic file, subject map or option combination, series of several
        patients without a subject map, or no DICOM images found).
    """
    from mriflow.dicom.convert import (
        DefaceOptions,
        MixedPatientsError,
        convert_dicom_to_bids,
        load_subject_map,
        summary_lines,
    )
    from mriflow.dicom.heuristic import HeuristicError

    _ensure_log_output()
    if args.keep_phi and args.date_shift_days is not None:
        print(
            "mriflow convert: error: --date-shift applies to de-identified output; "
            "it cannot be combined with --keep-phi",
            file=sys.stderr,
        )
        return 2
    if args.deface and not args.deface_margin_mm > 0:
        print(
            f"mriflow convert: error: --deface-margin must be > 0 mm, got {args.deface_margin_mm}",
            file=sys.stderr,
        )
        return 2
    try:
        subject_map = load_subject_map(args.subject_map) if args.subject_map else None
        report = convert_dicom_to_bids(
            args.dicom_dir,
            args.bids_dir,
            subject=args.subject,
            subject_map=subject_map,
            deface=DefaceOptions(margin_mm=args.deface_margin_mm) if args.deface else None,
            session=args.session,
            heuristic=args.heuristic,
            converter=args.converter,
            verify=args.verify,
            deidentify=not args.keep_phi,
            date_shift_days=args.date_shift_days,
            keep_unknown=args.keep_unknown,
            overwrite=args.overwrite,
            affine_tolerance_mm=args.affine_tolerance_mm,
            min_correlation=args.min_correlation,
        )
    except MixedPatientsError as err:
        first, *series = str(err).splitlines()
        print(f"mriflow convert: error: {first}", file=sys.stderr)
        for line in series:
            print(line, file=sys.stderr)
        print("Nothing was written.", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, HeuristicError) as err:
        print(f"mriflow convert: error: {err}", file=sys.stderr)
        return 2

    if not report.outcomes and not report.failed_files:
        print(
            f"mriflow convert: error: no DICOM images found under {args.dicom_dir} "
            f"({len(report.skipped_files)} other files skipped)",
            file=sys.stderr,
        )
        return 2
    for line in summary_lines(report):
        print(line)
    n_ok = len(report.converted)
    n_failed = len(report.failed) + len(report.failed_files)
    n_disagree = len(report.disagreements)
    print(
        f"{n_ok} series converted into {args.bids_dir}, {n_failed} failed, "
        f"{len(report.outcomes) - n_ok - len(report.failed)} left out, "
        f"{len(report.skipped_files)} non-DICOM files skipped"
        + (f"; converters DISAGREE on {n_disagree} series (see warnings)" if n_disagree else "")
    )
    if not args.keep_phi:
        print(
            "De-identified: no patient, institution or physician fields, UIDs, dates or "
            "free-text descriptions in sidecars and NIfTI headers"
            + (
                f" (dates shifted by -{args.date_shift_days} d)"
                if args.date_shift_days is not None
                else ""
            )
        )
    if args.deface:
        n_defaced = sum(
            1
            for o in report.converted
            for path in o.outputs
            if path.name.endswith(".json") and '"Defaced": true' in path.read_text("utf-8")
        )
        print(f"Defaced {n_defaced} T1w/T2w/FLAIR images (margin {args.deface_margin_mm} mm)")
    return 0 if report.ok else 1
