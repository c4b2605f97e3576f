"""The one typed configuration object of mriflow.

Every step reads its parameters from a section of :class:`Config`. A config is
built from defaults, updated from a TOML file (``--config``) and then from CLI
flags, and written next to the outputs (``mriflow_config.toml``) so that a run
can be repeated exactly with ``mriflow ... --config OUT_DIR/mriflow_config.toml``.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

import tomli_w

from mriflow.image.intensity import IntensityMethod
from mriflow.image.template import TEMPLATE_SPACE

__all__ = [
    "Config",
    "ConfigError",
    "NATIVE_SPACE",
    "OutputSpace",
    "parse_output_space",
    "load_config",
    "validate_plugin_args",
    "PLUGINS",
]


class ConfigError(ValueError):
    """A configuration value or file is invalid; the message names the key."""


@dataclass
class SpatialConfig:
    """Reorientation and resampling (the ``conform`` step)."""

    voxel_size: float = 1.0
    """Isotropic output voxel size in mm."""
    image_interpolation: Literal["linear", "bspline"] = "linear"
    """Interpolation for intensity images; label maps and masks always use nearest."""
    reorient: bool = True
    """Reorient to RAS+ (closest canonical) before resampling."""


@dataclass
class DenoiseConfig:
    method: Literal["nlm", "ants", "skimage", "none"] = "nlm"
    """mriflow's vectorised non-local means (numpy; lower phantom error than ANTs' in
    about a tenth of the time, docs/anatomical.md), ANTs' adaptive NLM (as sMRIPrep),
    scikit-image NL-means, or off."""
    noise_model: Literal["Rician", "Gaussian"] = "Rician"
    patch_radius: int = 1
    """NLM patch radius in voxels (``nlm`` and ``ants``: DenoiseImage's -p)."""
    search_radius: int = 1
    """NLM search radius in voxels; DenoiseImage's default is 2, which was slower
    and no better on 1 mm phantoms (docs/anatomical.md)."""
    h_factor: float = 1.5
    """``nlm`` filtering strength, in units of the estimated noise sd."""
    order: Literal["before_n4", "after_n4"] = "before_n4"
    """sMRIPrep denoises before N4 (here: the native grid, before conforming; N4's field
    is fitted on the raw image meanwhile and then removed from the denoised one)."""


@dataclass
class N4Config:
    shrink_factor: int = 6
    """Fit on a copy subsampled by this factor per axis (6 mm on the conformed 1 mm
    grid): 2.5x faster than 4 for the same white-matter CV on T1_head and AOMIC's
    real head (docs/anatomical.md); the field is evaluated at full resolution."""
    iterations: list[int] = field(default_factory=lambda: [50, 50, 50, 50])
    convergence_threshold: float = 1e-3
    """SimpleITK's default: on 1 mm T1_head, 16 s against 26 s for sMRIPrep's 1e-7, same WM CV."""
    spline_distance_mm: float = 200.0
    """B-spline knot spacing of the bias field, as ANTs' default (mm)."""


@dataclass
class SkullStripConfig:
    method: Literal["auto", "deepbet", "template", "none"] = "auto"
    """``auto`` uses deepbet when it is importable, else the template backend."""
    detect_stripped: bool = True
    """Pass through inputs that are already skull-stripped instead of eroding them."""
    deepbet_threshold: float = 0.5
    deepbet_n_dilate: int = 0


@dataclass(frozen=True)
class OutputSpace:
    """One ``--output-spaces`` entry: ``T1w`` (native) or a template, maybe with ``res-``."""

    name: str
    """``T1w``, ``MNI152NLin2009aSym`` or the name of the user's template."""
    resolution: int | None = None
    """The ``res-`` entity (mm for the embedded template); ``None``: no entity, the
    template's default grid (``registration.template_resolution`` / the user's files)."""

    @property
    def native(self) -> bool:
        return self.name == NATIVE_SPACE

    @property
    def entities(self) -> dict[str, str]:
        """``{"space": ..., "resolution": ...}`` for the derivatives in this space."""
        res = {} if self.resolution is None else {"resolution": str(self.resolution)}
        return {"space": self.name, **res}

    def __str__(self) -> str:
        return self.name if self.resolution is None else f"{self.name}:res-{self.resolution}"


#: The subject's own (native, conformed) space in ``--output-spaces``.
NATIVE_SPACE = "T1w"

_TEMPLATE_FILE_KEYS = ("t1w", "mask", "gm", "wm", "csf")


def parse_output_space(text: str) -> OutputSpace:
    """``"MNI152NLin2009aSym:res-2"`` -> ``OutputSpace("MNI152NLin2009aSym", 2)`` (fMRIPrep syntax).

    Raises
    ------
    ValueError
        Not ``NAME`` or ``NAME:res-N`` with an alphanumeric name and an integer N.
    """
    name, *modifiers = text.strip().split(":")
    if not name.isalnum():
        raise ValueError(f"output space {text!r}: the name must be letters and digits")
    resolution = None
    for modifier in modifiers:
        key, sep, value = modifier.partition("-")
        if key != "res" or not sep or not value.isdigit() or int(value) < 1:
            raise ValueError(
                f"output space {text!r}: the only modifier mriflow knows is ':res-N' (N: 1, 2, ...)"
            )
        resolution = int(value)
    if name == NATIVE_SPACE and resolution is not None:
        raise ValueError(f"output space {text!r}: T1w (native) takes no resolution")
    return OutputSpace(name, resolution)


@dataclass
class RegistrationConfig:
    enabled: bool = True
    """Register to the template; off: native-space outputs only (no priors, no MNI files)."""
    template: str = TEMPLATE_SPACE
    """The registration target and ``space-`` name: the embedded ``MNI152NLin2009aSym``,
    or the name (letters and digits) of a template given by ``template_files``."""
    template_files: dict[str, str] = field(default_factory=dict)
    """A user template: ``t1w`` and ``mask`` (required), ``gm``, ``wm`` and ``csf``
    (optional tissue priors; CSF derived from the mask when GM and WM are given), NIfTI
    files on one grid. Used for registration, priors and the model-ready grid."""
    preset: Literal["fast", "precise"] = "fast"
    template_resolution: int = 1
    """Template grid (mm) of the MNI-space outputs: 1 or 2 (when ``output_spaces`` does
    not give one)."""
    output_spaces: list[str] = field(default_factory=list)
    """``--output-spaces``: ``T1w`` and the template, e.g. ``["MNI152NLin2009aSym:res-2",
    "T1w"]``. Empty: the template at ``template_resolution`` with no ``res-`` entity in the
    names (and native outputs). Native outputs are always written; the first template
    space is the model-ready grid."""

    def template_spaces(self) -> list[OutputSpace]:
        """The template spaces to write, first the model-ready one (``[]``: no registration)."""
        if not self.enabled:
            return []
        if not self.output_spaces:
            return [OutputSpace(self.template)]
        spaces = [parse_output_space(s) for s in self.output_spaces]
        return [s for s in spaces if not s.native]

    def space_resolution(self, space: OutputSpace) -> int | None:
        """Grid (mm) of the embedded template for ``space``; ``None`` for a user template."""
        if self.template_files:
            return None
        return space.resolution or self.template_resolution


@dataclass
class IntensityConfig:
    method: IntensityMethod = "zscore"
    minmax_range: list[float] = field(default_factory=lambda: [0.0, 1.0])
    percentiles: list[float] = field(default_factory=lambda: [0.5, 99.5])
    percentile_clip: bool = True
    whitestripe_width: float = 0.05
    n_bins: int = 64
    bin_edges: Literal["uniform", "quantile"] = "uniform"
    rmshe_level: int = 2
    clahe_kernel_size: int = 32
    clahe_clip_limit: float = 0.01
    nyul_percentiles: list[float] = field(
        default_factory=lambda: [1.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 99.0]
    )
    nyul_landmarks_file: str = ""
    """A saved Nyúl standard scale to apply at participant level (empty: none)."""


@dataclass
class SegmentationConfig:
    method: Literal["hmrf", "gmm", "atropos", "none"] = "hmrf"
    """FAST's model (HMRF-EM + partial volumes, numpy): measured best on a real head with
    FAST and FreeSurfer labels (AOMIC) and 10x faster than Atropos (docs/anatomical.md)."""
    use_priors: bool = False
    """Use the template's tissue maps, warped to the subject, as priors. Off: on the real
    AOMIC head they lowered the Dice (hmrf and Atropos alike); they only help on templates."""
    mrf_beta: float = 1.0
    """hmrf: Potts MRF strength (log-odds when all neighbours agree)."""
    hmrf_iterations: int = 6
    """hmrf: EM iterations (fixed, as FAST; more drift towards FAST's labels, away from aseg)."""
    pv_beta: float = 0.3
    """hmrf: neighbours' weight on the partial-volume fractions before the argmax."""
    csf_hull_mm: float = 7.0
    """hmrf: CSF beyond the closing of GM+WM by this ball (the mask's dark rim) is label 0."""
    mrf_weight: float = 0.3
    """Atropos MRF smoothing (ANTs' default 0.3 measured better than 0.2 here)."""
    n_iterations: int = 3
    """Atropos EM iterations (as antsBrainExtraction); 5 took 60 % longer for the same Dice."""
    prior_weight: float = 0.25
    """Weight of the template priors (Atropos: in the posterior; hmrf: their exponent)."""
    clip_percentiles: list[float] = field(default_factory=lambda: [1.0, 99.0])
    """Robust in-mask intensity window: outliers (enhancing vessels) join the nearest tissue."""


@dataclass
class ExportConfig:
    target_shape: list[int] = field(default_factory=lambda: [160, 192, 160])
    crop_margin_mm: float = 10.0
    fit: Literal["crop_or_pad", "resize"] = "crop_or_pad"
    """Keep 1 mm voxels and crop/pad to the shape, or resample the brain box to it."""
    slices: bool = True
    """Write 2D slices of the model-ready MNI-space volume."""
    slice_axes: list[Literal["axial", "coronal", "sagittal"]] = field(
        default_factory=lambda: ["axial"]
    )
    min_brain_fraction: float = 0.05
    slice_format: Literal["stack", "png", "npy"] = "stack"
    """``stack``: one memory-mappable .npy per axis and kind (few files per subject, values
    unscaled); ``png``/``npy``: one file per slice (hundreds per subject)."""
    png_bit_depth: Literal[8, 16] = 16
    channel_layout: Literal["files", "stacked"] = "files"
    """A session's model-ready channels (the reference T1w and its aligned contrasts):
    ``files``, one aligned 3D volume per channel (``desc-model_<suffix>``); ``stacked``,
    also one 4D volume of them, channels last (``desc-model_channels``, order in its
    sidecar's ``Channels``: the reference, then ``coregistration.channels`` or the
    session's order; a session lacking one of ``coregistration.channels`` gets no
    stack, with a warning), which the group manifest then lists as ``image``
    (docs/sessions.md)."""


@dataclass
class CoregistrationConfig:
    """Every other image of a session aligned to its reference T1w (docs/anatomical.md)."""

    transform: Literal["rigid", "affine"] = "rigid"
    """Rigid within a session; affine also absorbs scaling differences between sequences."""
    initialisation: Literal["auto", "header", "moments"] = "auto"
    """``auto``: start from the headers and from aligned centres of mass, keep the better."""
    reference: str = ""
    """Entities that pick the reference T1w of a session (e.g. ``"acq-mprage"``, ``"run-2"``);
    empty: the T1w without ``ce-`` with the finest voxels, then the lowest run."""
    channels: list[str] = field(default_factory=list)
    """Channels of the multi-channel export besides the reference T1w, in order (e.g.
    ``["T2w", "FLAIR"]``): sessions lacking one are left out of the manifest, with a
    warning. Empty: the channels every session has (others left out, with a warning)."""


@dataclass
class LongitudinalConfig:
    align: bool = False
    """With several sessions: register each later session's reference T1w rigidly to the
    first session's and publish it on that grid too (``space-longitudinal``)."""


@dataclass
class SplitConfig:
    fractions: list[float] = field(default_factory=lambda: [0.7, 0.15, 0.15])
    n_folds: int = 0
    """0 for a train/val/test split by ``fractions``; k > 1 for k folds."""
    stratify_by: str = ""
    group_by: str = ""
    stratify_bins: int = 0
    """> 1: bin a numeric ``stratify_by`` column (e.g. age) into this many quantile classes."""


#: Nipype plugins mriflow can run under (``--plugin``).
PLUGINS = (
    "Linear",
    "MultiProc",
    "LegacyMultiProc",
    "SLURM",
    "SLURMGraph",
    "SGE",
    "SGEGraph",
    "PBS",
    "PBSGraph",
    "LSF",
    "OAR",
    "Condor",
    "CondorDAGMan",
)

#: Every plugin argument mriflow passes on, with its type. Nipype reads more (a Python
#: ``status_callback``, ...), none of which can come from a command line or a file.
_PLUGIN_ARG_TYPES: dict[str, Any] = {
    "n_procs": int,
    "n_gpu_procs": int,
    "memory_gb": float,
    "raise_insufficient": bool,
    "non_daemon": bool,
    "maxtasksperchild": int,
    "mp_context": Literal["fork", "spawn", "forkserver"],
    "scheduler": Literal["tsort", "mem_thread"],
    "max_jobs": int,
    "max_jobname_len": int,
    "max_tries": int,
    "retry_timeout": float,
    "dont_resubmit_completed_jobs": bool,
    "overwrite": bool,
    "template": Path,
    "jobid_re": str,
    "sbatch_args": "shell",
    "qsub_args": "shell",
    "bsub_args": "shell",
    "oarsub_args": "shell",
    "submit_specs": "shell",
}

# Nipype's batch plugins run ``sbatch <args> script`` through a shell: an argument may
# hold option words, not commands. Letters, digits and ``_-=:,./@%+[]`` and spaces only
# (``--time=1:00:00 -p short --exclude=node[01-04]`` passes; ``;|&$`<>(){}'"\`` do not).
_SHELL_SAFE = re.compile(r"[A-Za-z0-9_\-=:,./@%+\[\] ]*")


@dataclass
class ExecutionConfig:
    """How the workflow runs. Only ``omp_nthreads`` and ``reproducible`` can change
    outputs (ITK steps are not bit-reproducible across thread counts; see docs/parallel.md)."""

    nprocs: int = 0
    """Processes for MultiProc (0: all cores)."""
    omp_nthreads: int = 1
    """Threads per node for ITK/ANTs/BLAS."""
    reproducible: bool = True
    """Run the steps that cannot repeat their output with several threads (registration,
    co-registration, ANTs denoising) on one thread whatever ``omp_nthreads`` is, so a
    rerun gives the same bytes; ``false`` trades that for speed."""
    mem_gb: float = 0.0
    """Memory available to MultiProc (0: let Nipype decide)."""
    plugin: str = "MultiProc"
    """Nipype plugin, one of :data:`PLUGINS`."""
    plugin_args: dict[str, Any] = field(default_factory=dict)
    """Plugin arguments, validated (types; no shell metacharacters in ``sbatch_args``,
    ``qsub_args``, ...). Given with ``--plugin-args`` only: never written into
    ``mriflow_config.toml`` and refused in a ``--config`` file, since the batch plugins
    pass them to a shell and a config file is meant to be shared and reused."""
    stop_on_first_crash: bool = False


@dataclass
class DefaceConfig:
    """Removing the face and ears of every head image mriflow publishes (``--deface``)."""

    enabled: bool = False
    """Deface the T1w's native and template-space ``desc-preproc`` heads and what derives
    from them (model-ready volumes); brain voxels never change (docs/defacing.md)."""
    margin_mm: float = 5.0
    """Distance kept between the brain mask and anything removed."""


@dataclass
class Config:
    """All parameters of an mriflow run, one section per step."""

    seed: int = 42
    """Seed of every random step (registration sampling, Atropos, GMM, splits)."""
    spatial: SpatialConfig = field(default_factory=SpatialConfig)
    denoise: DenoiseConfig = field(default_factory=DenoiseConfig)
    n4: N4Config = field(default_factory=N4Config)
    skull_strip: SkullStripConfig = field(default_factory=SkullStripConfig)
    registration: RegistrationConfig = field(default_factory=RegistrationConfig)
    intensity: IntensityConfig = field(default_factory=IntensityConfig)
    segmentation: SegmentationConfig = field(default_factory=SegmentationConfig)
    deface: DefaceConfig = field(default_factory=DefaceConfig)
    coregistration: CoregistrationConfig = field(default_factory=CoregistrationConfig)
    longitudinal: LongitudinalConfig = field(default_factory=LongitudinalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    execution: ExecutionConfig = field(default_factory=ExecutionConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        """The config as TOML, without ``execution.plugin_args`` (see :class:`ExecutionConfig`)."""
        values = self.to_dict()
        values["execution"].pop("plugin_args", None)
        return tomli_w.dumps(values)

    def write(self, path: str | Path) -> Path:
        """Write the resolved config as TOML (atomically), plugin arguments left out."""
        from mriflow.bids.derivatives import atomic_write_text

        return atomic_write_text(Path(path), self.to_toml())

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Config:
        config = cls()
        config.update(values)
        return config

    def update(self, values: dict[str, Any], *, source: str = "config") -> Config:
        """Update in place from a nested mapping, validating every key and value."""
        _update_dataclass(self, values, prefix="", source=source)
        if "registration" in values:
            _check_spaces(self.registration, source)
        return self

    def set(self, dotted_key: str, value: Any, *, source: str = "command line") -> None:
        """Set one value by its dotted key, e.g. ``set("spatial.voxel_size", 2.0)``."""
        *sections, key = dotted_key.split(".")
        nested: dict[str, Any] = {key: value}
        for section in reversed(sections):
            nested = {section: nested}
        self.update(nested, source=source)

    def section_dict(self, name: str) -> dict[str, Any]:
        return dataclasses.asdict(getattr(self, name))


def load_config(path: str | Path | None = None) -> Config:
    """Defaults, updated from a TOML file when one is given."""
    config = Config()
    if path is None:
        return config
    path = Path(path)
    try:
        values = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML ({err})") from None
    execution = values.get("execution")
    if isinstance(execution, dict) and "plugin_args" in execution:
        # a shared or reused file must not run commands on whoever uses it (sbatch_args
        # reach a shell): plugin arguments come from the command line only
        raise ConfigError(
            f"{path}: 'execution.plugin_args' is not read from config files; "
            "give plugin arguments with --plugin-args"
        )
    return config.update(values, source=str(path))


def validate_plugin_args(args: dict[str, Any], *, source: str = "config") -> dict[str, Any]:
    """Check Nipype plugin arguments: known keys, types, no shell metacharacters.

    Parameters
    ----------
    args : dict
        ``execution.plugin_args``.
    source : str
        Where they came from, for the message.

    Returns
    -------
    dict
        The arguments, numbers and booleans coerced (``"4"`` -> ``4``).

    Raises
    ------
    ConfigError
        One line naming the key and the problem.
    """
    checked: dict[str, Any] = {}
    for key, value in args.items():
        dotted = f"execution.plugin_args.{key}"
        kind = _PLUGIN_ARG_TYPES.get(key)
        if kind is None:
            known = ", ".join(sorted(_PLUGIN_ARG_TYPES))
            raise ConfigError(f"{source}: unknown plugin argument '{key}' (known: {known})")
        if kind == "shell":
            if not isinstance(value, str):
                raise ConfigError(f"{source}: '{dotted}' must be a string, got {value!r}")
            if not _SHELL_SAFE.fullmatch(value):
                bad = next(c for c in value if not _SHELL_SAFE.fullmatch(c))
                raise ConfigError(
                    f"{source}: '{dotted}' contains {bad!r}: only option words are allowed "
                    "(letters, digits, spaces and _-=:,./@%+[]), since the batch plugin "
                    "passes them to a shell"
                )
            checked[key] = value
        elif kind is Path:
            if not isinstance(value, str) or not Path(value).is_file():
                raise ConfigError(f"{source}: '{dotted}' must be an existing file, got {value!r}")
            checked[key] = value
        else:
            checked[key] = _coerce(value, kind, dotted, source)
        if kind in (int, float) and checked[key] <= 0:
            raise ConfigError(f"{source}: '{dotted}' must be positive, got {value!r}")
    return checked


def _update_dataclass(obj: Any, values: dict[str, Any], *, prefix: str, source: str) -> None:
    hints = get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            known = ", ".join(sorted(names))
            raise ConfigError(f"{source}: unknown setting '{dotted}' (known here: {known})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: '{dotted}' must be a table of settings")
            _update_dataclass(current, value, prefix=f"{dotted}.", source=source)
        else:
            value = _coerce(value, hints[key], dotted, source)
            if isinstance(obj, ExecutionConfig):
                value = _check_execution(key, value, source)
            if isinstance(obj, RegistrationConfig):
                value = _check_registration(key, value, source)
            setattr(obj, key, value)


def _check_registration(key: str, value: Any, source: str) -> Any:
    if key == "template_files":
        unknown = sorted(set(value) - set(_TEMPLATE_FILE_KEYS))
        if unknown:
            raise ConfigError(
                f"{source}: 'registration.template_files' has unknown key(s) {', '.join(unknown)} "
                f"(known: {', '.join(_TEMPLATE_FILE_KEYS)})"
            )
        # absolute, so the written mriflow_config.toml works from any folder
        return {k: str(Path(str(v)).expanduser().resolve()) for k, v in value.items()}
    if key == "output_spaces":
        for text in value:
            try:
                parse_output_space(text)
            except ValueError as err:
                raise ConfigError(f"{source}: 'registration.output_spaces': {err}") from None
    return value


def _check_spaces(reg: RegistrationConfig, source: str) -> None:
    """The template and output spaces together: anything mriflow cannot honour is refused
    (one line), so no run silently writes another space than the one asked for."""
    from mriflow.bids.templateflow import templateflow_files
    from mriflow.image.template import TEMPLATE_RESOLUTIONS, TemplateError, check_template_files

    spaces = [parse_output_space(s) for s in reg.output_spaces]
    named = {s.name for s in spaces if not s.native}
    if not reg.template_files and reg.template == TEMPLATE_SPACE and len(named) == 1:
        # ``--output-spaces MNI152NLin2009cAsym``: the one template asked for is the
        # registration target, when TemplateFlow's cache holds it
        (other,) = named
        if other != TEMPLATE_SPACE and templateflow_files(other):
            reg.template = other
    if not reg.template_files and reg.template != TEMPLATE_SPACE:
        # a template already in TemplateFlow's local cache is used as files (never fetched);
        # the resolved paths are written to mriflow_config.toml, so a rerun uses the same
        reg.template_files = templateflow_files(reg.template) or {}
    if reg.template_files:
        if not reg.template.isalnum() or reg.template in (TEMPLATE_SPACE, NATIVE_SPACE):
            raise ConfigError(
                f"{source}: 'registration.template' = {reg.template!r}: a template given as "
                "files needs its own name (letters and digits, not "
                f"{TEMPLATE_SPACE} or {NATIVE_SPACE}), used as its space label"
            )
        try:
            check_template_files(reg.template_files)
        except TemplateError as err:
            raise ConfigError(f"{source}: 'registration.template_files': {err}") from None
    elif reg.template != TEMPLATE_SPACE:
        raise ConfigError(
            f"{source}: 'registration.template' = {reg.template!r} is not supported: mriflow "
            f"registers to its embedded {TEMPLATE_SPACE}, to a template given as files "
            "(registration.template_files: t1w, mask[, gm, wm, csf]) or to one already in "
            "TemplateFlow's cache (TEMPLATEFLOW_HOME: its res-01 T1w and brain mask are not "
            "there); it never downloads one"
        )
    if reg.template_resolution not in TEMPLATE_RESOLUTIONS:
        raise ConfigError(
            f"{source}: 'registration.template_resolution' = {reg.template_resolution!r}: "
            f"the embedded {TEMPLATE_SPACE} has {' and '.join(map(str, TEMPLATE_RESOLUTIONS))} mm"
        )
    seen: set[tuple[str, int | None]] = set()
    for space in spaces:
        where = f"{source}: output space '{space}'"
        if (space.name, space.resolution) in seen:
            raise ConfigError(f"{where} is given twice")
        seen.add((space.name, space.resolution))
        if space.native:
            continue
        if space.name != reg.template:
            raise ConfigError(
                f"{where}: mriflow registers once, to registration.template = "
                f"{reg.template!r}; other templates are not available offline"
                + ("" if reg.template_files else " (give one as registration.template_files)")
            )
        if reg.template_files and space.resolution is not None:
            raise ConfigError(
                f"{where}: a template given as files has one grid, its own; drop ':res-'"
            )
        if not reg.template_files and space.resolution not in (None, *TEMPLATE_RESOLUTIONS):
            raise ConfigError(
                f"{where}: the embedded {TEMPLATE_SPACE} has res-1 and res-2 (1 and 2 mm) only"
            )
    if spaces and not reg.enabled and any(not s.native for s in spaces):
        raise ConfigError(
            f"{source}: template output spaces need registration (registration.enabled = false)"
        )


def _check_execution(key: str, value: Any, source: str) -> Any:
    if key == "plugin_args":
        return validate_plugin_args(value, source=source)
    if key == "plugin" and value not in PLUGINS:
        raise ConfigError(
            f"{source}: 'execution.plugin' = {value!r} is not one of {', '.join(PLUGINS)}"
        )
    return value


def _coerce(value: Any, hint: Any, dotted: str, source: str) -> Any:
    origin = get_origin(hint)
    if origin is Literal:
        allowed = get_args(hint)
        if value not in allowed:
            # CLI strings such as "16" for a Literal[8, 16]
            for candidate in allowed:
                if str(candidate) == str(value):
                    return candidate
            choices = ", ".join(repr(a) for a in allowed)
            raise ConfigError(f"{source}: '{dotted}' = {value!r} is not one of {choices}")
        return value
    if origin is list:
        (item_hint,) = get_args(hint)
        if isinstance(value, str):
            value = [v for v in value.replace(",", " ").split() if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: '{dotted}' must be a list, got {value!r}")
        return [_coerce(v, item_hint, f"{dotted}[]", source) for v in value]
    if origin is dict or hint is dict or origin is typing.Union:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{dotted}' must be a table, got {value!r}")
        return dict(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {"true", "yes", "1", "on"}:
            return True
        if isinstance(value, str) and value.lower() in {"false", "no", "0", "off"}:
            return False
        raise ConfigError(f"{source}: '{dotted}' must be true or false, got {value!r}")
    if hint in (int, float, str):
        if hint is int and isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"{source}: '{dotted}' must be an integer, got {value!r}")
        try:
            return hint(value)
        except (TypeError, ValueError):
            raise ConfigError(
                f"{source}: '{dotted}' must be {hint.__name__}, got {value!r}"
            ) from None
    return value
