"""Helpers shared by the tests (one place; test modules import from here, never from each other)."""
from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from lance_model import GenerationSettings
from tests.fixtures.paths import GOLDEN_DIR


# ---------------------------------------------------------------- the golden fixture set
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
        from lance_model.io.media import load_image, load_video

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


# ---------------------------------------------------------------- generation requests as the fixtures made them
GEN_TASKS = ["t2i", "t2v", "i2v", "image_edit", "video_edit"]


def settings_for(golden, name, **extra) -> GenerationSettings:
    hp = golden.hyper(name)
    return GenerationSettings(steps=hp["steps"], shift=hp["timestep_shift"], cfg_scale=hp["cfg_text_scale"],
                              cfg_interval=tuple(hp["cfg_interval"]), cfg_renorm=hp["cfg_renorm_type"],
                              cfg_renorm_min=hp["cfg_renorm_min"], seed=hp["validation_noise_seed"], **extra)


def to_tokens(latent_thwc: torch.Tensor) -> torch.Tensor:
    return latent_thwc.reshape(-1, latent_thwc.shape[-1])


def prepare(pipe, golden, name, settings):
    """Build the request as a user would; where the reference draws unseeded random condition latents
    (posterior samples), inject the fixture's `vae_encode/padded_latent.0` (their means are checked in
    test_vae_parity.py)."""
    hp, fx = golden.hyper(name), golden.tensors(name)
    frames = 1 if name in ("t2i", "image_edit") else hp["num_frames"]
    if name == "t2i":
        return pipe.prepare_text_to_image(hp["caption"], hp["video_width"], hp["video_height"])
    if name == "t2v":
        return pipe.prepare_text_to_video(hp["caption"], hp["video_width"], hp["video_height"], frames)
    if name == "i2v":
        inputs = pipe.prepare_text_to_video(hp["caption"], hp["video_width"], hp["video_height"], frames,
                                            start_image=golden.input_media(name), resolution=hp["resolution"],
                                            settings=settings)
        inputs.first_frame = to_tokens(fx["vae_encode/padded_latent.0"][:1])
        return inputs
    inputs = pipe.prepare_edit(golden.input_media(name), hp["caption"], video=name == "video_edit",
                               resolution=hp["resolution"], settings=settings)
    inputs.source_latents = [to_tokens(fx["vae_encode/padded_latent.0"])]
    return inputs


def x2t_request(golden, name) -> tuple[str, str]:
    """(instruction, question) of an understanding fixture (its caption is "instruction\nquestion\nanswer")."""
    extra = golden.fixture(name)["non_tensor_packed_fields"]
    return extra["caption"].split("\n")[0], extra["question"]


# ---------------------------------------------------------------- node inputs
def sampling_widgets(steps: int = 2, seed: int = 1, **changes) -> dict:
    """The sampling widgets of LanceT2I / LanceT2V / LanceEdit / LanceVideoEdit, as keyword inputs."""
    widgets = dict(steps=steps, shift=3.5, cfg_scale=4.0, cfg_interval_start=0.4, cfg_interval_end=1.0,
                   cfg_renorm="global", cfg_renorm_min=0.0, seed=seed, batch_size=1)
    widgets.update(changes)
    return widgets


def golden_image() -> torch.Tensor:
    """The fixtures' input image as a ComfyUI IMAGE [1, H, W, 3]."""
    import numpy as np
    from PIL import Image
    return torch.from_numpy(np.array(Image.open(GOLDEN_DIR / "inputs" / "image.png").convert("RGB"))).float()[None] / 255


def golden_video() -> torch.Tensor:
    """The fixtures' input video as an IMAGE batch of frames [T, H, W, 3]."""
    import numpy as np
    return torch.from_numpy(np.load(GOLDEN_DIR / "inputs" / "video.npz")["frames"]).float() / 255


def core_wan22_vae(comfy):
    """ComfyUI's own Wan2.2 VAE (comfy.sd.VAE) for the tiny checkpoint. 0.3.64 hard-codes the release widths
    (dim 160 / dec_dim 256); the tiny VAE is narrower, so only those two numbers are taken from its weights."""
    import comfy.ldm.wan.vae2_2 as wan22
    import comfy.sd
    import comfy.utils
    sd = comfy.utils.load_torch_file(str(GOLDEN_DIR / "checkpoint" / "Wan2.2_VAE.pth"))
    original = wan22.WanVAE
    dims = {"dim": sd["encoder.conv1.weight"].shape[0], "dec_dim": sd["decoder.head.0.gamma"].shape[0]}
    wan22.WanVAE = functools.wraps(original)(lambda **kw: original(**{**kw, **dims}))
    try:
        vae = comfy.sd.VAE(sd=sd)
    finally:
        wan22.WanVAE = original
    assert vae.latent_channels == 48
    return vae


def forced_logits(pipe, media, question: str, instruction: str, answer: list[int]) -> torch.Tensor:
    """[len(answer), vocab] the model's logits at each position of `answer` when it is fed `answer` itself
    (teacher forcing): per-token comparisons, where one early difference cannot change every later token."""
    from lance_model.tasks import prepare
    from lance_model.nn.llm import UND, prefill_splits
    from lance_model.tasks.understanding import prompt_embeddings

    session, llm = pipe.session, pipe.llm
    request = prepare.question(session, media, question, instruction=instruction, resolution=None, fps=None,
                               context=None, include_history=False, cancel=None)
    seq, fed = request.seq, torch.tensor(answer[:-1], dtype=torch.long)
    cache = llm.new_cache(1, len(seq) + len(fed))
    start = int(seq.positions[:, -1].max()) + 1
    positions = torch.arange(start, start + len(fed)).view(1, 1, -1).expand(1, 3, -1)
    with torch.inference_mode(), session.running(llm):
        hidden = prefill_splits(llm, prompt_embeddings(llm, seq, request.vit_embeds), seq.positions, seq.splits,
                                seq.gen_mask, cache)
        out = llm(llm.embed_text(fed).unsqueeze(0), positions, UND, cache=cache, start=len(seq), causal=True)
        logits = torch.cat([llm.logits(hidden[0, -1:]), llm.logits(out[0])])
    return logits[:, :pipe.tokenizer.vocab_limit].clone()
