"""Shared test fixtures: the golden parity set (LANCE_GOLDEN) and the tiny checkpoint loaded once; the node
tests' fixtures (a ComfyUI imported in-process, the test model folder, the loaded tiny model) come from
tests/fixtures/node_fixtures.py. The test path is set once, in pyproject.toml ([tool.pytest.ini_options])."""
import gc
import sys

import pytest
import torch

from tests.fixtures import comfy_env
from tests.fixtures.paths import GOLDEN_DIR
from tests.helpers import Golden

pytest_plugins = ["tests.fixtures.node_fixtures"]


@pytest.fixture(scope="session")
def golden() -> Golden:
    if not (GOLDEN_DIR / "manifest.json").is_file():
        pytest.fail(f"golden fixtures not found at {GOLDEN_DIR} (set LANCE_GOLDEN)")
    return Golden(GOLDEN_DIR)


@pytest.fixture(scope="session")
def pipe(golden):
    """The tiny checkpoint loaded through the public loader, fp32 on CPU (the fixtures' precision)."""
    from lance_model import load_lance

    return load_lance(golden.checkpoint, dtype="fp32", device="cpu", attention="sdpa")


@pytest.fixture(scope="session")
def second_device() -> torch.device:
    """A second device for the placement rehearsals: torch's lazy tensors (TorchScript backend, values kept on the
    CPU) stand in for the GPU, the CPU for the RAM. The backend can be initialised once per process."""
    lazy = pytest.importorskip("torch._lazy.ts_backend")
    lazy.init()
    return torch.device("lazy", 0)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Tests skipped for want of a ComfyUI all report require_host's location, so `-ra` folds them into one line
    per reason (pytest would otherwise list every test's own location)."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and isinstance(report.longrepr, tuple):
        reason = report.longrepr[2].removeprefix("Skipped: ")
        if reason in comfy_env.SKIP_REASONS:
            report.longrepr = (comfy_env.__file__, comfy_env.require_host.__code__.co_firstlineno, report.longrepr[2])


@pytest.fixture(scope="session", autouse=True)
def release_models_at_the_end():
    """The last model the nodes used stays referenced (runtime._LAST_USED, as in a server); dropped before the
    interpreter exits, so core's ModelPatcher.__del__ does not run while its modules are being torn down."""
    yield
    runtime = sys.modules.get("lance_nodes.runtime")
    if runtime is not None:
        runtime._LAST_USED.clear()
    gc.collect()
