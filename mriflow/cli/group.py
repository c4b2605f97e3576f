"""The group level: steps that need every subject's participant outputs."""

from __future__ import annotations

import logging
from pathlib import Path

from mriflow.config import Config

log = logging.getLogger("mriflow")

__all__ = ["run_group"]


def run_group(
    *,
    bids_dir: Path,
    out_dir: Path,
    work_dir: Path,
    config: Config,
    participant_labels: list[str] | None = None,
) -> int:
    from mriflow.cli.run import EXIT_OK, UsageError

    if not (out_dir / "dataset_description.json").is_file():
        raise UsageError(
            f"OUT_DIR {out_dir} has no participant outputs: run the participant level first"
        )
    subjects = sorted(p.name for p in out_dir.glob("sub-*") if p.is_dir())
    if participant_labels:
        wanted = {f"sub-{label.removeprefix('sub-')}" for label in participant_labels}
        subjects = [s for s in subjects if s in wanted]
    if not subjects:
        raise UsageError(f"OUT_DIR {out_dir}: no participant outputs (sub-*) found")
    print(f"mriflow group: {len(subjects)} subject(s) with participant outputs")
    return EXIT_OK
