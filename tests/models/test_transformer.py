"""The transformer's attention always receives a mask, so the reference decoder and the captured step (which
always takes attention_mask) call the same SDPA kernel on CUDA."""

import pytest
import torch

import dlmc.models.transformer as transformer
from dlmc.models import load_model


@pytest.mark.parametrize("family", ["llada", "dream", "sdar"])
def test_sdpa_gets_a_mask_whether_or_not_the_caller_gives_one(family, checkpoints, monkeypatch):
    model = load_model(checkpoints[family], dtype=torch.float32)
    seen = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording_sdpa(q, k, v, attn_mask=None, **kwargs):
        seen.append(attn_mask)
        return real_sdpa(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(transformer.F, "scaled_dot_product_attention", recording_sdpa)
    ids = torch.randint(0, 50, (2, 6))  # [B, L] int64
    positions = torch.arange(6).expand(2, 6)  # [B, L] int64
    with torch.no_grad():
        unmasked = model(ids, None, positions)
        masked = model(ids, torch.ones(2, 6, dtype=torch.bool), positions)
    assert seen and all(m is not None and m.dtype == torch.bool and m.shape == (2, 1, 6, 6) for m in seen)
    # Same mask values, same kernel: the two calls are the same computation.
    assert torch.equal(unmasked, masked)
