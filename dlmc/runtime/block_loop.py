"""The decode loop of a fused block-decoder artifact: Fast-dLLM v2 and SDAR, batch state on device.

It replays `dlmc.decoding.block.generate` (the oracle) on a step built by `fuse_decode {decoder: block}`:
the step samples the rows of the open block itself (`dlmc.passes.block_pick`) and hands back tokens
and their probabilities [B, K], never logits. Each row lives in its own coordinates (column = logical
position) in one canvas [B, W], W the longest row rounded up to whole blocks, masks wherever nothing
is decided yet. A row's step computes the columns from its first uncached one to its end; the head
runs on the K rows that predict the positions it decides: the open block (SDAR), its first sub-block
with masks (Fast-dLLM v2), or for shifted logits the next block's first position (the AR step).

With the exact K/V cache (`causal_cache`), a block's K/V are final once a step's input holds no mask in
it or before it (block-causal attention: a column sees its own block and earlier ones). They are
written in place into a buffer [layers, B, H, W + 1, D] (column W takes the writes that are not
final) and never computed again; a step then runs the open block only, plus the block just completed
for SDAR (its final tokens were never computed) and the prompt at the first step; for shifted logits
also the last cached column, whose row predicts the block's first position. Uncached, every step runs
each row's whole canvas. Rows leave the batch when they finish (length or stop token), and their cache
slots with them. The loop reads back the active rows and the widest query once per step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dlmc.decoding.block import BlockConfig, validate
from dlmc.decoding.common import (
    Generation,
    fill_token_id,
    num_transfer_tokens,
    row_generator,
    stop_token_ids,
)
from dlmc.errors import DlmcError
from dlmc.runtime.kv_buffer import CommittedKV


def check_supported(signature, decoder: str, config: BlockConfig) -> None:
    """One line naming the first decoder setting this fused step cannot run."""
    if decoder != "block":
        raise DlmcError(f"decoder: this artifact fuses the block decoder's rule, not {decoder}'s")
    if "noise" not in signature.names:  # compiled without the sampler: the arg-max, no filters
        for name, value in (("temperature", config.temperature or None), *zip(("top_k", "top_p"), _filters(config))):
            if value is not None:
                raise DlmcError(
                    f"{name}={getattr(config, name)}: this artifact decodes at temperature 0 without filters; "
                    "compile it with fuse_decode {decoder: block, gumbel: true}"
                )
    cache = signature.cache
    if cache is not None and cache["policy"] != "exact":
        raise DlmcError(f"this artifact's {cache['policy']} cache has no fused block loop; it runs with causal_cache")


def _filters(config: BlockConfig) -> tuple[int | None, float | None]:
    """(top_k, top_p) where the reference applies them, else None: Fast-dLLM v2 filters only when it
    samples, SDAR at any temperature, and SDAR's top-p only below 1."""
    if config.remasking == "threshold":
        return None, config.top_p if config.temperature > 0 else None
    return config.top_k, config.top_p if config.top_p is not None and config.top_p < 1 else None


def generate(
    engine,
    prompts: list[list[int]],
    config: BlockConfig,
    seed: int = 0,
    on_step: Callable | None = None,
    on_canvas: Callable | None = None,
) -> Generation:
    """`on_step` and `on_canvas` as the reference decoder calls them (`dlmc.decoding.common`)."""
    spec, sig, device = engine.spec, engine.signature, engine.device
    check_supported(sig, "block", config)
    validate(spec, prompts, config)
    if len(prompts) > sig.batch[1]:
        raise DlmcError(f"prompts: {len(prompts)} rows exceed this artifact's largest batch ({sig.batch[1]})")
    bl, shift, mask = config.block_length or spec.block_size, int(spec.shift_logits), spec.mask_token_id
    threshold_rule = config.remasking == "threshold"
    K = (config.sub_block_length or bl) if threshold_rule else bl  # rows the reference samples per step
    schedule = torch.tensor(num_transfer_tokens(bl, config.denoising_steps or bl), device=device)  # [steps]
    stops = torch.tensor(stop_token_ids(spec, config.stop_token_ids), dtype=torch.long, device=device)  # [S]
    B = len(prompts)
    P = torch.tensor([len(p) for p in prompts], device=device)  # [B] prompt lengths
    target = P + config.gen_length  # [B]
    W = int(((target + bl - 1) // bl * bl).max())  # canvas width: the longest row in whole blocks
    x = torch.full((B, W), mask, dtype=torch.long, device=device)  # [B, W]
    for b, prompt in enumerate(prompts):
        x[b, : len(prompt)] = torch.tensor(prompt, dtype=torch.long, device=device)
    col = torch.arange(W, device=device)  # [W]
    # a shifted model whose prompt fills its last block starts with the AR step; else the open block
    awaiting = (P % bl == 0) & bool(shift)  # [B]
    length = torch.where(awaiting, P, (P // bl + 1) * bl)  # [B]: tokens so far, open block included
    start = length - bl  # [B]: the open block's first column
    steps = torch.zeros(B, dtype=torch.long, device=device)  # [B]: steps taken in the open block
    cached = torch.zeros(B, dtype=torch.long, device=device)  # [B]: leading columns whose K/V are final
    done = torch.zeros(B, dtype=torch.bool, device=device)  # [B]
    row_nfe = torch.zeros(B, dtype=torch.long, device=device)  # [B]: the calls each row took part in
    generators = [row_generator(seed, device) for _ in prompts]
    cache = CommittedKV(sig, B, W, device) if sig.cache is not None else None
    sampling = Sampling(sig, config.temperature, _filters(config), B, K, device)
    offsets = torch.arange(K, device=device)  # [K]
    generated = P[:, None] + torch.arange(config.gen_length, device=device)  # [B, G]: each row's region
    nfe = 0
    while True:
        if threshold_rule:  # Fast-dLLM v2 stops a row before any forward once a stop token is settled
            done |= settled_stop(x, P, length, stops, mask)
        active = (~done).nonzero().squeeze(1)  # [A]
        if len(active) == 0:
            break
        n, ar = length[active], awaiting[active]  # [A] each
        # shifted logits: the last cached row is computed again (its K/V leave the cache for the step), as
        # it predicts the block's first position, a mask when the AR step drew the mask id
        kv = (cached[active] - shift).clamp(min=0)  # [A]: columns read from the cache
        Q = max(int((n - kv).max()), sig.seq[0])  # the widest query
        cols = kv[:, None] + torch.arange(Q, device=device)  # [A, Q]: the columns computed
        valid = cols < n[:, None]  # [A, Q]
        cols = cols.clamp(max=W - 1)
        rows = x[active]  # [A, W]
        blocks = start[active, None] + torch.arange(bl, device=device)  # [A, bl]: the open block's columns
        span = start[active]
        if threshold_rule:  # the first sub-block of the open block that still has masks
            span = span + (rows.gather(1, blocks) == mask).long().argmax(1) // K * K  # [A]
        span = torch.where(ar, n, span)  # [A]: the first position decided this step
        positions = span[:, None] + offsets  # [A, K]; never past W (whole blocks, K <= bl)
        head_rows = (positions - shift - kv[:, None]).clamp(0, Q - 1)  # [A, K]: rows into the query
        inputs = (rows.gather(1, cols), valid, cols)
        if cache is not None:
            inputs += cache.inputs(active, kv)
        tokens, probability, _, *kv_out = engine.run_step(*inputs, head_rows, *sampling(active, ar, generators))
        nfe += 1  # tokens, probability: [A, K]
        row_nfe[active] += 1
        if cache is not None:  # blocks before the input's first mask are final: keep their K/V
            first_mask = torch.where((rows == mask) & (col < n[:, None]), col, W).amin(1)  # [A]
            final = torch.minimum(first_mask, n) // bl * bl  # [A]
            cache.write(cols, valid & (cols < final[:, None]), *kv_out)
            cached[active] = torch.maximum(cached[active], final)

        current = rows.gather(1, positions)  # [A, K]
        masked = (current == mask) & ~ar[:, None]  # [A, K]
        score = torch.where(masked, probability, float("-inf"))  # [A, K]
        if threshold_rule:
            commit = (score > config.threshold).scatter(1, score.argmax(1, keepdim=True), True) & masked
        else:
            commit = _scheduled(score, masked, schedule[steps[active]], config)
        commit = torch.where(ar[:, None], offsets == 0, commit)  # the AR step appends the greedy next token
        # committing the mask token changes nothing; at temperature 0 the same step would repeat forever
        stalled = ~ar & ~(commit & (tokens != mask)).any(1)  # [A]
        if config.temperature == 0 and bool(stalled.any()):
            first = start[active] + (rows.gather(1, blocks) == mask).long().argmax(1)  # [A]: the block's first mask
            raise DlmcError(f"block: the model predicts the mask token itself at position {int(first[stalled][0])} "
                            "at temperature 0; the block would never end")
        rows = rows.scatter(1, positions, torch.where(commit, tokens, current))
        x[active] = rows
        n = n + ar.long()
        complete = ~ar & ~(rows.gather(1, blocks) == mask).any(1)  # [A]: the open block is full
        finished = (ar | complete) & (n >= target[active])
        if not threshold_rule:  # SDAR stops after a block that holds a settled stop token
            finished |= complete & settled_stop(rows, P[active], n, stops, mask)
        opens = (ar | (complete & (not shift))) & ~finished  # [A]: the next block opens now
        n = torch.where(opens, (n // bl + 1) * bl, n)
        length[active], start[active] = n, torch.where(opens, n - bl, start[active])
        steps[active] = torch.where(opens | complete, 0, steps[active] + 1)
        awaiting[active] = complete & ~finished & bool(shift)
        done[active] = finished
        if on_step is not None:
            decided = (x != mask) & (col >= P[:, None]) & (col < target[:, None])  # [B, W]
            on_step(nfe, int(decided.sum()))
        if on_canvas is not None:
            on_canvas(x.gather(1, generated))  # [B, G]: the canvas holds masks where undecided
    out = torch.where(x == mask, fill_token_id(spec), x)  # [B, W]
    outputs = [out[b, len(p) : len(p) + config.gen_length].tolist() for b, p in enumerate(prompts)]
    return Generation(outputs, nfe, row_nfe.tolist())


def _scheduled(score: torch.Tensor, masked: torch.Tensor, k: torch.Tensor, config: BlockConfig) -> torch.Tensor:
    """SDAR's rules on score [A, K] (-inf where not masked): the k [A] most probable masked tokens
    (never more than there are masks); the dynamic rule takes every one above the threshold instead
    when there are at least that many. -> [A, K] bool"""
    count = torch.minimum(k, masked.sum(1))[:, None]  # [A, 1]
    order = torch.sort(score, dim=1, descending=True, stable=True).indices  # [A, K]
    ranks = torch.arange(score.shape[1], device=score.device).expand_as(order)  # [A, K]
    rank = torch.empty_like(order).scatter_(1, order, ranks)  # [A, K]: each token's place by score
    chosen = rank < count  # [A, K]
    if config.remasking == "low_confidence_dynamic":
        confident = score > config.threshold  # [A, K]
        chosen = torch.where(confident.sum(1, keepdim=True) >= count, confident, chosen)
    return chosen


def settled_stop(
    x: torch.Tensor, P: torch.Tensor, length: torch.Tensor, stops: torch.Tensor, mask: int
) -> torch.Tensor:
    """[R] bool: a generated stop token (columns [P, length) of x [R, W]) with no mask before it."""
    col = torch.arange(x.shape[1], device=x.device)  # [W]
    generated = (col >= P[:, None]) & (col < length[:, None])  # [R, W]
    first = torch.where(torch.isin(x, stops) & generated, col, x.shape[1]).amin(1)  # [R]: W when none
    undecided = ((x == mask) & generated & (col < first[:, None])).any(1)  # [R]
    return (first < x.shape[1]) & ~undecided


class Sampling:
    """The fused step's sampling inputs: each row's exponential draws, from its own generator with the
    reference's shape [K, V] and dtype (what torch.multinomial draws), ones at temperature 0 and in the
    AR step (which draws nothing); the temperature and the filters (off: top_k = V, top_p = inf)."""

    def __init__(self, sig, temperature: float, filters: tuple[int | None, float | None], batch: int, rows: int,
                 device):
        """filters: (top_k, top_p) where the reference applies them, else None."""
        self.on = "noise" in sig.names
        if not self.on:
            return
        spec = sig.inputs[sig.names.index("noise")]
        vocab, self.dtype, self.temperature = spec.shape[-1], getattr(torch, spec.dtype), temperature
        self.ones = torch.ones(batch, rows, vocab, dtype=self.dtype, device=device)  # [B, K, V], made once
        top_k, top_p = filters
        self.fixed = (
            torch.tensor([temperature], dtype=torch.float64, device=device),
            torch.tensor([min(top_k or vocab, vocab)], dtype=torch.long, device=device),
            torch.tensor([top_p or float("inf")], dtype=torch.float64, device=device),
        )

    def __call__(self, active: torch.Tensor, ar: torch.Tensor, generators) -> tuple[torch.Tensor, ...]:
        if not self.on:
            return ()
        noise = self.ones[: len(active)]  # [A, K, V]
        if self.temperature > 0:
            _, K, V = noise.shape
            noise = noise.clone()
            for a, (b, awaiting) in enumerate(zip(active.tolist(), ar.tolist())):
                if not awaiting:
                    g = generators[b]
                    noise[a] = torch.empty(K, V, dtype=self.dtype, device=g.device).exponential_(1, generator=g)
        return (noise, *self.fixed)

