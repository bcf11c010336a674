"""Read safetensors tensors with plain file reads, each straight into memory of its own.

A memory-mapped file's pages count as the process's resident memory for as long as the mapping stays open, so
streaming a whole release through one mapping while copying it peaks near twice the weights on CPU (and a
tensor left backed by the mapping dies with SIGBUS if the file is overwritten later). Reading each tensor into
a fresh buffer keeps the peak at one copy of the weights plus one tensor.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError

DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        DTYPES[_name] = getattr(torch, _attr)
MAX_HEADER_BYTES = 100 * 2**20


@dataclass(frozen=True)
class TensorEntry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int   # byte offsets into the data section
    end: int


class SafetensorsReader:
    """`with SafetensorsReader(path) as file: file.read(key)` -> a CPU tensor that owns its memory."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._file = open(self.path, "rb")
        try:
            self.entries, self._data_start = self._read_header()
        except Exception:
            self._file.close()
            raise

    def __enter__(self) -> "SafetensorsReader":
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()

    def read(self, key: str) -> torch.Tensor:
        entry = self.entries.get(key)
        if entry is None:
            raise CheckpointError(f"{self.path}: no tensor {key!r} in the file")
        tensor = torch.empty(entry.shape, dtype=entry.dtype)
        size = entry.end - entry.begin
        if size != tensor.numel() * tensor.element_size():
            raise CheckpointError(f"{self.path}: tensor {key!r} spans {size} bytes but shape {list(entry.shape)} "
                                  f"of {entry.dtype} needs {tensor.numel() * tensor.element_size()}")
        if size:
            self._file.seek(self._data_start + entry.begin)
            self._read_into(memoryview(tensor.view(-1).view(torch.uint8).numpy()), key)
        return tensor

    def _read_into(self, buffer: memoryview, key: str) -> None:
        filled = 0
        while filled < len(buffer):   # one read() returns at most ~2 GiB on Linux
            got = self._file.readinto(buffer[filled:])
            if not got:
                raise CheckpointError(f"{self.path} is truncated: tensor {key!r} ends past the end of the file")
            filled += got

    def _read_header(self) -> tuple[dict[str, TensorEntry], int]:
        prefix = self._file.read(8)
        if len(prefix) != 8:
            raise CheckpointError(f"{self.path} is not a safetensors file: shorter than its 8-byte header length")
        (length,) = struct.unpack("<Q", prefix)
        if length > MAX_HEADER_BYTES:
            raise CheckpointError(f"{self.path} is not a safetensors file: header length {length} is implausible")
        try:
            raw = json.loads(self._file.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{self.path}: the safetensors header is not valid JSON ({exc})") from exc
        if not isinstance(raw, dict):
            raise CheckpointError(f"{self.path}: the safetensors header is not a JSON object")
        entries = {}
        for key, info in raw.items():
            if key != "__metadata__":
                entries[key] = self._entry(key, info)
        return entries, 8 + length

    def _entry(self, key: str, info) -> TensorEntry:
        if not isinstance(info, dict) or info.get("dtype") not in DTYPES:
            dtype = info.get("dtype") if isinstance(info, dict) else None
            raise CheckpointError(f"{self.path}: tensor {key!r} has unsupported dtype {dtype!r}")
        try:
            begin, end = (int(offset) for offset in info["data_offsets"])
            shape = tuple(int(size) for size in info["shape"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{self.path}: malformed header entry for {key!r} ({exc})") from exc
        return TensorEntry(DTYPES[info["dtype"]], shape, begin, end)
