"""scripts/bench_plus_timing.py, issue 13's time bound on a model built in code, on its CPU smoke
shape: both methods compressed from the same Grams, the preset's options read from its config,
the report's ratio computed from its own timings."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SMOKE = (
    *("--device", "cpu", "--hidden", "64", "--mlp", "172", "--heads", "4", "--kv-heads", "2"),
    *("--layers", "4", "--vocab", "320", "--n-samples", "4", "--seq-len", "32"),
    *("--batch-size", "2"),
)


@pytest.mark.parametrize(
    ("runtime", "forward"), [("full", None), ("sequential", None), ("full", "bfloat16")]
)
def test_the_timing_script_compresses_both_methods_and_reports_their_ratio(
    tmp_path, runtime, forward
):
    out = tmp_path / "plus.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "bench_plus_timing.py"),
            *SMOKE,
            *("--runtime", runtime, "--repeats", "2", "--json", str(out)),
            *(() if forward is None else ("--forward-dtype", forward)),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    times = report["compress_s"]
    assert {k: len(v) for k, v in times.items()} == {"basis_sharing": 2, "basis_sharing_plus": 2}
    median = {k: statistics.median(v) for k, v in times.items()}
    assert report["compress_median_s"] == median
    ratio = median["basis_sharing_plus"] / median["basis_sharing"]
    assert report["plus_over_plain"] == ratio and report["goal_3x_met"] is (ratio <= 3)
    plain, plus = report["methods"]["basis_sharing"], report["methods"]["basis_sharing_plus"]
    assert "update" not in plain and "sharing" not in plain
    # the preset as its config file defines it: auto over the rule's kinds, layerwise refit with
    # re-derived bases (so no first-pass decomposition), the attention replayed in every layer
    update = {"mode": "layerwise", "tokens": 4 * 32, "replayed_layers": 4}
    if forward is not None:  # the refit's forwards ran under the dtype too
        update["forward_dtype"] = forward
    assert plus["update"] == update
    assert plus["first_pass_decomposed"] is False
    assert set(plus["sharing"]) == {"q", "k", "v", "o", "up", "gate", "down"}
    for record in (plain, plus):
        assert abs(record["achieved"] - 0.2) < 0.03


def test_the_timing_script_refuses_no_repeats():
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench_plus_timing.py"), "--repeats", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "--repeats 0 must be >= 1" in proc.stderr
