"""The one typed configuration object of mriflow.

Every step reads its parameters from a section of :class:`Config`. A config is
built from defaults, updated from a TOML file (``--config``) and then from CLI
flags, and written next to the outputs (``mriflow_config.toml``) so that a run
can be repeated exactly with ``mriflow ... --config OUT_DIR/mriflow_config.toml``.
"""

from __future__ import annotations

import dataclasses
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

__all__ = [
    "Config",
    "ConfigError",
    "load_config",
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


@dataclass
class RegistrationConfig:
    enabled: bool = True
    """Register to the template; off: native-space outputs only (no priors, no MNI files)."""
    template: str = "MNI152NLin2009aSym"
    preset: Literal["fast", "precise"] = "fast"
    template_resolution: int = 1
    """Template grid (mm) of the MNI-space outputs: 1 or 2."""


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
    method: Literal["gmm", "atropos", "none"] = "atropos"
    """Atropos with template priors measured best (docs/intensity.md)."""
    use_priors: bool = True
    """Use the template's tissue maps, warped to the subject, as Atropos priors."""
    mrf_weight: float = 0.3
    """Atropos MRF smoothing (ANTs' default 0.3 measured better than 0.2 here)."""
    n_iterations: int = 3
    """Atropos EM iterations (as antsBrainExtraction); 5 took 60 % longer for the same Dice."""
    prior_weight: float = 0.25
    """Weight of the template priors in the posterior (0: initialization only)."""
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
    slice_format: Literal["png", "npy"] = "png"
    png_bit_depth: Literal[8, 16] = 16


@dataclass
class SplitConfig:
    fractions: list[float] = field(default_factory=lambda: [0.7, 0.15, 0.15])
    n_folds: int = 0
    """0 for a train/val/test split by ``fractions``; k > 1 for k folds."""
    stratify_by: str = ""
    group_by: str = ""
    stratify_bins: int = 0
    """> 1: bin a numeric ``stratify_by`` column (e.g. age) into this many quantile classes."""


@dataclass
class ExecutionConfig:
    """How the workflow runs. Only ``omp_nthreads`` can change outputs (ITK steps are
    not bit-reproducible across thread counts; see docs/parallel.md)."""

    nprocs: int = 0
    """Processes for MultiProc (0: all cores)."""
    omp_nthreads: int = 1
    """Threads per node for ITK/ANTs/BLAS."""
    mem_gb: float = 0.0
    """Memory available to MultiProc (0: let Nipype decide)."""
    plugin: str = "MultiProc"
    plugin_args: dict[str, Any] = field(default_factory=dict)
    stop_on_first_crash: bool = False


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
    export: ExportConfig = field(default_factory=ExportConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    execution: ExecutionConfig = field(default_factory=ExecutionConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())

    def write(self, path: str | Path) -> Path:
        """Write the resolved config as TOML (atomically)."""
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
    return config.update(values, source=str(path))


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
            setattr(obj, key, _coerce(value, hints[key], dotted, source))


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
