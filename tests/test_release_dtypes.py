"""Release files stored in BF16 load like F32 ones (the Hub weights were re-uploaded as BF16): the loader casts
every tensor to the requested dtype, so nothing depends on a file's dtype or size."""
import shutil
from collections import OrderedDict

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lance_model import load_lance


def _bf16(tensors: dict) -> OrderedDict:
    return OrderedDict((k, v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in tensors.items())


@pytest.fixture(scope="module")
def bf16_release(golden, tmp_path_factory):
    """The tiny checkpoint with every weight file (LLM, ViT safetensors and the VAE .pth) rewritten in BF16."""
    root = tmp_path_factory.mktemp("bf16") / "release"
    shutil.copytree(golden.checkpoint, root)
    for path in root.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    for path in root.rglob("*.safetensors"):
        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata()
        save_file(_bf16(load_file(str(path))), str(path), metadata=metadata)
    vae = root / "Wan2.2_VAE.pth"
    torch.save(_bf16(torch.load(str(vae), map_location="cpu", weights_only=True)), str(vae))
    return root


def test_converted_files_hold_bf16(bf16_release):
    for path in bf16_release.rglob("*.safetensors"):
        dtypes = {tensor.dtype for tensor in load_file(str(path)).values() if tensor.is_floating_point()}
        assert dtypes == {torch.bfloat16}, (path, dtypes)
    vae = torch.load(str(bf16_release / "Wan2.2_VAE.pth"), map_location="cpu", weights_only=True)
    assert {t.dtype for t in vae.values() if t.is_floating_point()} == {torch.bfloat16}


@pytest.mark.parametrize("dtype, torch_dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_bf16_release_loads_in_either_dtype(bf16_release, pipe, dtype, torch_dtype):
    loaded = load_lance(bf16_release, dtype=dtype, device="cpu", attention="sdpa")
    params = dict(loaded.session.named_parameters())
    reference = dict(pipe.session.named_parameters())    # the F32 files, loaded in fp32
    assert params.keys() == reference.keys()
    for name, param in params.items():
        assert param.dtype == torch_dtype, (name, param.dtype)
        # the values are the F32 weights rounded to BF16 (what the file holds), cast to the target dtype
        expected = reference[name].detach().to(torch.bfloat16).to(torch_dtype)
        assert torch.equal(param.detach(), expected), name
    result = loaded.text_to_image("a red cat", width=256, height=256, steps=2, seed=1)
    assert result.frames.shape == (1, 1, 256, 256, 3)
    assert torch.isfinite(result.frames).all()
