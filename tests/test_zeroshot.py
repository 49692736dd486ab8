"""Zero-shot evaluation through lm-eval: exact accuracies, lm-eval's own task configs, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_tiny_model, synthetic_lines

from basis_sharing.errors import ConfigError, DataNotFoundError
from basis_sharing.evaluation import zeroshot
from basis_sharing.evaluation.zeroshot import (
    PAPER_TASKS,
    TaskSource,
    evaluate_zeroshot,
    local_task_yaml,
    resolve_tasks,
    run_lm_eval,
    summarize,
    write_local_tasks,
)

CHOICES = ["king", "queen", "river", "music"]


def continuation_logprob(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context), computed directly from the model's logits."""
    context_ids = tokenizer(context)["input_ids"]
    whole = tokenizer(context + continuation)["input_ids"]
    assert whole[: len(context_ids)] == context_ids
    with torch.no_grad():
        logits = model(torch.tensor([whole])).logits[0].double()
    logprobs = torch.log_softmax(logits, dim=-1)
    return sum(logprobs[i - 1, whole[i]].item() for i in range(len(context_ids), len(whole)))


def question_prompt(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def write_tiny_task(directory: Path, rows: list[dict]) -> None:
    data = directory / "tiny_mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {
        "task": "tiny_mc",
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {
            "data_files": {"test": str(data)},
            "cache_dir": str(directory / "ds"),
        },
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "Question: {{question}}\nAnswer:",
        "doc_to_target": "{{answer}}",
        "doc_to_choice": "{{choices}}",
        "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}],
        "metadata": {"version": 2.0},
    }
    (directory / "tiny_mc.yaml").write_text(yaml.safe_dump(config))


def test_tiny_task_accuracy_equals_the_hand_computation(tiny_tokenizer, tmp_path):
    """lm-eval, wrapping the in-memory model, reproduces per-choice log-likelihoods and accuracy."""
    model = make_tiny_model("llama", seed=3)
    questions = synthetic_lines(8, 11)
    lls = [
        [continuation_logprob(model, tiny_tokenizer, question_prompt(q), f" {c}") for c in CHOICES]
        for q in questions
    ]
    best = [max(range(4), key=row.__getitem__) for row in lls]
    # Gold is the model's choice on even docs and another option on odd ones: acc = 0.5 exactly.
    gold = [b if i % 2 == 0 else (b + 1) % 4 for i, b in enumerate(best)]
    rows = [
        {"question": q, "choices": CHOICES, "answer": g}
        for q, g in zip(questions, gold, strict=True)
    ]
    write_tiny_task(tmp_path, rows)

    raw = run_lm_eval(
        model,
        tiny_tokenizer,
        ["tiny_mc"],
        include_path=tmp_path,
        include_defaults=False,
        limit=None,
        batch_size=3,
        max_length=256,
        log_samples=True,
    )
    for sample in raw["samples"]["tiny_mc"]:
        got = [ll for ll, _ in sample["filtered_resps"]]
        assert got == pytest.approx(lls[sample["doc_id"]], abs=1e-4)
    result = summarize(raw, ["tiny_mc"])["tiny_mc"]
    norm_best = [max(range(4), key=lambda j, r=row: r[j] / len(CHOICES[j])) for row in lls]
    assert result["acc"] == 0.5
    assert result["acc_norm"] == pytest.approx(
        sum(p == g for p, g in zip(norm_best, gold, strict=True)) / 8
    )
    assert result["acc_stderr"] == pytest.approx((0.25 / 7) ** 0.5)  # sample std / sqrt(n)
    assert result["version"] == 2.0 and result["n_samples"] == 8 and result["n_docs"] == 8


def test_limit_restricts_the_documents(tiny_tokenizer, tmp_path):
    model = make_tiny_model("llama", seed=3)
    rows = [{"question": q, "choices": CHOICES, "answer": 0} for q in synthetic_lines(6, 12)]
    write_tiny_task(tmp_path, rows)
    raw = run_lm_eval(
        model,
        tiny_tokenizer,
        ["tiny_mc"],
        include_path=tmp_path,
        include_defaults=False,
        limit=2,
        batch_size=4,
        max_length=256,
    )
    result = summarize(raw, ["tiny_mc"])["tiny_mc"]
    assert result["n_samples"] == 2 and result["n_docs"] == 6


def hub_prompt(name: str, row: dict) -> tuple[object, list[str], object]:
    """(text, choices, target) of the hub task for one row, from lm-eval's published templates."""
    if name in ("arc_easy", "arc_challenge"):
        text = f"Question: {row['question']}\nAnswer:"
        return text, row["choices"]["text"], row["choices"]["label"].index(row["answerKey"])
    if name == "openbookqa":
        target = row["choices"]["label"].index(row["answerKey"])
        return row["question_stem"], row["choices"]["text"], target
    if name == "piqa":
        return f"Question: {row['goal']}\nAnswer:", [row["sol1"], row["sol2"]], row["label"]
    if name == "winogrande":  # partial evaluation: the choices are the two contexts
        cut = row["sentence"].index("_")
        contexts = [row["sentence"][:cut] + row[f"option{i}"] for i in (1, 2)]
        return int(row["answer"]) - 1, contexts, row["sentence"][cut + 1 :].strip()
    raise AssertionError(name)


# The first validation row as lm-eval builds it from the hub dataset (documented on the hub).
HELLASWAG_ROW0 = (
    "Roof shingle removal: A man is sitting on a roof. He",
    [
        "is using wrap to wrap a pair of skis.",
        "is ripping level tiles off.",
        "is holding a rubik's cube.",
        "starts pulling up roofing on a roof.",
    ],
    3,
)
MATHQA_ROW0_TEXT = (
    "Question: a shopkeeper sold an article offering a discount of 5 % and earned a profit of "
    "31.1 % . what would have been the percentage of profit earned if no discount had been "
    "offered ?\nAnswer:"
)
MATHQA_ROW0_CHOICES = ["38", "27.675", "30", "data inadequate", "none of these"]


DATA_KEYS = (
    "dataset_path",
    "dataset_name",
    "dataset_kwargs",
    "training_split",
    "validation_split",
    "test_split",
    "fewshot_split",
)


def test_mirror_rows_load_through_lm_evals_standard_task_configs(shared_assets, tmp_path):
    from lm_eval.tasks import TaskManager, get_task_dict
    from lm_eval.tasks._yaml_loader import load_yaml

    names = list(PAPER_TASKS)
    sources = resolve_tasks(names, shared_assets, offline=True)
    assert all(s.local for s in sources)
    task_dir = write_local_tasks(sources, tmp_path / "tasks", tmp_path / "ds")
    tasks = get_task_dict(names, TaskManager(include_path=str(task_dir), include_defaults=False))
    for source in sources:
        name = source.task.name
        task = tasks[name]
        # Everything but the data source is lm-eval's standard config, key for key.
        standard = load_yaml(zeroshot.lm_eval_tasks_dir() / source.task.yaml, resolve_func=False)
        ours = load_yaml(task_dir / f"{name}.yaml", resolve_func=False)
        for key in DATA_KEYS:
            standard.pop(key, None), ours.pop(key, None)
        assert ours == standard, name
        assert task.config.dataset_path == "json"
        doc = next(iter(task.eval_docs))
        got = (task.doc_to_text(doc), task.doc_to_choice(doc), task.doc_to_target(doc))
        row = json.loads(source.path.open().readline())
        if name == "hellaswag":
            assert got == HELLASWAG_ROW0
        elif name == "mathqa":
            assert got == (MATHQA_ROW0_TEXT, MATHQA_ROW0_CHOICES, 0)
        else:
            assert got == hub_prompt(name, row), name
        assert len(task.eval_docs) == sum(1 for _ in source.path.open())


def test_local_yaml_swaps_only_the_data_source(tmp_path):
    path = tmp_path / "test.jsonl"
    path.write_text("{}\n")
    source = TaskSource(PAPER_TASKS["piqa"], path, "0" * 64)
    config = local_task_yaml(source, tmp_path / "ds")
    assert config["include"].endswith("lm_eval/tasks/piqa/piqa.yaml")
    assert config["task"] == "piqa" and config["dataset_path"] == "json"
    assert config["dataset_kwargs"]["data_files"] == {"validation": str(path)}
    assert config["validation_split"] == "validation" and config["test_split"] is None
    assert config["training_split"] is None and config["fewshot_split"] is None


def test_unknown_task_and_missing_rows_fail_clearly(tmp_path):
    with pytest.raises(
        ConfigError, match=r"Unknown zero-shot task \(eval.zeroshot.tasks\) 'boolq'.*arc_easy"
    ):
        resolve_tasks(["boolq"], tmp_path, offline=True)
    with pytest.raises(DataNotFoundError, match=r"lm-eval/piqa/validation\.jsonl"):
        resolve_tasks(["piqa"], tmp_path, offline=True)


def test_pipeline_runs_the_mirror_tasks_on_the_in_memory_model(
    tiny_model_dir, tiny_mirror, tiny_tokenizer, tmp_path
):
    """evaluate_zeroshot on two mirror tasks: the recorded acc is lm-eval's for that model."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    sources = resolve_tasks(["arc_easy", "winogrande"], tiny_mirror, offline=True)
    out = evaluate_zeroshot(
        model,
        tiny_tokenizer,
        sources,
        work_dir=tmp_path,
        dataset_cache=tmp_path / "ds",
        limit=None,
        batch_size=4,
        max_length=256,
    )
    assert set(out["tasks"]) == {"arc_easy", "winogrande"} and out["num_fewshot"] == 0
    arc, wino = out["tasks"]["arc_easy"], out["tasks"]["winogrande"]
    assert arc["n_samples"] == 6 and wino["n_samples"] == 6 and "acc_norm" not in wino
    assert arc["data"]["source"] == "mirror" and arc["data"]["sha256"] == sources[0].sha256
    # Winogrande by hand: the option whose context gives the continuation the higher likelihood.
    correct = 0
    for line in (tiny_mirror / "lm-eval/winogrande/validation.jsonl").open():
        row = json.loads(line)
        _, contexts, target = hub_prompt("winogrande", row)
        scores = [continuation_logprob(model, tiny_tokenizer, c, " " + target) for c in contexts]
        correct += scores.index(max(scores)) == int(row["answer"]) - 1
    assert wino["acc"] == pytest.approx(correct / 6)
    assert out["mean_acc"] == pytest.approx((arc["acc"] + wino["acc"]) / 2)
