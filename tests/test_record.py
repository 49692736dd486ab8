"""The run record: lifecycle, per-stage measurements, environment."""

from __future__ import annotations

import json
import mmap
import subprocess

import pytest
import torch

from basis_sharing.tracking import resources
from basis_sharing.tracking.environment import PROJECT_ROOT, environment
from basis_sharing.tracking.record import RunRecord, load_record, summary_table
from basis_sharing.tracking.resources import current_rss_bytes


def test_record_is_written_at_start_after_each_stage_and_at_the_end(tmp_path):
    record = RunRecord(tmp_path, {"ratio": 0.2}, method="dense")
    record.write()
    assert load_record(tmp_path / "results.json")["status"] == "running"
    with record.stage("work"):
        pass
    on_disk = load_record(tmp_path / "results.json")
    assert set(on_disk["stages"]["work"]) >= {"wall_s", "peak_rss_mb", "rss_scope"}
    record.finish()
    final = load_record(tmp_path / "results.json")
    assert final["status"] == "completed" and final["finished_at"]
    assert final["config"] == {"ratio": 0.2} and final["method"] == "dense"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temp files left


def test_failure_keeps_what_was_computed(tmp_path):
    record = RunRecord(tmp_path, {})
    record["metrics"]["perplexity"] = {"wikitext2": {"ppl": 5.0}}
    with pytest.raises(RuntimeError):
        with record.stage("boom"):
            raise RuntimeError("disk full")
    record.fail(RuntimeError("disk full"))
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["status"] == "failed"
    assert data["error"] == {"type": "RuntimeError", "message": "disk full"}
    assert data["metrics"]["perplexity"]["wikitext2"]["ppl"] == 5.0
    assert "wall_s" in data["stages"]["boom"]


def touch_fresh_pages(n_bytes: int) -> None:
    """Make ``n_bytes`` resident and release them.

    An anonymous mapping always brings new pages (a malloc'd block may reuse memory the process
    already holds, as it does late in a long test session), so RSS surely rises by ``n_bytes``.
    """
    block = mmap.mmap(-1, n_bytes)
    for offset in range(0, n_bytes, mmap.PAGESIZE):
        block[offset] = 1
    block.close()


def test_peak_rss_is_measured_per_stage(tmp_path):
    record = RunRecord(tmp_path, {})
    start_mb = current_rss_bytes() / 2**20
    with record.stage("big") as stats:
        touch_fresh_pages(300 * 2**20)
    with record.stage("small"):
        pass
    big, small = record["stages"]["big"], record["stages"]["small"]
    assert big["wall_s"] >= 0
    assert big["peak_rss_mb"] >= start_mb + 250  # holds whatever the scope
    if stats["rss_scope"] == "stage":  # the mark was reset and the reset confirmed
        assert big["peak_rss_mb"] - small["peak_rss_mb"] >= 250


def test_unconfirmed_peak_reset_falls_back_to_process_scope(tmp_path, monkeypatch):
    """A sandbox that accepts the clear_refs write but keeps the old mark is not trusted."""
    clear_refs, status = tmp_path / "clear_refs", tmp_path / "status"
    status.write_text("Name:\tpython\nVmHWM:\t 3809180 kB\nVmRSS:\t  409600 kB\n")
    monkeypatch.setattr(resources, "_CLEAR_REFS", clear_refs)
    monkeypatch.setattr(resources, "_STATUS", status)
    assert resources.reset_peak_rss() is False
    assert clear_refs.read_text() == "5"
    stats = {}
    with resources.measure(stats):
        pass
    assert stats["rss_scope"] == "process"
    assert stats["peak_rss_mb"] == round(3809180 / 1024, 1)
    status.write_text("VmHWM:\t 409700 kB\nVmRSS:\t  409600 kB\n")  # a working reset
    assert resources.reset_peak_rss() is True


def test_environment_records_versions_and_commit():
    env = environment()
    assert env["packages"]["torch"] == torch.__version__.split("+")[0] or env["packages"]["torch"]
    assert env["packages"]["transformers"] and env["python"]
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True
    )
    if head.returncode == 0:
        assert env["git"]["sha"] == head.stdout.strip()
        assert isinstance(env["git"]["dirty"], bool)


def test_summary_table_lists_every_dataset_and_stage():
    data = {
        "model": {"name": "m"},
        "method": "dense",
        "target_ratio": None,
        "status": "completed",
        "params": {"total": 10, "decoder_projections": 8, "achieved_ratio": 0.0},
        "metrics": {
            "perplexity": {
                "wikitext2": {
                    "ppl": 12.345,
                    "truncated": True,
                    "n_windows_evaluated": 4,
                    "n_windows": 149,
                    "n_tokens": 300000,
                },
                "c4": {
                    "ppl": 123456.0,
                    "truncated": False,
                    "n_windows_evaluated": 5,
                    "n_windows": 5,
                    "n_tokens": 9000,
                },
            }
        },
        "stages": {"load_model": {"wall_s": 1.5, "peak_rss_mb": 700.0}},
    }
    table = summary_table(data)
    assert "12.35" in table and "4/149" in table and "truncated" in table
    assert "1.23e+05" in table and "full protocol" in table
    assert "load_model" in table and "700.0" in table


def test_the_summary_shows_the_splits_a_finetuned_run_trained_on():
    from basis_sharing.tracking.record import summary_table

    data = {
        "model": {"name": "smollm2_135m"},
        "method": "basis_sharing",
        "target_ratio": 0.2,
        "status": "completed",
        "finetune": {
            "name": "lora",
            "data": {
                "train": {"dataset": "wikitext2", "split": "validation", "blocks": 9},
                "eval": {"dataset": "wikitext2", "split": "validation", "blocks": 1},
            },
            "eval_loss": [3.25, 3.125],
            "best_epoch": 2,
        },
    }
    assert summary_table(data).splitlines()[1] == (
        "finetune lora | train wikitext2 validation | eval wikitext2 validation | "
        "eval loss 3.2500 3.1250 (kept epoch 2)"
    )
    assert "finetune" not in summary_table({**data, "finetune": None})
