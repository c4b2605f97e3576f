"""The subject QC report as the publishing node makes it, at reduced and at full resolution.

Usage::

    PYTHONPATH=. python benchmarks/bench_report.py OUT_DIR [--subject 01] [--repeats 2]

``OUT_DIR`` is the output of a participant run (e.g. of the README example). Each
run copies the subject's published files into a fresh folder laid out like OUT_DIR
(as the publishing node stages them) and times
:func:`mriflow.reports.write_subject_qc` (IQMs, figures, HTML, PROV). The anchor is
the same call drawing at full resolution (``display_mm=None``), timed in the same
process, alternating with the measured one; printed: the median wall and CPU time
of each and their ratio. On a loaded machine wall time mostly measures the load:
compare CPU time and the ratio.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path
from unittest import mock

from mriflow.bids.outputs import GROUP_OUTPUTS
from mriflow.bids.paths import subject_dirname


def _stage(out_dir: Path, subject: str, into: Path) -> Path:
    """A copy of the subject's published folder, as the publishing node stages it."""
    staging = into / "staging"
    shutil.copytree(out_dir / subject_dirname(subject), staging / subject_dirname(subject))
    shutil.rmtree(staging / subject_dirname(subject) / "figures", ignore_errors=True)
    description = GROUP_OUTPUTS["dataset_description"]
    shutil.copyfile(out_dir / description, staging / description)
    return staging


def _time(out_dir: Path, subject: str, display_mm: float | None) -> tuple[float, float]:
    import mriflow.reports.html as html
    from mriflow.reports import write_subject_qc

    with tempfile.TemporaryDirectory() as tmp:
        staging = _stage(out_dir, subject, Path(tmp))
        figures = partial(html.make_standard_figures, display_mm=display_mm)
        with mock.patch.object(html, "make_standard_figures", figures):
            start, cpu = time.perf_counter(), time.process_time()
            write_subject_qc(staging, subject)
            return time.perf_counter() - start, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--subject", default="01")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    _time(args.out_dir, args.subject, 2.0)  # warm-up: imports, template loading
    reduced, full = [], []
    for _ in range(args.repeats):
        reduced.append(_time(args.out_dir, args.subject, 2.0))
        full.append(_time(args.out_dir, args.subject, None))
    rw, fw = (statistics.median(t[0] for t in runs) for runs in (reduced, full))
    rc, fc = (statistics.median(t[1] for t in runs) for runs in (reduced, full))
    print(f"report of sub-{args.subject} ({args.repeats} run(s) each, medians)")
    print(f"{'figures at':<26}{'wall s':>8}{'CPU s':>8}{'ratio (CPU)':>13}")
    print(f"{'<= 2 mm (default)':<26}{rw:>8.1f}{rc:>8.1f}{rc / fc:>13.2f}")
    print(f"{'full resolution (anchor)':<26}{fw:>8.1f}{fc:>8.1f}{1.0:>13.2f}")


if __name__ == "__main__":
    main()
