"""Greedy decoding: the generation-speed protocol and the post-compression sanity samples.

The sample prompts are configuration (``eval.generation.prompts``, three fixed ones in conf/eval/).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import CompileConfig


def pad_token_id(model: nn.Module) -> int | None:
    config = model.config
    return config.pad_token_id if config.pad_token_id is not None else config.eos_token_id


def compile_config(device: torch.device) -> CompileConfig:
    """How ``generate`` compiles its decoding step: CUDA graphs on a GPU ("reduce-overhead"),
    inductor's default elsewhere (transformers compiles only on accelerators unless told to)."""
    config = CompileConfig(mode="reduce-overhead" if device.type == "cuda" else "default")
    if device.type != "cuda":
        config._compile_all_devices = True  # transformers' documented switch for other devices
    return config


def greedy_generate(
    model: nn.Module,
    prompt: torch.Tensor,
    new_tokens: int,
    *,
    exact: bool = True,
    compile: bool = False,
) -> torch.Tensor:
    """Greedy tokens after ``prompt`` (1, p), with the KV cache.

    ``exact``: always ``new_tokens`` of them (speed measurement); otherwise stop at end-of-sequence.
    ``compile``: a static KV cache and transformers' compiled decoding step (``compile_config``;
    the first call compiles, later calls of the same lengths reuse it).
    """
    options = {}
    if compile:
        options = {
            "cache_implementation": "static",
            "compile_config": compile_config(prompt.device),
        }
    return model.generate(
        input_ids=prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens if exact else None,
        do_sample=False,
        num_beams=1,
        use_cache=True,
        pad_token_id=pad_token_id(model),
        **options,
    )


def generation_samples(
    model: nn.Module, tokenizer, prompts: list[str], max_new_tokens: int
) -> list[dict[str, Any]]:
    """Each prompt decoded greedily (batch 1, stops at end-of-sequence): text and token ids."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    samples = []
    try:
        with torch.inference_mode():
            for prompt in prompts:
                ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(device)
                out = greedy_generate(model, ids, max_new_tokens, exact=False)
                new = out[0, ids.shape[1] :].tolist()
                samples.append(
                    {
                        "prompt": prompt,
                        "completion": tokenizer.decode(new, skip_special_tokens=True),
                        "new_token_ids": new,
                    }
                )
    finally:
        model.train(was_training)
    return samples
