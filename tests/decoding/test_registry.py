import subprocess
import sys

import pytest

from dlmc.decoding.diffusion_gemma import DiffusionGemmaConfig

from dlmc.decoding import DECODERS, default_decoder
from dlmc.decoding.block import BlockConfig
from dlmc.decoding.dream import DreamConfig
from dlmc.decoding.freedave import FreeDaveConfig
from dlmc.decoding.llada import LLaDAConfig
from dlmc.decoding.llada2 import LLaDA2Config, LLaDA2EditConfig
from dlmc.decoding.wedlm import WeDLMConfig
from tests.decoding.conftest import TinyDenoiser, toy_spec


def test_registry_is_closed_and_maps_names_to_config_and_function():
    assert set(DECODERS) == {"llada", "dream", "block", "wedlm", "llada2", "llada2_edit", "freedave",
                             "diffusion_gemma"}
    configs = [LLaDAConfig, DreamConfig, BlockConfig, WeDLMConfig, LLaDA2Config, LLaDA2EditConfig, FreeDaveConfig,
               DiffusionGemmaConfig]
    assert [config for config, _ in DECODERS.values()] == configs


@pytest.mark.parametrize(
    ("spec", "name"),
    [
        (toy_spec(), "llada"),
        (toy_spec(shift_logits=True), "dream"),
        (toy_spec(attention="block_causal", block_size=4, shift_logits=True), "block"),
        (toy_spec(attention="block_causal", block_size=4), "block"),
        (toy_spec(attention="causal"), "wedlm"),
    ],
)
def test_default_decoder_follows_the_spec(spec, name):
    assert default_decoder(spec) == name
    config_type, generate = DECODERS[name]
    out = generate(TinyDenoiser(spec), spec, [[1, 2, 3]], config_type(**_small(name)))
    assert len(out.output_ids[0]) == 4


def _small(name: str) -> dict:
    if name == "llada":
        return dict(gen_length=4, block_length=4, steps=4)
    if name == "block":
        return dict(gen_length=4)
    return dict(max_new_tokens=4, steps=4) if name == "dream" else dict(max_new_tokens=4)


def test_import_adds_nothing_beyond_torch():
    code = (
        "import sys, torch; before = set(sys.modules); import dlmc.decoding; "
        "print(sorted({m.split('.')[0] for m in set(sys.modules) - before}))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "['dlmc']"
