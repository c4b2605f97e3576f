"""Checks before any work: writable folders, enough free space, one run per OUT_DIR.

Everything here fails in one line and exit 2 (a usage error), before a node runs:

* :func:`check_writable` - OUT_DIR and the work dir can be created and written;
* :func:`check_free_space` - their file systems hold at least an estimate of what the
  run writes (:func:`estimate_run_bytes`, a lower bound: less than that certainly fails);
* :func:`out_dir_lock` - a second run into the same OUT_DIR is refused, naming the
  holder (pid, host, start time); the lock of a process that no longer exists is taken
  over.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from mriflow.cli.errors import UsageError
from mriflow.config import Config
from mriflow.image.io import load_header_quietly

__all__ = [
    "PreflightError",
    "LOCK_NAME",
    "check_writable",
    "estimate_run_bytes",
    "check_free_space",
    "out_dir_lock",
    "preflight",
]

log = logging.getLogger("mriflow")

LOCK_NAME = ".mriflow.lock"

# Bytes a run writes per voxel of an image resampled to the configured voxel size, a
# lower bound measured on a quick phantom run (docs/usage.md): the work dir keeps about
# 13 float32 volumes of each image (conform, denoise, N4 and its field, skull strip,
# normalization, segmentation); OUT_DIR at least one (its files are compressed).
WORK_BYTES_PER_VOXEL = 4 * 12
OUT_BYTES_PER_VOXEL = 4
# Per voxel of the fixed-shape model-ready volume (float32 image, uint8 mask and labels):
# 28.8 MB measured in the work dir for the default 160x192x160 shape.
MODEL_BYTES_PER_VOXEL = 6
# Per voxel of the 1 mm template grid with registration on: at least the float32
# MNI-space image and its normalized copy (masks, labels and warps come on top).
TEMPLATE_BYTES_PER_VOXEL = 8
# MNI152NLin2009aSym brain grid at 1 mm (nilearn's ICBM152 2009a).
TEMPLATE_SHAPE_1MM = (193, 229, 193)


class PreflightError(UsageError):
    """The run cannot start: one line naming the path and the problem (exit 2)."""


def check_writable(path: Path, what: str) -> None:
    """Check that ``path`` can be written: a probe file in it, or in its nearest existing
    parent when it does not exist yet (nothing is created, so a refused run leaves no trace).

    Parameters
    ----------
    path : Path
        A folder the run writes into.
    what : str
        How the message names it (``"OUT_DIR"``, ``"--work-dir"``).

    Raises
    ------
    PreflightError
        The folder cannot be created or written (read-only, no permission, a file in
        the way, full).
    """
    existing = _existing(path)
    if not existing.is_dir():
        raise PreflightError(f"{what} {path}: not writable ({existing} is not a folder)")
    probe = existing / f".mriflow-write-test-{uuid.uuid4().hex[:8]}"
    try:
        with open(probe, "wb") as handle:
            handle.write(b"\0" * 4096)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as err:
        reason = err.strerror or str(err)
        raise PreflightError(f"{what} {path}: not writable ({reason})") from None
    finally:
        try:
            probe.unlink()
        except OSError:
            pass


def _existing(path: Path) -> Path:
    """``path`` or its nearest parent that exists."""
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def estimate_run_bytes(images: Sequence[tuple[str | Path, str]], config: Config) -> tuple[int, int]:
    """A lower bound of what a participant run writes: (work dir bytes, OUT_DIR bytes).

    From the headers only: each image's field of view resampled to the configured voxel
    size, times the volumes each step keeps; T1w images add the model-ready and the
    template-space volumes. Meant to refuse runs that certainly fail, not to predict.

    Parameters
    ----------
    images : sequence of (path, suffix)
        The raw images of the selected subjects (suffix ``"T1w"``, ``"T2w"``, ...).
    config : Config
    """
    work = out = 0
    voxel_mm3 = float(config.spatial.voxel_size) ** 3
    template_voxels = int(np.prod(TEMPLATE_SHAPE_1MM)) / config.registration.template_resolution**3
    model_voxels = int(np.prod(config.export.target_shape))
    for path, suffix in images:
        try:
            header = load_header_quietly(path).header
            shape = np.asarray(header.get_data_shape()[:3], dtype=float)
            zooms = np.asarray(header.get_zooms()[:3], dtype=float)
        except Exception:  # unreadable images fail their subject later, in one line
            continue
        voxels = float(np.prod(shape * zooms)) / voxel_mm3
        work += int(voxels * WORK_BYTES_PER_VOXEL)
        out += int(voxels * OUT_BYTES_PER_VOXEL)
        if suffix == "T1w":
            work += model_voxels * MODEL_BYTES_PER_VOXEL
            if config.registration.enabled:
                work += int(template_voxels * TEMPLATE_BYTES_PER_VOXEL)
    return work, out


def check_free_space(
    images: Sequence[tuple[str | Path, str]], config: Config, out_dir: Path, work_dir: Path
) -> None:
    """Refuse a run whose OUT_DIR or work dir cannot hold :func:`estimate_run_bytes`.

    Raises
    ------
    PreflightError
        One line: the folder, the space needed and the space free.
    """
    work_need, out_need = estimate_run_bytes(images, config)
    needs: dict[int, list] = {}  # file system -> [bytes needed, folders, free]
    for folder, need in ((work_dir, work_need), (out_dir, out_need)):
        try:
            device = _existing(folder).stat().st_dev  # the folder may not exist yet
            free = shutil.disk_usage(_existing(folder)).free
        except OSError:
            continue  # check_writable has said what is wrong with it
        entry = needs.setdefault(device, [0, [], free])
        entry[0] += need
        entry[1].append(str(folder))
    for need, folders, free in needs.values():
        if free < need:
            raise PreflightError(
                f"{' and '.join(folders)}: not enough free space for this run (needs at least "
                f"{_mb(need)}, {_mb(free)} free): free some space or choose another folder"
            )


def _mb(n_bytes: float) -> str:
    return f"{n_bytes / 1e6:.0f} MB" if n_bytes < 1e9 else f"{n_bytes / 1e9:.1f} GB"


def config_key(config: Config) -> str:
    """What runs that may share an OUT_DIR have in common: every config section but
    ``execution`` (threads and plugins do not change the outputs)."""
    import hashlib

    values = {k: v for k, v in config.to_dict().items() if k != "execution"}
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()


@contextmanager
def out_dir_lock(out_dir: Path, share_key: str | None = None) -> Iterator[Path | None]:
    """Hold ``OUT_DIR/.mriflow.lock`` for the duration of a run.

    The lock file says who holds it (pid, host, start time, command); a second run is
    refused with that information. A lock left by a process that no longer runs on
    this host (killed, crashed machine rebooted) is taken over with a warning; a lock
    from another host is never taken over, since its process cannot be checked.

    A run whose ``share_key`` equals the holder's (the same configuration: the tasks of
    one Slurm array, or subjects run side by side with ``--participant-label``) goes
    ahead without the lock (yields None): those runs write different subjects and the
    same ``mriflow_config.toml``. (When the holder ends first, the lock is gone while
    the sharer still runs.)

    Raises
    ------
    PreflightError
        Another live run holds the lock.
    """
    lock = out_dir / LOCK_NAME
    created = [p for p in (out_dir, *out_dir.parents) if not p.exists()]
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise PreflightError(f"OUT_DIR {out_dir}: cannot be created ({err.strerror})") from None
    me = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "process_start": _process_start(os.getpid()),
        "command": " ".join(sys.argv),
        "share_key": share_key,
    }
    try:
        yield from _hold(lock, out_dir, me)
    finally:
        # a run refused or stopped before writing anything leaves no empty OUT_DIR behind
        for folder in created:
            try:
                folder.rmdir()
            except OSError:
                break  # not empty: the run wrote into it


def _hold(lock: Path, out_dir: Path, me: dict) -> Iterator[Path | None]:
    # the lock appears with its content (a hard link of a written file): a lock
    # created empty and filled afterwards was read as "unreadable" by a run starting
    # at the same moment, which took it over (seen with Slurm array tasks)
    draft = lock.with_name(f"{lock.name}.{me['host']}.{me['pid']}")
    _remove_stale_drafts(lock)
    try:
        draft.write_text(json.dumps(me))
    except OSError as err:
        problem = f"cannot create the lock ({err.strerror})"
        raise PreflightError(f"OUT_DIR {out_dir}: {problem}") from None
    try:
        yield from _take(lock, draft, out_dir, me)
    finally:
        draft.unlink(missing_ok=True)


def _remove_stale_drafts(lock: Path) -> None:
    """Remove the lock drafts of runs killed before they could (``kill -9`` leaves one)."""
    prefix = f"{lock.name}."
    try:
        entries = list(os.scandir(lock.parent))
    except OSError:
        return
    for entry in entries:
        if not entry.name.startswith(prefix) or not entry.is_file(follow_symlinks=False):
            continue
        holder = _read_lock(Path(entry.path))
        if holder is not None and not _alive(holder):
            Path(entry.path).unlink(missing_ok=True)


def _take(lock: Path, draft: Path, out_dir: Path, me: dict) -> Iterator[Path | None]:
    share_key = me["share_key"]
    for _ in range(3):  # create, or take over a stale lock and create
        try:
            os.link(draft, lock)
        except FileExistsError:
            holder = _read_lock(lock)
            if holder is not None and _alive(holder):
                if share_key is not None and holder.get("share_key") == share_key:
                    log.info(
                        "%s: sharing OUT_DIR with pid %s (same configuration)",
                        out_dir,
                        holder.get("pid"),
                    )
                    yield None
                    return
                raise PreflightError(
                    f"{out_dir}: another mriflow run is writing here (pid {holder.get('pid')} "
                    f"on {holder.get('host')}, started {holder.get('started')}); wait for it, "
                    f"or remove {lock} if that run is gone"
                ) from None
            log.warning(
                "%s: taking over the lock of a run that is no longer running (%s)",
                out_dir,
                "unreadable lock file" if holder is None else f"pid {holder.get('pid')}",
            )
            lock.unlink(missing_ok=True)
            continue
        except OSError as err:
            raise PreflightError(
                f"OUT_DIR {out_dir}: cannot create the lock ({err.strerror})"
            ) from None
        break
    else:
        raise PreflightError(f"{out_dir}: could not take the lock {lock} (another run races)")
    try:
        yield lock
    finally:
        holder = _read_lock(lock)
        if (
            holder is not None
            and holder.get("pid") == me["pid"]
            and holder.get("host") == me["host"]
        ):
            lock.unlink(missing_ok=True)


def _read_lock(lock: Path) -> dict | None:
    try:
        value = json.loads(lock.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _alive(holder: dict) -> bool:
    """Whether the lock holder still runs (pid and its start time, on this host)."""
    if holder.get("host") != socket.gethostname():
        return True  # cannot check another machine: assume it runs
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    recorded = holder.get("process_start")
    # a recycled pid: the same number, another process started later
    return recorded is None or _process_start(pid) in (None, recorded)


def _process_start(pid: int) -> int | None:
    """Start time of a process in clock ticks since boot (Linux), to spot recycled pids."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: split after its ")"
    fields = stat[stat.rfind(")") + 2 :].split()
    return int(fields[19]) if len(fields) > 19 else None


@contextmanager
def preflight(out_dir: Path, work_dir: Path, share_key: str | None = None) -> Iterator[Path | None]:
    """OUT_DIR and the work dir writable, then hold OUT_DIR's lock for the run.

    Free space is checked once the inputs are known (:func:`check_free_space`).
    """
    check_writable(out_dir, "OUT_DIR")
    check_writable(work_dir, "--work-dir")
    with out_dir_lock(out_dir, share_key) as lock:
        yield lock
