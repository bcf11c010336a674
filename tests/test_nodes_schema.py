"""Schema contract of every Lance node: ids, input names/order/types/optional, widget defaults and ranges, output
types. UI workflows store widget values by position, so the widget order is frozen here: change it only by
appending new inputs at the end (and then update this file consciously)."""

import pytest

GEN = [("steps", "INT"), ("shift", "FLOAT"), ("cfg_scale", "FLOAT"), ("cfg_interval_start", "FLOAT"),
       ("cfg_interval_end", "FLOAT"), ("cfg_renorm", "COMBO"), ("cfg_renorm_min", "FLOAT"), ("seed", "INT"),
       ("batch_size", "INT")]
CTX = ("context", "LANCE_CONTEXT", "optional")
NEG = ("negative_prompt", "STRING", "optional")  # appended after the first release
IMAGE_CFG = ("image_cfg_scale", "FLOAT", "optional")  # appended after negative_prompt (edits only)
STRIDE = ("seed_stride", "INT", "optional")  # appended last (several machines: docs/distributed.md)

# node id -> inputs [(name, type[, "optional"])] in order, output types in order
CONTRACT = {
    "LanceLoader": (
        [("model_name", "COMBO"), ("variant", "COMBO"), ("dtype", "COMBO"), ("attention", "COMBO"),
         ("memory_mode", "COMBO"), ("weight_dtype", "COMBO", "optional")],   # weight_dtype appended (VRAM ladder)
        ["LANCE_MODEL"]),
    "LanceT2I": (
        [("model", "LANCE_MODEL"), ("prompt", "STRING"), ("width", "INT"), ("height", "INT"), *GEN, CTX, NEG, STRIDE],
        ["LATENT", "IMAGE", "LANCE_CONTEXT"]),
    "LanceT2V": (
        [("model", "LANCE_MODEL"), ("prompt", "STRING"), ("width", "INT"), ("height", "INT"), ("num_frames", "INT"),
         ("resolution", "COMBO"), ("fps", "FLOAT"), *GEN, ("start_image", "IMAGE", "optional"), CTX, NEG,
         STRIDE],
        ["LATENT", "IMAGE", "VIDEO", "LANCE_CONTEXT"]),
    "LanceEdit": (
        [("model", "LANCE_MODEL"), ("image", "IMAGE"), ("instruction", "STRING"), ("resolution", "COMBO"), *GEN, CTX, NEG,
         IMAGE_CFG, STRIDE],
        ["LATENT", "IMAGE", "LANCE_CONTEXT"]),
    "LanceVideoEdit": (
        [("model", "LANCE_MODEL"), ("video", "IMAGE"), ("instruction", "STRING"), ("resolution", "COMBO"),
         ("fps", "FLOAT"), *GEN, CTX, ("source_fps", "FLOAT", "optional"), NEG, IMAGE_CFG,
         STRIDE],
        ["LATENT", "IMAGE", "VIDEO", "LANCE_CONTEXT"]),
    "LanceUnderstand": (
        [("model", "LANCE_MODEL"), ("question", "STRING"), ("instruction", "STRING"), ("resolution", "COMBO"),
         ("max_new_tokens", "INT"), ("temperature", "FLOAT"), ("top_p", "FLOAT"), ("seed", "INT"),
         ("image", "IMAGE", "optional"), ("video", "IMAGE", "optional"), CTX, ("source_fps", "FLOAT", "optional")],
        ["STRING", "LANCE_CONTEXT"]),
    "LancePromptEnhance": (
        [("model", "LANCE_MODEL"), ("prompt", "STRING"), ("target", "COMBO"), ("max_new_tokens", "INT")],
        ["STRING"]),
    "LanceDecode": ([("model", "LANCE_MODEL"), ("samples", "LATENT")], ["IMAGE"]),
    "LanceContextView": ([("context", "LANCE_CONTEXT")], ["STRING"]),
}

# real-use defaults (the shipped workflows use them too)
DEFAULTS = {
    "LanceLoader": dict(variant="auto", dtype="auto", attention="auto", memory_mode="resident", weight_dtype="default"),
    "LanceT2I": dict(width=768, height=768, steps=30, shift=3.5, cfg_scale=4.0, cfg_interval_start=0.4,
                     cfg_interval_end=1.0, cfg_renorm="global", cfg_renorm_min=0.0, seed=42, batch_size=1),
    "LanceT2V": dict(width=848, height=480, num_frames=61, resolution="video_480p", fps=12.0, steps=30),
    "LanceEdit": dict(resolution="image_768res", steps=30, cfg_scale=4.0, image_cfg_scale=1.0),
    "LanceVideoEdit": dict(resolution="video_480p", steps=30, image_cfg_scale=1.0),
    "LanceUnderstand": dict(resolution="auto", max_new_tokens=256, temperature=0.0, top_p=1.0),
    "LancePromptEnhance": dict(target="image", max_new_tokens=256),
}

COMBOS = {
    ("LanceLoader", "variant"): ["auto", "image", "video"],
    ("LanceLoader", "dtype"): ["auto", "bf16", "fp32"],
    ("LanceLoader", "attention"): ["auto", "sdpa", "flash"],
    ("LanceLoader", "memory_mode"): ["resident", "offload", "dynamic", "auto", "stream"],   # new ones appended
    ("LanceLoader", "weight_dtype"): ["default", "fp8_e4m3fn", "fp8_e4m3fn (both experts)"],
    ("LanceT2V", "resolution"): ["video_192p", "video_360p", "video_480p"],
    ("LanceEdit", "resolution"): ["image_256res", "image_512res", "image_768res"],
    ("LanceVideoEdit", "resolution"): ["video_192p", "video_360p", "video_480p"],
    ("LancePromptEnhance", "target"): ["image", "video"],
    ("LanceT2I", "cfg_renorm"): ["global", "channel", "none"],
}


def _schemas(nodes):
    return {node.define_schema().node_id: node.define_schema() for node in nodes.NODES}


def test_node_ids(nodes):
    from lance_nodes import NODE_IDS
    assert sorted(_schemas(nodes)) == sorted(CONTRACT)
    assert sorted(NODE_IDS) == sorted(CONTRACT)
    for schema in _schemas(nodes).values():
        assert schema.category == "Lance" and schema.display_name and schema.description


@pytest.mark.parametrize("node_id", sorted(CONTRACT))
def test_inputs_in_order(nodes, node_id):
    schema = _schemas(nodes)[node_id]
    actual = [(i.id, str(i.get_io_type())) + (("optional",) if i.optional else ()) for i in schema.inputs]
    assert actual == CONTRACT[node_id][0]


@pytest.mark.parametrize("node_id", sorted(CONTRACT))
def test_output_types(nodes, node_id):
    from lance_nodes import compat
    expected = [t for t in CONTRACT[node_id][1] if t != "VIDEO" or compat.HAS_VIDEO]
    assert [str(o.get_io_type()) for o in _schemas(nodes)[node_id].outputs] == expected


@pytest.mark.parametrize("node_id", sorted(DEFAULTS))
def test_defaults(nodes, node_id):
    inputs = {i.id: i for i in _schemas(nodes)[node_id].inputs}
    for name, value in DEFAULTS[node_id].items():
        assert inputs[name].default == value, name


def test_combo_options(nodes):
    schemas = _schemas(nodes)
    for (node_id, name), options in COMBOS.items():
        inp = next(i for i in schemas[node_id].inputs if i.id == name)
        assert list(inp.options) == options, (node_id, name)


def test_numeric_widgets_have_ranges(nodes):
    for schema in _schemas(nodes).values():
        for inp in schema.inputs:
            if str(inp.get_io_type()) in ("INT", "FLOAT"):
                assert inp.min is not None and inp.max is not None and inp.step is not None, (schema.node_id, inp.id)
                assert inp.min <= inp.default <= inp.max, (schema.node_id, inp.id)


def test_seeds_have_control_after_generate(nodes):
    for schema in _schemas(nodes).values():
        for inp in schema.inputs:
            if inp.id == "seed":
                assert inp.control_after_generate, schema.node_id


def test_size_widgets_step_16(nodes):
    schemas = _schemas(nodes)
    for node_id in ("LanceT2I", "LanceT2V"):
        for inp in schemas[node_id].inputs:
            if inp.id in ("width", "height"):
                assert (inp.min, inp.max, inp.step) == (64, 1024, 16)
    frames = next(i for i in schemas["LanceT2V"].inputs if i.id == "num_frames")
    assert (frames.min, frames.max, frames.step) == (1, 121, 4)


def test_object_info_v1(nodes):
    """What /object_info serves (V1 info) builds, with required/optional split and the input order."""
    for node in nodes.NODES:
        info = node.GET_NODE_INFO_V1()
        schema = node.define_schema()
        order = info["input_order"]
        assert order["required"] + order.get("optional", []) == [i.id for i in schema.inputs]
        assert info["output"] == [str(o.get_io_type()) for o in schema.outputs]
        assert info["category"] == "Lance"


def test_output_nodes(nodes):
    outputs = {s.node_id for s in _schemas(nodes).values() if s.is_output_node}
    assert outputs == {"LanceUnderstand", "LanceContextView"}


def test_loader_lists_model_folders(nodes, comfy, tmp_path):
    (tmp_path / "lance" / "MyRelease").mkdir(parents=True)
    (tmp_path / "lance" / "put_lance_models_here").write_text("")
    comfy.add_model_folder_path("lance", str(tmp_path / "lance"))
    options = next(i for i in nodes.LanceLoader.define_schema().inputs if i.id == "model_name").options
    assert "MyRelease" in options and "put_lance_models_here" not in options


# readable labels for the inputs whose ids are abbreviations (the ids themselves stay frozen above)
LABELS = {"cfg_scale": "CFG scale", "memory_mode": "Memory mode", "max_new_tokens": "Max new tokens",
          "top_p": "Top-p", "model_name": "Model folder", "num_frames": "Frames", "source_fps": "Source frame rate"}


def test_every_input_has_a_label_and_a_tooltip(nodes):
    for schema in _schemas(nodes).values():
        for inp in schema.inputs:
            where = (schema.node_id, inp.id)
            assert inp.display_name and inp.display_name != inp.id, where
            assert inp.tooltip and len(inp.tooltip) > 10, where
            if inp.id in LABELS:
                assert inp.display_name == LABELS[inp.id], where


def test_labels_reach_the_front_end(nodes):
    """/object_info carries the label and tooltip of each input (the front-end shows them; widget names, and so
    the positions UI workflows store, stay the ids)."""
    info = nodes.LanceT2I.GET_NODE_INFO_V1()
    cfg = info["input"]["required"]["cfg_scale"][1]
    assert (cfg["display_name"], info["input_order"]["required"][6]) == ("CFG scale", "cfg_scale")
    assert cfg["tooltip"].startswith("Text classifier-free guidance")
