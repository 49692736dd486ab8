"""scripts/bench_compress.py on the tiny LLaMA: the sweep reuses statistics and decompositions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import load_script

REPO = Path(__file__).resolve().parents[1]
RATIOS = ["0.2", "0.3", "0.4", "0.5"]


@pytest.fixture(scope="module")
def bench_json(tiny_model_dir, tiny_mirror, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench")
    code = load_script("bench_compress").main(
        [
            "--model",
            "local",
            "--override",
            f"model.local_path={tiny_model_dir}",
            "--override",
            "model.context_length=64",
            "--override",
            "ratio_tolerance=0.05",
            "--data-dir",
            str(tiny_mirror),
            "--n-samples",
            "8",
            "--seq-len",
            "32",
            "--device",
            "cpu",
            "--model-cache",
            str(out / "model_cache"),
            "--ratios",
            *RATIOS,
            "--json",
            str(out / "bench.json"),
        ]
    )
    assert code == 0
    return json.loads((out / "bench.json").read_text())


def test_sweep_reuses_statistics_after_the_first_job(bench_json):
    jobs = bench_json["sweep"]["jobs"]
    assert [job["ratio"] for job in jobs] == [float(r) for r in RATIOS]
    assert [job["stats_cache_hit"] for job in jobs] == [False, True, True, True]
    assert bench_json["single"]["stats_cache_hit"] is False  # its own fresh cache


def test_decompositions_are_computed_only_in_the_first_sweep_job(bench_json):
    first, *later = bench_json["sweep"]["jobs"]
    assert first["decomposition_misses"] > 0 and first["decomposition_hits"] == 0
    for job in later:
        assert job["decomposition_misses"] == 0
        assert job["decomposition_hits"] == first["decomposition_misses"]
    single = bench_json["single"]
    assert single["decomposition_misses"] > 0 and single["decomposition_hits"] == 0


def test_json_has_every_stage_and_positive_totals(bench_json):
    stages = bench_json["single"]["stages"]
    expected = {"data", "model_source", "tokenize", "load_model", "calibrate", "compress"}
    assert set(stages) == expected | {"perplexity"}  # perplexity runs with no datasets
    for stats in stages.values():
        assert stats["wall_s"] >= 0 and stats["peak_rss_mb"] > 0
    assert bench_json["single_total_s"] > 0 and bench_json["sweep_total_s"] > 0
    assert bench_json["n_times_single_s"] == pytest.approx(4 * bench_json["single_total_s"])
    assert bench_json["sweep_over_n_single"] > 0
    assert {"calibrate", "compress"} <= set(bench_json["stage_changes"])


def test_reserved_overrides_are_refused():
    with pytest.raises(SystemExit):
        load_script("bench_compress").parse_args(["--override", "paths.cache_dir=/elsewhere"])
