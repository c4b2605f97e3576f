"""QC reports, IQM files and provenance on a phantom derivatives dataset; headless Chromium check.

The Chromium test renders each report and checks that every ``<img>`` loaded
(``naturalWidth > 0``), then saves a screenshot. It is skipped only when no
Chromium is installed and the ``CI`` environment variable is unset; in CI a
missing browser is a failure (``.ci/run`` installs Debian's ``chromium``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from mriflow.bids.publish import write_status
from mriflow.reports import figures as F
from mriflow.reports.html import (
    ReportFigure,
    ReportSection,
    read_step_runtimes,
    robust_z,
    write_group_report,
    write_subject_report,
)
from mriflow.reports.iqms import compute_subject_iqms, read_iqms
from mriflow.reports.provenance import build_provenance, write_provenance, write_workflow_graph
from tests.qc_phantoms import SPACE, build_derivatives, template_image

# noise SD per subject: 06 is far noisier than the rest (the group outlier)
SUBJECTS = {"01": 4.0, "02": 4.5, "03": 5.0, "04": 4.2, "05": 4.8, "06": 25.0}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("qc")
    raw_dir, out_dir = build_derivatives(root, SUBJECTS)
    templates = {SPACE: template_image()}
    for label in SUBJECTS:
        compute_subject_iqms(out_dir, label, templates=templates)
    report = write_subject_report(out_dir, "01", templates=templates)
    write_subject_report(out_dir, "06", templates=templates, make_figures=False)
    group = write_group_report(out_dir)
    return {"raw": raw_dir, "out": out_dir, "report": report, "group": group,
            "templates": templates}  # fmt: skip


# --------------------------------------------------------------------------------------
# IQM files
# --------------------------------------------------------------------------------------


def test_iqm_files_name_their_source_and_hold_the_metrics(dataset):
    out = dataset["out"]
    json_path = out / "sub-01/anat/sub-01_desc-qc_metrics.json"
    payload = json.loads(json_path.read_text())
    assert payload["Sources"][0] == "bids:raw:sub-01/anat/sub-01_T1w.nii.gz"
    assert payload["Sources"][1] == "bids::sub-01/anat/sub-01_desc-preproc_T1w.nii.gz"
    for key in ("cnr", "cjv", "efc", "fber", "wm2max", "snr_total", "icvs_gm", "reg_ncc"):
        assert isinstance(payload[key], float), key
    assert "inu" in payload["Skipped"]  # no bias field is published
    header, row = (out / "sub-01/anat/sub-01_desc-qc_metrics.tsv").read_text().splitlines()
    columns = header.split("\t")
    assert columns[:3] == ["participant_id", "session_id", "source"]
    assert row.split("\t")[0] == "sub-01"
    assert float(row.split("\t")[columns.index("cnr")]) == pytest.approx(payload["cnr"])


def test_noisier_subject_has_lower_cnr(dataset):
    rows = {r["participant_id"]: r for r in read_iqms(dataset["out"])}
    assert set(rows) == {f"sub-{s}" for s in SUBJECTS}
    assert rows["sub-06"]["cnr"] < 0.5 * rows["sub-01"]["cnr"]


# --------------------------------------------------------------------------------------
# subject report
# --------------------------------------------------------------------------------------


def _img_sources(html: str) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', html)


def test_subject_report_summary_and_figures(dataset):
    out, html = dataset["out"], dataset["report"].read_text()
    assert dataset["report"] == out / "sub-01.html"
    assert "bids:raw:sub-01/anat/sub-01_T1w.nii.gz" in html
    assert "2 x 2 x 2 &rarr; 2 x 2 x 2" in html  # voxel size before -> after
    # every step of the chain, in order, with its software
    positions = [html.index(f"<td>{name}</td>") for name in
                 ("conform", "n4", "skull_strip", "segmentation", "registration")]  # fmt: skip
    assert positions == sorted(positions)
    assert "SimpleITK" in html and "shrink_factor=4" in html
    sources = _img_sources(html)
    assert len(sources) == 5
    for src in sources:
        assert not src.startswith("/") and src.startswith("sub-01/figures/")
        assert (out / src).stat().st_size > 1000
    for title in ("Raw vs preprocessed", "Brain mask", "Tissue segmentation",
                  f"Registration to {SPACE}", "Intensity histograms"):  # fmt: skip
        assert title in html
    assert "cnr" in html and "No errors" in html


def test_subject_report_lists_errors_escaped_and_extra_figures(dataset, tmp_path):
    out = dataset["out"]
    record = write_status(out, "02", ok=False, run_id="x", reason="skull strip failed")
    extra = F.plot_mask_contour(
        nib.load(str(out / "sub-02/anat/sub-02_desc-preproc_T1w.nii.gz")),
        nib.load(str(out / "sub-02/anat/sub-02_desc-brain_mask.nii.gz")),
        tmp_path / "outside.png",
        n_slices=2,
    )
    report = write_subject_report(
        out, "sub-02", make_figures=False,
        sections=[ReportSection("N4 bias field", [ReportFigure(extra, "Bias <field>", "c")])],
        errors=["<script>alert(1)</script>"],
    )  # fmt: skip
    html = report.read_text()
    assert "skull strip failed" in html
    assert "<script>alert(1)</script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "Bias &lt;field&gt;" in html
    assert _img_sources(html) == ["sub-02/figures/outside.png"]
    assert (out / "sub-02/figures/outside.png").is_file()
    record.unlink()


def test_run_time_per_step_from_nipype_work_dir(tmp_path):
    """A real Nipype run of the conform interface: its duration reaches the report."""
    from nipype.pipeline import engine as pe

    from mriflow.interfaces.spatial import Conform
    from tests.helpers import write_phantom_t1w

    raw_dir, out_dir = build_derivatives(tmp_path / "d", {"01": 4.0})
    t1w = write_phantom_t1w(tmp_path / "in" / "sub-01_T1w.nii.gz", shape=(20, 24, 20))
    wf = pe.Workflow("sub_01_wf", base_dir=str(tmp_path / "work"))
    wf.add_nodes([pe.Node(Conform(in_file=str(t1w), voxel_size=2.0), name="conform")])
    wf.run()
    runtimes = read_step_runtimes(tmp_path / "work", "01")
    assert len(runtimes) == 1 and runtimes[0][0]["Name"] == "conform"
    assert runtimes[0][1] >= 0
    # make the published chains' conform step identical to the one that ran
    for sidecar_path in (out_dir / "sub-01/anat").glob("*.json"):
        sidecar = json.loads(sidecar_path.read_text())
        sidecar["Steps"][0] = runtimes[0][0]
        sidecar_path.write_text(json.dumps(sidecar))
    html = write_subject_report(out_dir, "01", work_dir=tmp_path / "work",
                                make_figures=False).read_text()  # fmt: skip
    row = re.search(r"<td>conform</td>.*?<td class=\"num\">([^<]+)</td>", html, re.S)
    assert row and row.group(1) == f"{runtimes[0][1]:.1f}"


# --------------------------------------------------------------------------------------
# group report
# --------------------------------------------------------------------------------------


def test_robust_z():
    z = robust_z([10, 11, 9, 10, 10.5, 9.5, 40])
    assert abs(z[-1]) > 3 and np.all(np.abs(z[:-1]) < 3)
    assert np.all(robust_z([1.0, 1.0, 1.0]) == 0)
    assert np.isnan(robust_z([1.0, np.nan, 2.0, 3.0])[1])
    # MAD of 0 (most values equal) falls back to the mean absolute deviation
    assert robust_z([5, 5, 5, 5, 6])[-1] > 3
    # rounding noise is not spread
    assert np.all(robust_z([1.0, 1.0 - 1e-16, 1.0, 1.0 + 2e-16]) == 0)


def test_group_report_flags_the_noisy_subject(dataset):
    out, html = dataset["out"], dataset["group"].read_text()
    assert dataset["group"] == out / "group.html"
    rows = re.findall(r"<tr( class=\"outlier\")?>\s*<td><a href=\"(sub-\d+)\.html\">", html)
    flagged = {subject for cls, subject in rows if cls}
    assert flagged == {"sub-06"}
    assert len(rows) == len(SUBJECTS)
    assert 'href="sub-01.html"' in html
    for src in _img_sources(html):
        assert (out / src).is_file()
    tsv = (out / "group_desc-qc_metrics.tsv").read_text().splitlines()
    assert len(tsv) == 1 + len(SUBJECTS)


# --------------------------------------------------------------------------------------
# provenance
# --------------------------------------------------------------------------------------


def test_provenance_names_source_and_steps_in_order(dataset):
    out = dataset["out"]
    path = write_provenance(out, "01")
    assert path == out / "provenance" / "sub-01_prov.jsonld"
    document = json.loads(path.read_text())
    nodes = {n["@id"]: n for n in document["@graph"]}
    preproc = nodes["bids::sub-01/anat/sub-01_desc-preproc_T1w.nii.gz"]
    assert preproc["wasDerivedFrom"] == ["bids:raw:sub-01/anat/sub-01_T1w.nii.gz"]
    assert [nodes[a]["stepName"] for a in preproc["steps"]] == ["conform", "n4"]
    assert preproc["wasGeneratedBy"] == preproc["steps"][-1]
    n4 = nodes[preproc["steps"][1]]
    assert n4["wasInformedBy"] == preproc["steps"][0]
    assert n4["parameters"]["shrink_factor"] == 4
    assert any(nodes[a]["label"] == "SimpleITK" for a in n4["wasAssociatedWith"])
    assert "bids:raw:sub-01/anat/sub-01_T1w.nii.gz" in nodes[preproc["steps"][0]]["used"]
    dseg = nodes["bids::sub-01/anat/sub-01_dseg.nii.gz"]
    assert [nodes[a]["stepIndex"] for a in dseg["steps"]] == [1, 2, 3, 4]


def test_provenance_parses_as_rdf(dataset):
    rdflib = pytest.importorskip("rdflib")
    from rdflib.collection import Collection

    path = write_provenance(dataset["out"], "01")
    graph = rdflib.Graph()
    graph.parse(str(path), format="json-ld")
    prov = rdflib.Namespace("http://www.w3.org/ns/prov#")
    mf = rdflib.Namespace("https://github.com/mriflow/mriflow/ns#")
    preproc = rdflib.URIRef("bids::sub-01/anat/sub-01_desc-preproc_T1w.nii.gz")
    assert (preproc, prov.wasDerivedFrom,
            rdflib.URIRef("bids:raw:sub-01/anat/sub-01_T1w.nii.gz")) in graph  # fmt: skip
    chain = Collection(graph, graph.value(preproc, mf.steps))
    assert [str(graph.value(a, mf.stepName)) for a in chain] == ["conform", "n4"]
    assert len(set(graph.subjects(rdflib.RDF.type, prov.SoftwareAgent))) >= 5


def test_provenance_is_deterministic(dataset):
    out = dataset["out"]
    assert build_provenance(out, ["01"]) == build_provenance(out, ["01"])


def test_workflow_graph_is_written_as_dot_without_graphviz(tmp_path):
    from nipype.interfaces import utility as niu
    from nipype.pipeline import engine as pe

    wf = pe.Workflow("demo_wf", base_dir=str(tmp_path / "work"))
    a = pe.Node(niu.IdentityInterface(fields=["x"]), name="a")
    b = pe.Node(niu.IdentityInterface(fields=["x"]), name="b")
    wf.connect(a, "x", b, "x")
    written = write_workflow_graph(wf, tmp_path / "out", name="workflow")
    dot = tmp_path / "out" / "provenance" / "workflow.dot"
    assert dot in written
    text = dot.read_text()
    assert text.startswith("digraph") and "demo_wf_a -> demo_wf_b" in text
    assert not (tmp_path / "work").exists()  # nothing written into the work folder


# --------------------------------------------------------------------------------------
# figures
# --------------------------------------------------------------------------------------


def _png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")


def test_figures_resample_overlays_and_validate(tmp_path, dataset):
    out = dataset["out"]
    t1w = nib.load(str(out / "sub-01/anat/sub-01_desc-preproc_T1w.nii.gz"))
    mask = nib.load(str(out / "sub-01/anat/sub-01_desc-brain_mask.nii.gz"))
    # the same mask on a 1 mm grid in LAS orientation: resampled onto the image
    las = nib.as_closest_canonical(mask)
    data = np.asarray(las.dataobj)[::-1].repeat(2, 0).repeat(2, 1).repeat(2, 2)
    affine = las.affine @ np.diag([-0.5, 0.5, 0.5, 1.0])
    affine[:3, 3] = las.affine[:3, 3] + las.affine[:3, :3] @ [las.shape[0] - 1, 0, 0]
    fine = nib.Nifti1Image(data, affine)
    from mriflow.image.qc import dice

    on_grid = F._on_grid(fine, F._canonical(t1w, "t1w"), "mask") > 0
    assert dice(on_grid, np.asarray(mask.dataobj) > 0) > 0.95
    png = F.plot_mask_contour(t1w, fine, tmp_path / "mask.png", n_slices=3)
    width, height = _png_size(png)
    assert width > 300 and height > 300
    svg = F.plot_segmentation(t1w, nib.load(str(out / "sub-01/anat/sub-01_dseg.nii.gz")),
                              tmp_path / "seg.svg", n_slices=2)  # fmt: skip
    assert svg.read_text().lstrip().startswith("<?xml")
    with pytest.raises(ValueError, match=r"\.png or \.svg"):
        F.plot_mask_contour(t1w, mask, tmp_path / "mask.jpg")
    with pytest.raises(ValueError, match="mask is empty"):
        F.plot_mask_contour(t1w, nib.Nifti1Image(np.zeros(t1w.shape), t1w.affine),
                            tmp_path / "empty.png")  # fmt: skip
    with pytest.raises(ValueError, match="n_slices"):
        F.plot_mask_contour(t1w, mask, tmp_path / "x.png", n_slices=0)


def test_figure_slices_span_the_object():
    ref = np.zeros((50, 50, 50))
    ref[10:31, 5:45, 20:40] = 1
    slices = F.figure_slices(ref, 0, 4)
    assert slices[0] > 10 and slices[-1] < 30 and slices == sorted(set(slices))
    assert F.figure_slices(ref, 2, 1) == [30]


# --------------------------------------------------------------------------------------
# headless Chromium
# --------------------------------------------------------------------------------------

_CHECK_SCRIPT = """<script>
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var broken = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); })
                   .map(function (i) { return i.getAttribute("src"); });
  var out = document.createElement("pre");
  out.id = "mriflow-img-check";
  out.textContent = JSON.stringify({total: imgs.length, broken: broken});
  document.body.appendChild(out);
});
</script>"""


def _chromium() -> str | None:
    candidates = [os.environ.get("MRIFLOW_CHROMIUM"), "/usr/bin/chromium",
                  shutil.which("chromium"), shutil.which("chromium-browser"),
                  shutil.which("google-chrome")]  # fmt: skip
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


#: Offline, sandbox-free, no background traffic (the flags .ci/run uses too).
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)


def _run_chromium(browser: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    command = [
        browser,
        *CHROMIUM_FLAGS,
        f"--user-data-dir={profile}",
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def browser() -> str:
    found = _chromium()
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("CI is set but no Chromium found: install Debian's 'chromium' package")
        pytest.skip("headless Chromium not installed (apt-get install -y chromium); CI unset")
    return found


@pytest.mark.parametrize("page", ["sub-01.html", "group.html"])
def test_report_images_load_in_headless_chromium(dataset, browser, page, tmp_path):
    out = dataset["out"]
    html = (out / page).read_text()
    expected = len(_img_sources(html))
    assert expected > 0
    # a copy next to the report (same relative links) with a script that records the images
    probe = out / f".probe-{page}"
    probe.write_text(html.replace("</body>", _CHECK_SCRIPT + "</body>"))
    try:
        done = _run_chromium(browser, tmp_path / "profile", "--virtual-time-budget=10000",
                             "--dump-dom", probe.as_uri())  # fmt: skip
    finally:
        probe.unlink()
    found = re.search(r'<pre id="mriflow-img-check">([^<]*)</pre>', done.stdout)
    assert found, f"no image check in Chromium's DOM (rc {done.returncode}): {done.stderr[-2000:]}"
    result = json.loads(found.group(1).replace("&quot;", '"'))
    assert result == {"total": expected, "broken": []}

    shot_dir = Path(os.environ.get("MRIFLOW_TEST_ARTIFACTS", tmp_path))
    shot_dir.mkdir(parents=True, exist_ok=True)
    shot = shot_dir / f"screenshot-{page.replace('.html', '')}.png"
    done = _run_chromium(browser, tmp_path / "profile", "--window-size=1300,2400",
                         f"--screenshot={shot}", (out / page).as_uri())  # fmt: skip
    assert shot.is_file(), done.stderr[-2000:]
    assert _png_size(shot) == (1300, 2400)


def test_write_participant_reports_one_call(tmp_path):
    """The CLI's single call: IQMs, report, provenance per subject; a failed one still reported."""
    from mriflow.reports import write_group_report as group
    from mriflow.reports import write_participant_reports

    _, out = build_derivatives(tmp_path, {"01": 4.0, "02": 5.0})
    templates = {SPACE: template_image()}
    written = write_participant_reports(out, ["sub-01", "02", "03"], templates=templates,
                                        errors={"03": "deepbet crashed"})  # fmt: skip
    names = {p.name for p in written["01"]}
    assert {"sub-01_desc-qc_metrics.json", "sub-01.html", "sub-01_prov.jsonld"} <= names
    failed = (out / "sub-03.html").read_text()
    assert "deepbet crashed" in failed and 'class="err"' in failed
    assert group(out) == out / "group.html"


def test_iqms_measure_inu_from_the_bias_field_the_graph_gives(tmp_path):
    raw_dir, out_dir = build_derivatives(tmp_path / "d", {"01": 4.0})
    preproc = nib.load(str(out_dir / "sub-01/anat/sub-01_desc-preproc_T1w.nii.gz"))
    ramp = np.linspace(0.8, 1.2, preproc.shape[0])[:, None, None] * np.ones(preproc.shape)
    field = tmp_path / "n4_field.nii"
    nib.save(nib.Nifti1Image(ramp.astype(np.float32), preproc.affine), str(field))
    (json_path, _) = compute_subject_iqms(
        out_dir,
        "01",
        templates={SPACE: template_image()},
        bias_fields={"sub-01/anat/sub-01_T1w.nii.gz": field},
    )
    payload = json.loads(json_path.read_text())
    assert "inu" not in payload["Skipped"]
    assert 0.9 < payload["inu_med"] < 1.1
    assert 0.1 < payload["inu_range"] < 0.4  # P95-P5 of the 0.8-1.2 ramp inside the brain


# --------------------------------------------------------------------------------------
# other contrasts co-registered to the T1w (issue 13)
# --------------------------------------------------------------------------------------


def _add_contrast(raw_dir, out_dir, suffix: str, *, on_t1w_grid: bool, **entities) -> str:
    """A raw ``suffix`` image and its ``desc-preproc`` as the multi-contrast run names it."""
    from mriflow.bids.paths import atomic_write_json, build_path

    t1w = nib.load(str(out_dir / "sub-01/anat/sub-01_desc-preproc_T1w.nii.gz"))
    data = np.asarray(t1w.dataobj)
    contrast = np.where(data > 0, data.max() - data, 0).astype(np.float32)  # T2-like
    names = {"subject": "01", **entities}
    raw_rel = build_path(names, suffix=suffix, extension=".nii.gz")
    affine = t1w.affine.copy()
    if not on_t1w_grid:  # its own native grid: half a voxel off, as a raw image would be
        affine[:3, 3] += 1.0
    nib.save(nib.Nifti1Image(contrast, affine), str(raw_dir / raw_rel))
    relpath = build_path({**names, "desc": "preproc"}, suffix=suffix, extension=".nii.gz")
    nib.save(nib.Nifti1Image(contrast, affine), str(out_dir / relpath))
    sidecar = {"Sources": [f"bids:raw:{raw_rel}"], "SkullStripped": False, "Steps": []}
    atomic_write_json(out_dir / relpath.replace(".nii.gz", ".json"), sidecar)
    return relpath


def test_contrasts_in_t1w_space_get_a_coregistration_figure_and_iqms(tmp_path):
    raw_dir, out_dir = build_derivatives(tmp_path, {"01": 4.0})
    _add_contrast(raw_dir, out_dir, "T2w", on_t1w_grid=True)
    _add_contrast(raw_dir, out_dir, "T1w", on_t1w_grid=True, ceagent="gadolinium")
    _add_contrast(raw_dir, out_dir, "FLAIR", on_t1w_grid=False)  # not co-registered
    templates = {SPACE: template_image()}
    written = {p.name for p in compute_subject_iqms(out_dir, "01", templates=templates)}
    report = write_subject_report(out_dir, "01", templates=templates).read_text()

    # each co-registered contrast: its section has the figure, and IQMs measured in the
    # T1w's brain mask and tissues
    assert "Co-registration to T1w" in report
    for metrics in ("sub-01_desc-qcT2w_metrics.json", "sub-01_ce-gadolinium_desc-qc_metrics.json"):
        payload = json.loads((out_dir / "sub-01/anat" / metrics).read_text())
        assert payload["Sources"][0].startswith("bids:raw:sub-01/anat/sub-01_")
        assert isinstance(payload["cnr"], float) and isinstance(payload["snr_wm"], float)
        assert metrics in written
    figures = {p.name for p in (out_dir / "sub-01/figures").iterdir()}
    assert {"sub-01_desc-coreg_T2w.png", "sub-01_ce-gadolinium_desc-coreg_T1w.png",
            "sub-01_desc-brain_mask.png", "sub-01_desc-brain_T2w.png"} <= figures  # fmt: skip
    assert len(set(sources := _img_sources(report))) == len(sources)  # no figure drawn over
    # the reference itself, and a contrast still in its own space, get none
    assert not any("FLAIR" in name and "coreg" in name for name in figures)
    assert "sub-01_desc-qcFLAIR_metrics.json" not in written
    sources = _img_sources(report)
    assert all((out_dir / src).stat().st_size > 1000 for src in sources)


def test_coregistration_reference_from_the_sidecar_or_the_grid(tmp_path):
    from mriflow.bids.layout import DerivativesLayout

    raw_dir, out_dir = build_derivatives(tmp_path, {"01": 4.0})
    t2w = _add_contrast(raw_dir, out_dir, "T2w", on_t1w_grid=True)
    layout = DerivativesLayout(out_dir)
    groups = {g.contrast: g for g in layout.find("01")}
    assert layout.reference_of(groups["T1w"]) is None  # it has its own brain mask
    assert layout.reference_of(groups["T2w"]).contrast == "T1w"
    # a contrast off the T1w grid is co-registered only if its sidecar says so
    moved = nib.load(str(out_dir / t2w))
    affine = moved.affine.copy()
    affine[0, 3] += 2.0
    nib.save(nib.Nifti1Image(np.asarray(moved.dataobj), affine), str(out_dir / t2w))
    groups = {g.contrast: g for g in layout.find("01")}
    assert layout.reference_of(groups["T2w"]) is None
    sidecar_path = out_dir / t2w.replace(".nii.gz", ".json")
    sidecar = json.loads(sidecar_path.read_text())
    sidecar["SpatialReference"] = "bids::sub-01/anat/sub-01_desc-preproc_T1w.nii.gz"
    sidecar_path.write_text(json.dumps(sidecar))
    groups = {g.contrast: g for g in layout.find("01")}
    assert layout.reference_of(groups["T2w"]).contrast == "T1w"


def test_a_defaced_image_s_report_never_draws_the_raw_face(tmp_path, monkeypatch):
    """Raw vs preprocessed of a defaced image: the raw is drawn only where the defaced is not 0."""
    from mriflow.image.deface import deface
    from mriflow.reports.html import make_standard_figures

    raw_dir, out_dir = build_derivatives(tmp_path, {"01": 4.0})
    anat = out_dir / "sub-01/anat"
    head = nib.load(str(anat / "sub-01_desc-preproc_T1w.nii.gz"))
    defaced, removed = deface(head, nib.load(str(anat / "sub-01_desc-brain_mask.nii.gz")))
    gone = np.asarray(removed.dataobj) > 0
    assert (np.asarray(nib.load(str(raw_dir / "sub-01/anat/sub-01_T1w.nii.gz")).dataobj)[gone]
            > 0).any()  # fmt: skip
    nib.save(defaced, str(anat / "sub-01_desc-preproc_T1w.nii.gz"))
    sidecar_path = anat / "sub-01_desc-preproc_T1w.json"
    sidecar = json.loads(sidecar_path.read_text())
    parameters = {"margin_mm": 5.0, "ear_depth_mm": 45.0, "shave": True,
                  "template_face_mask": False, "removed_voxels": int(gone.sum())}  # fmt: skip
    step = {"Name": "deface", "Parameters": parameters}
    sidecar.update(Defaced=True, Steps=[*sidecar["Steps"], step])
    sidecar_path.write_text(json.dumps(sidecar))

    drawn = {}
    real = F.plot_bias_correction

    def spy(raw, corrected, *args, **kwargs):
        drawn["raw"], drawn["shown"] = raw, corrected
        return real(raw, corrected, *args, **kwargs)

    monkeypatch.setattr(F, "plot_bias_correction", spy)
    sections = make_standard_figures(out_dir, "01", templates={SPACE: template_image()})
    titles = [f.title for s in sections for f in s.figures]
    assert "Defacing" in titles and "Raw vs preprocessed" in titles
    raw = np.asarray(drawn["raw"].dataobj)
    shown = np.asarray(drawn["shown"].dataobj)
    assert raw.shape == shown.shape and not raw[shown == 0].any()
    assert raw[shown != 0].any()  # the rest of the raw image is still there


# --------------------------------------------------------------------------------------
# the graph's QC node (issue 14: the report off the critical path)
# --------------------------------------------------------------------------------------


def _qc_node(out_dir, work: Path, image: str, reference: str = "", part: str = "native",
             broken: bool = False):  # fmt: skip
    """Run :class:`ImageQC` on the derivatives of ``image`` (and of its ``reference``)
    as the graph holds them: the files are stand-ins, named by the publishing plan."""
    from mriflow.bids.layout import DerivativesLayout
    from mriflow.bids.paths import parse_bids_uri
    from mriflow.interfaces.reports import NATIVE_QC_OUTPUTS, TEMPLATE_QC_OUTPUTS, ImageQC

    outputs = NATIVE_QC_OUTPUTS if part == "native" else TEMPLATE_QC_OUTPUTS

    plan, fields, field_map = [], {}, {}
    for group in DerivativesLayout(out_dir).find("01"):
        raw = parse_bids_uri(group.source)[1]
        if raw not in (image, reference):
            continue
        for d in group.files:
            if d.role not in outputs:
                continue
            field = f"{group.key}__{d.role}"
            meta = {k: v for k, v in d.sidecar.items() if k not in ("Sources", "Steps")}
            plan.append({"output": d.role, "relpath": d.relpath, "raw_relpath": raw,
                         "metadata": meta, "field": field})  # fmt: skip
            fields[field] = str(d.path)
            field_map[field] = (raw, d.role)
    work.mkdir(parents=True, exist_ok=True)
    if broken:  # a file the QC cannot read: the node still succeeds, and says so
        bad = work / "broken.nii.gz"
        bad.write_bytes(b"not a NIfTI")
        fields = {k: str(bad) if k.endswith("__preproc") else v for k, v in fields.items()}
    raw_files = {r: str(out_dir.parent / "raw" / r) for r in (image, reference) if r}
    node = ImageQC(fields=list(fields), image=image, reference=reference, raw_files=raw_files,
                   plan=plan, field_map=field_map, part=part, **fields)  # fmt: skip
    cwd = os.getcwd()
    try:
        os.chdir(work)
        result = node.run(cwd=str(work))
    finally:
        os.chdir(cwd)
    return result.outputs.out_record


def test_graph_qc_then_publishing_gives_the_report_of_the_published_files(tmp_path, monkeypatch):
    """The report the publishing node assembles from the graph's QC nodes (IQMs and
    figures measured before publishing) is the one drawn from the published files."""
    from mriflow.interfaces.bids import _qc_records
    from mriflow.reports import write_subject_qc

    # the phantoms' template stands in for the embedded one, as the graph's nodes use it
    template = template_image()

    def load_template_for(space, like=None):
        return template if space == SPACE else None

    # the IQMs and the figures both look templates up through it
    monkeypatch.setattr("mriflow.reports.iqms.load_template_for", load_template_for)

    raw_dir, out_one = build_derivatives(tmp_path / "d", {"01": 4.0})
    _add_contrast(raw_dir, out_one, "T2w", on_t1w_grid=True)
    out_split = tmp_path / "d" / "split"
    shutil.copytree(out_one, out_split)
    write_subject_qc(out_one, "01")

    t1w, t2w = "sub-01/anat/sub-01_T1w.nii.gz", "sub-01/anat/sub-01_T2w.nii.gz"
    records = [
        _qc_node(out_split, tmp_path / "qc_T1w", t1w),
        _qc_node(out_split, tmp_path / "qc_T2w", t2w, reference=t1w),
        _qc_node(out_split, tmp_path / "qc_std_T1w", t1w, part="template"),
    ]
    records = _qc_records(records, out_split)
    assert all(r["iqms"] and r["figures"] for r in records)
    assert "reg_ncc" in records[2]["iqms"]["metrics"]
    write_subject_qc(out_split, "01", graph_qc=records)

    # same metrics (template-space ones added at publishing), same figures, same page
    for name in ("sub-01_desc-qc_metrics.json", "sub-01_desc-qcT2w_metrics.json"):
        one, split = (json.loads((o / "sub-01/anat" / name).read_text())
                      for o in (out_one, out_split))  # fmt: skip
        assert split == one, name
    figures = sorted(p.name for p in (out_one / "sub-01/figures").iterdir())
    assert sorted(p.name for p in (out_split / "sub-01/figures").iterdir()) == figures
    one_html = (out_one / "sub-01.html").read_text()
    split_html = (out_split / "sub-01.html").read_text()
    assert _img_sources(split_html) == _img_sources(one_html)
    assert f"Registration to {SPACE}" in split_html and "Co-registration to T1w" in split_html

    # a QC the graph could not do is done by the publishing node from the published files
    broken = _qc_node(out_split, tmp_path / "qc_bad", t1w, broken=True)
    (record,) = _qc_records([broken], out_split)
    assert record["iqms"] is None and record["figures"] is None
    (out_split / "sub-01/anat/sub-01_desc-qc_metrics.json").unlink()
    write_subject_qc(out_split, "01", graph_qc=[record])
    rebuilt = json.loads((out_split / "sub-01/anat/sub-01_desc-qc_metrics.json").read_text())
    assert rebuilt == json.loads((out_one / "sub-01/anat/sub-01_desc-qc_metrics.json").read_text())
