"""The fused Dream loop (fuse_decode {decoder: dream} artifacts) gives the reference decoder's tokens:
every alg, temperature 0 and > 0 (with top_p / top_k, and alg_temp), batch 1 and a batch of different
lengths, on eager, AOTInductor and ONNX Runtime."""

import dataclasses
import math

import pytest
import torch

import dlmc.runtime
from dlmc.compiler import compile_model
from dlmc.decoding.dream import ALGS, DreamConfig, generate
from dlmc.errors import DlmcError
from dlmc.models import load_model
from dlmc.recipe import load_recipe, parse_recipe
from tests.helpers import MarginRecorder, rounding_tolerance

PROMPTS = [[30, 31, 32], [40, 41, 42, 43, 44]]  # every greedy decision clears the rounding tolerance
GREEDY = {alg: DreamConfig(max_new_tokens=8, steps=4, alg=alg, threshold=0.3) for alg in ALGS}
SAMPLED = {
    f"{alg} sampled": DreamConfig(max_new_tokens=8, steps=4, alg=alg, temperature=0.7, top_p=0.9, top_k=40)
    for alg in ALGS
}
DRAWN = {  # positions drawn from softmax(score / alg_temp): torch.multinomial without replacement
    f"{alg} alg_temp": DreamConfig(max_new_tokens=8, steps=4, alg=alg, alg_temp=0.5, temperature=0.5)
    for alg in ("maskgit_plus", "topk_margin", "entropy")
}


def compile_dream(checkpoint, out, backend, **fuse):
    fuse = {"decoder": "dream", "gumbel": True, "filters": True} | fuse
    recipe = parse_recipe({"capture": {"max_batch": 4}, "lower": {"backend": backend},
                           "passes": [{"fold_constants": {}}, {"fuse_decode": fuse}]})
    compile_model(checkpoint, recipe, out, force=True)
    return dlmc.runtime.load(out)


class ScoreMargins(MarginRecorder):
    """MarginRecorder's logit gaps, plus Dream's ranked decisions: over each row's masked positions the
    smallest gap between two scores of an alg, and the closest a probability comes to the threshold."""

    def __init__(self, model, config: DreamConfig):
        super().__init__(model)
        self.config, self.score_gap, self.threshold_gap = config, float("inf"), float("inf")

    def __call__(self, input_ids, attention_mask=None, position_ids=None):
        logits = super().__call__(input_ids, attention_mask, position_ids)  # [B, L, V]
        aligned = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)  # [B, L, V]: row i predicts position i
        for b in range(len(logits)):
            probs = torch.softmax(aligned[b, input_ids[b] == self.spec.mask_token_id], dim=-1)  # [M, V]
            if len(probs) == 0:
                continue
            top2 = probs.topk(2, dim=-1).values  # [M, 2]
            score = {"topk_margin": top2[:, 0] - top2[:, 1],
                     "entropy": (probs * torch.log(probs + 1e-10)).sum(-1)}.get(self.config.alg, top2[:, 0])
            if len(score) > 1:
                self.score_gap = min(self.score_gap, float(score.sort().values.diff().min()))
            self.top_probability = max(self.top_probability, float(top2[:, 0].max()))
            self.vocab = probs.shape[-1]
            self.threshold_gap = min(self.threshold_gap, float((top2[:, 0] - self.config.threshold).abs().min()))
        return logits

    def assert_clear(self, reduction: int) -> None:
        super().assert_clear(reduction)
        tol = rounding_tolerance(torch.float32, reduction, self.scale)
        if self.config.alg != "origin":
            # softmax moves a probability p by at most 2 p times the largest change of a logit; an entropy
            # moves by at most that times log V
            bound = 4 * tol * self.top_probability * (math.log(self.vocab) if self.config.alg == "entropy" else 1)
            assert self.score_gap > bound, f"near tie in {self.config.alg} scores ({self.score_gap:.2g})"
        if self.config.alg == "confidence_threshold":
            gap = self.threshold_gap
            assert gap > 4 * tol * self.top_probability, f"a probability is at the threshold ({gap:.2g})"


@pytest.mark.parametrize("backend", ["eager", "inductor", "onnxrt"])
def test_reference_tokens(checkpoints, tmp_path, backend):
    engine = compile_dream(checkpoints["dream"], tmp_path / "fused", backend)
    assert engine.manifest["decode"]["decoder"] == "dream"
    model = load_model(checkpoints["dream"])
    for name, config in (GREEDY | SAMPLED | DRAWN).items():
        for prompts in (PROMPTS[:1], PROMPTS):
            recorder = ScoreMargins(model, config)
            expected = generate(recorder, model.spec, prompts, config, seed=3)
            if config.temperature == 0:
                recorder.assert_clear(reduction=96)  # every decision clears the rounding tolerance
            actual = engine.generate(prompts, config=config, seed=3)  # the manifest's decoder: dream
            assert (actual.output_ids, actual.nfe) == (expected.output_ids, expected.nfe), (name, len(prompts))


def test_threshold_rows_finish_apart(checkpoints, tmp_path):
    """confidence_threshold extends a row's steps while its quota carries over: rows leave the batch at
    different steps, and the loop still replays each."""
    engine = compile_dream(checkpoints["dream"], tmp_path / "fused", "eager")
    model = load_model(checkpoints["dream"])
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12], [40, 41]]
    finished = set()
    for threshold in (0.05, 0.1, 0.2, 0.3):
        config = DreamConfig(max_new_tokens=8, steps=4, alg="confidence_threshold", threshold=threshold)
        lengths = [generate(model, model.spec, [p], config, seed=3).nfe for p in prompts]
        finished.add(len(set(lengths)) > 1)
        expected = generate(model, model.spec, prompts, config, seed=3)
        actual = engine.generate(prompts, config=config, seed=3)
        assert (actual.output_ids, actual.nfe) == (expected.output_ids, expected.nfe), threshold
    assert True in finished, "no threshold made rows finish apart: pick others"


def test_stop_at_eos_gives_the_reference_tokens(checkpoints, tmp_path):
    """Rows that stop at EOS leave the fused batch after the same step as they leave the reference's."""
    engine = compile_dream(checkpoints["dream"], tmp_path / "fused", "eager")
    model = load_model(checkpoints["dream"])
    stopped_early = False
    for name, config in (GREEDY | SAMPLED).items():
        full = generate(model, model.spec, PROMPTS, config, seed=3)
        # a random fixture says no EOS: make the token row 0 commits first its stop token
        spec = dataclasses.replace(model.spec, eos_token_id=full.output_ids[0][0], eot_token_id=None)
        stopping = dataclasses.replace(config, stop_at_eos=True)
        expected = generate(model, spec, PROMPTS, stopping, seed=3)
        engine.spec = spec  # what the loop reads
        actual = engine.generate(PROMPTS, config=stopping, seed=3)
        assert actual == expected, name  # tokens, nfe and each row's nfe
        stopped_early |= expected.row_nfe[0] < full.row_nfe[0]
    assert stopped_early, "no config made row 0 stop early: pick other prompts"


def test_multinomial_is_argmax_over_exponential_draws():
    """What the fused sampling rests on: torch.multinomial with one sample (and without replacement)
    is argmax (topk) of p / q, q drawn by exponential_ into p's shape, consuming the generator alike."""
    for dtype in (torch.float32, torch.bfloat16):
        for seed in range(20):
            probs = torch.softmax(3 * torch.randn(5, 300, generator=torch.Generator().manual_seed(seed)), -1).to(dtype)
            drawn, replayed = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
            sample = torch.multinomial(probs, 1, replacement=True, generator=drawn).squeeze(-1)  # [5]
            q = torch.empty_like(probs).exponential_(1, generator=replayed)  # [5, 300]
            assert torch.equal(sample, (probs / q).argmax(-1))
            assert torch.equal(torch.rand(4, generator=drawn), torch.rand(4, generator=replayed))


def test_settings_it_cannot_run_are_one_line(checkpoints, tmp_path):
    greedy = compile_dream(checkpoints["dream"], tmp_path / "greedy", "eager", gumbel=False, filters=False)
    config = GREEDY["maskgit_plus"]
    with pytest.raises(DlmcError, match=r"temperature=0.5: .* fuse_decode \{decoder: dream, gumbel: true\}"):
        greedy.generate(PROMPTS, config=dataclasses.replace(config, temperature=0.5))
    with pytest.raises(DlmcError, match=r"top_p=0.9: not compiled into .* filters: true"):
        greedy.generate(PROMPTS, config=dataclasses.replace(config, top_p=0.9))
    with pytest.raises(DlmcError, match=r"top_k=5: not compiled into"):
        greedy.generate(PROMPTS, config=dataclasses.replace(config, top_k=5))
    with pytest.raises(DlmcError, match="fuses the dream decoder's rule, not llada's"):
        greedy.generate(PROMPTS, "llada")
    # top_p = 1 is the reference's "off": the greedy artifact runs it
    model = load_model(checkpoints["dream"])
    off = dataclasses.replace(config, top_p=1.0)
    assert greedy.generate(PROMPTS, config=off).output_ids == generate(model, model.spec, PROMPTS, off).output_ids


def test_the_generic_recipe_picks_the_models_decoder(checkpoints, tmp_path):
    """recipes/cpu-bf16.yaml fuses each checkpoint's own sampler (decoder: auto), recorded resolved."""
    recipe = load_recipe("recipes/cpu-bf16.yaml")
    recipe = dataclasses.replace(recipe, lower=parse_recipe({"lower": {"backend": "eager"}}).lower)
    for family in ("llada", "dream"):
        engine = dlmc.runtime.load(compile_model(checkpoints[family], recipe, tmp_path / family))
        assert engine.signature.fused_decoder == family
        assert engine.manifest["decode"]["decoder"] == family
        assert engine.manifest["recipe"]["passes"][-1]["fuse_decode"]["decoder"] == family
