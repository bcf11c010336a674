"""Reliability through a real ComfyUI server (the host tests/fixtures/comfy_env.py finds), regression tests of
issue 9: graphs that used to wedge the prompt worker, a failed load next to a cached model, names outside the
model folder, weight files replaced or truncated under a loaded model, a queue of 100 prompts (flat memory, one
load) and repeated interrupts followed by a rerun with identical pixels.

The server runs the pack from this checkout; it is started with tools/run_workflow.py (this repository's own
runner). Each module-level server is reused by the tests in order.
"""
from __future__ import annotations

import random
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import run_workflow as runner

from tests.fixtures.comfy_env import (
    GOLDEN_DIR,
    INPUT_IMAGE,
    REPO_ROOT,
    TINY_NAME,
    make_input_dir,
    make_models_dir,
    require_host,
)
from tests.helpers import sampling_widgets

pytestmark = pytest.mark.comfy
S = 64
GEN = sampling_widgets(steps=1, seed=1)


# ---------------------------------------------------------------- graphs
def loader(name=TINY_NAME, variant="auto", memory="resident"):
    return {"class_type": "LanceLoader", "inputs": {"model_name": name, "variant": variant, "dtype": "auto",
                                                    "attention": "auto", "memory_mode": memory}}


def t2i(model="1", size=S, **kw):
    return {"class_type": "LanceT2I", "inputs": {"model": [model, 0], "prompt": "a red square", "width": size,
                                                 "height": size, **{**GEN, **kw}}}


def save(src, prefix, index=1):
    return {"class_type": "SaveImage", "inputs": {"images": [src, index], "filename_prefix": prefix}}


def t2i_graph(prefix, name=TINY_NAME, **kw):
    return {"1": loader(name), "2": t2i(**kw), "3": save("2", prefix)}


def two_loaders_graph(prefix, other: dict):
    return {"1": loader(), "2": t2i("1"), "3": save("2", prefix + "_a"),
            "4": other, "5": t2i("4", seed=2), "6": save("5", prefix + "_b")}


def core_only_graph(prefix):
    return {"1": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 32, "batch_size": 1, "color": 0}},
            "2": save("1", prefix, 0)}


def understand_graph(seed):
    return {"1": loader(), "2": {"class_type": "LoadImage", "inputs": {"image": INPUT_IMAGE}},
            "3": {"class_type": "LanceUnderstand", "inputs": {"model": ["1", 0], "image": ["2", 0],
                                                              "question": f"What is shown? ({seed})",
                                                              "instruction": "", "resolution": "image_256res",
                                                              "max_new_tokens": 4, "temperature": 0.0, "top_p": 1.0,
                                                              "seed": seed}}}


# ---------------------------------------------------------------- server
class Server:
    def __init__(self, comfy, base: Path, extra=()):
        self.base = base
        self.proc, self.url = runner.start_server(
            str(comfy.root), str(comfy.python),
            ["--cpu", f"--base-directory={base}", "--disable-api-nodes", "--database-url=sqlite:///:memory:",
             "--preview-method", "none", *extra], 300)

    def queue(self, graph) -> str:
        return runner.api_request(self.url, "/prompt", {"prompt": graph})["prompt_id"]

    def wait(self, prompt_id, timeout=300) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            assert self.proc.poll() is None, f"the server died (exit {self.proc.returncode})"
            entry = runner.api_request(self.url, f"/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("status_str"):
                return entry
            time.sleep(0.1)
        raise AssertionError(f"prompt {prompt_id} did not finish in {timeout} s")

    def run(self, graph, timeout=300) -> dict:
        return self.wait(self.queue(graph), timeout)

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")

    def loads(self) -> int:
        """How many times the pack loaded a model (its log line per load)."""
        return self.log_text().count("Lance: loaded ")

    def log_text(self) -> str:
        logs = sorted(Path(runner.os.environ.get("TMPDIR", "/tmp")).glob(f"comfyui-run-{self.url.rsplit(':', 1)[1]}.log"))
        return logs[-1].read_text(errors="replace") if logs else ""

    def pixels(self, entry) -> list[np.ndarray]:
        from PIL import Image
        out = []
        for outputs in entry["outputs"].values():
            for item in outputs.get("images", []):
                out.append(np.asarray(Image.open(self.base / "output" / item.get("subfolder", "") / item["filename"])))
        return out

    def stop(self):
        runner.stop_server(self.proc)


def succeeded(entry) -> bool:
    return entry["status"]["status_str"] == "success"


def error_of(entry) -> dict:
    return next(data for kind, data in entry["status"]["messages"] if kind == "execution_error")


def _base(tmp_path_factory, name):
    base = tmp_path_factory.mktemp(name)
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "comfyui-lance").symlink_to(REPO_ROOT, target_is_directory=True)
    make_models_dir(base / "models")
    copy = base / "models" / "lance" / "mutable_copy"
    shutil.copytree(GOLDEN_DIR / "checkpoint", copy)
    for path in copy.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    make_input_dir(base / "input")
    return base


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    comfy = require_host()
    srv = Server(comfy, _base(tmp_path_factory, "robust"))
    yield srv
    srv.stop()


# ---------------------------------------------------------------- tests
@pytest.mark.parametrize("other", ["variant", "folder", "memory"])
def test_two_loaders_then_a_core_prompt_never_wedge_the_worker(server, other):
    """Defect 1: two Lance loaders with different options, a prompt without Lance nodes, a normal Lance prompt,
    three times: every prompt succeeds (the worker thread used to die in cleanup_models_gc)."""
    second = {"variant": loader(variant="image"), "folder": loader("mutable_copy"),
              "memory": loader(memory="offload")}[other]
    for round_ in range(3):
        assert succeeded(server.run(two_loaders_graph(f"wedge_{other}_{round_}", second)))
        assert succeeded(server.run(core_only_graph(f"core_{other}_{round_}")))
        assert succeeded(server.run(t2i_graph(f"after_{other}_{round_}", seed=100 + round_)))
    log = server.log_text()
    assert "cleanup_models_gc" not in log and "IndexError" not in log


def test_failed_load_keeps_the_cached_model(server):
    """Defect 2: a broken folder next to the cached model does not evict it (no second load). The broken folder is
    refused when the prompt is validated (LanceLoader.validate_inputs: HTTP 400 naming what is missing)."""
    import urllib.error
    assert succeeded(server.run(t2i_graph("warm", seed=200)))
    loads = server.loads()
    with pytest.raises(urllib.error.HTTPError) as refused:
        server.run(t2i_graph("broken", name="empty_folder"))
    assert refused.value.code == 400 and "no Lance_3B or Lance_3B_Video/ folder" in refused.value.read().decode()
    assert succeeded(server.run(t2i_graph("good_again", seed=201)))
    assert server.loads() == loads


def test_model_names_outside_the_folder_are_refused(server, tmp_path):
    """Defect 3: an absolute path to a release outside models/lance is not loaded and nothing outside is listed."""
    outside = tmp_path / "elsewhere"
    shutil.copytree(GOLDEN_DIR / "checkpoint", outside)
    (tmp_path / "diary.txt").write_text("private")
    for name in (str(outside), str(tmp_path), "../lance/tiny"):
        try:
            entry = server.run(t2i_graph("escape", name=name))
        except Exception as exc:  # noqa: BLE001 - newer hosts reject unknown combo values with HTTP 400
            assert "400" in str(exc)
            continue
        assert not succeeded(entry)
        message = error_of(entry)["exception_message"]
        assert "Paths are not accepted" in message and "diary" not in message and "Lance_3B'" not in message
    assert succeeded(server.run(t2i_graph("after_escape", seed=202)))


def test_replaced_and_truncated_weights_never_kill_the_server(server):
    """Defect 6: with the model loaded, `cp` over its weights reloads it (a log line); a truncated file gives a
    clear error instead of SIGBUS; restoring the file makes the next prompt run."""
    root = server.base / "models" / "lance" / "mutable_copy"
    weights = root / "Lance_3B" / "model.safetensors"
    good = weights.read_bytes()
    assert succeeded(server.run(t2i_graph("mut_1", name="mutable_copy", seed=300)))
    shutil.copyfile(GOLDEN_DIR / "checkpoint" / "Lance_3B" / "model.safetensors", weights)   # same bytes, new file
    assert succeeded(server.run(t2i_graph("mut_2", name="mutable_copy", seed=301)))
    assert "changed on disk" in server.log_text()
    for victim in (weights, root / "Qwen2.5-VL-ViT" / "vit.safetensors", root / "Wan2.2_VAE.pth"):
        saved = victim.read_bytes()
        with open(victim, "r+b") as handle:
            handle.truncate(len(saved) // 3)
        entry = server.run(t2i_graph(f"mut_trunc_{victim.stem}", name="mutable_copy", seed=302))
        assert server.proc.poll() is None, "the server died"
        assert not succeeded(entry) and error_of(entry)["exception_type"] == "lance.CheckpointError"
        victim.write_bytes(saved)
        assert succeeded(server.run(t2i_graph(f"mut_back_{victim.stem}", name="mutable_copy", seed=303)))
    assert weights.read_bytes() == good


def test_bad_float_inputs_fail_on_the_node_before_any_work(server):
    """Defects 5 and 8 through the server: NaN in a float widget is a clear error on the node."""
    graph = t2i_graph("nan")
    graph["2"]["inputs"]["cfg_renorm_min"] = float("nan")
    try:
        entry = server.run(graph)
    except Exception as exc:  # noqa: BLE001 - a host whose validation already refuses NaN answers HTTP 400
        assert "400" in str(exc)
    else:
        assert not succeeded(entry)
        assert "cfg_renorm_min must be a finite number" in error_of(entry)["exception_message"]
    graph = t2i_graph("huge_seed", seed=2 ** 64 - 1, batch_size=2)
    assert succeeded(server.run(graph))


def test_a_queue_of_100_prompts(server):
    """100 prompts queued at once (mixed tasks, varied seeds): all succeed, the model loads at most once more,
    resident memory after prompt 10 and after prompt 100 within 5 %."""
    loads = server.loads()
    graphs = []
    for i in range(100):
        graphs.append(understand_graph(i) if i % 5 == 4 else t2i_graph(f"queue_{i}", seed=1000 + i))
    ids = [server.queue(graph) for graph in graphs]
    rss = {}
    for i, prompt_id in enumerate(ids, 1):
        entry = server.wait(prompt_id, timeout=600)
        assert succeeded(entry), (i, entry["status"])
        if i in (10, 50, 100):
            rss[i] = server.rss_mb()
    print(f"[queue] RSS MB at prompts 10/50/100: {rss[10]:.0f} / {rss[50]:.0f} / {rss[100]:.0f}; "
          f"100 vs 10: {rss[100] / rss[10]:.3f}")
    assert server.loads() <= loads + 1
    assert abs(rss[100] / rss[10] - 1) <= 0.05, rss


def test_interrupts_then_rerun_give_identical_pixels(tmp_path_factory):
    """Interrupt a long run at several random moments, then run it to the end: the pixels equal an uninterrupted
    run's, and memory does not grow (a server without output caching, so every prompt really runs)."""
    srv = Server(require_host(), _base(tmp_path_factory, "interrupts"), ["--cache-none"])
    try:
        graph = t2i_graph("interrupt", size=256, steps=120, seed=7)
        assert succeeded(srv.run(t2i_graph("warm_up", seed=8)))     # the model is loaded before timing
        started = time.time()
        reference = srv.run(graph)
        duration = time.time() - started
        assert succeeded(reference)
        expected = srv.pixels(reference)
        rss_before = srv.rss_mb()
        rng = random.Random(9)
        for _ in range(5):
            prompt_id = srv.queue(graph)
            while not runner.api_request(srv.url, "/queue")["queue_running"]:
                time.sleep(0.02)
            time.sleep(rng.uniform(0.1, 0.6) * duration)   # somewhere inside the sampling, on any machine
            runner.api_request(srv.url, "/interrupt", {})
            entry = srv.wait(prompt_id)
            kinds = [kind for kind, _ in entry["status"]["messages"]]
            assert "execution_interrupted" in kinds and not succeeded(entry), kinds
        rerun = srv.run(graph)
        assert succeeded(rerun)
        assert all(np.array_equal(a, b) for a, b in zip(srv.pixels(rerun), expected)) and len(expected) == 1
        rss_after = srv.rss_mb()
        print(f"[interrupt] RSS MB before/after 5 interrupts + rerun: {rss_before:.0f} / {rss_after:.0f}")
        assert rss_after <= rss_before * 1.05
    finally:
        srv.stop()
