"""Load + forward parity for every family against an eager formula written here from the published
format (tensor names read straight from the safetensors files, not through the loader)."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from dlmc.models import load_model, read_model_config
from dlmc.testing.fixtures import FAMILIES, special_ids


def published_tensors(path):
    index = json.loads((path / "model.safetensors.index.json").read_text())
    weights = {}
    for shard in sorted(set(index["weight_map"].values())):
        weights |= load_file(path / shard)
    return {k: v.double() for k, v in weights.items()}


def rms(x, w, eps):
    return w * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps))


def rope(x, pos, theta):
    # x: [L, H, D], pos: [L]; rotate-half with frequencies theta^(-2i/D)
    d = x.shape[-1]
    freqs = pos[:, None].double() * theta ** (-torch.arange(0, d, 2).double() / d)  # [L, D/2]
    cos, sin = freqs.cos()[:, None], freqs.sin()[:, None]
    a, b = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], -1)


def reference_logits(family, cfg, w, ids, pos):
    """One sequence, float64, straight from the published names."""
    if family == "llada":
        pre, d, heads, kv, layers, eps, theta = "model.transformer.", cfg["d_model"], cfg["n_heads"], cfg["n_kv_heads"], cfg["n_layers"], cfg["rms_norm_eps"], cfg["rope_theta"]
        names = dict(emb=pre + "wte.weight", blk=pre + "blocks.{}.", an="attn_norm.weight", q="q_proj", k="k_proj", v="v_proj", o="attn_out",
                     fn="ff_norm.weight", gate="ff_proj", up="up_proj", down="ff_out", norm=pre + "ln_f.weight", head=pre + "ff_out.weight")
    else:
        d, heads, kv, layers, eps, theta = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["num_hidden_layers"], cfg["rms_norm_eps"], cfg["rope_theta"]
        names = dict(emb="model.embed_tokens.weight", blk="model.layers.{}.", an="input_layernorm.weight", q="self_attn.q_proj", k="self_attn.k_proj",
                     v="self_attn.v_proj", o="self_attn.o_proj", fn="post_attention_layernorm.weight", gate="mlp.gate_proj", up="mlp.up_proj",
                     down="mlp.down_proj", norm="model.norm.weight", head="lm_head.weight")
    hd = d // heads
    L = len(ids)
    if family in ("llada", "dream"):
        allowed = torch.ones(L, L, dtype=torch.bool)
    elif family == "wedlm":
        allowed = torch.ones(L, L, dtype=torch.bool).tril()
    else:
        bs = cfg["bd_size"] if family == "fast_dllm_v2" else cfg["block_size"]
        allowed = (pos[None, :] // bs) <= (pos[:, None] // bs)

    def lin(x, name):
        y = x @ w[name + ".weight"].T
        return y + w[name + ".bias"] if name + ".bias" in w else y

    x = w[names["emb"]][ids]
    for n in range(layers):
        b = names["blk"].format(n)
        h = rms(x, w[b + names["an"]], eps)
        q = lin(h, b + names["q"]).view(L, heads, hd)
        k = lin(h, b + names["k"]).view(L, kv, hd)
        v = lin(h, b + names["v"]).view(L, kv, hd)
        if b + "self_attn.q_norm.weight" in w:
            q, k = rms(q, w[b + "self_attn.q_norm.weight"], eps), rms(k, w[b + "self_attn.k_norm.weight"], eps)
        q, k = rope(q, pos, theta), rope(k, pos, theta)
        k, v = k.repeat_interleave(heads // kv, 1), v.repeat_interleave(heads // kv, 1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd)
        scores = scores.masked_fill(~allowed, float("-inf"))
        att = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(L, d)
        x = x + lin(att, b + names["o"])
        h = rms(x, w[b + names["fn"]], eps)
        x = x + lin(torch.nn.functional.silu(lin(h, b + names["gate"])) * lin(h, b + names["up"]), b + names["down"])
    return rms(x, w[names["norm"]], eps) @ w[names["head"]].T


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_matches_published_formula(checkpoints, family):
    path = checkpoints[family]
    cfg = json.loads((path / "config.json").read_text())
    model = load_model(path, dtype=torch.float64)
    ids = torch.tensor([5, 77, 9, 130, 200, 3, 42, 18, 99, 1, 64])
    pos = torch.arange(len(ids))
    expected = reference_logits(family, cfg, published_tensors(path), ids, pos)
    got = model(ids[None])[0]
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padding_with_positions_matches_unpadded(checkpoints, family):
    model = load_model(checkpoints[family], dtype=torch.float64)
    ids = torch.tensor([[5, 77, 9, 130, 200, 3, 42]])
    alone = model(ids)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
    mask = torch.tensor([[False] * 3 + [True] * 7])
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    torch.testing.assert_close(model(padded, mask, positions)[:, 3:], alone, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("family", FAMILIES)
def test_spec_read_from_config(checkpoints, family):
    _, arch, spec = read_model_config(checkpoints[family])
    expected = {"llada": ("bidirectional", None, False), "dream": ("bidirectional", None, True),
                "fast_dllm_v2": ("block_causal", 4, True), "sdar": ("block_causal", 4, False), "wedlm": ("causal", None, False)}
    assert (spec.attention, spec.block_size, spec.shift_logits) == expected[family]
    mask_token = {"llada": "<|mdm_mask|>", "dream": "<|mask|>", "fast_dllm_v2": "|<MASK>|", "sdar": "<MASK>", "wedlm": "<|mask|>"}[family]
    assert spec.mask_token_id == special_ids(family)[mask_token]
    assert spec.vocab_size == 272 and spec.max_length == 512
    assert arch.num_kv_heads == 2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_loads_in_checkpoint_dtype(tmp_path, dtype):
    from dlmc.testing.fixtures import write_checkpoint

    model = load_model(write_checkpoint("llada", tmp_path, dtype=dtype))
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert model(torch.tensor([[1, 2, 3]])).dtype == dtype


def test_parameters_are_not_copied_from_the_mmap_twice(checkpoints):
    model = load_model(checkpoints["llada"])
    assert not any(p.is_meta for p in model.parameters())
    assert model.num_parameters() == sum(t.numel() for t in published_tensors(checkpoints["llada"]).values())
