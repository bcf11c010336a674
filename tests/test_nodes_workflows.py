"""The shipped workflows: in sync with tests/fixtures/workflow_builder.py (built from the node schemas), UI
(example_workflows/, ComfyUI's template browser) and API (workflows/api/) files describe the same graphs, every
task is present with a preview image, the UI files store core widgets as each checked ComfyUI version expects,
and they carry real-use defaults and the model name a user installs (models/lance/Lance-3B)."""
import json

import pytest

from tests.fixtures.comfy_env import INPUT_IMAGE, INPUT_VIDEO, RELEASE_NAME, REPO_ROOT

TASKS = ["t2i", "t2v", "i2v", "image_edit", "subject_driven", "video_edit", "multi_turn_edit", "understand_image",
         "understand_video", "understand_edit", "native_t2i", "native_i2v", "native_image_edit"]
CORE = {"LoadImage", "SaveImage", "LoadVideo", "GetVideoComponents", "SaveVideo", "KSampler", "SamplerCustomAdvanced",
        "CFGGuider", "KSamplerSelect", "VAEDecode", "CreateVideo"}
UI_DIR = REPO_ROOT / "example_workflows"
API_DIR = REPO_ROOT / "workflows" / "api"
PREVIEW_MAX_SIDE = 512          # template-browser thumbnails: small files, not full screenshots
PREVIEW_MAX_BYTES = 100_000


def _api(name):
    return json.loads((API_DIR / f"{name}.json").read_text())


def _ui(name):
    return json.loads((UI_DIR / f"{name}.json").read_text())


def test_every_task_has_ui_and_api_files():
    assert sorted(p.stem for p in UI_DIR.glob("*.json")) == sorted(TASKS)
    assert sorted(p.stem for p in API_DIR.glob("*.json")) == sorted(TASKS)


def test_one_copy_of_each_ui_workflow():
    """ComfyUI serves the first of example_workflows/, example/, examples/, workflow/, workflows/ it finds as
    templates: only example_workflows/ may hold UI files, and workflows/ holds only the API folder."""
    for folder in ("example", "examples", "workflow"):
        assert not (REPO_ROOT / folder).exists(), folder
    assert not list((REPO_ROOT / "workflows").glob("*.json"))


@pytest.mark.parametrize("name", TASKS)
def test_preview_image(name):
    """The template browser shows <name>.jpg next to each custom-node template (front-end 1.27 and 1.49)."""
    from PIL import Image
    path = UI_DIR / f"{name}.jpg"
    assert path.is_file(), f"{path} missing: see README 'Workflows' for how previews are made"
    with Image.open(path) as image:
        assert image.format == "JPEG" and max(image.size) <= PREVIEW_MAX_SIDE and min(image.size) >= 64
    assert path.stat().st_size <= PREVIEW_MAX_BYTES


def test_shipped_files_match_the_builder(comfy):
    from tests.fixtures.workflow_builder import build
    stale = [str(path.relative_to(REPO_ROOT)) for path, text in build().items()
             if not path.is_file() or path.read_text() != text]
    assert not stale, f"regenerate with `python tests/fixtures/workflow_builder.py`: {stale}"


def _save_video_values(ui):
    return [n["widgets_values"] for n in ui["nodes"] if n["type"] == "SaveVideo"]


@pytest.mark.parametrize("host, values", [
    ("0.3.64", ["lance/t2v", "auto", "auto"]),                  # filename_prefix, format, codec
    ("0.33.0", ["lance/t2v", "auto", "auto", "auto"]),          # filename_prefix, format, format.codec, codec
])
def test_ui_files_follow_the_host_version(comfy, host, values):
    from tests.fixtures.workflow_builder import build_ui
    assert _save_video_values(json.loads(build_ui(host)["t2v"])) == [values]


@pytest.mark.parametrize("host, values", [("0.3.64", [12.0]), ("0.33.0", [12.0, 8])])  # fps[, bit_depth]
def test_create_video_widgets_follow_the_host_version(comfy, host, values):
    from tests.fixtures.workflow_builder import build_ui
    ui = json.loads(build_ui(host)["native_i2v"])
    assert [n["widgets_values"] for n in ui["nodes"] if n["type"] == "CreateVideo"] == [values]


def test_shipped_ui_files_are_for_the_newest_checked_host(comfy):
    from tests.fixtures.workflow_builder import CHECKED_HOSTS, SHIPPED_HOST, build_ui
    assert SHIPPED_HOST == max(CHECKED_HOSTS, key=lambda v: tuple(map(int, v.split("."))))
    assert _ui("video_edit") == json.loads(build_ui(SHIPPED_HOST)["video_edit"])


@pytest.mark.parametrize("name", TASKS)
def test_api_nodes_are_known(nodes, name):
    from lance_nodes.native_nodes import NATIVE_NODES
    ids = {n.define_schema().node_id for n in [*nodes.NODES, *NATIVE_NODES]}
    for node_id, node in _api(name).items():
        assert node["class_type"] in ids | CORE, (name, node_id)
        for value in node["inputs"].values():
            if isinstance(value, list):
                assert value[0] in _api(name), f"{name}: link to missing node {value}"


@pytest.mark.parametrize("name", TASKS)
def test_ui_and_api_are_the_same_graph(name):
    ui, api = _ui(name), _api(name)
    assert {str(n["id"]): n["type"] for n in ui["nodes"]} == {k: v["class_type"] for k, v in api.items()}
    links = {(str(l[1]), l[2], str(l[3])) for l in ui["links"]}
    api_links = {(v[0], v[1], k) for k, node in api.items() for v in node["inputs"].values() if isinstance(v, list)}
    assert links == api_links
    assert ui["version"] == 0.4 and ui["last_link_id"] == len(ui["links"])


@pytest.mark.parametrize("name", TASKS)
def test_real_use_defaults(name):
    api = _api(name)
    for node in api.values():
        inputs, kind = node["inputs"], node["class_type"]
        if kind == "LanceLoader":
            assert inputs["model_name"] == RELEASE_NAME
            video_task = name in ("t2v", "i2v", "video_edit", "understand_video", "native_i2v")
            assert inputs["variant"] == ("video" if video_task else "auto")
        if kind == "LanceT2I":
            assert (inputs["width"], inputs["height"], inputs["steps"]) == (768, 768, 30)
        if kind == "LanceT2V":
            assert (inputs["width"], inputs["height"], inputs["num_frames"], inputs["steps"]) == (848, 480, 61, 30)
        if kind in ("LanceEdit", "LanceVideoEdit"):
            assert inputs["steps"] == 30 and inputs["resolution"] in ("image_768res", "video_480p")
        if kind == "LanceUnderstand":
            assert inputs["max_new_tokens"] == 256
        if kind == "KSampler":
            assert (inputs["sampler_name"], inputs["scheduler"], inputs["steps"]) == ("euler", "lance_flow", 30)
        if kind == "LoadImage":
            assert inputs["image"] == INPUT_IMAGE
        if kind == "LoadVideo":
            assert inputs["file"] == INPUT_VIDEO


def test_context_chains():
    api = _api("multi_turn_edit")
    second = next(n for n in api.values() if n["class_type"] == "LanceEdit" and "context" in n["inputs"])
    assert api[second["inputs"]["context"][0]]["class_type"] == "LanceEdit"
    api = _api("understand_edit")
    edit = next(n for n in api.values() if n["class_type"] == "LanceEdit")
    assert api[edit["inputs"]["context"][0]]["class_type"] == "LanceUnderstand"
    api = _api("i2v")
    t2v = next(n for n in api.values() if n["class_type"] == "LanceT2V")
    assert api[t2v["inputs"]["start_image"][0]]["class_type"] == "LoadImage"


def test_no_absolute_paths_or_links_outside_repo():
    for path in [*UI_DIR.rglob("*.json"), *API_DIR.rglob("*.json")]:
        text = path.read_text()
        assert "/work/" not in text and "/tmp/" not in text and "shared/golden" not in text, path
    for path in REPO_ROOT.rglob("*"):
        if ".git" in path.parts or ".venv" in path.parts:   # .venv: tools/dev.sh's environment, not committed
            continue
        if path.is_symlink():
            assert path.resolve().is_relative_to(REPO_ROOT), f"committed symlink points outside the repo: {path}"
