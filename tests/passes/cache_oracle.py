"""A plain eager implementation of the approximate caches, to test the compiled ones against.

It never splits the canvas: every call runs the eager model over the whole canvas, and inside each
attention the K/V of frozen columns are replaced by the ones stored when they were last computed, and
pruned columns are masked out of the keys. The rows the cache would compute see exactly what they see
under the cache, so their logits must match. Batch 1, LLaDA decoder blocks counted from the prompt end.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import dlmc.runtime
from dlmc.compiler import compile_model
from dlmc.decoding import llada
from dlmc.models import load_model


@dataclass
class OraclePolicy:
    policy: str  # prefix | dual | window | delayed | prefill
    prompt_len: int
    mask_id: int
    shift: bool = False  # shifted logits (Dream): the row before each computed column is computed too
    block_length: int | None = None
    refresh: int | None = None
    window: int | None = None

    def block(self, canvas: torch.Tensor) -> tuple[int, int]:
        masks = (canvas == self.mask_id).nonzero()
        first = int(masks[0, 0]) if len(masks) else len(canvas)
        start = self.prompt_len + (first - self.prompt_len) // self.block_length * self.block_length
        return start, min(start + self.block_length, len(canvas))


@dataclass
class FrozenKV(TorchFunctionMode):
    """Substitutes stored K/V in scaled_dot_product_attention, layer by layer, for one [1, L] canvas."""

    frozen: torch.Tensor | None = None  # [L] bool
    pruned: torch.Tensor | None = None  # [L] bool
    keys: list[torch.Tensor] = field(default_factory=list)  # per layer [1, H, L, D]
    values: list[torch.Tensor] = field(default_factory=list)
    fresh_keys: list[torch.Tensor] = field(default_factory=list)
    fresh_values: list[torch.Tensor] = field(default_factory=list)

    def __post_init__(self):
        super().__init__()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        q, k, v = args[:3]
        mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
        layer = len(self.fresh_keys)
        self.fresh_keys.append(k)
        self.fresh_values.append(v)
        if self.frozen is not None:
            k = torch.where(self.frozen[None, None, :, None], self.keys[layer], k)
            v = torch.where(self.frozen[None, None, :, None], self.values[layer], v)
        if self.pruned is not None:
            keep = ~self.pruned[None, None, None, :]  # [1, 1, 1, L]
            mask = keep if mask is None else mask & keep
        return func(q, k, v, attn_mask=mask)


class OracleModel:
    """`oracle(canvas [L]) -> logits [L, V]` under the policy, statefully over one decode."""

    def __init__(self, model: torch.nn.Module, policy: OraclePolicy):
        self.model, self.policy = model, policy
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.kv_tokens: torch.Tensor | None = None
        self.block = None
        self.since_refresh = 0

    def __call__(self, canvas: torch.Tensor) -> torch.Tensor:
        p = self.policy
        masks = canvas == p.mask_id
        length = len(canvas)
        cols = torch.arange(length)
        block = p.block(canvas) if p.block_length else None
        pruned = torch.zeros(length, dtype=torch.bool)
        if p.policy == "window":
            far = masks & (cols >= block[1])
            pruned = far & (far.cumsum(0) > p.window)
        refresh = (
            self.kv_tokens is None
            or (p.refresh is not None and self.since_refresh >= p.refresh)
            or (block is not None and block != self.block)
        )
        if refresh:
            frozen = None
        elif p.policy == "delayed":
            frozen = (self.kv_tokens == canvas) & ~masks
        elif p.policy == "prefill":
            frozen = cols < p.prompt_len
        elif p.policy == "prefix":
            frozen = cols < block[0]
        else:  # dual, window: everything outside the block
            frozen = (cols < block[0]) | (cols >= block[1])
        if frozen is not None:
            if p.shift:
                frozen[:-1] &= frozen[1:].clone()
            frozen = frozen & ~pruned
        mode = FrozenKV(frozen=frozen, pruned=pruned if bool(pruned.any()) else None, keys=self.keys, values=self.values)
        with torch.no_grad(), mode:
            logits = self.model(canvas[None])[0]  # [L, V]
        computed = ~pruned if frozen is None else ~frozen & ~pruned
        if refresh:
            self.keys = [k.clone() for k in mode.fresh_keys]
            self.values = [v.clone() for v in mode.fresh_values]
            self.kv_tokens = torch.full((length,), -1)
            self.block, self.since_refresh = block, 0
        for stored, fresh in ((self.keys, mode.fresh_keys), (self.values, mode.fresh_values)):
            for layer, f in enumerate(fresh):
                stored[layer][:, :, computed] = f[:, :, computed]
        self.kv_tokens[computed] = canvas[computed]
        self.since_refresh += 1
        return logits


def compare_with_oracle(engine, model, config, prompt: list[int], policy: OraclePolicy, read_rows) -> int:
    """Decode `prompt` with the LLaDA decoder on the engine's cache manager, then replay every canvas it
    asked for through the oracle; the rows `read_rows(canvas, block)` (the ones the decoder reads) must
    have the same logits. Returns the number of calls compared."""
    manager = engine.model_for("llada", config)
    calls = []
    serve = manager.forward_rows

    def recording(rows, positions, sequences):
        out = serve(rows, positions, sequences)
        calls.append((rows[0].clone(), out[0].clone()))
        return out

    manager.forward_rows = recording
    llada.generate(manager, engine.spec, [prompt], config)
    oracle = OracleModel(model, policy)
    for canvas, logits in calls:
        expected = oracle(canvas)
        rows = read_rows(canvas, policy.block(canvas) if policy.block_length else None)
        torch.testing.assert_close(logits[rows], expected[rows], rtol=1e-4, atol=1e-4)
    return len(calls)


def block_rows(shift: bool):
    """The rows the LLaDA decoder reads for the current block (one earlier for shifted logits)."""

    def rows(canvas: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
        start, end = block
        return torch.arange(start - shift, end - shift)

    return rows


def engine_builder(checkpoints, root, recipe):
    """`get(family, **options)` -> (engine compiled with `recipe(**options)`, the eager model), each
    compiled once per module."""
    built = {}

    def get(family, **options):
        key = (family, tuple(sorted(options.items())))
        if key not in built:
            out = compile_model(checkpoints[family], recipe(**options), root / f"{family}-{len(built)}")
            built[key] = dlmc.runtime.load(out), load_model(checkpoints[family])
        return built[key]

    return get
