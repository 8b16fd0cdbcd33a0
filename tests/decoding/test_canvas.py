"""`on_canvas` shows each step's canvas without changing what the decoders produce: the last canvas is
the output (undecided positions as the fill id), and a position once decided keeps its token (what
streaming the settled prefix relies on)."""

from itertools import pairwise

import pytest
import torch

from dlmc.decoding import CANVAS_DECODERS, DECODERS
from dlmc.decoding.block import BlockConfig
from dlmc.decoding.common import fill_undecided
from dlmc.decoding.dream import DreamConfig
from dlmc.decoding.llada import LLaDAConfig
from dlmc.decoding.llada2 import LLaDA2Config, LLaDA2EditConfig
from dlmc.decoding.wedlm import WeDLMConfig
from tests.decoding.conftest import MASK, TinyDenoiser, toy_spec

PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 1]]
BLOCK_CAUSAL = {"attention": "block_causal", "block_size": 4}
CASES = {
    "llada": ("llada", {}, LLaDAConfig(gen_length=8, block_length=4, steps=8, temperature=0.5)),
    "dream": ("dream", {"shift_logits": True}, DreamConfig(max_new_tokens=8, steps=4, temperature=0.5)),
    "fast_dllm_v2": (
        "block", BLOCK_CAUSAL | {"shift_logits": True},
        BlockConfig(gen_length=10, threshold=0.2, sub_block_length=2, temperature=0.8, top_p=0.9),
    ),
    "sdar": (
        "block", BLOCK_CAUSAL,
        BlockConfig(gen_length=9, remasking="low_confidence_static", denoising_steps=2, temperature=0.7, top_k=6),
    ),
    "llada2": ("llada2", BLOCK_CAUSAL, LLaDA2Config(gen_length=10, threshold=0.3, temperature=0.8, top_p=0.9)),
    "llada2_edit": (
        "llada2_edit", BLOCK_CAUSAL,
        LLaDA2EditConfig(gen_length=10, threshold=0.3, editing_threshold=0.2, temperature=0.8, max_post_steps=2),
    ),
    "wedlm": ("wedlm", {"attention": "causal"}, WeDLMConfig(max_new_tokens=10, window_size=4, temperature=0.8)),
}


def test_every_canvas_decoder_has_a_case():
    assert {decoder for decoder, _, _ in CASES.values()} == set(CANVAS_DECODERS)


@pytest.mark.parametrize("case", CASES)
def test_canvas_ends_at_the_output_and_decided_positions_stay(case):
    decoder, overrides, config = CASES[case]
    spec, (_, generate) = toy_spec(**overrides), DECODERS[decoder]
    model = TinyDenoiser(spec, seed=1)
    canvases = []
    result = generate(model, spec, PROMPTS, config, seed=2, on_canvas=lambda g: canvases.append(g.tolist()))
    assert result == generate(model, spec, PROMPTS, config, seed=2)  # the hook changes nothing
    assert len(canvases) == result.nfe and fill_undecided(torch.tensor(canvases[-1]), spec) == result.output_ids
    for before, after in pairwise(canvases):
        for row_before, row_after in zip(before, after):
            assert all(a == b for a, b in zip(row_after, row_before) if b != MASK)
