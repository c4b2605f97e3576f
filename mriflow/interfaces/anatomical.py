"""Thin Nipype interfaces around the anatomical algorithms in :mod:`mriflow.image`.

Each interface loads its inputs, calls one function, writes the results into the
node's working directory and returns a ``step`` record (see
:func:`mriflow.interfaces.base.step_record`) for the sidecar's chain of steps.
Defaults of the parameter traits are those of :mod:`mriflow.config`.

Heavy interfaces have a ``num_threads`` input; Nipype's MultiProc scheduler reads
it as the node's processor count (``n_procs``). For the ANTs-based steps the
thread count takes effect when the step is the first ITK work of its worker
process; set ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS`` to ``--omp-nthreads``
before the workflow starts to make it hold everywhere.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    InputMultiObject,
    TraitedSpec,
    isdefined,
    traits,
)

from mriflow.bids.paths import entity_tag
from mriflow.image.io import load_image, load_input_image
from mriflow.image.template import TEMPLATE_SPACE
from mriflow.interfaces.base import MriflowInterface, step_record

__all__ = [
    "Denoise",
    "N4BiasFieldCorrection",
    "RemoveBiasField",
    "SkullStrip",
    "RegisterToTemplate",
    "ApplyTransforms",
    "ResampleToTemplate",
    "TemplateTissuePriors",
]


def _stem(path: str) -> str:
    name = Path(path).name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return Path(name).stem


def _save(img: nib.Nifti1Image, cwd: str, in_file: str, suffix: str) -> str:
    # Uncompressed: work-dir files are read once or twice, and gzip cost about 1 s
    # per 1 mm float volume, a dozen times on one subject's critical path; the
    # derivatives sink compresses what is published.
    out = Path(cwd) / f"{_stem(in_file)}_{suffix}.nii"
    nib.save(img, str(out))
    return str(out)


def _optional_image(value: object) -> nib.Nifti1Image | None:
    return load_image(value) if isdefined(value) and value else None


class _TemplateInputSpec(BaseInterfaceInputSpec):
    """Inputs naming the registration template (the embedded one by default)."""

    template_name = traits.Str("MNI152NLin2009aSym", usedefault=True, desc="template space label")
    template_files = traits.Dict(
        traits.Str, traits.Str, desc="user template files (t1w, mask[, gm, wm, csf])"
    )


def _template(inputs, resolution: int | None = None):
    """The template the inputs name, at ``resolution`` mm when it is the embedded one."""
    from mriflow.image.template import get_template

    return get_template(*_template_request(inputs, resolution))


def _template_grid(inputs, resolution: int | None = None):
    """The grid of :func:`_template`'s template, its voxels unread."""
    from mriflow.image.template import template_grid

    return template_grid(*_template_request(inputs, resolution))


def _template_request(inputs, resolution: int | None) -> tuple:
    files = inputs.template_files if isdefined(inputs.template_files) else {}
    return inputs.template_name, None if files else resolution, files or None


# --------------------------------------------------------------------- Denoise
class _DenoiseInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="3D image to denoise")
    mask_file = File(exists=True, desc="denoise only inside this mask (nlm, ants)")
    method = traits.Enum("nlm", "ants", "skimage", "none", usedefault=True, desc="NLM backend")
    noise_model = traits.Enum("Rician", "Gaussian", usedefault=True, desc="nlm/ants noise model")
    patch_radius = traits.Int(1, usedefault=True, desc="nlm/ants patch radius (voxels)")
    search_radius = traits.Int(1, usedefault=True, desc="nlm/ants search radius (voxels)")
    h_factor = traits.Float(1.5, usedefault=True, desc="nlm strength (x noise sd)")
    num_threads = traits.Int(1, usedefault=True, desc="ITK threads")


class _DenoiseOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="denoised image (float32)")
    step = traits.Dict(desc="step record for the sidecar")


class Denoise(MriflowInterface):
    """Non-local means denoising (:func:`mriflow.image.denoise.denoise`)."""

    input_spec = _DenoiseInputSpec
    output_spec = _DenoiseOutputSpec

    def _run_interface(self, runtime):
        from mriflow.image.denoise import denoise

        inputs = self.inputs
        # denoising runs on the raw image (sMRIPrep's order): NaN voxels are zeroed here too
        img, input_report = load_input_image(inputs.in_file)
        out = denoise(
            img,
            method=inputs.method,
            noise_model=inputs.noise_model,
            mask=_optional_image(inputs.mask_file),
            patch_radius=inputs.patch_radius,
            search_radius=inputs.search_radius,
            h_factor=inputs.h_factor,
            num_threads=inputs.num_threads,
        )
        self._results["out_file"] = _save(out, runtime.cwd, inputs.in_file, "denoised")
        software = {
            "nlm": ["numpy", "scipy"], "ants": ["antspyx"], "skimage": ["scikit-image"], "none": []
        }[inputs.method]  # fmt: skip
        parameters: dict[str, object] = {"method": inputs.method}
        if inputs.method in ("nlm", "ants"):
            parameters.update(
                noise_model=inputs.noise_model,
                patch_radius=inputs.patch_radius,
                search_radius=inputs.search_radius,
            )
        if inputs.method == "nlm":
            parameters.update(h_factor=inputs.h_factor)
        if inputs.method == "skimage":
            parameters.update(patch_size=5, patch_distance=6, h="0.8 * estimated sigma")
        self._results["step"] = step_record(
            "denoise", parameters, software, input_report=input_report
        )
        return runtime


# ---------------------------------------------------------------------- N4
class _N4InputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="3D image to correct")
    mask_file = File(exists=True, desc="fit mask (default: Otsu head mask)")
    shrink_factor = traits.Int(6, usedefault=True, desc="fit on an image shrunk by this")
    iterations = traits.List(
        traits.Int, value=[50, 50, 50, 50], usedefault=True, desc="iterations per level"
    )
    convergence_threshold = traits.Float(1e-3, usedefault=True)
    spline_distance_mm = traits.Float(200.0, usedefault=True, desc="B-spline knot spacing")
    num_threads = traits.Int(1, usedefault=True, desc="SimpleITK threads")


class _N4OutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="bias-corrected image (float32)")
    bias_field = File(exists=True, desc="multiplicative bias field (float32)")
    step = traits.Dict(desc="step record for the sidecar")


class N4BiasFieldCorrection(MriflowInterface):
    """N4 bias-field correction (:func:`mriflow.image.bias.n4_bias_correct`)."""

    input_spec = _N4InputSpec
    output_spec = _N4OutputSpec

    def _run_interface(self, runtime):
        from mriflow.image.bias import n4_bias_correct

        inputs = self.inputs
        img = load_image(inputs.in_file)
        corrected, field = n4_bias_correct(
            img,
            _optional_image(inputs.mask_file),
            shrink_factor=inputs.shrink_factor,
            iterations=list(inputs.iterations),
            convergence_threshold=inputs.convergence_threshold,
            spline_distance_mm=inputs.spline_distance_mm,
            num_threads=inputs.num_threads,
        )
        self._results["out_file"] = _save(corrected, runtime.cwd, inputs.in_file, "n4")
        self._results["bias_field"] = _save(field, runtime.cwd, inputs.in_file, "biasfield")
        parameters = {
            "shrink_factor": inputs.shrink_factor,
            "iterations": list(inputs.iterations),
            "convergence_threshold": inputs.convergence_threshold,
            "spline_distance_mm": inputs.spline_distance_mm,
            "mask": "given" if isdefined(inputs.mask_file) else "Otsu head mask",
        }
        self._results["step"] = step_record("n4", parameters, ["SimpleITK"])
        return runtime


class _RemoveBiasFieldInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="image on the field's grid")
    bias_field = File(exists=True, mandatory=True, desc="multiplicative field from N4")


class _RemoveBiasFieldOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="in_file / bias_field (float32)")


class RemoveBiasField(MriflowInterface):
    """Divide by a kept N4 field (:func:`mriflow.image.bias.remove_bias_field`)."""

    input_spec = _RemoveBiasFieldInputSpec
    output_spec = _RemoveBiasFieldOutputSpec

    def _run_interface(self, runtime):
        from mriflow.image.bias import remove_bias_field

        img = load_image(self.inputs.in_file)
        out = remove_bias_field(img, load_image(self.inputs.bias_field))
        self._results["out_file"] = _save(out, runtime.cwd, self.inputs.in_file, "n4")
        return runtime


# --------------------------------------------------------------- SkullStrip
class _SkullStripInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="bias-corrected head image")
    method = traits.Enum("auto", "deepbet", "template", "none", usedefault=True)
    detect_stripped = traits.Bool(True, usedefault=True, desc="pass stripped inputs through")
    deepbet_threshold = traits.Float(0.5, usedefault=True)
    deepbet_n_dilate = traits.Int(0, usedefault=True)
    random_seed = traits.Int(42, usedefault=True, desc="template backend registration seed")
    num_threads = traits.Int(1, usedefault=True, desc="torch / ITK threads")


class _SkullStripOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="brain image (input times mask, float32)")
    out_mask = File(exists=True, desc="brain mask (uint8)")
    skull_stripped = traits.Bool(desc="the input was already skull-stripped (passed through)")
    method = traits.Str(desc="backend used: deepbet, template, none or passthrough")
    step = traits.Dict(desc="step record for the sidecar")


class SkullStrip(MriflowInterface):
    """Brain extraction (:func:`mriflow.image.skullstrip.skull_strip`)."""

    input_spec = _SkullStripInputSpec
    output_spec = _SkullStripOutputSpec

    def _run_interface(self, runtime):
        from mriflow.image.skullstrip import skull_strip

        inputs = self.inputs
        img = load_image(inputs.in_file)
        result = skull_strip(
            img,
            method=inputs.method,
            detect_stripped=inputs.detect_stripped,
            deepbet_threshold=inputs.deepbet_threshold,
            deepbet_n_dilate=inputs.deepbet_n_dilate,
            random_seed=inputs.random_seed,
            num_threads=inputs.num_threads,
        )
        self._results["out_file"] = _save(result.brain, runtime.cwd, inputs.in_file, "brain")
        self._results["out_mask"] = _save(result.mask, runtime.cwd, inputs.in_file, "brainmask")
        self._results["skull_stripped"] = result.input_was_stripped
        self._results["method"] = result.method
        parameters: dict[str, object] = {"method": result.method, "requested": inputs.method}
        software: list[str] = []
        if result.method == "deepbet":
            parameters.update(threshold=inputs.deepbet_threshold, n_dilate=inputs.deepbet_n_dilate)
            software = ["deepbet", "torch"]
        elif result.method == "template":
            parameters.update(
                template="MNI152NLin2009aSym (pseudo-head, 2 mm)",
                registration="similarity + SyN (8, 4 mm), Mattes MI",
                random_seed=inputs.random_seed,
            )
            software = ["antspyx"]
        self._results["step"] = step_record("skull_strip", parameters, software)
        return runtime


# ------------------------------------------------------- RegisterToTemplate
class _RegisterInputSpec(_TemplateInputSpec):
    in_file = File(exists=True, mandatory=True, desc="skull-stripped subject image")
    mask_file = File(exists=True, desc="subject brain mask: restricts the metric")
    preset = traits.Enum("fast", "precise", usedefault=True)
    transform = traits.Enum("syn", "affine", "rigid", usedefault=True, desc="last stage")
    template_resolution = traits.Enum(1, 2, usedefault=True, desc="output grid (mm)")
    random_seed = traits.Int(42, usedefault=True)
    num_threads = traits.Int(1, usedefault=True, desc="ITK threads")
    write_warped = traits.Bool(
        True, usedefault=True, desc="also write in_file resampled into template space"
    )


class _RegisterOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="subject image resampled into template space")
    # plain lists (not OutputMultiObject, which collapses one file to a string)
    forward_transforms = traits.List(File(exists=True), desc="subject -> template [.h5]")
    reverse_transforms = traits.List(File(exists=True), desc="template -> subject [.h5]")
    template = traits.Str(desc="template space name")
    step = traits.Dict(desc="step record for the sidecar")


class RegisterToTemplate(MriflowInterface):
    """Registration to MNI152NLin2009aSym.

    See :func:`mriflow.image.registration.register_to_template`.
    """

    input_spec = _RegisterInputSpec
    output_spec = _RegisterOutputSpec

    def _run_interface(self, runtime):
        from mriflow.image.registration import PRESETS, register_to_template

        inputs = self.inputs
        name = inputs.template_name
        user = isdefined(inputs.template_files) and bool(inputs.template_files)
        img = load_image(inputs.in_file)
        prefix = Path(runtime.cwd) / f"{_stem(inputs.in_file)}_to-{name}_"
        result = register_to_template(
            img,
            prefix,
            transform=inputs.transform,
            preset=inputs.preset,
            moving_mask=_optional_image(inputs.mask_file),
            output_resolution=int(inputs.template_resolution),
            random_seed=inputs.random_seed,
            num_threads=inputs.num_threads,
            compute_warped=inputs.write_warped,
            template=_template(inputs) if user else None,
        )
        if result.warped is not None:
            self._results["out_file"] = _save(
                result.warped, runtime.cwd, inputs.in_file, entity_tag(space=name)
            )
        self._results["forward_transforms"] = [str(p) for p in result.forward_transforms]
        self._results["reverse_transforms"] = [str(p) for p in result.reverse_transforms]
        self._results["template"] = name
        spec = PRESETS[inputs.preset]
        parameters: dict[str, object] = {
            "template": name,
            "preset": inputs.preset,
            "transform": inputs.transform,
            "registration_template_resolution_mm": spec.template_resolution,
            "output_resolution_mm": int(inputs.template_resolution),
            "metric": "Mattes MI (32 bins)",
            "random_seed": inputs.random_seed,
        }
        if user:
            # the user's files, and the grids actually used (not the embedded ones)
            template = _template(inputs)
            parameters["template_files"] = dict(inputs.template_files)
            parameters["registration_template_resolution_mm"] = (
                round(2 * template.resolution, 3)
                if spec.template_resolution == 2 and template.resolution < 1.5
                else round(template.resolution, 3)
            )
            parameters["output_resolution_mm"] = round(template.resolution, 3)
        elif name != TEMPLATE_SPACE:
            raise ValueError(f"template {name!r} is not embedded and no files were given")
        self._results["step"] = step_record("registration", parameters, ["antspyx"])
        return runtime


# ----------------------------------------------------------- ApplyTransforms
class _ApplyInputSpec(_TemplateInputSpec):
    in_file = File(exists=True, mandatory=True, desc="image in the transforms' moving space")
    transforms = InputMultiObject(File(exists=True), mandatory=True, desc="ANTs transforms")
    reference_file = File(exists=True, desc="output grid (default: the template)")
    template_resolution = traits.Enum(
        1, 2, usedefault=True, desc="template grid (mm) when no reference_file"
    )
    interpolation = traits.Enum(
        "linear", "nearest", "bspline", "genericLabel", usedefault=True,
        desc="nearest or genericLabel for masks and labels",
    )  # fmt: skip
    num_threads = traits.Int(1, usedefault=True, desc="ITK threads")
    step_name = traits.Str(
        "apply_transforms", usedefault=True, desc="name of this step in the sidecar chain"
    )


class _ApplyOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="resampled image")
    step = traits.Dict(desc="step record for the sidecar")


class ApplyTransforms(MriflowInterface):
    """Resample an image through kept transforms.

    See :func:`mriflow.image.registration.apply_transforms`.
    """

    input_spec = _ApplyInputSpec
    output_spec = _ApplyOutputSpec

    def _run_interface(self, runtime):
        from mriflow.image.registration import apply_transforms

        inputs = self.inputs
        img = load_image(inputs.in_file)
        if isdefined(inputs.reference_file):
            reference = load_image(inputs.reference_file)
            target = Path(inputs.reference_file).name
        else:
            template = _template(inputs, int(inputs.template_resolution))
            reference = template.t1w
            target = f"{template.space} {template.resolution:g} mm"
        out = apply_transforms(
            img,
            list(inputs.transforms),
            reference,
            interpolation=inputs.interpolation,
            num_threads=inputs.num_threads,
        )
        self._results["out_file"] = _save(out, runtime.cwd, inputs.in_file, "resampled")
        self._results["step"] = _resampling_step(
            inputs.step_name, inputs.transforms, target, inputs.interpolation, ["antspyx"]
        )
        return runtime


def _resampling_step(
    name: str, transforms: list[str], target: str, interpolation: str, software: list[str]
) -> dict:
    parameters = {
        "transforms": [Path(t).name for t in transforms],
        "reference": target,
        "interpolation": interpolation,
    }
    return step_record(name, parameters, software)


# ---------------------------------------------------------- ResampleToTemplate
class _ResampleToTemplateInputSpec(_TemplateInputSpec):
    in_files = InputMultiObject(
        File(exists=True), mandatory=True, desc="images in the transforms' moving space"
    )
    interpolations = traits.List(
        traits.Enum("linear", "nearest", "genericLabel"),
        mandatory=True,
        desc="one per image: nearest or genericLabel for masks and labels",
    )
    step_names = traits.List(
        traits.Str, mandatory=True, desc="one per image: its step's name in the sidecar chain"
    )
    transforms = InputMultiObject(File(exists=True), mandatory=True, desc="ANTs transforms")
    template_resolution = traits.Enum(1, 2, usedefault=True, desc="template grid (mm)")
    num_threads = traits.Int(1, usedefault=True, desc="ITK threads")


class _ResampleToTemplateOutputSpec(TraitedSpec):
    out_files = traits.List(File(exists=True), desc="resampled images, in the inputs' order")
    step = traits.List(traits.Dict, desc="a step record per image, for the sidecars")


class ResampleToTemplate(MriflowInterface):
    """Resample a subject's images into a template space through one transform chain.

    See :func:`mriflow.image.registration.apply_transforms_many`.
    """

    input_spec = _ResampleToTemplateInputSpec
    output_spec = _ResampleToTemplateOutputSpec

    def _run_interface(self, runtime):
        from mriflow.image.registration import apply_transforms_many

        inputs = self.inputs
        counts = {len(inputs.in_files), len(inputs.interpolations), len(inputs.step_names)}
        if len(counts) != 1:
            raise ValueError("in_files, interpolations and step_names must have one entry each")
        grid = _template_grid(inputs, int(inputs.template_resolution))
        outputs = apply_transforms_many(
            [load_image(path) for path in inputs.in_files],
            list(inputs.transforms),
            grid,
            interpolations=list(inputs.interpolations),
            num_threads=inputs.num_threads,
        )
        target = f"{inputs.template_name} {grid.resolution:g} mm"
        self._results["out_files"] = []
        self._results["step"] = []
        for in_file, out, interpolation, name in zip(
            inputs.in_files, outputs, inputs.interpolations, inputs.step_names, strict=True
        ):
            self._results["out_files"].append(_save(out, runtime.cwd, in_file, name))
            self._results["step"].append(
                _resampling_step(
                    name, inputs.transforms, target, interpolation, ["SimpleITK", "scipy"]
                )
            )
        return runtime


# -------------------------------------------------------- TemplateTissuePriors
class _PriorsInputSpec(_TemplateInputSpec):
    reverse_transforms = InputMultiObject(
        File(exists=True), mandatory=True, desc="template -> subject transforms"
    )
    reference_file = File(exists=True, mandatory=True, desc="subject grid")
    num_threads = traits.Int(1, usedefault=True, desc="ITK threads")


class _PriorsOutputSpec(TraitedSpec):
    gm_prior = File(exists=True)
    wm_prior = File(exists=True)
    csf_prior = File(exists=True)
    step = traits.Dict(desc="step record for the sidecar")


class TemplateTissuePriors(MriflowInterface):
    """The template's GM, WM and CSF probability maps brought into the subject's grid."""

    input_spec = _PriorsInputSpec
    output_spec = _PriorsOutputSpec

    def _run_interface(self, runtime):
        from mriflow.image.registration import apply_transforms_many

        template = _template(self.inputs, 1)
        labels = ("GM", "WM", "CSF")
        priors = apply_transforms_many(
            [template.probseg(label) for label in labels],
            list(self.inputs.reverse_transforms),
            load_image(self.inputs.reference_file),
            interpolations=["linear"] * len(labels),
            num_threads=self.inputs.num_threads,
        )
        for label, warped in zip(labels, priors, strict=True):
            self._results[f"{label.lower()}_prior"] = _save(
                warped,
                runtime.cwd,
                f"{template.space}.nii.gz",
                entity_tag(suffix="probseg", label=label),
            )
        self._results["step"] = step_record(
            "template_priors",
            {"template": template.space, "labels": list(labels), "interpolation": "linear"},
            ["SimpleITK", "scipy", "nilearn"],
        )
        return runtime
