"""The one pipeline every run goes through.

    validate -> data -> model source + tokenizer -> tokenize (+ calibration blocks) -> load model
    -> [dense throughput] -> compress (the method; dense does nothing) -> parameter accounting
    -> generation samples -> perplexity -> zero-shot (lm-eval) -> [throughput] -> record

Everything that can be wrong with the input is checked before the model is loaded. Each stage's
wall time and peak memory, and every result, go to ``results.json`` as soon as they exist.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from basis_sharing.calibration.cache import stats_key
from basis_sharing.calibration.collect import collect_statistic
from basis_sharing.config import check_schema
from basis_sharing.data.calibration import sample_calibration_blocks
from basis_sharing.data.corpora import Corpus, get_corpus_spec, load_corpus, split_source
from basis_sharing.data.tokens import token_hash, tokenize_split, tokenize_text
from basis_sharing.errors import ConfigError, UserError, unknown_choice
from basis_sharing.evaluation.generation import generation_samples
from basis_sharing.evaluation.params import dense_projection_weights, parameter_report
from basis_sharing.evaluation.perplexity import PPL_SPLITS, perplexity
from basis_sharing.evaluation.throughput import (
    default_batch_size,
    measure_speed,
    rank_above_break_even,
    speedups,
    summarize_break_even,
    throughput_blocks,
)
from basis_sharing.evaluation.zeroshot import (
    PAPER_TASKS,
    TaskSource,
    evaluate_zeroshot,
    resolve_tasks,
)
from basis_sharing.files import directory_lock
from basis_sharing.methods import get_method
from basis_sharing.methods.caches import SweepCaches
from basis_sharing.methods.registry import CompressionContext, CompressionMethod
from basis_sharing.models.compressed_io import (
    check_target,
    load_compressed,
    read_manifest,
    require_tokenizer,
    save_compressed,
)
from basis_sharing.models.families import get_family
from basis_sharing.models.loading import (
    ModelSource,
    load_model,
    load_tokenizer,
    resolve_source,
    torch_dtype,
)
from basis_sharing.preflight import check_ratio, check_settings, check_shapes
from basis_sharing.threads import apply_threads, check_threads
from basis_sharing.tracking.loggers import make_logger
from basis_sharing.tracking.record import RunRecord, summary_table
from basis_sharing.tracking.resume import config_fingerprint, find_completed

log = logging.getLogger(__name__)


THROUGHPUT_CORPUS = ("wikitext2", "validation")  # docs/methods.md §7.3
SAVED_MODEL = "compressed_model"  # save_model=true writes <run dir>/compressed_model


@dataclass
class Plan:
    """What validation resolved: the method object and the device."""

    method: CompressionMethod
    device: torch.device


@dataclass
class EvalInputs:
    """Everything the evaluation stages read, prepared before the model is loaded."""

    ppl_ids: dict[str, torch.Tensor]
    zeroshot: list[TaskSource]
    speed_blocks: torch.Tensor | None = None
    speed_prompt: torch.Tensor | None = None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"Unknown device '{name}'. Use auto, cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name} was requested but CUDA is not available here.")
    return device


def validate(cfg: DictConfig) -> Plan:
    """Check every setting that can be checked without data or weights."""
    check_schema(cfg)
    check_threads(cfg.threads)
    if not 0.0 < cfg.ratio < 1.0:
        raise ConfigError(
            f"ratio={cfg.ratio} is outside (0, 1): it is the fraction of decoder-projection "
            "weights removed, e.g. ratio=0.2 keeps 80%."
        )
    method = get_method(cfg.method)
    check_settings(cfg, method)
    for name in cfg.eval.ppl_datasets:
        if name not in PPL_SPLITS:
            raise unknown_choice("perplexity dataset (eval.ppl_datasets)", name, list(PPL_SPLITS))
    if cfg.eval.max_windows is not None and cfg.eval.max_windows < 1:
        raise ConfigError(f"eval.max_windows={cfg.eval.max_windows} must be >= 1 or null.")
    for key in ("eval.batch_size", "model.eval_batch_size", "model.calib_batch_size"):
        value = OmegaConf.select(cfg, key)
        if value is not None and value < 1:
            raise ConfigError(f"{key}={value} must be >= 1.")
    if cfg.model.context_length < 2:
        raise ConfigError(f"model.context_length={cfg.model.context_length} must be >= 2.")
    validate_evaluation(cfg.eval)
    torch_dtype(cfg.model.dtype)
    if cfg.model.family is not None:
        get_family(cfg.model.family)
    if cfg.load_model is not None:
        if method.compresses:
            raise ConfigError(
                f"load_model={cfg.load_model} evaluates a saved compressed model; use method=none "
                f"(not method={cfg.method.name})."
            )
        manifest, _ = read_manifest(Path(cfg.load_model).expanduser())
        require_tokenizer(Path(cfg.load_model).expanduser(), manifest)
        saved_from = manifest.get("info", {}).get("model_name")
        if saved_from is not None and saved_from != cfg.model.name:
            raise ConfigError(
                f"load_model={cfg.load_model} was compressed from model={saved_from}; pass "
                f"model={saved_from} so the evaluation uses that model's settings."
            )
    if method.needs_calibration:
        if cfg.calibration.dataset is None:
            raise ConfigError(
                f"method {cfg.method.name} needs calibration data but calibration=none; "
                "choose e.g. calibration=wikitext2."
            )
        get_corpus_spec(cfg.calibration.dataset)
        split_source(cfg.calibration.dataset, cfg.calibration.split)
    return Plan(method=method, device=resolve_device(cfg.device))


def validate_evaluation(ev: DictConfig) -> None:
    """Zero-shot, throughput and generation settings (perplexity is checked by ``validate``)."""
    for name in ev.zeroshot.tasks:
        if name not in PAPER_TASKS:
            raise unknown_choice("zero-shot task (eval.zeroshot.tasks)", name, list(PAPER_TASKS))
    limit = ev.zeroshot.limit
    if limit is not None and (limit <= 0 or (limit > 1 and limit != int(limit))):
        raise ConfigError(
            f"eval.zeroshot.limit={limit}: use a document count >= 1, a fraction in (0, 1], "
            "or null for every document."
        )
    positive = {
        "eval.zeroshot.batch_size": ev.zeroshot.batch_size,
        "eval.zeroshot.max_length": ev.zeroshot.max_length,
        "eval.throughput.seq_len": ev.throughput.seq_len,
        "eval.throughput.batch_size": ev.throughput.batch_size,
        "eval.throughput.max_batches": ev.throughput.max_batches,
        "eval.throughput.prompt_tokens": ev.throughput.prompt_tokens,
        "eval.throughput.new_tokens": ev.throughput.new_tokens,
        "eval.throughput.runs": ev.throughput.runs,
        "eval.generation.max_new_tokens": ev.generation.max_new_tokens,
    }
    for key, value in positive.items():
        if value is not None and value < 1:
            raise ConfigError(f"{key}={value} must be >= 1.")
    if ev.throughput.warmup < 0:
        raise ConfigError(f"eval.throughput.warmup={ev.throughput.warmup} must be >= 0.")
    if not 0.0 < ev.throughput.fraction <= 1.0:
        raise ConfigError(f"eval.throughput.fraction={ev.throughput.fraction} must be in (0, 1].")


def zeroshot_limit(limit: float | None) -> int | float | None:
    """A document count as an int (lm-eval reads floats below 1 as fractions)."""
    return int(limit) if limit is not None and limit > 1 else limit


def load_corpora(cfg: DictConfig, plan: Plan) -> tuple[dict[str, Corpus], Corpus | None]:
    data_dir, offline = cfg.paths.data_dir, cfg.offline
    evals = {
        name: load_corpus(name, PPL_SPLITS[name][0], data_dir, offline)
        for name in cfg.eval.ppl_datasets
    }
    calib = None
    if plan.method.needs_calibration:
        calib = load_corpus(cfg.calibration.dataset, cfg.calibration.split, data_dir, offline)
    return evals, calib


def tokenize_corpora(
    cfg: DictConfig, tokenizer, evals: dict[str, Corpus], calib: Corpus | None, record: RunRecord
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """Perplexity ids per dataset, and the calibration blocks; hashes go to the record."""
    eval_ids = {
        name: tokenize_split(tokenizer, corpus, max_rows=PPL_SPLITS[name][1])
        for name, corpus in evals.items()
    }
    record["hashes"]["eval"] = {name: token_hash(ids) for name, ids in eval_ids.items()}
    calib_ids = None
    if calib is not None:
        c = cfg.calibration
        calib_ids = sample_calibration_blocks(
            tokenize_text(tokenizer, calib.text()),
            c.n_samples,
            c.seq_len,
            c.seed,
            source=calib.describe(),
        )
        record["hashes"]["calibration"] = token_hash(calib_ids)
        save_calibration_ids(calib_ids, record.out_dir)
    return eval_ids, calib_ids


def speed_inputs(
    cfg: DictConfig, tokenizer, corpus: Corpus, record: RunRecord
) -> tuple[torch.Tensor, torch.Tensor]:
    """Throughput blocks (first quarter of WikiText-2 validation) and the generation prompt."""
    tp = cfg.eval.throughput
    ids = tokenize_text(tokenizer, corpus.text())
    blocks = throughput_blocks(ids, tp.seq_len, tp.fraction)
    prompt = ids[: tp.prompt_tokens]
    record["hashes"]["throughput"] = token_hash(blocks)
    return blocks, prompt


def save_calibration_ids(ids: torch.Tensor, out_dir: Path) -> None:
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({"input_ids": ids.contiguous()}, out_dir / "calibration_ids.safetensors")


def model_identity(model_record: dict) -> dict[str, Any]:
    """What pins the weights: hub commit, GGUF hash or local fingerprint, plus dtype."""
    keys = (
        "source",
        "hf_id",
        "commit",
        "path",
        "weights_fingerprint",
        "gguf_sha256",
        "dtype",
        "name",
    )
    return {k: model_record.get(k) for k in keys if model_record.get(k) is not None}


def calibrate(
    cfg: DictConfig,
    model,
    family,
    calib_ids: torch.Tensor,
    record: RunRecord,
    needed: frozenset[str],
) -> tuple[dict[str, Any], str]:
    """The statistics the method needs, each from the disk cache when this setup ran before.

    Keys cover the model identity, the calibration token ids (hence tokenizer, dataset, split,
    sample count, length and seed), the statistic and the Gram accumulation dtype. Returns the
    statistics by name and a key of the whole calibration setup (for reusing decompositions).
    """
    gram_dtype = cfg.calibration.gram_dtype  # checked by preflight.check_calibration
    identity = model_identity(record["model"])
    cache_dir = Path(cfg.paths.cache_dir).expanduser()
    calibration_hash = record["hashes"]["calibration"]
    batch = cfg.model.calib_batch_size
    meta = {"model": identity, "calibration": OmegaConf.to_container(cfg.calibration)}
    stats: dict[str, Any] = {}
    summary: dict[str, Any] = {"gram_dtype": gram_dtype, "tokens": int(calib_ids.numel())}
    for name in sorted(needed):
        key, collected, hit = collect_statistic(
            name,
            model,
            family,
            calib_ids,
            batch,
            gram_dtype,
            identity,
            calibration_hash,
            cache_dir,
            meta,
        )
        stats[name] = collected
        summary[name] = {"stats_key": key, "cache_hit": hit}
    run_key = stats_key(identity, calibration_hash, gram_dtype)
    summary["stats_key"] = run_key
    summary["cache_hit"] = all(v["cache_hit"] for k, v in summary.items() if k in needed)
    record["calibration"] = summary
    return stats, run_key


def execute(cfg: DictConfig, plan: Plan, record: RunRecord, caches: SweepCaches) -> None:
    """The stages after validation; every result lands in ``record``.

    ``caches`` holds what the method may reuse from earlier jobs of the same sweep.
    """
    with record.stage("data"):
        evals, calib = load_corpora(cfg, plan)
        record["data"]["eval"] = {n: c.provenance() for n, c in evals.items()}
        record["data"]["calibration"] = calib.provenance() if calib else None
        tasks = list(cfg.eval.zeroshot.tasks)
        zeroshot = resolve_tasks(tasks, cfg.paths.data_dir, cfg.offline) if tasks else []
        record["data"]["zeroshot"] = {s.task.name: s.provenance() for s in zeroshot}
        speed_corpus = None
        if cfg.eval.throughput.enabled:
            speed_corpus = load_corpus(*THROUGHPUT_CORPUS, cfg.paths.data_dir, cfg.offline)
            record["data"]["throughput"] = speed_corpus.provenance()
    with record.stage("model_source"):
        if cfg.load_model is not None:
            source = None
            saved = Path(cfg.load_model).expanduser()
            manifest, _ = read_manifest(saved)
            tokenizer = load_tokenizer(ModelSource(saved))
            record["model"].update(manifest["info"].get("base_model", {}), loaded_from=str(saved))
        else:
            source = resolve_source(cfg.model, cfg.paths.cache_dir, cfg.offline)
            record["model"].update(source.provenance)
            # Before the tokenizer and far before the weights: what the shapes decide.
            record["preflight"] = check_shapes(cfg, plan.method, source)
            tokenizer = load_tokenizer(source)
    with record.stage("tokenize"):
        eval_ids, calib_ids = tokenize_corpora(cfg, tokenizer, evals, calib, record)
        inputs = EvalInputs(eval_ids, zeroshot)
        if speed_corpus is not None:
            inputs.speed_blocks, inputs.speed_prompt = speed_inputs(
                cfg, tokenizer, speed_corpus, record
            )
    with record.stage("load_model", plan.device):
        if source is None:
            loaded = load_compressed(saved, plan.device)
            model, family = loaded.model, loaded.family
            record["loaded_compression"] = loaded.manifest["info"]
            record["target_ratio"] = loaded.manifest["info"].get("target_ratio")
            dense = dense_weights_of(model, family, loaded.manifest["layout"])
        else:
            model, family = load_model(cfg.model, source, plan.device)
            dense = dense_projection_weights(model, family)
        record["model"]["family"] = family.name
    if inputs.speed_blocks is not None and plan.method.compresses:
        measure_throughput(cfg, plan, model, inputs, record, "dense")
    ctx = CompressionContext(
        ratio=cfg.ratio,
        device=plan.device,
        calibration_ids=calib_ids,
        calib_batch_size=cfg.model.calib_batch_size,
        caches=caches,
    )
    if plan.method.needs_calibration:
        with record.stage("calibrate", plan.device):
            needed = getattr(plan.method, "stats_needed", frozenset())
            ctx.stats, ctx.extras["cache_key"] = calibrate(
                cfg, model, family, calib_ids, record, needed
            )
            ctx.extras["gram_dtype"] = getattr(torch, cfg.calibration.gram_dtype)
    with record.stage("compress", plan.device):
        record["method_info"] = plan.method.compress(model, family, ctx)
    record["params"] = parameter_report(model, family, dense)
    planned = (record["method_info"] or {}).get("planned_params")
    if planned is not None:
        record["params"]["planned_decoder_projections"] = planned["kept"]
    if plan.method.compresses:
        check_ratio(record["params"]["achieved_ratio"], cfg.ratio, cfg.ratio_tolerance)
    check_break_even(model, record)
    if cfg.save_model:
        with record.stage("save_model"):
            record["saved_model"] = str(save_model(cfg, model, family, tokenizer, record))
    evaluate(cfg, plan, model, tokenizer, inputs, record)


def check_break_even(model, record: RunRecord) -> None:
    """Record (and warn about) factorised projections slower than their dense layer."""
    slow = rank_above_break_even(model)
    record["params"]["above_break_even"] = slow
    if slow:
        log.warning(
            "%d factorised projections have a rank above the break-even point, where (x B) C "
            "costs more multiply-adds than x W, so they are slower than the dense layer: %s",
            len(slow),
            summarize_break_even(slow),
        )


def measure_throughput(
    cfg: DictConfig, plan: Plan, model, inputs: EvalInputs, record: RunRecord, key: str
) -> None:
    """Speed of the model as it is now, under ``metrics.throughput.<key>``."""
    tp = cfg.eval.throughput
    results = record["metrics"].setdefault("throughput", {})
    with record.stage(f"throughput_{key}", plan.device):
        results[key] = measure_speed(
            model,
            inputs.speed_blocks,
            inputs.speed_prompt,
            batch_size=tp.batch_size or default_batch_size(plan.device),
            warmup=tp.warmup,
            max_batches=tp.max_batches,
            compile=tp.compile,
            new_tokens=tp.new_tokens,
            runs=tp.runs,
        )
    if "dense" in results and "compressed" in results:
        results["speedup"] = speedups(results["dense"], results["compressed"])
    record.write()


def evaluate(cfg: DictConfig, plan: Plan, model, tokenizer, inputs: EvalInputs, record) -> None:
    """Generation samples, perplexity, zero-shot and throughput of the model this run produced."""
    ev = cfg.eval
    if ev.generation.prompts:
        with record.stage("generate", plan.device):
            record["generation_samples"] = generation_samples(
                model, tokenizer, list(ev.generation.prompts), ev.generation.max_new_tokens
            )
        for sample in record["generation_samples"]:
            log.info("sample %r -> %r", sample["prompt"], sample["completion"])
    batch_size = ev.batch_size or cfg.model.eval_batch_size
    results = record["metrics"].setdefault("perplexity", {})
    with record.stage("perplexity", plan.device):
        for name, ids in inputs.ppl_ids.items():
            result = perplexity(
                model,
                ids,
                cfg.model.context_length,
                dataset=name,
                batch_size=batch_size,
                max_windows=ev.max_windows,
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
    if inputs.zeroshot:
        with record.stage("zeroshot", plan.device):
            record["metrics"]["zeroshot"] = evaluate_zeroshot(
                model,
                tokenizer,
                inputs.zeroshot,
                work_dir=record.out_dir,
                dataset_cache=Path(cfg.paths.cache_dir).expanduser() / "lm_eval_datasets",
                limit=zeroshot_limit(ev.zeroshot.limit),
                batch_size=ev.zeroshot.batch_size,
                max_length=ev.zeroshot.max_length or cfg.model.context_length,
            )
        log.info("zero-shot mean acc %s", record["metrics"]["zeroshot"]["mean_acc"])
    if inputs.speed_blocks is not None:
        key = "compressed" if plan.method.compresses else "model"
        measure_throughput(cfg, plan, model, inputs, record, key)


def save_model(cfg: DictConfig, model, family, tokenizer, record: RunRecord) -> Path:
    """Write the compressed model next to results.json, with what produced it."""
    info = {
        "model_name": cfg.model.name,
        "method": cfg.method.name,
        "method_config": OmegaConf.to_container(cfg.method, resolve=True),
        "target_ratio": record["target_ratio"],
        "base_model": record["model"],
        "params": record["params"],
        "method_info": record["method_info"],
        "calibration": record.data.get("calibration"),
        "hashes": record["hashes"],
        "git": record["environment"]["git"],
    }
    return save_compressed(
        model,
        record.out_dir / SAVED_MODEL,
        family=family,
        tokenizer=tokenizer,
        info=info,
        overwrite=cfg.save_model_overwrite,
    )


def check_save_target(cfg: DictConfig, out_dir: Path) -> None:
    """An earlier save in the run directory is refused now, not after the compression."""
    if cfg.save_model:
        how = "set save_model_overwrite=true"
        check_target(out_dir / SAVED_MODEL, cfg.save_model_overwrite, how)


def dense_weights_of(model, family, layout: list[dict]) -> int:
    """Uncompressed projection weights of a loaded model: compressed entries from the layout."""
    compressed = {(e["layer"], e["kind"]): e["d_in"] * e["d_out"] for e in layout}
    total = 0
    for i, layer in enumerate(family.layers(model)):
        for kind in family.kinds:
            if (i, kind) in compressed:
                total += compressed[(i, kind)]
            else:
                d_in, d_out = family.shape(layer, kind)
                total += d_in * d_out
    return total


def hydra_context() -> dict[str, Any]:
    """Output dir, overrides and group choices of the current Hydra job (if any)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    hc = HydraConfig.get()
    choices = {
        k: v for k, v in hc.runtime.choices.items() if not k.startswith(("hydra/", "schema"))
    }
    return {
        "out_dir": hc.runtime.output_dir,
        "overrides": list(hc.overrides.task),
        "choices": choices,
    }


def run(
    cfg: DictConfig, out_dir: str | Path | None = None, caches: SweepCaches | None = None
) -> dict[str, Any]:
    """Run one job and return its record (also written to ``<out_dir>/results.json``).

    Args:
        caches: what the jobs of one sweep share (decompositions, ASVD's sensitivities); the
            caller owns it and passes the same object to every job. None: a fresh one that lives
            for this job only.
    """
    hydra = hydra_context()
    out_dir = Path(out_dir or hydra.get("out_dir") or ".")
    plan = validate(cfg)
    config = OmegaConf.to_container(cfg, resolve=True)
    fingerprint = config_fingerprint(config)
    done = None if cfg.force else find_completed(out_dir, config)
    if done is not None and cfg.save_model and not done[1].get("saved_model"):
        log.info("Recomputing %s: save_model=true but that run saved no model.", done[0])
        done = None
    if done is not None:  # resume: a finished job of a re-run sweep is not computed again
        log.info(
            "Skipped: %s is a completed run of this configuration (fingerprint %s); "
            "force=true recomputes it.",
            done[0],
            fingerprint,
        )
        return done[1]
    check_save_target(cfg, out_dir)  # after the resume check: a skipped job saves nothing
    tracker = make_logger(cfg)  # logger=none: a no-op; checked before any work
    threads = apply_threads(cfg.threads)  # before any work: sizes torch and BLAS pools
    torch.manual_seed(cfg.seed)
    with directory_lock(out_dir):  # a second process on this directory stops here, at once
        record = new_record(cfg, plan, out_dir, config, fingerprint, hydra)
        record["environment"]["threads"] = threads
        record.write()
        with tracker.track(record):  # mirrors every record write; closes the tracker's run
            job_caches = caches if caches is not None else SweepCaches()
            execute_recorded(cfg, plan, record, job_caches)
    log.info("Run summary (%s)\n%s", record.path, summary_table(record.data))
    return record.data


def new_record(
    cfg: DictConfig,
    plan: Plan,
    out_dir: Path,
    config: dict[str, Any],
    fingerprint: str,
    hydra: dict[str, Any],
) -> RunRecord:
    record = RunRecord(
        out_dir,
        config,
        fingerprint=fingerprint,
        method=cfg.method.name,
        target_ratio=float(cfg.ratio) if plan.method.compresses else None,
        seed=cfg.seed,
        device=str(plan.device),
        overrides=hydra.get("overrides", []),
        choices=hydra.get("choices", {}),
    )
    record["model"].update(
        name=cfg.model.name,
        hf_id=cfg.model.hf_id,
        revision=cfg.model.revision,
        dtype=cfg.model.dtype,
        context_length=cfg.model.context_length,
    )
    return record


def execute_recorded(cfg: DictConfig, plan: Plan, record: RunRecord, caches: SweepCaches) -> None:
    """``execute``, ending the record as completed or failed (with the error) either way."""
    try:
        execute(cfg, plan, record, caches)
    except BaseException as exc:
        record.fail(exc)
        if record.path != record.final_path:
            log.error(
                "This run failed; the earlier completed record %s is kept unchanged and "
                "this run's record is %s.",
                record.final_path,
                record.path,
            )
        raise
    record.finish()


def main(cfg: DictConfig, caches: SweepCaches | None = None) -> None:
    """Hydra entry: user errors end the process with their message instead of a traceback."""
    try:
        run(cfg, caches=caches)
    except UserError as exc:
        log.error("%s", exc)
        raise SystemExit(1) from None
