"""What input validation adds to a participant run (``--skip-bids-validation`` skips it).

Measures, in the same process and machine state, the wall time of

- ``deno``: the official validator (``bids-validator-deno``) as mriflow calls it, a
  subprocess per run;
- ``pybids``: mriflow's fallback checks (pybids' dataset check, BIDS names, empty files);
- ``run`` (the anchor): a whole quick-chain participant run of one phantom subject,
  validation skipped, as the CLI tests do it (``tests/helpers.py`` QUICK_CHAIN, 2 mm).

on the phantom dataset of the tests (2 subjects), the bundled example (3 T1w) and, with
``--subjects N``, a synthetic layout of N phantom subjects. Each figure is the median of
``--repeat`` runs; the ratio is the figure over the anchor.

Usage::

    python benchmarks/bench_validation.py [--repeat 3] [--subjects 200]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mriflow.cli import validation  # noqa: E402
from tests.helpers import QUICK_CHAIN, make_bids_dataset  # noqa: E402


def timed(call) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def median(call, repeat: int) -> float:
    return statistics.median(timed(call) for _ in range(repeat))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--subjects", type=int, default=200)
    args = parser.parse_args()
    command = validation.validator_command()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        datasets = {
            "phantoms (2 subjects)": make_bids_dataset(tmp / "p2", {"01": [""], "02": [""]}),
            "bids_examples (3 T1w)": REPO / "bids_examples",
            f"phantoms ({args.subjects} subjects)": make_bids_dataset(
                tmp / "pn", {f"{i:04d}": [""] for i in range(args.subjects)}
            ),
        }
        run = [sys.executable, "-m", "mriflow.cli.run", str(datasets["phantoms (2 subjects)"])]

        def anchor() -> None:
            out = tempfile.mkdtemp(dir=tmp)
            subprocess.run(
                [*run, f"{out}/out", "participant", "-w", f"{out}/work", "-q"]
                + ["--participant-label", "01", "--skip-bids-validation", "--voxel-size", "2"]
                + [*QUICK_CHAIN, "--set", "skull_strip.method=none"],
                check=True,
                capture_output=True,
                env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
            )

        anchor_s = median(anchor, args.repeat)
        print(f"anchor: quick participant run of 1 phantom subject: {anchor_s:.1f} s (median)")
        print(f"{'dataset':26} {'checker':8} {'seconds':>8} {'/ run':>7} {'errors':>6}")
        for name, root in datasets.items():
            checkers = {"deno": command, "pybids": None} if command else {"pybids": None}
            for checker, cmd in checkers.items():
                validation_command = validation.validator_command
                validation.validator_command = lambda cmd=cmd: cmd
                try:
                    found: list = []
                    seconds = median(
                        lambda root=root, found=found: found.append(
                            validation.validate_bids_dir(root)[1]
                        ),
                        args.repeat,
                    )
                finally:
                    validation.validator_command = validation_command
                print(
                    f"{name:26} {checker:8} {seconds:8.2f} {seconds / anchor_s:7.1%} "
                    f"{len(found[-1]):6d}"
                )


if __name__ == "__main__":
    main()
