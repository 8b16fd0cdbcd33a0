"""The two DiffusionGemma programs as modules, against the reference (float64 fixture): the encoder step
over a cache that starts with masked slots builds the reference's cache, and the fused decoder iteration
computes the reference sampler's step from the same draws. (Their export and lowering:
tests/runtime/test_gemma_loop.py.)"""

import pytest
import torch

from dlmc.capture_gemma import DecoderStep, EncoderStep, empty_slots
from dlmc.decoding.common import left_pad
from dlmc.decoding.diffusion_gemma import DiffusionGemmaConfig, _Row, temperature
from dlmc.models import load_model
from dlmc.models.diffusion_gemma import GemmaCache
from dlmc.testing.gemma_fixtures import write_gemma_checkpoint
from tests.helpers import rounding_tolerance

PROMPTS = [[2, 10, 11, 12, 13, 14, 15], [2, 20, 21]]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_model(write_gemma_checkpoint(tmp_path_factory.mktemp("g"), dtype=torch.float64))


def padded():
    ids, mask, pos = left_pad([torch.tensor(p) for p in PROMPTS], 0)
    return ids, mask, pos


def program_cache(model, batch):
    """What the runtime starts from: empty_slots masked slots (a sliding layer's window - 1 of them)."""
    arch, empty = model.arch, empty_slots(model.arch)
    keys = [torch.zeros(batch, a.self_attn.kv_heads, arch.sliding_window - 1 if kind == "sliding_attention" else empty,
                        a.self_attn.head_dim, dtype=torch.float64) for a, kind in zip(model.layers, arch.layer_types)]
    mask = torch.zeros(batch, empty, dtype=torch.bool)
    return GemmaCache(keys, [k.clone() for k in keys], mask, torch.zeros_like(mask, dtype=torch.long))


def encode_with_program(model, ids, mask, pos, cache):
    n, arch = model.arch.num_layers, model.arch
    out = EncoderStep(model)(ids, mask, pos, cache.mask, cache.positions, *cache.keys, *cache.values)
    return cache.extend(out[:n], out[n:], mask, pos, arch.layer_types, arch.sliding_window)


def test_encoder_program_builds_the_reference_cache(model):
    ids, mask, pos = padded()
    with torch.no_grad():
        reference = model.encode(ids, mask, pos, model.empty_cache(2, "cpu"))
        ours = encode_with_program(model, ids, mask, pos, program_cache(model, 2))
        canvas = torch.randint(0, 160, (2, 8), generator=torch.Generator().manual_seed(0))
        canvas_pos = torch.tensor([[7], [3]]) + torch.arange(8)
        # a committed canvas encoded on top, then a decoder pass over each cache
        reference = model.encode(canvas, torch.ones_like(canvas, dtype=torch.bool), canvas_pos, reference)
        ours = encode_with_program(model, canvas, torch.ones_like(canvas, dtype=torch.bool), canvas_pos, ours)
        want = model.denoise(canvas, canvas_pos + 8, reference)
        got = model.denoise(canvas, canvas_pos + 8, ours)
    # the masked slots add exp(-inf) = 0 to each softmax: only the summation order differs
    tol = rounding_tolerance(torch.float64, model.arch.hidden_size, float(want.abs().max()))
    torch.testing.assert_close(got, want, atol=tol, rtol=0)
    for n, kind in enumerate(model.arch.layer_types):  # sliding layers keep window - 1 slots
        expected = model.arch.sliding_window - 1 if kind == "sliding_attention" else empty_slots(model.arch) + 7 + 8
        assert ours.keys[n].shape[2] == expected


def test_zero_soft_embedding_is_no_self_conditioning(model):
    ids, mask, pos = padded()
    with torch.no_grad():
        cache = model.encode(ids, mask, pos, model.empty_cache(2, "cpu"))
        canvas = torch.randint(0, 160, (2, 8), generator=torch.Generator().manual_seed(1))
        canvas_pos = torch.tensor([[7], [3]]) + torch.arange(8)
        zeros = torch.zeros(2, 8, model.arch.hidden_size, dtype=torch.float64)
        with_zeros = model.denoise(canvas, canvas_pos, cache, soft=zeros)
        assert torch.equal(with_zeros, model.denoise(canvas, canvas_pos, cache))


def test_decoder_iteration_is_the_reference_step(model):
    """Same canvas, cache, previous logits and draws: the fused iteration's outputs are the reference
    sampler's (canvas after acceptance and renoise, argmax, mean entropy) and its soft embedding gives the
    next step's logits that the previous logits give."""
    config = DiffusionGemmaConfig(max_denoising_steps=4)
    ids, mask, pos = padded()
    C, V = 8, model.spec.vocab_size
    with torch.no_grad():
        cache = model.encode(ids, mask, pos, model.empty_cache(2, "cpu"))
        canvas = torch.randint(0, V, (2, C), generator=torch.Generator().manual_seed(2))
        canvas_pos = torch.tensor([[7], [3]]) + torch.arange(C)
        previous = model.denoise(canvas, canvas_pos, cache) / 0.8  # [2, C, V]
        T = temperature(config, 3)
        rows = [_Row(torch.Generator().manual_seed(b), V, C, "cpu", 1) for b in range(2)]
        draws = [torch.Generator().manual_seed(b) for b in range(2)]
        for g in draws:
            torch.randint(0, V, (1, C), generator=g)  # what _Row drew for its initial canvas
        exponential = torch.stack([torch.empty(C, V).exponential_(1, generator=g) for g in draws])
        fresh = torch.stack([torch.randint(0, V, (1, C), generator=g)[0] for g in draws])
        for b, row in enumerate(rows):
            row.canvas = canvas[b]
        raw = model.denoise(canvas, canvas_pos, cache, previous)
        for b, row in enumerate(rows):
            row.step(raw[b].float() / T, config)
        soft = model.self_conditioning.soft(previous, model.embed_tokens.weight, model.embed_scale())
        outs = DecoderStep(model)(canvas, canvas_pos, cache.mask, cache.positions, *cache.keys, *cache.values, soft,
                                  T.reshape(1), torch.tensor([config.entropy_bound]), exponential, fresh)
        next_canvas, argmax, mean_entropy, next_soft = outs
        assert torch.equal(next_canvas, torch.stack([r.canvas for r in rows]))
        assert torch.equal(argmax, torch.stack([r.argmax for r in rows]))
        want = model.denoise(canvas, canvas_pos, cache, (raw.float() / T).double())  # the reference's sc_logits
        got = model.denoise(canvas, canvas_pos, cache, soft=next_soft)
    assert torch.equal(got, want)
    assert mean_entropy.dtype == torch.float32 and bool((mean_entropy > config.confidence_threshold).all())
