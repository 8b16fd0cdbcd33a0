"""The fused block loop (fuse_decode {decoder: block} artifacts) gives the block decoder's tokens: Fast-dLLM
v2 and SDAR checkpoints, every remasking rule, temperature 0 and > 0 with filters, batch 1 and a batch
of different lengths (prompts ending inside a block and on its boundary), uncached and with the exact
K/V cache, on eager and AOTInductor; stop tokens take rows out of the batch."""

import dataclasses

import pytest
import torch

import dlmc.runtime
from dlmc.compiler import compile_model
from dlmc.decoding.block import BlockConfig, generate
from dlmc.errors import DlmcError
from dlmc.models import load_model
from dlmc.recipe import parse_recipe
from tests.helpers import rounding_tolerance

PROMPTS = [[5, 6, 7, 8], [9, 10, 11, 12, 13, 14]]  # block 4: the first fills its block, the second ends inside one
BATCHES = ([[5, 6, 7]], PROMPTS)
CONFIGS = {
    "threshold": BlockConfig(gen_length=10, threshold=0.5),
    "sub_blocks": BlockConfig(gen_length=10, threshold=0.3, sub_block_length=2),
    "static": BlockConfig(gen_length=10, remasking="low_confidence_static", denoising_steps=2),
    "dynamic": BlockConfig(gen_length=10, remasking="low_confidence_dynamic", threshold=0.2),
    "threshold_sampled": BlockConfig(gen_length=10, threshold=0.3, temperature=0.8, top_p=0.9),
    "static_sampled": BlockConfig(gen_length=10, remasking="low_confidence_static", temperature=1.0, top_k=40),
    "dynamic_sampled": BlockConfig(
        gen_length=10, remasking="low_confidence_dynamic", threshold=0.2, temperature=0.9, top_k=50, top_p=0.95
    ),
}
FAMILIES = ("fast_dllm_v2", "sdar")


def compile_fused(checkpoint, out, backend="eager", cache=True, gumbel=True):
    passes = [{"fold_constants": {}}, *([{"causal_cache": {}}] if cache else [])]
    passes.append({"fuse_decode": {"decoder": "block", "gumbel": gumbel}})
    recipe = parse_recipe({"capture": {"max_batch": 4}, "passes": passes, "lower": {"backend": backend}})
    return dlmc.runtime.load(compile_model(checkpoint, recipe, out, force=True))


class BlockMargins:
    """An eager model wrapped to record how far the block decoder's decisions at temperature 0 are from
    a tie, over the rows that predict a masked position: the top-2 logit gap (the arg-max), the distance
    of the top-1 probability from the threshold, and the gaps between top-1 probabilities (the schedule's
    ranking). Token identity across kernels is only promised when all three clear the rounding tolerance."""

    def __init__(self, model, threshold: float | None):
        self.model, self.spec, self.threshold = model, model.spec, threshold
        self.device = next(model.parameters()).device
        self.logit_gap = self.threshold_gap = self.confidence_gap = float("inf")
        self.scale = self.top_probability = 0.0

    def __call__(self, input_ids, attention_mask=None, position_ids=None):
        logits = self.model(input_ids, attention_mask, position_ids)  # [B, L, V]
        self.scale = max(self.scale, float(logits.abs().max()))
        masked = input_ids == self.spec.mask_token_id  # [B, L]
        deciding = torch.roll(masked, -1, dims=1) if self.spec.shift_logits else masked  # rows predicting masks
        for b in range(len(logits)):
            rows = logits[b, deciding[b]]  # [n, V]
            if len(rows) == 0:
                continue
            top2 = rows.topk(2, dim=-1).values  # [n, 2]
            self.logit_gap = min(self.logit_gap, float((top2[:, 0] - top2[:, 1]).min()))
            top1 = torch.softmax(rows, dim=-1).amax(-1).sort().values  # [n]
            self.top_probability = max(self.top_probability, float(top1[-1]))
            if self.threshold is not None:
                self.threshold_gap = min(self.threshold_gap, float((top1 - self.threshold).abs().min()))
            if len(top1) > 1:
                self.confidence_gap = min(self.confidence_gap, float(top1.diff().min()))
        return logits

    def assert_clear(self, reduction: int = 96) -> None:
        tol = rounding_tolerance(torch.float32, reduction, self.scale)
        assert self.logit_gap > 2 * tol, f"near tie in the logits ({self.logit_gap:.2g}): pick other prompts"
        # softmax moves a probability p by at most 2 p times the largest change of a logit
        limit = 4 * tol * self.top_probability
        assert self.threshold_gap > limit, f"a probability near the threshold ({self.threshold_gap:.2g})"
        assert self.confidence_gap > limit, f"near tie in probabilities ({self.confidence_gap:.2g})"


def assert_reference_tokens(engine, model, configs, batches=BATCHES):
    for name, config in configs.items():
        for prompts in batches:
            uses_threshold = config.remasking != "low_confidence_static"
            margins = BlockMargins(model, config.threshold if uses_threshold else None)
            expected = generate(margins, model.spec, prompts, config, seed=3)
            if config.temperature == 0:
                margins.assert_clear()  # every decision clears the rounding tolerance
            actual = engine.generate(prompts, config=config, seed=3)  # the manifest's decoder: block
            assert actual == expected, (name, len(prompts))  # tokens, nfe, each row's nfe


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("cache", [True, False], ids=["cached", "uncached"])
def test_reference_tokens_eager(checkpoints, tmp_path, family, cache):
    engine = compile_fused(checkpoints[family], tmp_path / "fused", cache=cache)
    assert engine.manifest["decode"]["decoder"] == "block"
    assert_reference_tokens(engine, load_model(checkpoints[family]), CONFIGS)


@pytest.mark.parametrize("family", ["fast_dllm_v2", pytest.param("sdar", marks=pytest.mark.slow)])
def test_reference_tokens_inductor(checkpoints, tmp_path, family):
    engine = compile_fused(checkpoints[family], tmp_path / "fused", "inductor")
    names = ("threshold", "static", "threshold_sampled", "dynamic_sampled")
    assert_reference_tokens(engine, load_model(checkpoints[family]), {n: CONFIGS[n] for n in names})


@pytest.mark.parametrize("family", FAMILIES)
def test_stop_tokens_take_rows_out_of_the_batch(checkpoints, tmp_path, family):
    """A stop token the first row generates early: that row leaves (its cache slot with it), the other
    row decodes on; both rules check stops where the reference does (every step / after a block)."""
    engine = compile_fused(checkpoints[family], tmp_path / "fused")
    model = load_model(checkpoints[family])
    for name in ("threshold", "static_sampled"):
        free = generate(model, model.spec, PROMPTS, CONFIGS[name], seed=3)
        stop = free.output_ids[0][1]
        assert stop not in free.output_ids[1][:4], "pick another stop token: it must end one row only"
        config = dataclasses.replace(CONFIGS[name], stop_token_ids=(stop,))
        expected = generate(model, model.spec, PROMPTS, config, seed=3)
        assert expected.nfe < free.nfe  # the stop shortened the run
        steps, expected_steps = [], []
        actual = engine.generate(PROMPTS, config=config, seed=3, on_step=lambda *a: steps.append(a))
        generate(model, model.spec, PROMPTS, config, seed=3, on_step=lambda *a: expected_steps.append(a))
        assert (actual.output_ids, actual.nfe, steps) == (expected.output_ids, expected.nfe, expected_steps), name


def test_settings_it_cannot_run_are_one_line(checkpoints, tmp_path):
    greedy = compile_fused(checkpoints["sdar"], tmp_path / "greedy", gumbel=False)
    with pytest.raises(DlmcError, match=r"temperature=0.5: .* compile it with fuse_decode \{decoder: block, gumbel"):
        greedy.generate([[5, 6]], config=BlockConfig(gen_length=4, temperature=0.5))
    with pytest.raises(DlmcError, match="top_k=5: this artifact decodes at temperature 0 without filters"):
        greedy.generate([[5, 6]], config=BlockConfig(gen_length=4, remasking="low_confidence_static", top_k=5))
    # filters the reference does not apply are no reason to refuse
    greedy.generate([[5, 6]], config=BlockConfig(gen_length=4, top_p=0.5))  # Fast-dLLM v2 at T = 0
    with pytest.raises(DlmcError, match="fuses the block decoder's rule, not llada's"):
        greedy.generate([[5, 6]], "llada")
    with pytest.raises(DlmcError, match="prompts: 5 rows exceed this artifact's largest batch"):
        greedy.generate([[5, 6]] * 5, config=BlockConfig(gen_length=4))
    with pytest.raises(DlmcError, match="returns decoded tokens"):
        greedy.step(torch.tensor([[5, 6]]))


@pytest.mark.parametrize("family", FAMILIES)
def test_on_canvas_is_the_references_and_changes_nothing(checkpoints, tmp_path, family):
    engine = compile_fused(checkpoints[family], tmp_path / "fused")
    model, config = load_model(checkpoints[family]), CONFIGS["sub_blocks"]
    margins = BlockMargins(model, config.threshold)
    expected: list = []
    reference = generate(margins, model.spec, PROMPTS, config, seed=3, on_canvas=lambda g: expected.append(g.tolist()))
    margins.assert_clear()  # every decision clears the rounding tolerance: the canvases are the same tokens
    canvases: list = []
    actual = engine.generate(PROMPTS, config=config, seed=3, on_canvas=lambda g: canvases.append(g.tolist()))
    assert actual == engine.generate(PROMPTS, config=config, seed=3) == reference  # the hook changes nothing
    assert canvases == expected and len(canvases) == actual.nfe


@pytest.mark.parametrize("name", ["threshold", "static"])
def test_a_step_that_commits_the_mask_token_is_one_line_not_a_hang(checkpoints, tmp_path, name):
    """As the reference decoder (tests/decoding/test_block.py): at temperature 0 a step whose chosen tokens
    are all the mask token changes nothing and would repeat forever."""
    engine = compile_fused(checkpoints["sdar"], tmp_path / "fused", gumbel=False)
    run_step, mask = engine.run_step, engine.spec.mask_token_id

    def predicts_the_mask(*inputs):
        tokens, *rest = run_step(*inputs)
        return (torch.full_like(tokens, mask), *rest)

    engine.run_step = predicts_the_mask
    with pytest.raises(DlmcError, match="block: the model predicts the mask token itself at position 3 at temperature"):
        engine.generate([[5, 6, 7]], config=CONFIGS[name])
