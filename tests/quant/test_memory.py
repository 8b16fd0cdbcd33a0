import pytest

from dlmc.generation import default_model_dir
from dlmc.models import load_model, read_model_config
from dlmc.quant.memory import GIB, kv_cache_bytes, memory_budget, weight_bytes
from dlmc.quant.scheme import Scheme
from dlmc.models.transformer import ArchConfig

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
