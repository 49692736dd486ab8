"""scripts/bench_gpu_7b_goal.py, the issue-14 GPU goal, on its CPU smoke shape: the code path a GPU
run takes (sequential calibration, 4 ratios, the report's fields), in seconds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_goal_script_runs_its_smoke_shape_and_reports_every_goal(tmp_path):
    out = tmp_path / "goal.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "bench_gpu_7b_goal.py"),
            *("--device", "cpu", "--hidden", "64", "--mlp", "172", "--heads", "4"),
            *("--layers", "2", "--n-samples", "4", "--seq-len", "32", "--batch-size", "auto"),
            *("--dtype", "float32", "--no-generation", "--json", str(out)),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [r["ratio"] for r in report["ratios"]] == [0.2, 0.3, 0.4, 0.5]
    # auto: this machine's RAM holds every sample of the smoke shape
    choice = report["args"]["batch_choice"]
    assert choice["batch_size"] == choice["limit"] == 4 and choice["free"] > 0
    for r in report["ratios"]:
        assert abs(r["achieved"] - r["ratio"]) < 0.02
    assert report["calibration_tokens_per_s"] == 4 * 32 / report["calibration_s"]
    total = report["calibration_s"] + sum(r["decompose_s"] for r in report["ratios"])
    assert report["calibration_plus_decompositions_s"] == total
    assert report["goal_5_min_met"] is (total <= 300)
    assert report["peak_gpu_gb"] is None and report["goal_24_gb_met"] is None  # no GPU here
