"""The decode loop of a fused artifact: LLaDA's sampler and Fast-dLLM v1's rules, batch state on device.

It replays `dlmc.decoding.llada.generate` (the oracle) on a step built by the fuse_decode pass: the
step reduces the committable rows itself and hands back tokens and confidences [B, K], never logits.
The whole batch is one left-padded canvas [B, L] that the loop edits in place; a row's random draws
come from its own generator with the shapes the reference draws, so sampling replays it exactly.

With a dual K/V cache (Fast-dLLM v1, `block_cache {mode: dual}`) a row's step at the start of its
block (or every `refresh` steps) runs the whole canvas and keeps the K/V of every column outside the
block in a buffer; the block's other steps run only the block's rows against that buffer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from dlmc import strategies
from dlmc.artifact import FUSED_OUTPUTS
from dlmc.decoding.common import (
    Generation,
    fill_undecided,
    pad_token_id,
    row_generator,
    stop_token_ids,
)
from dlmc.decoding.llada import LLaDAConfig, validate
from dlmc.errors import DlmcError
from dlmc.runtime.cache import empty_cache
from dlmc.runtime.policies import policy_from_dict

FUSED_DECODERS = ("llada",)


def check_supported(signature, decoder: str, config) -> None:
    """One line naming the first decoder setting this fused step cannot run."""
    if decoder not in FUSED_DECODERS:
        raise DlmcError(f"decoder: this artifact fuses the {', '.join(FUSED_DECODERS)} decoder's rule, not {decoder}'s")
    for name in ("cfg_scale", "logits_eos_inf", "confidence_eos_eot_inf"):
        if getattr(config, name):
            raise DlmcError(f"{name}: not compiled into this artifact's fused step (it supports the default, off)")
    if config.temperature > 0 and "uniform" not in signature.names:
        raise DlmcError(
            f"temperature={config.temperature}: this artifact decodes at temperature 0 only; "
            "compile it with fuse_decode {gumbel: true} to sample"
        )
    cache = signature.cache
    # The block length stays a run-time setting: the fused step's row and cache dims are dynamic, and
    # the loop, not the graph, decides which columns are cached.
    if cache is not None and policy_from_dict(cache).name != "dual":
        raise DlmcError(f"this artifact's {cache['policy']} cache has no fused loop; fuse_decode runs with dual")
    strategy = strategies.resolve(config)
    produced = [t.name for t in signature.outputs]
    missing = [name for name in strategy.rule.outputs if name not in produced]
    if missing:
        have = [name for name in strategies.EXTRA_OUTPUTS if name in produced]
        raise DlmcError(
            f"strategy: {strategy.name} reads {', '.join(missing)}, which this artifact's fused step does not "
            f"return (it returns {', '.join(have) or 'no extra outputs'}); compile with fuse_decode "
            f"{{outputs: [{', '.join(strategy.rule.outputs)}]}}"
        )
    if strategy.rule.sees_generation and cache is not None:
        raise DlmcError(f"strategy: {strategy.name} reads every generated position each step; this artifact's "
                        "dual cache computes only the block's (compile it without block_cache)")


@dataclass
class Batch:
    """The canvas of every row, left-padded: prompt, then gen_length masks."""

    x: torch.Tensor  # [B, L] int64
    real: torch.Tensor  # [B, L] bool: not padding
    positions: torch.Tensor  # [B, L] int64: logical positions (padding does not move a token)
    lengths: list[int]  # each row's unpadded canvas length, for its random draws
    start: int  # first generated column (the same for every row)


def generate(
    engine,
    prompts: list[list[int]],
    config: LLaDAConfig,
    seed: int = 0,
    on_step: Callable | None = None,
    on_canvas: Callable | None = None,
) -> Generation:
    """`on_step` and `on_canvas` as the reference decoder calls them (`dlmc.decoding.common`)."""
    spec, sig, device = engine.spec, engine.signature, engine.device
    check_supported(sig, "llada", config)
    validate(spec, prompts, config)
    rule = strategies.resolve(config).build(config)
    batch = canvas(prompts, spec.mask_token_id, pad_token_id(spec), config.gen_length, device)
    B, L = batch.x.shape
    bl, shift = config.block_length, int(spec.shift_logits)
    generators = [row_generator(seed, device) for _ in prompts]
    block = torch.zeros(B, dtype=torch.long, device=device)  # [B]: each row's current block
    steps_in_block = torch.zeros(B, dtype=torch.long, device=device)  # [B]
    steps_taken = torch.zeros(B, dtype=torch.long, device=device)  # [B]
    outputs = _decoded_outputs(sig)
    if sig.cache is None:
        step = _Uncached(engine, batch, shift, len(outputs))
    else:
        step = _DualCache(engine, batch, bl, shift, policy_from_dict(sig.cache).refresh, len(outputs))
    # the columns the rule reads: the block's, or every generated one
    width = config.gen_length if rule.sees_generation else bl
    offsets = torch.arange(width, device=device)  # [K]
    block_offsets = torch.arange(bl, device=device)  # [bl]
    vocab = next((t.shape[-1] for t in sig.inputs if t.name == "uniform"), None)  # rows of the output head
    noise_free = _no_noise(vocab, B, width, device)  # a sampling step's inputs at temperature 0, made once
    nfe = 0
    row_nfe = torch.zeros(B, dtype=torch.long, device=device)  # [B]
    stops = torch.tensor(stop_token_ids(spec, None) if config.stop_at_eos else (), dtype=torch.long, device=device)
    stopped = torch.zeros(B, dtype=torch.bool, device=device)  # [B]: stop_at_eos ended the row
    done = torch.zeros(B, dtype=torch.bool, device=device)  # [B]
    while not bool(done.all()):  # one host sync per step: rows finish blocks when their masks run out
        active = (~done).nonzero().squeeze(1)  # [A]: done rows leave the batch, as in the reference
        lo = batch.start + block[active] * bl  # [A]: first column of each row's block
        first = torch.full_like(lo, batch.start) if rule.sees_generation else lo  # [A]: first column read
        columns = first[:, None] + offsets  # [A, K]: the columns the rule reads
        extra = _draws(config, generators, batch, active, columns, noise_free)
        named = dict(zip(outputs, step(active, lo, columns, extra.step)))  # each [A, K]
        nfe += 1
        row_nfe[active] += 1
        current = batch.x[active].gather(1, columns)  # [A, K]
        masked = current == spec.mask_token_id  # [A, K]
        in_block = (columns >= lo[:, None]) & (columns < lo[:, None] + bl)  # [A, K]
        eligible = masked & in_block
        score = extra.random if config.remasking == "random" else named[rule.score]
        scores = strategies.Scores(
            confidence=torch.where(eligible, score, float("-inf")), eligible=eligible, masked=masked,
            step=steps_in_block[active], total_step=steps_taken[active],
            entropy=named.get("entropy"), margin=named.get("margin"),
        )
        commit = rule.commit(scores, active) & masked
        batch.x[active] = batch.x[active].scatter(1, columns, torch.where(commit, named["tokens"], current))
        steps_in_block[active] += 1
        steps_taken[active] += 1
        block_columns = lo[:, None] + block_offsets  # [A, bl]
        if rule.scheduled:
            full = steps_in_block[active] == config.steps_per_block
        else:
            full = ~((batch.x[active].gather(1, block_columns) == spec.mask_token_id).any(1))  # [A]
        block[active] += full.long()
        steps_in_block[active] = torch.where(full, 0, steps_in_block[active])
        if config.stop_at_eos:  # at a block's end only; the blocks before it held no stop token
            block_tokens = batch.x[active].gather(1, block_columns)  # [A, bl]
            stopped[active] |= full & torch.isin(block_tokens, stops).any(1)
        if rule.sees_generation:  # an early commit fills every generated position: the row is finished
            stopped[active] |= ~(batch.x[active, batch.start :] == spec.mask_token_id).any(1)
        done = (block == config.num_blocks) | stopped
        if on_step is not None:
            on_step(nfe, int((batch.x[:, batch.start :] != spec.mask_token_id).sum()))
        if on_canvas is not None:
            on_canvas(batch.x[:, batch.start :])  # [B, G]: a view; the callback reads it before the next step
    return Generation(output_ids=fill_undecided(batch.x[:, batch.start :], spec), nfe=nfe, row_nfe=row_nfe.tolist())


def _decoded_outputs(signature) -> tuple[str, ...]:
    """The fused step's per-row outputs, in order: the llada rule's, then the extras it was compiled with."""
    names = [t.name for t in signature.outputs]
    fixed = FUSED_OUTPUTS["llada"]
    return (*fixed, *(n for n in names[len(fixed) :] if n in strategies.EXTRA_OUTPUTS))


def canvas(prompts: list[list[int]], mask_id: int, pad_id: int, gen_length: int, device) -> Batch:
    longest = max(len(p) for p in prompts)
    L = longest + gen_length
    x = torch.full((len(prompts), L), pad_id, dtype=torch.long, device=device)  # [B, L]
    real = torch.zeros(len(prompts), L, dtype=torch.bool, device=device)  # [B, L]
    for b, prompt in enumerate(prompts):
        x[b, longest - len(prompt) : longest] = torch.tensor(prompt, dtype=torch.long, device=device)
        real[b, longest - len(prompt) :] = True
    x[:, longest:] = mask_id
    positions = (real.long().cumsum(-1) - 1).clamp(min=0)  # [B, L]
    return Batch(x, real, positions, [len(p) + gen_length for p in prompts], longest)


@dataclass
class _Draws:
    step: tuple[torch.Tensor, ...]  # the fused step's uniform [A, bl, V] and temperature [1], if it samples
    random: torch.Tensor | None  # [A, bl] random-remasking scores


def _draws(config: LLaDAConfig, generators, batch: Batch, active: torch.Tensor, columns: torch.Tensor, noise_free):
    """Each active row's draws, in the reference's order and shapes (over its whole unpadded canvas),
    cut to the block's columns."""
    plain = tuple(t[: len(active)] if t.dim() == 3 else t for t in noise_free)  # [A, bl, V] and [1]
    if config.temperature == 0 and config.remasking != "random":
        return _Draws(plain, None)
    uniforms, randoms = [], []
    for a, b in enumerate(active.tolist()):
        g, length = generators[b], batch.lengths[b]
        own = columns[a] - (batch.x.shape[1] - length)  # [bl]: the block in the row's own coordinates
        if config.temperature > 0:
            vocab = noise_free[0].shape[-1]
            uniform = torch.rand(length, vocab, dtype=torch.float64, generator=g, device=g.device)  # [Lb, V]
            uniforms.append(uniform[own])
        if config.remasking == "random":
            randoms.append(torch.rand(length, generator=g, device=g.device)[own])  # [bl]
    step = plain
    if config.temperature > 0:
        step = (torch.stack(uniforms), torch.tensor([config.temperature], dtype=torch.float64, device=columns.device))
    return _Draws(step, torch.stack(randoms) if randoms else None)


def _no_noise(vocab: int | None, batch: int, block_length: int, device) -> tuple[torch.Tensor, ...]:
    """A sampling step's inputs at temperature 0, where the step takes the plain arg-max."""
    if vocab is None:  # the step does not sample
        return ()
    uniform = torch.ones(batch, block_length, vocab, dtype=torch.float64, device=device)  # [B, bl, V]
    return uniform, torch.zeros(1, dtype=torch.float64, device=device)


class _Uncached:
    """The step over every column of the active rows' canvases; the head on the rows predicting `columns`."""

    def __init__(self, engine, batch: Batch, shift: int, outputs: int):
        self.engine, self.batch, self.shift, self.outputs = engine, batch, shift, outputs

    def __call__(self, active: torch.Tensor, lo: torch.Tensor, columns: torch.Tensor, draws: tuple[torch.Tensor, ...]):
        """The decoded outputs [A, K] of `columns` [A, K] of the active rows."""
        rows = (columns - self.shift).clamp(min=0)  # [A, K]: rows predicting the columns
        b = self.batch
        return self.engine.run_step(b.x[active], b.real[active], b.positions[active], rows, *draws)[: self.outputs]


class _DualCache:
    """Per row: the K/V of every column outside its block's span, from the row's last full step."""

    def __init__(self, engine, batch: Batch, block_length: int, shift: int, refresh: int | None, outputs: int):
        self.engine, self.batch, self.refresh, self.outputs = engine, batch, refresh, outputs
        self.block_length, self.shift = block_length, shift
        self.span = block_length + shift  # rows computed: the block's, and for shifted logits the one before
        B, L = batch.x.shape
        device = batch.x.device
        self.block = torch.full((B,), -1, dtype=torch.long, device=device)  # [B]: block the buffer holds
        self.since = torch.zeros(B, dtype=torch.long, device=device)  # [B]: steps since the last full step
        self.index = torch.zeros(B, L - self.span, dtype=torch.long, device=device)  # [B, C]: cached columns
        self.keys: torch.Tensor | None = None  # [layers, B, kv_heads, C, head_dim], allocated once
        self.values: torch.Tensor | None = None

    def __call__(self, active: torch.Tensor, lo: torch.Tensor, columns: torch.Tensor, draws: tuple[torch.Tensor, ...]):
        """The decoded outputs [A, bl] for the active rows whose blocks start at lo [A] (`columns` are
        the blocks': a cached step computes no others)."""
        block = (lo - self.batch.start) // self.block_length  # [A]
        stale = self.block[active] != block  # [A]: a new block (or a refresh) needs the whole canvas
        if self.refresh is not None:
            stale |= self.since[active] >= self.refresh
        first = lo - self.shift  # [A]: first row computed
        if bool(stale.all()):
            out = self._full(active, first, block, draws)
        elif not bool(stale.any()):
            out = self._cached(active, first, draws)
        else:  # rows at different points of their blocks (the parallel rules): one call for each kind
            full, cached = stale.nonzero().squeeze(1), (~stale).nonzero().squeeze(1)  # into active
            a = self._full(active[full], first[full], block[full], _rows(draws, full))
            b = self._cached(active[cached], first[cached], _rows(draws, cached))
            out = tuple(torch.cat([x, y])[torch.cat([full, cached]).argsort()] for x, y in zip(a, b))
        self.since[active] += 1
        return out

    def _full(self, rows: torch.Tensor, first: torch.Tensor, block: torch.Tensor, draws):
        """The whole canvas, nothing cached; keep the K/V of every column outside the block's span."""
        b = self.batch
        head_rows = first[:, None] + torch.arange(self.block_length, device=first.device)  # [n, bl]
        inputs = (b.x[rows], b.real[rows], b.positions[rows], *empty_cache(self.engine.signature, len(rows), b.x.device))
        *decoded, keys, values = self.engine.run_step(*inputs, head_rows, *draws)
        columns = torch.arange(self.index.shape[1], device=first.device)  # [C]
        index = columns + (columns >= first[:, None]) * self.span  # [n, C]: every column but the span's
        layers, _, heads, _, dim = keys.shape
        if self.keys is None:
            self.keys = keys.new_zeros(layers, len(b.x), heads, len(columns), dim)
            self.values = torch.zeros_like(self.keys)
        gather = index[None, :, None, :, None].expand(layers, -1, heads, -1, dim)  # [layers, n, H, C, D]
        self.keys[:, rows] = keys.gather(3, gather)
        self.values[:, rows] = values.gather(3, gather)
        self.index[rows], self.block[rows], self.since[rows] = index, block, 0
        return tuple(decoded)

    def _cached(self, rows: torch.Tensor, first: torch.Tensor, draws):
        """Only the span's rows, attending to the buffer."""
        b = self.batch
        span = first[:, None] + torch.arange(self.span, device=first.device)  # [n, span]
        head_rows = torch.arange(self.block_length, device=first.device).expand(len(rows), -1)  # [n, bl]
        index = self.index[rows]  # [n, C]
        x, real, positions = b.x[rows], b.real[rows], b.positions[rows]
        # every row: the buffers as they are (indexing would copy the whole cache every step)
        keys, values = (self.keys, self.values) if len(rows) == len(b.x) else (self.keys[:, rows], self.values[:, rows])
        inputs = (x.gather(1, span), real.gather(1, span), positions.gather(1, span),
                  real.gather(1, index), positions.gather(1, index), keys, values)
        return self.engine.run_step(*inputs, head_rows, *draws)[: self.outputs]


def _rows(draws: tuple[torch.Tensor, ...], rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The draws of some rows: the uniforms [A, bl, V] are per row, the temperature [1] is shared."""
    return tuple(d[rows] if d.dim() == 3 else d for d in draws)
