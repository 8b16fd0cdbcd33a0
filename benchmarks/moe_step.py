"""One compiled (AOTInductor) denoising step of an MoE model against a dense model with the same active
parameters: does the MoE step cost what its active experts cost, not what all experts cost?

    python benchmarks/moe_step.py [--rows 32 256] [--calls 5]

Both models are random LLaDA2 checkpoints in the published format (dlmc.testing.moe_fixtures), shaped
like LLaDA2.0-mini scaled down to fit a small CPU: hidden 512 (mini: 2048), 4 layers with the first
dense, GQA 8/2 heads of 64 with half of each head rotated, 64 experts of width 128 in 8 groups (mini:
256 of 512), top-8 from the best 4 groups, one shared expert. The dense model has the same layers with
every MLP dense and as wide as the active experts plus the shared one (8 * 128 + 128), which is also the
MoE model's dense first layer. fp32, batch 1, default recipe; the MoE model twice, its experts captured
in each form (dlmc.models.moe: grouped, the default, and tiled, what the onnxrt lowering uses).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import torch

import dlmc.runtime
from dlmc.capture import CaptureConfig
from dlmc.compiler import compile_model
from dlmc.recipe import default_recipe
from dlmc.testing.moe_fixtures import write_moe_checkpoint

SHAPE = dict(hidden=512, layers=4, heads=8, kv_heads=2, vocab=4096, max_length=1024, block_size=32,
             dtype=torch.float32, shards=2, seed=0, tokenizer=True, chat_template=None)
EXPERTS, TOP_K, WIDTH = 64, 8, 128


def build(root: Path) -> dict[str, Path]:
    (root / "moe").mkdir(), (root / "dense").mkdir()
    active = (TOP_K + 1) * WIDTH  # the dense layers' width: as many parameters as one token's experts
    moe = write_moe_checkpoint("llada2", root / "moe", intermediate=active, expert_size=WIDTH, experts=EXPERTS,
                               top_k=TOP_K, first_dense=1, **SHAPE)
    dense = write_moe_checkpoint("llada2", root / "dense", intermediate=active, expert_size=WIDTH, experts=EXPERTS,
                                 top_k=TOP_K, first_dense=SHAPE["layers"], **SHAPE)
    for path in (moe, dense):  # LLaDA2.0-mini's 8 groups, 4 kept
        config = (path / "config.json").read_text().replace('"n_group": 4', '"n_group": 8')
        (path / "config.json").write_text(config.replace('"topk_group": 2', '"topk_group": 4'))
    return {"moe": moe, "dense": dense}


def step_ms(artifact: Path, rows: int, calls: int) -> float:
    engine = dlmc.runtime.load(artifact)
    ids = torch.randint(0, 4000, (1, rows))
    inputs = (ids, torch.ones(1, rows, dtype=torch.bool), torch.arange(rows)[None])
    engine.run_step(*inputs)  # warm-up
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        engine.run_step(*inputs)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[32, 256])
    parser.add_argument("--calls", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = build(root)
        artifacts = {"dense": compile_model(paths["dense"], None, root / "dense-art")}
        for form in ("grouped", "tiled"):
            recipe = dataclasses.replace(default_recipe(), capture=CaptureConfig(moe_experts=form))
            artifacts[form] = compile_model(paths["moe"], recipe, root / f"{form}-art")
        for rows in args.rows:
            ms = {name: step_ms(path, rows, args.calls) for name, path in artifacts.items()}
            print(f"rows {rows:4d}: dense (same active params) {ms['dense']:8.2f} ms  "
                  + "  ".join(f"moe {form} {ms[form]:8.2f} ms (x{ms[form] / ms['dense']:.2f})"
                              for form in ("grouped", "tiled")))


if __name__ == "__main__":
    main()
