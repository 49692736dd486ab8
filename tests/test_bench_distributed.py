"""scripts/bench_distributed.py on a tiny model: the JSON's structure and its consistency.

Nothing about speed is asserted (the CPUs are shared); the reduced Grams must match.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from conftest import load_script

REPO = Path(__file__).resolve().parents[1]


def test_tiny_benchmark_times_both_conditions_and_matches_the_grams(tmp_path):
    out = tmp_path / "bench.json"
    argv = ["--hidden", "32", "--layers", "2", "--samples", "6", "--seq-len", "8"]
    argv += ["--batch-size", "2", "--repeats", "2", "--json", str(out)]
    assert load_script("bench_distributed").main(argv) == 0
    data = json.loads(out.read_text())
    one, two = data["conditions"]["one_process"], data["conditions"]["gloo_2"]
    assert (one["processes"], two["processes"], two["backend"]) == (1, 2, "gloo")
    for condition in (one, two):
        assert len(condition["wall_s"]) == 2 and all(t > 0 for t in condition["wall_s"])
        assert condition["median_s"] == statistics.median(condition["wall_s"])
    assert data["speedup"] == one["median_s"] / two["median_s"]
    assert data["calibration"]["tokens"] == 6 * 8 and data["tokens_equal"] is True
    assert data["max_gram_rel_diff"] < 1e-5  # float32 Grams, another summation order
    assert data["model"]["intermediate"] == 86 and data["threads_per_process"] == 1
