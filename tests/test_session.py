"""Multi-contrast sessions: the reference rule, every contrast aligned to the T1w, one
mask, a multi-channel export that TorchIO and MONAI load, and failures that stay local."""

from __future__ import annotations

import csv
import dataclasses
import gzip
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from mriflow.bids.discovery import collect_inputs
from mriflow.bids.outputs import channel_names
from mriflow.cli.run import main
from mriflow.config import Config
from mriflow.image.coregistration import read_itk_affine, rms_deviation
from mriflow.image.slices import extract_slice, slice_layout
from mriflow.ml.channel_stack import ChannelStackError, channel_order, stack_channels
from mriflow.ml.manifest import (
    ManifestEntry,
    ManifestError,
    select_channels,
    select_rows,
    select_stacks,
)
from mriflow.ml.slices import export_slices
from mriflow.workflows.base import init_single_subject_wf
from mriflow.workflows.session import init_session_wf
from tests.helpers import make_bids_dataset, write_phantom_t1w

QUICK = [
    "--set", "registration.enabled=false",
    "--set", "denoise.method=none",
    "--set", "segmentation.method=gmm",
]  # fmt: skip


def _session_dataset(root: Path, subjects=("01", "02")) -> Path:
    """Sessions of T1w + ce-T1w + T2w + FLAIR built from one phantom head per subject:
    the T2w has the inverted contrast and a coarser, shifted grid."""
    make_bids_dataset(root, {s: ["ses-a"] for s in subjects})
    for subject in subjects:
        anat = root / f"sub-{subject}/ses-a/anat"
        t1 = anat / f"sub-{subject}_ses-a_T1w.nii.gz"
        shutil.copy(t1, anat / f"sub-{subject}_ses-a_ce-gadolinium_T1w.nii.gz")
        img = nib.load(t1)
        data = np.asarray(img.dataobj).astype(np.float32)
        t2 = np.where(data > 80, 50.0, np.where(data > 30, 120.0, data))
        nib.save(
            nib.Nifti1Image(t2.astype(np.int16), img.affine), anat / f"{t1.name[:-10]}T2w.nii.gz"
        )
        flair = (0.5 * data).astype(np.int16)
        nib.save(nib.Nifti1Image(flair, img.affine), anat / f"{t1.name[:-10]}FLAIR.nii.gz")
    return root


# ------------------------------------------------------------------ reference rule
def test_reference_is_the_non_contrast_t1w_with_the_finest_voxels(tmp_path):
    root = make_bids_dataset(tmp_path / "raw", {"01": ["ses-a"]})
    anat = root / "sub-01/ses-a/anat"
    (anat / "sub-01_ses-a_T1w.nii.gz").unlink()
    write_phantom_t1w(anat / "sub-01_ses-a_run-1_T1w.nii.gz", zooms=(2.0, 2.0, 2.0))
    write_phantom_t1w(anat / "sub-01_ses-a_run-2_T1w.nii.gz", zooms=(1.5, 1.5, 1.5))
    write_phantom_t1w(anat / "sub-01_ses-a_ce-gad_run-3_T1w.nii.gz", zooms=(1.0, 1.0, 1.0))
    write_phantom_t1w(anat / "sub-01_ses-a_T2w.nii.gz")
    (subject,) = collect_inputs(root)
    (session,) = subject.sessions()
    assert session.reference.path.name == "sub-01_ses-a_run-2_T1w.nii.gz"
    assert {i.path.name for i in session.others} == {
        "sub-01_ses-a_run-1_T1w.nii.gz",
        "sub-01_ses-a_ce-gad_run-3_T1w.nii.gz",
        "sub-01_ses-a_T2w.nii.gz",
    }
    # the rule can be overridden by entities
    (chosen,) = subject.sessions("run-1")
    assert chosen.reference.path.name == "sub-01_ses-a_run-1_T1w.nii.gz"


def test_session_without_a_t1w_fails_its_subject_only_naming_the_files(tmp_path):
    root = make_bids_dataset(tmp_path / "raw", {"01": ["ses-a", "ses-b"], "02": [""]})
    ses_b = root / "sub-01/ses-b/anat"
    (ses_b / "sub-01_ses-b_T1w.nii.gz").rename(ses_b / "sub-01_ses-b_T2w.nii.gz")
    subjects = {s.subject: s for s in collect_inputs(root)}
    assert subjects["02"].error is None
    error = subjects["01"].error
    assert "sub-01/ses-b/anat/sub-01_ses-b_T2w.nii.gz" in error and "no T1w" in error


def test_unreadable_contrast_is_left_out_and_named_the_t1w_still_runs(tmp_path):
    root = _session_dataset(tmp_path / "raw", subjects=("01",))
    broken = root / "sub-01/ses-a/anat/sub-01_ses-a_FLAIR.nii.gz"
    broken.write_bytes(b"not an image")
    (subject,) = collect_inputs(root)
    assert subject.error is None
    assert (
        str(broken) in subject.image_errors
        and "not a readable image" in (subject.image_errors[str(broken)])
    )
    assert broken not in [i.path for i in subject.images]


def test_channel_names_are_the_same_in_every_subject_and_never_clash():
    reference = ({"subject": "01", "run": "1"}, "T1w")
    others = [
        ({"subject": "01", "ceagent": "gad"}, "T1w"),
        ({"subject": "01", "run": "2"}, "T1w"),
        ({"subject": "01", "acquisition": "ax", "run": "1"}, "T2w"),
        ({"subject": "01", "acquisition": "sag", "run": "2"}, "T2w"),
        ({"subject": "01"}, "FLAIR"),
    ]
    assert channel_names(reference, others) == [
        "ce-gad_T1w",
        "run-2_T1w",
        "acq-ax_run-1_T2w",
        "acq-sag_run-2_T2w",
        "FLAIR",
    ]


def test_missing_channels_drop_the_session_never_shift_the_channels():
    def entry(pid, *names):
        return ManifestEntry(pid, image=f"{pid}.nii.gz", channels={n: f"{pid}_{n}" for n in names})

    entries = [
        entry("sub-01", "T2w", "FLAIR"),
        entry("sub-02", "FLAIR", "T2w"),
        entry("sub-03", "T2w"),
    ]
    kept, channels, notes = select_channels(entries)  # default: channels everyone has
    assert channels == ["T2w"] and len(kept) == 3
    assert notes == ["FLAIR: only 2 of 3 entries have it"]
    kept, channels, notes = select_channels(entries, ["FLAIR", "T2w"])  # asked for both
    assert channels == ["FLAIR", "T2w"]
    assert [e.participant_id for e in kept] == ["sub-01", "sub-02"]
    assert [list(e.channels) for e in kept] == [["FLAIR", "T2w"], ["FLAIR", "T2w"]]
    assert notes == ["sub-03: no FLAIR"]
    # the stacked layout: a session's stack is built in the requested order or not at all
    assert channel_order(["T2w", "FLAIR"], ["FLAIR", "T2w"]) == (["FLAIR", "T2w"], [])
    assert channel_order(["T2w"], ["FLAIR", "T2w"]) == ([], ["FLAIR"])
    assert channel_order(["T2w", "FLAIR"]) == (["T2w", "FLAIR"], [])
    # ... and the manifest keeps only stacks of exactly the chosen channels
    stacks = [
        ManifestEntry("sub-01", "a", stack="s1", stack_channels=["T1w", "FLAIR", "T2w"]),
        ManifestEntry("sub-02", "b", stack="s2", stack_channels=["T1w", "T2w", "FLAIR"]),
        ManifestEntry("sub-03", "c"),
    ]
    kept, order, notes = select_stacks(stacks, ["FLAIR", "T2w"])
    assert order == ["T1w", "FLAIR", "T2w"]
    assert [(e.participant_id, e.image, e.channels) for e in kept] == [("sub-01", "s1", {})]
    assert notes == [
        "sub-02: its stack has channels ['T1w', 'T2w', 'FLAIR'], not ['T1w', 'FLAIR', 'T2w']",
        "sub-03: no multi-channel stack",
    ]
    # what the manifest writer gets: the stacks' channel order, or a clear error
    stacks = [dataclasses.replace(e, channels={"FLAIR": "f", "T2w": "t"}) for e in stacks]
    rows = select_rows(stacks, ["FLAIR", "T2w"], "stacked")
    assert rows.stacked and rows.columns == ["T1w", "FLAIR", "T2w"]
    assert [e.participant_id for e in rows.entries] == ["sub-01"]
    assert "channels last" in rows.descriptions["image"]
    files = select_rows(entries, ["FLAIR", "T2w"])
    assert not files.stacked and files.columns == ["image", "image_FLAIR", "image_T2w"]
    assert files.notes == ["sub-03: no FLAIR (left out)"]
    with pytest.raises(ManifestError, match="no session has a stack of the channels"):
        select_rows(stacks[1:], ["FLAIR", "T2w"], "stacked")


def test_stacking_refuses_other_grids_and_a_missing_channel_gets_no_stack(tmp_path, caplog):
    grid = nib.Nifti1Image(np.ones((4, 5, 6), np.float32), np.eye(4))
    shifted = np.eye(4)
    shifted[0, 3] = 1.0
    other = tmp_path / "sub-01_desc-model_T2w.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((4, 5, 6), np.float32), shifted), other)
    with pytest.raises(ChannelStackError, match=f"^{other}: affine differs"):
        stack_channels([grid, nib.load(other)])
    root = _session_dataset(tmp_path / "raw", subjects=("01",))
    (subject,) = collect_inputs(root)
    config = Config()
    config.set("export.channel_layout", "stacked")
    config.set("coregistration.channels", ["T2w", "PDw"])
    workflow = init_single_subject_wf(subject, config=config, bids_dir=root, out_dir=tmp_path)
    plan = workflow.get_node("publish").inputs.plan
    assert not [item for item in plan if "_channels" in item["relpath"]]
    assert "sub-01 ses-a: no PDw: no multi-channel stack" in caplog.text


def test_slices_of_every_channel_share_one_index(tmp_path):
    shape, affine = (20, 24, 20), np.eye(4)
    rng = np.random.default_rng(0)
    t1 = nib.Nifti1Image(rng.random(shape, dtype=np.float32), affine)
    t2 = nib.Nifti1Image(rng.random(shape, dtype=np.float32) + 5, affine)
    mask = np.zeros(shape, np.uint8)
    mask[4:16, 4:20, 6:14] = 1
    export = export_slices(
        t1, tmp_path, "sub-01_desc-model", subject="01", space="T1w",
        mask=nib.Nifti1Image(mask, affine), fmt="stack", channels={"T2w": t2},
    )  # fmt: skip
    rows = list(csv.DictReader(open(export.index_file)))
    assert len(rows) == 8 and all(r["file_T2w"] for r in rows)
    stack_t1 = np.load(tmp_path / rows[0]["file"])
    stack_t2 = np.load(tmp_path / rows[0]["file_T2w"])
    assert stack_t1.shape == stack_t2.shape
    layout = slice_layout(affine, "axial")
    for row in rows:  # the same slice position in both channels
        k, z = int(row["stack_index"]), int(row["index"])
        np.testing.assert_array_equal(stack_t2[k], extract_slice(t2.get_fdata(), layout, z))
        np.testing.assert_array_equal(stack_t1[k], extract_slice(t1.get_fdata(), layout, z))
    assert json.loads(export.json_file.read_text())["Channels"] == ["T1w", "T2w"]


def test_session_workflow_composes_in_a_user_workflow():
    config = Config()
    config.set("registration.enabled", False)
    session = init_session_wf(config=config, contrasts={"T2w": "T2w", "FLAIR": "FLAIR"})
    user = pe.Workflow(name="user_wf")
    sink = pe.Node(niu.IdentityInterface(fields=["t2w", "flair", "mask"]), name="mine")
    user.connect([
        (session, sink, [
            ("outputnode.T2w__preproc", "t2w"),
            ("outputnode.FLAIR__model", "flair"),
            ("outputnode.brain_mask", "mask"),
        ]),
    ])  # fmt: skip
    user._generate_flatgraph()  # a DAG, every connection valid
    names = {node.fullname for node in user._graph.nodes()}
    assert "user_wf.session_wf.anat_T2w_wf.coregister" in names
    assert "user_wf.session_wf.slices" in names  # one slice export for all channels


# ------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def session_run(tmp_path_factory):
    """Two subjects of T1w + ce-T1w + T2w + FLAIR; sub-02's T2w is truncated (readable
    header, broken data), so it fails while sub-02's other images are published."""
    tmp = tmp_path_factory.mktemp("session")
    root = _session_dataset(tmp / "raw")
    t2w = root / "sub-02/ses-a/anat/sub-02_ses-a_T2w.nii.gz"
    raw = gzip.decompress(t2w.read_bytes())
    t2w.write_bytes(gzip.compress(raw)[: len(gzip.compress(raw)) // 2])
    out, work = tmp / "out", tmp / "work"
    common = ["-w", str(work), *QUICK, "--set", "coregistration.initialisation=header"]
    # the 4D stacks come on top of the per-channel files the other tests check
    stacked = ["--set", "export.channel_layout=stacked"]
    code = main([str(root), str(out), "participant", "--nprocs", "2", *common, *stacked])
    channels = "ce-gadolinium_T1w,T2w,FLAIR"
    group = main(
        [str(root), str(out), "group", *common, "--set", f"coregistration.channels={channels}"]
    )
    # the group level of the stacked layout, on a copy (its manifest lists the stacks)
    shutil.copytree(out, tmp / "out_stacked")
    stacked_group = main(
        [str(root), str(tmp / "out_stacked"), "group", "-w", str(tmp / "work_stacked"), *QUICK,
         *stacked, "--set", "coregistration.channels=FLAIR,ce-gadolinium_T1w"]
    )  # fmt: skip
    assert stacked_group == 0
    return root, out, code, group, t2w


@pytest.mark.slow
def test_every_contrast_is_on_the_reference_grid_with_its_transform(session_run):
    _, out, _, _, _ = session_run
    anat = out / "sub-01/ses-a/anat"
    reference = nib.load(anat / "sub-01_ses-a_desc-preproc_T1w.nii.gz")
    mask_img = nib.load(anat / "sub-01_ses-a_desc-brain_mask.nii.gz")
    for name in ("ce-gadolinium_desc-preproc_T1w", "desc-preproc_T2w", "desc-preproc_FLAIR"):
        image = nib.load(anat / f"sub-01_ses-a_{name}.nii.gz")
        assert image.shape == reference.shape
        np.testing.assert_allclose(image.affine, reference.affine, atol=1e-4)
        sidecar = json.loads((anat / f"sub-01_ses-a_{name}.json").read_text())
        assert sidecar["SpatialReference"] == (
            "bids::sub-01/ses-a/anat/sub-01_ses-a_desc-preproc_T1w.nii.gz"
        )
        assert [s["Name"] for s in sidecar["Steps"]][-2:] == ["n4", "to_t1w"]
        assert "coregistration" in [s["Name"] for s in sidecar["Steps"]]
    # every contrast is the same phantom head on the same grid: the transform found
    # is the identity, within half a raw voxel (2 mm) over the brain
    for xfm in anat.glob("sub-01_ses-a_*from-*_to-T1w_mode-image_xfm.txt"):
        assert rms_deviation(read_itk_affine(xfm), np.eye(4), mask_img) < 1.0, xfm.name
    for contrast in ("T2w", "FLAIR"):
        xfm = anat / f"sub-01_ses-a_from-{contrast}_to-T1w_mode-image_xfm.txt"
        assert xfm.read_text().startswith("#Insight Transform File V1.0")


@pytest.mark.slow
def test_four_channel_export_loads_in_torchio_and_monai(session_run):
    tio = pytest.importorskip("torchio")
    pytest.importorskip("monai")
    from monai.data import DataLoader, Dataset
    from monai.transforms import Compose, ConcatItemsd, EnsureChannelFirstd, LoadImaged

    _, out, _, group, _ = session_run
    rows = list(csv.DictReader(open(out / "dataset.csv")))
    # sub-02 lacks the T2w asked for: left out of the 4-channel manifest, never shifted
    assert [r["participant_id"] for r in rows] == ["sub-01"]
    channels = ["image", "image_ce-gadolinium_T1w", "image_T2w", "image_FLAIR"]
    assert json.loads((out / "dataset.json").read_text())["Channels"] == channels
    keys = sorted(channels)  # any order: the manifest names each channel
    rows = rows * 2  # a batch of two
    subjects = [tio.Subject({k: tio.ScalarImage(out / r[k]) for k in keys}) for r in rows]
    batch = next(iter(tio.SubjectsLoader(tio.SubjectsDataset(subjects), batch_size=2)))
    shapes = {tuple(batch[k][tio.DATA].shape) for k in keys}
    assert len(shapes) == 1 and next(iter(shapes))[:2] == (2, 1)
    data = [{k: str(out / r[k]) for k in channels} for r in rows]
    transform = Compose(
        [LoadImaged(keys=channels), EnsureChannelFirstd(keys=channels),
         ConcatItemsd(keys=channels, name="x")]
    )  # fmt: skip
    x = next(iter(DataLoader(Dataset(data, transform=transform), batch_size=2)))["x"]
    assert tuple(x.shape[:2]) == (2, 4)
    slices = list(
        csv.DictReader(open(out / "sub-01/ses-a/slices/sub-01_ses-a_desc-model_slices.csv"))
    )
    assert {"file", "file_ce-gadolinium_T1w", "file_T2w", "file_FLAIR"} <= set(slices[0])


@pytest.mark.slow
def test_stacked_layout_is_one_4d_volume_channels_last(session_run):
    tio = pytest.importorskip("torchio")
    pytest.importorskip("monai")
    from monai.transforms import EnsureChannelFirst, LoadImage

    from tests.test_bids_validator import validator_issues

    _, out, _, _, _ = session_run
    anat = out / "sub-01/ses-a/anat"
    path = anat / "sub-01_ses-a_desc-model_channels.nii.gz"
    sidecar = json.loads((anat / "sub-01_ses-a_desc-model_channels.json").read_text())
    index = out / "sub-01/ses-a/slices/sub-01_ses-a_desc-model_slices.csv"
    header = next(csv.reader(open(index)))
    others = [column[len("file_") :] for column in header if column.startswith("file_")]
    assert sorted(others) == ["FLAIR", "T2w", "ce-gadolinium_T1w"]
    # the reference first, then the session's channels in the slices' order
    assert sidecar["Channels"] == ["T1w", *others]
    files = {
        "T1w": "desc-model_T1w",
        "ce-gadolinium_T1w": "ce-gadolinium_desc-model_T1w",
        "T2w": "desc-model_T2w",
        "FLAIR": "desc-model_FLAIR",
    }
    channels = [anat / f"sub-01_ses-a_{files[name]}.nii.gz" for name in sidecar["Channels"]]
    assert sidecar["Sources"][1:] == [f"bids::{p.relative_to(out).as_posix()}" for p in channels]
    stack = nib.load(path)
    first = nib.load(channels[0])
    assert stack.shape == (*first.shape, 4)
    np.testing.assert_allclose(stack.affine, first.affine, atol=1e-6)
    data = np.asanyarray(stack.dataobj)
    for i, channel in enumerate(channels):  # channel i is the 3D volume i, voxel for voxel
        np.testing.assert_array_equal(data[..., i], np.asanyarray(nib.load(channel).dataobj))
    assert tio.ScalarImage(path).shape == (4, *first.shape)
    loaded = EnsureChannelFirst()(LoadImage(image_only=True)(str(path)))
    assert tuple(loaded.shape) == (4, *first.shape)
    # sub-02 ran again without its broken T2w: three channels, none filled in
    sub02 = out / "sub-02/ses-a/anat/sub-02_ses-a_desc-model_channels"
    assert nib.load(f"{sub02}.nii.gz").shape[-1] == 3
    assert json.loads(open(f"{sub02}.json").read())["Channels"] == [
        "T1w",
        *(name for name in others if name != "T2w"),
    ]
    assert [i for i in validator_issues(out) if i.get("severity") == "error"] == []
    # group level, channels FLAIR,ce-gadolinium_T1w: sub-01's stack also holds the T2w,
    # so only sub-02's stack is listed, as the image (no image_<channel> columns)
    stacked = out.parent / "out_stacked"
    (row,) = list(csv.DictReader(open(stacked / "dataset.csv")))
    assert row["participant_id"] == "sub-02" and not any(k.startswith("image_") for k in row)
    assert row["image"] == "sub-02/ses-a/anat/sub-02_ses-a_desc-model_channels.nii.gz"
    manifest = json.loads((stacked / "dataset.json").read_text())
    assert manifest["Channels"] == ["T1w", "FLAIR", "ce-gadolinium_T1w"]
    assert manifest["ChannelLayout"] == "stacked"


@pytest.mark.slow
def test_a_broken_contrast_fails_alone_named_and_the_t1w_is_published(session_run):
    _, out, code, _, t2w = session_run
    assert code == 1
    anat = out / "sub-02/ses-a/anat"
    assert (anat / "sub-02_ses-a_desc-preproc_T1w.nii.gz").is_file()
    assert (anat / "sub-02_ses-a_desc-preproc_FLAIR.nii.gz").is_file()
    assert not list(anat.glob("*T2w*"))
    status = json.loads((out / "logs/sub-02_status.json").read_text())
    assert status["status"] == "ok" and str(t2w) in status["reason"]
    summary = sorted((out / "logs").glob("run-*_summary.json"))[-1]
    assert json.loads(summary.read_text())["Subjects"][1]["status"] == "ok"


@pytest.mark.slow
def test_longitudinal_option_puts_later_sessions_on_the_first_sessions_grid(tmp_path):
    from tests.test_bids_validator import validator_issues

    root = make_bids_dataset(tmp_path / "raw", {"01": ["ses-a", "ses-b"]})
    # the second visit: the same head, placed 3 mm off by its header
    later = root / "sub-01/ses-b/anat/sub-01_ses-b_T1w.nii.gz"
    img = nib.load(later)
    moved = img.affine.copy()
    moved[:3, 3] += [3.0, 0.0, 0.0]
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), moved), later)
    out = tmp_path / "out"
    args = [str(root), str(out), "participant", "-w", str(tmp_path / "w"), *QUICK]
    assert main([*args, "--set", "longitudinal.align=true"]) == 0
    base = nib.load(out / "sub-01/ses-a/anat/sub-01_ses-a_desc-preproc_T1w.nii.gz")
    anat_b = out / "sub-01/ses-b/anat"
    aligned = nib.load(anat_b / "sub-01_ses-b_space-longitudinal_desc-preproc_T1w.nii.gz")
    mask = nib.load(anat_b / "sub-01_ses-b_space-longitudinal_desc-brain_mask.nii.gz")
    assert aligned.shape == mask.shape == base.shape
    np.testing.assert_allclose(aligned.affine, base.affine, atol=1e-4)
    xfm = read_itk_affine(anat_b / "sub-01_ses-b_from-T1w_to-longitudinal_mode-image_xfm.txt")
    shift = np.eye(4)
    shift[:3, 3] = [3.0, 0.0, 0.0]  # ses-a points -> ses-b points
    base_mask = nib.load(out / "sub-01/ses-a/anat/sub-01_ses-a_desc-brain_mask.nii.gz")
    assert rms_deviation(xfm, shift, base_mask) < 1.0
    sidecar = json.loads(
        (anat_b / "sub-01_ses-b_space-longitudinal_desc-preproc_T1w.json").read_text()
    )
    assert sidecar["SpatialReference"].endswith("sub-01_ses-a_desc-preproc_T1w.nii.gz")
    assert [i for i in validator_issues(out) if i.get("severity") == "error"] == []


def test_reference_face_is_removed_from_another_contrast_on_its_own_grid(tmp_path):
    """--deface: the T1w's face mask, brought onto a coarser, shifted contrast grid through
    the co-registration transform, removes every contrast voxel that lies in it."""
    from mriflow.image.coregistration import mask_on_moving_grid
    from mriflow.image.deface import apply_face_mask

    t1_affine = np.eye(4)
    face = np.zeros((40, 40, 40), np.uint8)
    face[10:30, 30:40, 0:12] = 1  # front and low: the "face"
    moving_affine = np.diag([2.0, 2.0, 2.0, 1.0])
    moving_affine[:3, 3] = [1.0, -1.0, 0.5]
    contrast = nib.Nifti1Image(np.full((20, 20, 20), 7, np.int16), moving_affine)
    shift = np.eye(4)
    shift[:3, 3] = [1.5, 0.0, 0.0]  # reference point -> contrast point
    removed = mask_on_moving_grid(
        nib.Nifti1Image(face, t1_affine), contrast, shift, dilation_mm=2.0
    )
    defaced = apply_face_mask(contrast, np.asarray(removed.dataobj) > 0)
    # every contrast voxel whose centre maps into the face is zero
    ijk = np.argwhere(np.ones(contrast.shape, bool))
    world = ijk @ moving_affine[:3, :3].T + moving_affine[:3, 3]
    in_reference = world - shift[:3, 3]
    v = np.rint(in_reference).astype(int)
    inside = np.all((v >= 0) & (v < 40), axis=1)
    in_face = np.zeros(len(v), bool)
    in_face[inside] = face[tuple(v[inside].T)] > 0
    data = np.asarray(defaced.dataobj).reshape(-1)
    assert in_face.any() and not data[in_face].any()
    assert data[~in_face].astype(bool).mean() > 0.8  # the rest of the head stays
