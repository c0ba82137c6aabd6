"""The text side: Wan's umT5 tokenizer and encoder, or a tiny word-level one built in code.

Two uses (spec §5): the umT5 *encoder output* is the cross-attention condition (prompt padded to the
context length, padding positions included), and the *token ids* are what the text stream denoises.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    AutoTokenizer,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    UMT5Config,
    UMT5EncoderModel,
)

from model.config import TextEncoderConfig
from model.errors import CheckpointError, PromptTooLongError

TINY_SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")


def tiny_vocabulary() -> list[str]:
    """The built-in word list: T5-style specials first (pad 0, eos 1, unk 2), then real English words."""
    words = resources.files("model").joinpath("tiny_vocab.txt").read_text().split()
    return [*TINY_SPECIAL_TOKENS, *words]


def build_tiny_tokenizer() -> PreTrainedTokenizerBase:
    """A lowercase word-level tokenizer over :func:`tiny_vocabulary` that appends ``</s>`` like umT5."""
    vocab = {word: index for index, word in enumerate(tiny_vocabulary())}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", vocab["</s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )


def build_tiny_encoder(config: TextEncoderConfig, vocab_size: int) -> UMT5EncoderModel:
    """A randomly initialised umT5 encoder of the given size (seed it before calling)."""
    return UMT5EncoderModel(
        UMT5Config(
            vocab_size=vocab_size,
            d_model=config.d_model,
            d_kv=config.d_kv,
            d_ff=config.d_ff,
            num_layers=config.num_layers,
            num_heads=config.num_heads,
        )
    )


def load_tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    if not folder.is_dir():
        raise CheckpointError("tokenizer folder not found", file=str(folder))
    return AutoTokenizer.from_pretrained(folder)


def load_encoder(folder: Path, dtype: torch.dtype) -> UMT5EncoderModel:
    if not (folder / "config.json").is_file():
        raise CheckpointError("text encoder config not found", file=str(folder / "config.json"))
    return UMT5EncoderModel.from_pretrained(folder, dtype=dtype)


@dataclass
class TextSide:
    """Tokenizer + umT5 encoder, with the null-prompt condition cached after its first use."""

    tokenizer: PreTrainedTokenizerBase
    encoder: UMT5EncoderModel
    context_tokens: int
    null_condition_cache: torch.Tensor | None = field(default=None, repr=False)

    @property
    def device(self) -> torch.device:
        return self.encoder.device

    def token_count(self, prompt: str) -> int:
        """Tokens of ``prompt`` including the closing ``</s>``."""
        return len(self.tokenizer(prompt).input_ids)

    def tokenize(
        self, prompts: list[str], length: int, *, param: str = "prompt"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Ids padded to ``length`` -> ``(ids (B, L) int64, mask (B, L) int64)``; longer prompts are refused."""
        for prompt in prompts:
            count = self.token_count(prompt)
            if count > length:
                raise PromptTooLongError(
                    f"{param} is {count} tokens long; at most {length} tokens (including the end token) are allowed",
                    param=param,
                )
        batch = self.tokenizer(prompts, padding="max_length", max_length=length, return_tensors="pt")
        return batch.input_ids.to(self.device), batch.attention_mask.to(self.device)

    @torch.no_grad()
    def encode(self, prompts: list[str], *, param: str = "prompt") -> torch.Tensor:
        """umT5 encoder output over the prompts padded to the context length: ``(B, Lc, text_dim)``."""
        ids, mask = self.tokenize(prompts, self.context_tokens, param=param)
        return self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state

    def null_condition(self) -> torch.Tensor:
        """The encoding of the empty prompt, ``(1, Lc, text_dim)``, computed once."""
        if self.null_condition_cache is None:
            self.null_condition_cache = self.encode([""])
        return self.null_condition_cache

    def set_null_condition(self, embedding: torch.Tensor, source: str) -> None:
        """Use a precomputed null-prompt embedding ``(1, Lc, text_dim)`` (as the authors ship one)."""
        expected = (self.context_tokens, self.encoder.config.d_model)
        if embedding.dim() == 2:
            embedding = embedding[None]
        if tuple(embedding.shape[1:]) != expected:
            raise CheckpointError(
                f"null-prompt embedding has shape {tuple(embedding.shape)}; expected (1, {expected[0]}, {expected[1]})",
                file=source,
            )
        self.null_condition_cache = embedding.to(self.device, self.encoder.dtype)

    def decode(self, ids: list[int]) -> str:
        """Text of generated ids: stops at the first end token and drops special tokens."""
        eos = self.tokenizer.eos_token_id
        if eos is not None and eos in ids:
            ids = ids[: ids.index(eos)]
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()
