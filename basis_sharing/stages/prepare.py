"""The prepare stages: data, the model's source and tokenizer, tokenization, the model itself.

Everything that can be read before the weights is read first, so that a missing file or a bad
split fails in seconds, and every text is hashed into the record before it is used.
"""

from __future__ import annotations

from pathlib import Path

import torch

from basis_sharing.data.calibration import sample_calibration_blocks
from basis_sharing.data.corpora import load_corpus
from basis_sharing.data.tokens import token_hash, tokenize_split, tokenize_text
from basis_sharing.evaluation.params import dense_projection_weights
from basis_sharing.evaluation.perplexity import PPL_SPLITS
from basis_sharing.evaluation.throughput import throughput_blocks
from basis_sharing.evaluation.zeroshot import resolve_tasks
from basis_sharing.models.loading import load_model, load_tokenizer, resolve_source
from basis_sharing.runtime import weight_device
from basis_sharing.stages.checks import check_shapes
from basis_sharing.stages.state import Corpora, EvalInputs, RunState

THROUGHPUT_CORPUS = ("wikitext2", "validation")  # docs/methods.md §7.3


def read_data(state: RunState) -> None:
    """Perplexity, calibration, zero-shot and throughput texts, with their provenance."""
    cfg, record = state.cfg, state.record
    data_dir, offline = cfg.paths.data_dir, cfg.offline
    corpora = Corpora(
        evals={
            name: load_corpus(name, PPL_SPLITS[name][0], data_dir, offline)
            for name in cfg.eval.ppl_datasets
        }
    )
    if state.plan.method.needs_calibration:
        c = cfg.calibration
        corpora.calibration = load_corpus(c.dataset, c.split, data_dir, offline)
    record["data"]["eval"] = {n: c.provenance() for n, c in corpora.evals.items()}
    record["data"]["calibration"] = (
        corpora.calibration.provenance() if corpora.calibration else None
    )
    tasks = list(cfg.eval.zeroshot.tasks)
    corpora.zeroshot = resolve_tasks(tasks, data_dir, offline) if tasks else []
    record["data"]["zeroshot"] = {s.task.name: s.provenance() for s in corpora.zeroshot}
    if cfg.eval.throughput.enabled:
        corpora.throughput = load_corpus(*THROUGHPUT_CORPUS, data_dir, offline)
        record["data"]["throughput"] = corpora.throughput.provenance()
    state.corpora = corpora


def resolve_model(state: RunState) -> None:
    """The base model's files (hub, local or GGUF), the checks its shapes allow, its tokenizer."""
    cfg, record = state.cfg, state.record
    state.source = resolve_source(cfg.model, cfg.paths.cache_dir, cfg.offline)
    record["model"].update(state.source.provenance)
    # Before the tokenizer and far before the weights: what the shapes decide.
    record["preflight"] = check_shapes(cfg, state.plan.method, state.source, state.plan.finetuner)
    state.tokenizer = load_tokenizer(state.source)


def tokenize(state: RunState) -> None:
    """Perplexity ids per dataset, calibration blocks, throughput blocks; hashes to the record."""
    cfg, record, corpora, tokenizer = state.cfg, state.record, state.corpora, state.tokenizer
    ppl_ids = {
        name: tokenize_split(tokenizer, corpus, max_rows=PPL_SPLITS[name][1])
        for name, corpus in corpora.evals.items()
    }
    record["hashes"]["eval"] = {name: token_hash(ids) for name, ids in ppl_ids.items()}
    state.inputs = EvalInputs(ppl_ids)
    if corpora.calibration is not None:
        c = cfg.calibration
        state.calibration_ids = sample_calibration_blocks(
            tokenize_text(tokenizer, corpora.calibration.text()),
            c.n_samples,
            c.seq_len,
            c.seed,
            source=corpora.calibration.describe(),
        )
        record["hashes"]["calibration"] = token_hash(state.calibration_ids)
        if state.world.is_main:  # under torchrun the run directory is rank 0's
            save_calibration_ids(state.calibration_ids, record.out_dir)
    if corpora.throughput is not None:
        # The first quarter of WikiText-2 validation as blocks, and the generation prompt.
        tp = cfg.eval.throughput
        ids = tokenize_text(tokenizer, corpora.throughput.text())
        state.inputs.speed_blocks = throughput_blocks(ids, tp.seq_len, tp.fraction)
        state.inputs.speed_prompt = ids[: tp.prompt_tokens]
        record["hashes"]["throughput"] = token_hash(state.inputs.speed_blocks)


def save_calibration_ids(ids: torch.Tensor, out_dir: Path) -> None:
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({"input_ids": ids.contiguous()}, out_dir / "calibration_ids.safetensors")


def load_base_model(state: RunState) -> None:
    """The dense weights where the runtime keeps them, and their projection-weight count.

    runtime=full: on the run's device; runtime=sequential: on the CPU (one block at a time goes
    to the device).
    """
    where = weight_device(state.cfg.runtime, state.plan.device)
    state.model, state.family = load_model(state.cfg.model, state.source, where)
    state.dense_weights = dense_projection_weights(state.model, state.family)
    kinds = state.plan.method.budget_kinds(state.family)
    if kinds is not None:
        state.budget = kinds, dense_projection_weights(state.model, state.family, kinds)
    state.record["model"]["family"] = state.family.name
