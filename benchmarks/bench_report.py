"""CPU time of one subject's QC report, this tree against a git revision (the anchor).

Usage::

    PYTHONPATH=. python benchmarks/bench_report.py OUT_DIR [--subject 01] [--repeats 3]
        [--before main] [--bias-field WORK/.../n4/..._biasfield.nii]

``OUT_DIR`` is the output of a participant run (e.g. ``mriflow bids_examples OUT
participant``). Each measurement runs in a fresh Python process: it copies the
subject's published files into a folder laid out like OUT_DIR (as the publishing
node stages them), calls :func:`mriflow.reports.write_subject_qc` once to warm up
(imports, template loading), then times one call (IQMs, figures, HTML, PROV). The
anchor is the same measurement with the package of ``--before`` (``git archive``
of that revision), alternating with this tree's, so both see the same load.
Printed: median wall and CPU seconds of each and the CPU ratio. On a loaded
machine wall time mostly measures the load: read CPU time and the ratio.
``--bias-field`` passes the N4 field of the run's work folder, as the publishing
node does (the INU metrics then cost what they cost in a run).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

_CHILD = r"""
import json, shutil, sys, tempfile, time
from pathlib import Path

from mriflow.bids.outputs import GROUP_OUTPUTS
from mriflow.bids.paths import subject_dirname
from mriflow.reports import write_subject_qc

out_dir, subject, bias = Path(sys.argv[1]), sys.argv[2], sys.argv[3] or None


def stage(into):
    staging = Path(into) / "staging"
    folder = subject_dirname(subject)
    shutil.copytree(out_dir / folder, staging / folder)
    shutil.rmtree(staging / folder / "figures", ignore_errors=True)
    description = GROUP_OUTPUTS["dataset_description"]
    shutil.copyfile(out_dir / description, staging / description)
    return staging


fields = None
if bias:
    from mriflow.bids.layout import DerivativesLayout
    from mriflow.bids.paths import parse_bids_uri

    groups = DerivativesLayout(out_dir).find(subject)
    fields = {parse_bids_uri(g.source)[1]: bias for g in groups if g.contrast == "T1w"}
with tempfile.TemporaryDirectory() as tmp:
    write_subject_qc(stage(tmp), subject, bias_fields=fields)  # warm-up
with tempfile.TemporaryDirectory() as tmp:
    staging = stage(tmp)
    wall, cpu = time.perf_counter(), time.process_time()
    write_subject_qc(staging, subject, bias_fields=fields)
    print(json.dumps([time.perf_counter() - wall, time.process_time() - cpu]))
"""


def _export(revision: str, into: Path) -> Path:
    """The ``mriflow`` package of ``revision`` of this repository, unpacked under ``into``."""
    repo = Path(__file__).resolve().parents[1]
    archive = subprocess.run(
        ["git", "-C", str(repo), "archive", "--format=tar", revision, "mriflow"],
        check=True,
        capture_output=True,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def _measure(pythonpath: Path, out_dir: Path, subject: str, bias: str) -> tuple[float, float]:
    env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    done = subprocess.run(
        # -P: not the current folder first on sys.path (run from a checkout, it would
        # shadow the anchor's package with this tree's)
        [sys.executable, "-P", "-c", _CHILD, str(out_dir), subject, bias],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    wall, cpu = json.loads(done.stdout.strip().splitlines()[-1])
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--subject", default="01")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--before", default="main", help="git revision of the anchor")
    parser.add_argument("--bias-field", default="", help="N4 field of the subject's T1w")
    args = parser.parse_args()
    here = Path(__file__).resolve().parents[1]
    runs: dict[str, list[tuple[float, float]]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory() as tmp:
        before = _export(args.before, Path(tmp))
        for _ in range(args.repeats):
            runs["before"].append(_measure(before, args.out_dir, args.subject, args.bias_field))
            runs["after"].append(_measure(here, args.out_dir, args.subject, args.bias_field))
    wall = {k: statistics.median(t[0] for t in v) for k, v in runs.items()}
    cpu = {k: statistics.median(t[1] for t in v) for k, v in runs.items()}
    print(f"report of sub-{args.subject} of {args.out_dir} ({args.repeats} runs each, medians)")
    print(f"{'code':<28}{'wall s':>8}{'CPU s':>8}{'CPU ratio':>11}")
    print(f"{'before (' + args.before + ', anchor)':<28}{wall['before']:>8.1f}{cpu['before']:>8.2f}"
          f"{1.0:>11.2f}")  # fmt: skip
    print(f"{'after (this tree)':<28}{wall['after']:>8.1f}{cpu['after']:>8.2f}"
          f"{cpu['after'] / cpu['before']:>11.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
