"""The fused WeDLM loop (fuse_decode {decoder: wedlm} artifacts) gives the reference decoder's tokens:
greedy and sampled (top-k, top-p, temperature), one fill per step and parallel fills below the entropy
threshold, batch 1 and a batch of different prompt lengths, on eager, AOTInductor and ONNX Runtime, and
under causal_cache (the committed text's K/V in the loop's buffer, each step computing the window only)
on eager and AOTInductor; stop tokens take rows out of the batch (and the cache); settings the artifact
was not built for are one line."""

import dataclasses

import pytest
import torch

import dlmc.runtime
from dlmc.compiler import compile_model
from dlmc.decoding.wedlm import WeDLMConfig, generate
from dlmc.errors import DlmcError
from dlmc.models import load_model
from dlmc.recipe import parse_recipe
from tests.helpers import MarginRecorder, rounding_tolerance

PROMPTS = [[5, 6, 7, 8], [9, 10, 11, 12, 13, 14]]
BATCHES = ([[5, 6, 7]], PROMPTS)
# the fixture's mask entropies lie near 5 (ln V = 5.6): these thresholds fill several masks in some steps
GREEDY = {
    "one per step": WeDLMConfig(max_new_tokens=12, window_size=4, entropy_threshold=None, pos_penalty=0.03),
    "parallel": WeDLMConfig(max_new_tokens=12, window_size=4, entropy_threshold=5.07),
    "wide window": WeDLMConfig(max_new_tokens=10, window_size=6, entropy_threshold=5.07, pos_penalty=0.03),
}
SAMPLED = {
    "sampled": WeDLMConfig(max_new_tokens=12, window_size=4, entropy_threshold=5.07, temperature=0.8),
    "filtered": WeDLMConfig(max_new_tokens=12, window_size=5, entropy_threshold=5.1, temperature=1.2, top_k=40,
                            top_p=0.9),
}


def compile_wedlm(checkpoint, out, backend="eager", gumbel=True, cache=False, fuse=True):
    passes = [{"fold_constants": {}}, *([{"causal_cache": {}}] if cache else [])]
    if fuse:  # auto: the model's own sampler, wedlm
        passes.append({"fuse_decode": {"decoder": "auto", "gumbel": gumbel}})
    recipe = parse_recipe({"capture": {"max_batch": 4}, "lower": {"backend": backend}, "passes": passes})
    return dlmc.runtime.load(compile_model(checkpoint, recipe, out, force=True))


class EntropyMargins(MarginRecorder):
    """MarginRecorder's logit gaps over the masks, plus WeDLM's fill decisions: the closest a mask's
    adjusted entropy comes to the threshold, and the smallest gap between a row's lowest adjusted entropy
    and its next where that decides (none below the threshold: the lowest one is filled)."""

    def __init__(self, model, config: WeDLMConfig):
        super().__init__(model)
        self.config, self.threshold_gap, self.entropy_gap = config, float("inf"), float("inf")

    def __call__(self, input_ids, attention_mask=None, position_ids=None):
        logits = super().__call__(input_ids, attention_mask, position_ids)  # [B, L, V]
        for b in range(len(logits)):
            masked = input_ids[b] == self.spec.mask_token_id  # [L]
            if not bool(masked.any()):
                continue
            entropy = torch.distributions.Categorical(logits=logits[b, masked]).entropy()  # [M]
            slots = position_ids[b, masked].float()  # [M] logical positions, in order
            adjusted = entropy + (slots - slots[0]) * self.config.pos_penalty  # [M]
            threshold = self.config.entropy_threshold
            if threshold is not None:
                self.threshold_gap = min(self.threshold_gap, float((adjusted - threshold).abs().min()))
            if len(adjusted) > 1 and (threshold is None or not bool((adjusted < threshold).any())):
                lowest = adjusted.sort().values  # [M]
                self.entropy_gap = min(self.entropy_gap, float(lowest[1] - lowest[0]))
        return logits

    def assert_clear(self, reduction: int = 96) -> None:
        super().assert_clear(reduction)
        # an entropy moves by at most about 2 log V times the largest change of a logit
        bound = 2 * rounding_tolerance(torch.float32, reduction, self.scale) * torch.log(torch.tensor(272.0)).item()
        assert self.threshold_gap > bound, f"an entropy at the threshold ({self.threshold_gap:.2g})"
        assert self.entropy_gap > bound, f"near tie in entropies ({self.entropy_gap:.2g})"


def assert_reference_tokens(engine, model, configs, batches=BATCHES):
    parallel = False
    for name, config in configs.items():
        for prompts in batches:
            margins = EntropyMargins(model, config)
            expected = generate(margins, model.spec, prompts, config, seed=3)
            if config.temperature == 0:
                margins.assert_clear()  # every decision clears the rounding tolerance
            actual = engine.generate(prompts, config=config, seed=3)  # the manifest's decoder: wedlm
            assert actual == expected, (name, len(prompts))  # tokens, nfe, each row's nfe
            parallel |= expected.nfe <= config.max_new_tokens  # some step filled more than one mask
    assert parallel, "no config filled masks in parallel: pick other thresholds"


@pytest.mark.parametrize("backend", ["eager", "inductor", "onnxrt"])
def test_reference_tokens(checkpoints, tmp_path, backend):
    engine = compile_wedlm(checkpoints["wedlm"], tmp_path / "fused", backend)
    assert engine.manifest["decode"]["decoder"] == "wedlm" and engine.signature.fused_decoder == "wedlm"
    assert_reference_tokens(engine, load_model(checkpoints["wedlm"]), GREEDY | SAMPLED)


class QueryRecorder:
    """Wraps a cached engine's run_step: checks that every call computes each row's uncached columns
    only (the cached columns and the real query positions tile [0, n) exactly, no column twice) and
    records, per call, how many columns were cached and how many computed."""

    def __init__(self, engine):
        self.run_step, self.calls = engine.run_step, []
        engine.run_step = self

    def __call__(self, input_ids, attention_mask, position_ids, cache_mask, *rest):
        for real, positions, cached in zip(attention_mask, position_ids, cache_mask.sum(1).tolist(), strict=True):
            columns = torch.cat([torch.arange(cached), positions[real]]).sort().values  # [n]
            assert torch.equal(columns, torch.arange(len(columns))), "a column computed twice or skipped"
            self.calls.append((cached, int(real.sum())))
        return self.run_step(input_ids, attention_mask, position_ids, cache_mask, *rest)


@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_cached_reference_tokens(checkpoints, tmp_path, backend):
    """Under causal_cache: the reference decoder's tokens and NFE, greedy and sampled, batch 1 and mixed
    lengths; once the prompt is cached a call computes at most the window and its refill (2 window_size
    rows per sequence), never the committed text."""
    engine = compile_wedlm(checkpoints["wedlm"], tmp_path / "fused", backend, cache=True)
    assert engine.signature.cache["policy"] == "exact" and engine.signature.fused_decoder == "wedlm"
    calls = QueryRecorder(engine).calls
    assert_reference_tokens(engine, load_model(checkpoints["wedlm"]), GREEDY | SAMPLED)
    widest = max(c.window_size for c in (GREEDY | SAMPLED).values())
    assert all(computed <= 2 * widest for cached, computed in calls if cached)
    assert sum(cached for cached, _ in calls) > sum(computed for _, computed in calls)  # most columns came cached


def test_cached_matches_the_unfused_cached_artifact(checkpoints, tmp_path):
    """The fusion changes nothing: the same recipe without fuse_decode (the reference decoder driving the
    cache manager) gives the same tokens and NFE."""
    fused = compile_wedlm(checkpoints["wedlm"], tmp_path / "fused", cache=True)
    unfused = compile_wedlm(checkpoints["wedlm"], tmp_path / "unfused", cache=True, fuse=False)
    for name, config in (GREEDY | SAMPLED).items():
        for prompts in BATCHES:
            expected = unfused.generate(prompts, "wedlm", config, seed=3)
            assert fused.generate(prompts, config=config, seed=3) == expected, (name, len(prompts))


@pytest.mark.parametrize("cache", [False, True])
def test_stop_tokens_take_rows_out_of_the_batch(checkpoints, tmp_path, cache):
    """A stop token row 0 generates early: row 0 leaves the batch (and its cache slot), row 1 decodes on;
    on_step and on_canvas see what the reference's callbacks see."""
    engine = compile_wedlm(checkpoints["wedlm"], tmp_path / "fused", cache=cache)
    model = load_model(checkpoints["wedlm"])
    for name in ("parallel", "sampled"):
        config = (GREEDY | SAMPLED)[name]
        free = generate(model, model.spec, PROMPTS, config, seed=3)
        stop = free.output_ids[0][2]
        assert stop not in free.output_ids[1][:6], "pick another stop token: it must end one row only"
        stopping = dataclasses.replace(config, stop_token_ids=(stop,))
        expected_steps, expected_canvases = [], []
        expected = generate(model, model.spec, PROMPTS, stopping, seed=3, on_step=lambda *a: expected_steps.append(a),
                            on_canvas=lambda g: expected_canvases.append(g.tolist()))
        assert expected.row_nfe[0] < expected.row_nfe[1]  # row 0 left early
        steps, canvases = [], []
        actual = engine.generate(PROMPTS, config=stopping, seed=3, on_step=lambda *a: steps.append(a),
                                 on_canvas=lambda g: canvases.append(g.tolist()))
        assert actual == expected, name
        assert (steps, canvases) == (expected_steps, expected_canvases), name


def test_settings_it_cannot_run_are_one_line(checkpoints, tmp_path):
    greedy = compile_wedlm(checkpoints["wedlm"], tmp_path / "greedy", gumbel=False)
    assert "noise" not in greedy.signature.names
    with pytest.raises(DlmcError, match=r"temperature=0.5: .* compile it with fuse_decode \{decoder: wedlm, gumbel"):
        greedy.generate([[5, 6]], config=WeDLMConfig(max_new_tokens=4, temperature=0.5))
    # filters apply only when the reference samples: no reason to refuse them at temperature 0
    greedy.generate([[5, 6]], config=WeDLMConfig(max_new_tokens=4, top_k=5, top_p=0.5))
    with pytest.raises(DlmcError, match="fuses the wedlm decoder's rule, not llada's"):
        greedy.generate([[5, 6]], "llada")
    with pytest.raises(DlmcError, match="prompts: 5 rows exceed this artifact's largest batch"):
        greedy.generate([[5, 6]] * 5, config=WeDLMConfig(max_new_tokens=4))
    with pytest.raises(DlmcError, match="returns decoded tokens"):
        greedy.step(torch.tensor([[5, 6]]))
