import pytest

from dlmc.generation import default_model_dir
from dlmc.models import load_model, read_model_config
from dlmc.models.moe import MoEConfig
from dlmc.models.transformer import ArchConfig
from dlmc.quant.memory import GIB, kv_cache_bytes, linear_shapes, memory_budget, weight_bytes
from dlmc.quant.scheme import Scheme

# LLaDA-8B (config.json of GSAI-ML/LLaDA-8B-Instruct): d 4096, 32 layers, 32 heads, MLP 12288, vocab 126464
LLADA_8B = ArchConfig(hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128,
                      intermediate_size=12288, vocab_size=126464, rms_norm_eps=1e-5, rope_theta=500000.0)


def test_float_weight_bytes_equal_the_model_parameters():
    _, arch, _ = read_model_config(default_model_dir())
    params = sum(p.numel() for p in load_model(default_model_dir()).parameters())
    assert weight_bytes(arch, None) == 2 * params


def test_llada_8b_budgets():
    fp16 = memory_budget(LLADA_8B, None)
    w4 = memory_budget(LLADA_8B, Scheme(weights="int4", group_size=128))
    w8 = memory_budget(LLADA_8B, Scheme(activations="per_token"))
    assert fp16.total / GIB == pytest.approx(14.9, abs=0.1)  # 8.0B parameters x 2 bytes
    # 6.98B linear weights at 4 bits + an fp16 scale per 128 (3.35 GiB) + 1.04B embedding/head params in fp16 (1.93 GiB)
    assert w4.total / GIB == pytest.approx(5.28, abs=0.01)
    assert w8.total / GIB < fp16.total / GIB * 0.6
    # KV cache for a 4096-token window (prefix/dual cache passes), fp16
    assert kv_cache_bytes(LLADA_8B, batch=1, seq=4096) == 2 * 32 * 32 * 128 * 4096 * 2


# The published configs (research note model-formats-wave2.md, sections 1.1 and 2.1; vocab 157184)
def moe_arch(d, layers, heads, kv, dense, experts, top_k, width, shared, moe_layers, bias, groups=1, kept=1):
    moe = MoEConfig(num_experts=experts, top_k=top_k, expert_size=width, layers=moe_layers, shared_size=shared,
                    expert_bias=bias, num_groups=groups, topk_groups=kept)
    return ArchConfig(hidden_size=d, num_layers=layers, num_heads=heads, num_kv_heads=kv, head_dim=128,
                      intermediate_size=dense, vocab_size=157184, rms_norm_eps=1e-6, rope_theta=6e5, qk_norm=True,
                      fused_qkv=bias, moe=moe)


MINI = moe_arch(2048, 20, 16, 4, 5120, 256, 8, 512, 512, tuple(range(1, 20)), True, 8, 4)
FLASH = moe_arch(4096, 32, 32, 4, 9216, 256, 8, 1024, 1024, tuple(range(1, 32)), True, 8, 4)
LLADA_MOE = moe_arch(2048, 16, 16, 16, 8192, 64, 8, 1024, None, tuple(range(16)), False)


def hand_count(d, layers, heads, kv, dense, experts, top_k, width, shared, moe_layers, bias):
    """(quantizable linear params, of which experts, float params), written out from the config numbers."""
    attention = layers * ((heads + 2 * kv) * 128 * d + d * heads * 128)
    dense_mlp = (layers - moe_layers) * 3 * dense * d
    expert = moe_layers * experts * 3 * width * d
    shared_mlp = moe_layers * 3 * (shared or 0) * d
    floats = 2 * 157184 * d + d * (2 * layers + 1) + 2 * 128 * layers + moe_layers * experts * (d + bias)
    return attention + dense_mlp + expert + shared_mlp, expert, floats


HAND = {  # name: (arch, hand count, published size in billions of parameters: total, active)
    "LLaDA2.0-mini": (MINI, hand_count(2048, 20, 16, 4, 5120, 256, 8, 512, 512, 19, 1), 16.3),
    "LLaDA2.0-flash": (FLASH, hand_count(4096, 32, 32, 4, 9216, 256, 8, 1024, 1024, 31, 1), 103),
    "LLaDA-MoE-7B-A1B": (LLADA_MOE, hand_count(2048, 16, 16, 16, 8192, 64, 8, 1024, None, 16, 0), 7.36),
}


@pytest.mark.parametrize("name", HAND)
def test_moe_budgets_match_a_hand_count(name):
    arch, (linear, experts, floats), billions = HAND[name]
    assert (linear + floats) / 1e9 == pytest.approx(billions, rel=0.01)  # the models' advertised sizes
    active_linear = linear - experts + experts * 8 // arch.moe.num_experts  # top-8 of the experts
    assert weight_bytes(arch, None) == 2 * (linear + floats)
    assert weight_bytes(arch, None, active=True) == 2 * (active_linear + floats)
    # W8A16 per channel: 1 byte per weight + one 2-byte scale per output row
    rows = sum(out for out, _ in linear_shapes(arch))
    assert weight_bytes(arch, Scheme(weights="int8")) == linear + 2 * rows + 2 * floats
    # W4A16, groups of 128: half a byte per weight + a 2-byte scale per 128 (every input width divides)
    assert weight_bytes(arch, Scheme(weights="int4", group_size=128)) == linear // 2 + 2 * linear // 128 + 2 * floats


def test_moe_budget_figures():
    # The README's table (bf16 / W8A16 per channel / W4A16 g128); exact values: test_moe_budgets_match_a_hand_count
    figures = {name: [memory_budget(arch, s) for s in (None, Scheme(weights="int8"),
                                                       Scheme(weights="int4", group_size=128))]
               for name, (arch, _, _) in HAND.items()}
    gib = {name: [round(b.weights / GIB, 1) for b in budgets] for name, budgets in figures.items()}
    active = {name: [round(b.active / GIB, 2) for b in budgets] for name, budgets in figures.items()}
    assert gib == {"LLaDA2.0-mini": [30.3, 15.8, 8.7], "LLaDA2.0-flash": [191.6, 97.1, 51.2],
                   "LLaDA-MoE-7B-A1B": [13.7, 7.5, 4.4]}
    assert active == {"LLaDA2.0-mini": [2.67, 1.94, 1.59], "LLaDA2.0-flash": [11.46, 6.96, 4.78],
                      "LLaDA-MoE-7B-A1B": [3.2, 2.2, 1.72]}
    assert "read per token" in figures["LLaDA2.0-mini"][0].describe()


def test_moe_float_weight_bytes_equal_the_model_parameters(moe_checkpoints):
    for path in moe_checkpoints.values():
        _, arch, _ = read_model_config(path)
        params = sum(p.numel() for p in load_model(path).parameters())
        assert weight_bytes(arch, None) == 2 * params
