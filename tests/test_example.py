"""The README's main job: participant + group levels on the bundled real-T1w example.

One run of the default configuration (module fixture) is checked against the
acceptance of every step: spatial, anatomical core, tissues and intensities, ML
export, QC reports and provenance.
"""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest

from mriflow.cli.run import main
from mriflow.config import load_config
from tests.conftest import REPO_ROOT

EXAMPLE = REPO_ROOT / "bids_examples"
T1W = [
    "sub-01/anat/sub-01_T1w.nii.gz",
    "sub-02/ses-hfs/anat/sub-02_ses-hfs_T1w.nii.gz",
    "sub-02/ses-hfdl/anat/sub-02_ses-hfdl_T1w.nii.gz",
]
SPACE = "space-MNI152NLin2009aSym"


def _derivative(out, raw_rel: str, entities: str, suffix: str = "T1w", ext: str = ".nii.gz"):
    stem = raw_rel[: -len("_T1w.nii.gz")]
    return out / f"{stem}_{entities}_{suffix}{ext}" if entities else out / f"{stem}_{suffix}{ext}"


def _sidecar(path):
    name = path.name
    for ext in (".nii.gz", ".h5"):
        if name.endswith(ext):
            name = name[: -len(ext)]
    return json.loads(path.with_name(name + ".json").read_text())


@pytest.fixture(scope="module")
def example_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("example")
    out, work = tmp / "out", tmp / "work"
    code = main([str(EXAMPLE), str(out), "participant", "-w", str(work), "-q"])
    group_code = main([str(EXAMPLE), str(out), "group", "-w", str(work), "-q"])
    return code, group_code, out


def test_bundled_example_is_small_real_bids():
    size = sum(p.stat().st_size for p in EXAMPLE.rglob("*") if p.is_file())
    assert size < 10 * 1024**2
    assert "BSD-2-Clause" in (EXAMPLE / "LICENSE").read_text() + (EXAMPLE / "README").read_text()
    for rel in T1W:
        img = nib.load(EXAMPLE / rel)
        assert np.asanyarray(img.dataobj).std() > 10  # real images, not empty layouts
        sidecar = json.loads((EXAMPLE / rel.replace(".nii.gz", ".json")).read_text())
        assert "InstitutionName" not in sidecar and "PatientName" not in sidecar


@pytest.mark.slow
def test_participant_level_writes_native_derivatives(example_run):
    code, _, out = example_run
    assert code == 0
    for rel in T1W:
        preproc = _derivative(out, rel, "desc-preproc")
        img = nib.load(preproc)
        assert nib.aff2axcodes(img.affine) == ("R", "A", "S"), preproc
        assert np.allclose(img.header.get_zooms()[:3], 1.0), preproc
        sidecar = _sidecar(preproc)
        assert sidecar["Sources"][0] == f"bids:raw:{rel}"
        assert sidecar["SkullStripped"] is False
        assert [s["Name"] for s in sidecar["Steps"]] == ["denoise", "conform", "n4"]

        mask = nib.load(_derivative(out, rel, "desc-brain", "mask"))
        mask_data = np.asanyarray(mask.dataobj)
        assert mask.shape == img.shape and np.allclose(mask.affine, img.affine)
        assert set(np.unique(mask_data).tolist()) == {0, 1}
        volume_ml = mask_data.sum() * np.prod(mask.header.get_zooms()[:3]) / 1000
        assert 900 < volume_ml < 1900, (rel, volume_ml)
        assert _sidecar(_derivative(out, rel, "desc-brain", "mask"))["Sources"][1].startswith(
            "bids::"
        )

        dseg = np.asanyarray(nib.load(_derivative(out, rel, "", "dseg")).dataobj)
        assert set(np.unique(dseg).tolist()) <= {0, 1, 2, 3}
        assert np.all(dseg[mask_data == 0] == 0)
        for label in ("CSF", "GM", "WM"):
            assert _derivative(out, rel, f"label-{label}", "probseg").is_file()
        norm = np.asanyarray(nib.load(_derivative(out, rel, "desc-norm")).dataobj)
        inside = norm[mask_data > 0]
        assert abs(inside.mean()) < 0.05 and abs(inside.std() - 1) < 0.05  # z-score default
        assert np.all(norm[mask_data == 0] == 0)
    assert (out / "dseg.tsv").read_text().splitlines()[1:] == ["1\tGM", "2\tWM", "3\tCSF"]
    assert json.loads((out / "dataset_description.json").read_text())["DatasetType"] == "derivative"
    assert load_config(out / "mriflow_config.toml").spatial.voxel_size == 1.0


@pytest.mark.slow
def test_participant_level_writes_template_space_and_transforms(example_run):
    _, _, out = example_run
    template_mask = None
    for rel in T1W:
        std = nib.load(_derivative(out, rel, f"{SPACE}_desc-preproc"))
        std_mask = nib.load(_derivative(out, rel, f"{SPACE}_desc-brain", "mask"))
        assert std.shape == std_mask.shape == (197, 233, 189)  # the 1 mm template grid
        for direction in ("from-T1w_to-MNI152NLin2009aSym", "from-MNI152NLin2009aSym_to-T1w"):
            xfm = _derivative(out, rel, f"{direction}_mode-image", "xfm", ".h5")
            assert xfm.stat().st_size > 1000
        if template_mask is None:
            from mriflow.image.template import load_template

            template_mask = np.asanyarray(load_template(1).mask.dataobj) > 0
        warped = np.asanyarray(std_mask.dataobj) > 0
        dice = 2 * (warped & template_mask).sum() / (warped.sum() + template_mask.sum())
        assert dice > 0.85, (rel, dice)
        assert _derivative(out, rel, f"{SPACE}", "dseg").is_file()


@pytest.mark.slow
def test_model_ready_volumes_slices_and_manifest(example_run):
    _, group_code, out = example_run
    assert group_code == 0
    shape = tuple(load_config(out / "mriflow_config.toml").export.target_shape)
    for rel in T1W:
        model = nib.load(_derivative(out, rel, f"{SPACE}_desc-model"))
        model_mask = nib.load(_derivative(out, rel, f"{SPACE}_desc-model", "mask"))
        assert model.shape == model_mask.shape == shape
        assert np.allclose(model.affine, model_mask.affine)
        # one brain mask: nothing of the image outside it (linear resampling left a rim)
        assert not np.any(model.get_fdata()[np.asarray(model_mask.dataobj) == 0])
        index = next((out / rel.split("/anat/")[0] / "slices").glob("*_slices.csv"))
        rows = list(csv.DictReader(index.open()))
        assert rows, index
        for row in rows:
            assert (index.parent / row["file"]).is_file()
            assert float(row["brain_fraction"]) >= 0.05
    splits = {row["participant_id"]: row["split"] for row in csv.DictReader(
        (out / "splits.tsv").open(), delimiter="\t")}  # fmt: skip
    assert sorted(splits) == ["sub-01", "sub-02"]
    manifest = json.loads((out / "dataset.json").read_text())
    entries = [e for name in ("training", "validation", "test") for e in manifest.get(name, [])]
    assert len(entries) == 3  # three T1w images; sub-02's two sessions share one split
    for entry in entries:
        image = nib.load(out / entry["image"])
        assert image.shape == shape
        assert np.asanyarray(nib.load(out / entry["mask"]).dataobj).shape == shape
        assert splits[entry["participant_id"]] == entry["split"]


@pytest.mark.slow
def test_group_fits_nyul_on_training_subjects_only(example_run):
    _, _, out = example_run
    splits = dict(line.split("\t") for line in (out / "splits.tsv").read_text().splitlines()[1:])
    standard = json.loads((out / "nyul_standard.json").read_text())
    fitted_subjects = {name.split("_")[0] for name in standard["subjects"]}
    assert fitted_subjects == {s for s, split in splits.items() if split == "train"}
    for rel in T1W:
        nyul = _derivative(out, rel, "desc-nyul")
        data = np.asanyarray(nib.load(nyul).dataobj)
        mask = np.asanyarray(nib.load(_derivative(out, rel, "desc-brain", "mask")).dataobj) > 0
        assert np.all(data[~mask] == 0)
        low, high = np.percentile(data[mask], [1, 99])
        # every image's own landmarks land on the standard scale
        assert abs(low - standard["landmarks"][0]) < 1 and abs(high - standard["landmarks"][-1]) < 1


@pytest.mark.slow
def test_reports_metrics_and_provenance(example_run):
    _, _, out = example_run
    for subject in ("sub-01", "sub-02"):
        html = (out / f"{subject}.html").read_text()
        assert "<img" in html
        prov = json.loads((out / "provenance" / f"{subject}_prov.jsonld").read_text())
        assert "@context" in prov or "@graph" in prov
    metrics = json.loads((out / "sub-01" / "anat" / "sub-01_desc-qc_metrics.json").read_text())
    assert metrics
    assert (out / "group.html").is_file()


@pytest.mark.slow
def test_two_patient_positions_give_the_same_head_in_ras(example_run, tmp_path):
    """HFS and HFDL are one head lying differently: the DICOM patient frame follows the
    head, so after conforming a small rigid motion maps one brain onto the other.

    The HFDL field of view cuts off part of the brain, so the volumes differ; a swapped
    or mirrored axis shows instead as a poor match (NCC 0.13 swapped, 0.65 mirrored
    against 0.80 here) or a large rotation.
    """
    import ants

    _, _, out = example_run
    brains = []
    for session in ("hfs", "hfdl"):
        anat = out / f"sub-02/ses-{session}/anat"
        head = ants.image_read(str(anat / f"sub-02_ses-{session}_desc-preproc_T1w.nii.gz"))
        mask = ants.image_read(str(anat / f"sub-02_ses-{session}_desc-brain_mask.nii.gz"))
        brains.append(ants.resample_image(head * mask, (2, 2, 2), False, 0))
    fixed, moving = brains
    reg = ants.registration(
        fixed, moving, type_of_transform="Rigid", random_seed=1, outprefix=str(tmp_path / "rigid_")
    )
    rotation = np.array(ants.read_transform(reg["fwdtransforms"][0]).parameters[:9])
    angle = np.degrees(np.arccos((np.trace(rotation.reshape(3, 3)) - 1) / 2))
    assert angle < 20, f"the heads differ by a {angle:.0f} degree rotation"
    a, b = fixed.numpy(), reg["warpedmovout"].numpy()
    overlap = (a > 0) & (b > 0)
    assert np.corrcoef(a[overlap], b[overlap])[0, 1] > 0.75


# --- the ecosystem's clients read the example's outputs (issue 16) ---------------------


@pytest.mark.slow
def test_derivatives_are_valid_bids_for_the_official_validator(example_run):
    from tests.test_bids_validator import assert_no_validator_errors

    code, group_code, out = example_run
    assert code == group_code == 0
    assert "mriflow" in (out / "README.md").read_text()
    issues = assert_no_validator_errors(out)
    # nothing mriflow writes may hide from the validator by being ignored wholesale
    assert not [i for i in issues if i["code"] == "GZIP_HEADER_FILENAME"]


@pytest.mark.slow
def test_no_gzip_output_carries_a_file_name(example_run):
    from tests.test_bids_validator import gzip_files_with_names

    _, _, out = example_run
    assert len(list(out.rglob("*.nii.gz"))) > 30
    assert gzip_files_with_names(out) == []


_ENTITY_OF_KEY = {"sub": "subject", "ses": "session", "res": "res"}


@pytest.mark.slow
def test_pybids_finds_every_published_image_by_entities(example_run):
    """Every image and transform under sub-*/anat is found, and found alone, by the
    entities of its name (pybids' derivatives config: desc, space, label, from/to/mode)."""
    bids = pytest.importorskip("bids")
    _, _, out = example_run
    layout = bids.BIDSLayout(
        out, validate=False, is_derivative=True, config=["bids", "derivatives"]
    )
    published = sorted(
        p for p in out.glob("sub-*/**/anat/*") if p.name.endswith((".nii.gz", ".h5"))
    )
    kinds = {
        "desc-preproc": 0,
        "desc-brain_mask": 0,
        "dseg": 0,
        "probseg": 0,
        "xfm": 0,
        SPACE: 0,
    }
    for path in published:
        stem, _, ext = path.name.partition(".")
        *pairs, suffix = stem.split("_")
        query = {_ENTITY_OF_KEY.get(k, k): v for k, v in (p.split("-", 1) for p in pairs)}
        for entity in ("space", "desc", "label", "res"):
            query.setdefault(entity, bids.layout.Query.NONE)
        found = layout.get(suffix=suffix, extension=f".{ext}", return_type="file", **query)
        assert found == [str(path)], (path.name, query, found)
        for kind in kinds:
            kinds[kind] += kind in path.name
    # three T1w images: every kind of output for each of them
    assert kinds["desc-preproc"] >= 6 and kinds["desc-brain_mask"] >= 6, kinds
    assert kinds["dseg"] >= 6 and kinds["probseg"] >= 9 and kinds["xfm"] == 6, kinds
    assert kinds[SPACE] >= 12, kinds
    xfm = layout.get(
        subject="01",
        suffix="xfm",
        extension=".h5",
        mode="image",
        **{"from": "T1w", "to": "MNI152NLin2009aSym"},
    )
    assert [f.filename for f in xfm] == ["sub-01_from-T1w_to-MNI152NLin2009aSym_mode-image_xfm.h5"]
    assert layout.get_metadata(xfm[0].path)["ToSpace"] == "MNI152NLin2009aSym"


def _training_rows_first(out):
    """``dataset.csv``'s rows, the training split first: the example's two subjects split
    1 train / 1 test, so a batch of 2 holds the training row and the next one."""
    rows = list(csv.DictReader((out / "dataset.csv").open()))
    assert [r["split"] for r in rows].count("train") >= 1
    return sorted(rows, key=lambda r: r["split"] != "train")


def _assert_batch_of_two(images, masks, rows, out, shape):
    """The loader's batch holds the first two rows' voxels, unchanged, with their masks."""
    assert tuple(images.shape) == (2, 1, *shape) and tuple(masks.shape) == (2, 1, *shape)
    for i, row in enumerate(rows[:2]):
        expected = np.asanyarray(nib.load(out / row["image"]).dataobj)
        assert np.allclose(np.asarray(images[i, 0]), expected, atol=1e-4), row["image"]
        expected_mask = np.asanyarray(nib.load(out / row["mask"]).dataobj)
        assert np.array_equal(np.asarray(masks[i, 0]), expected_mask), row["mask"]
        assert set(np.unique(expected_mask).tolist()) == {0, 1}


@pytest.mark.slow
def test_torchio_loads_a_batch_of_the_training_split(example_run):
    tio = pytest.importorskip("torchio")
    _, _, out = example_run
    shape = tuple(load_config(out / "mriflow_config.toml").export.target_shape)
    rows = _training_rows_first(out)
    subjects = [
        tio.Subject(
            image=tio.ScalarImage(out / row["image"]),
            mask=tio.LabelMap(out / row["mask"]),
            participant_id=row["participant_id"],
        )
        for row in rows
    ]
    loader = tio.SubjectsLoader(tio.SubjectsDataset(subjects), batch_size=2, shuffle=False)
    batch = next(iter(loader))
    assert list(batch["participant_id"]) == [r["participant_id"] for r in rows[:2]]
    _assert_batch_of_two(batch["image"][tio.DATA], batch["mask"][tio.DATA], rows, out, shape)


@pytest.mark.slow
def test_monai_loads_a_batch_of_the_training_split(example_run):
    pytest.importorskip("monai")
    from monai.data import DataLoader, Dataset
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

    _, _, out = example_run
    shape = tuple(load_config(out / "mriflow_config.toml").export.target_shape)
    rows = _training_rows_first(out)
    data = [{"image": str(out / r["image"]), "mask": str(out / r["mask"])} for r in rows]
    keys = ["image", "mask"]
    transform = Compose([LoadImaged(keys=keys), EnsureChannelFirstd(keys=keys)])
    loader = DataLoader(Dataset(data, transform=transform), batch_size=2, num_workers=0)
    batch = next(iter(loader))
    _assert_batch_of_two(batch["image"], batch["mask"], rows, out, shape)
