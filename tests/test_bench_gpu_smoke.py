"""bench/bench_gpu.py --smoke: the GPU benchmark runs its whole code path at toy sizes on the CPU (so it cannot rot
between the sessions that have a GPU), part by part, writes every figure as JSON and ends with the eager op
counts; and rehearsals of its CUDA-only calls against torch's device-index rules."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from bench import bench_gpu, common
from tests.fixtures.paths import REPO_ROOT

ROW_KEYS = {"figure", "value", "unit", "goal", "floor", "ratio", "peak_bytes", "peak_reserved_bytes", "took_s", "error"}
BUDGET_KEYS = {"budget_bytes", "budget", "plan", "place_s", "allocated_before_bytes", "placed_bytes", "tasks",
               "reported_bytes", "freed_bytes", "offload_s", "replace_s", "error"}
TASK_KEYS = {"task", "seconds", "peak_bytes", "peak_reserved_bytes", "error"}


def run_smoke(part: str, json_path) -> tuple[list[str], dict]:
    out = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "bench_gpu.py"), "--smoke", "--part", part,
                          "--json", str(json_path)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "Traceback" not in out.stdout + out.stderr, out.stdout[-3000:] + out.stderr[-3000:]
    assert "FAILED" not in out.stdout, out.stdout[-3000:]
    return out.stdout.strip().splitlines(), json.loads(json_path.read_text())


def check_speed(lines: list[str], report: dict) -> None:
    for figure in bench_gpu.GOALS:
        assert any(line.startswith(figure) for line in lines), figure
    assert [row["figure"] for row in report["rows"]] == list(bench_gpu.GOALS)
    for row in report["rows"]:
        assert set(row) == ROW_KEYS and row["error"] is None and isinstance(row["value"], float), row
    assert report["machine"] == {"device": "cpu"}
    assert re.fullmatch(r"ops per layer-step \d+\.\d, ops per layer-token \d+\.\d", lines[-1]), lines[-1]
    assert set(report["ops"]) == {"per_layer_step", "per_layer_token"}


def check_budgets(lines: list[str], report: dict) -> None:
    assert sum(line.startswith("budget ") for line in lines) >= 3
    assert len(report["release_plans"]["cards"]) == 4 and all("plan" in c for c in report["release_plans"]["cards"])
    assert len(report["budgets"]) >= 3
    for budget in report["budgets"]:
        assert set(budget) == BUDGET_KEYS and budget["error"] is None and budget["plan"], budget
        assert len(budget["tasks"]) == 3
        for task in budget["tasks"]:
            assert TASK_KEYS <= set(task) and task["error"] is None and task["seconds"] > 0, task
        assert budget["tasks"][-1]["tokens"] > 0   # the x2t answer
        assert budget["reported_bytes"] > 0 and budget["offload_s"] >= 0 and budget["replace_s"] >= 0
    assert sum(line.startswith("  swap: ") for line in lines) == len(report["budgets"])


# `all` runs the speed part and then the budgets part in one process; `budgets` alone shows that part needs
# nothing the speed part left (the speed part alone is the first half of `all`: not run again, to keep CI short)
@pytest.mark.parametrize("part", ["all", "budgets"])
def test_bench_gpu_smoke_runs_each_part_and_writes_json(part, tmp_path):
    lines, report = run_smoke(part, tmp_path / "figures.json")
    assert {"part", "smoke", "torch", "device", "scale", "part_seconds", "seconds", "host_peak_bytes"} <= set(report)
    assert report["part"] == part and report["smoke"] is True
    parts = ("speed", "budgets") if part == "all" else (part,)
    assert set(report["part_seconds"]) == set(parts)
    if "speed" in parts:
        check_speed(lines, report)
    else:
        assert "rows" not in report and "ops" not in report
        assert lines[-1].startswith("total ")
    check_budgets(lines, report)


# ---------------------------------------------------------------- rehearsals: the CUDA calls without a GPU
@pytest.fixture
def strict_cuda(monkeypatch):
    """CUDA made to look present, with the memory-fraction and synchronize calls replaced by recorders that check
    their device argument as torch does (torch.cuda._utils._get_device_index: an index-less "cuda" is refused)."""
    calls = []
    index_of = torch.cuda._utils._get_device_index
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(
        total_memory=80 * 2**30, index=index_of(device)))
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction",
                        lambda fraction, device=None: calls.append(("fraction", fraction, index_of(device))))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(("sync", index_of(device))))
    return calls


def test_budget_cap_uses_an_indexed_device_and_restores_the_fraction_rehearsal(strict_cuda):
    device = bench_gpu.compute_device(smoke=False)
    with bench_gpu.memory_cap(device, 20 * 2**30):
        assert strict_cuda == [("fraction", 0.25, 0)]
    with pytest.raises(RuntimeError, match="a task failed"), bench_gpu.memory_cap(device, 8 * 2**30):
        raise RuntimeError("a task failed")
    assert strict_cuda == [("fraction", 0.25, 0), ("fraction", 1.0, 0), ("fraction", 0.1, 0), ("fraction", 1.0, 0)]


def test_bench_synchronize_names_the_device_index_rehearsal(strict_cuda):
    common.synchronize(torch.device("cuda"))
    common.synchronize(torch.device("cuda", 0))
    assert strict_cuda == [("sync", 0), ("sync", 0)]


def test_budget_placements_leave_the_host_weights_as_they_were():
    """Every budget places a shallow copy of one host copy (no 15 GB copy per budget): no placement and no task
    may write into the shared weights, nor share a parameter object with them."""
    device = torch.device("cpu")
    host = bench_gpu.random_weights(False, torch.float32, device)
    before = [{name: p.clone() for name, p in m.named_parameters()} for m in host.modules]
    placements = [("auto", limit) for limit in bench_gpu.budget_limits(host, [], smoke=True)] + [("stream", None)]
    for memory, budget in placements:
        placed = host.shallow_copy()
        assert not {id(p) for m in placed.modules for p in m.parameters()} & {id(p) for m in host.modules
                                                                             for p in m.parameters()}
        pipe = bench_gpu.pipeline(placed, device, memory, budget)
        pipe.text_to_image("a red cat", width=64, height=64, steps=2, seed=1)
        pipe.understand(bench_gpu.test_image(bench_gpu.SMOKE), "What is this?", max_new_tokens=2)
    assert all(type(layer.mlp.gate_proj) is torch.nn.Linear for layer in host.llm.language_model.model.layers)
    for m, saved in zip(host.modules, before):
        for name, p in m.named_parameters():
            assert p.device.type == "cpu" and torch.equal(p, saved[name]), name


def test_a_failing_row_is_reported_and_the_other_rows_still_run(tmp_path, capsys):
    def no_video(*args, **options):
        raise RuntimeError("no video today\n" + "details" * 2)

    pipe = SimpleNamespace(text_to_image=lambda *args, **options: None, edit_image=lambda *args, **options: None,
                           text_to_video=no_video, understand=lambda *args, max_new_tokens, **options: SimpleNamespace(
                               token_ids=list(range(max_new_tokens))))
    report = bench_gpu.Report(tmp_path / "figures.json")
    bench_gpu.measure_rows(pipe, bench_gpu.SMOKE, torch.device("cpu"), set(), report)
    rows = json.loads((tmp_path / "figures.json").read_text())["rows"]
    assert {row["figure"]: row["error"] for row in rows} == {
        figure: "RuntimeError: no video today" if figure.startswith("t2v") else None for figure in bench_gpu.GOALS}
    out = capsys.readouterr().out
    assert "t2v 480x848x61, 30 steps FAILED: RuntimeError: no video today\n" in out
    assert "detailsdetails" not in out and "in no_video" in out   # the first line and the innermost frames
