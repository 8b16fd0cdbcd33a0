"""The decode loop of a fused Dream artifact: Dream's sampler, every alg, batch state on device.

It replays `dlmc.decoding.dream.generate` (the oracle) on a step built by `fuse_decode {decoder:
dream}`: the step runs the output head on the masked rows of the generation region only and hands
back each row's token, probability, top1 - top2 margin and negative entropy [B, K]; which of them to
commit is decided here with masks and sorts over [B, K]. The batch is one left-padded canvas [B, L].

Randomness replays the reference exactly: before each step every row draws from its own generator
what the reference draws in that step, in its order and shapes (origin's flip uniforms, then the
Exp(1) variates torch.multinomial would draw for the sampled rows, which the step turns into the
same sample as argmax(p / q)); alg_temp's draw of positions needs the step's scores, so it is the
reference's own torch.multinomial call on the row's scores after the step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dlmc.decoding.common import Generation, fill_undecided, pad_token_id, row_generator, stop_token_ids
from dlmc.decoding.dream import DreamConfig, validate
from dlmc.errors import DlmcError
from dlmc.runtime.canvas import Batch, canvas

NO_TOP_K = 2**31 - 1
"""The top_k input that keeps every token."""
SCORES = {"maskgit_plus": "probability", "topk_margin": "margin", "entropy": "neg_entropy"}
"""Ranked alg -> the step output it ranks by (confidence_threshold ranks by probability too)."""


def check_supported(signature, decoder: str, config: DreamConfig) -> None:
    """One line naming the first decoder setting this fused step cannot run."""
    if decoder != "dream":
        raise DlmcError(f"decoder: this artifact fuses the dream decoder's rule, not {decoder}'s")
    names = signature.names
    if config.temperature > 0 and "exponential" not in names:
        raise DlmcError(f"temperature={config.temperature}: this artifact decodes at temperature 0 only; "
                        "compile it with fuse_decode {decoder: dream, gumbel: true} to sample")
    for name, off in (("top_p", config.top_p is None or config.top_p >= 1), ("top_k", config.top_k is None)):
        if not off and name not in names:
            raise DlmcError(f"{name}={getattr(config, name)}: not compiled into this artifact's fused step; "
                            "compile it with fuse_decode {decoder: dream, filters: true}")
    if signature.cache is not None:
        raise DlmcError(f"this artifact's {signature.cache['policy']} cache has no fused dream loop; it runs uncached")


def generate(
    engine,
    prompts: list[list[int]],
    config: DreamConfig,
    seed: int = 0,
    on_step: Callable | None = None,
    on_canvas: Callable | None = None,
) -> Generation:
    """`on_step` and `on_canvas` as the reference decoder calls them (`dlmc.decoding.common`)."""
    spec, sig, device = engine.spec, engine.signature, engine.device
    check_supported(sig, "dream", config)
    validate(spec, prompts, config)
    batch = canvas(prompts, spec.mask_token_id, pad_token_id(spec), config.max_new_tokens, device)
    B, shift, mask_id = len(prompts), int(spec.shift_logits), spec.mask_token_id
    generators = [row_generator(seed, device) for _ in prompts]
    timesteps = torch.linspace(1, config.eps, config.steps + 1, device=device)  # [steps + 1] float32
    steps = torch.full((B,), config.steps, dtype=torch.long, device=device)  # [B]: confidence_threshold extends
    quota = torch.full((B,), config.max_new_tokens // config.steps, dtype=torch.long, device=device)  # [B]
    carry = torch.zeros(B, dtype=torch.long, device=device)  # [B]
    settings = _settings(sig, config, device)
    stops = torch.tensor(stop_token_ids(spec, None) if config.stop_at_eos else (), dtype=torch.long, device=device)
    stopped = torch.zeros(B, dtype=torch.bool, device=device)  # [B]: stop_at_eos ended the row
    row_nfe = torch.zeros(B, dtype=torch.long, device=device)  # [B]
    step = nfe = 0  # every active row is at the same step: all start together and step every call
    while bool((active_mask := (step < steps) & ~stopped).any()):  # one host sync per step (and one for K below)
        active = active_mask.nonzero().squeeze(1)  # [A]: done rows leave the batch, as in the reference
        region = batch.x[active, batch.start :]  # [A, G]
        masked = region == mask_id  # [A, G]
        n_masked = masked.sum(1)  # [A]
        K = max(int(n_masked.max()), 1)  # the step's head rows: every row's masks, in canvas order
        slots = torch.sort((~masked).to(torch.int8), dim=1, stable=True).indices[:, :K]  # [A, K]: masks first
        valid = torch.arange(K, device=device) < n_masked[:, None]  # [A, K]: a slot holding a mask
        columns = batch.start + slots  # [A, K]
        last = step == steps[active] - 1  # [A]
        ratio = 1 - timesteps[step + 1] / timesteps[step] if config.alg != "confidence_threshold" else None
        flips, noise = _draws(config, sig, generators, active, n_masked, valid, ratio, last)
        tokens, probability, margin, neg_entropy = engine.run_step(
            batch.x[active], batch.real[active], batch.positions[active], columns - shift, *noise, *settings
        )[:4]  # each [A, K]
        nfe += 1
        row_nfe[active] += 1
        scores = {"probability": probability, "margin": margin, "neg_entropy": neg_entropy}
        if config.alg == "origin":
            commit = flips
        elif config.alg == "confidence_threshold":
            score = torch.where(valid, probability, float("-inf"))  # [A, K]
            commit, carry_now = _threshold(score, quota[active] + carry[active], config.threshold)
            extend = (carry_now > 0) & last  # the planned steps are used up: one more, on the carry alone
            carry[active], quota[active] = carry_now, torch.where(extend, 0, quota[active])
            steps[active] += extend.long()
        else:
            score = torch.where(valid, scores[SCORES[config.alg]], float("-inf"))  # [A, K]
            # the official int(mask_count * (1 - s / t)), in float32; every mask at the last step
            count = torch.where(last, n_masked, (n_masked.to(timesteps.dtype) * ratio).long())  # [A]
            if config.alg_temp:
                commit = _drawn_positions(generators, active, batch, slots, score, count, config.alg_temp)
            else:
                commit = _top(score, count)
        commit &= valid
        current = batch.x[active].gather(1, columns)  # [A, K]
        batch.x[active] = batch.x[active].scatter(1, columns, torch.where(commit, tokens, current))
        if config.stop_at_eos:  # every step, as the reference: Dream has no blocks
            stopped[active] = _settled_stop(batch.x[active, batch.start :], stops, mask_id)
        step += 1
        if on_step is not None:
            on_step(nfe, int((batch.x[:, batch.start :] != mask_id).sum()))
        if on_canvas is not None:
            on_canvas(batch.x[:, batch.start :])  # [B, G]: a view; the callback reads it before the next step
    return Generation(output_ids=fill_undecided(batch.x[:, batch.start :], spec), nfe=nfe, row_nfe=row_nfe.tolist())


def _settled_stop(region: torch.Tensor, stops: torch.Tensor, mask_id: int) -> torch.Tensor:
    """[A] bool: the row's generated region [A, G] holds a stop token with no mask before the first."""
    is_stop = torch.isin(region, stops)  # [A, G]
    first = torch.where(is_stop.any(1), is_stop.int().argmax(1), region.shape[1])  # [A]
    before = torch.arange(region.shape[1], device=region.device) < first[:, None]  # [A, G]
    return is_stop.any(1) & ~((region == mask_id) & before).any(1)


def _settings(sig, config: DreamConfig, device) -> tuple[torch.Tensor, ...]:
    """The step's filter inputs, if it takes them: a filter the config leaves off is inf / no limit
    (the step clamps top_k to its vocabulary, as the reference does)."""
    if "top_p" not in sig.names:
        return ()
    top_p = config.top_p if config.top_p is not None and config.top_p < 1 else float("inf")
    top_k = config.top_k if config.top_k is not None else NO_TOP_K
    return (torch.tensor([top_p], dtype=torch.float64, device=device),
            torch.tensor([top_k], dtype=torch.long, device=device))


def _draws(config: DreamConfig, sig, generators, active, n_masked, valid, ratio, last):
    """Each active row's draws before the step, in the reference's order and shapes: origin's flips
    [A, K] bool (None for the other algs) and the step's (exponential [A, K, V], temperature [1]) if it
    samples (ones and 0 at temperature 0: the step then takes the arg-max)."""
    names = sig.names
    if "exponential" not in names and config.alg != "origin":
        return None, ()
    A, K = valid.shape
    device = valid.device
    flips = torch.zeros(A, K, dtype=torch.bool, device=device)  # [A, K]
    spec = sig.inputs[names.index("exponential")] if "exponential" in names else None
    if spec is not None:
        exponential = torch.ones(A, K, spec.shape[-1], dtype=getattr(torch, spec.dtype), device=device)  # [A, K, V]
    for a, (b, m, final) in enumerate(zip(active.tolist(), n_masked.tolist(), last.tolist())):
        g = generators[b]
        sampled = torch.ones(m, dtype=torch.bool, device=device)  # [m]: the rows the reference samples
        if config.alg == "origin":  # each mask flips with probability 1 - s/t, every one at the last step
            sampled = torch.rand(m, generator=g, device=device) < (1 if final else ratio)
            flips[a, :m] = sampled
        if config.temperature > 0 and bool(sampled.any()):
            rows = sampled.nonzero().squeeze(1)  # [F]
            exponential[a, rows] = torch.empty_like(exponential[a, rows]).exponential_(1, generator=g)
    if spec is None:
        return flips, ()
    temperature = torch.tensor([config.temperature], dtype=torch.float64, device=device)
    return flips, (exponential, temperature)


def _top(score: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """The count[a] best of each row: score [A, K], count [A] -> [A, K] bool."""
    k = int(count.max())
    commit = torch.zeros_like(score, dtype=torch.bool)
    if k == 0:
        return commit
    chosen = torch.topk(score, k, dim=-1).indices  # [A, k], best first
    keep = torch.arange(k, device=score.device) < count[:, None]  # [A, k]
    return commit.scatter_(1, chosen, keep)


def _threshold(score: torch.Tensor, count: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Fast-dLLM's confidence_threshold: of each row's count[a] best, the best and every one reaching
    the threshold. score [A, K], count [A] -> (commit [A, K] bool, carry [A]: the count left unused)."""
    k = int(count.max())
    values, chosen = torch.topk(score, k, dim=-1)  # [A, k] each, best first
    j = torch.arange(k, device=score.device)  # [k]
    below = (values < threshold) & (j >= 1) & (j < count[:, None])  # [A, k]
    keep = (j < count[:, None]) & ~below  # [A, k]
    return torch.zeros_like(score, dtype=torch.bool).scatter_(1, chosen, keep), below.sum(1)


def _drawn_positions(generators, active, batch: Batch, slots, score, count, alg_temp: float) -> torch.Tensor:
    """alg_temp > 0: each row draws count[a] positions from softmax(score / alg_temp) over its own
    canvas, with the reference's own torch.multinomial call on its generator (the draw needs the step's
    scores). score [A, K] (-inf where no mask), slots [A, K] -> [A, K] bool."""
    commit = torch.zeros_like(score, dtype=torch.bool)
    width = batch.x.shape[1]
    for a, (b, n) in enumerate(zip(active.tolist(), count.tolist())):
        if n == 0:  # the reference returns before drawing
            continue
        length = batch.lengths[b]
        own = slots[a] + batch.start - (width - length)  # [K]: the slots in the row's own coordinates
        full = torch.full((length,), float("-inf"), dtype=score.dtype, device=score.device)  # [Lb]
        full[own] = score[a]  # -inf on the slots that hold no mask
        weights = torch.softmax(full / alg_temp, dim=-1)  # [Lb]
        chosen = torch.multinomial(weights, n, generator=generators[b])  # [n] positions in the row
        commit[a] = torch.isin(own, chosen)
    return commit
