"""Benchmark: DICOM-to-NIfTI time per series, dcm2niix (the anchor) vs dicom2nifti.

Usage::

    PYTHONPATH=. python benchmarks/bench_dicom.py [--data ../shared/data] [--repeats 3]

For every series of ``dicom/siemens_orientation``, ``dicom/xa30_t1w_enhanced``
and ``dicom/decubitus_t1`` it times one conversion with each converter (median
of ``--repeats``), as ``mriflow convert`` runs them (dcm2niix binary from its
PyPI package on the series' files; dicom2nifti in-process on pydicom datasets,
including reading the files), and prints the ratio dicom2nifti / dcm2niix with
the cross-check verdict. Then it times the whole ``mriflow convert`` of each
folder (scan, both converters, comparison, de-identification, writing BIDS)
against one plain ``dcm2niix`` call on the folder.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib

from mriflow.dicom.convert import convert_dicom_to_bids
from mriflow.dicom.converters import (
    ConverterError,
    compare_images,
    dcm2niix_binary,
    dcm2niix_version,
    dicom2nifti_version,
    run_dcm2niix,
    run_dicom2nifti,
)
from mriflow.dicom.scan import scan_dicom_dir

FOLDERS = ("siemens_orientation", "xa30_t1w_enhanced", "decubitus_t1")


def _median_time(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    parser.add_argument("--data", type=Path, default=default)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)  # the table says it all

    root = args.data / "dicom"
    if not root.is_dir():
        print(f"{root}: DICOM test data not found", file=sys.stderr)
        return 2
    print(f"dcm2niix {dcm2niix_version()} (PyPI binary)  vs  dicom2nifti {dicom2nifti_version()}")
    print(f"median of {args.repeats} runs; seconds per series\n")
    header = f"{'series':<34} {'files':>5} {'shape':<16} {'dcm2niix':>9} {'dicom2nifti':>11} "
    header += f"{'ratio':>6}  cross-check"
    print(header)
    print("-" * len(header))
    total_a = total_b = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for folder in FOLDERS:
            scan = scan_dicom_dir(root / folder)
            for k, series in enumerate(scan.series):
                name = f"{folder[:12]}/{series.series_number} {series.description}"[:34]
                out = work / f"{folder}{k}"

                def dcm(out=out, series=series):
                    import shutil

                    shutil.rmtree(out, ignore_errors=True)
                    return run_dcm2niix(series.files, out / "a")

                def d2n(out=out, series=series):
                    return run_dicom2nifti(series.files, out / "b.nii")

                t_a, images = _median_time(dcm, args.repeats)
                try:
                    t_b, img = _median_time(d2n, args.repeats)
                    agreement = compare_images(nib.load(str(images[0].nifti)), img)
                    verdict = "agree" if agreement.agree else f"DISAGREE: {agreement.details}"
                    ratio = f"{t_b / t_a:6.1f}"
                except ConverterError as err:
                    t_b, ratio, verdict = float("nan"), "   n/a", f"dicom2nifti failed: {err}"
                total_a += t_a
                total_b += t_b if t_b == t_b else 0.0
                shape = "x".join(str(s) for s in nib.load(str(images[0].nifti)).shape)
                print(
                    f"{name:<34} {len(series.files):>5} {shape:<16} {t_a:9.3f} {t_b:11.3f} "
                    f"{ratio}  {verdict[:70]}"
                )
        print("-" * len(header))
        print(f"{'total':<57} {total_a:9.2f} {total_b:11.2f} {total_b / total_a:6.1f}\n")

        print(f"{'whole folder':<22} {'dcm2niix alone':>14} {'mriflow convert':>16} {'ratio':>6}")
        for folder in FOLDERS:
            src = root / folder

            def plain(src=src, folder=folder):
                out = work / f"plain-{folder}-{time.perf_counter_ns()}"
                out.mkdir()
                cmd = [dcm2niix_binary(), "-z", "y", "-b", "y", "-o", str(out), str(src)]
                subprocess.run(cmd, check=True, capture_output=True)

            def full(src=src, folder=folder):
                out = work / f"bids-{folder}-{time.perf_counter_ns()}"
                return convert_dicom_to_bids(src, out, subject="01")

            t_plain, _ = _median_time(plain, args.repeats)
            t_full, _ = _median_time(full, args.repeats)
            print(f"{folder:<22} {t_plain:14.2f} {t_full:16.2f} {t_full / t_plain:6.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
