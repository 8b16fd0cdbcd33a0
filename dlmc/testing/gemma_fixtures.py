"""A tiny random DiffusionGemma checkpoint (DiffusionGemmaForBlockDiffusion) in its published format:
nested text_config with layer_types, per_layer_config and rope_parameters, the backbone under
model.decoder.*, the encoder's layer_scalar under model.encoder.language_model.*, a tied head (no
lm_head.weight), a few vision tensors, sharded safetensors, and a Gemma-style tokenizer.json.

Names and fields are written out from the published format (research notes, section 3), not taken from
the loader. `dlmc.testing.fixtures.write_checkpoint("diffusion_gemma", ...)` dispatches here.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers

from dlmc.testing import fixtures

# Gemma's special-token ids (the fixture keeps them where the real tokenizer has them).
SPECIALS = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<|tool_response>": 50, "<|turn>": 105, "<turn|>": 106}
CHARS = "▁abcdefghijklmnopqrstuvwxyz0123456789.,!?\n"
VOCAB = 160
LAYER_TYPES = ["sliding_attention", "sliding_attention", "full_attention"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|turn>{{ m['role'] }}\n{{ m['content'] }}<turn|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|turn>model\n{% endif %}"
)


def gemma_config(*, hidden=32, heads=4, kv_heads=2, head_dim=8, global_kv_heads=1, global_head_dim=16,
                 intermediate=48, experts=8, top_k=2, expert_size=16, window=4, canvas=8, layer_types=None,
                 max_length=512) -> dict:
    types = list(layer_types or LAYER_TYPES)
    per_layer = {str(i): {"head_dim": global_head_dim, "num_key_value_heads": global_kv_heads}
                 for i, t in enumerate(types) if t == "full_attention"}
    text = {
        "model_type": "diffusion_gemma_text",
        "vocab_size": VOCAB,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": len(types),
        "layer_types": types,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "per_layer_config": per_layer,
        "sliding_window": window,
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6},
        },
        "num_experts": experts,
        "top_k_experts": top_k,
        "moe_intermediate_size": expert_size,
        "hidden_activation": "gelu_pytorch_tanh",
        "final_logit_softcapping": 30.0,
        "rms_norm_eps": 1e-6,
        "use_bidirectional_attention": "vision",
        "max_position_embeddings": max_length,
        "attention_bias": False,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "bos_token_id": 2,
    }
    return {
        "architectures": ["DiffusionGemmaForBlockDiffusion"],
        "model_type": "diffusion_gemma",
        "canvas_length": canvas,
        "tie_word_embeddings": True,
        "boi_token_id": 4,
        "eoi_token_id": 5,
        "image_token_id": 6,
        "eos_token_id": [1, 106],
        "pad_token_id": 0,
        "text_config": text,
        "vision_config": {"model_type": "gemma4_vision", "hidden_size": 8, "num_hidden_layers": 1},
    }


def gemma_tensors(config: dict, prefix: str = "model.decoder.") -> dict[str, tuple[int, ...]]:
    t = config["text_config"]
    d, V, f = t["hidden_size"], t["vocab_size"], t["intermediate_size"]
    E, F = t["num_experts"], t["moe_intermediate_size"]
    shapes = {prefix + "embed_tokens.weight": (V, d)}
    for n, kind in enumerate(t["layer_types"]):
        own = t["per_layer_config"].get(str(n), {})
        hd, kv = own.get("head_dim", t["head_dim"]), own.get("num_key_value_heads", t["num_key_value_heads"])
        H = t["num_attention_heads"]
        p = f"{prefix}layers.{n}."
        shapes |= {
            p + "input_layernorm.weight": (d,),
            p + "self_attn.q_proj.weight": (H * hd, d),
            p + "self_attn.k_proj.weight": (kv * hd, d),
            **({p + "self_attn.v_proj.weight": (kv * hd, d)} if kind == "sliding_attention" else {}),
            p + "self_attn.o_proj.weight": (d, H * hd),
            p + "self_attn.q_norm.weight": (hd,),
            p + "self_attn.k_norm.weight": (hd,),
            p + "post_attention_layernorm.weight": (d,),
            p + "pre_feedforward_layernorm.weight": (d,),
            p + "mlp.gate_proj.weight": (f, d),
            p + "mlp.up_proj.weight": (f, d),
            p + "mlp.down_proj.weight": (d, f),
            p + "post_feedforward_layernorm_1.weight": (d,),
            p + "router.proj.weight": (E, d),
            p + "router.scale": (d,),
            p + "router.per_expert_scale": (E,),
            p + "pre_feedforward_layernorm_2.weight": (d,),
            p + "experts.gate_up_proj": (E, 2 * F, d),
            p + "experts.down_proj": (E, d, F),
            p + "post_feedforward_layernorm_2.weight": (d,),
            p + "post_feedforward_layernorm.weight": (d,),
            p + "layer_scalar": (1,),
        }
    shapes |= {
        prefix + "norm.weight": (d,),
        "model.decoder.self_conditioning.pre_norm.weight": (d,),
        "model.decoder.self_conditioning.gate_proj.weight": (f, d),
        "model.decoder.self_conditioning.up_proj.weight": (f, d),
        "model.decoder.self_conditioning.down_proj.weight": (d, f),
        "model.encoder.vision_tower.patch_embedder.input_proj.weight": (8, 12),
        "model.encoder.embed_vision.embedding_projection.weight": (d, 8),
    }
    if prefix == "model.decoder.":  # the published file: the encoder keeps only its own layer scalars
        shapes |= {f"model.encoder.language_model.layers.{n}.layer_scalar": (1,) for n in range(len(t["layer_types"]))}
    return shapes


def _init(name: str, shape, generator) -> torch.Tensor:
    noise = torch.randn(shape, generator=generator)
    if name.endswith(("norm.weight", "router.scale", "per_expert_scale", "layer_scalar")):
        return 1.0 + 0.2 * noise  # scales: near one, distinct (encoder and decoder scalars differ)
    return noise / shape[-1] ** 0.5


def write_gemma_checkpoint(out: Path, *, dtype=torch.float32, shards=2, seed=0, tokenizer=True,
                           prefix="model.decoder.", drop: tuple[str, ...] = (), **sizes) -> Path:
    """`prefix`: where the backbone is stored (model.decoder. as published, or the converter's
    model.encoder.language_model.); `drop`: tensor names left out (bad-checkpoint tests)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = gemma_config(**sizes)
    generator = torch.Generator().manual_seed(seed)
    weights = {n: _init(n, s, generator).to(dtype) for n, s in gemma_tensors(config, prefix).items() if n not in drop}
    config["dtype"] = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(config, indent=2))
    generation = {"eos_token_id": [1, 106, 50], "pad_token_id": 0, "max_denoising_steps": 48, "t_min": 0.4,
                  "t_max": 0.8, "stability_threshold": 1, "confidence_threshold": 0.005,
                  "sampler_config": {"entropy_bound": 0.1, "_cls_name": "EntropyBoundSamplerConfig"}}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    fixtures._write_shards(out, weights, shards)
    if tokenizer:
        write_gemma_tokenizer(out)
    return out


def write_gemma_tokenizer(out: Path) -> None:
    """A SentencePiece-style BPE tokenizer.json (spaces as ▁, no merges, <unk> for unknown characters)
    with Gemma's special ids, and a GemmaTokenizer tokenizer_config.json."""
    vocab = dict(SPECIALS)
    free = (i for i in range(VOCAB) if i not in SPECIALS.values())
    for ch in CHARS:
        vocab[ch] = next(free)
    for i in free:
        vocab[f"<unused{i}>"] = i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse()])
    tok.add_special_tokens(list(SPECIALS))
    tok.save(str(out / "tokenizer.json"))
    added = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                      "special": True} for t, i in SPECIALS.items()}
    config = {"tokenizer_class": "GemmaTokenizer", "added_tokens_decoder": added, "bos_token": "<bos>",
              "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>", "add_bos_token": True,
              "add_eos_token": False, "chat_template": CHAT_TEMPLATE}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
