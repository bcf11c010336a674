"""Shared test fixtures: the golden parity set (LANCE_GOLDEN) and the tiny checkpoint loaded once."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.fixtures import comfy_env
from tests.fixtures.paths import GOLDEN_DIR


class Golden:
    """Read access to a golden fixture set: manifest, tensors and tolerances."""

    def __init__(self, root: Path):
        self.root = root
        self.manifest = json.loads((root / "manifest.json").read_text())
        self._cache = {}

    @property
    def checkpoint(self) -> Path:
        return self.root / "checkpoint"

    def fixture(self, name: str) -> dict:
        return self.manifest["fixtures"][name]

    def hyper(self, name: str) -> dict:
        return self.fixture(name)["hyper_parameters"]

    def tensors(self, name: str) -> dict:
        if name not in self._cache:
            self._cache[name] = load_file(str(self.root / self.fixture(name)["file"]))
        return self._cache[name]

    def tolerance(self, key: str) -> float:
        """max_abs tolerance for a tensor key, matched against the manifest's patterns."""
        for pattern, tol in self.manifest["tolerances"].items():
            if _pattern_matches(pattern, key):
                return float(tol["max_abs"])
        return float(self.manifest["tolerances"]["default_float32"]["max_abs"])

    def input_media(self, name: str):
        """The fixture's input media as the reference reads it: a PIL image, or uint8 frames [T, H, W, 3]
        (the frames the reference read, when the manifest lists them)."""
        from lance_model.media import load_image, load_video

        path = self.root / next(p for p in self.fixture(name)["inputs"] if not p.endswith(".json"))
        if path.suffix != ".npz":
            return load_image(path)
        frames, _ = load_video(path)
        indices = self.hyper(name).get("video_frame_indices_read")
        return frames[indices] if indices else frames

    def tasks(self, *names) -> list:
        return [n for n in names if n in self.manifest["fixtures"]]


def _pattern_matches(pattern: str, key: str) -> bool:
    """Manifest patterns: exact keys, `prefix/*`, and `prefix/a|b|c` alternatives."""
    if "|" in pattern:
        head, _, alternatives = pattern.partition("/")
        return any(key == f"{head}/{alt}" for alt in alternatives.split("|"))
    if pattern.endswith("*"):
        return key.startswith(pattern[:-1])
    return key == pattern


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> float:
    """Assert max |actual - expected| <= tol and return the error (for the closing report)."""
    actual = actual.detach().to("cpu", torch.float64)
    expected = expected.detach().to("cpu", torch.float64)
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    err = (actual - expected).abs().max().item() if actual.numel() else 0.0
    print(f"[parity] {what}: max_abs={err:.3e} (tol {tol:.1e})")
    assert err <= tol, f"{what}: max abs error {err:.3e} > tolerance {tol:.1e}"
    return err


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
