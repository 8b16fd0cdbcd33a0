"""Tiny random checkpoints of the mixture-of-experts families in their published Hugging Face format:
LLaDA-MoE (LLaDAMoEModelLM), LLaDA2.0/2.1 (LLaDA2MoeModelLM) and SDAR-MoE (SDARMoeForCausalLM).

As in fixtures.py, tensor names and config fields are written out from the published formats, not
taken from the loader's name tables. `dlmc.testing.fixtures.write_checkpoint` dispatches here.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from dlmc.testing import fixtures

# The Ling (Bailing) tokenizer's special tokens that LLaDA-MoE and LLaDA2 read, in its order.
LING_SPECIALS = ["<|startoftext|>", "<|endoftext|>", "<|role_start|>", "<|mask|>", "<|role_end|>"]
EXPERTS = 8


def special_ids(family: str) -> dict[str, int]:
    specials = fixtures.QWEN_SPECIALS["sdar"] if family == "sdar_moe" else LING_SPECIALS
    return {tok: fixtures.BYTE_VOCAB + i for i, tok in enumerate(specials)}


def write_moe_checkpoint(
    family: str, out: Path, *, hidden, layers, heads, kv_heads, intermediate, vocab, max_length, block_size,
    dtype, shards, seed, tokenizer, chat_template, experts: int = EXPERTS, top_k: int | None = None,
    first_dense: int = 1, expert_size: int | None = None,
) -> Path:
    """`experts`, `top_k` (None: the family's fixture default), `expert_size` (None: intermediate // 3) and
    LLaDA2's `first_dense` layers size the MoE part (benchmarks/moe_step.py builds bigger ones)."""
    ids = special_ids(family)
    hd = hidden // heads
    expert = expert_size or intermediate // 3
    if family == "llada_moe":
        config = _llada_moe_config(hidden, layers, heads, kv_heads, intermediate, expert, vocab, max_length, ids)
        tensors = _olmoe_tensors(hidden, layers, heads, kv_heads, hd, expert, vocab, experts)
    elif family == "llada2":
        config = _llada2_config(hidden, layers, heads, kv_heads, hd, intermediate, expert, vocab, max_length, ids)
        config["first_k_dense_replace"] = first_dense
        tensors = _llada2_tensors(
            hidden, layers, heads, kv_heads, hd, intermediate, expert, vocab, experts, first_dense
        )
    elif family == "sdar_moe":
        config = _sdar_moe_config(hidden, layers, heads, kv_heads, hd, intermediate, expert, vocab, max_length,
                                  block_size, ids)
        tensors = _olmoe_tensors(hidden, layers, heads, kv_heads, hd, expert, vocab, experts)
    else:
        raise ValueError(f"unknown family {family}")
    config["num_experts"] = experts
    config["num_experts_per_tok"] = top_k or config["num_experts_per_tok"]
    generator = torch.Generator().manual_seed(seed)
    weights = {name: fixtures._init(name, shape, generator).to(dtype) for name, shape in tensors.items()}
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(config, indent=2))
    fixtures._write_shards(out, weights, shards)
    if tokenizer:
        if family == "sdar_moe":
            fixtures._write_tokenizer("sdar", out, ids, chat_template)
        else:
            _write_ling_tokenizer(out, ids, chat_template)
    return out


def _llada_moe_config(hidden, layers, heads, kv_heads, intermediate, expert, vocab, max_length, ids) -> dict:
    """The field set of LLaDA-MoE-7B-A1B's config.json (configuration_lladamoe.py)."""
    return {
        "architectures": ["LLaDAMoEModelLM"],
        "auto_map": {
            "AutoConfig": "configuration_lladamoe.LLaDAMoEConfig",
            "AutoModel": "modeling_lladamoe.LLaDAMoEModelLM",
            "AutoModelForCausalLM": "modeling_lladamoe.LLaDAMoEModelLM",
        },
        "model_type": "llada",  # as published: the same as dense LLaDA's
        "attention_bias": False,
        "attention_dropout": 0.0,
        "clip_qkv": None,
        "dense_intermediate_size": intermediate,
        "eos_token_id": ids["<|endoftext|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "expert_intermediate_size": expert,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "max_position_embeddings": max_length,
        "moe_layer_freq": [1] * layers,
        "moe_router_enable_expert_bias": None,
        "moe_router_score_function": "softmax",
        "norm_topk_prob": False,
        "num_attention_heads": heads,
        "num_experts": EXPERTS,
        "num_experts_per_tok": 3,
        "num_hidden_layers": layers,
        "num_key_value_heads": kv_heads,
        "output_router_logits": False,
        "partial_rotary_factor": 1.0,
        "qk_layernorm": True,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 50000,
        "routed_scaling_factor": 1,
        "router_aux_loss_coef": 0.01,
        "router_num_group": None,
        "router_topk_group": None,
        "shared_expert_intermediate_size": None,
        "tie_word_embeddings": False,
        "transformers_version": "4.48.0",
        "use_cache": False,
        "vocab_size": vocab,
    }


def _llada2_config(hidden, layers, heads, kv_heads, hd, intermediate, expert, vocab, max_length, ids) -> dict:
    """The field set of LLaDA2.0-mini's / LLaDA2.1-mini's config.json (configuration_llada2_moe.py)."""
    return {
        "architectures": ["LLaDA2MoeModelLM"],
        "auto_map": {
            "AutoConfig": "configuration_llada2_moe.LLaDA2MoeConfig",
            "AutoModel": "modeling_llada2_moe.LLaDA2MoeModel",
            "AutoModelForCausalLM": "modeling_llada2_moe.LLaDA2MoeModelLM",
        },
        "model_type": "llada2_moe",
        "attention_dropout": 0.0,
        "embedding_dropout": 0.0,
        "first_k_dense_replace": 1,
        "head_dim": hd,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.006,
        "intermediate_size": intermediate,
        "max_position_embeddings": max_length,
        "max_window_layers": layers,
        "moe_intermediate_size": expert,
        "moe_router_enable_expert_bias": True,
        "n_group": 4,
        "norm_head": False,
        "norm_softmax": False,
        "norm_topk_prob": True,
        "num_attention_heads": heads,
        "num_experts": EXPERTS,
        "num_experts_per_tok": 2,
        "num_hidden_layers": layers,
        "num_key_value_heads": kv_heads,
        "num_shared_experts": 1,
        "output_dropout": 0.0,
        "output_router_logits": False,
        "pad_token_id": ids["<|endoftext|>"],
        "partial_rotary_factor": 0.5,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 600000,
        "rotary_dim": hd // 2,
        "routed_scaling_factor": 2.5,
        "router_dtype": "fp32",
        "score_function": "sigmoid",
        "sliding_window": 4096,
        "tie_word_embeddings": False,
        "topk_group": 2,
        "transformers_version": "4.52.3",
        "use_bias": False,
        "use_cache": False,
        "use_qk_norm": True,
        "use_qkv_bias": False,
        "use_rmsnorm": True,
        "use_sliding_window": False,
        "vocab_size": vocab,
    }


def _sdar_moe_config(hidden, layers, heads, kv_heads, hd, intermediate, expert, vocab, max_length, block_size, ids):
    """SDAR's fields on Qwen3-MoE's config (configuration_sdar_moe.py's SDARMoeConfig)."""
    eos = ids["<|endoftext|>"]
    return {
        "architectures": ["SDARMoeForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_sdar_moe.SDARMoeConfig",
            "AutoModel": "modeling_sdar_moe.SDARMoeModel",
            "AutoModelForCausalLM": "modeling_sdar_moe.SDARMoeForCausalLM",
        },
        "model_type": "sdar_moe",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "block_size": block_size,
        "bos_token_id": eos,
        "eos_token_id": eos,
        "pad_token_id": eos,
        "mask_token_id": ids["<MASK>"],
        "decoder_sparse_step": 1,
        "head_dim": hd,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": intermediate,
        "max_position_embeddings": max_length,
        "max_window_layers": layers,
        "mlp_only_layers": [],
        "moe_intermediate_size": expert,
        "norm_topk_prob": True,
        "num_attention_heads": heads,
        "num_experts": EXPERTS,
        "num_experts_per_tok": 2,
        "num_hidden_layers": layers,
        "num_key_value_heads": kv_heads,
        "output_router_logits": False,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000.0,
        "router_aux_loss_coef": 0.001,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "transformers_version": "4.52.4",
        "use_cache": False,
        "use_sliding_window": False,
        "vocab_size": vocab,
    }


def _experts(p: str, hidden: int, expert: int, experts: int) -> dict[str, tuple[int, ...]]:
    t = {p + "mlp.gate.weight": (experts, hidden)}
    for e in range(experts):
        t |= {
            p + f"mlp.experts.{e}.gate_proj.weight": (expert, hidden),
            p + f"mlp.experts.{e}.up_proj.weight": (expert, hidden),
            p + f"mlp.experts.{e}.down_proj.weight": (hidden, expert),
        }
    return t


def _olmoe_tensors(hidden, layers, heads, kv_heads, hd, expert, vocab, experts) -> dict[str, tuple[int, ...]]:
    """LLaDA-MoE's and Qwen3-MoE's (SDAR-MoE's) names: every layer MoE, no shared expert."""
    t = {"model.embed_tokens.weight": (vocab, hidden)}
    for n in range(layers):
        p = f"model.layers.{n}."
        t |= {
            p + "input_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (heads * hd, hidden),
            p + "self_attn.k_proj.weight": (kv_heads * hd, hidden),
            p + "self_attn.v_proj.weight": (kv_heads * hd, hidden),
            p + "self_attn.o_proj.weight": (hidden, heads * hd),
            p + "post_attention_layernorm.weight": (hidden,),
            p + "self_attn.q_norm.weight": (hd,),
            p + "self_attn.k_norm.weight": (hd,),
        }
        t |= _experts(p, hidden, expert, experts)
    t["model.norm.weight"] = (hidden,)
    t["lm_head.weight"] = (vocab, hidden)
    return t


def _llada2_tensors(
    hidden, layers, heads, kv_heads, hd, intermediate, expert, vocab, experts, first_dense
) -> dict[str, tuple[int, ...]]:
    """LLaDA2's names: fused QKV, the first layers dense, then gate (+ expert_bias), experts, shared_experts."""
    t = {"model.word_embeddings.weight": (vocab, hidden)}
    for n in range(layers):
        p = f"model.layers.{n}."
        t |= {
            p + "input_layernorm.weight": (hidden,),
            p + "attention.query_key_value.weight": ((heads + 2 * kv_heads) * hd, hidden),
            p + "attention.query_layernorm.weight": (hd,),
            p + "attention.key_layernorm.weight": (hd,),
            p + "attention.dense.weight": (hidden, heads * hd),
            p + "post_attention_layernorm.weight": (hidden,),
        }
        if n < first_dense:
            t |= {
                p + "mlp.gate_proj.weight": (intermediate, hidden),
                p + "mlp.up_proj.weight": (intermediate, hidden),
                p + "mlp.down_proj.weight": (hidden, intermediate),
            }
            continue
        t |= _experts(p, hidden, expert, experts)
        t |= {
            p + "mlp.gate.expert_bias": (experts,),
            p + "mlp.shared_experts.gate_proj.weight": (expert, hidden),
            p + "mlp.shared_experts.up_proj.weight": (expert, hidden),
            p + "mlp.shared_experts.down_proj.weight": (hidden, expert),
        }
    t["model.norm.weight"] = (hidden,)
    t["lm_head.weight"] = (vocab, hidden)
    return t


def _write_ling_tokenizer(out: Path, ids: dict[str, int], chat_template: str | None) -> None:
    """tokenizer.json (byte-level BPE) and a PreTrainedTokenizerFast tokenizer_config.json, as the Ling
    tokenizer of LLaDA-MoE and LLaDA2 is shipped."""
    vocab, merges = fixtures._byte_bpe()
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(ids))
    tok.save(str(out / "tokenizer.json"))
    added = {
        str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                 "special": True}
        for t, i in ids.items()
    }
    config = {
        "added_tokens_decoder": added,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "mask_token": "<|mask|>",
        "model_max_length": 32768,
        "tokenizer_class": "PreTrainedTokenizerFast",
        **({"chat_template": chat_template} if chat_template is not None else {}),
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
