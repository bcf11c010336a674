"""Release folder discovery and weight streaming.

The release layout is used unchanged:
    <root>/Lance_3B or <root>/Lance_3B_Video   llm_config.json, model.safetensors, tokenizer files
    <root>/Qwen2.5-VL-ViT                       config.json, vit.safetensors
    <root>/Wan2.2_VAE.pth                       Wan-native VAE state dict (torch pickle)

Weights are streamed tensor by tensor from safetensors straight into the target dtype/device, so peak
host memory stays near one copy of the weights (the VAE's .pth is read through a memory map, so it loads first).
"""
from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch
from safetensors import safe_open

from ..errors import CheckpointError
from .safetensors_reader import SafetensorsReader

LANCE_FOLDERS = ("Lance_3B", "Lance_3B_Video")
VIT_FOLDER = "Qwen2.5-VL-ViT"
VAE_FILE = "Wan2.2_VAE.pth"
LLM_CONFIG = "llm_config.json"
WEIGHT_FILES = ("model.safetensors", "ema.safetensors")  # the reference prefers model.safetensors
TOKENIZER_FILES = ("tokenizer.json", "vocab.json")


@dataclass(frozen=True)
class ReleasePaths:
    """Resolved files of one release folder."""

    root: Path
    lance_dir: Path
    llm_config: Path
    llm_weights: Path
    vit_config: Path
    vit_weights: Path
    vae_weights: Path

    @property
    def variant(self) -> str:
        return "video" if self.lance_dir.name.endswith("_Video") else "image"

    def files(self) -> list[Path]:
        """Every file a load reads: configs, weights and the tokenizer files present."""
        tokenizer = [self.lance_dir / name for name in TOKENIZER_FILES + ("merges.txt", "tokenizer_config.json")
                     if (self.lance_dir / name).is_file()]
        return [self.llm_config, self.llm_weights, self.vit_config, self.vit_weights, self.vae_weights] + tokenizer

    def snapshot(self) -> dict[str, tuple[int, int, int] | None]:
        """path -> (size, mtime_ns, inode) of each file (None when it is gone): compare two snapshots to see
        which files were replaced, rewritten or truncated since a load."""
        state = {}
        for path in self.files():
            try:
                stat = path.stat()
                state[str(path)] = (stat.st_size, stat.st_mtime_ns, stat.st_ino)
            except OSError:
                state[str(path)] = None
        return state


def _expected_layout(root: Path) -> str:
    return (
        f"expected a Lance release folder at {root} containing: "
        f"{' or '.join(LANCE_FOLDERS)}/ ({LLM_CONFIG}, {' or '.join(WEIGHT_FILES)}, tokenizer files), "
        f"{VIT_FOLDER}/ (config.json, vit.safetensors) and {VAE_FILE}"
    )


def resolve_release(root: str | Path, variant: str = "auto") -> ReleasePaths:
    """Find the files of a release folder. variant: "auto" (image weights first), "image" or "video"."""
    root = Path(root).expanduser()
    if not root.exists():
        raise CheckpointError(f"model folder does not exist: {root}; {_expected_layout(root)}. Get the release with "
                              "`hf download bytedance-research/Lance --local-dir ComfyUI/models/lance/Lance-3B`")
    if not root.is_dir():
        raise CheckpointError(f"model path is a file, not a folder: {root}; {_expected_layout(root)}")
    order = {"auto": LANCE_FOLDERS, "image": LANCE_FOLDERS[:1], "video": LANCE_FOLDERS[1:]}
    if variant not in order:
        raise CheckpointError(f"variant must be one of {sorted(order)}, got {variant!r}")
    candidates = [root / name for name in order[variant] if (root / name).is_dir()]
    if not candidates:
        wanted = " or ".join(order[variant])
        found = sorted(p.name for p in root.iterdir())
        raise CheckpointError(f"no {wanted}/ folder in {root} (found: {found}); {_expected_layout(root)}")
    lance_dir = candidates[0]
    llm_weights = next((lance_dir / f for f in WEIGHT_FILES if (lance_dir / f).is_file()), None)
    required = {
        "LLM config": lance_dir / LLM_CONFIG,
        "LLM weights": llm_weights or lance_dir / WEIGHT_FILES[0],
        "ViT config": root / VIT_FOLDER / "config.json",
        "ViT weights": root / VIT_FOLDER / "vit.safetensors",
        "VAE weights": root / VAE_FILE,
    }
    missing = [f"{what} ({path})" for what, path in required.items() if not path.is_file()]
    if not any((lance_dir / f).is_file() for f in TOKENIZER_FILES):
        missing.append(f"tokenizer ({lance_dir}/tokenizer.json or vocab.json + merges.txt)")
    if missing:
        raise CheckpointError(f"incomplete Lance release folder {root}: missing {', '.join(missing)}; {_expected_layout(root)}")
    return ReleasePaths(root, lance_dir, required["LLM config"], required["LLM weights"],
                        required["ViT config"], required["ViT weights"], required["VAE weights"])


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read JSON config {path}: {exc}") from exc


def safetensors_keys(path: Path) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a safetensors file, read from its header only."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except Exception as exc:  # safetensors raises several types for truncated/corrupt files
        raise CheckpointError(f"cannot read safetensors file {path} (truncated or corrupt?): {exc}") from exc


def load_torch_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load a .pth state dict safely (weights_only=True: no arbitrary code from pickles)."""
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        refused = str(exc).split("WeightsUnpickler error:")[-1].strip().splitlines()[0]
        raise CheckpointError(f"refused to load {path}: it holds more than tensors ({refused}); a release VAE file "
                              f"holds only weights - re-download it") from exc
    except Exception as exc:
        raise CheckpointError(f"cannot read {path} as a torch state dict (truncated, corrupt or not weights-only): {exc}") from exc
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, expected a state dict (name -> tensor)")
    return dict(state)


def check_state_keys(source: Path, expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]],
                     ignore: Callable[[str], bool] = lambda key: False) -> None:
    """Raise one clear error listing missing keys, unexpected keys and shape mismatches."""
    problems = state_key_problems(expected, found, ignore)
    if problems:
        raise CheckpointError(f"{source} does not match the model built from its config: " + "; ".join(problems[:12]))


def state_key_problems(expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]],
                       ignore: Callable[[str], bool] = lambda key: False) -> list[str]:
    """Missing keys, unexpected keys (unless ignored) and shape mismatches, as readable phrases."""
    problems = []
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(k for k in set(found) - set(expected) if not ignore(k))
    if missing:
        problems.append(f"missing keys {_preview(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_preview(unexpected)}")
    for key in sorted(set(expected) & set(found)):
        if tuple(expected[key]) != tuple(found[key]):
            problems.append(f"key {key}: expected shape {tuple(expected[key])}, found {tuple(found[key])}")
    return problems


def _preview(keys: list[str], limit: int = 6) -> str:
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def stream_safetensors(path: Path, names: Iterable[tuple[str, str]], dtype: torch.dtype,
                       device: torch.device) -> Iterable[tuple[str, torch.Tensor]]:
    """Yield (module_key, tensor) for (file_key, module_key) pairs, each read into memory of its own and cast to
    dtype on device one at a time (safetensors_reader.py: no file mapping stays resident)."""
    try:
        with SafetensorsReader(path) as handle:
            for file_key, module_key in names:
                tensor = handle.read(file_key)
                yield module_key, tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"cannot read tensors from {path} (truncated or corrupt?): {exc}") from exc


def private_copy(source: torch.Tensor, converted: torch.Tensor) -> torch.Tensor:
    """`converted` (source cast/moved) as memory of its own. torch.load with mmap=True returns tensors backed by a
    mapping of the file, and a cast to the same dtype/device returns that very storage: a file overwritten or
    truncated later would then kill the process with SIGBUS on the next access."""
    if converted.device.type == "cpu" and converted.untyped_storage().data_ptr() == source.untyped_storage().data_ptr():
        return converted.clone()
    return converted


def materialize(module: torch.nn.Module, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Assign streamed tensors to a module built on the meta device (no second copy is made)."""
    for key, tensor in tensors:
        owner_name, _, leaf = key.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        current = getattr(owner, leaf)
        if isinstance(current, torch.nn.Parameter):
            setattr(owner, leaf, torch.nn.Parameter(tensor, requires_grad=False))
        else:
            owner._buffers[leaf] = tensor  # keeps the buffer's persistence flag


def assert_no_meta(module: torch.nn.Module, source: str) -> None:
    """After loading every parameter must be real; name the first that is not."""
    for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
        if tensor.is_meta:
            raise CheckpointError(f"{source}: tensor {name} was not loaded from the checkpoint")
