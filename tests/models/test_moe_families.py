"""Load + forward parity for the mixture-of-experts families against an eager formula written here from
the published format: tensor names read straight from the safetensors files, the router token by token
(LLaDA2: sigmoid, expert bias for the choice only, group-limited, renormalised, x routed_scaling_factor,
shared expert, dense first layer; LLaDA-MoE: softmax, no renormalisation; SDAR-MoE: softmax, renormalised)."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from dlmc.models import load_model, read_model_config
from dlmc.testing.fixtures import MOE_FAMILIES
from dlmc.testing.moe_fixtures import special_ids
from tests.models.test_families import published_tensors, rms, rope

IDS = torch.tensor([5, 77, 9, 130, 200, 3, 42, 18, 99, 1, 64] * 4)  # 44 rows: LLaDA2's 32-blocks matter


class Router:
    """The published routing rules, one token at a time; counts the choices the bias and the groups change."""

    def __init__(self, family, cfg):
        self.family, self.cfg = family, cfg
        self.changed_by_bias = self.changed_by_groups = 0

    def choose(self, h, w, p):
        cfg, k = self.cfg, self.cfg["num_experts_per_tok"]
        logits = h @ w[p + "mlp.gate.weight"].T  # [E]
        if self.family != "llada2":
            scores = logits.softmax(-1)
            chosen = sorted(range(len(scores)), key=lambda e: -scores[e])[:k]
            weights = scores[chosen]
            return chosen, weights / weights.sum() if cfg["norm_topk_prob"] and self.family == "sdar_moe" else weights
        scores = logits.sigmoid()
        biased = scores + w[p + "mlp.gate.expert_bias"]
        per = len(scores) // cfg["n_group"]
        groups = [sorted(biased[g * per:(g + 1) * per].tolist(), reverse=True) for g in range(cfg["n_group"])]
        kept = sorted(range(cfg["n_group"]), key=lambda g: -(groups[g][0] + groups[g][1]))[: cfg["topk_group"]]
        candidates = [e for e in range(len(scores)) if e // per in kept]
        chosen = sorted(candidates, key=lambda e: -biased[e])[:k]
        self.changed_by_bias += set(chosen) != set(sorted(candidates, key=lambda e: -scores[e])[:k])
        self.changed_by_groups += set(chosen) != set(sorted(range(len(scores)), key=lambda e: -biased[e])[:k])
        weights = scores[chosen]
        return chosen, weights / weights.sum() * cfg["routed_scaling_factor"]


def swiglu(x, w, p):
    return (F.silu(x @ w[p + "gate_proj.weight"].T) * (x @ w[p + "up_proj.weight"].T)) @ w[p + "down_proj.weight"].T


def reference_logits(family, cfg, w, ids, router):
    """One sequence, float64, straight from the published names."""
    d, heads, kv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    eps, theta, hd = cfg["rms_norm_eps"], cfg["rope_theta"], cfg.get("head_dim") or d // heads
    L, pos = len(ids), torch.arange(len(ids))
    rd = int(hd * cfg.get("partial_rotary_factor", 1.0))
    allowed = torch.ones(L, L, dtype=torch.bool)
    if family != "llada_moe":
        bs = cfg.get("block_size", 32)
        allowed = (pos[None, :] // bs) <= (pos[:, None] // bs)
    x = w["model.word_embeddings.weight" if family == "llada2" else "model.embed_tokens.weight"][ids]
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        h = rms(x, w[p + "input_layernorm.weight"], eps)
        if family == "llada2":
            qkv = (h @ w[p + "attention.query_key_value.weight"].T).view(L, heads + 2 * kv, hd)
            q, k, v = qkv[:, :heads], qkv[:, heads:heads + kv], qkv[:, heads + kv:]
            q = rms(q, w[p + "attention.query_layernorm.weight"], eps)
            k = rms(k, w[p + "attention.key_layernorm.weight"], eps)
            out = p + "attention.dense.weight"
        else:
            q = (h @ w[p + "self_attn.q_proj.weight"].T).view(L, heads, hd)
            k = (h @ w[p + "self_attn.k_proj.weight"].T).view(L, kv, hd)
            v = (h @ w[p + "self_attn.v_proj.weight"].T).view(L, kv, hd)
            q, k = rms(q, w[p + "self_attn.q_norm.weight"], eps), rms(k, w[p + "self_attn.k_norm.weight"], eps)
            out = p + "self_attn.o_proj.weight"
        q = torch.cat([rope(q[..., :rd], pos, theta), q[..., rd:]], -1)  # partial RoPE: the first rd dims
        k = torch.cat([rope(k[..., :rd], pos, theta), k[..., rd:]], -1)
        k, v = k.repeat_interleave(heads // kv, 1), v.repeat_interleave(heads // kv, 1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd)
        att = torch.einsum("hqk,khd->qhd", scores.masked_fill(~allowed, float("-inf")).softmax(-1), v)
        x = x + att.reshape(L, heads * hd) @ w[out].T
        h = rms(x, w[p + "post_attention_layernorm.weight"], eps)
        if p + "mlp.gate.weight" not in w:  # LLaDA2's first_k_dense_replace layers
            x = x + swiglu(h, w, p + "mlp.")
            continue
        y = torch.zeros_like(h)
        for t in range(L):
            chosen, weights = router.choose(h[t], w, p)
            for e, weight in zip(chosen, weights):
                y[t] += weight * swiglu(h[t], w, p + f"mlp.experts.{e}.")
        if family == "llada2":
            y = y + swiglu(h, w, p + "mlp.shared_experts.")
        x = x + y
    return rms(x, w["model.norm.weight"], eps) @ w["lm_head.weight"].T


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_forward_matches_published_formula(moe_checkpoints, family):
    path = moe_checkpoints[family]
    cfg = json.loads((path / "config.json").read_text())
    router = Router(family, cfg)
    expected = reference_logits(family, cfg, published_tensors(path), IDS, router)
    got = load_model(path, dtype=torch.float64)(IDS[None])[0]
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
    if family == "llada2":  # the fixture exercises both rules: without them other experts would be chosen
        assert router.changed_by_bias > 0 and router.changed_by_groups > 0


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_left_padding_with_positions_matches_unpadded(moe_checkpoints, family):
    model = load_model(moe_checkpoints[family], dtype=torch.float64)
    ids = torch.tensor([[5, 77, 9, 130, 200, 3, 42]])
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
    mask = torch.tensor([[False] * 3 + [True] * 7])
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    torch.testing.assert_close(model(padded, mask, positions)[:, 3:], model(ids), rtol=1e-9, atol=1e-9)


def test_specs_read_from_config(moe_checkpoints):
    expected = {"llada_moe": ("bidirectional", None), "llada2": ("block_causal", 32), "sdar_moe": ("block_causal", 4)}
    for family, path in moe_checkpoints.items():
        _, arch, spec = read_model_config(path)
        assert (spec.family, spec.attention, spec.block_size, spec.shift_logits) == (family, *expected[family], False)
        mask = "<MASK>" if family == "sdar_moe" else "<|mask|>"
        assert spec.mask_token_id == special_ids(family)[mask]
        assert spec.eos_token_id == special_ids(family)["<|endoftext|>"]


def test_loads_in_checkpoint_dtype_with_experts_stacked(tmp_path):
    from dlmc.testing.fixtures import write_checkpoint

    model = load_model(write_checkpoint("llada2", tmp_path, layers=2, dtype=torch.bfloat16))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert tuple(model.layers[1].mlp.experts_down.shape) == (8, 32, 64)  # [E, expert width, hidden]: [in, out]
    assert model(torch.tensor([[1, 2, 3]])).dtype == torch.bfloat16
