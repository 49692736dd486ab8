"""Re-running a sweep resumes it: completed jobs are skipped, force=true recomputes them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_run import run_py, tiny_args

pytestmark = pytest.mark.slow


def sweep_records(sweep: Path) -> dict[float, Path]:
    """results.json of each job by its target ratio."""
    out = {}
    for path in sweep.glob("*/results.json"):
        out[json.loads(path.read_text())["config"]["ratio"]] = path
    return out


def test_interrupted_sweep_resumes_and_force_recomputes(tiny_model_dir, tiny_mirror, tmp_path):
    sweep = tmp_path / "sweep"
    common = [
        *tiny_args(tiny_model_dir, tiny_mirror, tmp_path, method="svd"),
        "eval.max_windows=1",
        "eval.ppl_datasets=[wikitext2]",
        "ratio_tolerance=0.05",
        f"hydra.sweep.dir={sweep}",
    ]
    # The sweep was interrupted after its first job: only ratio=0.2 finished.
    proc = run_py(*common, "ratio=0.2", "-m")
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = sweep_records(sweep)[0.2]
    before, mtime = first.read_bytes(), first.stat().st_mtime_ns

    proc = run_py(*common, "ratio=0.2,0.3", "-m")
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    records = sweep_records(sweep)
    assert set(records) == {0.2, 0.3}
    assert records[0.2] == first
    assert first.read_bytes() == before and first.stat().st_mtime_ns == mtime  # not rewritten
    assert output.count("Skipped: ") == 1 and str(first) in output
    second = json.loads(records[0.3].read_text())
    assert second["status"] == "completed" and second["target_ratio"] == 0.3
    assert second["fingerprint"] != json.loads(before)["fingerprint"]

    # A job killed mid-run leaves status "running": the next re-run computes it again.
    killed = json.loads(records[0.3].read_text())
    killed["status"] = "running"
    records[0.3].write_text(json.dumps(killed))
    proc = run_py(*common, "ratio=0.2,0.3", "-m")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(records[0.3].read_text())["status"] == "completed"
    assert first.read_bytes() == before

    # force=true recomputes both, in the same job directories (force is not in their names).
    proc = run_py(*common, "ratio=0.2,0.3", "force=true", "-m")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Skipped: " not in proc.stdout + proc.stderr
    assert sweep_records(sweep) == records
    assert first.stat().st_mtime_ns != mtime
    forced = json.loads(first.read_text())
    assert forced["status"] == "completed" and forced["config"]["force"] is True
    assert forced["fingerprint"] == json.loads(before)["fingerprint"]  # same configuration
    assert forced["metrics"]["perplexity"] == json.loads(before)["metrics"]["perplexity"]
