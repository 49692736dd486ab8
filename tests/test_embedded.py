"""The real embedded model (SmolLM2-135M-Instruct) on the real mirror text, small settings."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from conftest import compose_config

from basis_sharing import pipeline
from basis_sharing.data.corpora import load_corpus
from basis_sharing.data.tokens import tokenize_text


def run_embedded(cache: Path, assets: Path, out: Path, *overrides: str) -> dict:
    """The pipeline on SmolLM2 with 128-token windows, 2 per dataset, from a session cache."""
    cfg = compose_config(
        f"paths.data_dir={assets}",
        f"paths.cache_dir={cache}",
        "model.context_length=128",
        "eval=ppl",
        "eval.max_windows=2",
        *overrides,
    )
    return pipeline.run(cfg, out_dir=out)


@pytest.mark.slow
def test_dense_smollm2_on_real_text(embedded_cache, shared_assets, tmp_path):
    _, cache, model_dir, _ = embedded_cache
    record = run_embedded(cache, shared_assets, tmp_path, "method=dense")
    assert record["status"] == "completed" and (tmp_path / "results.json").is_file()
    assert record["model"]["source"] == "gguf-package" and record["model"]["cache_hit"]
    assert record["model"]["family"] == "llama"
    # SmolLM2-135M: 30 layers, hidden 576, 3 KV heads of 64, MLP 1536; tied embeddings.
    per_layer = 2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536
    assert record["params"]["decoder_projections"] == 30 * per_layer == 106_168_320
    assert record["params"]["total"] == 134_515_008
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    wiki = tokenize_text(tokenizer, load_corpus("wikitext2", "test", shared_assets).text())
    ppl = record["metrics"]["perplexity"]
    assert ppl["wikitext2"]["n_tokens"] == wiki.numel()
    assert ppl["wikitext2"]["n_windows"] == math.ceil(wiki.numel() / 128)
    for name in ("wikitext2", "ptb", "c4"):
        # A real 135M model on real text: far better than chance (vocab 49152), not perfect.
        assert 2.0 < ppl[name]["ppl"] < 300.0, (name, ppl[name])
        assert ppl[name]["truncated"] and ppl[name]["n_windows_evaluated"] == 2


@pytest.mark.slow
def test_basis_sharing_smollm2_meets_its_ratio(embedded_cache, shared_assets, tmp_path):
    """The default job (Basis Sharing, 20 %) on the real model, with a small calibration set."""
    _, cache, _, _ = embedded_cache
    record = run_embedded(
        cache, shared_assets, tmp_path, "calibration.n_samples=8", "calibration.seq_len=128"
    )
    assert record["method"] == "basis_sharing" and record["status"] == "completed"
    params = record["params"]
    assert abs(params["achieved_ratio"] - 0.2) <= 0.005  # the real dims meet the 0.5 pp bound
    assert params["decoder_projections"] == params["planned_decoder_projections"]
    groups = record["method_info"]["groups"]
    # SmolLM2's k/v are GQA-narrow (576 -> 192): private by the GQA rule, like o and down.
    assert record["method_info"]["private_by_gqa_rule"] == ["k", "v"]
    assert len(groups) == 3 * 15 + 4 * 30  # q/up/gate in 15 pairs; k, v, o, down per layer
    q0 = next(g for g in groups if g["kind"] == "q" and g["index"] == 0)
    assert q0["layers"] == [0, 1] and q0["rank"] == 576 * 576 * 2 * 8 // 10 // (576 + 2 * 576)
    assert (tmp_path / "calibration_ids.safetensors").is_file()
    # 8 x 128 = 1024 calibration tokens cannot span down_proj's 1536-dim input: every down Gram
    # is singular and must take the eigenvalue-shift fallback, which the record lists.
    fallbacks = record["method_info"]["whitening_fallback_groups"]
    assert sorted(g["layers"][0] for g in fallbacks if g["kind"] == "down") == list(range(30))
    for name in ("wikitext2", "ptb", "c4"):
        assert math.isfinite(record["metrics"]["perplexity"][name]["ppl"])
