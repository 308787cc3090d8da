"""A word-level tokenizer over the grammar's vocabulary and a tiny transformer text encoder.

The encoder is trained jointly with the generator during pretraining (no downloads, no
pretrained weights). Token ids are a pure function of the grammar (specials first, then
the sorted vocabulary), so a saved encoder stays valid as long as the grammar does.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import nn

from .grammar import BACKGROUNDS, COLORS, MOTIONS, POSITION_PHRASES, SHAPES, SIZES

PAD, UNK = "<pad>", "<unk>"
_WORD = re.compile(r"[a-z]+")


def grammar_words() -> list[str]:
    """Every word any prompt of the grammar can contain, sorted."""
    words = {"a", "background"}
    for group in (COLORS, SHAPES, SIZES, BACKGROUNDS):
        words.update(group)
    for phrase in list(POSITION_PHRASES.values()) + list(MOTIONS):
        words.update(phrase.split())
    return sorted(words)


class Tokenizer:
    """Word-level tokenizer: lower-cased words (punctuation dropped), ``<pad>`` = 0,
    ``<unk>`` = 1 for words outside the vocabulary, sequences padded or truncated to
    ``max_len`` (the longest grammar prompt has 12 words)."""

    def __init__(self, max_len: int = 16, words: Sequence[str] | None = None):
        if not isinstance(max_len, int) or isinstance(max_len, bool) or max_len < 1:
            raise ValueError(f"Tokenizer: max_len must be a positive int, got {max_len!r}")
        words = grammar_words() if words is None else list(words)
        if len(set(words)) != len(words) or PAD in words or UNK in words:
            raise ValueError("Tokenizer: words must be unique and must not contain the special tokens")
        self.max_len = max_len
        self.vocab = [PAD, UNK, *words]
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.pad_id, self.unk_id = 0, 1

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def words(self, text: str) -> list[str]:
        """The words of ``text``, lower-cased, punctuation dropped."""
        if not isinstance(text, str):
            raise TypeError(f"Tokenizer: each text must be a str, got {type(text).__name__}")
        return _WORD.findall(text.lower())

    def unknown_words(self, text: str) -> list[str]:
        """The words of ``text`` outside the vocabulary (they would encode as ``<unk>``)."""
        return [w for w in self.words(text) if w not in self.index]

    def encode(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``ids`` (B, max_len) long and ``mask`` (B, max_len) bool (True on real tokens).

        Unknown words become ``<unk>`` (masked in: they are real tokens); words beyond
        ``max_len`` are dropped.
        """
        if isinstance(texts, str) or not isinstance(texts, Sequence):
            raise TypeError(f"Tokenizer.encode: texts must be a list of str, got {type(texts).__name__}")
        ids = torch.full((len(texts), self.max_len), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(texts), self.max_len, dtype=torch.bool)
        for i, text in enumerate(texts):
            toks = [self.index.get(w, self.unk_id) for w in self.words(text)][: self.max_len]
            ids[i, : len(toks)] = torch.tensor(toks, dtype=torch.long)
            mask[i, : len(toks)] = True
        return ids, mask

    def decode(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> list[str]:
        """Words joined by spaces, padding dropped (``<unk>`` kept as is)."""
        if ids.dim() != 2:
            raise ValueError(f"Tokenizer.decode: ids must be (B, L), got shape {tuple(ids.shape)}")
        if mask is None:
            mask = ids != self.pad_id
        return [" ".join(self.vocab[int(t)] for t, m in zip(row, mrow, strict=True) if m)
                for row, mrow in zip(ids.tolist(), mask.tolist(), strict=True)]


class TextEncoder(nn.Module):
    """Token + learned position embeddings, a small pre-norm transformer encoder, a final norm.

    ``forward(ids (B, L) long, mask (B, L) bool)`` returns ``(tokens (B, L, dim), mask (B, L),
    pooled (B, dim))``: padded positions of ``tokens`` are zero and never attended to;
    ``pooled`` is the mean of the real tokens (zero for a sequence without any).
    ``encode(prompts)`` tokenizes and runs it on the module's device.
    """

    def __init__(self, dim: int = 64, layers: int = 2, heads: int = 4, *, tokenizer: Tokenizer | None = None,
                 max_len: int | None = None, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"TextEncoder: dim ({dim}) must be divisible by heads ({heads})")
        if layers < 1:
            raise ValueError(f"TextEncoder: layers must be >= 1, got {layers}")
        self.tokenizer = tokenizer if tokenizer is not None else Tokenizer(max_len or 16)
        self.dim = dim
        self.max_len = self.tokenizer.max_len
        self.token = nn.Embedding(self.tokenizer.vocab_size, dim)
        self.position = nn.Parameter(torch.zeros(self.max_len, dim))
        nn.init.normal_(self.token.weight, std=0.02)
        nn.init.normal_(self.position, std=0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, int(dim * mlp_ratio), dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        # enable_nested_tensor=False: the nested fast path would return padded rows
        # differently in eval and train mode; we want one behaviour.
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if ids.dim() != 2 or ids.dtype != torch.long:
            raise ValueError(f"TextEncoder: ids must be (B, L) long, got {tuple(ids.shape)} {ids.dtype}")
        if mask.shape != ids.shape or mask.dtype != torch.bool:
            raise ValueError(f"TextEncoder: mask must be bool of shape {tuple(ids.shape)}, got "
                             f"{tuple(mask.shape)} {mask.dtype}")
        if ids.shape[1] > self.max_len:
            raise ValueError(f"TextEncoder: sequence length {ids.shape[1]} exceeds max_len {self.max_len}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.token.num_embeddings):
            raise ValueError(f"TextEncoder: ids must be in [0, {self.token.num_embeddings}), got "
                             f"[{int(ids.min())}, {int(ids.max())}]")
        x = self.token(ids) + self.position[: ids.shape[1]]
        # A row with no real token would make attention softmax over nothing (NaN): let it
        # attend to its first slot; its output is zeroed below anyway.
        empty = ~mask.any(1)
        attend = mask.clone()
        attend[empty, 0] = True
        x = self.encoder(x, src_key_padding_mask=~attend)
        x = self.norm(x) * mask[..., None]
        count = mask.sum(1, keepdim=True).clamp(min=1)
        pooled = x.sum(1) / count
        return x, mask, pooled

    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Tokenize ``prompts`` and encode them (on this module's device)."""
        ids, mask = self.tokenizer.encode(prompts)
        device = self.token.weight.device
        return self(ids.to(device), mask.to(device))
