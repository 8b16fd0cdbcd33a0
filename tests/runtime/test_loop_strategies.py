"""The fused loop (fuse_decode artifacts) gives the reference decoder's tokens with every decoding
strategy of `dlmc.strategies`, reading the device back once a step where the tokens decide a block's
end; strategies the artifact was not compiled for are refused in one line."""

import pytest

import dlmc.runtime
from dlmc.compiler import compile_model
from dlmc.decoding.llada import LLaDAConfig, generate
from dlmc.errors import DlmcError
from dlmc.models import load_model
from dlmc.recipe import parse_recipe
from tests.helpers import MarginRecorder
from tests.runtime.test_loop import SyncCounter

PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12]]
# The fixture's predictions are flat (top-1 probabilities about 0.022-0.025 over 272 tokens, entropies about
# 5.15 nats, top-2 logit gaps 0.03-0.19): the parameters sit inside those ranges so each rule commits
# several tokens at once, clear of the values by far more than rounding.
STRATEGIES = {
    "top_k": {"name": "top_k"},
    "threshold": {"name": "threshold", "threshold": 0.0235},
    "eb": {"name": "eb", "gamma": 10.4},
    "hierarchical": {"name": "hierarchical", "threshold": 0.0245, "low_threshold": 0.022},
    "local_leap": {"name": "local_leap", "threshold": 0.024, "low_threshold": 0.022, "radius": 1},
    "prophet": {"name": "prophet", "gaps": [0.2, 0.1, 0.05]},
    "sched": {"name": "sched", "high": 0.2, "low": 0.05, "shape": "cosine"},
}


def compile_fused(checkpoint, out, backend, outputs=("entropy", "margin"), cache=False):
    passes = [{"fold_constants": {}}]
    passes += [{"block_cache": {"mode": "dual", "block_length": 4}}] if cache else []
    passes += [{"fuse_decode": {"gumbel": True, "outputs": list(outputs)}}]
    recipe = parse_recipe({"capture": {"max_batch": 4}, "passes": passes, "lower": {"backend": backend}})
    compile_model(checkpoint, recipe, out, force=True)
    return dlmc.runtime.load(out)


def config(strategy, **changes) -> LLaDAConfig:
    return LLaDAConfig(**({"gen_length": 8, "block_length": 4, "steps": 8, "strategy": strategy} | changes))


def assert_same(engine, model, cfg, prompts, seed=3):
    recorder = MarginRecorder(model, cfg.gen_length, cfg.block_length)
    expected = generate(recorder, model.spec, prompts, cfg, seed=seed)
    if cfg.temperature == 0:
        recorder.assert_clear(reduction=96)  # every ranking decision clears the rounding tolerance
    actual = engine.generate(prompts, config=cfg, seed=seed)
    assert (actual.output_ids, actual.nfe, actual.row_nfe) == (expected.output_ids, expected.nfe, expected.row_nfe)
    return expected


def test_every_strategy_gives_the_reference_tokens(checkpoints, tmp_path):
    engine = compile_fused(checkpoints["llada"], tmp_path / "fused", "eager")
    model = load_model(checkpoints["llada"])
    nfe = {}
    for name, strategy in STRATEGIES.items():
        for prompts in (PROMPTS[:1], PROMPTS):
            nfe[name] = assert_same(engine, model, config(strategy), prompts).nfe
        assert_same(engine, model, config(strategy, temperature=0.7), PROMPTS)
        assert_same(engine, model, config(strategy, stop_at_eos=True), PROMPTS)
    assert nfe["top_k"] == 8 and max(n for name, n in nfe.items() if name != "top_k") < 8, nfe  # several at once


def test_a_rule_the_tokens_end_reads_the_device_once_a_step(checkpoints, tmp_path, monkeypatch):
    """Where the tokens decide when a block ends (or commit the whole generation early: prophet, sched) the
    loop reads that back, once a step; LLaDA's schedule (top_k) needs no read."""
    engine = compile_fused(checkpoints["llada"], tmp_path / "fused", "eager")
    counter = SyncCounter(monkeypatch)
    for name, strategy in STRATEGIES.items():
        counter.per_step.clear()
        nfe = engine.generate(PROMPTS, config=config(strategy), seed=3).nfe
        assert counter.per_step == [int(name != "top_k")] * nfe, name


def test_an_inductor_artifact_runs_a_strategy(checkpoints, tmp_path):
    engine = compile_fused(checkpoints["llada"], tmp_path / "fused", "inductor", outputs=("margin",))
    model = load_model(checkpoints["llada"])
    assert_same(engine, model, config(STRATEGIES["prophet"]), PROMPTS)


def test_strategies_it_was_not_compiled_for_are_one_line(checkpoints, tmp_path):
    engine = compile_fused(checkpoints["llada"], tmp_path / "plain", "eager", outputs=(), cache=True)
    with pytest.raises(DlmcError, match=r"^strategy: eb reads entropy, which this artifact's fused step does not "
                       r"return \(it returns no extra outputs\); compile with fuse_decode \{outputs: \[entropy\]\}$"):
        engine.generate([[5, 6]], config=config("eb"))
    with pytest.raises(DlmcError, match=r"^strategy: prophet reads margin"):
        engine.generate([[5, 6]], config=config("prophet"))
    # rules reading only the confidence run on any fused artifact, with the dual cache too
    engine.generate([[5, 6]], config=config("hierarchical"))


# credit and klass read each position's top candidates and decode at temperature 0 only; the fixture's
# top-1 probabilities (0.022-0.025) gain about 1.3x from one step's credit; its top-8 KLs between steps lie
# about 0.36-4.4 (the top-8 sets of a flat prediction change from step to step).
GREEDY = {
    "credit": {"name": "credit", "threshold": 0.03},
    "klass": {"name": "klass", "confidence": 0.022, "kl": 0.8, "history": 1},
}


def test_credit_and_klass_give_the_reference_tokens(checkpoints, tmp_path):
    engine = compile_fused(checkpoints["llada"], tmp_path / "fused", "eager", outputs=("top_probs", "top_ids"))
    model = load_model(checkpoints["llada"])
    nfe = {}
    for name, strategy in GREEDY.items():
        for prompts in (PROMPTS[:1], PROMPTS):
            nfe[name] = assert_same(engine, model, config(strategy), prompts).nfe
        assert_same(engine, model, config(strategy, stop_at_eos=True), PROMPTS)
    assert max(nfe.values()) < 8, nfe  # several at once
    with pytest.raises(DlmcError, match=r"^strategy: credit reads top_probs, top_ids, which"):
        plain = compile_fused(checkpoints["llada"], tmp_path / "plain", "eager", outputs=())
        plain.generate([[5, 6]], config=config("credit"))
