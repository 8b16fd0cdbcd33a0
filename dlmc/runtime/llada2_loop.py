"""The decode loop of a fused LLaDA2 artifact (`fuse_decode {decoder: llada2}`), batch state on device.

It replays `dlmc.decoding.llada2` (the oracle): LLaDA2.0's `llada2` (threshold with a quota fallback,
minimal_topk, EOS) and LLaDA2.1's `llada2_edit` (mask -> token commits plus token -> token edits, post
steps). The step samples the open block's rows itself (`dlmc.passes.block_pick.pick_llada2`) and hands
back tokens and probabilities [B, block], never logits. The canvas, the columns a step computes and the
sampling inputs are the block loop's (`dlmc.runtime.block_loop`): each row in its own columns of one
canvas [B, W], a step computing the row's columns from its first uncached one to the open block's end.

The exact K/V cache (`causal_cache`): both samplers never change a block once the next one opens, so a
step's K/V of the columns before its open block are final (their tokens were the input, as they are for
good). They go into the buffer in place; the next step recomputes the block just closed once (its last
tokens were never computed) and the open one. The commit rule is static-shape tensor code on [A, block];
the loop reads back the active rows, the widest query and (2.1) whether a row is stuck, once per step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dlmc.decoding.common import Generation, fill_token_id, num_transfer_tokens, row_generator
from dlmc.decoding.llada2 import LLaDA2Config, LLaDA2EditConfig, validate
from dlmc.errors import DlmcError
from dlmc.runtime.block_loop import Sampling, settled_stop
from dlmc.runtime.kv_buffer import CommittedKV

DECODERS = ("llada2", "llada2_edit")


def check_supported(signature, decoder: str, config: LLaDA2Config | LLaDA2EditConfig) -> None:
    """One line naming the first decoder setting this fused step cannot run."""
    if decoder not in DECODERS:
        raise DlmcError(f"decoder: this artifact fuses LLaDA2's samplers ({', '.join(DECODERS)}), not {decoder}'s")
    if "noise" not in signature.names and config.temperature > 0:  # the reference filters only when sampling
        raise DlmcError(f"temperature={config.temperature}: this artifact decodes at temperature 0; compile it "
                        "with fuse_decode {decoder: llada2, gumbel: true}")
    cache = signature.cache
    if cache is not None and cache["policy"] != "exact":
        raise DlmcError(f"this artifact's {cache['policy']} cache has no fused LLaDA2 loop; it runs with causal_cache")


class _State:
    """Every row's decoding state as [B] tensors; the canvas x [B, W] holds masks wherever nothing is decided."""

    def __init__(self, prompts: list[list[int]], gen_length: int, block: int, mask: int, device):
        self.block, self.mask = block, mask
        B = len(prompts)
        self.P = torch.tensor([len(p) for p in prompts], device=device)  # [B] prompt lengths
        self.target = self.P + gen_length  # [B]: the output ends there; the last block may run past it
        W = int(((self.target + block - 1) // block * block).max())  # the longest row in whole blocks
        self.x = torch.full((B, W), mask, dtype=torch.long, device=device)  # [B, W]
        for b, prompt in enumerate(prompts):
            self.x[b, : len(prompt)] = torch.tensor(prompt, dtype=torch.long, device=device)
        self.col = torch.arange(W, device=device)  # [W]
        self.length = (self.P // block + 1) * block  # [B]: tokens so far, the open block included
        self.steps = torch.zeros(B, dtype=torch.long, device=device)  # [B]: 2.0's index into the quotas
        self.post = torch.zeros_like(self.steps)  # [B]: 2.1's steps of the open block begun without masks
        self.done = torch.zeros(B, dtype=torch.bool, device=device)  # [B]

    @property
    def start(self) -> torch.Tensor:
        return self.length - self.block  # [B]: the open block's first column

    def generated(self) -> torch.Tensor:
        """[B, W] bool: the columns decided or open after the prompt, [P, length)."""
        return (self.col >= self.P[:, None]) & (self.col < self.length[:, None])

    def close(self, which: torch.Tensor, stop: torch.Tensor) -> None:
        """Close the open block of the rows in which [B] bool: a row ends where stop [B] or its output is
        complete, else its next block opens (masks are there already) with fresh counters."""
        finished = which & (stop | (self.length >= self.target))
        opens = which & ~finished
        self.done |= finished
        self.length = torch.where(opens, self.length + self.block, self.length)
        self.steps = torch.where(opens, 0, self.steps)
        self.post = torch.where(opens, 0, self.post)


def _threshold_or_quota(score: torch.Tensor, confident: torch.Tensor, quota: torch.Tensor) -> torch.Tensor:
    """LLaDA2's commit on score [A, K] (-inf where not masked): every confident [A, K] position when there
    are at least quota [A] of them, else the quota most probable masked ones (never more than the masks).
    Ties rank the lower column first. -> [A, K] bool"""
    count = torch.minimum(quota, (score > float("-inf")).sum(1))[:, None]  # [A, 1]
    order = torch.sort(score, dim=1, descending=True, stable=True).indices  # [A, K]
    ranks = torch.arange(score.shape[1], device=score.device).expand_as(order)  # [A, K]
    rank = torch.empty_like(order).scatter_(1, order, ranks)  # [A, K]: each position's place by score
    return torch.where(confident.sum(1, keepdim=True) >= quota[:, None], confident, rank < count)


def generate(
    engine,
    prompts: list[list[int]],
    config: LLaDA2Config | LLaDA2EditConfig,
    seed: int = 0,
    on_step: Callable | None = None,
    on_canvas: Callable | None = None,
) -> Generation:
    """`on_step` and `on_canvas` as the reference decoder calls them (`dlmc.decoding.common`)."""
    spec, sig, device = engine.spec, engine.signature, engine.device
    editing = isinstance(config, LLaDA2EditConfig)
    check_supported(sig, DECODERS[editing], config)
    validate(spec, prompts, config)
    if len(prompts) > sig.batch[1]:
        raise DlmcError(f"prompts: {len(prompts)} rows exceed this artifact's largest batch ({sig.batch[1]})")
    bl, mask = spec.block_size, spec.mask_token_id
    if editing:
        schedule = torch.tensor([config.num_to_transfer], device=device)  # [1]: every step's fallback quota
    else:
        steps = min(config.steps or bl, config.gen_length // config.minimal_topk)
        schedule = torch.tensor(num_transfer_tokens(bl, steps), device=device)  # [steps]
    stop_ids = config.stop_token_ids
    if stop_ids is None:  # the official samplers take the one eos_id
        stop_ids = () if spec.eos_token_id is None else (spec.eos_token_id,)
    stops = torch.tensor(stop_ids, dtype=torch.long, device=device)  # [S]
    s = _State(prompts, config.gen_length, bl, mask, device)
    B = len(prompts)
    cached = torch.zeros(B, dtype=torch.long, device=device)  # [B]: leading columns whose K/V are final
    row_nfe = torch.zeros(B, dtype=torch.long, device=device)  # [B]
    generators = [row_generator(seed, device) for _ in prompts]
    cache = CommittedKV(sig, B, s.x.shape[1], device) if sig.cache is not None else None
    filters = (config.top_k, config.top_p if config.top_p is not None and config.top_p < 1 else None)
    sampling = Sampling(sig, config.temperature, filters if config.temperature > 0 else (None, None), B, bl, device)
    offsets = torch.arange(bl, device=device)  # [K = bl]
    region = s.P[:, None] + torch.arange(config.gen_length, device=device)  # [B, G]: each row's output columns
    nfe = 0
    while True:
        if editing:  # the official loop's head: a step begun without masks is a post step; too many close it
            full = ~s.done & ~((s.x == mask) & (s.col >= s.start[:, None]) & (s.col < s.length[:, None])).any(1)
            s.post = s.post + full.long()
            over = full & (s.post > config.max_post_steps)
            s.close(over, _edit_stop(s, stops, config.eos_early_stop))
        active = (~s.done).nonzero().squeeze(1)  # [A]
        if len(active) == 0:
            break
        n, start, kv = s.length[active], s.start[active], cached[active]  # [A] each
        Q = max(int((n - kv).max()), sig.seq[0])  # the widest query
        cols = kv[:, None] + torch.arange(Q, device=device)  # [A, Q]: the columns computed
        valid = cols < n[:, None]  # [A, Q]
        cols = cols.clamp(max=s.x.shape[1] - 1)
        rows = s.x[active]  # [A, W]
        positions = start[:, None] + offsets  # [A, K]: the open block's columns
        head_rows = positions - kv[:, None]  # [A, K]: rows into the query
        inputs = (rows.gather(1, cols), valid, cols)
        if cache is not None:
            inputs += cache.inputs(active, kv)
        draws = sampling(active, torch.zeros_like(active, dtype=torch.bool), generators)
        tokens, probability, argmax, argmax_probability, *kv_out = engine.run_step(*inputs, head_rows, *draws)
        if editing and config.temperature == 0:  # 2.1's greedy token is the arg-max of the logits
            tokens, probability = argmax, argmax_probability  # [A, K] each
        nfe += 1
        row_nfe[active] += 1
        if cache is not None:  # the blocks before the open one never change again: their K/V are final
            cache.write(cols, valid & (cols < start[:, None]), *kv_out)
            cached[active] = torch.maximum(kv, start)

        block = rows.gather(1, positions)  # [A, K]
        masked = block == mask  # [A, K]
        score = torch.where(masked, probability, float("-inf"))  # [A, K]
        quota = schedule[s.steps[active]] if not editing else schedule.expand(len(active))  # [A]
        commit = _threshold_or_quota(score, score > config.threshold, quota)  # [A, K] (none without masks)
        if editing:
            editable = ~masked & (positions >= s.P[active, None])  # [A, K]
            edit = editable & (probability > config.editing_threshold) & (tokens != block)  # [A, K]
            changed = commit | edit
            _check_progress(masked, changed, block, tokens, probability, positions, config)
        else:
            changed = commit
        decided = torch.where(changed, tokens, block)  # [A, K]: the open block after the step
        s.x[active] = rows.scatter(1, positions, decided)
        stepped = torch.zeros(B, dtype=torch.bool, device=device)
        stepped[active] = True
        if editing:  # the block ends at a step begun without masks that edits nothing
            quiet = torch.zeros_like(stepped)
            quiet[active] = ~masked.any(1) & ~edit.any(1)
            s.close(quiet, _edit_stop(s, stops, config.eos_early_stop))
        else:
            still_masked = torch.zeros_like(stepped)
            still_masked[active] = (decided == mask).any(1)
            s.steps = s.steps + stepped.long()
            early = torch.zeros_like(stepped)
            if config.eos_early_stop:  # a stop token committed now, with every position before it decided
                committed = torch.zeros_like(stepped)
                committed[active] = (torch.isin(tokens, stops) & commit).any(1)
                early = committed & settled_stop(s.x, s.P, s.length, stops, mask)
            s.done |= early
            # the quotas add up to the block, so the steps run out with masks left only when the model
            # committed the mask token itself; the official loop then moves on regardless
            ends = stepped & ~early & (~still_masked | (s.steps == len(schedule)))
            s.close(ends, (torch.isin(s.x, stops) & s.generated()).any(1))
        if on_step is not None:
            output = (s.x != mask) & (s.col >= s.P[:, None]) & (s.col < s.target[:, None])  # [B, W] decided
            on_step(nfe, int(output.sum()))
        if on_canvas is not None:
            on_canvas(_canvas(s, region, config, editing))  # [B, G]
    out = torch.where(s.x == mask, fill_token_id(spec), s.x)  # [B, W]
    outputs = [out[b, len(p) : len(p) + config.gen_length].tolist() for b, p in enumerate(prompts)]
    return Generation(outputs, nfe, row_nfe.tolist())


def _edit_stop(s: _State, stops: torch.Tensor, eos_early_stop: bool) -> torch.Tensor:
    """[B] bool, 2.1's stop when a block closes: with eos_early_stop, a generated region free of masks
    holding a stop token (without it every block up to gen_length is decoded)."""
    if not eos_early_stop:
        return torch.zeros_like(s.done)
    generated = s.generated()  # [B, W]
    settled = ~((s.x == s.mask) & generated).any(1)  # [B]
    return settled & (torch.isin(s.x, stops) & generated).any(1)


def _check_progress(masked, changed, block, tokens, probability, positions, config: LLaDA2EditConfig) -> None:
    """The reference's error: a step that changes nothing while masks remain (the model keeps committing
    the mask token) and draws deterministically would repeat forever. All [A, K]."""
    moved = (changed & (block != tokens)).any(1)  # [A]
    if config.temperature == 0:
        deterministic = torch.ones_like(moved)  # [A]
    else:
        deterministic = (probability == 1).all(1)  # [A]: every draw certain
    stuck = masked.any(1) & ~moved & deterministic  # [A]
    if bool(stuck.any()):
        a = int(stuck.nonzero()[0])
        at = int(positions[a][changed[a]][0])
        raise DlmcError(f"llada2_edit: the mask token keeps winning at position {at}; the block would never end")


def _canvas(s: _State, region: torch.Tensor, config, editing: bool) -> torch.Tensor:
    """The reference's canvas [B, G]: the output columns, masks where undecided. With editing, an unfinished
    row's open block reads as masks (an edit may still change it), unless it is full and out of post steps
    (the next loop head closes it without a step)."""
    x = s.x
    if editing:
        open_block = (s.col >= s.start[:, None]) & (s.col < s.length[:, None])  # [B, W]
        full = ~((x == s.mask) & open_block).any(1)  # [B]
        closing = full & (s.post + 1 > config.max_post_steps)
        hidden = (~s.done & ~closing)[:, None] & (s.col >= s.start[:, None])  # [B, W]
        x = torch.where(hidden, s.mask, x)
    return x.gather(1, region)
