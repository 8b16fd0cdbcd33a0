"""The decode loop of a fused artifact: LLaDA's sampler and Fast-dLLM v1's rules, batch state on device.

It replays `dlmc.decoding.llada.generate` (the oracle) on a step built by the fuse_decode pass: the
step reduces the committable rows itself and hands back tokens and confidences [B, K], never logits.
Which of them to commit is the decoding strategy's rule (`dlmc.strategies`) on those [B, K] tensors.
The whole batch is one left-padded canvas [B, L] that the loop edits in place; a row's random draws
come from its own generator with the shapes the reference draws, so sampling replays it exactly.

The loop is a stepping object, `Decoding`: rows join before any step and leave the step they finish,
each at its own step of its own block with its own gen_length, steps, stop_at_eos and seed (per-row
counters, per-row top-k through a rank mask). `generate` (the batch API) adds every prompt and steps
until all have left; `dlmc serve` keeps one `Decoding` running across requests.

With a K/V cache (Fast-dLLM v1's `block_cache {mode: dual}` or `{mode: prefix}`, Window-Diffusion's
`window_pruning`) a row's step at the start of its block (or every `refresh` steps) runs the whole
canvas and keeps K/V in a buffer: dual and window those of every column outside the block, prefix every
column's; the block's other steps run only the block's rows (dual, window) or the block and everything
after it (prefix) against that buffer, and window pruning hides the masks past its window from every
step (`dlmc.runtime.fused_step`). The dKV-Cache policies (`delayed_kv`) have no fused loop.

Host syncs (as gpt-fast's generate.py: the batch's state stays on device, the host only queues work).
Every decision that needs a host value (which rows run a full step, the widths of a step's inputs, when
a row leaves) comes from `Schedule`, the host's copy of each row's place in its decode, kept by the same
rules as the device state. Under LLaDA's schedule (`rule.scheduled`: the top-k rule, low_confidence or
random remasking) that place is known without the tokens, so a step reads nothing back from the device;
the one read left is stop_at_eos's, at a block's end of a row that asked for it. Where the tokens decide
(a rule that ends a block when it is full, threshold, factor, ...; or one that commits the whole
generation early, prophet, sched) each step reads the rows' block ends back once: one sync per step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from dlmc import strategies
from dlmc.artifact import FUSED_OUTPUTS
from dlmc.decoding.common import Generation, fill_undecided, pad_token_id, row_generator, stop_token_ids
from dlmc.decoding.llada import LLaDAConfig, validate
from dlmc.errors import DlmcError
from dlmc.runtime.canvas import Rows, upload
from dlmc.runtime.cuda_graph import step_runner
from dlmc.runtime.fused_step import CACHED_STEPS, Blocks, Uncached
from dlmc.runtime.policies import policy_from_dict
from dlmc.runtime.schedule import Schedule

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
    if cache is not None and policy_from_dict(cache).name not in CACHED_STEPS:
        raise DlmcError(f"this artifact's {cache['policy']} cache has no fused loop; the fused llada loop runs "
                        f"uncached or with the {'/'.join(CACHED_STEPS)} cache")
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
                        f"{cache['policy']} cache decodes the block's rows only (compile it without block_cache)")


def share_key(config: LLaDAConfig) -> tuple:
    """What rows of one running batch must share: the settings of the step call itself (its head rows
    and its one temperature) and the strategy (its rule and parameters; a rule reading every generated
    column also the generation length). Rows may differ in prompt, steps, stop_at_eos and seed, and in
    gen_length unless the rule reads the whole generation: the loop keeps those per row."""
    strategy = strategies.resolve(config)
    width = config.gen_length if strategy.rule.sees_generation else None
    return (config.block_length, config.temperature, config.remasking, strategy, width,
            config.cfg_scale, config.logits_eos_inf, config.confidence_eos_eot_inf)


@dataclass(frozen=True)
class Finished:
    """A row that left the batch: its last block done, or stop_at_eos."""

    handle: int
    generated: torch.Tensor  # [G] int64: the generation region, masks where it never decided
    nfe: int  # the steps it took part in


class Decoding:
    """The fused LLaDA loop as a stepping object: rows join (`add`, taking effect at the next `step`),
    every `step` is one denoising iteration of every row, each at its own step of its own block, and a
    row leaves the batch the step it finishes (returned by `step`) or when `drop`ped.

    A row's tokens are those it gets alone (and the reference decoder's), up to rounding: it draws from
    its own generator, its canvas is left-padded with logical positions, its commit count is its own.
    Uncached, a row joins at any step. With a cache too: its buffer is empty, so its first step is a
    full one (the cache keeps one buffer per row, filled at the row's own block starts)."""

    def __init__(self, engine):
        self.engine, spec, sig = engine, engine.spec, engine.signature
        self.device = engine.device
        self.run = step_runner(engine)  # CUDA graphs on CUDA, kept for the life of the loop
        self.mask_id, self.shift = spec.mask_token_id, int(spec.shift_logits)
        self.rows = Rows(self.mask_id, pad_token_id(spec), self.device)
        self.stops = torch.tensor(stop_token_ids(spec, None), dtype=torch.long, device=self.device)
        self.vocab = next((t.shape[-1] for t in sig.inputs if t.name == "uniform"), None)  # rows of the head
        self.outputs = _decoded_outputs(sig)  # the step's per-row outputs, by name
        self.config: LLaDAConfig | None = None  # the rows' shared settings (share_key), None when empty
        self.rule: strategies.Strategy | None = None  # the shared strategy's rule, made with the first row
        self.nfe = 0
        self._pending: list[tuple[int, list[int], LLaDAConfig, int]] = []
        self._next = 0
        self.handles: list[int] = []  # per row
        self.generators: list[torch.Generator] = []
        self.schedule = Schedule.of([])  # the rows' counters on the host
        self.handle_rows = torch.empty(0, dtype=torch.long)  # [B] on the host: they key a rule's per-row state
        zero = torch.empty(0, dtype=torch.long, device=self.device)
        self.block, self.steps_in_block, self.row_nfe = zero, zero, zero  # [B] each: the same on device
        self.steps_per_block, self.steps = zero, zero  # [B] each
        self.step_fn = None  # made with the first row: its block length sizes the step's head rows
        self.read_width = 0  # columns the rule reads per row: the block's, or the whole generation
        self.noise_free: tuple[torch.Tensor, ...] = ()

    def __len__(self) -> int:
        """Rows running or waiting for the next step."""
        return len(self.handles) + len(self._pending)

    def accepts(self, config: LLaDAConfig) -> bool:
        """Whether a row with this config can join the rows decoding now."""
        return self.config is None or share_key(config) == share_key(self.config)

    def add(self, prompt: list[int], config: LLaDAConfig, seed: int = 0) -> int:
        """Queue a row for the next step; returns its handle."""
        check_supported(self.engine.signature, "llada", config)
        validate(self.engine.spec, [prompt], config)
        if not self.accepts(config):
            raise DlmcError(f"block_length, temperature, remasking and strategy: a row joining this batch must "
                            f"share them ({share_key(self.config)[:4]}, got {share_key(config)[:4]})")
        self.config = self.config or config
        handle, self._next = self._next, self._next + 1
        self._pending.append((handle, list(prompt), config, seed))
        return handle

    def drop(self, handle: int) -> None:
        """Remove a row, waiting or running; its result is never produced."""
        self._pending = [p for p in self._pending if p[0] != handle]
        if handle in self.handles:
            self._leave([h != handle for h in self.handles])

    def step(self) -> list[Finished]:
        """One denoising iteration of every row; the rows that finished, which have left the batch."""
        self._admit()
        if not self.handles:
            return []
        config, rows, rule, bl, host = self.config, self.rows, self.rule, self.config.block_length, self.schedule
        # the step's inputs: on device, but their shapes and the cache's choices from the host's schedule
        lo = rows.start + self.block * bl  # [B]: first column of each row's block
        first = rows.start if rule.sees_generation else lo  # [B]: first column the rule reads
        columns = first[:, None] + torch.arange(self.read_width, device=self.device)  # [B, K]
        extra = _draws(config, self.generators, rows, columns, self.noise_free)
        blocks = Blocks(lo, host.lo(rows.width, bl), host.block)
        named = dict(zip(self.outputs, self.step_fn(blocks, columns, extra.step)))  # each [B, K]
        self.nfe += 1
        self.row_nfe += 1
        current = rows.x.gather(1, columns)  # [B, K]
        masked = current == self.mask_id  # [B, K]
        eligible = masked & (columns >= lo[:, None]) & (columns < lo[:, None] + bl)  # [B, K]: in the block
        score = extra.random if config.remasking == "random" else named[rule.score]
        scores = strategies.Scores(
            confidence=torch.where(eligible, score, float("-inf")), eligible=eligible, masked=masked,
            step=self.steps_in_block, total_step=self.row_nfe - 1, steps_per_block=self.steps_per_block,
            steps=self.steps, entropy=named.get("entropy"), margin=named.get("margin"),
            top_probs=named.get("top_probs"), top_ids=named.get("top_ids"), tokens=named["tokens"],
            host_step=host.step, host_steps_per_block=host.steps_per_block,
        )
        commit = rule.commit(scores, self.handle_rows) & masked
        rows.x.scatter_(1, columns, torch.where(commit, scores.tokens, current))
        block_columns = lo[:, None] + torch.arange(bl, device=self.device)  # [B, bl]
        block_tokens = rows.x.gather(1, block_columns)  # [B, bl]
        self.steps_in_block += 1
        if rule.scheduled:
            full = self.steps_in_block == self.steps_per_block  # [B]
        else:
            full = ~((block_tokens == self.mask_id).any(1))  # [B]
        self.block += full.long()
        self.steps_in_block = torch.where(full, 0, self.steps_in_block)
        done = self._advance(full, masked & ~commit, block_tokens)
        if not any(done):
            return []
        leaving = zip(self.handles, self.generated(), self.schedule.nfe, done)
        finished = [Finished(h, g.clone(), n) for h, g, n, d in leaving if d]
        self._leave([not d for d in done])
        return finished

    def _advance(self, full: torch.Tensor, undecided: torch.Tensor, block_tokens: torch.Tensor) -> list[bool]:
        """The host's schedule takes the step; which rows finished. `full` [B]: whose block the step ended,
        `undecided` [B, K]: the masks left, `block_tokens` [B, bl]: each row's block after the step.

        The device is read, in one transfer, only for what the host cannot know: where
        the tokens end a block, an early commit filling the generation, and whether a stop_at_eos row
        met a stop token (at its block's end only: the blocks before it held none)."""
        host, B, checks = self.schedule, len(self.handles), {}
        ends = host.ends() if self.rule.scheduled else None  # None: the tokens decide
        if ends is None:
            checks["full"] = full
        if self.rule.sees_generation:
            checks["filled"] = ~undecided.any(1)  # [B]
        if any(stop and end for stop, end in zip(host.stop_at_eos, ends or [True] * B)):
            checks["eos"] = torch.isin(block_tokens, self.stops).any(1)  # [B]
        read = dict(zip(checks, torch.stack(list(checks.values())).tolist())) if checks else {}
        ends = read.get("full", ends)
        last = host.advance(ends)
        eos, filled = read.get("eos", [False] * B), read.get("filled", [False] * B)
        return [d or (s and e and x) or f for d, s, e, x, f in zip(last, host.stop_at_eos, ends, eos, filled)]

    def generated(self) -> list[torch.Tensor]:
        """Each running row's generation region [G_b] (views: read them before the next step)."""
        width = self.rows.width
        return [self.rows.x[b, width - g :] for b, g in enumerate(self.schedule.gen)]

    def _admit(self) -> None:
        if not self._pending:
            return
        handles, prompts, configs, seeds = zip(*self._pending)
        self._pending = []
        if self.step_fn is None:
            self._make_step(configs[0])
        grown = self.rows.append(list(prompts), [c.gen_length for c in configs])
        self.step_fn.append(len(prompts), grown)
        self.handles += handles
        self.handle_rows = torch.tensor(self.handles)
        self.generators += [row_generator(seed, self.device) for seed in seeds]
        self.schedule += Schedule.of(list(configs))

        def column(values):
            return torch.tensor(values, dtype=torch.long, device=self.device)

        n = len(configs)
        self.block = torch.cat([self.block, column([0] * n)])
        self.steps_in_block = torch.cat([self.steps_in_block, column([0] * n)])
        self.row_nfe = torch.cat([self.row_nfe, column([0] * n)])
        self.steps_per_block = torch.cat([self.steps_per_block, column([c.steps_per_block for c in configs])])
        self.steps = torch.cat([self.steps, column([c.steps for c in configs])])
        if len(self.handles) > len(self.noise_free[0] if self.noise_free else ()):
            self.noise_free = _no_noise(self.vocab, len(self.handles), self.read_width, self.device)

    def _make_step(self, config: LLaDAConfig) -> None:
        sig, bl = self.engine.signature, config.block_length
        self.rule = strategies.resolve(config).build(config)
        # the columns the rule reads each step: the block's, or every generated one
        self.read_width = config.gen_length if self.rule.sees_generation else bl
        if sig.cache is None:
            self.step_fn = Uncached(self.run, self.rows, self.shift, len(self.outputs))
        else:
            policy = policy_from_dict(sig.cache)
            cached = CACHED_STEPS[policy.name]
            self.step_fn = cached(self.run, sig, self.rows, bl, self.shift, policy, len(self.outputs))

    def _leave(self, keep: list[bool]) -> None:
        cut = self.rows.keep(keep)
        kept = [b for b, k in enumerate(keep) if k]
        rows = upload(kept, self.device)  # [n]: indices, not a mask (indexing by a mask syncs)
        self.step_fn.keep(kept, cut)
        self.rule.forget([h for h, k in zip(self.handles, keep) if not k])  # stable handles: never reused
        self.handles = [h for h, k in zip(self.handles, keep) if k]
        self.handle_rows = torch.tensor(self.handles)
        self.generators = [g for g, k in zip(self.generators, keep) if k]
        self.schedule = self.schedule.keep(keep)
        for name in ("block", "steps_in_block", "row_nfe", "steps_per_block", "steps"):
            setattr(self, name, getattr(self, name)[rows])
        if not len(self):  # empty: the next rows bring their own settings (and block length)
            self.config, self.rule, self.step_fn, self.noise_free = None, None, None, ()


def generate(
    engine,
    prompts: list[list[int]],
    config: LLaDAConfig,
    seed: int = 0,
    on_step: Callable | None = None,
    on_canvas: Callable | None = None,
) -> Generation:
    """Decode prompts as one batch: every row joins at the first step and leaves when it finishes.
    `on_step` and `on_canvas` as the reference decoder calls them (`dlmc.decoding.common`)."""
    decoding = Decoding(engine)
    for prompt in prompts:  # handles 0..B-1: a fresh Decoding numbers its rows in order
        decoding.add(prompt, config, seed)
    generated = torch.full((len(prompts), config.gen_length), engine.spec.mask_token_id, dtype=torch.long,
                           device=engine.device)  # [B, G]: every row's region, a finished row's as it left
    row_nfe = [0] * len(prompts)
    while len(decoding):
        for row in decoding.step():
            generated[row.handle], row_nfe[row.handle] = row.generated, row.nfe
        if on_step is None and on_canvas is None:
            continue
        if decoding.handles:  # every row generates gen_length: the running rows' last G columns
            generated[decoding.handles] = decoding.rows.x[:, -config.gen_length :]
        if on_step is not None:
            on_step(decoding.nfe, int((generated != engine.spec.mask_token_id).sum()))
        if on_canvas is not None:
            on_canvas(generated)  # [B, G]: the callback reads it before the next step
    return Generation(output_ids=fill_undecided(generated, engine.spec), nfe=decoding.nfe, row_nfe=row_nfe)


def _decoded_outputs(signature) -> tuple[str, ...]:
    """The fused step's per-row outputs, in order: the llada rule's, then the extras it was compiled with."""
    names = [t.name for t in signature.outputs]
    fixed = FUSED_OUTPUTS["llada"]
    return (*fixed, *(n for n in names[len(fixed) :] if n in strategies.EXTRA_OUTPUTS))


@dataclass
class _Draws:
    step: tuple[torch.Tensor, ...]  # the fused step's uniform [B, bl, V] and temperature [1], if it samples
    random: torch.Tensor | None  # [B, bl] random-remasking scores


def _draws(config: LLaDAConfig, generators, rows: Rows, columns: torch.Tensor, noise_free) -> _Draws:
    """Each row's draws, in the reference's order and shapes (over its whole unpadded canvas), cut to the
    columns the rule reads."""
    plain = tuple(t[: len(generators)] if t.dim() == 3 else t for t in noise_free)  # [B, bl, V] and [1]
    if config.temperature == 0 and config.remasking != "random":
        return _Draws(plain, None)
    uniforms, randoms = [], []
    for b, (g, length) in enumerate(zip(generators, rows.lengths)):
        own = columns[b] - (rows.width - length)  # [K]: the columns in the row's own coordinates
        if config.temperature > 0:
            vocab = noise_free[0].shape[-1]
            uniform = torch.rand(length, vocab, dtype=torch.float64, generator=g, device=g.device)  # [Lb, V]
            uniforms.append(uniform[own])
        if config.remasking == "random":
            randoms.append(torch.rand(length, generator=g, device=g.device)[own])  # [K]
    step = plain
    if config.temperature > 0:
        # the temperature [1] filled on device: a copy from the host would wait for the queue on CUDA
        step = (torch.stack(uniforms), torch.full_like(noise_free[1], config.temperature))
    return _Draws(step, torch.stack(randoms) if randoms else None)


def _no_noise(vocab: int | None, batch: int, block_length: int, device) -> tuple[torch.Tensor, ...]:
    """A sampling step's inputs at temperature 0, where the step takes the plain arg-max."""
    if vocab is None:  # the step does not sample
        return ()
    uniform = torch.ones(batch, block_length, vocab, dtype=torch.float64, device=device)  # [B, bl, V]
    return uniform, torch.zeros(1, dtype=torch.float64, device=device)
