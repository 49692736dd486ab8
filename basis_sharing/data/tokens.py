"""Tokenization of joined corpora and content hashes of token ids."""

from __future__ import annotations

import hashlib

import torch

from basis_sharing.data.corpora import Corpus
from basis_sharing.errors import BadDataError


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """Token ids of ``text`` tokenized once, with the tokenizer's default special tokens.

    Returns:
        ids: (n_tokens,) int64.
    """
    ids = tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.int64)


def tokenize_split(tokenizer, corpus: Corpus, max_rows: int | None = None) -> torch.Tensor:
    """Token ids of the corpus's first ``max_rows`` rows (all when None), joined.

    Returns:
        ids: (n_tokens,) int64, at least 2 of them: perplexity needs one token of context and one
            to predict, so fewer would leave no window to score (a NaN perplexity).

    Raises:
        BadDataError: the rows used are blank or give fewer than 2 tokens; names the file (or
            hub dataset).
    """
    text = corpus.text(max_rows=max_rows)
    if max_rows is None:
        subject, verb = f"The text of {corpus.describe()}", "tokenizes"
    else:
        subject, verb = f"The first {max_rows} rows of {corpus.describe()}", "tokenize"
    if not text.strip():
        raise BadDataError(f"{subject}: only blank rows, no text to evaluate.")
    ids = tokenize_text(tokenizer, text)
    if ids.numel() < 2:
        raise BadDataError(
            f"{subject} {verb} to {ids.numel()} token(s); perplexity needs at least 2 (a token "
            "of context and one to predict), so no window could be scored. Use a split with "
            "more text."
        )
    return ids


def token_hash(ids: torch.Tensor) -> str:
    """sha256 of the ids (as little-endian int64) and their shape: equal hash, equal tokens."""
    flat = ids.detach().to("cpu", torch.int64).contiguous()
    digest = hashlib.sha256(str(tuple(flat.shape)).encode())
    digest.update(flat.numpy().astype("<i8").tobytes())
    return digest.hexdigest()
