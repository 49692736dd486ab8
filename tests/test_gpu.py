"""The CUDA path of the pipeline (skipped where there is no GPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import compose_config

from basis_sharing import pipeline

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def run_on(device: str, model_dir: Path, mirror: Path, out: Path, *extra: str) -> dict:
    cfg = compose_config(
        "model=local",
        f"model.local_path={model_dir}",
        "model.context_length=64",
        f"paths.data_dir={mirror}",
        "eval=ppl",
        "eval.max_windows=4",
        "eval.batch_size=2",
        f"device={device}",
        f"paths.cache_dir={out}/cache",
        *extra,
    )
    return pipeline.run(cfg, out_dir=out)


def test_cuda_run_matches_cpu_and_records_cuda_peaks(tiny_model_dir, tiny_mirror, tmp_path):
    cuda = run_on("cuda", tiny_model_dir, tiny_mirror, tmp_path / "cuda", "method=dense")
    cpu = run_on("cpu", tiny_model_dir, tiny_mirror, tmp_path / "cpu", "method=dense")
    assert cuda["device"].startswith("cuda") and cuda["environment"]["cuda"]
    for stage in ("load_model", "compress", "perplexity"):
        assert "cuda_peak_mb" in cuda["stages"][stage]
        assert "cuda_peak_mb" not in cpu["stages"][stage]
    assert cuda["stages"]["perplexity"]["cuda_peak_mb"] > 0
    for name, result in cpu["metrics"]["perplexity"].items():
        assert cuda["metrics"]["perplexity"][name]["ppl"] == pytest.approx(result["ppl"], rel=1e-4)
    assert cuda["hashes"]["eval"] == cpu["hashes"]["eval"]


def test_basis_sharing_on_cuda_matches_cpu(tiny_model_dir, tiny_mirror, tmp_path):
    """Statistics and the float64 decompositions run on the GPU and give the CPU's model."""
    extra = (
        "method=basis_sharing",
        "calibration=wikitext2_cpu",
        "calibration.n_samples=8",
        "calibration.seq_len=32",
        "ratio=0.3",
        "ratio_tolerance=0.05",
        "calibration.gram_dtype=float64",
    )
    cuda = run_on("cuda", tiny_model_dir, tiny_mirror, tmp_path / "cuda", *extra)
    cpu = run_on("cpu", tiny_model_dir, tiny_mirror, tmp_path / "cpu", *extra)
    assert cuda["stages"]["calibrate"]["cuda_peak_mb"] > 0
    assert cuda["stages"]["compress"]["cuda_peak_mb"] > 0
    assert cuda["params"] == cpu["params"]
    for name, result in cpu["metrics"]["perplexity"].items():
        assert cuda["metrics"]["perplexity"][name]["ppl"] == pytest.approx(result["ppl"], rel=1e-4)


def test_throughput_and_samples_on_cuda(tiny_model_dir, tiny_mirror, tmp_path):
    """The speed stages synchronise and report CUDA peaks; greedy samples match the CPU's."""
    extra = (
        "method=basis_sharing",
        "calibration=wikitext2_cpu",
        "calibration.n_samples=8",
        "calibration.seq_len=32",
        "calibration.gram_dtype=float64",
        "ratio=0.3",
        "ratio_tolerance=0.05",
        "eval.throughput.enabled=true",
        "eval.throughput.batch_size=4",
        "eval.throughput.max_batches=2",
        "eval.throughput.warmup=1",
        "eval.throughput.new_tokens=4",
        "eval.throughput.runs=1",
        "eval.generation.prompts=[the king of the north]",
        "eval.generation.max_new_tokens=4",
    )
    cuda = run_on("cuda", tiny_model_dir, tiny_mirror, tmp_path / "cuda", *extra)
    cpu = run_on("cpu", tiny_model_dir, tiny_mirror, tmp_path / "cpu", *extra)
    speed = cuda["metrics"]["throughput"]
    for key in ("dense", "compressed"):
        assert speed[key]["device"].startswith("cuda") and speed[key]["cuda_peak_mb"] > 0
        assert speed[key]["forward"]["n_batches"] == 2
        assert "cuda_peak_mb" not in cpu["metrics"]["throughput"][key]
    assert (
        speed["compressed"]["weights_mb"]
        == cpu["metrics"]["throughput"]["compressed"]["weights_mb"]
    )
    assert cuda["stages"]["throughput_compressed"]["cuda_peak_mb"] > 0
    assert cuda["generation_samples"] == cpu["generation_samples"]


def test_a_two_four_v_runs_semi_structured_and_computes_the_masked_product():
    from torch import nn

    from basis_sharing.linalg.pruning import two_four_mask
    from basis_sharing.modules import SparseFactorLinear

    g = torch.Generator().manual_seed(0)
    d, r, w = 128, 128, 256
    registry = nn.ModuleDict({"mlp_g0": nn.Linear(d, r, bias=False)})
    x_up = torch.randn(64, d, generator=g).half().cuda()
    x_down = torch.randn(64, w, generator=g).half().cuda()
    for transposed, x in ((False, x_up), (True, x_down)):
        v = torch.randn(r, w, generator=g)
        mask = two_four_mask(v, 1 if transposed else 0)
        module = SparseFactorLinear.from_dense(
            registry, "mlp_g0", v * mask, mask, transposed, structure="2:4"
        )
        module = module.half().cuda()
        registry.half().cuda()
        dense = module(x)
        module.to_semi_structured()
        torch.testing.assert_close(module(x), dense, rtol=2e-2, atol=2e-2)


def _hooked_pass_peak(model, family, ids, batch_size, gram_store=None) -> int:
    """Peak CUDA bytes above the resident model during one hooked calibration pass."""
    from basis_sharing.calibration.grams import GRAM
    from basis_sharing.calibration.statistics import collect_forward

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    collect_forward([GRAM], model, family, ids, batch_size, "float32", gram_store=gram_store)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def test_offloaded_grams_leave_the_device_and_auto_batches_fit():
    """A wide random LLaMA on the GPU: gram_device=cpu lowers the pass's peak by about the Grams'
    bytes, and the batch ``auto`` picks for a given free memory stays within it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from basis_sharing.calibration.batching import choose_batch_size, gram_bytes
    from basis_sharing.models.families import family_for_model_type

    config = LlamaConfig(
        vocab_size=4096,
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
    )
    model = LlamaForCausalLM(config).cuda().eval()
    family = family_for_model_type("llama")
    ids = torch.randint(0, 4096, (16, 512), device="cpu")
    every, one = gram_bytes(model, family, "float32")
    resident = _hooked_pass_peak(model, family, ids, 4)
    offloaded = _hooked_pass_peak(model, family, ids, 4, gram_store="cpu")
    assert resident - offloaded >= every - 2 * one  # one batch's products stay in flight
    budget = 2 * 2**30  # pretend 2 GiB are free
    choice = choose_batch_size(
        model, family, ids, torch.device("cuda"), "float32", 1.0, False, free=budget
    )
    assert choice.batch_size >= 1
    assert _hooked_pass_peak(model, family, ids, choice.batch_size) <= budget
