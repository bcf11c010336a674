"""The plain-read safetensors reader used for every LLM/ViT load: same tensors as the safetensors library, memory
of its own, clear errors for damaged files."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from lance_model.errors import CheckpointError
from lance_model.nn.safetensors_reader import SafetensorsReader


@pytest.fixture
def tensors():
    generator = torch.Generator().manual_seed(0)
    return {
        "bf16": torch.randn(3, 5, generator=generator).to(torch.bfloat16),
        "f32": torch.randn(4, 2, 3, generator=generator),
        "f16": torch.randn(7, generator=generator).to(torch.float16),
        "i64": torch.arange(6).view(2, 3),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
    }


def test_reads_what_safetensors_reads(tmp_path, tensors):
    path = tmp_path / "w.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    reference = load_file(str(path))
    with SafetensorsReader(path) as reader:
        assert set(reader.entries) == set(tensors)
        for key, expected in reference.items():
            got = reader.read(key)
            assert got.dtype == expected.dtype and got.shape == expected.shape, key
            assert torch.equal(got, expected), key


def test_tensors_own_their_memory(tmp_path, tensors):
    """Overwriting the file after the read leaves the loaded tensor as it was (no mapping behind it)."""
    path = tmp_path / "w.safetensors"
    save_file(tensors, str(path))
    with SafetensorsReader(path) as reader:
        loaded = reader.read("f32")
    save_file({key: torch.zeros_like(t) for key, t in tensors.items()}, str(path))
    assert torch.equal(loaded, tensors["f32"])


def test_truncated_file_names_the_tensor(tmp_path, tensors):
    path = tmp_path / "w.safetensors"
    save_file(tensors, str(path))
    path.write_bytes(path.read_bytes()[:-4])
    with SafetensorsReader(path) as reader:
        last = max(reader.entries, key=lambda key: reader.entries[key].end)
        with pytest.raises(CheckpointError, match=rf"truncated: tensor '{last}'"):
            reader.read(last)


def _with_header(header: bytes) -> bytes:
    return len(header).to_bytes(8, "little") + header


@pytest.mark.parametrize("content, message", [
    (b"\x01\x02", "shorter than its 8-byte header length"),
    ((2**40).to_bytes(8, "little"), "header length .* is implausible"),
    ((5).to_bytes(8, "little") + b"{nope", "not valid JSON"),
    (_with_header(b'{"w": {"dtype": "X9", "shape": [1], "data_offsets": [0, 1]}}'), "unsupported dtype 'X9'"),
    (_with_header(b'{"w": {"dtype": "F32", "shape": "wide"}}'), "malformed header entry for 'w'"),
    (_with_header(b'[1, 2]'), "not a JSON object"),
])
def test_damaged_header(tmp_path, content, message):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        SafetensorsReader(path)


def test_unknown_key(tmp_path, tensors):
    path = tmp_path / "w.safetensors"
    save_file(tensors, str(path))
    with SafetensorsReader(path) as reader, pytest.raises(CheckpointError, match="no tensor 'missing'"):
        reader.read("missing")
