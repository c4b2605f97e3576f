"""Publishing a subject into OUT_DIR in one step: complete or not at all.

The protocol (one subject at a time, so cluster jobs of different subjects can
publish into one OUT_DIR concurrently):

1. :func:`begin_subject` removes what a killed earlier publication of the subject
   left (its staging folder, ``.part`` files) and makes a fresh staging folder
   ``OUT_DIR/.mriflow_staging/sub-XX.<run>/``, laid out like OUT_DIR itself (on the
   same file system, so the final moves are renames);
2. the caller writes every derivative there (and the report, from those files);
   files of the subject's other sessions already in OUT_DIR are carried over
   (hard links) by :func:`carry_over`, so a run of one session keeps the others;
3. :func:`commit_subject` swaps in hard links of the published files wherever a
   staged file has the same bytes (a rerun with nothing changed touches no
   output), renames the staged ``sub-XX/`` folder into place (the old one is
   moved aside first and deleted after), moves the report and provenance record
   by ``os.replace``, and only then writes the completion record
   ``logs/sub-XX_status.json`` saying ``ok``.

A kill at any point leaves the subject either absent, as it was, or complete;
:func:`begin_subject` of the next run removes the leftovers. Readers (the group
level) trust only subjects whose completion record says ``ok``.
"""

from __future__ import annotations

import datetime as _dt
import filecmp
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from mriflow.bids.outputs import GROUP_OUTPUTS, provenance_relpath, report_relpath, status_relpath
from mriflow.bids.paths import (
    PART_MARKER,
    atomic_write_json,
    remove_partial_files,
    subject_dirname,
)

__all__ = [
    "STAGING_ROOT",
    "begin_subject",
    "carry_over",
    "commit_subject",
    "write_status",
]

#: Hidden (so BIDS tools skip it) folder of OUT_DIR where subjects are staged.
STAGING_ROOT = ".mriflow_staging"


def _staging_root(out_dir: Path) -> Path:
    return out_dir / STAGING_ROOT


def begin_subject(out_dir: str | os.PathLike[str], subject: str, run_id: str) -> Path:
    """Remove the subject's leftovers of killed publications; return a fresh staging folder."""
    out_dir = Path(out_dir)
    name = subject_dirname(subject)
    root = _staging_root(out_dir)
    if root.is_dir():
        for stale in root.glob(f"{name}.*"):
            shutil.rmtree(stale, ignore_errors=True)
    if (out_dir / name).is_dir():
        remove_partial_files(out_dir / name)
    for folder, prefix in (
        (out_dir, name),
        (out_dir / "provenance", name),
        (out_dir / "logs", name),
    ):
        if folder.is_dir():
            for part in folder.glob(f".{prefix}*{PART_MARKER}*"):
                part.unlink(missing_ok=True)
    staging = root / f"{name}.{run_id}"
    staging.mkdir(parents=True)
    description = out_dir / GROUP_OUTPUTS["dataset_description"]
    if description.is_file():  # readers of the staged folder find the raw dataset through it
        shutil.copyfile(description, staging / description.name)
    return staging


def carry_over(out_dir: str | os.PathLike[str], subject: str, staging: Path) -> list[Path]:
    """Link into ``staging`` the subject's published files in folders this run did not write.

    A participant run limited to one session rewrites that session's folders; the
    other sessions' files stay published. Figures are always redrawn.
    """
    out_dir = Path(out_dir)
    name = subject_dirname(subject)
    published = out_dir / name
    if not published.is_dir():
        return []
    written = {p.parent for p in (staging / name).rglob("*") if p.is_file()}
    written.add(staging / name / "figures")
    kept = []
    for path in sorted(published.rglob("*")):
        relative = path.relative_to(out_dir)
        target = staging / relative
        if not path.is_file() or target.parent in written or PART_MARKER in path.name:
            continue
        if (staging / name / "figures") in target.parents:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, target)
        except OSError:  # no hard links on this file system
            shutil.copy2(path, target)
        kept.append(target)
    return kept


def commit_subject(
    out_dir: str | os.PathLike[str],
    subject: str,
    staging: Path,
    run_id: str,
    extra: Iterable[str] = (),
) -> None:
    """Move the staged subject into place, then record it as complete.

    ``extra`` are further files relative to OUT_DIR staged outside ``sub-XX/``; the
    report and provenance record are moved when staged.
    """
    out_dir = Path(out_dir)
    name = subject_dirname(subject)
    final = out_dir / name
    aside = _staging_root(out_dir) / f"{name}.{run_id}.old"
    _keep_unchanged(out_dir, staging, name)
    if final.exists():
        os.rename(final, aside)
    os.rename(staging / name, final)
    for relpath in (report_relpath(subject), provenance_relpath(subject), *extra):
        staged = staging / relpath
        if staged.is_file() and not _same_file(staged, out_dir / relpath):
            (out_dir / relpath).parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged, out_dir / relpath)
    write_status(out_dir, subject, ok=True, run_id=run_id)
    shutil.rmtree(aside, ignore_errors=True)
    shutil.rmtree(staging, ignore_errors=True)


def _same_file(a: Path, b: Path) -> bool:
    return b.is_file() and filecmp.cmp(a, b, shallow=False)


def _keep_unchanged(out_dir: Path, staging: Path, name: str) -> None:
    """Put the published file itself (a hard link) where a staged file has the same bytes.

    A rerun with nothing changed then leaves every output's inode and mtime as it
    was (tools that watch mtimes see no change), although the folder is swapped.
    """
    for staged in sorted((staging / name).rglob("*")):
        published = out_dir / staged.relative_to(staging)
        if not staged.is_file() or staged.is_symlink() or not _same_file(staged, published):
            continue
        if os.path.samefile(staged, published):
            continue  # already a carried-over link
        link = staged.with_name(f".{staged.name}{PART_MARKER}")
        try:
            os.link(published, link)
        except OSError:  # no hard links here: keep the staged copy
            continue
        os.replace(link, staged)


def write_status(
    out_dir: str | os.PathLike[str], subject: str, *, ok: bool, run_id: str, reason: str = ""
) -> Path:
    """``logs/sub-XX_status.json``: whether the subject's last run completed, and why not."""
    return atomic_write_json(
        Path(out_dir) / status_relpath(subject),
        {
            "participant_id": subject_dirname(subject),
            "status": "ok" if ok else "failed",
            "reason": reason,
            "run_id": run_id,
            "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        },
    )
