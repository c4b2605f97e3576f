"""One-subject job start-up against dataset size: the pybids index must not grow with it.

For synthetic layouts of 200, 2,000 and 10,000 subjects (one empty T1w and one JSON
sidecar each; the selected subject gets a real phantom T1w so the graph is built),
a fresh Python process runs what ``mriflow BIDS OUT participant --participant-label X``
does before the first image step: discovery of that one subject and the Nipype graph.
Its wall time, from process start to graph built, is measured in three ways:

- ``before``: pybids indexes the whole tree with metadata first, as mriflow did up to
  issue 15 (the anchor: what a job cost before);
- ``label``: no database; pybids ignores every other ``sub-*`` folder;
- ``database``: ``--bids-database-dir`` built once beforehand (its build time is shown).

Each figure is the median of ``--repeat`` runs, taken round-robin over sizes and modes
(so that a change of machine load hits all of them), and the ratio is the figure over
the 200-subject figure of the same mode measured in the same run.

Usage::

    python benchmarks/bench_startup.py [--sizes 200,2000,10000] [--repeat 3]
        [--before-max 10000] [--root DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.helpers import write_phantom_t1w  # noqa: E402

CHILD = """
import sys
from pathlib import Path
bids, label, db, out, before = sys.argv[1:6]
from mriflow.bids.discovery import collect_inputs
from mriflow.config import Config
from mriflow.workflows.base import init_mriflow_wf
if before == "1":
    import bids as pybids
    pybids.BIDSLayout(bids, validate=True, derivatives=False)  # the pre-issue-15 full index
subjects = collect_inputs(bids, [label], database_dir=db or None)
assert [s.subject for s in subjects] == [label] and subjects[0].error is None, subjects
init_mriflow_wf(subjects, config=Config(), bids_dir=bids, out_dir=out, work_dir=out + "/work")
"""


def make_layout(root: Path, n_subjects: int, selected: str) -> Path:
    root.mkdir(parents=True)
    (root / "dataset_description.json").write_text(
        json.dumps({"Name": "startup benchmark", "BIDSVersion": "1.10.0", "DatasetType": "raw"})
    )
    sidecar = json.dumps({"RepetitionTime": 2.3, "EchoTime": 0.003, "FlipAngle": 8})
    for index in range(1, n_subjects + 1):
        label = f"{index:05d}"
        anat = root / f"sub-{label}" / "anat"
        anat.mkdir(parents=True)
        (anat / f"sub-{label}_T1w.json").write_text(sidecar)
        image = anat / f"sub-{label}_T1w.nii.gz"
        if label == selected:
            write_phantom_t1w(image)
        else:
            image.touch()
    return root


def time_child(bids: Path, label: str, db: str, out: Path, before: bool) -> float:
    env = dict(os.environ, PYTHONPATH=str(REPO), NIPYPE_NO_ET="1")
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", CHILD, str(bids), label, db, str(out), "1" if before else "0"],
        check=True,
        env=env,
        capture_output=True,
    )
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="200,2000,10000")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--before-max", type=int, default=10000, help="largest size to time the old full index"
    )
    parser.add_argument("--root", type=Path, help="where to build layouts (default: a temp dir)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    root = Path(tempfile.mkdtemp(prefix="mriflow-startup-", dir=args.root))
    from mriflow.bids.discovery import build_database

    rows = []
    try:
        layouts = []
        for size in sizes:
            selected = f"{size // 2:05d}"  # a subject in the middle of the tree
            t0 = time.perf_counter()
            bids = make_layout(root / f"ds{size}", size, selected)
            made = time.perf_counter() - t0
            t0 = time.perf_counter()
            db = root / f"db{size}"
            build_database(bids, db)
            layouts.append((size, selected, bids, db, made, time.perf_counter() - t0))
        times: dict[tuple[int, str], list[float]] = {}
        # round-robin over sizes and modes: a change of machine load hits all of them
        for round_ in range(args.repeat):
            for size, selected, bids, db, _, _ in layouts:
                for mode in ("before", "label", "database"):
                    if mode == "before" and size > args.before_max:
                        continue
                    times.setdefault((size, mode), []).append(
                        time_child(
                            bids,
                            selected,
                            str(db) if mode == "database" else "",
                            root / "out",
                            before=mode == "before",
                        )
                    )
            print(f"  round {round_ + 1} of {args.repeat} done", file=sys.stderr, flush=True)
        for size, _, _, _, made, built in layouts:
            figures = {
                mode: statistics.median(times.get((size, mode), [float("nan")]))
                for mode in ("before", "label", "database")
            }
            rows.append((size, made, built, figures))
    finally:
        shutil.rmtree(root, ignore_errors=True)

    anchor = rows[0][3]
    print(
        f"one-subject job start-up (fresh process -> graph built), median of {args.repeat}; "
        f"ratio = figure / the {rows[0][0]}-subject figure of the same mode"
    )
    header = (
        "| subjects | before: full index, s (ratio) | label only, s (ratio) "
        "| database, s (ratio) | database build once, s | layout made, s |"
    )
    print(header)
    print("|---" * 6 + "|")
    for size, made, built, figures in rows:
        cells = []
        for mode in ("before", "label", "database"):
            value = figures[mode]
            cells.append(
                "not run" if value != value else f"{value:.2f} ({value / anchor[mode]:.2f}x)"
            )
        print(f"| {size} | {' | '.join(cells)} | {built:.1f} | {made:.1f} |")


if __name__ == "__main__":
    main()
