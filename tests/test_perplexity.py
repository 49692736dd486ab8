"""Paper-protocol perplexity: exact oracles."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from conftest import make_tiny_model
from torch import nn

from basis_sharing.evaluation.perplexity import perplexity, window_bounds, window_nlls


class UniformLM(nn.Module):
    """Returns equal logits for every token: each next-token NLL is log(vocab)."""

    def __init__(self, vocab: int, dtype=torch.float64) -> None:
        super().__init__()
        self.vocab, self.dtype = vocab, dtype
        self.anchor = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, **_):
        b, t = input_ids.shape
        return SimpleNamespace(logits=torch.zeros(b, t, self.vocab, dtype=self.dtype))


@pytest.mark.parametrize("vocab", [7, 320, 49152])
def test_uniform_logits_give_vocab_size(vocab):
    ids = torch.randint(0, vocab, (1000,))
    result = perplexity(UniformLM(vocab), ids, context_length=64, batch_size=3)
    assert result.ppl == pytest.approx(vocab, rel=1e-12)
    assert result.mean_nll == pytest.approx(math.log(vocab), rel=1e-12)


def test_uniform_fp32_logits_are_scored_in_fp32():
    result = perplexity(UniformLM(320, torch.float32), torch.randint(0, 320, (300,)), 64)
    assert result.ppl == pytest.approx(320, rel=1e-6)


@pytest.mark.parametrize(
    "n,ctx", [(1, 4), (10, 5), (11, 5), (12, 5), (4096, 2048), (4097, 2048), (2047, 2048), (3, 2)]
)
def test_windows_cover_every_token_exactly_once(n, ctx):
    bounds = window_bounds(n, ctx)
    covered = [i for s, e in bounds for i in range(s, e)]
    assert covered == list(range(n))
    assert all(e - s == ctx for s, e in bounds[:-1])  # only the last window may be short
    assert 0 < bounds[-1][1] - bounds[-1][0] <= ctx


def test_window_nll_equals_transformers_loss_per_window():
    """Each window's NLL is the HF causal-LM loss on that window alone (batched or not)."""
    model = make_tiny_model("llama", dtype=torch.float64)
    ids = torch.randint(0, 320, (150,))
    bounds = window_bounds(150, 64)  # 64, 64, 22
    nll1 = window_nlls(model, ids, bounds, batch_size=1)
    nll2 = window_nlls(model, ids, bounds, batch_size=2)
    with torch.no_grad():
        oracle = [model(ids[s:e][None], labels=ids[s:e][None]).loss.item() for s, e in bounds]
    torch.testing.assert_close(nll1, torch.tensor(oracle, dtype=torch.float64), rtol=0, atol=1e-6)
    torch.testing.assert_close(nll1, nll2, rtol=0, atol=1e-10)


def test_ppl_is_exp_of_mean_window_nll_including_partial_window():
    model = make_tiny_model("gpt2", dtype=torch.float64)
    ids = torch.randint(0, 320, (150,))
    result = perplexity(model, ids, context_length=64, batch_size=2)
    nlls = window_nlls(model, ids, window_bounds(150, 64))
    assert result.n_windows == result.n_windows_evaluated == 3
    assert result.n_targets == 63 + 63 + 21
    assert result.ppl == pytest.approx(math.exp(nlls.mean().item()), rel=1e-12)
    assert not result.truncated and result.nonfinite_windows == 0


def test_max_windows_truncates_and_says_so():
    model = make_tiny_model("opt", dtype=torch.float64)
    ids = torch.randint(0, 320, (300,))
    full_nlls = window_nlls(model, ids, window_bounds(300, 64))
    result = perplexity(model, ids, context_length=64, max_windows=2)
    assert result.truncated and result.n_windows_evaluated == 2 and result.n_windows == 5
    assert result.ppl == pytest.approx(math.exp(full_nlls[:2].mean().item()), rel=1e-12)


def test_a_one_token_tail_is_not_a_window():
    """A final window of one token has nothing to predict; it is left out, not NaN."""
    result = perplexity(UniformLM(5), torch.zeros(129, dtype=torch.long), context_length=64)
    assert result.n_windows == 2 and math.isfinite(result.ppl)


def test_nonfinite_windows_are_counted_not_dropped():
    class Broken(UniformLM):
        def forward(self, input_ids, **kw):
            out = super().forward(input_ids)
            if input_ids[0, 0] == 1:
                out.logits[:] = float("nan")
            return out

    ids = torch.zeros(256, dtype=torch.long)
    ids[128] = 1
    result = perplexity(Broken(5), ids, context_length=64)
    assert result.nonfinite_windows == 1
    assert not math.isfinite(result.ppl)
