"""NucleusSampler keeps the tokens transformers' top-p keeps, and draws from their distribution."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

from harmaug_pl.backends.nucleus import NucleusSampler


def _reference_nucleus(scores: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """transformers' own warpers, in generate's order: the kept tokens as a boolean mask."""
    warped = TemperatureLogitsWarper(temperature)(None, scores.clone())
    return TopPLogitsWarper(top_p)(None, warped).isfinite()


@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.5])
@pytest.mark.parametrize("top_p", [0.5, 0.95, 0.999])
@pytest.mark.parametrize("spread", [0.5, 3.0, 8.0])  # flat logits need more than the first candidates
def test_same_tokens_as_transformers_top_p(temperature: float, top_p: float, spread: float) -> None:
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(16, 5000, generator=generator) * spread
    sampler = NucleusSampler(temperature, top_p, first_candidates=32)
    ids, weights = sampler.nucleus(scores)
    mask = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, ids, weights > 0)
    differ = mask != _reference_nucleus(scores, temperature, top_p)
    # Both sum float32 probabilities, in opposite orders: they may only disagree on a token whose more
    # likely tokens hold top_p of the mass up to rounding.
    probs = (scores / temperature).softmax(-1)
    for row, token in differ.nonzero().tolist():
        above = probs[row][probs[row] > probs[row, token]].sum()
        assert abs(float(above) - top_p) < 1e-5, (row, token, float(above))
    assert float((probs * differ).sum(-1).max()) < 1e-4  # what such tokens weigh, per row


def test_draws_follow_the_renormalised_nucleus() -> None:
    scores = torch.tensor([[2.0, 1.5, 1.0, 0.0, -1.0, -3.0, -6.0]])
    temperature, top_p, draws = 0.8, 0.9, 20000
    kept = _reference_nucleus(scores, temperature, top_p)[0]
    expected = (scores[0] / temperature).softmax(-1) * kept
    expected /= expected.sum()
    sampler = NucleusSampler(temperature, top_p, first_candidates=2)
    torch.manual_seed(1)
    batch = scores.expand(draws, -1)
    out = sampler(torch.zeros(draws, 1, dtype=torch.long), batch)
    assert bool((out.isfinite().sum(-1) == 1).all()), "exactly one token is left per row"
    chosen = out.argmax(-1)
    observed = torch.bincount(chosen, minlength=scores.shape[-1]).float() / draws
    assert observed[~kept].sum() == 0, "a token outside the nucleus was drawn"
    assert (observed - expected).abs().sum() / 2 < 0.02  # total variation distance


def test_top_p_one_keeps_every_token() -> None:
    scores = torch.randn(4, 300)
    ids, weights = NucleusSampler(1.0, 1.0).nucleus(scores)
    assert bool((weights > 0).all()) and torch.equal(ids[0], torch.arange(300))


@pytest.mark.parametrize(("temperature", "top_p"), [(0.0, 0.9), (1.0, 0.0), (1.0, 1.5)])
def test_rejects_settings_that_cannot_sample(temperature: float, top_p: float) -> None:
    with pytest.raises(ValueError):
        NucleusSampler(temperature, top_p)
