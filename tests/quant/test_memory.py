from pathlib import Path

import pytest

from dlmc.generation import default_model_dir
from dlmc.models import load_model, read_model_config
from dlmc.models.gemma4 import Gemma4Config
from dlmc.models.moe import MoEConfig
from dlmc.models.transformer import ArchConfig
from dlmc.quant.memory import GIB, kv_cache_bytes, linear_shapes, memory_budget, weight_bytes
from dlmc.quant.scheme import Scheme
from dlmc.recipe import load_recipe
from dlmc.testing.gemma_fixtures import write_gemma_checkpoint

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


# DiffusionGemma-26B-A4B (research note model-formats-wave2.md, section 3.2)
GEMMA_TYPES = (("sliding_attention",) * 5 + ("full_attention",)) * 5
GEMMA_26B = Gemma4Config(
    hidden_size=2816, vocab_size=262144, layer_types=GEMMA_TYPES, num_heads=16,
    head_dims=tuple(512 if t == "full_attention" else 256 for t in GEMMA_TYPES),
    kv_heads=tuple(2 if t == "full_attention" else 8 for t in GEMMA_TYPES), intermediate_size=2112,
    num_experts=128, top_k=8, expert_size=704, rms_norm_eps=1e-6, sliding_window=1024,
    rope_theta={"sliding_attention": 1e4, "full_attention": 1e6},
    rope_fraction={"sliding_attention": 1.0, "full_attention": 0.25},
)


def gemma_hand_count(experts_per_layer):
    """(quantizable linear params, float params) written out from the published shapes."""
    d = 2816
    sliding = 25 * (4096 * d + 2048 * d + 2048 * d + d * 4096)  # q, k, v, o
    full = 5 * (8192 * d + 1024 * d + d * 8192)  # q, k (= v), o
    dense = 31 * 3 * 2112 * d  # 30 layers' dense MLP + the self-conditioning MLP
    experts = 30 * experts_per_layer * (1408 * d + d * 704)
    norms = 30 * (7 * d + 2) + 25 * 2 * 256 + 5 * 2 * 512 + 2 * d  # + layer scalars, q/k norms, final, sc
    routers = 30 * (128 * d + d + 128)
    return sliding + full + dense + experts, 262144 * d + norms + routers


def test_gemma_float_weight_bytes_equal_the_model_parameters(tmp_path):
    path = write_gemma_checkpoint(tmp_path)
    _, arch, _ = read_model_config(path)
    assert weight_bytes(arch, None) == 2 * sum(p.numel() for p in load_model(path).parameters())


def test_gemma_26b_budgets_match_a_hand_count():
    linear, floats = gemma_hand_count(128)
    active, _ = gemma_hand_count(8)
    assert (linear + floats) / 1e9 == pytest.approx(25.25, abs=0.01)  # "26B" with the vision tower
    assert (active + floats) / 1e9 == pytest.approx(3.84, abs=0.01)  # "A4B"
    assert weight_bytes(GEMMA_26B, None) == 2 * (linear + floats)
    assert weight_bytes(GEMMA_26B, None, active=True) == 2 * (active + floats)
    rows = sum(out for out, _ in linear_shapes(GEMMA_26B))
    assert weight_bytes(GEMMA_26B, Scheme(activations="per_token")) == linear + 2 * rows + 2 * floats
    assert weight_bytes(GEMMA_26B, Scheme(weights="int4", group_size=64)) == linear // 2 + 2 * linear // 64 + 2 * floats
    # encoder cache: sliding layers keep 1023 positions, full layers every one
    per_token_full, per_token_sliding = 5 * 2 * 2 * 512, 25 * 2 * 8 * 256
    assert kv_cache_bytes(GEMMA_26B, batch=2, seq=4096) == 2 * 2 * (4096 * per_token_full + 1023 * per_token_sliding)


def test_gemma_rtx_recipe_parses_and_fits_as_its_header_says():
    path = Path(__file__).parents[2] / "recipes" / "gemma-26b-rtx4090-w4a16.yaml"
    recipe = load_recipe(path)
    header = path.read_text()
    assert "NOT RUN" in header and "not run" in recipe.description
    assert recipe.decode.decoder == "diffusion_gemma" and recipe.capture.dtype == "bfloat16"
    card = 24 * GIB
    scheme = recipe.passes[-1].scheme
    budgets = {name: memory_budget(GEMMA_26B, s, batch=1, seq=4096)
               for name, s in (("bf16", None), ("w8a8", Scheme(activations="per_token")), ("w4a16", scheme))}
    assert budgets["bf16"].total > card and budgets["w8a8"].total > card
    assert budgets["w4a16"].total + GIB < card  # a GiB of logits and sampler temporaries per row on top
    for name, figure in (("bf16", "47.03"), ("W8A8", "24.25"), ("W4A16", "13.52")):
        weights = budgets[name.lower()].weights / GIB
        assert f"{name}" in header and f"{weights:.2f}" == figure and figure in header
