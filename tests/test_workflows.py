"""Workflow factories compose into users' own Nipype workflows."""

from __future__ import annotations

import nibabel as nib
import numpy as np
from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from mriflow.config import Config
from mriflow.workflows.anatomical import init_anat_preproc_wf
from tests.helpers import write_phantom_t1w


def _summarize(in_file, steps):
    import nibabel as nib
    import numpy as np

    n = int(np.count_nonzero(np.asanyarray(nib.load(in_file).dataobj)))
    return n, steps


def test_anat_preproc_wf_runs_inside_a_user_workflow(tmp_path):
    t1w = write_phantom_t1w(tmp_path / "sub-01_T1w.nii.gz")
    config = Config()
    config.set("spatial.voxel_size", 3.0)
    for key, value in [
        ("registration.enabled", False),
        ("skull_strip.method", "none"),
        ("denoise.method", "none"),
        ("segmentation.method", "gmm"),
    ]:
        config.set(key, value)

    user = pe.Workflow(name="user_wf", base_dir=str(tmp_path / "work"))
    source = pe.Node(niu.IdentityInterface(fields=["t1w"]), name="source")
    source.inputs.t1w = str(t1w)
    anat_wf = init_anat_preproc_wf(config=config, name="mriflow_anat_wf")
    count = pe.Node(
        niu.Function(
            input_names=["in_file", "steps"], output_names=["n", "steps"], function=_summarize
        ),
        name="count",
    )
    user.connect([
        (source, anat_wf, [("t1w", "inputnode.in_file")]),
        (anat_wf, count, [("outputnode.preproc", "in_file"), ("outputnode.steps", "steps")]),
    ])  # fmt:skip
    graph = user.run(plugin="Linear")

    nodes = {node.fullname: node for node in graph.nodes()}
    preproc = nodes["user_wf.mriflow_anat_wf.n4"].result.outputs.out_file
    img = nib.load(preproc)
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
    assert np.allclose(img.header.get_zooms()[:3], 3.0)
    assert nodes["user_wf.count"].result.outputs.n > 0
    steps = nodes["user_wf.count"].result.outputs.steps
    assert [s["Name"] for s in steps][:3] == ["denoise", "conform", "n4"]
    assert steps[1]["Parameters"]["voxel_size_mm"] == 3.0


def test_skull_strip_and_registration_do_not_wait_for_denoising():
    """Denoising runs beside N4, skull stripping and registration (a second core's work)."""
    import networkx as nx

    config = Config()
    config.segmentation.use_priors = True  # off by default since issue 14; the node must exist
    graph = init_anat_preproc_wf(config=config)._create_flat_graph()
    by_name = {node.name: node for node in graph.nodes()}
    after_denoise = nx.descendants(graph, by_name["denoise"])
    for name in ("n4", "skull_strip", "register", "template_priors"):
        assert by_name[name] not in after_denoise, name
    # what is published still comes from the denoised image
    assert by_name["remove_bias_field"] in after_denoise
    assert by_name["segment"] in after_denoise


def test_only_nodes_that_pass_paths_on_hash_their_inputs_by_mtime():
    """The run hashes input files by content (a rewritten identical file keeps the rest
    cached); the nodes that only pass paths on skip reading them (mriflow.execution)."""
    graph = init_anat_preproc_wf(config=Config())._create_flat_graph()
    by_mtime = {
        node.name
        for node in graph.nodes()
        if ((node.config or {}).get("execution") or {}).get("hash_method") == "timestamp"
    }
    assert by_mtime == {"first_fwd", "first_rev", "split_probseg", "to_template_outputs"}


def test_native_derivatives_are_written_beside_registration_not_after_it(tmp_path):
    """The publishing node copies what ``prewrite`` compressed: the reference T1w's
    native-space images, none that waits for registration (it would delay publishing)."""
    import networkx as nx
    from nipype.pipeline.engine.utils import generate_expanded_graph

    from mriflow.bids.discovery import collect_inputs
    from mriflow.workflows.base import init_single_subject_wf
    from tests.helpers import make_bids_dataset

    root = make_bids_dataset(tmp_path / "raw", {"01": [""]})
    (subject,) = collect_inputs(root)
    workflow = init_single_subject_wf(
        subject, config=Config(), bids_dir=root, out_dir=tmp_path / "out"
    )
    # the graph that runs: outputnodes (identity) removed, as Workflow.run does
    graph = generate_expanded_graph(workflow._create_flat_graph())
    by_name = {node.name: node for node in graph.nodes()}
    prewrite = by_name["prewrite"]
    assert {item["output"] for item in prewrite.inputs.plan} == {
        "preproc", "brain_mask", "norm", "dseg", "probseg_csf", "probseg_gm", "probseg_wm",
    }  # fmt: skip
    assert prewrite not in nx.descendants(graph, by_name["register"])
    assert by_name["publish"] in nx.descendants(graph, prewrite)


def test_steps_that_cannot_repeat_on_several_threads_get_one_unless_asked():
    """``--omp-nthreads 2`` keeps reruns byte-identical: registration, co-registration and
    denoising run on one thread (ITK sums their metrics in thread-finishing order); N4,
    which repeats at a fixed count, gets the two threads. ``execution.reproducible =
    false`` gives every step the threads asked for."""
    from mriflow.workflows.session import init_session_wf

    for reproducible, pinned in ((True, 1), (False, 2)):
        config = Config()
        config.set("execution.omp_nthreads", 2)
        config.set("execution.reproducible", reproducible)
        anat_graph = init_anat_preproc_wf(config=config)._create_flat_graph()
        anat = {node.name: node for node in anat_graph.nodes()}
        session = {
            node.name: node
            for node in init_session_wf(config=config, contrasts={"T2w": "T2w"})
            ._create_flat_graph()
            .nodes()
        }
        for node in (anat["register"], anat["denoise"], session["coregister"]):
            assert node.interface.inputs.num_threads == pinned, node.name
            assert node.n_procs == pinned, node.name
        assert anat["n4"].interface.inputs.num_threads == 2
