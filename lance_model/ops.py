"""The operations namespace layers are built from. Hosts may inject their own (ComfyUI passes
`comfy.ops.manual_cast`, whose Linear/Embedding support low-VRAM partial loading); torch.nn is the default."""
import torch


class TorchOps:
    Linear = torch.nn.Linear
    Embedding = torch.nn.Embedding
