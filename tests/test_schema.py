"""The results.json schema: every committed record, real runs and damaged records against it."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import get_args, get_type_hints

import pytest
from conftest import compose_config, tiny_run_overrides

from basis_sharing import pipeline
from basis_sharing.errors import UserError
from basis_sharing.tracking import schema
from basis_sharing.tracking.record import RESULTS_FILE, RunRecord, summary_table
from basis_sharing.tracking.schema import Key, Metric, Status, validate_record

REPO = Path(__file__).resolve().parents[1]
RECORD_ROOTS = (REPO / "results" / "runs", REPO / "tests" / "data" / "store")
COMMITTED = sorted(path for root in RECORD_ROOTS for path in root.rglob(RESULTS_FILE))
# A complete record (perplexity, zero-shot, throughput, method_info, environment.threads): the
# base that the damage cases below change one thing of.
FULL_RECORD = REPO / "results" / "runs" / "smollm2_135m" / "default_run" / RESULTS_FILE


def test_there_are_committed_records_in_both_places():
    for root in RECORD_ROOTS:
        assert any(path.is_relative_to(root) for path in COMMITTED), root


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_committed_record_validates(path):
    assert validate_record(json.loads(path.read_text())) == []


def test_key_names_are_the_schema_keys():
    """The constants and the typed layout name the same keys (one cannot drift from the other)."""
    names = {v for k, v in vars(Key).items() if not k.startswith("_")}
    assert names == set(schema.TOP_LEVEL_KEYS)
    assert set(get_args(get_type_hints(schema.RecordData)["status"])) == set(schema.STATUSES)
    assert {Status.RUNNING, Status.COMPLETED, Status.FAILED} == set(schema.STATUSES)
    assert {Metric.PERPLEXITY, Metric.ZEROSHOT, Metric.THROUGHPUT} == set(
        get_type_hints(schema.Metrics)
    )


def test_the_writer_keeps_the_layout_and_key_order(tmp_path):
    """The record the writer starts is, key for key and in order, what version 1 wrote."""
    record = RunRecord(tmp_path, {"seed": 0}, method="dense", target_ratio=None, seed=0)
    assert list(record.data) == [
        "schema_version",
        "status",
        "started_at",
        "finished_at",
        "run_dir",
        "method",
        "target_ratio",
        "seed",
        "config",
        "model",
        "data",
        "hashes",
        "params",
        "metrics",
        "stages",
        "environment",
        "error",
    ]
    assert record["schema_version"] == schema.SCHEMA_VERSION == 1
    assert record["hashes"] == {"eval": {}, "calibration": None}
    text = record.write().read_text()
    assert text == json.dumps(record.data, indent=2, default=str) + "\n"


def minimal_run_record(tmp_path: Path) -> RunRecord:
    """The fields the pipeline gives every record before its first write."""
    record = RunRecord(
        tmp_path,
        {},
        method="dense",
        target_ratio=None,
        seed=0,
        device="cpu",
        overrides=[],
        choices={},
    )
    record["model"]["name"] = "tiny"
    return record


def test_the_writer_s_lifecycle_against_the_status_rules(tmp_path):
    record = minimal_run_record(tmp_path)
    assert validate_record(record.data) == []  # running, nothing measured yet
    with record.stage("work") as stats:
        assert validate_record(record.data) == []  # a running stage is still empty
        assert stats == {"rss_scope": stats["rss_scope"]}
    entry = {"ppl": 5.0, "n_windows": 2, "n_windows_evaluated": 1, "truncated": True}
    record.metric(Metric.PERPLEXITY)["wikitext2"] = entry
    assert record["metrics"] == {"perplexity": {"wikitext2": entry}}
    assert record.metric(Metric.PERPLEXITY) is record["metrics"]["perplexity"]  # not replaced
    record.finish()
    on_disk = json.loads((tmp_path / RESULTS_FILE).read_text())
    assert validate_record(on_disk) == [
        "params.total: missing in a completed record",
        "params.achieved_ratio: missing in a completed record",
    ]
    record["params"].update(total=10, achieved_ratio=0.0)
    assert validate_record(record.data) == []
    record.fail(RuntimeError("disk full"))
    assert record["error"] == schema.error_info(RuntimeError("disk full"))
    assert record["error"] == {"type": "RuntimeError", "message": "disk full"}
    assert validate_record(record.data) == []


def tiny_config(model_dir: Path, mirror: Path, tmp_path: Path, *extra: str):
    return compose_config(
        *tiny_run_overrides(
            model_dir,
            mirror,
            f"paths.cache_dir={tmp_path}/cache",
            "method=basis_sharing",
            "ratio=0.4",
            "calibration=wikitext2_cpu",
            "calibration.n_samples=4",
            "calibration.seq_len=32",
            *extra,
        )
    )


def test_a_real_tiny_run_writes_a_valid_record(tiny_model_dir, tiny_mirror, tmp_path):
    cfg = tiny_config(
        tiny_model_dir,
        tiny_mirror,
        tmp_path,
        "ratio_tolerance=0.05",  # rank rounding on the tiny model
        "eval.generation.prompts=['the king']",
        "eval.generation.max_new_tokens=3",
        "eval.throughput.enabled=true",
        "eval.throughput.batch_size=2",
        "eval.throughput.max_batches=1",
        "eval.throughput.warmup=0",
        "eval.throughput.new_tokens=2",
        "eval.throughput.runs=1",
    )
    record = pipeline.run(cfg, out_dir=tmp_path / "run")
    on_disk = json.loads((tmp_path / "run" / RESULTS_FILE).read_text())
    assert on_disk == json.loads(json.dumps(record, default=str))
    assert record["status"] == Status.COMPLETED
    for key in (Key.PREFLIGHT, Key.CALIBRATION, Key.METHOD_INFO, Key.GENERATION_SAMPLES):
        assert key in record  # the optional sections this run fills are checked, not skipped
    assert "threads" in record["environment"]
    assert set(schema.throughput(record)) == {"dense", "compressed", "speedup"}
    assert validate_record(on_disk) == []
    # What the readers take through the schema's accessors (zero-shot: the committed records).
    assert schema.groups(on_disk) == on_disk["method_info"]["groups"] != []
    assert set(schema.perplexity(on_disk)) == {"wikitext2", "ptb", "c4"}
    assert "wikitext2" in summary_table(on_disk)


def test_a_real_failed_run_writes_a_valid_record(tiny_model_dir, tiny_mirror, tmp_path):
    """The rank plan misses an impossible tolerance: the run fails in its preflight check."""
    cfg = tiny_config(tiny_model_dir, tiny_mirror, tmp_path, "ratio_tolerance=0.00001")
    with pytest.raises(UserError):
        pipeline.run(cfg, out_dir=tmp_path / "run")
    on_disk = json.loads((tmp_path / "run" / RESULTS_FILE).read_text())
    assert on_disk["status"] == Status.FAILED and on_disk["error"]["type"] == "UserError"
    assert validate_record(on_disk) == []


def _delete(*keys: str):
    def change(record):
        node = record
        for key in keys[:-1]:
            node = node[key]
        del node[keys[-1]]

    return change


def _set(value, *keys: str | int):
    def change(record):
        node = record
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value

    return change


PPL = ("metrics", "perplexity", "wikitext2")
DAMAGE = {
    "missing status": (_delete("status"), ["status: missing"]),
    "unknown status": (
        _set("done", "status"),
        ["status: 'done' is not one of 'running', 'completed', 'failed'"],
    ),
    "completed with an error": (
        _set({"type": "RuntimeError", "message": "boom"}, "error"),
        ["error: a completed record has an error"],
    ),
    "completed without finish time": (
        _set(None, "finished_at"),
        ["finished_at: a completed record has no finish time"],
    ),
    "failed without error": (
        _set("failed", "status"),
        ["error: a failed record has no error type and message"],
    ),
    "error without message": (
        lambda r: r.update(status="failed", error={"type": "RuntimeError"}),
        ["error.message: missing"],
    ),
    "running with an error": (
        lambda r: r.update(status="running", error={"type": "E", "message": "m"}),
        ["error: a running record has an error"],
    ),
    "perplexity entry without ppl": (
        _delete(*PPL, "ppl"),
        ["metrics.perplexity.wikitext2.ppl: missing"],
    ),
    "perplexity entry without windows": (
        lambda r: [r["metrics"]["perplexity"]["ptb"].pop(k) for k in ("n_windows", "truncated")],
        [
            "metrics.perplexity.ptb.n_windows: missing",
            "metrics.perplexity.ptb.truncated: missing",
        ],
    ),
    "ppl as text": (
        _set("103.7", *PPL, "ppl"),
        ["metrics.perplexity.wikitext2.ppl: expected number, got string"],
    ),
    "truncated as a number": (
        _set(1, *PPL, "truncated"),
        ["metrics.perplexity.wikitext2.truncated: expected boolean, got integer"],
    ),
    "seed as text": (_set("0", "seed"), ["seed: expected integer, got string"]),
    "target ratio as text": (
        _set("0.2", "target_ratio"),
        ["target_ratio: expected number or null, got string"],
    ),
    "metrics as a list": (_set([], "metrics"), ["metrics: expected object, got array"]),
    "model without name": (_set({}, "model"), ["model.name: missing"]),
    "fractional rank": (
        _set(307.5, "method_info", "groups", 0, "rank"),
        ["method_info.groups[0].rank: expected integer, got number"],
    ),
    "zero-shot without tasks": (
        _delete("metrics", "zeroshot", "tasks"),
        ["metrics.zeroshot.tasks: missing"],
    ),
    "throughput without tokens/s": (
        _delete("metrics", "throughput", "dense", "forward", "tokens_per_s"),
        ["metrics.throughput.dense.forward.tokens_per_s: missing"],
    ),
    "unfinished stage in a completed record": (
        _set({}, "stages", "compress"),
        ["stages.compress.wall_s: missing in a completed record"],
    ),
    "unknown rss scope": (
        _set("thread", "stages", "compress", "rss_scope"),
        ["stages.compress.rss_scope: 'thread' is not one of 'stage', 'process'"],
    ),
    "git state as text": (
        _set("yes", "environment", "git", "dirty"),
        ["environment.git.dirty: expected boolean or null, got string"],
    ),
    "undeclared section": (
        _set({}, "finetune_report"),
        ["finetune_report: not a key of the record schema (declare it in schema.py)"],
    ),
    "newer schema": (
        _set(2, "schema_version"),
        ["schema_version: 2 is newer than this code's 1"],
    ),
    "several problems": (
        lambda r: r.update(seed=None, hashes={"eval": {}}),
        ["seed: expected integer, got null", "hashes.calibration: missing"],
    ),
}


@pytest.fixture(scope="module")
def full_record() -> dict:
    record = json.loads(FULL_RECORD.read_text())
    assert validate_record(record) == []
    return record


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_records_give_their_problems(full_record, case):
    change, expected = DAMAGE[case]
    record = copy.deepcopy(full_record)
    change(record)
    assert validate_record(record) == expected


@pytest.mark.parametrize(
    "change",
    [
        # schema_version 1 before the preflight check and the thread rule existed
        lambda r: (r.pop("preflight"), r["environment"].pop("threads")),
        lambda r: [r.pop(k) for k in ("data", "environment", "calibration", "method_info")],
        lambda r: r.pop("fingerprint"),
        _set(math.inf, *PPL, "ppl"),  # a diverged model's perplexity is recorded as is
        _set(math.nan, *PPL, "mean_nll"),
        _set(None, "method_info"),
        _set(103, *PPL, "ppl"),  # JSON has one number type
        _set({"source": "local", "extra": [1]}, "data", "eval", "wikitext2"),  # free details
    ],
    ids=[
        "before preflight and threads",
        "hand-written fixture sections only",
        "before fingerprints",
        "infinite ppl",
        "nan nll",
        "null method_info",
        "integer ppl",
        "extra provenance keys",
    ],
)
def test_older_and_optional_layouts_validate(full_record, change):
    record = copy.deepcopy(full_record)
    change(record)
    assert validate_record(record) == []


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ([], ["the record: expected object, got array"]),
        (None, ["the record: expected object, got null"]),
    ],
)
def test_a_record_that_is_not_an_object(data, expected):
    assert validate_record(data) == expected


def test_accessors_read_missing_sections_as_empty():
    assert schema.perplexity({}) == {} and schema.zeroshot({"metrics": None}) == {}
    assert schema.throughput({"metrics": {"throughput": None}}) == {}
    assert schema.groups({"method_info": None}) == [] and schema.section({}, Key.PARAMS) == {}
    assert schema.is_completed({"status": "completed"}) and not schema.is_completed({})
    assert schema.ppl_path("c4") == "metrics.perplexity.c4.ppl"
    assert schema.dotted(Key.STAGES, "compress", "wall_s") == "stages.compress.wall_s"
