"""The shipped workflows: in sync with tests/fixtures/workflow_builder.py (built from the node schemas), UI and
API files describe the same graphs, every task is present, and they carry real-use defaults and the model name
a user installs (models/lance/Lance-3B)."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.fixtures.comfy_env import INPUT_IMAGE, INPUT_VIDEO, RELEASE_NAME, REPO_ROOT  # noqa: E402
from tests.fixtures.node_fixtures import comfy, nodes  # noqa: E402,F401

TASKS = ["t2i", "t2v", "i2v", "image_edit", "video_edit", "multi_turn_edit", "understand_image", "understand_video",
         "understand_edit"]
CORE = {"LoadImage", "SaveImage", "LoadVideo", "GetVideoComponents", "SaveVideo"}
WORKFLOWS = REPO_ROOT / "workflows"


def _api(name):
    return json.loads((WORKFLOWS / "api" / f"{name}.json").read_text())


def _ui(name):
    return json.loads((WORKFLOWS / f"{name}.json").read_text())


def test_every_task_has_ui_and_api_files():
    assert sorted(p.stem for p in WORKFLOWS.glob("*.json")) == sorted(TASKS)
    assert sorted(p.stem for p in (WORKFLOWS / "api").glob("*.json")) == sorted(TASKS)


def test_shipped_files_match_the_builder(comfy):
    from tests.fixtures.workflow_builder import build
    stale = [str(path.relative_to(REPO_ROOT)) for path, text in build().items() if path.read_text() != text]
    assert not stale, f"regenerate with `python tests/fixtures/workflow_builder.py`: {stale}"


@pytest.mark.parametrize("name", TASKS)
def test_api_nodes_are_known(nodes, name):
    ids = {n.define_schema().node_id for n in nodes.NODES}
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
            video_task = name in ("t2v", "i2v", "video_edit", "understand_video")
            assert inputs["variant"] == ("video" if video_task else "auto")
        if kind == "LanceT2I":
            assert (inputs["width"], inputs["height"], inputs["steps"]) == (768, 768, 30)
        if kind == "LanceT2V":
            assert (inputs["width"], inputs["height"], inputs["num_frames"], inputs["steps"]) == (848, 480, 61, 30)
        if kind in ("LanceEdit", "LanceVideoEdit"):
            assert inputs["steps"] == 30 and inputs["resolution"] in ("image_768res", "video_480p")
        if kind == "LanceUnderstand":
            assert inputs["max_new_tokens"] == 256
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
    for path in WORKFLOWS.rglob("*.json"):
        text = path.read_text()
        assert "/work/" not in text and "/tmp/" not in text and "shared/golden" not in text, path
    for path in REPO_ROOT.rglob("*"):
        if ".git" in path.parts:
            continue
        if path.is_symlink():
            assert path.resolve().is_relative_to(REPO_ROOT), f"committed symlink points outside the repo: {path}"
