"""Tokenizer (transformers AutoTokenizer from the checkpoint folder) and special-token lookup by name."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError, InputError
from .config import LLMConfig

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END, VIDEO_PAD = "<|vision_start|>", "<|vision_end|>", "<|video_pad|>"
END_OF_TEXT = "<|endoftext|>"


@dataclass(frozen=True)
class SpecialTokens:
    im_start: int
    im_end: int
    vision_start: int
    vision_end: int
    placeholder: int      # id of every visual payload token (the reference uses video_token_id for images too)
    pad: int


class LanceTokenizer:
    """Thin wrapper: encodes text without BOS/EOS and exposes the special ids Lance needs."""

    def __init__(self, folder: Path, config: LLMConfig):
        from transformers import AutoTokenizer  # deferred: importing transformers is slow

        try:
            self.hf = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except Exception as exc:
            raise CheckpointError(f"cannot load the tokenizer from {folder}: {exc}") from exc
        self.special = self._lookup_special(config)
        self.vocab_limit = len(self.hf)  # logits for ids >= this are masked during decoding
        if self.vocab_limit > config.vocab_size:
            raise CheckpointError(f"tokenizer in {folder} has {self.vocab_limit} tokens but the model's vocab_size is {config.vocab_size}")

    def _lookup_special(self, config: LLMConfig) -> SpecialTokens:
        names = {"im_start": IM_START, "im_end": IM_END, "vision_start": VISION_START,
                 "vision_end": VISION_END, "placeholder": VIDEO_PAD, "pad": END_OF_TEXT}
        ids = {}
        for field, token in names.items():
            token_id = self.hf.convert_tokens_to_ids(token)
            if token_id is None or token_id == self.hf.unk_token_id:
                raise CheckpointError(f"tokenizer has no special token {token} (Lance needs it; adding it would leave an untrained row)")
            ids[field] = int(token_id)
        special = SpecialTokens(**ids)
        expected = {special.placeholder: config.video_token_id, special.vision_start: config.vision_start_token_id}
        if any(want is not None and int(want) != got for got, want in expected.items()):
            raise CheckpointError(
                f"tokenizer ids ({VIDEO_PAD}={special.placeholder}, {VISION_START}={special.vision_start}) disagree with "
                f"llm_config.json (video_token_id={config.video_token_id}, vision_start_token_id={config.vision_start_token_id})")
        return special

    def encode(self, text: str) -> list[int]:
        """Encode with special tokens parsed (templates contain them); no BOS/EOS is added."""
        return list(self.hf(text, add_special_tokens=False)["input_ids"])

    def encode_user_text(self, text: str, what: str = "prompt") -> list[int]:
        """Encode user text; special-token strings inside it are rejected so a prompt cannot break the template."""
        if not isinstance(text, str):
            raise InputError(f"{what} must be a string, got {type(text).__name__}")
        for token in self.reserved_tokens():
            if token in text:
                raise InputError(f"{what} contains the reserved token {token!r}; remove it")
        return self.encode(text)

    def reserved_tokens(self) -> list[str]:
        """Special and added token strings: text holding one would be parsed as that control token."""
        tokens = self.hf.all_special_tokens + list(getattr(self.hf, "added_tokens_encoder", {}))
        return sorted({t for t in tokens if t}, key=len, reverse=True)

    def without_reserved(self, text: str) -> str:
        """Model text made safe to put into a prompt: every reserved token string removed."""
        tokens = self.reserved_tokens()
        while any(token in text for token in tokens):   # a removal may join two halves into a new token
            for token in tokens:
                text = text.replace(token, "")
        return text

    def token_id(self, token: str, what: str) -> int:
        """Id of one vocabulary token (e.g. a stop token); unknown or multi-token strings are an error."""
        token_id = self.hf.convert_tokens_to_ids(token) if isinstance(token, str) else None
        if token_id is None or token_id == self.hf.unk_token_id:
            raise InputError(f"{what}: {token!r} is not a single token of this tokenizer")
        return int(token_id)

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=False)


REPLACEMENT_CHARACTER = "\ufffd"   # what decoding gives for the bytes of an incomplete UTF-8 character


class TextStream:
    """The text of ids that arrive a few at a time (a streamed answer), decoding only a small window per push
    rather than every id again: the new ids and up to CONTEXT_IDS ids before them, whose text is cut off again
    (a decoder may treat a text's first token specially, e.g. drop its leading space). Byte-level BPE may split
    one UTF-8 character over several tokens: the text shown ends at the last id that completes a character (a
    window ending in U+FFFD is tried without its last ids), the rest waits for the ids that complete it."""

    CONTEXT_IDS = 4
    CHARACTER_BYTES = 4   # at most: the incomplete end of a character lies in the window's last 3 ids
    MAX_HELD_IDS = 16     # ids still incomplete after this many are invalid bytes, shown as U+FFFD

    def __init__(self, tokenizer: LanceTokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.shown = 0       # how many of the ids `text` holds
        self.text = ""

    def push(self, ids: list[int]) -> str:
        """Append `ids`; -> the text so far, up to its last whole character."""
        self.ids += ids
        start = max(0, self.shown - self.CONTEXT_IDS)
        context = self.tokenizer.decode(self.ids[start:self.shown])
        invalid = len(self.ids) - self.shown >= self.MAX_HELD_IDS
        for end in range(len(self.ids), max(self.shown, len(self.ids) - self.CHARACTER_BYTES), -1):
            window = self.tokenizer.decode(self.ids[start:end])
            if invalid or not window.endswith(REPLACEMENT_CHARACTER):
                self.text += window[len(context):]
                self.shown = end
                break
        return self.text
