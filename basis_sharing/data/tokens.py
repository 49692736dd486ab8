"""Tokenization of joined corpora and content hashes of token ids."""

from __future__ import annotations

import hashlib

import torch


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """Token ids of ``text`` tokenized once, with the tokenizer's default special tokens.

    Returns:
        ids: (n_tokens,) int64.
    """
    ids = tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.int64)


def token_hash(ids: torch.Tensor) -> str:
    """sha256 of the ids (as little-endian int64) and their shape: equal hash, equal tokens."""
    flat = ids.detach().to("cpu", torch.int64).contiguous()
    digest = hashlib.sha256(str(tuple(flat.shape)).encode())
    digest.update(flat.numpy().astype("<i8").tobytes())
    return digest.hexdigest()
