"""Every numeric widget of every Lance node, at its minimum and at its maximum, is accepted by the node: a widget's
range is what the node takes. One widget at a time, the others at their defaults, on a small request.

The one kind of extreme a node refuses on purpose depends on another widget (the CFG interval's end below its
start); those are listed in DEPENDS_ON with the phrase the widget's tooltip uses to say so. The sampling widgets
shared by the four generation nodes come from one schema helper and one settings path, so they are swept on
LanceT2I and the native guidance nodes; each node's own widgets are swept on that node."""
from __future__ import annotations

import pytest
import torch

from tests.helpers import golden_image, golden_video

S = 64
SMALL = dict(steps=1, width=S, height=S, num_frames=5, max_new_tokens=2)   # the small request's base values
SHARED_SAMPLING = {"steps", "shift", "cfg_scale", "cfg_interval_start", "cfg_interval_end", "cfg_renorm_min", "seed",
                   "batch_size", "seed_stride"}
# (node, widget, "min"/"max") -> phrase of the widget's tooltip that explains why this extreme alone is refused
DEPENDS_ON = {
    ("LanceT2I", "cfg_interval_end", "min"): "not below the start",
    ("LanceGuidance", "cfg_interval_end", "min"): "not below the start",
    ("LanceEditGuider", "cfg_interval_end", "min"): "not below the start",
}


def numeric_widgets(node_class) -> list:
    return [i for i in node_class.define_schema().inputs if str(i.get_io_type()) in ("INT", "FLOAT")]


def defaults(node_class) -> dict:
    return {i.id: i.default for i in node_class.define_schema().inputs
            if getattr(i, "default", None) is not None and str(i.get_io_type()) in ("INT", "FLOAT", "STRING", "COMBO")}


def all_in_one_calls(nodes, model):
    """node id -> (node class, run(**widgets)) for a small request of each all-in-one node."""
    def call(node, **fixed):
        base = {**defaults(node), **{k: v for k, v in SMALL.items() if k in defaults(node)}, **fixed}
        return node, lambda **widgets: node.execute(model, **{**base, **widgets})
    return {
        "LanceT2I": call(nodes.LanceT2I),
        "LanceT2V": call(nodes.LanceT2V, resolution="video_192p"),
        "LanceEdit": call(nodes.LanceEdit, image=golden_image(), resolution="image_256res"),
        "LanceVideoEdit": call(nodes.LanceVideoEdit, video=golden_video(), resolution="video_192p"),
        "LanceUnderstand": call(nodes.LanceUnderstand, image=golden_image(), resolution="image_256res"),
        "LancePromptEnhance": call(nodes.LancePromptEnhance),
    }


def sweep(node_id, node_class, run):
    """[(widget, end, error or None)] for every numeric widget of the node at its min and max."""
    outcomes = []
    for widget in numeric_widgets(node_class):
        if node_id in ("LanceT2V", "LanceEdit", "LanceVideoEdit") and widget.id in SHARED_SAMPLING:
            continue   # swept on LanceT2I
        for end, value in (("min", widget.min), ("max", widget.max)):
            try:
                run(**{widget.id: value})
                outcomes.append((widget, end, None))
            except Exception as exc:  # noqa: BLE001 - every refusal is checked below
                outcomes.append((widget, end, exc))
    return outcomes


def check(node_id, outcomes):
    for widget, end, error in outcomes:
        explained = DEPENDS_ON.get((node_id, widget.id, end))
        if error is None:
            assert explained is None, f"{node_id}.{widget.id} at its {end} now runs: drop it from DEPENDS_ON"
            continue
        assert explained is not None, f"{node_id}.{widget.id} = its {end} is refused: {error}"
        assert explained in widget.tooltip, f"{node_id}.{widget.id}: the tooltip does not explain: {error}"
        assert widget.id.rsplit("_", 1)[0] in str(error), f"{node_id}.{widget.id}: the error does not name it: {error}"


@pytest.mark.parametrize("node_id", ["LanceT2I", "LanceT2V", "LanceEdit", "LanceVideoEdit", "LanceUnderstand",
                                     "LancePromptEnhance"])
def test_every_widget_extreme_runs_on_the_all_in_one_nodes(nodes, tiny_model, node_id):
    node_class, run = all_in_one_calls(nodes, tiny_model)[node_id]
    check(node_id, sweep(node_id, node_class, run))


def test_every_widget_extreme_runs_on_the_native_nodes(comfy, tiny_model):
    from lance_nodes import native_nodes as native
    model = native.LanceModelNode.execute(tiny_model).args[0]
    edit = dict(task="image_edit", prompt="make it red", negative_prompt="", width=S, height=S, num_frames=1,
                resolution="image_256res", batch_size=1, image=golden_image())

    def conditioning(**widgets):   # t2v: width, height and frames all apply
        return native.LanceConditioning.execute(tiny_model, **{**edit, "task": "t2v", "num_frames": 5, "image": None,
                                                              **widgets}).args

    positive, negative, latent, image_negative = native.LanceConditioning.execute(tiny_model, **edit).args

    def noise(**widgets):
        native.LanceNoiseNode.execute(widgets.get("noise_seed", 42), positive).args[0].generate_noise(
            {"samples": torch.zeros(2, *latent["samples"].shape[1:]), "batch_index": [0, 1]})

    guidance = dict(cfg_interval_start=0.4, cfg_interval_end=1.0, cfg_renorm="global", cfg_renorm_min=0.0)
    calls = {
        "LanceConditioning": conditioning,
        "LanceScheduler": lambda **w: native.LanceScheduler.execute(model, **{"steps": 30, **w}),
        "LanceNoise": noise,
        "LanceGuidance": lambda **w: native.LanceGuidance.execute(model, **{**guidance, **w}),
        "LanceEditGuider": lambda **w: native.LanceEditGuiderNode.execute(
            model, positive, negative, image_negative, **{"cfg": 4.0, "image_cfg": 1.0, **guidance, **w}),
    }
    classes = {cls.define_schema().node_id: cls for cls in native.NATIVE_NODES}
    for node_id, run in calls.items():
        check(node_id, sweep(node_id, classes[node_id], run))
