"""runtime=sequential is refused at validation where it cannot work, before any data is read."""

from __future__ import annotations

import pytest
import torch
from conftest import compose_config

from basis_sharing import preflight
from basis_sharing.errors import ConfigError


@pytest.mark.parametrize("method", ["fwsvd", "asvd"])
def test_a_method_that_needs_the_whole_model_is_refused(method):
    cfg = compose_config(f"method={method}", "runtime=sequential", "eval=ppl")
    with pytest.raises(ConfigError) as err:
        preflight.validate(cfg)
    message = str(err.value)
    assert f"method={method} cannot run with runtime=sequential" in message
    assert "Use runtime=full" in message
    assert "basis_sharing" in message and "svd_llm" in message  # what does run block by block
    assert "fwsvd" not in message.split("block by block")[-1]


@pytest.mark.parametrize("method", ["svd", "svd_llm", "basis_sharing", "dense"])
def test_methods_that_run_block_by_block_pass(method):
    plan = preflight.validate(compose_config(f"method={method}", "runtime=sequential", "eval=ppl"))
    assert plan.method.name == method


def test_whole_model_evaluations_are_refused_on_an_accelerator(monkeypatch):
    monkeypatch.setattr(preflight, "resolve_device", lambda name: torch.device("cuda"))
    cfg = compose_config("runtime=sequential", "eval=quick")  # samples, zero-shot, throughput
    with pytest.raises(ConfigError) as err:
        preflight.validate(cfg)
    whole = "eval.generation.prompts, eval.zeroshot.tasks, eval.throughput.enabled need(s)"
    assert whole in str(err.value)
    cfg = compose_config("runtime=sequential", "eval=ppl", "eval.generation.prompts=[hi]")
    with pytest.raises(ConfigError, match=r"but eval.generation.prompts need\(s\) the whole"):
        preflight.validate(cfg)
    plan = preflight.validate(compose_config("runtime=sequential", "eval=ppl"))
    assert plan.device == torch.device("cuda")  # perplexity alone runs block by block
    assert preflight.validate(compose_config("runtime=full", "eval=quick")).device.type == "cuda"


def test_on_the_cpu_every_evaluation_runs_with_runtime_sequential():
    plan = preflight.validate(compose_config("runtime=sequential", "eval=paper", "device=cpu"))
    assert plan.device == torch.device("cpu")
