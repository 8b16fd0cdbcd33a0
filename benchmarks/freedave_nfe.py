"""FreeDave against the static one-token-per-step LLaDA decoder it reproduces, on the embedded model's
held-out task prompts: model calls (NFE), canvases run, wall time, and whether the tokens are identical.

    python benchmarks/freedave_nfe.py                         # 2 prompts per task, drafts 4, gen 128 block 32
    python benchmarks/freedave_nfe.py --per-task 1 --drafts 2 4 8

One model call of FreeDave runs up to `drafts` canvases per prompt, so fewer calls is not less compute:
"canvases" counts every canvas the model ran (the static decoder runs one per prompt per call).
"""

from __future__ import annotations

import argparse
import time

import torch

from dlmc import tasks
from dlmc.decoding import freedave, llada
from dlmc.generation import default_model_dir
from dlmc.models import load_model
from dlmc.tokenizer import load_tokenizer


class CountingModel:
    """The model, counting the canvases (batch rows) it runs."""

    def __init__(self, model):
        self.model, self.spec, self.canvases = model, model.spec, 0

    def __call__(self, input_ids, attention_mask=None, position_ids=None):
        self.canvases += len(input_ids)
        return self.model(input_ids, attention_mask, position_ids)


def run(generate, model, prompts, config):
    counting = CountingModel(model)
    start = time.perf_counter()
    out = generate(counting, model.spec, prompts, config)
    return out, counting.canvases, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--per-task", type=int, default=2, help="held-out prompts per task (4 tasks), one batch")
    ap.add_argument("--drafts", type=int, nargs="+", default=[4])
    ap.add_argument("--gen-length", type=int, default=128)
    ap.add_argument("--block-length", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, tokenizer = load_model(default_model_dir()), load_tokenizer(default_model_dir())
    prompts = [tokenizer.encode(e.prompt) for e in tasks.held_out(args.per_task)]
    base = freedave.FreeDaveConfig(gen_length=args.gen_length, block_length=args.block_length)
    with torch.inference_mode():
        ref, ref_canvases, ref_seconds = run(llada.generate, model, prompts, base.static())
        print(f"| decoder | NFE | NFE ratio | canvases | seconds | identical |\n|---|---|---|---|---|---|")
        print(f"| llada static ({len(prompts)} prompts) | {ref.nfe} | 1.00 | {ref_canvases} | {ref_seconds:.1f} | - |")
        for drafts in args.drafts:
            config = freedave.FreeDaveConfig(gen_length=args.gen_length, block_length=args.block_length, drafts=drafts)
            out, canvases, seconds = run(freedave.generate, model, prompts, config)
            print(f"| freedave drafts={drafts} | {out.nfe} | {out.nfe / ref.nfe:.2f} | {canvases} | {seconds:.1f} | "
                  f"{out.output_ids == ref.output_ids} |", flush=True)


if __name__ == "__main__":
    main()
