"""Execution resources: threads per step, memory and cores per node, batch schedulers.

Three layers of parallelism meet in a run, and each needs its own knob:

* **processes**: Nipype runs independent nodes (subjects, images) side by side,
  up to ``--nprocs`` (MultiProc) or as separate cluster jobs (SLURM, SGE, PBS);
* **threads inside a step**: ITK (SimpleITK, antspyx), OpenMP/BLAS (numpy,
  scikit-learn) and torch each start their own pool, by default one thread per
  core, so 2 processes x 2 pools x all cores oversubscribes the machine;
* **memory**: MultiProc only stays under ``--mem-gb`` if the heavy nodes say
  how much they need.

This module holds the pieces: environment variables for every thread pool
(:func:`thread_environment`), a context that limits the pools already loaded in
a process (:func:`limit_threads`), per-node declarations that MultiProc and the
batch plugins read (:func:`declare_resources`), and the environment that
Nipype's batch plugins need (:func:`prepare_batch_environment`).
"""

from __future__ import annotations

import errno
import functools
import gc
import getpass
import logging
import math
import os
import re
import signal
import sys
import threading
import traceback as tb
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "THREAD_ENV_VARS",
    "STEP_MEMORY_GB",
    "THREAD_NONDETERMINISTIC_STEPS",
    "step_threads",
    "thread_environment",
    "set_thread_environment",
    "limit_threads",
    "declare_resources",
    "hash_inputs_by_mtime",
    "prepare_batch_environment",
    "poll_interval",
    "prestarted_workers",
    "GraphRun",
    "run_workflow",
    "log_nipype_to_file",
]

log = logging.getLogger("mriflow")

# Read by the libraries when their pool starts (at import or first use), and
# inherited by MultiProc workers and by cluster jobs (sbatch exports the environment).
THREAD_ENV_VARS = (
    "OMP_NUM_THREADS",  # OpenMP: torch, scikit-learn, OpenBLAS built with OpenMP
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "BLIS_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS",  # SimpleITK and antspyx (ITK 5)
    "ITK_NUMBER_OF_THREADS",  # older ITK builds
)

# Peak resident memory of one step at 1 mm on this project's test images, rounded
# up (measured in docs/parallel.md and the anchors baseline); what a node declares
# with ``mem_gb`` so that MultiProc does not start two of them in too little memory.
STEP_MEMORY_GB: dict[str, float] = {
    "conform": 0.5,
    "denoise": 0.75,
    "n4": 0.5,
    "skull_strip": 2.0,
    "registration": 2.5,
    "segmentation": 1.0,
}


# Steps whose output changes from one run to the next, same seed and input, when they
# use more than one thread (antspyx registration and denoising, SimpleITK co-registration:
# ITK sums the metric in thread-finishing order; benchmarks/bench_threads.py,
# docs/parallel.md). All ITK steps also differ between thread counts, but repeat exactly
# at a fixed count.
THREAD_NONDETERMINISTIC_STEPS = frozenset({"registration", "denoise", "coregistration"})


def step_threads(step: str, omp_nthreads: int, *, reproducible: bool = True) -> int:
    """Threads a step's node should use.

    ``omp_nthreads``, except for :data:`THREAD_NONDETERMINISTIC_STEPS` when
    ``reproducible``: those get 1 thread, so a rerun gives the same bytes.

    Parameters
    ----------
    step : str
        Config section name of the step (``"n4"``, ``"registration"``, ...).
    omp_nthreads : int
        Threads per step from the execution config, >= 1.
    reproducible : bool
        Prefer identical reruns over speed for the steps that cannot have both.
    """
    _check_threads(omp_nthreads, "omp_nthreads")
    if reproducible and step in THREAD_NONDETERMINISTIC_STEPS:
        return 1
    return omp_nthreads


def thread_environment(omp_nthreads: int) -> dict[str, str]:
    """The environment variables that cap every thread pool at ``omp_nthreads``.

    Parameters
    ----------
    omp_nthreads : int
        Threads per step, >= 1.
    """
    _check_threads(omp_nthreads, "omp_nthreads")
    return {var: str(omp_nthreads) for var in THREAD_ENV_VARS}


def set_thread_environment(omp_nthreads: int) -> None:
    """Set :func:`thread_environment` in ``os.environ`` and limit pools already loaded.

    Call it before the workflow runs: MultiProc workers and cluster jobs inherit
    the variables, and libraries imported later read them at start.
    """
    os.environ.update(thread_environment(omp_nthreads))
    _set_loaded_pools(omp_nthreads)


@contextmanager
def limit_threads(num_threads: int) -> Iterator[None]:
    """Run a block with at most ``num_threads`` threads in every pool, then restore.

    Covers BLAS/OpenMP (threadpoolctl), SimpleITK's global default and torch's
    intra-op pool, which all change at run time. antspyx bundles its own ITK,
    which sizes its thread pool from ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS``
    once per process (measured: a pool started at 1 thread stays at 1 after the
    variable changes). The variables are set here for an antspyx imported inside
    the block, but what counts for antspyx is the environment the process started
    with, which the CLI sets before anything is imported. Use it in an interface
    around the one algorithm call, with the node's ``num_threads`` input::

        with limit_threads(self.inputs.num_threads):
            out = n4_correct(img, ...)

    Parameters
    ----------
    num_threads : int
        Threads, >= 1.
    """
    _check_threads(num_threads, "num_threads")
    from threadpoolctl import threadpool_limits

    with ExitStack() as stack:
        stack.enter_context(threadpool_limits(limits=num_threads))
        saved_env = {var: os.environ.get(var) for var in THREAD_ENV_VARS}
        stack.callback(_restore_env, saved_env)
        os.environ.update(thread_environment(num_threads))
        saved_pools = _loaded_pools()
        stack.callback(_restore_pools, saved_pools)
        _set_loaded_pools(num_threads)
        yield


def declare_resources(
    node: Any,
    *,
    n_procs: int,
    mem_gb: float,
    plugin: str | None = None,
) -> Any:
    """Tell the scheduler what one node needs: threads and peak memory.

    MultiProc reads ``node.n_procs`` / ``node.mem_gb`` and never starts more
    than ``--nprocs`` threads or ``--mem-gb`` in total; a node whose interface
    has a ``num_threads`` input gets it set to ``n_procs`` by Nipype. For batch
    plugins the same request is added to the node's job arguments (Slurm:
    ``--cpus-per-task`` and ``--mem``; PBS: ``-l nodes=1:ppn=,mem=``), after the
    run-wide ``--plugin-args``.

    Parameters
    ----------
    node : nipype.pipeline.engine.Node
    n_procs : int
        Threads the node uses (>= 1), usually ``config.execution.omp_nthreads``.
    mem_gb : float
        Peak memory in GB (> 0), e.g. from :data:`STEP_MEMORY_GB`.
    plugin : str, optional
        The Nipype plugin name; batch-job arguments are added for SLURM/SLURMGraph
        and PBS/PBSGraph only (SGE parallel environments are site-specific).

    Returns
    -------
    The same node, for chaining.
    """
    _check_threads(n_procs, "n_procs")
    if not (isinstance(mem_gb, (int, float)) and mem_gb > 0 and math.isfinite(mem_gb)):
        raise ValueError(f"mem_gb must be a positive number of GB, got {mem_gb!r}")
    node.n_procs = n_procs
    node._mem_gb = float(mem_gb)  # Nipype's Node has no public setter for mem_gb
    mem_mb = math.ceil(mem_gb * 1024)
    job_args = None
    if plugin in ("SLURM", "SLURMGraph"):
        job_args = {"sbatch_args": f"--cpus-per-task={n_procs} --mem={mem_mb}M"}
    elif plugin in ("PBS", "PBSGraph"):
        job_args = {"qsub_args": f"-l nodes=1:ppn={n_procs},mem={mem_mb}mb"}
    if job_args:
        # overwrite=False: appended to the run-wide arguments, not replacing them
        node.plugin_args = {**(node.plugin_args or {}), **job_args, "overwrite": False}
    return node


def hash_inputs_by_mtime(node: Any) -> Any:
    """Let Nipype tell whether ``node``'s input files changed by size and mtime.

    A run hashes every input file's content (``hash_method = "content"``: a rewritten
    but identical file keeps the nodes after it cached), and reads each byte to do so,
    in the worker before the node starts, or in the main process for the nodes that
    run there: 0.05-0.3 s per 35-100 MB of inputs, 3.9 s of a 3-T1w run, 0.5-1.2 s
    before each QC and publishing node. For nodes that only pass paths on (Select,
    Split) or only read what the chains made (QC, publishing), size and mtime tell as
    well: if one reruns, it repeats what it wrote, and the nodes after it still compare
    contents.

    Returns
    -------
    The same node, for chaining.
    """
    node.config = {**(node.config or {})}
    node.config["execution"] = {**node.config.get("execution", {}), "hash_method": "timestamp"}
    return node


def prepare_batch_environment(plugin: str) -> None:
    """Environment that Nipype's batch plugins assume but a container or CI may lack.

    Nipype's SLURM plugin names jobs after ``$LOGNAME`` and fails with a bare
    ``KeyError: 'LOGNAME'`` where it is unset (containers, cron, CI); the PBS,
    SGE and LSF plugins read it too.
    """
    if plugin in ("SLURM", "SGE", "PBS", "LSF", "Condor", "OAR") and not os.environ.get("LOGNAME"):
        try:
            os.environ["LOGNAME"] = getpass.getuser()
        except (KeyError, OSError):  # no passwd entry for the uid (some containers)
            os.environ["LOGNAME"] = f"uid{os.getuid()}"


def poll_interval(plugin: str) -> float:
    """Seconds between two looks of Nipype's scheduler at its running nodes.

    Nipype waits a full interval (default 2 s) after every pass over the graph, so a
    chain of N nodes costs at least N intervals even when every node takes
    milliseconds: 8 of the 15 s of a cached rerun of one subject were these sleeps.
    Local plugins look every 0.2 s (mriflow's MultiProc also looks as soon as a task
    ends: the interval is only its longest wait); batch plugins keep 2 s, since each
    look asks the scheduler (squeue, qstat) about every pending job.
    """
    return 0.2 if plugin in ("MultiProc", "LegacyMultiProc") else 2.0


def _check_threads(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _restore_env(saved: dict[str, str | None]) -> None:
    for var, value in saved.items():
        if value is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = value


def _loaded_pools() -> dict[str, int]:
    """Thread counts of the SimpleITK and torch pools, if those are imported."""
    pools: dict[str, int] = {}
    sitk = sys.modules.get("SimpleITK")
    if sitk is not None:
        pools["sitk"] = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    torch = sys.modules.get("torch")
    if torch is not None:
        pools["torch"] = torch.get_num_threads()
    return pools


def _set_loaded_pools(num_threads: int) -> None:
    # Only libraries already imported: importing them here would cost seconds
    # in every node and load torch where it is not needed.
    _restore_pools({name: num_threads for name in _loaded_pools()})


def _restore_pools(pools: dict[str, int]) -> None:
    if "sitk" in pools:
        sys.modules["SimpleITK"].ProcessObject.SetGlobalDefaultNumberOfThreads(pools["sitk"])
    if "torch" in pools:
        sys.modules["torch"].set_num_threads(pools["torch"])


# ------------------------------------------------------------------ running the graph
#: errno values that mean the work dir cannot take more writes: no point going on.
DISK_ERRNOS = {errno.ENOSPC, errno.EIO, errno.EROFS, errno.EDQUOT}
_ERRNO_IN_TEXT = re.compile(r"\[Errno (\d+)\] ([^:\n]+)(?:: '([^'\n]*)')?")

_NIPYPE_LOG_FORMAT = "%(asctime)s %(process)d %(name)s %(levelname)s: %(message)s"


@dataclass
class GraphRun:
    """What :func:`run_workflow` learned while the graph ran."""

    failures: dict[str, str] = field(default_factory=dict)
    """Node full name -> one-line reason, for every node that failed (also when its
    crash file could not be written)."""
    fatal: str | None = None
    """One line: why the run stopped before the graph finished (e.g. the work dir is full)."""


def log_nipype_to_file(log_file: str | Path | None, level: int = logging.INFO) -> None:
    """Send Nipype's log (node progress, tracebacks of failed nodes) to ``log_file`` only.

    The terminal keeps mriflow's own messages (one line per problem and the summary);
    without this, 40-150 lines of traceback per failed node reach it. ``None`` keeps
    Nipype's messages at WARNING and above on stderr (used where no log file exists).
    """
    if log_file is None:
        handler: logging.Handler = logging.StreamHandler(sys.stderr)
        level = logging.WARNING
    else:
        handler = _FolderOnFirstRecord(str(log_file), mode="a", encoding="utf-8", delay=True)
    handler.setFormatter(logging.Formatter(_NIPYPE_LOG_FORMAT))
    # nibabel's header repairs ("setting 0 dims to 1") name no file; mriflow's input
    # checks report them with the file's name
    for name in ("nipype", "nibabel.global"):
        logger = logging.getLogger(name)
        for old in list(logger.handlers):
            logger.removeHandler(old)
            old.close()
        logger.addHandler(handler)
        logger.propagate = False  # the root logger prints to the terminal
    for name in ("nipype.workflow", "nipype.interface", "nipype.utils", "nipype.filemanip"):
        logging.getLogger(name).setLevel(level)


class _FolderOnFirstRecord(logging.FileHandler):
    """A log file whose folder is made with its first record: a worker booted before
    the run's OUT_DIR exists (``prestarted_workers``) leaves nothing behind when the
    run stops before any node (exit 2)."""

    def _open(self):
        Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
        return super()._open()


def _worker_initializer(cwd: str, log_file: str | None) -> None:
    """Start of every MultiProc worker: Nipype's own setup, then the same log file."""
    from nipype.pipeline.plugins.multiproc import process_initializer

    process_initializer(cwd)
    log_nipype_to_file(log_file)


def disk_error(text: str) -> str | None:
    """The one-line disk problem in an error text or traceback, if there is one.

    Parameters
    ----------
    text : str
        An exception message or a formatted traceback.
    """
    for match in _ERRNO_IN_TEXT.finditer(text):
        if int(match.group(1)) in DISK_ERRNOS:
            where = f" ({match.group(3)})" if match.group(3) else ""
            return f"{match.group(2).strip()}{where}"
    return None


# MultiProc worker pools booted before their graph exists (see prestarted_workers), by
# (processes, mp_context, working folder, log file); a plugin with the same takes its own
_PRESTARTED: dict[tuple[int, str | None, str, str | None], Any] = {}


def _worker_pool(processes: int, mp_context: str | None, cwd: str, log_file: str | None):
    """The MultiProc workers: Nipype's, with an initializer that also routes their log."""
    from concurrent.futures import ProcessPoolExecutor

    from nipype.pipeline.plugins.multiproc import mp

    return ProcessPoolExecutor(
        max_workers=processes,
        initializer=_worker_initializer,
        initargs=(cwd, log_file),
        mp_context=mp.get_context(mp_context),
    )


@contextmanager
def prestarted_workers(
    plugin: str,
    plugin_args: dict[str, Any],
    *,
    cwd: str | Path,
    log_file: str | Path | None,
) -> Iterator[None]:
    """Boot MultiProc's first worker now; the run's plugin takes the pool when it starts.

    A worker's boot (a forked Python that imports the CLI's modules and Nipype: about
    1.1 s from a node's submission to its start, measured in the run's log) otherwise
    waits for the first node, after the inputs are indexed and the graph is built;
    booted here, the two overlap (the other workers start on demand, as before). The
    plugin takes the pool only when its processes, context, working folder and log
    file are these; a pool not taken is stopped when the block ends. Other plugins:
    nothing.

    Parameters
    ----------
    plugin : str
    plugin_args : dict
        As :func:`mriflow.cli.participant.plugin_settings` returns them.
    cwd : path
        The workflow's ``base_dir`` (created here): where the workers work.
    log_file : path, optional
        The run's log file, as given to :func:`run_workflow`.
    """
    key = pool = None
    # a SIGTERM (a scheduler's time limit) from the first worker's start on must stop it
    # too, as run_workflow's handler does once the graph runs
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous_sigterm = None
    if plugin == "MultiProc" and in_main_thread:
        previous_sigterm = signal.signal(signal.SIGTERM, _interrupt)
    try:
        if plugin == "MultiProc":
            import multiprocessing

            Path(cwd).mkdir(parents=True, exist_ok=True)
            processes = int(plugin_args.get("n_procs") or multiprocessing.cpu_count())
            key = _pool_key(processes, plugin_args.get("mp_context"), cwd, log_file)
            pool = _PRESTARTED[key] = _worker_pool(*key)
            # each task that finds no idle worker starts one (its initializer runs there);
            # one core stays with this process, which is busy building the graph (booting
            # both workers of a 2-core machine delayed the graph more than it saved)
            for _ in range(max(1, min(processes, (os.cpu_count() or 1) - 1))):
                pool.submit(os.getpid)
        yield
    finally:
        if key is not None:
            _PRESTARTED.pop(key, None)
        if pool is not None:
            # not taken, or taken by a run that stopped it (or was interrupted before it
            # could): no worker outlives the block
            pool.shutdown(wait=True, cancel_futures=True)
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)


def _pool_key(
    processes: int, mp_context: str | None, cwd: str | Path, log_file: str | Path | None
) -> tuple[int, str | None, str, str | None]:
    return (
        processes,
        mp_context,
        os.path.realpath(cwd),
        None if log_file is None else os.path.realpath(log_file),
    )


def _make_plugin_class():
    from nipype.pipeline.plugins.multiproc import MultiProcPlugin, run_node

    class WatchedMultiProcPlugin(MultiProcPlugin):
        """Nipype's MultiProc that cannot wait for ever (nipype#3404).

        * A task whose future raises (its result pickle could not be written or read,
          the worker died) is recorded as failed with the exception's traceback; Nipype
          drops it, and then waits for its result for ever.
        * A crash file that cannot be written does not stop the run; the failure is
          kept in :attr:`failures`.
        * The first disk error (no space, I/O error, read-only) stops the run with
          :class:`WorkDirError`: every later node would fail the same way.

        And it hands over faster (each hand-over is on the critical path, 14 of them in a
        one-head run):

        * the next pass over the graph starts as soon as a task ends, instead of at the
          next poll (Nipype sleeps ``poll_sleep_duration`` after every pass; that is now
          the longest wait, for a task that never reports);
        * the objects that exist when the graph starts (Nipype, pybids, the graph) are
          frozen out of the garbage collector: Nipype calls ``gc.collect()`` before every
          submission and after every node run in the main process, and each call walked
          them all (1.9 s of the main process in a 47 s run, between one node's end and
          the next one's start).
        """

        def __init__(self, plugin_args=None, log_file: str | None = None):
            super().__init__(plugin_args=plugin_args)
            self.failures: dict[str, str] = {}
            self.fatal: str | None = None
            # set by a worker's future when its task ends (from the executor's thread)
            self._task_ended = threading.Event()
            self._poll_s = 0.0
            # Nipype's pool, replaced by one whose initializer also routes the workers'
            # Nipype log to the run's log file (booted early if prestarted_workers did)
            self.pool.shutdown(wait=True)
            key = _pool_key(
                self.processors, self.plugin_args.get("mp_context"), self._cwd, log_file
            )
            self.pool = _PRESTARTED.pop(key, None) or _worker_pool(*key)

        def _submit_job(self, node, updatehash=False):
            self._taskid += 1
            if getattr(node.interface, "terminal_output", "") == "stream":
                node.interface.terminal_output = "allatonce"
            future = self.pool.submit(run_node, node, updatehash, self._taskid)
            future.add_done_callback(functools.partial(self._task_done, self._taskid))
            self._task_obj[self._taskid] = future
            return self._taskid

        def _task_done(self, taskid, future):
            try:
                result = future.result()
            except BaseException as err:  # noqa: BLE001 - any failure must end the task
                result = {
                    "result": None,
                    "traceback": tb.format_exception(type(err), err, err.__traceback__),
                    "taskid": taskid,
                }
            if result.get("traceback"):
                self._note_disk_error("".join(result["traceback"]))
            self._taskresult[taskid] = result
            self._task_ended.set()

        def run(self, graph, config, updatehash=False):
            self._poll_s = float(config["execution"]["poll_sleep_duration"])
            if math.isfinite(self.max_jobs):
                # Nipype skips the submission pass (where this plugin waits) once
                # max_jobs tasks run: keep its sleep, or the loop would spin
                self._poll_s = 0.0
            else:
                # the wait is in _send_procs_to_workers, which ends early when a task ends
                config = {**config, "execution": {**config["execution"], "poll_sleep_duration": 0}}
            with _signals_held():
                gc.collect()  # not to freeze garbage
            gc.freeze()
            try:
                return super().run(graph, config, updatehash=updatehash)
            finally:
                gc.unfreeze()

        def _report_crash(self, node, result=None):
            text = "".join((result or {}).get("traceback") or []) or "unknown error"
            self.failures.setdefault(node.fullname, disk_error(text) or _last_line(text))
            self._note_disk_error(text)
            try:
                return super()._report_crash(node, result=result)
            except OSError as err:  # the crash dir is on the same full disk
                self._note_disk_error(f"[Errno {err.errno}] {err.strerror}: '{err.filename}'")
                return None

        def _note_disk_error(self, text: str) -> None:
            problem = disk_error(text)
            if problem and self.fatal is None:
                self.fatal = problem

        def _send_procs_to_workers(self, updatehash=False, graph=None):
            if self.fatal is not None:
                raise WorkDirError(self.fatal)
            # Nipype runs gc.collect() on every pass that finds a free processor, whether
            # or not a job is ready: at the 0.2 s poll that kept the main process at 40-55 %
            # of a core while one long step ran alone (2.3 CPU-min in a 5.7-min run)
            ready = ~self.proc_done & (self.depidx.sum(axis=0) == 0).__array__()
            state = (len(self.proc_done), int(self.proc_done.sum()))
            if ready.any():
                super()._send_procs_to_workers(updatehash=updatehash, graph=graph)
            if self._poll_s > 0 and state == (len(self.proc_done), int(self.proc_done.sum())):
                # nothing could start: nothing changes until a task ends
                self._task_ended.wait(self._poll_s)
                self._task_ended.clear()
            return None

        def stop(self) -> None:
            """Stop the workers now, running tasks included (the run is over)."""
            for process in list((getattr(self.pool, "_processes", None) or {}).values()):
                process.terminate()
            self.pool.shutdown(wait=False, cancel_futures=True)

    return WatchedMultiProcPlugin


class WorkDirError(RuntimeError):
    """The work dir cannot be written (full, failing or read-only): the run stops."""


def run_workflow(
    workflow: Any,
    plugin: str,
    plugin_args: dict[str, Any],
    *,
    log_file: str | Path | None = None,
) -> GraphRun:
    """Run a Nipype workflow; failed nodes are reported, never raised, and it never hangs.

    Parameters
    ----------
    workflow : nipype.pipeline.engine.Workflow
    plugin : str
        Nipype plugin name; ``MultiProc`` runs as :class:`WatchedMultiProcPlugin`.
    plugin_args : dict
        Its arguments (see :func:`mriflow.cli.participant.plugin_settings`).
    log_file : path, optional
        Where Nipype's log and the tracebacks go (see :func:`log_nipype_to_file`).

    Returns
    -------
    GraphRun
        Failures per node and, if the run stopped early, the one-line reason.
    """
    log_nipype_to_file(log_file)
    outcome = GraphRun()
    # Nipype (and its workers) resolve paths against the current folder, which may be
    # gone (a cleaned-up job folder): every result file would then "not exist"
    try:
        previous_cwd: str | None = os.getcwd()
    except FileNotFoundError:
        previous_cwd = None
    if workflow.base_dir:
        Path(workflow.base_dir).mkdir(parents=True, exist_ok=True)
        os.chdir(workflow.base_dir)
    # a scheduler's SIGTERM (time limit, scancel) stops the workers too, as Ctrl-C does;
    # by default the parent would die alone and leave them running
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous_sigterm = signal.signal(signal.SIGTERM, _interrupt) if in_main_thread else None
    runner: Any = plugin
    try:
        if plugin == "MultiProc":
            runner = _make_plugin_class()(
                plugin_args=plugin_args, log_file=None if log_file is None else str(log_file)
            )
            workflow.run(plugin=runner)
        else:
            workflow.run(plugin=plugin, plugin_args=plugin_args)
    except WorkDirError as err:
        outcome.fatal = f"{workflow.base_dir}: {err} (work dir); the run stopped"
    except RuntimeError as err:
        # Nipype raises after the graph ran when some nodes failed; the crash files
        # and ``failures`` say which subjects, the others are complete.
        log.debug("workflow finished with errors: %s", _last_line(str(err)))
    except OSError as err:  # the parent itself could not write (graph files, pickles)
        problem = disk_error(f"[Errno {err.errno}] {err.strerror}: '{err.filename}'")
        outcome.fatal = f"{workflow.base_dir}: {problem or err} (work dir); the run stopped"
        logging.getLogger("nipype.workflow").error("run stopped", exc_info=True)
    finally:
        if not isinstance(runner, str):
            outcome.failures = dict(runner.failures)
            if outcome.fatal is None and runner.fatal is not None:
                outcome.fatal = f"{workflow.base_dir}: {runner.fatal} (work dir); the run stopped"
            runner.stop()
        if previous_cwd is not None:
            try:
                os.chdir(previous_cwd)
            except OSError:
                pass
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)
    return outcome


@contextmanager
def _signals_held() -> Iterator[None]:
    """Deliver SIGTERM and SIGINT after the block, not during it.

    A signal's handler runs wherever the main thread is; inside ``gc.collect()`` that
    can be a finalizer (pybids' SQLAlchemy objects have some), where Python prints the
    KeyboardInterrupt of :func:`_interrupt` and drops it: a SIGTERM then did not stop
    the run (seen once in 14 runs signalled in their first seconds).
    """
    if not hasattr(signal, "pthread_sigmask"):  # Windows
        yield
        return
    held = {signal.SIGTERM, signal.SIGINT}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "unknown error"
