"""The results store (collect, load_runs) and the config fingerprint behind resuming sweeps."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pandas as pd
import pytest

from basis_sharing.tracking.resume import config_fingerprint, find_completed
from basis_sharing.tracking.store import BASE_COLUMNS, collect, load_runs

REPO = Path(__file__).resolve().parents[1]
STORE = REPO / "tests" / "data" / "store"


@pytest.fixture(scope="module")
def runs():
    return load_runs(STORE)


def by_path(runs, path: str):
    rows = runs[runs.path == path]
    assert len(rows) == 1, path
    return rows.iloc[0]


def test_one_row_per_record_with_its_fields(runs):
    assert len(runs) == 11
    assert list(runs.columns[: len(BASE_COLUMNS)]) == BASE_COLUMNS
    assert runs.path.tolist() == sorted(runs.path)
    assert runs.status.value_counts().to_dict() == {"completed": 10, "failed": 1}
    svd_llm = by_path(runs, "llama7b/table1/method=svd_llm,ratio=0.2/results.json")
    expected = {
        "model": "llama7b",
        "method": "svd_llm",
        "target_ratio": 0.2,
        "achieved_ratio": 0.2004,
        "update": "none",
        "calibration": "wikitext2",
        "calibration_split": "train",
        "finetune": "none",
        "status": "completed",
        "collection": "table1",
        "job": "method=svd_llm,ratio=0.2",
        "params.total": 6_738_415_616,
        "time.compress_s": 12.5 + 30.25,
        "ppl.wikitext2": 7.9812,
        "ppl.ptb": 17.6,
        "ppl.c4": 15.1,
        "ppl.wikitext2.windows": 149,
        "ppl.c4.windows": 473,
        "acc.piqa": 0.7,
        "acc.mathqa": 0.245,
        "speedup.forward": 1.07,
    }
    for key, value in expected.items():
        assert svd_llm[key] == (pytest.approx(value) if isinstance(value, float) else value), key
    assert svd_llm["acc.mean"] == pytest.approx((0.23 + 0.6 + 0.62 + 0.44 + 0.3 + 0.7 + 0.245) / 7)
    assert bool(svd_llm["ppl.wikitext2.truncated"]) is False
    assert math.isnan(svd_llm["acc.limit"])
    assert pd.isna(svd_llm["group_size"])  # no group size in the config or method_info


def test_group_size_update_truncation_and_missing_metrics(runs):
    dense = by_path(runs, "llama7b/table1/method=dense,ratio=0.2/results.json")
    assert math.isnan(dense.target_ratio) and dense.achieved_ratio == 0.0
    assert pd.isna(dense["group_size"]) and pd.isna(dense["acc.limit"])
    update = by_path(
        runs, "llama7b/table1/method.update=True,method=basis_sharing,ratio=0.2/results.json"
    )
    assert update["update"] == "one_pass"  # update: true is Basis Sharing's own refit
    assert update.group_size == 2 and update["ppl.wikitext2"] == 7.5
    assert math.isnan(update["acc.mean"]) and math.isnan(update["speedup.forward"])
    partial = by_path(runs, "llama7b/table1/method=basis_sharing,ratio=0.4/results.json")
    assert bool(partial["ppl.wikitext2.truncated"]) and partial["ppl.wikitext2.windows"] == 4
    assert partial["acc.limit"] == 20
    n4 = by_path(runs, "llama7b/table6/method.group_size=4,ratio=0.3/results.json")
    assert n4.group_size == 4 and n4.achieved_ratio == 0.2981
    failed = by_path(runs, "llama7b/table1/method=fwsvd,ratio=0.5/results.json")
    assert failed.status == "failed" and math.isnan(failed["ppl.wikitext2"])


def test_fingerprint_ignores_only_what_cannot_change_results(runs):
    record = json.loads(
        (STORE / "llama7b/table1/method=svd_llm,ratio=0.2/results.json").read_text()
    )
    config = record["config"]
    base = config_fingerprint(config)
    assert by_path(runs, "llama7b/table1/method=svd_llm,ratio=0.2/results.json").fingerprint == base

    def changed(path: str, value) -> dict:
        copy = json.loads(json.dumps(config))
        *parents, leaf = path.split(".")
        node = copy
        for key in parents:
            node = node[key]
        node[leaf] = value
        return copy

    for path, value in [
        ("paths.output_root", "/elsewhere"),
        ("paths.data_dir", "/mirror"),
        ("device", "cpu"),
        ("offline", True),
        ("force", True),
        ("logger", {"name": "wandb", "mode": "offline"}),
        ("method.decomposition_cache_mb", 0.0),
    ]:
        assert config_fingerprint(changed(path, value)) == base, path
    for path, value in [
        ("ratio", 0.3),
        ("seed", 1),
        ("method.update", True),
        ("calibration.n_samples", 128),
        ("eval.max_windows", 4),
        ("model.name", "llama13b"),
    ]:
        assert config_fingerprint(changed(path, value)) != base, path


def write_record(directory: Path, config: dict, status: str = "completed") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "results.json"
    path.write_text(json.dumps({"status": status, "config": config, "metrics": {}}))
    return path


def test_find_completed_needs_status_and_fingerprint(tmp_path):
    config = {"ratio": 0.2, "method": {"name": "svd"}, "paths": {"output_root": "a"}}
    job = tmp_path / "sweep" / "ratio=0.2"
    assert find_completed(job, config) is None  # nothing there
    write_record(job, config, status="running")  # an interrupted job
    assert find_completed(job, config) is None
    write_record(job, config, status="failed")
    assert find_completed(job, config) is None
    write_record(job, {**config, "ratio": 0.3})  # completed, but another configuration
    assert find_completed(job, config) is None
    path = write_record(job, {**config, "paths": {"output_root": "b"}})
    found = find_completed(job, config)
    assert found is not None and found[0] == path and found[1]["status"] == "completed"
    (job / "results.json").write_text("{not json")  # unreadable: recompute, never crash
    assert find_completed(job, config) is None


def fake_hydra_outputs(root: Path) -> Path:
    """A sweep directory as Hydra leaves it: two completed jobs, one failed, one running."""
    sweep = root / "outputs" / "experiments" / "table1"
    for job in ("method=svd_llm,ratio=0.2", "method=basis_sharing,ratio=0.2"):
        src = STORE / "llama7b" / "table1" / job / "results.json"
        (sweep / job).mkdir(parents=True)
        shutil.copyfile(src, sweep / job / "results.json")
        (sweep / job / ".hydra").mkdir()
        (sweep / job / "run.log").write_text("log")
    shutil.copytree(
        STORE / "llama7b/table1/method=fwsvd,ratio=0.5", sweep / "method=fwsvd,ratio=0.5"
    )
    running = json.loads((sweep / "method=svd_llm,ratio=0.2" / "results.json").read_text())
    running["status"] = "running"
    (sweep / "method=svd,ratio=0.2").mkdir()
    (sweep / "method=svd,ratio=0.2" / "results.json").write_text(json.dumps(running))
    return sweep


def test_collect_copies_completed_runs_into_the_store_layout(tmp_path):
    sweep = fake_hydra_outputs(tmp_path)
    dest = tmp_path / "results" / "runs"
    report = collect(sweep, dest_root=dest)
    expected = {
        dest / "llama7b" / "table1" / "method=svd_llm,ratio=0.2" / "results.json",
        dest / "llama7b" / "table1" / "method=basis_sharing,ratio=0.2" / "results.json",
    }
    assert set(report.copied) == expected
    assert sorted(p.parent.name for p in report.not_completed) == [
        "method=fwsvd,ratio=0.5",
        "method=svd,ratio=0.2",
    ]
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()) == sorted(
        p.relative_to(dest).as_posix() for p in expected
    )
    for path in expected:  # byte-for-byte copies
        assert path.read_bytes() == (sweep / path.parent.name / "results.json").read_bytes()
    frame = load_runs(dest)
    assert frame.collection.tolist() == ["table1", "table1"]
    assert set(frame.job) == {"method=svd_llm,ratio=0.2", "method=basis_sharing,ratio=0.2"}
    # Collecting again changes nothing; a differing record is kept unless overwrite.
    again = collect(sweep, dest_root=dest)
    assert not again.copied and len(again.unchanged) == 2
    src = sweep / "method=svd_llm,ratio=0.2" / "results.json"
    src.write_text(src.read_text().replace("7.9812", "7.9"))
    kept = collect(sweep, dest_root=dest)
    assert len(kept.conflicts) == 1 and "7.9812" in kept.conflicts[0].read_text()
    replaced = collect(sweep, dest_root=dest, overwrite=True)
    assert len(replaced.copied) == 1 and '"ppl": 7.9,' in replaced.copied[0].read_text()


def test_collect_a_single_run_and_a_name(tmp_path):
    run_dir = tmp_path / "outputs" / "runs" / "2026-01-01" / "12-00-00_llama7b_dense"
    run_dir.mkdir(parents=True)
    shutil.copyfile(
        STORE / "llama7b/table1/method=dense,ratio=0.2/results.json", run_dir / "results.json"
    )
    dest = tmp_path / "store"
    report = collect(run_dir, "dense_full", dest)
    assert report.copied == [dest / "llama7b" / "dense_full" / "results.json"]
    row = load_runs(dest).iloc[0]
    assert (row.collection, row.job, row.method) == ("dense_full", None, "dense")
    # A folder above several sweeps: job names keep the relative path, so they cannot collide.
    report = collect(tmp_path / "outputs", "all", dest)
    assert report.copied == [
        dest / "llama7b" / "all" / "runs_2026-01-01_12-00-00_llama7b_dense" / "results.json"
    ]


def test_collect_cli(tmp_path):
    import subprocess
    import sys

    sweep = fake_hydra_outputs(tmp_path)
    proc = subprocess.run(
        [
            sys.executable,
            "scripts/collect_runs.py",
            str(sweep),
            "--name",
            "t1",
            "--dest",
            str(tmp_path / "store"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert "2 copied, 0 already there, 0 conflicts, 2 not completed, 0 unreadable" in proc.stdout
    assert (tmp_path / "store/llama7b/t1/method=svd_llm,ratio=0.2/results.json").is_file()
