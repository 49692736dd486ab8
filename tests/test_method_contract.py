"""The contract every registered compressing method keeps, checked on a tiny model.

Planned parameters equal counted ones, the achieved ratio is within the tolerance, the rank plan
checked before loading predicts it exactly (where the plan needs only shapes), and the saved model
loads to the very same perplexities and the very same logits as the model the run compressed. The
methods come from the registry, so a newly registered method is picked up here without edits.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_VOCAB, compose_config, tiny_run_overrides

import basis_sharing.methods  # noqa: F401  (registers every method)
from basis_sharing import pipeline
from basis_sharing.evaluation.params import budget_ratio
from basis_sharing.methods.registry import METHODS
from basis_sharing.models.compressed_io import load_compressed

RATIO, TOLERANCE = 0.3, 0.05  # rank rounding on 64-wide matrices needs the wider tolerance
COMPRESSING = sorted(name for name, cls in METHODS.items() if cls.compresses)
EXTRA = {
    "asvd": ["method.sensitivity_samples=1", "method.candidate_ratios=[0.5,0.8]"],
    "fips": ["method.group_size=2", "method.steps=4", "method.batch_tokens=32"],
}
# The fixed batch the logits are compared on: (2, 24) token ids, within the 64-token context.
BATCH = torch.randint(0, TINY_VOCAB, (2, 24), generator=torch.Generator().manual_seed(10))


def test_every_compressing_method_is_covered():
    assert {"svd", "fwsvd", "asvd", "svd_llm", "basis_sharing", "fips"} <= set(COMPRESSING)
    assert "dense" not in COMPRESSING and "none" not in COMPRESSING


def capture_compressed(monkeypatch, cls: type) -> list:
    """The models ``cls.compress`` returns from, as the run compressed them (in place)."""
    compress, models = cls.compress, []

    def spy(self, model, family, ctx):
        info = compress(self, model, family, ctx)
        models.append(model)
        return info

    monkeypatch.setattr(cls, "compress", spy)
    return models


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model.eval()(BATCH).logits


@pytest.mark.parametrize("method", COMPRESSING)
def test_method_contract(method, tiny_model_dir, tiny_mirror, tmp_path, monkeypatch):
    common = tiny_run_overrides(
        tiny_model_dir,
        tiny_mirror,
        f"paths.cache_dir={tmp_path}/cache",
        "eval.ppl_datasets=[wikitext2]",
        "calibration=wikitext2_cpu",
        "calibration.n_samples=4",
        "calibration.seq_len=32",
        f"ratio={RATIO}",
        f"ratio_tolerance={TOLERANCE}",
    )
    common = [o for o in common if o != "method=dense"]
    cfg = compose_config(*common, f"method={method}", "save_model=true", *EXTRA.get(method, []))
    compressed = capture_compressed(monkeypatch, METHODS[method])
    saved = pipeline.run(cfg, out_dir=tmp_path / "save")
    params = saved["params"]
    assert params["planned_decoder_projections"] == params["decoder_projections"]
    # Over the kinds the method's ratio covers (FiPS: the MLP), every projection for the others.
    achieved = budget_ratio(params)
    assert abs(achieved - RATIO) <= TOLERANCE
    if "predicted_ratio" in saved["preflight"]:  # ASVD's sensitivity plan needs data
        assert saved["preflight"]["predicted_ratio"] == achieved
    else:
        assert method == "asvd"
    loaded = pipeline.run(
        compose_config(*common, "method=none", f"load_model={saved['saved_model']}"),
        out_dir=tmp_path / "load",
    )
    assert loaded["params"]["decoder_projections"] == params["decoder_projections"]
    assert loaded["metrics"]["perplexity"] == saved["metrics"]["perplexity"]
    # Bit for bit: the saved model computes exactly what the compressed one did.
    (model,) = compressed
    reloaded = load_compressed(saved["saved_model"]).model
    assert torch.equal(logits(reloaded), logits(model))
