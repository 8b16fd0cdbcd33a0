"""WeDLM's topological reordering + causal cache, tried on a model not trained for it.

    python benchmarks/reorder_families.py [--per-task 10]

WeDLM decoding needs causal attention: only then is the committed prefix's K/V final, so a plain causal
prefix cache (the causal_cache pass) is exact. A bidirectional model (the embedded LLaDA-format model)
can only use it if its attention is switched to causal. This measures what that costs in task accuracy
on the eager model: the reference LLaDA decoder with its own attention, the same decoder with causal
attention, and the WeDLM decoder (reordering, streaming commit) with causal attention.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from dlmc.decoding.llada import LLaDAConfig
from dlmc.decoding.wedlm import WeDLMConfig
from dlmc.evaluate import evaluate
from dlmc.models import load_model
from dlmc.tokenizer import load_tokenizer

EMBEDDED = Path(__file__).parents[1] / "dlmc" / "data" / "default_model"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--per-task", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = load_model(EMBEDDED)
    tokenizer = load_tokenizer(EMBEDDED)
    bidirectional = model.spec
    causal = dataclasses.replace(bidirectional, attention="causal")
    rows = [
        ("llada decoder, bidirectional (reference)", bidirectional, "llada", LLaDAConfig(gen_length=128, block_length=32)),
        ("llada decoder, causal attention", causal, "llada", LLaDAConfig(gen_length=128, block_length=32)),
        ("wedlm decoder, causal attention", causal, "wedlm", WeDLMConfig(max_new_tokens=128)),
        ("wedlm decoder, causal, 1 token/step", causal, "wedlm", WeDLMConfig(max_new_tokens=128, entropy_threshold=None)),
    ]
    print("| decoding | accuracy | NFE (per batch) | per task |")
    print("|---|---|---|---|")
    for name, spec, decoder, config in rows:
        model.spec = spec  # DiffusionLM builds its attention mask from its spec
        report = evaluate(model, spec, tokenizer, decoder, config, per_task=args.per_task,
                          batch_size=4 * args.per_task)
        print(f"| {name} | {report.accuracy:.1%} | {report.nfe} | {json.dumps(report.per_task)} |", flush=True)


if __name__ == "__main__":
    main()
