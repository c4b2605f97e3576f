"""What every mriflow interface shares: errors that name the input, the step record."""

from __future__ import annotations

import functools
import re
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from nipype.interfaces.base import SimpleInterface, isdefined
from nipype.interfaces.io import add_traits

__all__ = [
    "MriflowInterface",
    "DynamicInputsInterface",
    "StepError",
    "step_record",
    "package_version",
]

# The inputs that say which image a step was working on, most specific first.
_INPUT_TRAITS = ("in_file", "source_file", "in_files", "reference_file", "mask_file")
# A message that already starts with a path ("/x/sub-01_T1w.nii.gz: ...") names its file.
_STARTS_WITH_PATH = re.compile(r"^\S*[/\\]\S*: ")


class StepError(RuntimeError):
    """A step failed; the message is one line: ``<input file>: <problem>``."""


class MriflowInterface(SimpleInterface):
    """A :class:`~nipype.interfaces.base.SimpleInterface` whose failures name their input.

    Any exception raised by a subclass's ``_run_interface`` becomes a :class:`StepError`
    of one line that starts with the image the step was working on (its ``in_file``,
    or the first of :data:`_INPUT_TRAITS` that is set), so that the crash file, the
    summary and the report all say which file failed and why, whatever step it was.
    The original exception stays chained (``__cause__``) in the crash file's traceback.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        run = cls.__dict__.get("_run_interface")
        if run is not None:
            cls._run_interface = _naming_failures(run)

    def _input_path(self) -> str | None:
        for name in _INPUT_TRAITS:
            value = getattr(self.inputs, name, None)
            if value is None or not isdefined(value):
                continue
            if isinstance(value, (list, tuple)):
                if not value:
                    continue
                value = value[0]
            return str(value)
        return None


class DynamicInputsInterface(MriflowInterface):
    """An interface whose workflow decides some input names (``fields``), one per
    connected output of the graph (their ``input_spec`` derives from
    ``DynamicTraitedSpec``). Dynamic inputs may also be given as keyword arguments."""

    def __init__(self, fields: list[str] | None = None, **inputs: Any) -> None:
        self._fields = list(fields or [])
        super().__init__(**{k: v for k, v in inputs.items() if k not in self._fields})
        add_traits(self.inputs, self._fields)
        for name in set(self._fields) & set(inputs):
            setattr(self.inputs, name, inputs[name])


def _naming_failures(run):
    @functools.wraps(run)
    def wrapped(self: MriflowInterface, runtime):
        try:
            return run(self, runtime)
        except StepError:
            raise
        except Exception as err:
            raise StepError(failure_message(err, self._input_path())) from err

    return wrapped


def failure_message(err: BaseException, path: str | None) -> str:
    """``"<path>: <problem>"`` in one line; the problem alone if it names a file already.

    Parameters
    ----------
    err : BaseException
        What the step raised.
    path : str or None
        The step's input image.
    """
    problem = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, OSError) and err.strerror and err.filename:
        # "[Errno 28] No space left on device: '/work/...'" reads better as cause + file
        problem = f"{err.strerror} (writing or reading {err.filename})"
    if path is None or _STARTS_WITH_PATH.match(problem):
        return problem
    return f"{path}: {problem}"


def package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def step_record(
    name: str,
    parameters: dict[str, Any],
    software: list[str] | tuple[str, ...] = (),
    *,
    input_report: Any = None,
) -> dict[str, Any]:
    """One entry of a sidecar's ``Steps`` list: what ran, with which parameters and versions.

    Every interface returns this as its ``step`` output; the derivatives sink
    writes the chain of them, in order, into the JSON sidecar of each image.

    Parameters
    ----------
    name : str
    parameters : dict
    software : sequence of str
        Packages whose versions are recorded (mriflow always is).
    input_report : mriflow.image.io.InputReport, optional
        What the step found and repaired in a raw input (non-finite voxels set to 0,
        header warnings); recorded as ``Input`` when there is anything to say.
    """
    record = {
        "Name": name,
        "Parameters": parameters,
        "Software": {pkg: package_version(pkg) for pkg in ("mriflow", *software)},
    }
    if input_report is not None and input_report.as_record():
        record["Input"] = input_report.as_record()
    return record
