"""bench/bench_gpu.py --smoke: the one-command GPU benchmark runs its whole code path at toy sizes on the CPU
(so it cannot rot between the sessions that have a GPU) and ends with the eager op counts."""
from __future__ import annotations

import re
import subprocess
import sys

from tests.fixtures.paths import REPO_ROOT


def test_bench_gpu_smoke_runs_every_section():
    out = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "bench_gpu.py"), "--smoke"], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert re.fullmatch(r"ops per layer-step \d+\.\d, ops per layer-token \d+\.\d", lines[-1]), lines[-1]
    assert "Traceback" not in out.stdout + out.stderr
    for figure in ("t2i 768^2, 30 steps", "guided step 768^2", "x2t decode (tokens/s)"):
        assert any(line.startswith(figure) for line in lines), figure
    assert sum(line.startswith("budget ") for line in lines) >= 3
