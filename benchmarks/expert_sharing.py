"""expert_sharing (DES-Seq / DES-Vote) on a random LLaDA-MoE checkpoint: unique experts per MoE layer and
step, compiled (AOTInductor) ms per step, and token agreement with the unshared model.

    python benchmarks/expert_sharing.py [--rows 32] [--calls 10]

The checkpoint (dlmc.testing.moe_fixtures) is LLaDA-MoE-7B's shape scaled down for a small CPU: hidden
256, 2 MoE layers, 32 experts of width 64 (7B: 64 of 1024), top-4 (7B: 8), softmax router without
renormalisation, fp32. Unique experts are counted on the eager model, on one random step of `rows`
tokens (batch 1), by the same routing the pass inserts (dlmc.passes.expert_sharing.shared_route).
Token agreement: the llada decoder (gen_length 32, 16 steps, blocks of 8) on four prompts, fraction of
generated tokens equal to the unshared artifact's. Random weights: agreement says how much the routing
moves the outputs, not how accuracy would change on a trained model.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import dlmc.runtime
from dlmc.compiler import compile_model
from dlmc.decoding.llada import LLaDAConfig
from dlmc.models import load_model
from dlmc.models.moe import MoE
from dlmc.passes.expert_sharing import shared_route
from dlmc.recipe import parse_recipe
from dlmc.testing.moe_fixtures import write_moe_checkpoint

SHAPE = dict(hidden=256, layers=2, heads=4, kv_heads=2, vocab=1024, max_length=512, block_size=32,
             dtype=torch.float32, shards=1, seed=0, tokenizer=True, chat_template=None)
EXPERTS, TOP_K, WIDTH = 32, 4, 64
SETTINGS = {"unshared": None, "vote 8": ("vote", 8), "vote 12": ("vote", 12), "seq 1": ("seq", 1)}
PROMPTS = [[5, 6, 7, 8, 9, 10], [40, 41, 42], [100, 7, 300, 12, 9], [64, 65, 66, 67]]


def recipe(setting):
    passes = [] if setting is None else [{"expert_sharing": {"method": setting[0], "budget": setting[1]}}]
    return parse_recipe({"passes": passes, "lower": {"backend": "inductor"}}, "benchmark")


def unique_experts(model, setting, ids: torch.Tensor) -> float:
    """Mean over MoE layers of the experts one step reads (weight > 0), batch 1."""
    counts = []

    def hook(moe, args):
        x = args[0].reshape(-1, args[0].shape[-1])  # [T, D]
        scores = moe.router(x).float().softmax(-1)  # [T, E]; LLaDA-MoE: softmax, no bias, no groups
        if setting is None:
            idx, weights = scores.topk(moe.cfg.top_k, dim=-1).indices, torch.ones(len(x), moe.cfg.top_k)
        else:
            mask = torch.ones(1, len(x), dtype=torch.bool)
            idx, weights = shared_route(scores, scores, mask, method=setting[0], budget=setting[1],
                                        top_k=moe.cfg.top_k)
        counts.append(len(idx[weights > 0].unique()))

    handles = [layer.mlp.register_forward_pre_hook(hook) for layer in model.layers if isinstance(layer.mlp, MoE)]
    with torch.no_grad():
        model(ids, torch.ones_like(ids, dtype=torch.bool), torch.arange(ids.shape[1])[None])
    for h in handles:
        h.remove()
    return statistics.mean(counts)


def step_ms(engine, ids: torch.Tensor, calls: int) -> float:
    inputs = (ids, torch.ones_like(ids, dtype=torch.bool), torch.arange(ids.shape[1])[None])
    engine.run_step(*inputs)  # warm-up
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        engine.run_step(*inputs)
        times.append(time.perf_counter() - start)
    return 1000 * min(times)  # the CPU is shared: the fastest call is the least disturbed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--calls", type=int, default=10)
    args = parser.parse_args()
    ids = torch.randint(0, 1000, (1, args.rows), generator=torch.Generator().manual_seed(0))
    config = LLaDAConfig(gen_length=32, steps=16, block_length=8)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "m").mkdir()
        path = write_moe_checkpoint("llada_moe", root / "m", intermediate=3 * WIDTH, expert_size=WIDTH,
                                    experts=EXPERTS, top_k=TOP_K, **SHAPE)
        model = load_model(path)
        print(f"LLaDA-MoE fixture: {EXPERTS} experts, top-{TOP_K}; step of {args.rows} rows, batch 1")
        reference = None
        for label, setting in SETTINGS.items():
            engine = dlmc.runtime.load(compile_model(path, recipe(setting), root / label.replace(" ", "-")))
            tokens = engine.generate(PROMPTS, config=config).output_ids
            reference = reference or tokens
            pairs = [(a, b) for row, ref in zip(tokens, reference) for a, b in zip(row, ref)]
            agree = sum(a == b for a, b in pairs) / len(pairs)
            print(f"{label:9s} unique experts/layer/step {unique_experts(model, setting, ids):5.1f}  "
                  f"{step_ms(engine, ids, args.calls):7.2f} ms/step  token agreement {100 * agree:5.1f}%")


if __name__ == "__main__":
    main()
