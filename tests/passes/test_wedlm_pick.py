"""pick_wedlm (the graph's fill rule) against the reference decoder's own functions, row by row, in
eager mode: the same ops in the same order, so tokens, entropies and fill decisions are equal."""

import pytest
import torch

from dlmc.decoding import wedlm
from dlmc.passes.wedlm_pick import pick_wedlm

V = 50


def batch(seed: int, masks: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [B, K, V] (K the most masks) and slots [B, K]: each row's masks at scattered logical
    positions, -1 on the padding rows of a row with fewer masks."""
    g = torch.Generator().manual_seed(seed)
    K = max(masks)
    logits = 2 * torch.randn(len(masks), K, V, generator=g)  # [B, K, V]
    slots = torch.full((len(masks), K), -1, dtype=torch.long)  # [B, K]
    for b, m in enumerate(masks):
        gaps = torch.randint(1, 3, (m,), generator=g)  # filled slots between masks
        slots[b, :m] = 10 + b + gaps.cumsum(0)
    return logits, slots


def settings(config: wedlm.WeDLMConfig) -> tuple[torch.Tensor, torch.Tensor]:
    threshold = config.entropy_threshold if config.entropy_threshold is not None else float("-inf")
    return torch.tensor([config.pos_penalty], dtype=torch.float64), torch.tensor([threshold], dtype=torch.float64)


@pytest.mark.parametrize("threshold", [None, 0.3, 2.8, 10.0])
def test_greedy_tokens_entropy_and_fill_are_the_references(threshold):
    config = wedlm.WeDLMConfig(entropy_threshold=threshold, pos_penalty=0.05)
    masks = [5, 2, 4]
    logits, slots = batch(0, masks)
    tokens, fill, entropy = pick_wedlm(logits, slots, *settings(config))
    several = False
    for b, m in enumerate(masks):
        rows = logits[b, :m]  # [m, V]
        assert torch.equal(tokens[b, :m], wedlm._sample(rows, config, torch.Generator()))
        expected_entropy = torch.distributions.Categorical(logits=rows).entropy()  # [m]
        assert torch.equal(entropy[b, :m], expected_entropy)
        chosen = wedlm._positions_to_fill(expected_entropy, slots[b, :m].tolist(), config)
        assert fill[b].nonzero().squeeze(1).tolist() == chosen  # never a padding row
        several |= len(chosen) > 1
    assert several == (threshold is not None and threshold > 1), "pick other thresholds"


@pytest.mark.parametrize("top_k, top_p", [(None, None), (7, None), (None, 0.8), (20, 0.6)])
def test_sampled_tokens_replay_the_references_draws(top_k, top_p):
    """The reference draws torch.multinomial(probs [m, V], 1) from the row's generator; the graph takes
    argmax(probs / q) with q the Exp(1) variates that call draws, replayed from a twin generator."""
    config = wedlm.WeDLMConfig(temperature=0.7, top_k=top_k, top_p=top_p)
    masks = [4, 3]
    logits, slots = batch(1, masks)
    noise = torch.ones_like(logits)  # [B, K, V]
    expected = []
    for b, m in enumerate(masks):
        expected.append(wedlm._sample(logits[b, :m], config, torch.Generator().manual_seed(b)))
        noise[b, :m] = torch.empty(m, V).exponential_(1, generator=torch.Generator().manual_seed(b))
    sampling = (
        torch.tensor([config.temperature], dtype=torch.float64),
        torch.tensor([top_k or V]),
        torch.tensor([top_p or float("inf")], dtype=torch.float64),
    )
    tokens, _, _ = pick_wedlm(logits, slots, *settings(config), noise, *sampling)
    for b, m in enumerate(masks):
        assert torch.equal(tokens[b, :m], expected[b])
    greedy = pick_wedlm(logits, slots, *settings(config))[0]
    assert not torch.equal(tokens, greedy), "the draws never moved a token: pick another seed"
    # temperature 0 takes the arg-max whatever the noise
    cold = pick_wedlm(logits, slots, *settings(config), noise, torch.zeros(1, dtype=torch.float64), *sampling[1:])
    assert torch.equal(cold[0], greedy)
