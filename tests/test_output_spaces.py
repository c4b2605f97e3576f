"""``--output-spaces`` and templates given as files (issue 16).

Fast tests check the config and the output table; two end-to-end runs (marked slow,
~30 s each) use the embedded 2 mm template as the subject's T1w, so the outputs can be
checked against known geometry:

- ``--output-spaces MNI152NLin2009aSym:res-2 T1w``: ``res-2`` images on the 2 mm grid with
  ``Resolution`` in their sidecars, native outputs, 0 validator errors, pybids finds them;
- a user template made from the embedded one by a known affine (:data:`MOVE`), used for
  registration, priors and the model-ready grid, checked through that affine.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from mriflow.bids.outputs import anat_derivatives, derivative_relpath
from mriflow.cli.run import main
from mriflow.config import Config, ConfigError, OutputSpace, parse_output_space
from mriflow.image.template import TEMPLATE_SPACE, load_template
from mriflow.interfaces.anatomical import ResampleToTemplate
from mriflow.workflows.anatomical import init_anat_preproc_wf
from tests.spaces_helpers import MOVE, write_moved_template, write_template_subject

SUBJECT = {"subject": "01"}


def _names(config: Config) -> dict[str, str]:
    return {
        s.output: derivative_relpath(SUBJECT, "T1w", s) for s in anat_derivatives("T1w", config)
    }


def test_parse_output_space_follows_fmriprep_syntax():
    assert parse_output_space("MNI152NLin2009aSym:res-2") == OutputSpace(TEMPLATE_SPACE, 2)
    assert parse_output_space("T1w") == OutputSpace("T1w") and OutputSpace("T1w").native
    assert str(OutputSpace(TEMPLATE_SPACE, 1)) == "MNI152NLin2009aSym:res-1"
    for bad in ("MNI152NLin2009aSym:res-x", "MNI:cohort-1", "T1w:res-2", "my_tpl"):
        with pytest.raises(ValueError, match="output space"):
            parse_output_space(bad)


def test_default_names_are_unchanged_by_an_explicit_default():
    """``--output-spaces MNI152NLin2009aSym T1w`` is today's default, names and all."""
    explicit = Config()
    explicit.set("registration.output_spaces", [TEMPLATE_SPACE, "T1w"])
    names = _names(Config())
    assert names == _names(explicit)
    assert (
        names["std_preproc"]
        == "sub-01/anat/sub-01_space-MNI152NLin2009aSym_desc-preproc_T1w.nii.gz"
    )
    assert not any("res-" in n for n in names.values())


def test_native_only_writes_no_template_space():
    config = Config()
    config.set("registration.output_spaces", ["T1w"])
    names = _names(config)
    assert "preproc" in names and "dseg" in names
    assert not any("space-" in n or "xfm" in n for n in names.values())
    assert "register" not in init_anat_preproc_wf(config=config).list_node_names()


def test_two_resolutions_register_once_and_resample_per_grid():
    config = Config()
    config.set(
        "registration.output_spaces", ["MNI152NLin2009aSym:res-2", "MNI152NLin2009aSym:res-1"]
    )
    names = _names(config)
    specs = {s.output: s for s in anat_derivatives("T1w", config)}
    for output in ("std_preproc", "std_mask", "std_norm", "std_dseg"):
        assert "_space-MNI152NLin2009aSym_res-2_" in names[output]
        assert "_space-MNI152NLin2009aSym_res-1_" in names[f"{output}_space2"]
        assert specs[output].metadata["Resolution"].startswith("2 mm")
        assert specs[f"{output}_space2"].metadata["Resolution"].startswith("1 mm")
    # the first space is the model-ready grid; the transforms do not depend on the grid
    assert "_res-2_desc-model_T1w" in names["model"]
    assert names["xfm_fwd"].endswith("from-T1w_to-MNI152NLin2009aSym_mode-image_xfm.h5")
    assert len(set(names.values())) == len(names)
    workflow = init_anat_preproc_wf(config=config)
    nodes = workflow.list_node_names()
    assert [n for n in nodes if n.startswith("register")] == ["register"]
    # one resampling node per grid, all four images through one evaluation of the transforms
    resamplings = {
        n: workflow.get_node(n).inputs
        for n in nodes
        if isinstance(workflow.get_node(n).interface, ResampleToTemplate)
    }
    assert {n: (i.template_resolution, i.step_names) for n, i in resamplings.items()} == {
        "to_template": (2, ["std_preproc", "std_mask", "std_norm", "std_dseg"]),
        "to_template_space2": (
            1, ["std_preproc_space2", "std_mask_space2", "std_norm_space2", "std_dseg_space2"],
        ),
    }  # fmt: skip
    assert resamplings["to_template"].interpolations == [
        "linear", "nearest", "linear", "genericLabel",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("spaces", "message"),
    [
        (["MNI152NLin2009aSym:res-3"], "has res-1 and res-2 (1 and 2 mm) only"),
        (["MNI152NLin6Asym"], "registers once, to registration.template = 'MNI152NLin2009aSym'"),
        (["T1w", "T1w"], "is given twice"),
    ],
)
def test_unavailable_spaces_are_refused_up_front(spaces, message, capsys, tmp_path):
    with pytest.raises(ConfigError, match=re.escape(message)):
        Config().set("registration.output_spaces", spaces)
    raw = write_template_subject(tmp_path / "raw")
    code = main([str(raw), str(tmp_path / "out"), "participant", "--output-spaces", *spaces])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and "\n" not in err
    assert not (tmp_path / "out").exists()  # nothing ran


def test_template_needs_files_or_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="never downloads") as info:
        Config().set("registration.template", "MNI152NLin2009cAsym")
    assert "\n" not in str(info.value)
    files = write_moved_template(tmp_path / "tpl", priors=False)
    config = Config()
    config.update({"registration": {"template": "Moved", "template_files": files}})
    with pytest.raises(ConfigError, match="one grid, its own"):
        config.set("registration.output_spaces", ["Moved:res-2"])
    with pytest.raises(ConfigError, match="needs its own name"):
        Config().update({"registration": {"template": "T1w", "template_files": files}})
    bad = {**files, "mask": str(tmp_path / "nope.nii.gz")}
    with pytest.raises(ConfigError, match="nope.nii.gz: mask file not found"):
        Config().update({"registration": {"template": "Moved", "template_files": bad}})


def test_user_template_names_and_priors(tmp_path):
    files = write_moved_template(tmp_path / "tpl", priors=False)
    config = Config()
    config.update({"registration": {"template": "Moved", "template_files": files}})
    config.set("segmentation.use_priors", True)
    names = _names(config)
    assert names["std_preproc"].endswith("sub-01_space-Moved_desc-preproc_T1w.nii.gz")
    assert names["xfm_fwd"].endswith("sub-01_from-T1w_to-Moved_mode-image_xfm.h5")
    assert names["model"].endswith("sub-01_space-Moved_desc-model_T1w.nii.gz")
    # no GM/WM maps given: no priors, however segmentation.use_priors is set
    assert "template_priors" not in init_anat_preproc_wf(config=config).list_node_names()


# ------------------------------------------------------------------- end to end
QUICK = [
    "--voxel-size", "2", "--nprocs", "1",
    "--set", "denoise.method=none",
    "--set", "segmentation.method=gmm",
    "--set", "export.slices=false",
    "--set", "export.target_shape=80,96,80",
]  # fmt: skip


def _run(tmp_path: Path, *flags: str) -> Path:
    raw = write_template_subject(tmp_path / "raw")
    out = tmp_path / "out"
    code = main([str(raw), str(out), "participant", "-w", str(tmp_path / "work"), *QUICK, *flags])
    assert code == 0
    return out / "sub-01" / "anat"


def _sidecar(path: Path) -> dict:
    return json.loads(path.with_name(path.name.replace(".nii.gz", ".json")).read_text())


def _validate_and_index(out: Path, space: str, res: str | None) -> None:
    from bids import BIDSLayout

    from tests.test_bids_validator import assert_no_validator_errors

    assert_no_validator_errors(out)
    layout = BIDSLayout(out, validate=False, is_derivative=True)
    query = {"space": space, "extension": ".nii.gz", "return_type": "filename"}
    if res:
        query["res"] = res
    found = {Path(f).name for f in layout.get(**query)}
    assert {f"sub-01_space-{space}{f'_res-{res}' if res else ''}_desc-preproc_T1w.nii.gz",
            f"sub-01_space-{space}{f'_res-{res}' if res else ''}_desc-brain_mask.nii.gz",
            f"sub-01_space-{space}{f'_res-{res}' if res else ''}_dseg.nii.gz"} <= found  # fmt: skip
    xfms = layout.get(suffix="xfm", extension=".h5", return_type="filename")
    assert {Path(f).name for f in xfms} == {
        f"sub-01_from-T1w_to-{space}_mode-image_xfm.h5",
        f"sub-01_from-{space}_to-T1w_mode-image_xfm.h5",
    }


@pytest.mark.slow
def test_mni_res2_and_native_outputs(tmp_path):
    """The issue's acceptance: ``--output-spaces MNI152NLin2009aSym:res-2 T1w``."""
    anat = _run(tmp_path, "--output-spaces", "MNI152NLin2009aSym:res-2", "T1w")
    two = load_template(2)
    std = anat / "sub-01_space-MNI152NLin2009aSym_res-2_desc-preproc_T1w.nii.gz"
    img = nib.load(std)
    assert img.shape == two.t1w.shape and np.allclose(img.affine, two.t1w.affine)
    assert _sidecar(std)["Resolution"].startswith("2 mm isotropic grid of MNI152NLin2009aSym")
    # the subject is the template: registered, it lands on itself (N4 changed its
    # intensities a little, not its shape)
    brain = np.asarray(two.mask.dataobj) > 0
    r = np.corrcoef(img.get_fdata()[brain], np.asarray(two.t1w.dataobj)[brain])[0, 1]
    assert r > 0.9, r
    mask = anat / "sub-01_space-MNI152NLin2009aSym_res-2_desc-brain_mask.nii.gz"
    std_mask = np.asarray(nib.load(mask).dataobj) > 0
    assert 2 * (std_mask & brain).sum() / (std_mask.sum() + brain.sum()) > 0.95
    for name in ("desc-preproc_T1w", "desc-brain_mask", "dseg", "label-GM_probseg"):
        assert (anat / f"sub-01_{name}.nii.gz").is_file()  # native outputs
    model = anat / "sub-01_space-MNI152NLin2009aSym_res-2_desc-model_T1w.nii.gz"
    assert np.allclose(nib.load(model).header.get_zooms()[:3], 2.0)
    assert "Resolution" in _sidecar(model)
    # no image of another grid, no res-less template image
    spaced = [p.name for p in anat.glob("*space-*.nii.gz")]
    assert spaced and all("_res-2_" in n for n in spaced)
    _validate_and_index(anat.parents[1], TEMPLATE_SPACE, "2")


@pytest.mark.slow
def test_user_template_is_used_end_to_end(tmp_path):
    """A template given as files (the embedded one moved by the known affine MOVE) is the
    registration target, the source of the tissue priors and the model-ready grid."""
    from mriflow.image.registration import transform_points
    from mriflow.image.template import load_user_template

    files = write_moved_template(tmp_path / "tpl")
    config = tmp_path / "config.toml"
    lines = ["[registration]", 'template = "Moved"', "[registration.template_files]"]
    lines += [f'{key} = "{path}"' for key, path in files.items()]
    config.write_text("\n".join(lines) + "\n")
    anat = _run(
        tmp_path, "--config", str(config), "--output-spaces", "Moved", "T1w",
        "--set", "segmentation.use_priors=true",
    )  # fmt: skip
    user = load_user_template("Moved", files)
    # transforms: a user-template point y shows the subject's (= embedded template's) MOVE @ y
    points = nib.affines.apply_affine(
        user.mask.affine, np.argwhere(np.asarray(user.mask.dataobj) > 0)[::40]
    )
    forward = anat / "sub-01_from-T1w_to-Moved_mode-image_xfm.h5"
    mapped = transform_points(points, [forward])
    rms = np.sqrt(((mapped - nib.affines.apply_affine(MOVE, points)) ** 2).sum(axis=1).mean())
    print(f"user template end to end: landmark rms {rms:.3f} mm")
    assert rms < 1.5, rms
    # template-space images are on the user template's grid and show it
    std_path = anat / "sub-01_space-Moved_desc-preproc_T1w.nii.gz"
    std = nib.load(std_path)
    # BIDS asks a non-standard space to name its reference image
    assert _sidecar(std_path)["SpatialReference"] == Path(files["t1w"]).as_uri()
    assert std.shape == user.t1w.shape and np.allclose(std.affine, user.t1w.affine)
    brain = np.asarray(user.mask.dataobj) > 0
    r = np.corrcoef(std.get_fdata()[brain], np.asarray(user.t1w.dataobj)[brain])[0, 1]
    assert r > 0.95, r
    std_mask = np.asarray(nib.load(anat / "sub-01_space-Moved_desc-brain_mask.nii.gz").dataobj)
    dice = 2 * ((std_mask > 0) & brain).sum() / ((std_mask > 0).sum() + brain.sum())
    assert dice > 0.95, dice
    # the priors came from this template
    steps = {s["Name"]: s for s in _sidecar(anat / "sub-01_dseg.nii.gz")["Steps"]}
    assert steps["template_priors"]["Parameters"]["template"] == "Moved"
    assert steps["registration"]["Parameters"]["template_files"]["t1w"] == files["t1w"]
    # the model-ready volume is on the user template's grid (its voxels, whole-voxel crop)
    model = nib.load(anat / "sub-01_space-Moved_desc-model_T1w.nii.gz")
    offset = np.linalg.inv(user.t1w.affine) @ model.affine
    assert np.allclose(offset[:3, :3], np.eye(3)) and np.allclose(offset[:3, 3] % 1, 0)
    assert not list(anat.glob("*MNI152NLin2009aSym*"))
    _validate_and_index(anat.parents[1], "Moved", None)


def test_template_in_templateflow_cache_is_used_offline(tmp_path, monkeypatch):
    """A template TemplateFlow's local cache already holds is used as files; one whose
    files are placeholders (not fetched) is refused; nothing is downloaded."""
    import shutil
    import sys

    home = tmp_path / "templateflow"
    folder = home / "tpl-Fake"
    folder.mkdir(parents=True)
    files = write_moved_template(tmp_path / "src")
    names = {"t1w": "T1w", "mask": "desc-brain_mask", "gm": "label-GM_probseg",
             "wm": "label-WM_probseg"}  # fmt: skip
    for key, rest in names.items():
        shutil.copy(files[key], folder / f"tpl-Fake_res-01_{rest}.nii.gz")
    (home / "tpl-Empty").mkdir()
    for rest in ("T1w", "desc-brain_mask"):
        (home / "tpl-Empty" / f"tpl-Empty_res-01_{rest}.nii.gz").touch()  # annex placeholder
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(home))

    config = Config()
    config.set("registration.output_spaces", ["Fake", "T1w"])
    assert config.registration.template == "Fake"
    assert config.registration.template_files["mask"] == str(
        folder / "tpl-Fake_res-01_desc-brain_mask.nii.gz"
    )
    assert set(config.registration.template_files) == {"t1w", "mask", "gm", "wm"}
    assert _names(config)["std_preproc"].endswith("sub-01_space-Fake_desc-preproc_T1w.nii.gz")
    with pytest.raises(ConfigError, match="TEMPLATEFLOW_HOME") as info:
        Config().set("registration.template", "Empty")
    assert "never downloads" in str(info.value) and "\n" not in str(info.value)
    assert "templateflow" not in sys.modules
