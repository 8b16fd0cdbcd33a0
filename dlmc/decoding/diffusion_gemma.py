"""DiffusionGemma's official sampler (transformers' DiffusionGemmaGenerationMixin.generate), token for token.

Per canvas: an encoder pass over the uncached tokens (the prompt, later the last committed canvas) extends
the K/V cache; the canvas starts as uniform random tokens over the whole vocabulary; each of up to
`max_denoising_steps` decoder passes (step n = N, N-1, ..., 1 counts the steps left) divides the logits by
T = t_min + (t_max - t_min) * n / N, samples every position, accepts the lowest-entropy samples while the
sum of the accepted entropies minus the largest is within `entropy_bound`, and renoises the rest with fresh
uniform tokens. A row stops early once its argmax canvas equals the previous step's and its mean entropy is
below `confidence_threshold`. The argmax canvas (not the sampled one) is committed; a canvas holding an
EOS id ends the row, the tokens after its first EOS becoming pad.

Random numbers (the seed convention of dlmc.decoding.common): each row draws from its own generator seeded
with the seed, in the reference's order at batch 1 after torch.manual_seed(seed): per canvas randint(0, V,
(1, C)); per step multinomial(probs [C, V], 1), then randint(0, V, (1, C)) for the renoise, drawn even when
everything was accepted and at the step after which the row stops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dlmc.decoding.common import (
    Generation,
    StepCallback,
    check_positive,
    check_prompts,
    left_pad,
    model_device,
    pad_token_id,
    row_generator,
    stop_token_ids,
)
from dlmc.errors import DlmcError
from dlmc.spec import DenoiserSpec


@dataclass(frozen=True)
class DiffusionGemmaConfig:
    """Defaults: the reference's (its generation_config.json agrees)."""

    max_new_tokens: int = 256
    """Canvases run: ceil(max_new_tokens / canvas_length); the output is cut to max_new_tokens (the
    reference returns whole canvases)."""
    max_denoising_steps: int = 48
    entropy_bound: float = 0.1
    t_min: float = 0.4
    t_max: float = 0.8
    stability_threshold: int = 1
    """Steps whose argmax canvas must equal the current one (0: always stable)."""
    confidence_threshold: float = 0.005
    eos_token_ids: tuple[int, ...] | None = None
    """None: the spec's EOS and end-of-turn ids (the published generation_config.json adds 50)."""

    def __post_init__(self) -> None:
        check_positive("max_new_tokens", self.max_new_tokens)
        check_positive("max_denoising_steps", self.max_denoising_steps)
        if self.entropy_bound <= 0:
            raise DlmcError(f"entropy_bound={self.entropy_bound} must be > 0")
        if not 0 <= self.t_min < self.t_max:
            raise DlmcError(f"t_min={self.t_min}, t_max={self.t_max}: need 0 <= t_min < t_max")
        if self.stability_threshold < 0:
            raise DlmcError(f"stability_threshold={self.stability_threshold} must be >= 0")
        if self.confidence_threshold <= 0:
            raise DlmcError(f"confidence_threshold={self.confidence_threshold} must be > 0")


def temperature(config: DiffusionGemmaConfig, steps_left: int) -> torch.Tensor:
    """The reference's arithmetic: the step is an int32 tensor, so n / N and what follows are fp32."""
    n = torch.tensor(steps_left, dtype=torch.int32)
    return config.t_min + (config.t_max - config.t_min) * (n / config.max_denoising_steps)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    # logits: [..., V] -> [...]; torch's Categorical, as the reference computes it
    return torch.distributions.Categorical(logits=logits, validate_args=False).entropy()


def accept(entropies: torch.Tensor, bound: float) -> torch.Tensor:
    """Positions [C] accepted: the ascending-entropy prefix whose cumulative sum minus the current (the
    largest so far) entropy is within `bound`; the lowest-entropy position always passes."""
    ordered, order = torch.sort(entropies, dim=-1)
    chosen = ordered.cumsum(-1) - ordered <= bound  # [C]
    return torch.zeros_like(chosen).scatter(-1, order, chosen)


def validate(spec: DenoiserSpec, prompts: list[list[int]], config: DiffusionGemmaConfig) -> None:
    """The checks that need no model (a server makes them before queueing): the prompts' ids. Whether whole
    canvases fit max_length needs the canvas length, which `generate` checks (count_canvases)."""
    check_prompts(spec, prompts)


def count_canvases(spec: DenoiserSpec, prompts: list[list[int]], config: DiffusionGemmaConfig, C: int) -> int:
    """Canvases of C tokens the run needs, after checking the prompts and that they fit max_length."""
    check_prompts(spec, prompts)
    canvases = math.ceil(config.max_new_tokens / C)
    longest = max(len(p) for p in prompts) + canvases * C
    if longest > spec.max_length:
        raise DlmcError(f"prompt + {canvases} canvases = {longest} tokens exceeds spec.max_length={spec.max_length}")
    return canvases


def commit(committed: torch.Tensor, live: list[int], eos: torch.Tensor, pad, out: torch.Tensor, finished: list) -> None:
    """The live rows' argmax canvases committed [B, C] into out [B, C] (CPU): a row whose canvas holds an
    EOS id finishes, the tokens after its first EOS becoming pad."""
    for b in live:
        tokens = committed[b].clone()
        hits = torch.isin(tokens, eos).nonzero()
        if len(hits):
            finished[b] = True
            if pad is not None:
                tokens[int(hits[0]) + 1 :] = pad
        out[b] = tokens.cpu()


class _Row:
    """One prompt's denoising state for the current canvas."""

    def __init__(self, generator: torch.Generator, vocab: int, canvas: int, device, history: int):
        self.generator, self.vocab, self.device = generator, vocab, device
        self.canvas = self.noise(canvas)  # [C]
        self.argmax = self.canvas
        self.history = torch.full((history, canvas), -1, dtype=torch.long, device=device)  # [k, C]
        self.done = False
        self.nfe = 0

    def noise(self, canvas: int) -> torch.Tensor:
        shape = (1, canvas)  # the reference's (B, C) at B = 1
        return torch.randint(0, self.vocab, shape, generator=self.generator, device=self.device)[0]

    def step(self, processed: torch.Tensor, config: DiffusionGemmaConfig) -> None:
        # processed: [C, V] fp32 logits / T
        C, V = processed.shape
        probs = torch.softmax(processed, dim=-1, dtype=torch.float32)  # [C, V]
        sampled = torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)  # [C]
        argmax = processed.argmax(-1)  # [C]
        entropies = entropy(processed)  # [C]
        accepted = accept(entropies, config.entropy_bound)  # [C]
        fresh = self.noise(C)  # drawn at every step, whatever was accepted
        self.canvas = torch.where(accepted, sampled, fresh)
        if config.stability_threshold == 0:
            stable = True
        else:
            stable = bool((self.history == argmax).all())
            self.history = torch.cat([self.history[1:], argmax[None]])
        self.argmax = argmax
        self.done = stable and float(entropies.mean()) < config.confidence_threshold


def generate(
    model,
    spec: DenoiserSpec,
    prompts: list[list[int]],
    config: DiffusionGemmaConfig,
    *,
    seed: int = 0,
    on_step: StepCallback | None = None,
) -> Generation:
    if not hasattr(model, "denoise"):
        raise DlmcError("the diffusion_gemma decoder needs a DiffusionGemma model (an encoder and a decoder)")
    device = model_device(model)
    C, V = model.arch.canvas_length, spec.vocab_size
    canvases = count_canvases(spec, prompts, config, C)
    eos = torch.tensor(stop_token_ids(spec, config.eos_token_ids), dtype=torch.long, device=device)
    pad = spec.pad_token_id
    B = len(prompts)
    generators = [row_generator(seed, device) for _ in range(B)]
    ids, mask, positions = left_pad([torch.tensor(p, device=device) for p in prompts], pad_token_id(spec))
    mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask
    cache = model.encode(ids, mask, positions, model.empty_cache(B, device))
    next_pos = torch.tensor([len(p) for p in prompts], device=device)  # [B] first canvas position per row
    out = torch.full((B, canvases * C), pad if pad is not None else pad_token_id(spec), dtype=torch.long)
    finished = [False] * B
    nfe = 0
    row_nfe = [0] * B
    for c in range(canvases):
        live = [b for b in range(B) if not finished[b]]
        rows = {b: _Row(generators[b], V, C, device, config.stability_threshold) for b in live}
        canvas_pos = next_pos[:, None] + torch.arange(C, device=device)  # [B, C]
        sc_logits = None
        for steps_left in range(config.max_denoising_steps, 0, -1):
            active = [b for b in live if not rows[b].done]
            if not active:
                break
            current = torch.stack([rows[b].canvas if b in rows else torch.zeros(C, dtype=torch.long, device=device)
                                   for b in range(B)])  # [B, C]; finished rows run on a dummy canvas
            raw = model.denoise(current, canvas_pos, cache, sc_logits)  # [B, C, V] >= fp32
            nfe += 1
            processed = raw.float() / temperature(config, steps_left)  # [B, C, V] fp32
            for b in active:
                rows[b].step(processed[b], config)
                row_nfe[b] += 1
            # A stopped row's logits feed only its own (ignored) rows of the next pass.
            sc_logits = processed.to(model.embed_tokens.weight.dtype)
            if on_step is not None:
                on_step(nfe, sum(C * c + C * rows[b].done for b in live))
        committed = torch.stack([rows[b].argmax if b in rows else torch.zeros(C, dtype=torch.long, device=device)
                                 for b in range(B)])  # [B, C]
        commit(committed, live, eos, pad, out[:, c * C : (c + 1) * C], finished)
        if all(finished) or c == canvases - 1:
            break
        cache = model.encode(committed, torch.ones_like(committed, dtype=torch.bool), canvas_pos, cache)
        next_pos = next_pos + C
    return Generation(out[:, : config.max_new_tokens].tolist(), nfe, row_nfe)
