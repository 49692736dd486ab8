"""Data layer: mirror readers, missing-file errors, tokenization hashes, calibration sampler."""

from __future__ import annotations

import pytest
import torch

from basis_sharing.data.calibration import sample_calibration_blocks
from basis_sharing.data.corpora import CORPORA, alpaca_text, load_corpus
from basis_sharing.data.tokens import token_hash, tokenize_text
from basis_sharing.errors import CalibrationError, ConfigError, DataNotFoundError


def test_real_mirror_rows_match_the_hub_schema(shared_assets):
    test = load_corpus("wikitext2", "test", shared_assets)
    assert len(test.rows) == 4358  # rows of the hub's wikitext-2-raw-v1 test split
    assert test.rows[0] == "" and test.rows[1] == " = Robert Boulter = \n"
    assert all(r == "" or (r.endswith("\n") and r.strip()) for r in test.rows)
    ptb = load_corpus("ptb", "test", shared_assets)
    assert ptb.rows[0] == "no it was n't black monday"  # the hub strips each line
    c4 = load_corpus("c4", "validation", shared_assets)
    assert len(c4.rows) == 2000 and c4.source.endswith("sample-2000.json.gz")
    alpaca = load_corpus("alpaca", "train", shared_assets)
    assert len(alpaca.rows) == 2000 and alpaca.rows[0].startswith("Below is an instruction")


def test_alpaca_text_follows_the_hub_template():
    with_input = alpaca_text({"instruction": "Add.", "input": "1 2", "output": "3"})
    assert with_input.endswith("### Instruction:\nAdd.\n\n### Input:\n1 2\n\n### Response:\n3")
    assert "paired with an input" in with_input
    without = alpaca_text({"instruction": "Say hi.", "input": "", "output": "hi"})
    assert without.endswith("### Instruction:\nSay hi.\n\n### Response:\nhi")
    assert "### Input" not in without


def test_text_joins_rows_with_blank_lines(tiny_mirror):
    corpus = load_corpus("ptb", "test", tiny_mirror)
    assert corpus.text() == "\n\n".join(corpus.rows)
    assert corpus.text(max_rows=2) == corpus.rows[0] + "\n\n" + corpus.rows[1]


def test_missing_mirror_file_names_the_file_and_the_command(tiny_mirror):
    with pytest.raises(DataNotFoundError) as err:
        load_corpus("wikitext2", "train", tiny_mirror)
    message = str(err.value)
    assert str(tiny_mirror / "wikitext-2-raw-v1" / "wiki.train.raw") in message
    assert "scripts/prepare_data.py" in message and "make data MIRROR=" in message


def test_missing_file_fails_fast_when_the_hub_is_not_reachable(tiny_mirror, monkeypatch):
    """Without the offline env switch, an unreachable endpoint is detected, not retried."""
    from basis_sharing import hub

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: connection refused
    hub._endpoint_reachable.cache_clear()
    assert not hub.hub_available()
    with pytest.raises(DataNotFoundError, match="hub is unreachable"):
        load_corpus("ptb", "train", tiny_mirror)


def test_unknown_dataset_and_split_list_the_choices(tiny_mirror):
    with pytest.raises(ConfigError, match="Valid choices: alpaca, c4, ptb, wikitext2"):
        load_corpus("wikitext103", "test", tiny_mirror)
    with pytest.raises(ConfigError, match="Valid choices: train, validation"):
        load_corpus("c4", "test", tiny_mirror)
    assert set(CORPORA) == {"wikitext2", "ptb", "c4", "alpaca"}


def test_tokenize_once_and_hash(tiny_tokenizer):
    ids = tokenize_text(tiny_tokenizer, "the city of the river")
    assert ids.dtype == torch.int64 and ids.dim() == 1
    assert ids.tolist() == tiny_tokenizer("the city of the river")["input_ids"]
    assert token_hash(ids) == token_hash(ids.clone())
    assert token_hash(ids) != token_hash(ids.flip(0))
    assert token_hash(ids) != token_hash(ids.view(1, -1))  # the shape is part of the hash


def test_calibration_blocks_follow_the_seeded_randperm():
    ids = torch.arange(1000)
    blocks = sample_calibration_blocks(ids, n_samples=5, seq_len=64, seed=2023)
    torch.manual_seed(2023)
    oracle = torch.randperm(1000 // 64)[:5]
    assert blocks.shape == (5, 64) and blocks.dtype == torch.int64
    for block, index in zip(blocks, oracle, strict=True):
        assert torch.equal(block, ids[index * 64 : (index + 1) * 64])
    assert len({int(b[0]) for b in blocks}) == 5  # distinct, non-overlapping blocks


def test_calibration_sampler_does_not_touch_the_global_rng():
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    sample_calibration_blocks(torch.arange(500), 3, 10, seed=1)
    assert torch.equal(torch.rand(3), expected)


def test_too_many_calibration_samples_says_how_many_exist():
    expected = r"1000 tokens, i\.e\. only 15 non-overlapping blocks"
    with pytest.raises(CalibrationError, match=expected):
        sample_calibration_blocks(torch.arange(1000), n_samples=16, seq_len=64, seed=0)
    assert sample_calibration_blocks(torch.arange(1000), 15, 64, 0).shape == (15, 64)
