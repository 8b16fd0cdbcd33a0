"""Write a random checkpoint of any supported family in exactly its published Hugging Face format:
the config fields, the tensor names, shards with an index file, and tokenizer files.

The tensor names here are written out from the published formats on purpose, independently of the
loader's name tables, so a test that loads these files checks the loader against the format.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

BYTE_VOCAB = 256


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / Qwen byte-level alphabet: printable bytes map to themselves, the rest above 255."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


LLADA_SPECIALS = ["<|startoftext|>", "<|endoftext|>", "<|eot_id|>", "<|mdm_mask|>", "<|start_header_id|>", "<|end_header_id|>"]
QWEN_SPECIALS = {
    "dream": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|beginoftext|>", "<|mask|>"],
    "fast_dllm_v2": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "|<MASK>|"],
    "sdar": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<MASK>"],
    "wedlm": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|mask|>"],
}
FAMILIES = ("llada", "dream", "fast_dllm_v2", "sdar", "wedlm")
MOE_FAMILIES = ("llada_moe", "llada2", "sdar_moe")
"""Written by dlmc.testing.moe_fixtures; kept out of FAMILIES, which the dense-family tests sweep."""

# Chat templates in the shapes of the published ones (written here, not copied): LLaDA-8B-Instruct's
# Llama-3 headers with the BOS written by the template, and Qwen2.5's ChatML with a default system turn.
LLAMA3_CHAT_TEMPLATE = "".join([
    "{% for message in messages %}",
    "{% if loop.first %}{{ bos_token }}{% endif %}",
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}",
    "{% endfor %}",
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}",
])
CHATML_CHAT_TEMPLATE = "".join([
    "{% for message in messages %}",
    "{% if loop.first and message['role'] != 'system' %}",
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}",
    "{% endif %}",
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}",
    "{% endfor %}",
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
])
CHAT_TEMPLATES = {"llama3": LLAMA3_CHAT_TEMPLATE, "chatml": CHATML_CHAT_TEMPLATE}


def special_ids(family: str) -> dict[str, int]:
    specials = LLADA_SPECIALS if family == "llada" else QWEN_SPECIALS[family]
    return {tok: BYTE_VOCAB + i for i, tok in enumerate(specials)}


def write_checkpoint(
    family: str,
    out_dir: str | Path,
    *,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 96,
    vocab: int = 272,
    max_length: int = 512,
    block_size: int = 4,
    dtype: torch.dtype = torch.float32,
    shards: int = 2,
    seed: int = 0,
    tokenizer: bool = True,
    chat_template: str | None = None,
) -> Path:
    """Write the checkpoint and return its directory. `chat_template` (a Jinja2 string, e.g. one of
    CHAT_TEMPLATES) goes into tokenizer_config.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if family == "diffusion_gemma":  # dlmc.testing.gemma_fixtures: its own sizes (nested text_config)
        from dlmc.testing.gemma_fixtures import write_gemma_checkpoint

        return write_gemma_checkpoint(out, dtype=dtype, shards=shards, seed=seed, tokenizer=tokenizer)
    if family in MOE_FAMILIES:  # dlmc.testing.moe_fixtures (expert sizes derive from `intermediate`)
        from dlmc.testing.moe_fixtures import write_moe_checkpoint

        return write_moe_checkpoint(
            family, out, hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads, intermediate=intermediate,
            vocab=vocab, max_length=max_length, block_size=block_size, dtype=dtype, shards=shards, seed=seed,
            tokenizer=tokenizer, chat_template=chat_template,
        )
    ids = special_ids(family)
    if family == "llada":
        config = llada_config(
            hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads, intermediate=intermediate,
            embedding_size=vocab, vocab_size=BYTE_VOCAB + len(ids), max_length=max_length,
            mask_id=ids["<|mdm_mask|>"], eos_id=ids["<|endoftext|>"],
        )
        tensors = _llada_tensors(hidden, layers, heads, kv_heads, intermediate, vocab)
    else:
        config = _qwen_config(family, hidden, layers, heads, kv_heads, intermediate, vocab, max_length, block_size, ids)
        tensors = _qwen_tensors(family, hidden, layers, heads, kv_heads, intermediate, vocab)
    generator = torch.Generator().manual_seed(seed)
    weights = {name: _init(name, shape, generator).to(dtype) for name, shape in tensors.items()}
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(config, indent=2))
    _write_shards(out, weights, shards)
    if tokenizer:
        _write_tokenizer(family, out, ids, chat_template)
    return out


def _init(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    if name.endswith("norm.weight") or name.endswith("ln_f.weight") or "layernorm" in name:
        return 1.0 + 0.1 * torch.randn(shape, generator=generator)
    std = 0.02 if name.endswith("bias") else 1.0 / shape[-1] ** 0.5
    return std * torch.randn(shape, generator=generator)


def llada_config(
    *, hidden, layers, heads, kv_heads, intermediate, embedding_size, vocab_size, max_length, mask_id, eos_id
) -> dict:
    """A config.json with the field set of the published LLaDA-8B-Instruct."""
    return {
        "architectures": ["LLaDAModelLM"],
        "auto_map": {
            "AutoConfig": "configuration_llada.LLaDAConfig",
            "AutoModel": "modeling_llada.LLaDAModelLM",
            "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
        },
        "activation_type": "silu",
        "alibi": False,
        "alibi_bias_max": 8.0,
        "attention_dropout": 0.0,
        "attention_layer_norm": False,
        "attention_layer_norm_with_affine": True,
        "bias_for_layer_norm": False,
        "block_group_size": 1,
        "block_type": "llama",
        "d_model": hidden,
        "embedding_dropout": 0.0,
        "embedding_size": embedding_size,
        "eos_token_id": eos_id,
        "flash_attention": False,
        "include_bias": False,
        "include_qkv_bias": False,
        "init_cutoff_factor": None,
        "init_device": "meta",
        "init_fn": "mitchell",
        "init_std": 0.02,
        "input_emb_norm": False,
        "layer_norm_type": "rms",
        "layer_norm_with_affine": True,
        "mask_token_id": mask_id,
        "max_sequence_length": max_length,
        "mlp_hidden_size": intermediate,
        "mlp_ratio": 4,
        "model_type": "llada",
        "multi_query_attention": None,
        "n_heads": heads,
        "n_kv_heads": kv_heads,
        "n_layers": layers,
        "pad_token_id": eos_id,
        "precision": "amp_bf16",
        "residual_dropout": 0.0,
        "rms_norm_eps": 1e-05,
        "rope": True,
        "rope_full_precision": True,
        "rope_theta": 500000.0,
        "scale_logits": False,
        "transformers_version": "4.46.3",
        "use_cache": False,
        "vocab_size": vocab_size,
        "weight_tying": False,
    }


def _llada_tensors(hidden, layers, heads, kv_heads, intermediate, vocab) -> dict[str, tuple[int, ...]]:
    hd = hidden // heads
    t = {"model.transformer.wte.weight": (vocab, hidden)}
    for n in range(layers):
        p = f"model.transformer.blocks.{n}."
        t |= {
            p + "attn_norm.weight": (hidden,),
            p + "q_proj.weight": (hidden, hidden),
            p + "k_proj.weight": (kv_heads * hd, hidden),
            p + "v_proj.weight": (kv_heads * hd, hidden),
            p + "attn_out.weight": (hidden, hidden),
            p + "ff_norm.weight": (hidden,),
            p + "ff_proj.weight": (intermediate, hidden),
            p + "up_proj.weight": (intermediate, hidden),
            p + "ff_out.weight": (hidden, intermediate),
        }
    t["model.transformer.ln_f.weight"] = (hidden,)
    t["model.transformer.ff_out.weight"] = (vocab, hidden)
    return t


def _qwen_config(family, hidden, layers, heads, kv_heads, intermediate, vocab, max_length, block_size, ids) -> dict:
    common = {
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": intermediate,
        "max_position_embeddings": max_length,
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "num_key_value_heads": kv_heads,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
        "use_cache": False,
        "vocab_size": vocab,
        "attention_dropout": 0.0,
    }
    eos = ids["<|endoftext|>"]
    if family == "dream":
        return {
            "architectures": ["DreamModel"],
            "auto_map": {"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"},
            "model_type": "Dream",
            "bos_token_id": ids["<|beginoftext|>"],
            "eos_token_id": eos,
            "pad_token_id": eos,
            "mask_token_id": ids["<|mask|>"],
            "max_window_layers": layers,
            "sliding_window": None,
            "use_sliding_window": False,
            "transformers_version": "4.46.2",
            **common,
        }
    if family == "fast_dllm_v2":
        # No mask_token_id here, exactly as published: the mask is the tokenizer's |<MASK>|.
        return {
            "architectures": ["Fast_dLLM_QwenForCausalLM"],
            "auto_map": {
                "AutoConfig": "configuration.Fast_dLLM_QwenConfig",
                "AutoModel": "modeling.Fast_dLLM_QwenModel",
                "AutoModelForCausalLM": "modeling.Fast_dLLM_QwenForCausalLM",
            },
            "model_type": "Fast_dLLM_Qwen",
            "bd_size": block_size,
            "conplemenrary_mask": True,
            "bos_token_id": eos,
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|im_end|>"],
            "layer_types": ["full_attention"] * layers,
            "max_window_layers": layers,
            "sliding_window": None,
            "use_sliding_window": False,
            "transformers_version": "4.53.1",
            **common,
        }
    if family == "sdar":
        return {
            "architectures": ["SDARForCausalLM"],
            "auto_map": {
                "AutoConfig": "configuration_sdar.SDARConfig",
                "AutoModel": "modeling_sdar.SDARModel",
                "AutoModelForCausalLM": "modeling_sdar.SDARForCausalLM",
            },
            "model_type": "sdar",
            "attention_bias": False,
            "attn_implementation": "flex_attention",
            "block_size": block_size,
            "bos_token_id": eos,
            "eos_token_id": eos,
            "pad_token_id": eos,
            "mask_token_id": ids["<MASK>"],
            "head_dim": hidden // heads,
            "fuse_cross_entropy": True,
            "micro_forward": False,
            "skip_checkpoint": False,
            "use_deepep": False,
            "ep_size": 1,
            "debug": False,
            **common,
        }
    if family == "wedlm":
        return {
            "architectures": ["WeDLMForCausalLM"],
            "model_type": "wedlm",
            "attention_bias": True,
            "qk_norm": False,
            "head_dim": hidden // heads,
            "bos_token_id": eos,
            "eos_token_id": eos,
            "pad_token_id": eos,
            "mask_token_id": ids["<|mask|>"],
            **common,
        }
    raise ValueError(f"unknown family {family}")


def _qwen_tensors(family, hidden, layers, heads, kv_heads, intermediate, vocab) -> dict[str, tuple[int, ...]]:
    hd = hidden // heads
    qkv_bias = family in ("dream", "fast_dllm_v2", "wedlm")
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
            p + "mlp.gate_proj.weight": (intermediate, hidden),
            p + "mlp.up_proj.weight": (intermediate, hidden),
            p + "mlp.down_proj.weight": (hidden, intermediate),
        }
        if qkv_bias:
            t |= {p + "self_attn.q_proj.bias": (heads * hd,), p + "self_attn.k_proj.bias": (kv_heads * hd,), p + "self_attn.v_proj.bias": (kv_heads * hd,)}
        if family == "sdar":
            t |= {p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,)}
    t["model.norm.weight"] = (hidden,)
    t["lm_head.weight"] = (vocab, hidden)
    return t


def _write_shards(out: Path, weights: dict[str, torch.Tensor], shards: int) -> None:
    names = list(weights)
    if shards <= 1:
        save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    per = -(-len(names) // shards)
    weight_map, total = {}, 0
    for i in range(shards):
        part = names[i * per : (i + 1) * per]
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: weights[n].contiguous() for n in part}, str(out / fname), metadata={"format": "pt"})
        for n in part:
            weight_map[n] = fname
            total += weights[n].numel() * weights[n].element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _byte_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    chars = bytes_to_unicode()
    return {chars[b]: b for b in range(256)}, []


def _write_tokenizer(family: str, out: Path, ids: dict[str, int], chat_template: str | None = None) -> None:
    chat = {"chat_template": chat_template} if chat_template is not None else {}
    vocab, merges = _byte_bpe()
    decoder = {str(i): {"content": tok, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True} for tok, i in ids.items()}
    if family in ("llada", "sdar"):
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens(list(ids))
        tok.save(str(out / "tokenizer.json"))
    if family == "llada":
        config = {
            "add_bos_token": False,
            "add_eos_token": False,
            "added_tokens_decoder": decoder,
            "bos_token": "<|startoftext|>",
            "eos_token": "<|endoftext|>",
            "pad_token": "<|endoftext|>",
            "model_max_length": 1000000000000000019884624838656,
            "tokenizer_class": "PreTrainedTokenizerFast",
            **chat,
        }
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
        (out / "special_tokens_map.json").write_text(
            json.dumps({"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "additional_special_tokens": ["<|mdm_mask|>"]})
        )
        return
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    (out / "added_tokens.json").write_text(json.dumps(ids, indent=2))
    config = {"added_tokens_decoder": decoder, "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "tokenizer_class": "Qwen2Tokenizer", **chat}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
