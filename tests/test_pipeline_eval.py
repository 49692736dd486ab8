"""A run's evaluation stages: zero-shot, throughput (dense and compressed), samples, summary."""

from __future__ import annotations

import json

import pytest
from conftest import compose_config
from transformers import AutoModelForCausalLM, AutoTokenizer

from basis_sharing import pipeline
from basis_sharing.errors import ConfigError, DataNotFoundError
from basis_sharing.evaluation.zeroshot import evaluate_zeroshot, resolve_tasks
from basis_sharing.tracking.record import summary_table

PROMPTS = ["the king of the north", "a song"]


def compose_eval(model_dir, mirror, tmp_path, *overrides: str):
    return compose_config(
        "model=local",
        f"model.local_path={model_dir}",
        "model.context_length=64",
        f"paths.data_dir={mirror}",
        f"paths.cache_dir={tmp_path}/cache",
        "eval=paper",
        "eval.max_windows=1",
        "eval.ppl_datasets=[wikitext2]",
        "eval.zeroshot.tasks=[arc_easy,winogrande]",
        "eval.zeroshot.limit=4",
        "eval.zeroshot.batch_size=4",
        "eval.throughput.enabled=true",
        "eval.throughput.batch_size=2",
        "eval.throughput.max_batches=2",
        "eval.throughput.warmup=1",
        "eval.throughput.new_tokens=4",
        "eval.throughput.runs=1",
        f"eval.generation.prompts=[{','.join(repr(p) for p in PROMPTS)}]",
        "eval.generation.max_new_tokens=5",
        *overrides,
    )


def test_compressed_run_records_zeroshot_throughput_and_samples(
    tiny_model_dir, tiny_mirror, tmp_path
):
    cfg = compose_eval(
        tiny_model_dir,
        tiny_mirror,
        tmp_path,
        "method=basis_sharing",
        "ratio=0.4",
        "ratio_tolerance=0.05",
        "calibration=wikitext2_cpu",
        "calibration.n_samples=8",
        "calibration.seq_len=32",
    )
    record = pipeline.run(cfg, out_dir=tmp_path / "run")
    assert record == json.loads((tmp_path / "run" / "results.json").read_text())
    for stage in (
        "throughput_dense",
        "generate",
        "perplexity",
        "zeroshot",
        "throughput_compressed",
    ):
        assert record["stages"][stage]["wall_s"] >= 0
    order = list(record["stages"])
    assert order.index("throughput_dense") < order.index("compress") < order.index("generate")

    zs = record["metrics"]["zeroshot"]
    assert zs["limit"] == 4 and zs["num_fewshot"] == 0
    assert set(zs["tasks"]) == {"arc_easy", "winogrande"}
    for task in zs["tasks"].values():
        assert task["n_samples"] == 4 and task["n_docs"] == 6 and 0 <= task["acc"] <= 1
        assert task["data"]["source"] == "mirror" and task["version"] == 1.0
    assert record["data"]["zeroshot"]["arc_easy"]["path"].endswith("arc_easy/test.jsonl")

    speed = record["metrics"]["throughput"]
    dense, comp = speed["dense"], speed["compressed"]
    for r in (dense, comp):
        assert r["forward"]["batch_size"] == 2 and r["forward"]["n_batches"] == 2
        assert r["forward"]["seq_len"] == 32 and r["generation"]["new_tokens"] == 4
        assert r["generation"]["prompt_tokens"] == 4
    assert speed["speedup"]["forward"] == pytest.approx(
        comp["forward"]["tokens_per_s"] / dense["forward"]["tokens_per_s"]
    )
    assert comp["weights_mb"] < dense["weights_mb"]
    assert record["hashes"]["throughput"]

    samples = record["generation_samples"]
    assert [s["prompt"] for s in samples] == PROMPTS
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    for s in samples:
        assert 1 <= len(s["new_token_ids"]) <= 5
        assert s["completion"] == tokenizer.decode(s["new_token_ids"], skip_special_tokens=True)

    assert isinstance(record["params"]["above_break_even"], list)
    summary = summary_table(record)
    assert "zero-shot" in summary and "winogrande" in summary and "(limit 4)" in summary
    assert "ratio" in summary and "sample: 'a song'" in summary


def test_dense_run_zeroshot_equals_the_direct_harness_call(tiny_model_dir, tiny_mirror, tmp_path):
    cfg = compose_eval(
        tiny_model_dir,
        tiny_mirror,
        tmp_path,
        "method=dense",
        "eval.throughput.enabled=false",
        "eval.generation.prompts=[]",
    )
    record = pipeline.run(cfg, out_dir=tmp_path / "run")
    assert "throughput" not in record["metrics"] and "generation_samples" not in record
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    direct = evaluate_zeroshot(
        model,
        tokenizer,
        resolve_tasks(["arc_easy", "winogrande"], tiny_mirror, offline=True),
        work_dir=tmp_path / "direct",
        dataset_cache=tmp_path / "ds",
        limit=4,
        batch_size=4,
        max_length=64,
    )
    assert record["metrics"]["zeroshot"] == direct


@pytest.mark.parametrize(
    ("override", "error", "message"),
    [
        ("eval.zeroshot.tasks=[arc_easy,boolq]", ConfigError, "Unknown zero-shot task"),
        ("eval.zeroshot.limit=0", ConfigError, "eval.zeroshot.limit=0"),
        ("eval.zeroshot.limit=2.5", ConfigError, "eval.zeroshot.limit=2.5"),
        ("eval.throughput.fraction=1.5", ConfigError, "eval.throughput.fraction=1.5"),
        ("eval.throughput.runs=0", ConfigError, "eval.throughput.runs=0"),
        ("eval.zeroshot.tasks=[piqa]", DataNotFoundError, "lm-eval/piqa/validation.jsonl"),
    ],
)
def test_bad_evaluation_settings_fail_before_the_model_loads(
    tiny_model_dir, tiny_mirror, tmp_path, override, error, message
):
    cfg = compose_eval(
        tiny_model_dir, tiny_mirror, tmp_path, "method=dense", "offline=true", override
    )
    with pytest.raises(error, match=message.replace(".", r"\.").replace("[", r"\[")):
        pipeline.run(cfg, out_dir=tmp_path / "run")
    results = tmp_path / "run" / "results.json"
    assert not results.exists() or "load_model" not in json.loads(results.read_text())["stages"]
