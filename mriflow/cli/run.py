"""The ``mriflow`` command: a BIDS App (``mriflow BIDS_DIR OUT_DIR participant|group``).

Exit codes follow the BIDS App convention: 0 when every selected subject
succeeded, 1 when any failed (the others are still written), 2 on usage errors.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

# Nipype asks a web service for its latest version at import unless told not to;
# mriflow must work offline.
os.environ.setdefault("NIPYPE_NO_ET", "1")

from mriflow import __version__  # noqa: E402
from mriflow.cli.errors import EXIT_USAGE, UsageError  # noqa: E402
from mriflow.config import Config, ConfigError, load_config  # noqa: E402

__all__ = ["main", "build_parser"]

log = logging.getLogger("mriflow")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mriflow",
        description=(
            "Fast, offline preprocessing of anatomical brain MRI to ML-ready BIDS derivatives. "
            "DICOM conversion: 'mriflow convert --help'."
        ),
        formatter_class=RealDefaultsHelpFormatter,
    )
    parser.add_argument("bids_dir", type=Path, help="the raw BIDS dataset")
    parser.add_argument("output_dir", type=Path, help="where the derivatives are written")
    parser.add_argument("analysis_level", choices=["participant", "group"], help="processing stage")
    parser.add_argument("--version", action="version", version=f"mriflow {__version__}")

    select = parser.add_argument_group("selecting data")
    select.add_argument(
        "--participant-label",
        "--participant_label",
        nargs="+",
        metavar="LABEL",
        help="subjects to process, with or without 'sub-' (default: all)",
    )
    select.add_argument(
        "--session-label", nargs="+", metavar="LABEL", help="sessions to process (default: all)"
    )
    select.add_argument(
        "--bids-filter-file",
        type=Path,
        metavar="FILE",
        help="JSON queries per suffix choosing the images (fMRIPrep's format), e.g. "
        '\'{"t1w": {"acquisition": null, "session": "1"}}\'',
    )
    select.add_argument(
        "--bids-database-dir",
        type=Path,
        metavar="DIR",
        help="pybids index of BIDS_DIR: built on first use, then reused (no walk of the tree)",
    )

    run = parser.add_argument_group("execution")
    run.add_argument("-w", "--work-dir", type=Path, default=Path("work"), help="Nipype work dir")
    run.add_argument("--nprocs", "--nthreads", type=int, help="processes (0: all cores)")
    run.add_argument("--omp-nthreads", type=int, help="threads per step (ITK/ANTs/BLAS)")
    run.add_argument(
        "--mem-gb", type=float, help="memory available to the run (GB; 0: let Nipype decide)"
    )
    run.add_argument("--plugin", help="Nipype plugin: MultiProc, Linear, SLURM, SLURMGraph, ...")
    run.add_argument(
        "--plugin-args",
        help='plugin arguments as JSON (\'{"sbatch_args": "-p short"}\') or a JSON/TOML file',
    )
    run.add_argument(
        "--stop-on-first-crash", action="store_true", default=None, help="abort at first error"
    )

    cluster = parser.add_argument_group(
        "cluster job arrays (one task per subject; docs/parallel.md); state: 'mriflow status OUT'"
    )
    cluster.add_argument(
        "--submit",
        choices=["slurm"],
        help="submit the participant level as one Slurm job array and return",
    )
    cluster.add_argument(
        "--submit-args",
        metavar="ARGS",
        help="extra sbatch options, written with '=': --submit-args='-p short --time=2:00:00'",
    )
    cluster.add_argument(
        "--max-parallel", type=int, metavar="N", help="array tasks running at once (--array=1-N%%M)"
    )
    cluster.add_argument(
        "--group-after", action="store_true", help="queue the group level after the array"
    )
    cluster.add_argument(
        "--only-failed",
        action="store_true",
        help="submit only subjects without a result or with a failed one in OUT_DIR",
    )

    conf = parser.add_argument_group("configuration (defaults < --config file < flags)")
    conf.add_argument(
        "--config", type=Path, help="TOML config, e.g. a previous mriflow_config.toml"
    )
    conf.add_argument("--voxel-size", type=float, help="isotropic voxel size in mm")
    conf.add_argument("--seed", type=int, help="seed of every random step")
    conf.add_argument(
        "--deface",
        action="store_true",
        default=None,
        help="remove face and ears from every published head image (deface.enabled)",
    )
    conf.add_argument(
        "--output-spaces",
        nargs="+",
        metavar="SPACE[:res-N]",
        help="spaces of the outputs, fMRIPrep's syntax: T1w (native, always written), "
        "MNI152NLin2009aSym[:res-1|:res-2], or the name of a template given as files "
        "(registration.template_files); the first template space is the model-ready grid "
        "(registration.output_spaces; default: MNI152NLin2009aSym at "
        "registration.template_resolution, names without res-)",
    )
    conf.add_argument(
        "--nyul-landmarks",
        type=Path,
        help="apply this Nyul standard (nyul_standard.json of a group run) as the normalization",
    )
    conf.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="set any config value, e.g. --set n4.shrink_factor=2 (repeatable)",
    )

    app = parser.add_argument_group("BIDS-App actions (docs/usage.md)")
    app.add_argument(
        "--skip-bids-validation",
        "--skip_bids_validation",
        action="store_true",
        help="do not validate BIDS_DIR (bids-validator-deno, else pybids) before the run",
    )
    app.add_argument(
        "--boilerplate",
        "--boilerplate-only",
        "--boilerplate_only",
        action="store_true",
        help="write the methods text (OUT_DIR/logs/CITATION.md, .bib) for this configuration "
        "and exit without processing",
    )
    app.add_argument(
        "--reports-only",
        "--reports_only",
        action="store_true",
        help="rebuild the QC reports (HTML, IQMs, provenance) of OUT_DIR's published "
        "subjects, run no processing step",
    )
    app.add_argument(
        "--write-graph",
        "--write_graph",
        action="store_true",
        help="write the workflow graph (.dot, and .svg with graphviz) to OUT_DIR/logs and "
        "exit without processing",
    )

    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-v", "--verbose", action="count", default=0, help="more output")
    verbosity.add_argument("-q", "--quiet", action="store_true", help="errors and summary only")
    _show_config_defaults(parser)
    return parser


#: Flags whose default is the config's: their argparse default stays None (a flag that
#: is not given must not override --config), so the help shows the config's value.
CONFIG_FLAGS = {
    "voxel_size": "spatial.voxel_size",
    "seed": "seed",
    "nprocs": "execution.nprocs",
    "omp_nthreads": "execution.omp_nthreads",
    "mem_gb": "execution.mem_gb",
    "plugin": "execution.plugin",
}


class RealDefaultsHelpFormatter(argparse.HelpFormatter):
    """Shows ``(default: X)`` only where there is a default worth reading.

    argparse's ``ArgumentDefaultsHelpFormatter`` prints ``(default: None)`` for every
    option without one, and for flags whose real default lives in the config.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "default" in text
            or default in (None, False, [], argparse.SUPPRESS)
            # a flag's default is its absence (``--no-verify``: "default: True" misleads)
            or isinstance(action, (argparse._CountAction, argparse._StoreConstAction))
        ):
            return text
        return f"{text} (default: %(default)s)"


def _show_config_defaults(parser: argparse.ArgumentParser) -> None:
    """Append the config's default value to the help of each :data:`CONFIG_FLAGS` flag."""
    defaults = Config()
    for action in parser._actions:
        key = CONFIG_FLAGS.get(action.dest)
        if key is None:
            continue
        value = defaults
        for part in key.split("."):
            value = getattr(value, part)
        action.help = f"{action.help} (default: {value})"


def resolve_config(args: argparse.Namespace) -> Config:
    """Defaults, then ``--config``, then flags; a bad value is a usage error."""
    try:
        config = load_config(args.config)
        flags = {
            "spatial.voxel_size": args.voxel_size,
            "seed": args.seed,
            "deface.enabled": args.deface,
            "registration.output_spaces": args.output_spaces,
            "execution.nprocs": args.nprocs,
            "execution.omp_nthreads": args.omp_nthreads,
            "execution.mem_gb": args.mem_gb,
            "execution.plugin": args.plugin,
            "execution.stop_on_first_crash": args.stop_on_first_crash,
        }
        for key, value in flags.items():
            if value is not None:
                config.set(key, value)
        if args.nyul_landmarks:
            if not args.nyul_landmarks.is_file():
                raise ConfigError(f"--nyul-landmarks {args.nyul_landmarks}: file not found")
            config.set("intensity.method", "nyul")
            config.set("intensity.nyul_landmarks_file", str(args.nyul_landmarks.resolve()))
        if args.plugin_args:
            plugin_args = _parse_plugin_args(args.plugin_args)
            config.set("execution.plugin_args", plugin_args, source="--plugin-args")
        for override in args.overrides:
            key, sep, value = override.partition("=")
            if not sep:
                raise ConfigError(f"--set {override!r}: expected SECTION.KEY=VALUE")
            config.set(key.strip(), value.strip(), source=f"--set {override}")
    except ConfigError as err:
        raise UsageError(str(err)) from None
    return config


def _parse_plugin_args(text: str) -> dict:
    path = Path(text)
    if path.is_file():
        if path.suffix == ".toml":
            from mriflow.config import tomllib

            return tomllib.loads(path.read_text())
        text = path.read_text()
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"--plugin-args: not JSON nor a JSON/TOML file ({err})") from None
    if not isinstance(value, dict):
        raise ConfigError("--plugin-args: expected a JSON object")
    return value


def check_paths(args: argparse.Namespace) -> tuple[Path, Path, Path]:
    bids_dir = args.bids_dir.resolve()
    out_dir = args.output_dir.resolve()
    work_dir = args.work_dir.resolve()
    if not bids_dir.is_dir():
        raise UsageError(f"BIDS_DIR {args.bids_dir} does not exist or is not a folder")
    if out_dir == bids_dir or bids_dir in out_dir.parents:
        raise UsageError(
            f"OUT_DIR {args.output_dir} is inside BIDS_DIR {args.bids_dir}: "
            "write derivatives outside the raw dataset (e.g. next to it)"
        )
    if work_dir == bids_dir or bids_dir in work_dir.parents:
        raise UsageError(f"--work-dir {args.work_dir} is inside BIDS_DIR {args.bids_dir}")
    return bids_dir, out_dir, work_dir


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    logging.basicConfig(format="%(message)s", level=level, stream=sys.stderr, force=True)
    from nipype import logging as nlogging

    nipype_level = "INFO" if verbose else "WARNING"
    if quiet:
        nipype_level = "CRITICAL"
    for name in ("nipype.workflow", "nipype.interface", "nipype.utils"):
        nlogging.getLogger(name).setLevel(nipype_level)
    logging.getLogger("bidsschematools").setLevel(logging.WARNING)


def _set_thread_env(omp_nthreads: int) -> None:
    # every thread pool (OpenMP, BLAS, ITK, torch), inherited by workers and cluster jobs
    from mriflow.execution import set_thread_environment

    set_thread_environment(max(1, omp_nthreads))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "convert":
        return _convert(argv[1:])
    positional = [a for a in argv if not a.startswith("-")]
    if len(positional) == 2 and "status" in argv[:2]:
        return _status(argv)
    parser = build_parser()
    args = parser.parse_args(argv)  # exits 2 on bad usage
    held = ExitStack()  # the OUT_DIR lock, released when the run ends
    try:
        config = resolve_config(args)
        bids_dir, out_dir, work_dir = check_paths(args)
        _setup_logging(args.verbose, args.quiet)
        _set_thread_env(config.execution.omp_nthreads)
        from mriflow.execution import prepare_batch_environment

        prepare_batch_environment(config.execution.plugin)  # $LOGNAME for batch plugins
        build_only = _check_actions(args)
        if args.analysis_level == "participant" and not (build_only or args.reports_only):
            if not args.skip_bids_validation:
                _validate(bids_dir, args.participant_label, args.bids_database_dir)
        if args.submit:
            return _submit(args, bids_dir, out_dir, work_dir, config)
        from mriflow.cli.preflight import config_key, preflight

        # writable; runs with another config into the same OUT_DIR are refused
        held.enter_context(preflight(out_dir, work_dir, share_key=config_key(config)))
        if args.reports_only:
            from mriflow.cli.reports_only import rebuild_reports

            return rebuild_reports(out_dir, work_dir, args.participant_label)
        if args.analysis_level == "participant":
            from mriflow.cli.participant import run_participant

            return run_participant(
                bids_dir=bids_dir,
                out_dir=out_dir,
                work_dir=work_dir,
                config=config,
                participant_labels=args.participant_label,
                session_labels=args.session_label,
                database_dir=args.bids_database_dir,
                bids_filter_file=args.bids_filter_file,
                build_only=build_only,
                show_progress=not args.quiet,
            )
        from mriflow.cli.group import run_group

        return run_group(
            bids_dir=bids_dir,
            out_dir=out_dir,
            work_dir=work_dir,
            config=config,
            participant_labels=args.participant_label,
        )
    except UsageError as err:
        print(f"mriflow: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        held.close()


def _check_actions(args: argparse.Namespace) -> str | None:
    """The one participant-level action asked for instead of a run, if any."""
    actions = {
        "--boilerplate": args.boilerplate,
        "--write-graph": args.write_graph,
        "--reports-only": args.reports_only,
        "--submit": bool(args.submit),
    }
    given = [flag for flag, on in actions.items() if on]
    if len(given) > 1:
        raise UsageError(f"{' and '.join(given)} cannot be combined: give one of them")
    if given and args.analysis_level != "participant" and given[0] != "--submit":
        raise UsageError(f"{given[0]} belongs to the participant level")
    if args.boilerplate:
        return "boilerplate"
    return "graph" if args.write_graph else None


def _validate(
    bids_dir: Path, participant_labels: list[str] | None, database_dir: Path | None = None
) -> None:
    """Refuse an invalid BIDS_DIR in one line (exit 2); only the selected subjects count.

    With ``--bids-database-dir``, a dataset that passed once as a whole is not validated
    again by the jobs that reuse the database (the validator reads the whole tree: a
    second or more per job on large datasets).
    """
    from mriflow.bids.discovery import VALIDATED_FILENAME
    from mriflow.cli.validation import format_issues, validate_bids_dir

    marker = Path(database_dir) / VALIDATED_FILENAME if database_dir else None
    if marker is not None and marker.is_file():
        log.info("mriflow: BIDS_DIR validated before (%s); not validated again", marker)
        return
    checker, errors = validate_bids_dir(bids_dir, participant_labels)
    if errors:
        raise UsageError(format_issues(bids_dir, checker, errors))
    log.debug("mriflow: BIDS_DIR validated by %s", checker)
    if marker is not None and not participant_labels:
        from mriflow.bids.paths import atomic_write_json

        marker.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(marker, {"BIDSDir": str(bids_dir), "Checker": checker})


def _submit(args, bids_dir: Path, out_dir: Path, work_dir: Path, config: Config) -> int:
    from mriflow.bids.discovery import DiscoveryError
    from mriflow.cli.submit import SubmitError, submit_participant

    if args.analysis_level != "participant":
        raise UsageError("--submit runs the participant level (add --group-after for the group)")
    try:
        return submit_participant(
            bids_dir=bids_dir,
            out_dir=out_dir,
            work_dir=work_dir,
            config=config,
            participant_labels=args.participant_label,
            session_labels=args.session_label,
            database_dir=args.bids_database_dir,
            bids_filter_file=args.bids_filter_file,
            submit_args=args.submit_args,
            max_parallel=args.max_parallel,
            group_after=args.group_after,
            only_failed=args.only_failed,
        )
    except (SubmitError, DiscoveryError) as err:
        raise UsageError(str(err)) from None


def _status(argv: list[str]) -> int:
    """``mriflow status OUT`` or ``mriflow OUT status``: per-subject ok/failed/pending."""
    from mriflow.cli.submit import SubmitError, run_status

    parser = argparse.ArgumentParser(
        prog="mriflow status",
        description="Per-subject state (ok, failed, pending, missing) of the runs and "
        "submissions recorded in OUT_DIR/logs; exit 0 when every subject is ok.",
    )
    parser.add_argument("output_dir", type=Path, help="the derivatives folder")
    args = parser.parse_args([a for a in argv[:2] if a != "status"] + argv[2:])
    logging.basicConfig(format="%(message)s", level=logging.WARNING, stream=sys.stderr)
    try:
        return run_status(args.output_dir)
    except SubmitError as err:
        print(f"mriflow: error: {err}", file=sys.stderr)
        return EXIT_USAGE


def _convert(argv: list[str]) -> int:
    from mriflow.cli.convert import add_convert_arguments, run_convert

    parser = argparse.ArgumentParser(
        prog="mriflow convert",
        description="Convert a folder of DICOM files into a BIDS raw dataset.",
        formatter_class=RealDefaultsHelpFormatter,
    )
    add_convert_arguments(parser)
    return run_convert(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
