"""WeDLM streaming parallel decoding (Tencent/WeDLM `WeDLMDecoder` + `Sampler`), without a KV cache.

A window of masks follows the committed text. Each step:

1. refill: as many masks are appended to the window as it has leading filled slots (the slots about
   to be committed), so the window holds W masks-or-pending tokens after the commit;
2. forward over [committed text ; window], the window topologically reordered: its filled tokens
   first, then its masks, each in logical order and each carrying its LOGICAL position id. Under
   causal attention every mask then sees every filled token of the window, and the leading filled
   tokens are computed exactly as if they were already committed;
3. commit the leading filled slots (strict left-to-right prefix), stopping at a stop token or at
   max_new_tokens;
4. fill: a token for every remaining mask (greedy, or top-k, top-p, temperature sampling) and the
   entropy of its (unfiltered) distribution plus pos_penalty per slot after the first mask; every
   mask below entropy_threshold is filled, or the single lowest one if none is.

Masks predict their own position (no logit shift). A token filled at step t is committed at step
t + 1 at the earliest, and only once everything to its left is filled.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from dlmc.decoding.common import (
    CanvasCallback,
    Generation,
    Model,
    StepCallback,
    check_length,
    check_positive,
    check_prompts,
    check_sampling,
    fill_token_id,
    forward_rows,
    model_device,
    pad_token_id,
    row_generator,
    stop_token_ids,
    top_k_filter,
    top_p_filter,
)
from dlmc.errors import DlmcError
from dlmc.spec import DenoiserSpec


@dataclass(frozen=True, kw_only=True)
class WeDLMConfig:
    max_new_tokens: int = 128
    window_size: int = 16
    entropy_threshold: float | None = 0.4
    """Fill every mask whose adjusted entropy is below this; None fills one mask per step."""
    pos_penalty: float = 0.02
    """Added to a mask's entropy per window slot it lies after the first mask."""
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    stop_token_ids: tuple[int, ...] | None = None
    """None = the spec's EOS and end-of-turn ids."""

    def __post_init__(self) -> None:
        check_positive("max_new_tokens", self.max_new_tokens)
        check_positive("window_size", self.window_size)
        if self.entropy_threshold is not None and self.entropy_threshold <= 0:
            raise DlmcError(f"entropy_threshold={self.entropy_threshold} must be > 0 (or None)")
        if self.pos_penalty < 0:
            raise DlmcError(f"pos_penalty={self.pos_penalty} must be >= 0")
        check_sampling(self.temperature, self.top_k, self.top_p)


@dataclass(eq=False)
class _Row:
    """One prompt's decoding state."""

    committed: torch.Tensor
    """[C] int64: the prompt, then the committed tokens."""
    prompt_len: int
    limit: int
    """prompt_len + max_new_tokens: no window slot goes past it."""
    generator: torch.Generator
    window: list[int] = field(default_factory=list)
    """Window tokens in logical order (the mask id where still masked); slot k sits at len(committed) + k."""
    filled: list[bool] = field(default_factory=list)
    done: bool = False
    nfe: int = 0
    """Model calls that included this row."""

    @property
    def leading_filled(self) -> int:
        return self.filled.index(False) if False in self.filled else len(self.filled)


def validate(spec: DenoiserSpec, prompts: Sequence[Sequence[int]], config: WeDLMConfig) -> None:
    """Checks that need the model's spec or the prompts; the config checks itself on construction."""
    check_prompts(spec, prompts)
    if spec.attention != "causal":
        raise DlmcError(f"WeDLM decoding needs a causal model, not spec.attention={spec.attention!r}")
    if spec.shift_logits:
        raise DlmcError("WeDLM decoding needs same-position logits (masks predict themselves), but spec.shift_logits")
    longest = max(len(p) for p in prompts)
    check_length(spec, longest + config.max_new_tokens, f"prompt {longest} + max_new_tokens {config.max_new_tokens}")


@torch.no_grad()
def generate(
    model: Model,
    spec: DenoiserSpec,
    prompts: list[list[int]],
    config: WeDLMConfig,
    *,
    seed: int = 0,
    on_step: StepCallback | None = None,
    on_canvas: CanvasCallback | None = None,
) -> Generation:
    validate(spec, prompts, config)
    device = model_device(model)
    rows = [_new_row(prompt, spec, config, seed, device) for prompt in prompts]
    stop_ids = stop_token_ids(spec, config.stop_token_ids)
    pad_id = pad_token_id(spec)
    nfe = 0
    while active := [row for row in rows if not row.done]:
        for row in active:
            _refill(row, spec)
        inputs = [_reordered_input(row) for row in active]
        logits = forward_rows(
            model, [ids for ids, _ in inputs], pad_id, [pos for _, pos in inputs], [id(row) for row in active]
        )
        nfe += 1
        for row, row_logits in zip(active, logits, strict=True):
            row.nfe += 1
            n_filled = sum(row.filled)
            mask_logits = row_logits[len(row.committed) + n_filled :]  # [M, V] the masks, logical order
            _commit(row, stop_ids, config)
            if not row.done:
                _fill(row, mask_logits, config)
        if on_step is not None:
            on_step(nfe, sum(len(row.committed) - row.prompt_len for row in rows))
        if on_canvas is not None:
            on_canvas(torch.stack([_canvas(row, spec, stop_ids, config) for row in rows]))  # [B, G]
    return Generation(output_ids=[_output(row, spec, config) for row in rows], nfe=nfe, row_nfe=[r.nfe for r in rows])


def _new_row(prompt: list[int], spec: DenoiserSpec, config: WeDLMConfig, seed: int, device: torch.device) -> _Row:
    width = min(config.window_size, config.max_new_tokens)
    return _Row(
        committed=torch.tensor(prompt, dtype=torch.long, device=device),  # [P] int64
        prompt_len=len(prompt),
        limit=len(prompt) + config.max_new_tokens,
        generator=row_generator(seed, device),
        window=[spec.mask_token_id] * width,
        filled=[False] * width,
    )


def _refill(row: _Row, spec: DenoiserSpec) -> None:
    """Append one mask per slot this step will commit, never past the generation limit."""
    room = row.limit - len(row.committed) - len(row.window)
    added = min(row.leading_filled, room)
    row.window += [spec.mask_token_id] * added
    row.filled += [False] * added


def _reordered_input(row: _Row) -> tuple[torch.Tensor, torch.Tensor]:
    """[committed ; filled window slots ; masked window slots] and their logical positions."""
    start = len(row.committed)
    order = [k for k, f in enumerate(row.filled) if f] + [k for k, f in enumerate(row.filled) if not f]
    device = row.committed.device
    window_ids = torch.tensor([row.window[k] for k in order], dtype=torch.long, device=device)  # [W'] int64
    window_pos = torch.tensor([start + k for k in order], dtype=torch.long, device=device)  # [W'] int64
    ids = torch.cat([row.committed, window_ids])  # [C + W'] int64
    positions = torch.cat([torch.arange(start, device=device), window_pos])  # [C + W'] int64
    return ids, positions


def _commit(row: _Row, stop_ids: tuple[int, ...], config: WeDLMConfig) -> None:
    """Move the leading filled slots to the committed text, up to and including a stop token."""
    count = row.leading_filled
    taken: list[int] = []
    for token in row.window[:count]:
        taken.append(token)
        if token in stop_ids or len(row.committed) - row.prompt_len + len(taken) >= config.max_new_tokens:
            row.done = True
            break
    row.committed = torch.cat([row.committed, row.committed.new_tensor(taken)])  # [C + n] int64
    row.window, row.filled = row.window[count:], row.filled[count:]
    if row.done:
        row.window, row.filled = [], []


def _fill(row: _Row, mask_logits: torch.Tensor, config: WeDLMConfig) -> None:
    """Fill the masks whose position-adjusted entropy is low enough (at least one)."""
    slots = [k for k, f in enumerate(row.filled) if not f]
    if not slots:
        return
    entropy = torch.distributions.Categorical(logits=mask_logits).entropy()  # [M]
    tokens = _sample(mask_logits, config, row.generator)  # [M] int64
    for i in _positions_to_fill(entropy, slots, config):
        row.window[slots[i]] = int(tokens[i])
        row.filled[slots[i]] = True


def _positions_to_fill(entropy: torch.Tensor, slots: list[int], config: WeDLMConfig) -> list[int]:
    """Indices into `slots` to fill: adjusted entropy below the threshold, else the single lowest."""
    slot_index = torch.tensor(slots, dtype=torch.float32, device=entropy.device)  # [M] float32
    adjusted = entropy + (slot_index - slot_index[0]) * config.pos_penalty  # [M]
    if config.entropy_threshold is not None:
        below = (adjusted < config.entropy_threshold).nonzero(as_tuple=True)[0]  # [F]
        if below.numel() > 0:
            return below.tolist()
    return [int(adjusted.argmin())]


def _sample(logits: torch.Tensor, config: WeDLMConfig, generator: torch.Generator) -> torch.Tensor:
    """Greedy at temperature 0; else top-k, then top-p, then temperature, then one draw per row."""
    if config.temperature == 0:
        return torch.softmax(logits, dim=-1).argmax(dim=-1)  # [M]
    if config.top_k is not None:
        logits = top_k_filter(logits, config.top_k, float("-inf"))
    if config.top_p is not None and config.top_p < 1:
        logits = top_p_filter(logits, config.top_p, float("-inf"))
    probs = torch.softmax(logits / config.temperature, dim=-1)  # [M, V]
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # [M]


def _canvas(row: _Row, spec: DenoiserSpec, stop_ids: tuple[int, ...], config: WeDLMConfig) -> torch.Tensor:
    """The row's generated region [G] int64: the committed tokens, then the window's leading filled slots
    up to and including a stop token (the next step commits exactly these), masks after. A filled slot
    behind a mask is not shown: a stop token filled before it later would drop it."""
    ready = row.window[: row.leading_filled]
    at = next((i for i, token in enumerate(ready) if token in stop_ids), None)
    ready = ready if at is None else ready[: at + 1]
    generated = torch.cat([row.committed[row.prompt_len :], row.committed.new_tensor(ready)])  # [N] int64
    rest = generated.new_full((config.max_new_tokens - len(generated),), spec.mask_token_id)  # [G - N] int64
    return torch.cat([generated, rest])


def _output(row: _Row, spec: DenoiserSpec, config: WeDLMConfig) -> list[int]:
    generated = row.committed[row.prompt_len :].tolist()
    return generated + [fill_token_id(spec)] * (config.max_new_tokens - len(generated))
