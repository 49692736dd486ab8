"""The evaluate stages: generation samples, perplexity, zero-shot and throughput.

Each is a separate stage (its own time and memory in the record) and each writes its results to
the record as soon as they exist, so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import logging
from pathlib import Path

from basis_sharing.evaluation.generation import generation_samples
from basis_sharing.evaluation.perplexity import perplexity
from basis_sharing.evaluation.throughput import default_batch_size, measure_speed, speedups
from basis_sharing.evaluation.zeroshot import evaluate_zeroshot
from basis_sharing.runtime import make_runner
from basis_sharing.stages.state import RunState

log = logging.getLogger(__name__)


def generate(state: RunState) -> None:
    """Greedy completions of the configured prompts."""
    gen = state.cfg.eval.generation
    samples = generation_samples(
        state.model, state.tokenizer, list(gen.prompts), gen.max_new_tokens
    )
    state.record["generation_samples"] = samples
    for sample in samples:
        log.info("sample %r -> %r", sample["prompt"], sample["completion"])


def evaluate_perplexity(state: RunState) -> None:
    """Perplexity on every configured dataset (docs/methods.md §7.1), block by block with
    runtime=sequential."""
    cfg, record = state.cfg, state.record
    batch_size = cfg.eval.batch_size or cfg.model.eval_batch_size
    runner = make_runner(cfg.runtime, state.model, state.family, state.plan.device)
    results = record["metrics"].setdefault("perplexity", {})
    for name, ids in state.inputs.ppl_ids.items():
        result = perplexity(
            state.model,
            ids,
            cfg.model.context_length,
            dataset=name,
            batch_size=batch_size,
            max_windows=cfg.eval.dataset_windows.get(name) or cfg.eval.max_windows,
            runner=runner,
        )
        results[name] = result.as_dict()
        log.info(
            "%s perplexity %.4f (%d/%d windows)",
            name,
            result.ppl,
            result.n_windows_evaluated,
            result.n_windows,
        )
        record.write()


def evaluate_zeroshot_tasks(state: RunState) -> None:
    """lm-eval zero-shot accuracy on the configured tasks (docs/methods.md §7.2)."""
    cfg, record = state.cfg, state.record
    zs = cfg.eval.zeroshot
    record["metrics"]["zeroshot"] = evaluate_zeroshot(
        state.model,
        state.tokenizer,
        state.corpora.zeroshot,
        work_dir=record.out_dir,
        dataset_cache=Path(cfg.paths.cache_dir).expanduser() / "lm_eval_datasets",
        limit=zeroshot_limit(zs.limit),
        batch_size=zs.batch_size,
        max_length=zs.max_length or cfg.model.context_length,
    )
    log.info("zero-shot mean acc %s", record["metrics"]["zeroshot"]["mean_acc"])


def zeroshot_limit(limit: float | None) -> int | float | None:
    """A document count as an int (lm-eval reads floats below 1 as fractions)."""
    return int(limit) if limit is not None and limit > 1 else limit


def throughput(key: str):
    """A stage measuring the model's speed as it is now, under ``metrics.throughput.<key>``.

    ``dense`` runs before compress, ``compressed`` (or ``model`` for an uncompressed run) last;
    with both, the speedups are recorded too (docs/methods.md §7.3-§7.4).
    """

    def measure(state: RunState) -> None:
        cfg, record, inputs = state.cfg, state.record, state.inputs
        tp = cfg.eval.throughput
        results = record["metrics"].setdefault("throughput", {})
        results[key] = measure_speed(
            state.model,
            inputs.speed_blocks,
            inputs.speed_prompt,
            batch_size=tp.batch_size or default_batch_size(state.plan.device),
            warmup=tp.warmup,
            max_batches=tp.max_batches,
            compile=tp.compile,
            new_tokens=tp.new_tokens,
            runs=tp.runs,
        )
        if "dense" in results and "compressed" in results:
            results["speedup"] = speedups(results["dense"], results["compressed"])

    return measure
