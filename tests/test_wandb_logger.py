"""logger=wandb: offline W&B runs read back with W&B's own reader and compared to results.json.

The runs are read with ``wandb leet inspect --json``, wandb-core's reader of the ``run-*.wandb``
transaction log (wandb 0.31 has no Python reader any more). conftest sets WANDB_MODE=disabled for
the session; the logger passes ``logger.mode`` explicitly, which is what these tests rely on.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import compose_config

from basis_sharing import pipeline
from basis_sharing.errors import ConfigError, UserError
from basis_sharing.stages import evaluate as evaluate_stages
from basis_sharing.tracking.loggers import RunLogger, make_logger
from basis_sharing.tracking.wandb_logger import RecordMirror, WandbLogger, flatten, is_number

REPO = Path(__file__).resolve().parents[1]
TRACKED = ("params", "calibration", "metrics", "stages", "method_info", "target_ratio")


@dataclass
class WandbRunLog:
    """The records of one offline run, as wandb-core reads them back."""

    run_dir: Path
    records: list[dict[str, Any]]
    run: dict[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        (self.run,) = self.of_type("run")

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        """The payloads of the records of one type ("history", "artifact", ...), in log order."""
        return [r[kind] for r in self.records if r["type"] == kind]

    @property
    def history(self) -> list[dict[str, Any]]:
        return [h["item"] for h in self.of_type("history")]

    @property
    def summary(self) -> dict[str, Any]:
        """The final summary: every summary update applied in order."""
        summary: dict[str, Any] = {}
        for update in self.of_type("summary"):
            summary.update(update.get("update", {}))
        return summary

    @property
    def config(self) -> dict[str, Any]:
        config = dict(self.run["config"]["update"])
        config.pop("_wandb")
        return config

    @property
    def exit_code(self) -> int:
        (exit_record,) = self.of_type("exit")
        return exit_record.get("exit_code", 0)  # protobuf JSON leaves out zero values


def read_wandb_run(run_dir: Path) -> WandbRunLog:
    proc = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", str(run_dir), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return WandbRunLog(run_dir, [json.loads(line) for line in proc.stdout.splitlines()])


def offline_runs(root: Path) -> list[Path]:
    return sorted((root / "wandb").glob("offline-run-*"))


def tiny_job(model_dir: Path, mirror: Path, tmp: Path, *overrides: str):
    return compose_config(
        "model=local",
        f"model.local_path={model_dir}",
        "model.context_length=64",
        f"paths.data_dir={mirror}",
        f"paths.cache_dir={tmp}/cache",
        "eval=ppl",
        "eval.max_windows=1",
        "logger=wandb",
        "logger.mode=offline",
        *overrides,
    )


def table_rows_by_formula(groups: list[dict]) -> list[list]:
    """The expected ranks table: a basis d_in x k once, coefficients k x d_out per member."""
    return [
        [
            g["kind"],
            g["index"],
            g["layers"],
            g["d_in"],
            g["d_out"],
            g["rank"],
            g["d_in"] * g["rank"] + len(g["layers"]) * g["rank"] * g["d_out"],
        ]
        for g in groups
    ]


def file_md5_b64(path: Path) -> str:
    return base64.b64encode(hashlib.md5(path.read_bytes()).digest()).decode()


@pytest.fixture(scope="module")
def compressed_job(tiny_model_dir, tiny_mirror, tmp_path_factory):
    """A Basis Sharing job with logger=wandb (offline, W&B files in the run directory)."""
    tmp = tmp_path_factory.mktemp("wandb_job")
    cfg = tiny_job(
        tiny_model_dir,
        tiny_mirror,
        tmp,
        "method=basis_sharing",
        "ratio=0.4",
        "ratio_tolerance=0.05",
        "calibration=wikitext2_cpu",
        "calibration.n_samples=8",
        "calibration.seq_len=32",
        "eval.ppl_datasets=[wikitext2,ptb]",
        "logger.tags=[smoke]",
    )
    out = tmp / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_DATA_DIR", str(tmp / "wandb_data"))  # artifact staging, read per call
        record = pipeline.run(cfg, out_dir=out)
    (run_dir,) = offline_runs(out)
    return record, out, read_wandb_run(run_dir)


def test_run_metadata_and_config(compressed_job):
    record, out, wb = compressed_job
    results = json.loads((out / "results.json").read_text())
    assert record == results and results["status"] == "completed"
    assert wb.run["job_type"] == "basis_sharing"
    assert wb.run["project"] == "basis-sharing"
    assert wb.run["run_group"] == "local"  # no experiment: the model name
    assert wb.run["display_name"] == "local-basis_sharing-r0.4"
    # No Hydra choices outside run.py: the tags come from the resolved config.
    assert wb.run["tags"] == [
        "local",
        "basis_sharing",
        "ratio=0.4",
        "calib=wikitext2",
        "ft=none",
        "smoke",  # logger.tags come last
    ]
    assert wb.config == results["config"]
    assert wb.exit_code == 0


def test_every_tracked_number_is_logged_once_with_the_recorded_value(compressed_job):
    record, _, wb = compressed_job
    history = wb.history
    expected = {k: v for k, v in flatten({s: record[s] for s in TRACKED}).items() if is_number(v)}
    assert "metrics.perplexity.ptb.ppl" in expected and "stages.calibrate.wall_s" in expected
    for key, value in expected.items():
        logged = [item[key] for item in history if key in item]
        assert logged == [value], key
    summary = wb.summary
    for key, value in expected.items():
        assert summary[key] == value, key
    assert summary["status"] == "completed"
    assert summary["calibration.cache_hit"] is False
    ppl = record["metrics"]["perplexity"]
    assert summary["metrics.perplexity.wikitext2.ppl"] == ppl["wikitext2"]["ppl"]
    assert summary["params.achieved_ratio"] == record["params"]["achieved_ratio"]


def test_metrics_are_logged_as_they_are_produced(compressed_job):
    _, _, wb = compressed_job

    def step_of(key: str) -> int:
        (step,) = [item["_step"] for item in wb.history if key in item]
        return step

    # One history step per record write: each stage, then one per perplexity dataset.
    assert (
        step_of("stages.calibrate.wall_s")
        < step_of("stages.compress.wall_s")
        < step_of("metrics.perplexity.wikitext2.ppl")
        < step_of("metrics.perplexity.ptb.ppl")
        <= step_of("stages.perplexity.wall_s")
    )


def test_ranks_table_lists_every_group(compressed_job):
    record, _, wb = compressed_job
    groups = record["method_info"]["groups"]
    (item,) = [item for item in wb.history if "method_info.groups._type" in item]
    assert item["method_info.groups._type"] == "table-file"
    table = json.loads((wb.run_dir / "files" / item["method_info.groups.path"]).read_text())
    assert table["columns"] == ["kind", "group", "layers", "d_in", "d_out", "rank", "params"]
    assert table["data"] == table_rows_by_formula(groups)
    assert len(table["data"]) == len(groups) > 0
    # The tiny LLaMA is fully covered by the groups, so they hold every kept projection weight.
    assert sum(row[-1] for row in table["data"]) == record["method_info"]["planned_params"]["kept"]


def test_artifact_holds_results_json_and_the_resolved_config(compressed_job):
    record, out, wb = compressed_job
    (artifact,) = [a for a in wb.of_type("artifact") if a["type"] == "run-record"]
    assert artifact["name"] == f"run-record-{wb.run['run_id']}"
    entries = {e["path"]: e for e in artifact["manifest"]["contents"]}
    assert set(entries) == {"results.json", "config.yaml"}
    results = out / "results.json"
    assert entries["results.json"]["digest"] == file_md5_b64(results)
    staged = Path(entries["results.json"]["local_path"])
    assert staged.read_bytes() == results.read_bytes()
    config = yaml.safe_load(Path(entries["config.yaml"]["local_path"]).read_text())
    assert config == record["config"]


def test_failed_job_still_finishes_its_run_as_failed(
    tiny_model_dir, tiny_mirror, tmp_path, monkeypatch
):
    def explode(*args, **kwargs):
        raise RuntimeError("evaluation exploded")

    monkeypatch.setattr(evaluate_stages, "evaluate_perplexity", explode)
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb_data"))
    cfg = tiny_job(tiny_model_dir, tiny_mirror, tmp_path, "method=dense")
    with pytest.raises(RuntimeError, match="evaluation exploded"):
        pipeline.run(cfg, out_dir=tmp_path / "run")
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "failed"

    (run_dir,) = offline_runs(tmp_path / "run")
    wb = read_wandb_run(run_dir)
    assert wb.exit_code == 1
    summary = wb.summary
    assert summary["status"] == "failed"
    assert summary["error.type"] == "RuntimeError"
    assert summary["error.message"] == "evaluation exploded"
    assert summary["stages.compress.wall_s"] == results["stages"]["compress"]["wall_s"]
    assert not any("method_info.groups._type" in item for item in wb.history)  # dense: no groups
    (artifact,) = [a for a in wb.of_type("artifact") if a["type"] == "run-record"]
    entries = {e["path"]: e for e in artifact["manifest"]["contents"]}
    staged = json.loads(Path(entries["results.json"]["local_path"]).read_text())
    assert staged == results


def test_each_job_of_a_multirun_is_its_own_run(tiny_model_dir, tiny_mirror, tmp_path):
    wandb_dir = tmp_path / "wandb_files"
    proc = subprocess.run(
        [
            sys.executable,
            "run.py",
            "-m",
            "method=dense",
            "model=local",
            f"model.local_path={tiny_model_dir}",
            "model.context_length=64",
            f"paths.data_dir={tiny_mirror}",
            f"paths.output_root={tmp_path}",
            "eval=ppl",
            "eval.max_windows=1",
            "eval.ppl_datasets=[wikitext2]",
            "logger=wandb",
            "logger.mode=offline",
            f"logger.dir={wandb_dir}",
            "seed=1,2",
            f"hydra.sweep.dir={tmp_path}/sweep",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "WANDB_DATA_DIR": str(tmp_path / "wandb_data")},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = {}
    for path in (tmp_path / "sweep").glob("*/results.json"):
        record = json.loads(path.read_text())
        jobs[record["seed"]] = record
    assert sorted(jobs) == [1, 2]

    runs = [read_wandb_run(d) for d in offline_runs(wandb_dir)]
    assert len(runs) == 2
    assert len({wb.run["run_id"] for wb in runs}) == 2
    for wb in runs:
        record = jobs[wb.config["seed"]]
        assert wb.config == record["config"]
        assert wb.exit_code == 0
        assert (
            wb.summary["metrics.perplexity.wikitext2.ppl"]
            == (record["metrics"]["perplexity"]["wikitext2"]["ppl"])
        )
        # Under Hydra the tags are the group choices.
        assert wb.run["tags"] == ["local", "dense", "ratio=none", "calib=wikitext2", "ft=none"]


NO_WANDB_SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, sys.argv[1])
    from conftest import compose_config
    from basis_sharing import pipeline
    from basis_sharing.tracking.loggers import make_logger
    from basis_sharing.tracking.record import RunRecord

    model_dir, mirror, out = sys.argv[2:5]
    common = [
        "method=dense", "model=local", f"model.local_path={model_dir}",
        "model.context_length=64", f"paths.data_dir={mirror}", "eval=ppl", "eval.max_windows=1",
    ]
    record = pipeline.run(compose_config(*common, "logger=none"), out_dir=f"{out}/none")
    after_run = "wandb" in sys.modules
    tracker = make_logger(compose_config(*common, "logger=wandb", "logger.mode=disabled"))
    after_make = "wandb" in sys.modules
    config = {
        "model": {"name": "local"}, "calibration": {"dataset": None}, "finetune": {"name": "none"},
    }
    with tracker.track(RunRecord(f"{out}/disabled", config, method="dense", target_ratio=None)):
        pass
    print(json.dumps({"status": record["status"], "after_run": after_run,
                      "after_make": after_make, "after_track": "wandb" in sys.modules}))
    """
)


def test_logger_none_never_imports_wandb(tiny_model_dir, tiny_mirror, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            NO_WANDB_SCRIPT,
            str(REPO / "tests"),
            str(tiny_model_dir),
            str(tiny_mirror),
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {
        "status": "completed",
        "after_run": False,
        "after_make": False,  # the W&B logger itself imports wandb only when a run starts
        "after_track": True,  # ... which shows this check would see the import
    }


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("logger.mode=onlin", "logger.mode='onlin' is not a W&B mode"),
        (f"logger.tags=[{'x' * 65}]", "must have 1 to 64 characters"),
    ],
)
def test_bad_logger_settings_fail_before_the_run_starts(
    tiny_model_dir, tiny_mirror, tmp_path, override, message
):
    cfg = tiny_job(tiny_model_dir, tiny_mirror, tmp_path, "method=dense", override)
    with pytest.raises(ConfigError, match=message):
        pipeline.run(cfg, out_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_group_is_the_experiment_name_else_the_model_name(tiny_model_dir, tiny_mirror, tmp_path):
    def group(*overrides: str) -> str | None:
        cfg = tiny_job(tiny_model_dir, tiny_mirror, tmp_path, *overrides)
        return WandbLogger.from_config(cfg).group

    assert group() == "local"
    assert group("+experiment_name=table2") == "table2"
    assert group("+experiment_name=null") == "local"
    assert group("logger.group=mine") == "mine"
    assert isinstance(make_logger(compose_config("logger=none")), RunLogger)
    assert not isinstance(make_logger(compose_config("logger=none")), WandbLogger)


class FakeRun:
    """Records what the mirror sends to W&B."""

    def __init__(self) -> None:
        self.logged: list[dict[str, Any]] = []
        self.summary_updates: list[dict[str, Any]] = []
        self.summary = self

    def log(self, data: dict[str, Any]) -> None:
        self.logged.append(dict(data))

    def update(self, data: dict[str, Any]) -> None:
        self.summary_updates.append(dict(data))


def test_mirror_logs_new_and_changed_values_only():
    run = FakeRun()
    mirror = RecordMirror(run)
    data: dict[str, Any] = {
        "status": "running",
        "config": {"ratio": 0.2},  # not a tracked section
        "metrics": {"perplexity": {"wikitext2": {"ppl": math.nan, "truncated": True}}},
        "params": {"above_break_even": [{"layer": 0}], "total": 10},
    }
    mirror(data)
    mirror(data)  # nothing new: NaN equals NaN here
    data["params"]["total"] = 9
    data["stages"] = {"compress": {"wall_s": 1.5, "cuda_peak_mb": None}}
    data["status"] = "completed"
    mirror(data)
    assert len(run.logged) == 2
    assert math.isnan(run.logged[0].pop("metrics.perplexity.wikitext2.ppl"))
    assert run.logged == [{"params.total": 10}, {"params.total": 9, "stages.compress.wall_s": 1.5}]
    assert run.summary_updates == [
        {"status": "running", "metrics.perplexity.wikitext2.truncated": True},
        {"status": "completed"},
    ]


def test_a_run_wandb_cannot_start_fails_with_advice_and_a_failed_record(
    tiny_model_dir, tiny_mirror, tmp_path, monkeypatch
):
    import wandb

    def refuse(**kwargs):
        raise wandb.errors.UsageError("api_key not configured (no-tty)")

    monkeypatch.setattr(wandb, "init", refuse)
    cfg = tiny_job(tiny_model_dir, tiny_mirror, tmp_path, "method=dense", "logger.mode=online")
    with pytest.raises(UserError, match=r"W&B could not start a run \(api_key not configured"):
        pipeline.run(cfg, out_dir=tmp_path / "run")
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "failed"
    assert results["error"] == {"type": "UsageError", "message": "api_key not configured (no-tty)"}
    assert results["stages"] == {}  # nothing ran


def test_a_fips_job_logs_one_row_per_mlp(tiny_model_dir, tiny_mirror, tmp_path, monkeypatch):
    cfg = tiny_job(
        tiny_model_dir,
        tiny_mirror,
        tmp_path,
        "method=fips",
        "method.group_size=2",
        "method.steps=3",
        "method.batch_tokens=32",
        "ratio=0.3",
        "ratio_tolerance=0.05",
        "calibration=wikitext2_cpu",
        "calibration.n_samples=2",
        "calibration.seq_len=32",
        "eval.ppl_datasets=[wikitext2]",
    )
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb_data"))
    record = pipeline.run(cfg, out_dir=tmp_path / "run")
    (run_dir,) = offline_runs(tmp_path / "run")
    wb = read_wandb_run(run_dir)
    (item,) = [item for item in wb.history if "method_info.fips_mlps._type" in item]
    table = json.loads((wb.run_dir / "files" / item["method_info.fips_mlps.path"]).read_text())
    assert table["columns"][:6] == [
        "layer",
        "group",
        "rank",
        "initial_loss",
        "final_loss",
        "group_final_loss",
    ]
    expected = [
        [m["layer"], g["index"], g["rank"], m["initial_loss"], m["final_loss"]]
        for g in record["method_info"]["block_groups"]
        for m in g["mlps"]
    ]
    assert [row[:5] for row in table["data"]] == expected and len(expected) == 4
