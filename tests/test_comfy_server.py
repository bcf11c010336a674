"""A real headless ComfyUI (found as tests/fixtures/comfy_env.py says; CI: ../shared/comfyui, CPU) with this
pack in custom_nodes:

- every workflows/api/*.json runs against the tiny checkpoint (test copies with small sizes/steps, written to a
  temporary folder; the shipped files keep real-use defaults), and the files they write have the expected shapes;
- bad-input prompts fail with clear errors on the right node, and the server keeps serving the next prompt;
- browser_check.py opens every UI workflow in the real front-end (headless Chromium). Without Chromium this
  fails with a message, unless LANCE_SKIP_BROWSER=1.

Run: python -m pytest -m comfy tests/test_comfy_server.py   (after `bash ../shared/comfyui/setup.sh --browser`,
or with COMFYUI_PATH/COMFYUI_PYTHON naming another ComfyUI). The harness scripts (run_workflows.py,
browser_check.py) come from ../shared/comfyui; without it those tests are skipped. Without a ComfyUI every test
here is skipped with one line; a ComfyUI that was found but does not work fails.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import lance_nodes  # node ids only: importing the package needs nothing from ComfyUI
from tests.fixtures.comfy_env import (
    GOLDEN_DIR,
    REPO_ROOT,
    make_input_dir,
    make_models_dir,
    require_host,
)
from tests.fixtures.tiny_workflows import (
    EXPECTED,
    TINY_SIZE,
    bad_workflows,
    shipped_api_workflows,
    tiny,
)

pytestmark = pytest.mark.comfy

NODE_IDS = ",".join(lance_nodes.NODE_IDS + lance_nodes.NATIVE_NODE_IDS)  # every node must register
AFTER_BAD = "zz_after_bad_t2i"
MEMORY_MODES = ("resident", "auto", "stream")


def _harness_script(comfy, name: str) -> Path:
    """run_workflows.py / browser_check.py (they come with the shared test host, ../shared/comfyui), run
    against the host that was found."""
    if comfy.harness is None:
        pytest.skip(f"{name} comes with the shared test host (../shared/comfyui), which is not beside the checkout")
    script = comfy.harness / name
    if not script.is_file():
        pytest.fail(f"{script} not found in the shared test host")
    return [script, "--comfyui", comfy.root, "--python", comfy.python]


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    comfy = require_host()
    base = tmp_path_factory.mktemp("comfy")
    models = make_models_dir(base / "models")
    copy = models / "lance" / "tiny_copy"          # a second model (another model id) for the context test
    shutil.copytree(GOLDEN_DIR / "checkpoint", copy)
    for path in copy.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return {"base": base, "models": models, "inputs": make_input_dir(base / "input"), "comfy": comfy,
            "python": comfy.python, "root": comfy.root}


def _run(cmd, timeout):
    print("$", " ".join(map(str, cmd)))
    out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, cwd=str(REPO_ROOT))
    print(out.stdout[-20000:])
    print(out.stderr[-5000:], file=sys.stderr)
    return out


@pytest.fixture(scope="module")
def server_run(host):
    """One server run: the shipped workflows (tiny copies), then the bad prompts, then a good one again."""
    folder = host["base"] / "workflows"
    folder.mkdir()
    for name, workflow in shipped_api_workflows().items():
        (folder / f"{name}.json").write_text(json.dumps(tiny(workflow), indent=1))
    bad = bad_workflows("tiny_copy")
    for name, (workflow, _, _) in bad.items():
        (folder / f"y_{name}.json").write_text(json.dumps(workflow, indent=1))
    for mode in MEMORY_MODES:   # the same t2i with each library-placed memory mode (identical images on the CPU)
        workflow = tiny(shipped_api_workflows()["t2i"])
        for node in workflow.values():
            if node["class_type"] == "LanceLoader":
                node["inputs"]["memory_mode"] = mode
            if node["class_type"] == "SaveImage":
                node["inputs"]["filename_prefix"] = f"x_memory_{mode}"
        (folder / f"x_memory_{mode}.json").write_text(json.dumps(workflow, indent=1))
    after = tiny(shipped_api_workflows()["t2i"])
    for node in after.values():
        if node["class_type"] == "LanceT2I":
            node["inputs"]["seed"] = 7
        if node["class_type"] == "SaveImage":
            node["inputs"]["filename_prefix"] = AFTER_BAD
    (folder / f"{AFTER_BAD}.json").write_text(json.dumps(after, indent=1))
    report = host["base"] / "report.json"
    out = _run([host["python"], *_harness_script(host["comfy"], "run_workflows.py"), "--project", REPO_ROOT, "--expect-nodes", NODE_IDS,
                "--models-dir", host["models"], "--input-dir", host["inputs"], "--workflows", str(folder / "*.json"),
                "--report", report, "--keep", "--timeout", "600"], timeout=1800)
    kept = re.search(r"kept base directory (\S+)", out.stdout)
    data = json.loads(report.read_text()) if report.is_file() else {}
    results = {Path(r["workflow"]).stem: r for r in data.get("results", [])}
    yield {"stdout": out.stdout, "report": data, "results": results, "bad": bad,
           "output_dir": Path(kept.group(1)) / "output" if kept else None}
    if kept:
        shutil.rmtree(kept.group(1), ignore_errors=True)   # symlinks inside are unlinked, never followed


def _ui_texts(stdout: str, name: str, node: str | None = None) -> list[str]:
    """`ui #<id> <Node> text: ...` lines printed by run_workflows.py for one workflow (of one node type, or of
    every node but the Lance Loader, which shows its weight plan)."""
    section = stdout.split("=== workflow ")
    for part in section:
        if part.split("\n", 1)[0].endswith(f"/{name}.json"):
            found = re.findall(r"ui #\S+ (\S+) text: (.*)", part)
            return [text for kind, text in found if (kind == node if node else kind != "LanceLoader")]
    return []


def _image_sizes(output_dir: Path, prefix: str):
    from PIL import Image
    return [(1, *Image.open(p).size[::-1]) for p in sorted(output_dir.glob(f"{prefix}_*.png"))]


def _video_shapes(output_dir: Path, prefix: str):
    import av
    shapes = []
    for path in sorted(output_dir.glob(f"{prefix}_*.mp4")):
        with av.open(str(path)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        shapes.append((len(frames), *frames[0].shape[:2]))
    return shapes


def test_registration(server_run):
    registration = server_run["report"].get("registration", {})
    assert not registration.get("problems"), registration
    assert sorted(registration.get("nodes", [])) == sorted(NODE_IDS.split(","))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_shipped_workflow_runs(server_run, name):
    result = server_run["results"].get(name)
    assert result is not None, f"{name} did not run"
    assert result["passed"], result["problems"]
    expected, out_dir = EXPECTED[name], server_run["output_dir"]
    assert out_dir is not None and out_dir.is_dir()
    prefix = {"multi_turn_edit": "lance_multi_turn"}.get(name, f"lance_{name}")
    written = [o["file"] for o in result["outputs"]]
    if "images" in expected:
        sizes = _image_sizes(out_dir, prefix)
        assert len(sizes) == len(expected["images"]) == len(written), (sizes, written)
        for (n, h, w), want in zip(sizes, expected["images"]):
            assert n == want[0] and h % 16 == 0 and w % 16 == 0 and h >= TINY_SIZE
            assert want[1] in (None, h) and want[2] in (None, w), (name, (h, w), want)
    else:
        assert not [f for f in written if f.endswith(".png")]
    if "videos" in expected:
        shapes = _video_shapes(out_dir, prefix)
        assert len(shapes) == len(expected["videos"]), shapes
        for (frames, h, w), want in zip(shapes, expected["videos"]):
            assert frames == want[0] and h % 16 == 0 and w % 16 == 0
            assert want[1] in (None, h) and want[2] in (None, w), (name, (h, w), want)
    texts = _ui_texts(server_run["stdout"], name)
    assert len(texts) == expected.get("texts", 0), texts


def test_memory_modes_give_identical_images_and_show_their_plan(server_run):
    """resident (ComfyUI manages the weights), auto (the library's VRAM plan) and stream (both experts streamed
    from RAM): the same pixels; the Loader shows where the weights are."""
    import numpy as np
    from PIL import Image

    images = {}
    for mode in MEMORY_MODES:
        result = server_run["results"].get(f"x_memory_{mode}")
        assert result is not None and result["passed"], result
        (path,) = sorted(server_run["output_dir"].glob(f"x_memory_{mode}_*.png"))
        images[mode] = np.asarray(Image.open(path))
        (plan,) = _ui_texts(server_run["stdout"], f"x_memory_{mode}", node="LanceLoader")
        assert plan.startswith(f"memory_mode {mode}:"), plan
    assert all(np.array_equal(images["resident"], image) for image in images.values())
    assert "generation expert streamed" in _ui_texts(server_run["stdout"], "x_memory_stream", node="LanceLoader")[0]


@pytest.mark.parametrize("name", sorted(bad_workflows("tiny_copy")))
def test_bad_input_fails_clearly_on_the_node(server_run, name):
    _, stage, text = server_run["bad"][name]
    result = server_run["results"].get(f"y_{name}")
    assert result is not None, f"{name} did not run"
    assert not result["passed"]
    problems = " ".join(result["problems"])
    assert text in problems, problems
    if stage == "validation":
        assert "HTTP 400" in problems or "validation" in problems
    elif stage == "execution" or not ("HTTP 400" in problems):
        errors = result.get("errors") or []
        assert errors and errors[0]["exception_type"].startswith("lance."), errors
        assert "Traceback" not in errors[0]["exception_message"]


def test_server_keeps_serving_after_bad_inputs(server_run):
    order = sorted(server_run["results"])
    assert order[-1] == AFTER_BAD and all(n.startswith("y_bad_") for n in order if n.startswith("y_"))
    result = server_run["results"][AFTER_BAD]
    assert result["passed"], result["problems"]
    assert _image_sizes(server_run["output_dir"], AFTER_BAD) == [(1, TINY_SIZE, TINY_SIZE)]


def _chromium() -> str | None:
    for name in (os.environ.get("LANCE_CHROMIUM"), "chromium", "chromium-headless-shell", "chromium-browser",
                 "google-chrome-stable", "google-chrome", "chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def test_ui_workflows_in_the_real_frontend(host, tmp_path):
    script = _harness_script(host["comfy"], "browser_check.py")
    if _chromium() is None:
        if os.environ.get("LANCE_SKIP_BROWSER") == "1":
            pytest.skip("LANCE_SKIP_BROWSER=1 and no Chromium")
        pytest.fail("Chromium not found: run `bash ../shared/comfyui/setup.sh --browser` (installs Debian's "
                    "chromium) or set LANCE_CHROMIUM; set LANCE_SKIP_BROWSER=1 to skip the front-end check")
    report = tmp_path / "browser.json"
    shots = REPO_ROOT / "build" / "browser-shots"
    # UI files store widget values by position, so they are written for this host's version (the shipped
    # example_workflows/ are the builder's output for the newest checked host; test_nodes_workflows.py)
    ui_dir = tmp_path / "ui"
    built = _run([host["python"], REPO_ROOT / "tests" / "fixtures" / "workflow_builder.py", "--host", "running",
                  "--out", ui_dir], timeout=300)
    assert built.returncode == 0, built.stderr
    out = _run([host["python"], *script, "--project", REPO_ROOT, "--expect-nodes", NODE_IDS,
                "--models-dir", host["models"], "--input-dir", host["inputs"], "--screenshots", shots,
                "--workflows", str(ui_dir / "*.json"), "--report", report], timeout=900)
    data = json.loads(report.read_text())
    failed = {r["workflow"]: r["problems"] for r in data["results"] if not r["passed"]}
    assert out.returncode == 0 and not failed, failed
    checked = sorted(Path(r["workflow"]).stem for r in data["results"])
    assert checked == sorted(EXPECTED), checked


def test_headless_runner_tool(host, tmp_path):
    """tools/run_workflow.py starts ComfyUI itself, runs workflows/api/t2i.json with --set overrides and saves
    the PNG; a bad input exits 1 with the node's error, and a missing node input is rejected (exit 2)."""
    base = tmp_path / "base"
    (base / "custom_nodes").mkdir(parents=True)
    (base / "custom_nodes" / "comfyui-lance").symlink_to(REPO_ROOT, target_is_directory=True)
    (base / "models").mkdir()
    (base / "models" / "lance").symlink_to(host["models"] / "lance", target_is_directory=True)
    tool = [host["python"], REPO_ROOT / "tools" / "run_workflow.py"]
    server = ["--comfyui", host["root"], "--python", host["python"], "--server-arg=--cpu",
              f"--server-arg=--base-directory={base}", "--server-arg=--disable-api-nodes",
              "--server-arg=--database-url=sqlite:///:memory:"]
    sets = ["--set", "LanceLoader.model_name=tiny", "--set", f"LanceT2I.width={TINY_SIZE}",
            "--set", f"LanceT2I.height={TINY_SIZE}", "--set", "LanceT2I.steps=2"]
    out = _run([*tool, REPO_ROOT / "workflows" / "api" / "t2i.json", *server, *sets, "--out", tmp_path / "out"],
               timeout=600)
    assert out.returncode == 0, out.stdout
    from PIL import Image
    pngs = sorted((tmp_path / "out").glob("*.png"))
    assert len(pngs) == 1 and Image.open(pngs[0]).size == (TINY_SIZE, TINY_SIZE)
    out = _run([*tool, REPO_ROOT / "workflows" / "api" / "t2i.json", *server, *sets, "--set", "LanceT2I.prompt= ",
                "--out", tmp_path / "bad"], timeout=600)
    assert out.returncode == 1 and "lance.InputError: prompt is empty" in out.stdout, out.stdout
    out = _run([*tool, REPO_ROOT / "workflows" / "api" / "t2i.json", *server, *sets, "--set", "LanceT2I.width=8",
                "--out", tmp_path / "bad"], timeout=600)
    assert out.returncode == 2 and "smaller than min" in out.stdout, out.stdout


def test_interrupt_through_the_server_then_next_prompt_runs(host, tmp_path):
    """A long LanceT2I is interrupted through POST /interrupt while it samples: the prompt ends as interrupted
    (well before its last step) and the same server then runs the next prompt with the cached model."""
    import time

    import run_workflow as runner

    base = tmp_path / "base"
    (base / "custom_nodes").mkdir(parents=True)
    (base / "custom_nodes" / "comfyui-lance").symlink_to(REPO_ROOT, target_is_directory=True)
    (base / "models").mkdir()
    (base / "models" / "lance").symlink_to(host["models"] / "lance", target_is_directory=True)
    proc, server = runner.start_server(str(host["root"]), str(host["python"]),
                                       ["--cpu", f"--base-directory={base}", "--disable-api-nodes",
                                        "--database-url=sqlite:///:memory:", "--preview-method", "none"], 300)
    try:
        workflow = tiny(shipped_api_workflows()["t2i"])
        long_run = runner.apply_sets(json.loads(json.dumps(workflow)), [
            "LanceT2I.steps=200", "LanceT2I.width=1024", "LanceT2I.height=1024"])
        prompt_id = runner.api_request(server, "/prompt", {"prompt": long_run})["prompt_id"]
        deadline = time.time() + 120
        while time.time() < deadline and not runner.api_request(server, "/queue")["queue_running"]:
            time.sleep(0.2)
        time.sleep(3.0)  # model loaded and sampling
        started = time.time()
        runner.api_request(server, "/interrupt", {})
        entry = None
        while time.time() < deadline:
            entry = runner.api_request(server, f"/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("status_str"):
                break
            time.sleep(0.2)
        assert entry is not None, "the interrupted prompt never finished"
        kinds = [kind for kind, _ in entry["status"]["messages"]]
        assert "execution_interrupted" in kinds and "execution_success" not in kinds, kinds
        assert time.time() - started < 30, "interrupt was not honoured within a step"
        assert runner.run(server, workflow, tmp_path / "after", timeout=300) == 0
        assert len(list((tmp_path / "after").glob("*.png"))) == 1
    finally:
        runner.stop_server(proc)
