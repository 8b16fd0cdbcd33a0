"""`on_canvas` shows each step's canvas without changing what the decoders produce: the last canvas is
the output, and a position once decided keeps its token (what streaming the settled prefix relies on)."""

from itertools import pairwise

import pytest

from dlmc.decoding import CANVAS_DECODERS, DECODERS
from dlmc.decoding.dream import DreamConfig
from dlmc.decoding.llada import LLaDAConfig
from tests.decoding.conftest import MASK, TinyDenoiser, toy_spec

PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 1]]
CONFIGS = {
    "llada": LLaDAConfig(gen_length=8, block_length=4, steps=8, temperature=0.5),
    "dream": DreamConfig(max_new_tokens=8, steps=4, temperature=0.5),
}


@pytest.mark.parametrize("decoder", CANVAS_DECODERS)
def test_canvas_ends_at_the_output_and_decided_positions_stay(decoder):
    config, (_, generate) = CONFIGS[decoder], DECODERS[decoder]
    spec = toy_spec(shift_logits=decoder == "dream")
    model = TinyDenoiser(spec, seed=1)
    canvases = []
    result = generate(model, spec, PROMPTS, config, seed=2, on_canvas=lambda g: canvases.append(g.tolist()))
    assert result == generate(model, spec, PROMPTS, config, seed=2)  # the hook changes nothing
    assert len(canvases) == result.nfe and canvases[-1] == result.output_ids
    for before, after in pairwise(canvases):
        for row_before, row_after in zip(before, after):
            assert all(a == b for a, b in zip(row_after, row_before) if b != MASK)
