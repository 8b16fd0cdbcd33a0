"""DiffusionGemma (DiffusionGemmaForBlockDiffusion): a Gemma-4 MoE backbone run in two modes with the same
weights. The encoder runs causally over the prompt (and later over each committed canvas), filling a K/V
cache; the decoder runs bidirectionally over [cache ; canvas], with self-conditioning on the previous step's
logits, and returns tanh-soft-capped fp32 logits. No mask token: the canvas is noised with uniform random
tokens (see dlmc.decoding.diffusion_gemma, its sampler). Text only: the vision tower's tensors are skipped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dlmc.errors import DlmcError
from dlmc.models.checkpoint import field
from dlmc.models.gemma4 import Gemma4Config, Gemma4Layer, GemmaRMSNorm, GatedMLP, rope_cos_sin
from dlmc.spec import DenoiserSpec

ARCHITECTURES = ("DiffusionGemmaForBlockDiffusion",)
FAMILY = "diffusion_gemma"
DECODER = "model.decoder."
ENCODER = "model.encoder.language_model."
VISION = ("model.encoder.vision_tower.", "model.encoder.embed_vision.")
_SUPPORTED = {"hidden_activation": "gelu_pytorch_tanh", "attention_bias": False}
_ROPE = {"default": 1.0, "proportional": None}  # None: partial_rotary_factor gives the share


def read_config(config: dict, where: Path, token_id) -> tuple[Gemma4Config, DenoiserSpec]:
    text = config.get("text_config")
    if not isinstance(text, dict):
        raise DlmcError(f"{where}: missing field 'text_config' needed by the {FAMILY} family")

    def need(key, default=None, source=text):
        return field(source, key, where, FAMILY, default)

    for key, value in _SUPPORTED.items():
        if key in text and text[key] != value:
            raise DlmcError(f"{where}: text_config field '{key}' is {text[key]!r}; dlmc supports {value!r}")
    canvas = _positive(need("canvas_length", source=config), "canvas_length", where)
    layers = _positive(need("num_hidden_layers"), "text_config.num_hidden_layers", where)
    types = need("layer_types")
    if not isinstance(types, list) or len(types) != layers:
        got = len(types) if isinstance(types, list) else repr(types)
        raise DlmcError(f"{where}: text_config field 'layer_types' has {got} entries, 'num_hidden_layers' is {layers}")
    window = need("sliding_window")
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise DlmcError(f"{where}: text_config field 'sliding_window' must be an integer >= 1, got {window!r}")
    head_dims, kv_heads = _geometry(text, types, where)
    theta, fraction = _rope(need("rope_parameters"), set(types), where)
    try:
        arch = Gemma4Config(
            hidden_size=need("hidden_size"), vocab_size=need("vocab_size"), layer_types=tuple(types),
            num_heads=need("num_attention_heads"), head_dims=head_dims, kv_heads=kv_heads,
            intermediate_size=need("intermediate_size"), num_experts=need("num_experts"),
            top_k=need("top_k_experts"), expert_size=need("moe_intermediate_size"),
            rms_norm_eps=float(need("rms_norm_eps", 1e-6)), sliding_window=window, rope_theta=theta,
            rope_fraction=fraction, softcap=text.get("final_logit_softcapping"), canvas_length=canvas,
        )
    except ValueError as e:
        raise DlmcError(f"{where}: text_config {e}") from None
    if config.get("tie_word_embeddings") is False:
        raise DlmcError(f"{where}: field 'tie_word_embeddings' is false; the {FAMILY} head is the embedding")
    eos = config.get("eos_token_id", text.get("eos_token_id"))
    spec = DenoiserSpec(
        family=FAMILY,
        mask_token_id=None,  # uniform-noise diffusion: no mask token
        attention="bidirectional",
        block_size=None,
        shift_logits=False,
        vocab_size=arch.vocab_size,
        max_length=need("max_position_embeddings"),
        eos_token_id=eos,
        pad_token_id=config.get("pad_token_id", text.get("pad_token_id")),
        eot_token_id=token_id("<turn|>"),
        sampler=FAMILY,
    )
    return arch, spec


def _positive(value, name: str, where) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise DlmcError(f"{where}: field '{name}' must be an integer >= 1, got {value!r}")
    return value


def _geometry(text: dict, types: list, where) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Per-layer (head_dim, kv heads): per_layer_config (what save_pretrained writes for full layers), else
    global_head_dim / num_global_key_value_heads on full layers, else the sliding values."""
    per_layer = text.get("per_layer_config") or {}
    dims, heads = [], []
    for i, kind in enumerate(types):
        own = per_layer.get(str(i)) or {}
        full = kind == "full_attention"
        dim = own.get("head_dim") or (full and text.get("global_head_dim")) or text.get("head_dim")
        kv = own.get("num_key_value_heads") or (full and text.get("num_global_key_value_heads"))
        kv = kv or text.get("num_key_value_heads")
        if dim is None or kv is None:
            raise DlmcError(f"{where}: text_config has no 'head_dim' / 'num_key_value_heads' for layer {i}")
        dims.append(dim)
        heads.append(kv)
    return tuple(dims), tuple(heads)


def _rope(params, kinds: set, where) -> tuple[dict, dict]:
    if not isinstance(params, dict):
        raise DlmcError(f"{where}: text_config field 'rope_parameters' must map layer types to RoPE settings")
    theta, fraction = {}, {}
    for kind in sorted(kinds):
        p = params.get(kind)
        if not isinstance(p, dict) or "rope_theta" not in p:
            raise DlmcError(f"{where}: text_config field 'rope_parameters' has no rope_theta for '{kind}'")
        rope_type = p.get("rope_type", "default")
        if rope_type not in _ROPE:
            raise DlmcError(f"{where}: rope_parameters.{kind}.rope_type '{rope_type}' is not supported")
        theta[kind] = float(p["rope_theta"])
        fraction[kind] = _ROPE[rope_type] or float(p.get("partial_rotary_factor", 1.0))
    return theta, fraction


@dataclass
class GemmaCache:
    """The encoder's K/V: per layer [B, Hkv, C_l, D], where sliding layers keep only the last
    sliding_window - 1 positions (what the reference's sliding-window cache keeps). `mask` and `positions`
    [B, C] describe every cached position (False / 0 where a row is left-padded)."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    mask: torch.Tensor
    positions: torch.Tensor

    def layer_mask(self, layer: int) -> torch.Tensor:
        return self.mask[:, self.mask.shape[1] - self.keys[layer].shape[2] :]  # [B, C_l]

    def layer_positions(self, layer: int) -> torch.Tensor:
        return self.positions[:, self.positions.shape[1] - self.keys[layer].shape[2] :]  # [B, C_l]

    def extend(self, keys, values, mask, positions, layer_types, sliding_window: int) -> GemmaCache:
        """This cache with one encoder call's k, v (per layer [B, Hkv, L, D]), mask and positions [B, L]
        appended; sliding layers then keep their last sliding_window - 1 positions."""
        new_keys, new_values = [], []
        for n, kind in enumerate(layer_types):
            k, v = torch.cat([self.keys[n], keys[n]], 2), torch.cat([self.values[n], values[n]], 2)
            if kind == "sliding_attention":
                start = k.shape[2] - min(sliding_window - 1, k.shape[2])
                k, v = k[:, :, start:], v[:, :, start:]
            new_keys.append(k)
            new_values.append(v)
        mask, positions = torch.cat([self.mask, mask], 1), torch.cat([self.positions, positions], 1)
        return GemmaCache(new_keys, new_values, mask, positions)


class SelfConditioning(nn.Module):
    """inp = rms(e + MLP(pre_norm(softmax(S) @ E * scale))): the previous step's logits S as a soft
    embedding; without S, the scale-free RMSNorm of the embeddings (the MLP of zero is zero)."""

    def __init__(self, cfg: Gemma4Config):
        super().__init__()
        self.pre_norm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size)
        self.post_norm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps, scale=False)

    @staticmethod
    def soft(logits, embedding, scale):
        """The previous step's logits [B, L, V] as a soft embedding [B, L, d]: all the next step reads of them."""
        soft = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), -1).to(embedding.dtype)
        return soft @ embedding * scale

    def forward(self, e, soft):
        # e: [B, L, d]; soft: [B, L, d] or None. A zero soft embedding gives exactly post_norm(e): the MLP of
        # pre_norm(0) = 0 is 0 (no biases, gelu(0) = 0), which lets a compiled step take zeros at its first step.
        if soft is None:
            return self.post_norm(e)
        return self.post_norm(e + self.mlp(self.pre_norm(soft)))


class DiffusionGemma(nn.Module):
    """`encode` fills (or extends) a GemmaCache; `denoise` runs one decoder step over a canvas."""

    def __init__(self, arch: Gemma4Config, spec: DenoiserSpec):
        super().__init__()
        self.arch, self.spec = arch, spec
        self.embed_tokens = nn.Embedding(arch.vocab_size, arch.hidden_size)
        self.layers = nn.ModuleList(Gemma4Layer(arch, n) for n in range(arch.num_layers))
        self.norm = GemmaRMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.self_conditioning = SelfConditioning(arch)

    def forward(self, *args, **kwargs):
        raise DlmcError(f"the {FAMILY} model runs only with its own decoder ('{FAMILY}'): it has no mask token")

    def embed_scale(self) -> float:
        # sqrt(d) rounded to the weight dtype first, as the reference does (53.0 in bf16, not 53.07). A Python
        # number, not a tensor: the product is the same, and a captured graph then holds no tensor constant.
        return float(torch.tensor(self.arch.hidden_size**0.5, dtype=self.embed_tokens.weight.dtype))

    def empty_cache(self, batch: int, device) -> GemmaCache:
        dtype = self.embed_tokens.weight.dtype
        kv = [torch.zeros(batch, a.self_attn.kv_heads, 0, a.self_attn.head_dim, dtype=dtype, device=device)
              for a in self.layers]
        empty = torch.zeros(batch, 0, dtype=torch.long, device=device)
        return GemmaCache(kv, list(kv), empty.bool(), empty)

    def _rope(self, positions, dtype):
        cfg, tables = self.arch, {}
        for n, kind in enumerate(cfg.layer_types):
            dim = cfg.head_dims[n]
            if (kind, dim) not in tables:
                tables[kind, dim] = rope_cos_sin(positions, dim, cfg.rope_theta[kind], cfg.rope_fraction[kind], dtype)
        return [tables[kind, cfg.head_dims[n]] for n, kind in enumerate(cfg.layer_types)]

    def encode(self, input_ids, attention_mask, position_ids, cache: GemmaCache) -> GemmaCache:
        """Causal encoder pass (sliding layers: a query sees the sliding_window keys up to itself) over
        input_ids [B, L] (left-padded: attention_mask [B, L] bool, logical position_ids [B, L]), appended to
        `cache`."""
        keys, values = self.encode_layers(input_ids, attention_mask, position_ids, cache)
        arch = self.arch
        return cache.extend(keys, values, attention_mask.bool(), position_ids, arch.layer_types, arch.sliding_window)

    def encode_layers(self, input_ids, attention_mask, position_ids, cache: GemmaCache):
        """The encoder pass itself: per layer this call's k, v [B, Hkv, L, D] (what `encode` appends)."""
        B, L = input_ids.shape
        h = self.embed_tokens(input_ids) * self.embed_scale()
        rope = self._rope(position_ids, h.dtype)
        itself = torch.eye(L, dtype=torch.bool, device=h.device)  # a padding query must see something
        keys, values = [], []
        for n, layer in enumerate(self.layers):
            key_pos = torch.cat([cache.layer_positions(n), position_ids], 1)  # [B, S]
            valid = torch.cat([cache.layer_mask(n), attention_mask.bool()], 1)  # [B, S]
            allowed = valid[:, None, :] & (key_pos[:, None, :] <= position_ids[:, :, None])  # [B, L, S]
            if self.arch.layer_types[n] == "sliding_attention":
                allowed &= position_ids[:, :, None] - key_pos[:, None, :] < self.arch.sliding_window
            allowed[:, :, -L:] |= itself
            h, k, v = layer(h, *rope[n], cache.keys[n], cache.values[n], allowed[:, None], encoder=True)
            keys.append(k)
            values.append(v)
        return keys, values

    def denoise(self, canvas, position_ids, cache: GemmaCache, sc_logits=None, *, soft=None) -> torch.Tensor:
        """One decoder step: canvas [B, C] at position_ids [B, C] attends with no mask to [cache ; canvas];
        self-conditioning on sc_logits [B, C, V] (the previous step's), or directly on their soft embedding
        soft [B, C, d] (SelfConditioning.soft), or on nothing. Returns soft-capped logits [B, C, V] (>= fp32)."""
        B, C = canvas.shape
        weight, scale = self.embed_tokens.weight, self.embed_scale()
        if sc_logits is not None:
            soft = self.self_conditioning.soft(sc_logits, weight, scale)
        h = self.self_conditioning(self.embed_tokens(canvas) * scale, soft)
        rope = self._rope(position_ids, h.dtype)
        for n, layer in enumerate(self.layers):
            valid = torch.cat([cache.layer_mask(n), torch.ones(B, C, dtype=torch.bool, device=h.device)], 1)
            mask = valid[:, None, None, :].expand(B, 1, C, valid.shape[1])
            h, _, _ = layer(h, *rope[n], cache.keys[n], cache.values[n], mask, encoder=False)
        logits = F.linear(self.norm(h), weight)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        if self.arch.softcap:
            logits = torch.tanh(logits / self.arch.softcap) * self.arch.softcap
        return logits

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


build_model = DiffusionGemma


def published_names(files) -> Callable[[str], str]:
    """Canonical -> published names for this checkpoint: the backbone under model.decoder.* (as published)
    or model.encoder.language_model.* (the converter's other copy); each mode's layer_scalar from its own
    prefix, falling back to the other's."""
    backbone = DECODER if DECODER + "embed_tokens.weight" in files else ENCODER

    def published(name: str) -> str:
        if name.startswith("self_conditioning."):
            return DECODER + name.replace(".mlp.", ".")
        layer, _, leaf = name.rpartition(".")
        if leaf in ("layer_scalar", "encoder_layer_scalar"):
            own, other = (ENCODER, DECODER) if leaf == "encoder_layer_scalar" else (DECODER, ENCODER)
            scalar = layer + ".layer_scalar"
            return own + scalar if own + scalar in files else other + scalar
        return backbone + name

    return published


def select_weights(files: dict, model: nn.Module):
    """(the tensors to load, the name function): vision tensors, the tied lm_head and the backbone's copy
    under the prefix not loaded from are set aside; anything else unknown stays, for the loader to reject."""
    published = published_names(files)
    wanted = {published(name) for name, _ in model.named_parameters()}
    copies = ENCODER if DECODER + "embed_tokens.weight" in files else DECODER
    skipped = {n for n in files if n not in wanted and (n.startswith((*VISION, copies)) or n == "lm_head.weight")}
    return {n: f for n, f in files.items() if n not in skipped}, published


def notes(files: dict) -> dict:
    """What `dlmc inspect` adds: the vision tensors the text-only model does not load."""
    vision = sum(n.startswith(VISION) for n in files)
    return {"note": f"text only: {vision} vision tensors skipped"} if vision else {}
