"""The nodes in Simplified Chinese. ComfyUI serves each pack's `locales/<lang>/main.json` to its front-end (GET
/i18n), which then shows a node's `nodeDefs.<id>.display_name`, `description`, `inputs.<name>.name/tooltip`,
`outputs.<index>.name/tooltip` and each category segment's `nodeCategories.<segment>` instead of the English ones.

locales/zh/main.json is checked against the live node definitions (what /object_info serves), so a node, input or
output added later without its Chinese entry fails here; and in the real front-end with Comfy.Locale = zh, the Lance
nodes carry their Chinese names (tests/fixtures/frontend_locale.py, one screenshot per workflow)."""
from __future__ import annotations

import asyncio
import json
import os
import re

import pytest

from tests.fixtures.paths import REPO_ROOT

ZH = REPO_ROOT / "locales" / "zh" / "main.json"
CJK = re.compile(r"[\u4e00-\u9fff]")
# terms ComfyUI's own zh locale keeps in Latin letters (e.g. VAE Decode's input "Latent", the Top-p of samplers)
KEPT_IN_LATIN = {"Latent", "VAE", "Top-p"}


def _zh() -> dict:
    return json.loads(ZH.read_text(encoding="utf-8"))


def _chinese(text) -> bool:
    return isinstance(text, str) and bool(CJK.search(text))


def test_zh_locale_names_exactly_the_lance_nodes_in_the_front_ends_format():
    from lance_nodes import NATIVE_NODE_IDS, NODE_IDS

    locale = _zh()
    assert set(locale) == {"nodeDefs", "nodeCategories"}
    assert sorted(locale["nodeDefs"]) == sorted(NODE_IDS + NATIVE_NODE_IDS)
    for node_id, entry in locale["nodeDefs"].items():
        assert set(entry) <= {"display_name", "description", "inputs", "outputs"}, node_id
        for name, slot in {**entry.get("inputs", {}), **entry.get("outputs", {})}.items():
            assert set(slot) <= {"name", "tooltip"} and all(isinstance(v, str) and v for v in slot.values()), \
                (node_id, name)
        assert all(index.isdigit() for index in entry.get("outputs", {})), node_id   # outputs by position


def _node_definitions() -> list[dict]:
    """What /object_info serves for every node the extension registers."""
    from lance_nodes.entry import LanceExtension

    return [node.GET_NODE_INFO_V1() for node in asyncio.run(LanceExtension().get_node_list())]


def _missing_translations(info: dict, entry: dict) -> list[str]:
    """The parts of one node definition its zh entry leaves untranslated (or left in English)."""
    missing = []
    if not _chinese(entry.get("display_name")):
        missing.append("display_name")
    if info.get("description") and not _chinese(entry.get("description")):
        missing.append("description")
    inputs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
    for name, (_, options) in ((name, spec if len(spec) > 1 else (spec[0], {})) for name, spec in inputs.items()):
        slot = entry.get("inputs", {}).get(name, {})
        if not (_chinese(slot.get("name")) or slot.get("name") in KEPT_IN_LATIN):
            missing.append(f"inputs.{name}.name")
        if options.get("tooltip") and not _chinese(slot.get("tooltip")):
            missing.append(f"inputs.{name}.tooltip")
        if options.get("control_after_generate") and "control_after_generate" not in entry.get("inputs", {}):
            missing.append("inputs.control_after_generate.name")   # the widget the front-end adds after a seed
    for index, tooltip in enumerate(info["output_tooltips"]):
        slot = entry.get("outputs", {}).get(str(index), {})
        if not (_chinese(slot.get("name")) or slot.get("name") in KEPT_IN_LATIN):
            missing.append(f"outputs.{index}.name")
        if tooltip and not _chinese(slot.get("tooltip")):
            missing.append(f"outputs.{index}.tooltip")
    return missing


def test_every_node_input_and_output_has_a_chinese_entry(comfy):
    locale = _zh()
    definitions = _node_definitions()
    assert len(definitions) == len(locale["nodeDefs"])
    missing = {info["name"]: _missing_translations(info, locale["nodeDefs"].get(info["name"], {}))
               for info in definitions}
    assert {node: parts for node, parts in missing.items() if parts} == {}
    segments = {segment for info in definitions for segment in info["category"].split("/")}
    assert segments <= set(locale["nodeCategories"]), segments - set(locale["nodeCategories"])


def test_missing_translations_are_found():
    """The completeness check itself: an English label, a missing tooltip or output are reported."""
    info = {"name": "N", "description": "Does it.", "category": "Lance",
            "input": {"required": {"seed": ["INT", {"tooltip": "Noise seed.", "control_after_generate": True}]},
                      "optional": {"image": ["IMAGE"]}},
            "output_tooltips": [None, "The latent."]}
    entry = {"display_name": "N node", "inputs": {"seed": {"name": "种子"}, "image": {"name": "Image"}},
             "outputs": {"1": {"name": "Latent"}}}
    assert _missing_translations(info, entry) == [
        "display_name", "description", "inputs.seed.tooltip", "inputs.control_after_generate.name",
        "inputs.image.name", "outputs.0.name", "outputs.1.tooltip"]


@pytest.mark.comfy
def test_the_front_end_shows_the_lance_nodes_in_chinese(tmp_path):
    """ComfyUI's real front-end (headless Chromium) with Comfy.Locale = zh: every Lance node type is registered
    under its Chinese name, and the nodes of the loaded workflows show their Chinese titles and input labels."""
    from tests.fixtures.comfy_env import make_input_dir, make_models_dir, require_host
    from tests.test_comfy_server import _chromium, _run

    host = require_host()
    if host.harness is None:
        pytest.skip("needs ../shared/comfyui's browser_check.py")
    if _chromium() is None:
        if os.environ.get("LANCE_SKIP_BROWSER") == "1":
            pytest.skip("LANCE_SKIP_BROWSER=1 and no Chromium")
        pytest.fail("Chromium not found: run `bash ../shared/comfyui/setup.sh --browser` or set LANCE_CHROMIUM")
    ui_dir = tmp_path / "ui"
    built = _run([host.python, REPO_ROOT / "tests" / "fixtures" / "workflow_builder.py", "--host", "running",
                  "--out", ui_dir], timeout=300)
    assert built.returncode == 0, built.stderr
    workflows = [ui_dir / "t2i.json", ui_dir / "native_t2i.json", ui_dir / "understand_edit.json"]
    report = tmp_path / "locale.json"
    out = _run([host.python, REPO_ROOT / "tests" / "fixtures" / "frontend_locale.py", "--harness", host.harness,
                "--locale", "zh", "--out", report, "--project", REPO_ROOT, "--comfyui", host.root,
                "--python", host.python, "--models-dir", make_models_dir(tmp_path / "models"),
                "--input-dir", make_input_dir(tmp_path / "input"),
                "--screenshots", REPO_ROOT / "build" / "browser-shots-zh",
                *[arg for path in workflows for arg in ("--workflows", path)]], timeout=600)
    assert out.returncode == 0, out.stdout[-4000:]
    seen = json.loads(report.read_text())
    nodes = _zh()["nodeDefs"]
    assert seen["locale"] == "zh"
    assert seen["registered"] == {node_id: entry["display_name"] for node_id, entry in nodes.items()}
    assert sorted(seen["workflows"]) == sorted(path.stem for path in workflows)
    for workflow, shown in seen["workflows"].items():
        lance = [node for node in shown if node["type"] in nodes]
        assert lance, workflow
        for node in lance:
            entry = nodes[node["type"]]
            assert node["title"] == entry["display_name"], (workflow, node)
            labels = {name: slot["name"] for name, slot in entry.get("inputs", {}).items()}
            assert node["labels"] and all(labels[name] == label for name, label in node["labels"].items()), \
                (workflow, node)
