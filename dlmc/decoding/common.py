"""Primitives the reference decoders share: schedules, noise, filters, batching and checks.

Every decoder keeps one state per prompt and advances it from that prompt's own logits, so a batch
is only a way to run several prompts through one model call. Three rules make a row of a batch
produce exactly the tokens it produces alone:

* rows are left-padded and carry logical position ids, so padding never moves a token;
* each row draws from its own `torch.Generator` seeded with the caller's seed, with the shapes the
  official single-prompt sampler uses, so a row replays its B=1 run and B=1 replays the official
  sampler run after `torch.manual_seed(seed)`;
* per-row work reads the row's unpadded slice of the logits, never the padded batch.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import torch

from dlmc.errors import DlmcError
from dlmc.spec import DenoiserSpec

Model = Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor | None], torch.Tensor]
"""`model(input_ids [B, L] int64, attention_mask [B, L] bool | None, position_ids [B, L] int64 | None)`
returning raw logits [B, L, V]."""

StepCallback = Callable[[int, int], None]
"""`on_step(nfe, decided)`: called after every model call with the denoiser evaluations so far and the
number of generated positions decided so far, summed over the batch."""

CanvasCallback = Callable[[torch.Tensor], None]
"""`on_canvas(generated)`: called after every step with the generated region of every row,
generated [B, G] int64, `spec.mask_token_id` where a position is still undecided. It may be a view of
the decoder's state: read it during the call, never keep or modify it. For streaming the settled
prefix of each row (`dlmc serve`); only the decoders in `dlmc.decoding.CANVAS_DECODERS` take it."""


@dataclass(frozen=True)
class Generation:
    output_ids: list[list[int]]
    """Generated ids only, one list per prompt, always the requested length. Tokens after an EOS are
    kept as produced; positions a decoder never produced (it stopped at EOS) hold `fill_token_id`."""
    nfe: int
    """Denoiser evaluations of the batch: one per model call, two for a classifier-free-guidance step."""
    row_nfe: list[int]
    """Each row's own denoiser evaluations: the calls that included it (a row that stopped at EOS left
    the batch and stops counting), two for a guided step."""


# ---------------------------------------------------------------------------------------------
# schedules and sampling
# ---------------------------------------------------------------------------------------------


def num_transfer_tokens(mask_count: int, steps: int) -> list[int]:
    """Tokens to unmask at each of `steps` steps: an even split, the remainder going to the first steps.

    LLaDA's linear noise schedule makes the expected number of unmasked tokens equal at every step.
    """
    base, remainder = divmod(mask_count, steps)
    return [base + 1] * remainder + [base] * (steps - remainder)


def gumbel_max_logits(logits: torch.Tensor, temperature: float, generator: torch.Generator) -> torch.Tensor:
    """Scores whose arg-max samples softmax(logits / temperature): exp(l) / (-log u)^T, u ~ U(0, 1).

    Computed in float64 as LLaDA does: low-precision Gumbel-max lowers the effective temperature and
    hurts generation quality (arXiv 2409.02908). At temperature 0 the logits come back untouched
    (the same tensor) and nothing is drawn.
    """
    if temperature == 0:
        return logits
    logits64 = logits.to(torch.float64)  # [..., V] float64
    uniform = torch.rand(logits64.shape, dtype=torch.float64, generator=generator, device=logits64.device)
    return logits64.exp() / (-torch.log(uniform)) ** temperature


def token_probability(logits: torch.Tensor, tokens: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """softmax(logits) in `dtype`, read at `tokens`: the top-1 style confidence."""
    probs = torch.softmax(logits.to(dtype), dim=-1)  # [..., V]
    return probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # [...]


def top_k_filter(logits: torch.Tensor, k: int, fill: float) -> torch.Tensor:
    """Keep the k largest logits of every row (ties with the k-th kept too); the rest become `fill`."""
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k).values[..., -1:]  # [..., 1]
    return logits.masked_fill(logits < kth, fill)


def top_p_filter(logits: torch.Tensor, p: float, fill: float) -> torch.Tensor:
    """Keep the smallest prefix of the sorted vocabulary whose probability reaches p (the token that
    crosses p included); the rest become `fill`."""
    sorted_logits, order = torch.sort(logits, descending=True)  # [..., V], [..., V]
    cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)  # [..., V]
    drop_sorted = cumulative > p
    # shift right so the token that crosses p stays, and the best token always stays
    drop_sorted[..., 1:] = drop_sorted[..., :-1].clone()
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # [..., V] back in vocab order
    return logits.masked_fill(drop, fill)


def sample_categorical(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One draw per row of probs [N, V], the way `torch.distributions.Categorical(probs).sample()` draws
    (it renormalises first), but from `generator`."""
    normalized = probs / probs.sum(-1, keepdim=True)  # [N, V]
    return torch.multinomial(normalized, 1, replacement=True, generator=generator).squeeze(-1)  # [N]


def shift_right(logits: torch.Tensor) -> torch.Tensor:
    """Logits of an AR-initialised model re-aligned so row i predicts position i: row i-1 moves to i and
    row 0 is reused for position 0 (which is always a prompt token)."""
    return torch.cat([logits[:1], logits[:-1]], dim=0)  # [L, V]


def row_generator(seed: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# batching
# ---------------------------------------------------------------------------------------------


def left_pad(
    rows: Sequence[torch.Tensor], pad_id: int, positions: Sequence[torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Stack token rows of different lengths, padding on the left.

    Returns input_ids [B, L], the key-padding mask [B, L] (True = real token; None when no row is padded)
    and position_ids [B, L]: `positions[b]` for the real tokens when given, else cumsum(mask) - 1, so a
    row's positions do not depend on the padding. Pads get position 0; they are masked anyway.
    """
    length = max(len(row) for row in rows)
    device = rows[0].device
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long, device=device)  # [B, L] int64
    real = torch.zeros((len(rows), length), dtype=torch.bool, device=device)  # [B, L] bool
    for b, row in enumerate(rows):
        input_ids[b, length - len(row) :] = row
        real[b, length - len(row) :] = True
    if positions is None:
        position_ids = (real.long().cumsum(-1) - 1).clamp(min=0)  # [B, L] int64
    else:
        position_ids = torch.zeros((len(rows), length), dtype=torch.long, device=device)  # [B, L] int64
        for b, pos in enumerate(positions):
            position_ids[b, length - len(pos) :] = pos
    attention_mask = None if bool(real.all()) else real
    return input_ids, attention_mask, position_ids


def forward_rows(
    model: Model,
    rows: Sequence[torch.Tensor],
    pad_id: int,
    positions: Sequence[torch.Tensor] | None = None,
    sequences: Sequence[Hashable] | None = None,
) -> list[torch.Tensor]:
    """One model call over all rows; returns each row's raw logits [len(row), V], padding cut away.

    `sequences` names the sequence each row is the current canvas of (stable across a decoder's calls).
    A model with a K/V cache (dlmc.runtime.cache.CacheManager) serves the rows from it by those names."""
    if sequences is not None and hasattr(model, "forward_rows"):
        return model.forward_rows(rows, positions, sequences)
    input_ids, attention_mask, position_ids = left_pad(rows, pad_id, positions)
    logits = model(input_ids, attention_mask, position_ids)  # [B, L, V]
    length = input_ids.shape[1]
    return [logits[b, length - len(row) :] for b, row in enumerate(rows)]


def model_device(model: Model) -> torch.device:
    """Where the model wants its inputs: its `device` attribute, else its first parameter, else the CPU."""
    device = getattr(model, "device", None)
    if isinstance(device, (torch.device, str)):
        return torch.device(device)
    if isinstance(model, torch.nn.Module):
        for tensor in (*model.parameters(), *model.buffers()):
            return tensor.device
    return torch.device("cpu")


def pad_token_id(spec: DenoiserSpec) -> int:
    """The id left padding uses. Padded positions are masked out of attention, so any id works."""
    for candidate in (spec.pad_token_id, spec.eos_token_id):
        if candidate is not None:
            return candidate
    return 0


def fill_token_id(spec: DenoiserSpec) -> int:
    """The id written where a decoder stopped early (after EOS) and produced nothing."""
    for candidate in (spec.pad_token_id, spec.eos_token_id):
        if candidate is not None:
            return candidate
    return spec.mask_token_id


def stop_token_ids(spec: DenoiserSpec, configured: tuple[int, ...] | None) -> tuple[int, ...]:
    """The ids that end a generation: the configured ones, else the spec's EOS and end-of-turn ids."""
    if configured is not None:
        return configured
    return tuple(i for i in (spec.eos_token_id, spec.eot_token_id) if i is not None)


def settled_stop(generated: torch.Tensor, stop_ids: tuple[int, ...], mask_id: int) -> bool:
    """True when generated [G] holds a stop token with every position before it decided: nothing up to
    and including it can change any more, so a decoder that stops at EOS may stop this row."""
    at = first_stop(generated, stop_ids)
    return at is not None and not bool((generated[:at] == mask_id).any())


def fill_undecided(generated: torch.Tensor, spec: DenoiserSpec) -> list[int]:
    """generated [..., G] as (nested) id lists, positions a row that stopped early never decided as
    `fill_token_id`."""
    return generated.masked_fill(generated == spec.mask_token_id, fill_token_id(spec)).tolist()


def first_stop(tokens: torch.Tensor, stop_ids: tuple[int, ...]) -> int | None:
    """Index of the first stop token in tokens [N], or None."""
    if not stop_ids:
        return None
    hits = torch.isin(tokens, torch.tensor(stop_ids, device=tokens.device)).nonzero()  # [H, 1]
    return int(hits[0, 0]) if len(hits) else None


# ---------------------------------------------------------------------------------------------
# checks (each raises DlmcError with one line naming the field)
# ---------------------------------------------------------------------------------------------


def check_positive(name: str, value: int) -> None:
    if value < 1:
        raise DlmcError(f"{name}={value} must be at least 1")


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if temperature < 0:
        raise DlmcError(f"temperature={temperature} must be >= 0")
    if top_k is not None and top_k < 1:
        raise DlmcError(f"top_k={top_k} must be at least 1 (or None to disable it)")
    if top_p is not None and not 0 < top_p <= 1:
        raise DlmcError(f"top_p={top_p} must lie in (0, 1] (or be None to disable it)")


def check_unit_interval(name: str, value: float) -> None:
    if not 0 < value <= 1:
        raise DlmcError(f"{name}={value} must lie in (0, 1]")


def check_prompts(spec: DenoiserSpec, prompts: Sequence[Sequence[int]]) -> None:
    """Prompts must be non-empty token lists inside the vocabulary, without the mask token."""
    if spec.pad_token_id is not None and spec.pad_token_id == spec.mask_token_id:
        raise DlmcError(f"spec.pad_token_id={spec.pad_token_id} equals spec.mask_token_id; padding would read as masks")
    if not prompts:
        raise DlmcError("prompts is empty; pass at least one prompt")
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise DlmcError(f"prompts[{i}] is empty; every prompt needs at least one token")
        if spec.mask_token_id in prompt:
            raise DlmcError(f"prompts[{i}] contains the mask token id {spec.mask_token_id}")
        bad = [t for t in prompt if not 0 <= t < spec.vocab_size]
        if bad:
            raise DlmcError(f"prompts[{i}] has token id {bad[0]} outside the vocabulary [0, {spec.vocab_size})")


def check_length(spec: DenoiserSpec, longest: int, what: str) -> None:
    """`longest` is the longest sequence the decoder will feed the model; `what` says how it arises."""
    if longest > spec.max_length:
        raise DlmcError(f"{what} = {longest} tokens exceeds spec.max_length={spec.max_length}")


def check_stop_ids(spec: DenoiserSpec, flag: str) -> None:
    """A config option `flag` that stops at EOS needs the spec to name a stop token."""
    if not stop_token_ids(spec, None):
        raise DlmcError(f"{flag} needs spec.eos_token_id or spec.eot_token_id, which this model does not set")


def check_special_id(spec: DenoiserSpec, field: str, flag: str) -> int:
    """The spec id `field` a config option `flag` needs; it must be set."""
    value = getattr(spec, field)
    if value is None:
        raise DlmcError(f"{flag} needs spec.{field}, which this model does not set")
    return value
