"""Packaging for the Comfy registry and for installing into a ComfyUI: pyproject metadata (Icon, requires-comfyui,
semver), requirements.txt = the runtime dependencies, what .comfyignore leaves out of the published archive,
no network code in the pack, and (with a ComfyUI host) `pip install -r requirements.txt` into the host's Python
changes nothing it already has and leaves `pip check` clean."""
import ast
import json
import re
import shutil
import subprocess
import sys

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from tests.fixtures.comfy_env import require_host
from tests.fixtures.paths import REPO_ROOT

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the [test] extra installs tomli
    import tomli as tomllib

PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
RUNTIME_FILES = ["__init__.py", "pyproject.toml", "requirements.txt", "README.md", "lance_nodes/nodes.py",
                 "lance_model/pipeline.py", "docs/icon.png", "locales/zh/main.json"]
LEFT_OUT = [".ci/run", ".ci/floors.txt", "bench/common.py", "tests/conftest.py", "tests/fixtures/comfy_env.py",
            "tests/golden/manifest.json", "tests/golden/checkpoint/Wan2.2_VAE.pth", "tools/dev.sh"]
NETWORK_MODULES = {"socket", "ssl", "http", "urllib", "urllib3", "requests", "httpx", "aiohttp", "websocket",
                   "websockets", "ftplib", "smtplib", "huggingface_hub"}


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].strip().lower()


def test_version_is_semver():
    assert re.fullmatch(r"\d+\.\d+\.\d+", PYPROJECT["project"]["version"])


def test_registry_fields():
    comfy = PYPROJECT["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"]
    assert comfy["requires-comfyui"] == ">=0.3.64"
    # the Icon is this repository's docs/icon.png, served from its main branch
    repository = PYPROJECT["project"]["urls"]["Repository"].removeprefix("https://github.com/")
    assert comfy["Icon"] == f"https://raw.githubusercontent.com/{repository}/main/docs/icon.png"


def test_icon_is_a_small_square_png():
    data = (REPO_ROOT / "docs" / "icon.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")  # IHDR
    assert width == height <= 400


def test_requirements_txt_is_the_runtime_dependencies_without_torch():
    listed = [line.strip() for line in (REPO_ROOT / "requirements.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    declared = [d for d in PYPROJECT["project"]["dependencies"] if _name(d) != "torch"]
    assert sorted(listed) == sorted(declared)   # ComfyUI brings its own torch


def _ignored(paths: list[str]) -> set[str]:
    """The paths .comfyignore matches (gitignore syntax, as comfy-cli reads it), asked of git itself."""
    out = subprocess.run(["git", "-c", f"core.excludesFile={REPO_ROOT / '.comfyignore'}", "check-ignore",
                          "--no-index", "--stdin"], input="\n".join(paths), capture_output=True, text=True,
                         cwd=REPO_ROOT, timeout=60)
    assert out.returncode in (0, 1), out.stderr
    return set(out.stdout.split())


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git to read .comfyignore's gitignore patterns")
def test_comfyignore_keeps_runtime_files_and_leaves_out_test_data():
    assert _ignored(RUNTIME_FILES) == set()
    assert _ignored(LEFT_OUT) == set(LEFT_OUT)


def _imported_modules(path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_no_network_code_in_the_pack():
    files = [REPO_ROOT / "__init__.py", *sorted((REPO_ROOT / "lance_nodes").glob("*.py")),
             *sorted((REPO_ROOT / "lance_model").glob("*.py"))]
    offenders = {str(p.relative_to(REPO_ROOT)): sorted(_imported_modules(p) & NETWORK_MODULES) for p in files}
    assert {p: m for p, m in offenders.items() if m} == {}


@pytest.mark.comfy
def test_requirements_install_into_the_comfyui_python_changes_nothing(tmp_path):
    host = require_host()
    report = tmp_path / "report.json"
    out = subprocess.run([str(host.python), "-m", "pip", "install", "--dry-run", "--quiet", "--no-input",
                          "--disable-pip-version-check", "--report", str(report), "-r",
                          str(REPO_ROOT / "requirements.txt")], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    planned = {item["metadata"]["name"].lower(): item["metadata"]["version"]
               for item in json.loads(report.read_text())["install"]}
    frozen = subprocess.run([str(host.python), "-m", "pip", "list", "--format=json", "--disable-pip-version-check"],
                            capture_output=True, text=True, timeout=120)
    installed = {p["name"].lower(): p["version"] for p in json.loads(frozen.stdout)}
    changed = {name: (installed[name], version) for name, version in planned.items() if name in installed}
    assert changed == {}, f"installing requirements.txt would change (installed, planned): {changed}"
    check = subprocess.run([str(host.python), "-m", "pip", "check", "--disable-pip-version-check"],
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr


def _lower_bounds() -> dict[str, str]:
    """Each runtime dependency (torch included) -> the version its `>=` names."""
    bounds = {}
    for dependency in PYPROJECT["project"]["dependencies"]:
        lower = [spec.version for spec in Requirement(dependency).specifier if spec.operator == ">="]
        assert len(lower) == 1, f"{dependency}: every runtime dependency states one tested lower bound (>=)"
        bounds[_name(dependency)] = lower[0]
    return bounds


def test_floor_run_pins_every_declared_lower_bound():
    """.ci/floors installs the pack under .ci/floors.txt: it must pin each dependency at exactly its lower bound,
    so the floor run tests what pyproject.toml and requirements.txt promise."""
    pins = {}
    for line in (REPO_ROOT / ".ci" / "floors.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[name.strip().lower()] = version.strip()
    bounds = _lower_bounds()
    assert sorted(pins) == sorted(bounds)
    assert {name: pins[name] for name in bounds if Version(pins[name]) != Version(bounds[name])} == {}


def test_torch_floor_normalizes_half_precision_in_fp32_and_compiles_once():
    """ops.RMSNorm is torch's F.rms_norm, which normalizes bf16/fp16 inputs in fp32 only from torch 2.7 on (2.5.0,
    2.5.1 and 2.6.0 measured 1.2e-2, 1.2e-2 and 7.5e-3 off the fp32 normalization: tests/test_ops.py); the
    compiled denoising step keeps one compilation per layout whatever the prompt length from 2.8 on (2.7.0 and
    2.7.1 compiled 8 times for 5 prompts: tests/test_compiled_step.py). The floor run shows both at the floor."""
    assert Version(_lower_bounds()["torch"]) >= Version("2.8")


def test_every_library_wing_is_packaged():
    """pyproject's package discovery includes each wing (an explicit package list would leave lance_model/nn & co.
    out of a wheel)."""
    from setuptools import find_packages

    found = set(find_packages(str(REPO_ROOT), **PYPROJECT["tool"]["setuptools"]["packages"]["find"]))
    folders = {".".join(path.parent.relative_to(REPO_ROOT).parts) for path in (REPO_ROOT / "lance_model").rglob("*.py")}
    assert folders <= found and "lance_nodes" in found, sorted(folders - found)
