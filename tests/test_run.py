"""run.py end to end: tiny model, tiny mirror, single runs, a -m sweep, and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import compose_config
from transformers import AutoModelForCausalLM, AutoTokenizer

from basis_sharing.data.corpora import load_corpus
from basis_sharing.data.tokens import token_hash, tokenize_text
from basis_sharing.evaluation.perplexity import perplexity
from basis_sharing.methods.registry import CompressionMethod

REPO = Path(__file__).resolve().parents[1]
CONTEXT = 64


def run_py(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "run.py", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=300,
    )


def tiny_args(model_dir: Path, mirror: Path, out: Path, method: str | None = "dense") -> list[str]:
    """Overrides for a tiny local model and mirror; ``method=None`` lets the caller choose."""
    return [
        *([f"method={method}"] if method else []),
        "model=local",
        f"model.local_path={model_dir}",
        f"model.context_length={CONTEXT}",
        f"paths.data_dir={mirror}",
        "eval=ppl",
        "eval.max_windows=3",
        "eval.batch_size=2",
        f"paths.output_root={out}",
    ]


@pytest.fixture(scope="module")
def single_run(tiny_model_dir, tiny_mirror, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    proc = run_py(
        *tiny_args(tiny_model_dir, tiny_mirror, out),
        "eval.dataset_windows.ptb=2",  # one dataset's own window limit
        f"hydra.run.dir={out}/run",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "run" / "results.json").read_text()), proc


def test_single_run_records_everything(single_run, tiny_model_dir):
    record, proc = single_run
    assert record["status"] == "completed" and record["error"] is None
    assert record["method"] == "dense" and record["target_ratio"] is None and record["seed"] == 0
    assert record["config"]["model"]["local_path"] == str(tiny_model_dir)
    assert record["model"]["source"] == "local" and record["model"]["family"] == "llama"
    assert set(record["metrics"]["perplexity"]) == {"wikitext2", "ptb", "c4"}
    assert set(record["hashes"]["eval"]) == {"wikitext2", "ptb", "c4"}
    assert record["hashes"]["calibration"] is None  # dense needs no calibration
    for stage in ("data", "model_source", "tokenize", "load_model", "compress", "perplexity"):
        assert record["stages"][stage]["wall_s"] >= 0 and record["stages"][stage]["peak_rss_mb"] > 0
    env = record["environment"]
    assert env["packages"]["torch"] and env["packages"]["hydra-core"] and "git" in env
    assert "Run summary" in proc.stderr + proc.stdout


def test_recorded_numbers_equal_an_independent_computation(single_run, tiny_model_dir, tiny_mirror):
    record, _ = single_run
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    for name, split, rows in (
        ("wikitext2", "test", None),
        ("ptb", "test", None),
        ("c4", "validation", 2000),
    ):
        ids = tokenize_text(tokenizer, load_corpus(name, split, tiny_mirror).text(max_rows=rows))
        assert record["hashes"]["eval"][name] == token_hash(ids)
        windows = 2 if name == "ptb" else 3  # eval.dataset_windows.ptb=2, else max_windows
        expected = perplexity(model, ids, CONTEXT, max_windows=windows)
        got = record["metrics"]["perplexity"][name]
        assert got["ppl"] == pytest.approx(expected.ppl, rel=1e-5)
        assert got["n_windows"] == expected.n_windows and got["n_windows_evaluated"] == windows
        assert got["truncated"] is True and got["n_tokens"] == ids.numel()
    params = record["params"]
    assert params["total"] == sum(p.numel() for p in model.parameters())
    cfg = model.config
    per_layer = 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128  # q, o; k, v (GQA); up, gate, down
    assert params["decoder_projections"] == cfg.num_hidden_layers * per_layer
    assert params["dense_decoder_projections"] == params["decoder_projections"]
    assert params["achieved_ratio"] == 0.0


def test_two_job_sweep_gets_one_directory_per_override(tiny_model_dir, tiny_mirror, tmp_path):
    proc = run_py(
        *tiny_args(tiny_model_dir, tiny_mirror, tmp_path),
        "eval.max_windows=1",
        "ratio=0.2,0.3",
        f"hydra.sweep.dir={tmp_path}/sweep",
        "-m",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p.parent.name for p in (tmp_path / "sweep").glob("*/results.json"))
    common = (
        "eval.batch_size=2,eval.max_windows=1,eval=ppl,method=dense,model.context_length=64,"
        "model=local"
    )
    # Paths are excluded from the name (they would nest directories); overrides are in it.
    assert jobs == [f"{common},ratio=0.2", f"{common},ratio=0.3"]
    for job in jobs:
        record = json.loads((tmp_path / "sweep" / job / "results.json").read_text())
        assert record["status"] == "completed"
        assert record["config"]["ratio"] == float(job.rsplit("=", 1)[1])
        assert "ratio=" + job.rsplit("=", 1)[1] in record["overrides"]


def assert_clean_failure(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "Traceback" not in output, output[-3000:]
    for fragment in fragments:
        assert fragment in output, output[-3000:]
    return output


def test_ratio_outside_unit_interval_fails_before_loading(tmp_path):
    # The model path does not exist: a ratio error proves nothing was loaded first.
    for ratio in ("1.5", "0", "-0.2", "1.0"):
        proc = run_py(
            "model=local",
            "model.local_path=/does/not/exist",
            f"ratio={ratio}",
            f"hydra.run.dir={tmp_path}/r",
        )
        assert_clean_failure(proc, f"ratio={float(ratio)} is outside (0, 1)")
    assert not (tmp_path / "r" / "results.json").exists()


def test_unknown_model_and_method_list_the_choices(tmp_path):
    proc = run_py("model=llama70b", f"hydra.run.dir={tmp_path}")
    out = assert_clean_failure(proc, "Could not find 'model/llama70b'")
    assert all(name in out for name in ("llama7b", "gpt2", "opt6.7b", "smollm2_135m"))
    proc = run_py("method=bassis_sharing", f"hydra.run.dir={tmp_path}")
    assert_clean_failure(proc, "Could not find 'method/bassis_sharing'", "dense")


def test_unknown_eval_dataset_lists_the_choices(tiny_model_dir, tiny_mirror, tmp_path):
    proc = run_py(
        *tiny_args(tiny_model_dir, tiny_mirror, tmp_path),
        "eval.ppl_datasets=[wikitext2,wikitext103]",
        f"hydra.run.dir={tmp_path}/r",
    )
    assert_clean_failure(proc, "Unknown perplexity dataset", "Valid choices: c4, ptb, wikitext2")


def test_missing_mirror_file_names_file_and_command(tiny_model_dir, tmp_path):
    empty = tmp_path / "empty_mirror"
    empty.mkdir()
    proc = run_py(*tiny_args(tiny_model_dir, empty, tmp_path), f"hydra.run.dir={tmp_path}/r")
    assert_clean_failure(
        proc, str(empty / "wikitext-2-raw-v1" / "wiki.test.raw"), "scripts/prepare_data.py"
    )
    record = json.loads((tmp_path / "r" / "results.json").read_text())
    assert record["status"] == "failed" and record["error"]["type"] == "DataNotFoundError"
    assert "load_model" not in record["stages"]


def test_hub_model_offline_fails_with_a_clear_message(tiny_mirror, tmp_path):
    """No HF_HUB_OFFLINE switch: the unreachable endpoint itself is detected quickly."""
    env = {
        "HF_HUB_OFFLINE": "0",
        "HF_DATASETS_OFFLINE": "0",
        "HF_ENDPOINT": "http://127.0.0.1:9",
        "HF_HOME": str(tmp_path / "hf_home"),
    }
    proc = run_py(
        "model=gpt2",
        "method=dense",
        "eval=ppl",  # the tiny mirror has no zero-shot rows (a missing-data error would come first)
        f"paths.data_dir={tiny_mirror}",
        f"hydra.run.dir={tmp_path}/r",
        env=env,
    )
    assert_clean_failure(proc, "hub is unreachable", "model=gpt2 model.local_path=")


class CalibrationProbe(CompressionMethod):
    """A throwaway method that needs calibration data and records what it was given."""

    name = "calibration_probe"
    needs_calibration = True
    compresses = False
    seen: dict = {}

    def __init__(self, cfg) -> None:
        self.cfg = cfg

    def compress(self, model, family, ctx) -> dict:
        CalibrationProbe.seen = {"ids": ctx.calibration_ids}
        return {"calibration_shape": list(ctx.calibration_ids.shape)}


def compose_tiny(model_dir: Path, mirror: Path, *overrides: str):
    return compose_config(
        "model=local",
        f"model.local_path={model_dir}",
        f"model.context_length={CONTEXT}",
        f"paths.data_dir={mirror}",
        "eval=ppl",
        "eval.max_windows=1",
        "method.name=calibration_probe",
        *overrides,
    )


@pytest.fixture
def probe_method(monkeypatch):
    from basis_sharing.methods import registry

    monkeypatch.setitem(registry.METHODS, "calibration_probe", CalibrationProbe)


def test_calibration_blocks_reach_the_method_and_the_run_dir(
    probe_method, tiny_model_dir, tiny_mirror, tiny_tokenizer, tmp_path
):
    from safetensors.torch import load_file

    from basis_sharing import pipeline
    from basis_sharing.data.calibration import sample_calibration_blocks

    cfg = compose_tiny(
        tiny_model_dir,
        tiny_mirror,
        "calibration=wikitext2_cpu",
        "calibration.n_samples=3",
        "calibration.seq_len=32",
    )
    record = pipeline.run(cfg, out_dir=tmp_path)
    text = load_corpus("wikitext2", "validation", tiny_mirror).text()
    expected = sample_calibration_blocks(tokenize_text(tiny_tokenizer, text), 3, 32, 2023)
    assert torch.equal(CalibrationProbe.seen["ids"], expected)
    assert torch.equal(load_file(tmp_path / "calibration_ids.safetensors")["input_ids"], expected)
    assert record["hashes"]["calibration"] == token_hash(expected)
    assert record["data"]["calibration"]["split"] == "validation"
    assert record["method_info"] == {"calibration_shape": [3, 32]}


def test_too_many_calibration_samples_fail_before_the_model_loads(
    probe_method, tiny_model_dir, tiny_mirror, tmp_path
):
    from basis_sharing import pipeline
    from basis_sharing.errors import CalibrationError

    cfg = compose_tiny(
        tiny_model_dir,
        tiny_mirror,
        "calibration=wikitext2_cpu",
        "calibration.n_samples=100000",
        "calibration.seq_len=32",
    )
    with pytest.raises(CalibrationError, match="non-overlapping blocks of 32"):
        pipeline.run(cfg, out_dir=tmp_path)
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["status"] == "failed" and "load_model" not in record["stages"]


def test_basis_sharing_sweep_computes_statistics_once(tiny_model_dir, tiny_mirror, tmp_path):
    proc = run_py(
        *tiny_args(tiny_model_dir, tiny_mirror, tmp_path, method=None),
        "eval.max_windows=1",
        f"paths.cache_dir={tmp_path}/cache",
        "method=basis_sharing,svd_llm",
        "ratio=0.3,0.5",
        "calibration=wikitext2_cpu",
        "calibration.n_samples=8",
        "calibration.seq_len=32",
        "ratio_tolerance=0.05",
        f"hydra.sweep.dir={tmp_path}/sweep",
        "-m",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [
        json.loads(p.read_text()) for p in sorted((tmp_path / "sweep").glob("*/results.json"))
    ]
    assert len(records) == 4 and all(r["status"] == "completed" for r in records)
    hits = [r["calibration"]["cache_hit"] for r in records]
    assert hits.count(False) == 1  # the first job computes the Grams, the other three reuse them
    keys = {r["calibration"]["stats_key"] for r in records}
    assert len(keys) == 1
    for r in records:
        assert abs(r["params"]["achieved_ratio"] - r["target_ratio"]) <= 0.05
        assert r["params"]["planned_decoder_projections"] == r["params"]["decoder_projections"]
        assert r["hashes"]["calibration"] and r["method_info"]["groups"]
        shared = r["method_info"]["shared_kinds"]
        # The tiny LLaMA's k/v are GQA-narrow (64 -> 32): the default keeps them private.
        assert shared == ([] if r["method"] == "svd_llm" else ["q", "up", "gate"])


def method_sweep(model_dir: Path, mirror: Path, out: Path, *overrides: str) -> list[dict]:
    proc = run_py(
        *tiny_args(model_dir, mirror, out, method=None),
        "eval.max_windows=1",
        "eval.ppl_datasets=[wikitext2]",
        f"paths.cache_dir={out}/cache",
        "ratio=0.4",
        "calibration=wikitext2_cpu",
        "calibration.n_samples=8",
        "calibration.seq_len=32",
        "model.calib_batch_size=4",
        "ratio_tolerance=0.05",
        f"hydra.sweep.dir={out}/sweep",
        *overrides,
        "-m",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(p.read_text()) for p in sorted((out / "sweep").glob("*/results.json"))]


def test_every_method_runs_end_to_end(tiny_model_dir, tiny_mirror, tmp_path):
    records = method_sweep(
        tiny_model_dir, tiny_mirror, tmp_path, "method=svd,fwsvd,asvd,svd_llm,basis_sharing"
    )
    by_method = {r["method"]: r for r in records}
    assert set(by_method) == {"svd", "fwsvd", "asvd", "svd_llm", "basis_sharing"}
    for r in records:
        assert r["status"] == "completed"
        assert abs(r["params"]["achieved_ratio"] - 0.4) <= 0.05
        assert r["params"]["planned_decoder_projections"] == r["params"]["decoder_projections"]
    assert "calibrate" not in by_method["svd"]["stages"]  # plain SVD uses no data
    assert set(by_method["fwsvd"]["calibration"]) >= {"fisher"}
    assert set(by_method["asvd"]["calibration"]) >= {"scale"}
    asvd = by_method["asvd"]["method_info"]
    assert asvd["allocation"] == "sensitivity" and asvd["sensitivity_ppl"]
    assert (
        by_method["basis_sharing"]["calibration"]["gram"]["stats_key"]
        == (by_method["svd_llm"]["calibration"]["gram"]["stats_key"])
    )


def test_updates_run_end_to_end(tiny_model_dir, tiny_mirror, tmp_path):
    records = method_sweep(
        tiny_model_dir, tiny_mirror, tmp_path, "method=svd_llm,basis_sharing", "method.update=true"
    )
    modes = {r["method"]: r["method_info"]["update"]["mode"] for r in records}
    assert modes == {"svd_llm": "layerwise", "basis_sharing": "one_pass"}
    for r in records:
        update = r["method_info"]["update"]
        assert update["error_after"] <= update["error_before"]


def test_save_then_evaluate_the_saved_model(tiny_model_dir, tiny_mirror, tmp_path):
    """save_model=true, then load_model=<dir> method=none gives the same perplexities."""
    common = [
        *tiny_args(tiny_model_dir, tiny_mirror, tmp_path, method=None),
        f"paths.cache_dir={tmp_path}/cache",
        "calibration=wikitext2_cpu",
        "calibration.n_samples=8",
        "calibration.seq_len=32",
        "ratio_tolerance=0.05",
    ]
    proc = run_py(
        *common,
        "method=basis_sharing",
        "ratio=0.3",
        "save_model=true",
        f"hydra.run.dir={tmp_path}/save",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = json.loads((tmp_path / "save" / "results.json").read_text())
    directory = Path(saved["saved_model"])
    assert (directory / "compression.json").is_file() and "save_model" in saved["stages"]
    proc = run_py(
        *common, "method=none", f"load_model={directory}", f"hydra.run.dir={tmp_path}/load"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = json.loads((tmp_path / "load" / "results.json").read_text())
    assert loaded["model"]["loaded_from"] == str(directory) and loaded["target_ratio"] == 0.3
    assert loaded["params"] == {
        k: v for k, v in saved["params"].items() if k != "planned_decoder_projections"
    }
    assert loaded["metrics"]["perplexity"] == saved["metrics"]["perplexity"]
    assert loaded["hashes"]["eval"] == saved["hashes"]["eval"]
    # A compressing method cannot be combined with load_model.
    proc = run_py(*common, "method=svd", f"load_model={directory}", f"hydra.run.dir={tmp_path}/x")
    assert_clean_failure(proc, "use method=none")


def test_the_compensating_refit_and_its_options_run_end_to_end(
    tiny_model_dir, tiny_mirror, tmp_path
):
    records = method_sweep(
        tiny_model_dir,
        tiny_mirror,
        tmp_path,
        "method=basis_sharing",
        "method.update=sequential",
        "method.refit_basis=false,true",
        "method.refit_samples=4",
    )
    assert len(records) == 2
    for r in records:
        update = r["method_info"]["update"]
        assert r["status"] == "completed" and update["mode"] == "sequential"
        assert update["tokens"] == 4 * 32  # refit_samples of the 8 calibration blocks
        assert update["error_after"] < update["error_before"]
        assert r["config"]["method"]["update"] == "sequential"
    with_als = [
        g
        for r in records
        if r["config"]["method"]["refit_basis"]
        for g in r["method_info"]["update"]["groups"]
    ]
    assert any("als_objective" in g for g in with_als)


def test_a_lower_forward_dtype_is_a_different_calibration(tiny_model_dir, tiny_mirror, tmp_path):
    """calibration.forward_dtype=bfloat16 runs the pass under autocast: its statistics have their
    own cache key (never the float32 pass's), and the record says which dtype ran; the compress
    stage hands the dtype to the method's update, whose record says so too."""
    records = method_sweep(
        tiny_model_dir,
        tiny_mirror,
        tmp_path,
        "method=svd_llm",
        "method.update=true",
        "calibration.forward_dtype=null,bfloat16",
    )
    by_dtype = {r["calibration"]["forward_dtype"]: r for r in records}
    assert set(by_dtype) == {"float32", "bfloat16"}
    assert by_dtype["bfloat16"]["method_info"]["update"]["forward_dtype"] == "bfloat16"
    assert "forward_dtype" not in by_dtype["float32"]["method_info"]["update"]
    assert all(not r["calibration"]["cache_hit"] for r in records)
    keys = {r["calibration"]["stats_key"] for r in records}
    assert len(keys) == 2
    ppl = [r["metrics"]["perplexity"]["wikitext2"] for r in records]
    assert ppl[0] != ppl[1] and ppl[0] == pytest.approx(ppl[1], rel=0.05)
