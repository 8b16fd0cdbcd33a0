"""causal_cache: exact prefix reuse for causal and block-causal families: the reference decoder's tokens
on every backend, with fewer rows computed per step."""

import importlib.util

import pytest

import dlmc.runtime
from dlmc.compiler import compile_model
from dlmc.decoding import DECODERS, default_decoder
from dlmc.errors import DlmcError
from dlmc.models import load_model
from dlmc.recipe import parse_recipe
from dlmc.runtime.cache import CacheManager

PROMPTS = [[5, 6, 7, 8, 9, 10], [40, 41, 42]]
SHORT = {"block": dict(gen_length=12), "wedlm": dict(max_new_tokens=12)}
FAMILIES = ["wedlm", "sdar", "fast_dllm_v2"]


def recipe(backend):
    return parse_recipe({"passes": [{"fold_constants": {}}, {"causal_cache": {}}], "lower": {"backend": backend}}, "t")


def reference(model, prompts):
    name = default_decoder(model.spec)
    config_type, generate = DECODERS[name]
    config = config_type(**SHORT[name])
    return name, config, generate(model, model.spec, prompts, config)


@pytest.mark.parametrize(
    "family, backend",
    [(f, "eager") for f in FAMILIES]
    + [("sdar", "inductor")]
    + [pytest.param("wedlm", "onnxrt", marks=pytest.mark.skipif(
        importlib.util.find_spec("onnxruntime") is None, reason="needs onnxruntime"))],
)
def test_reference_tokens_with_fewer_rows(checkpoints, tmp_path, monkeypatch, family, backend):
    engine = dlmc.runtime.load(compile_model(checkpoints[family], recipe(backend), tmp_path / "out"))
    model = load_model(checkpoints[family])
    canvas_rows = []
    serve = CacheManager.forward_rows

    def counting(self, rows, positions, sequences):
        canvas_rows.append(sum(len(r) for r in rows))
        return serve(self, rows, positions, sequences)

    monkeypatch.setattr(CacheManager, "forward_rows", counting)
    for prompts in (PROMPTS[:1], PROMPTS):
        name, config, expected = reference(model, prompts)
        rows, canvas_rows[:] = [], []
        run_step = engine.run_step
        engine.run_step = lambda *inputs: rows.append(int(inputs[1].sum())) or run_step(*inputs)
        try:
            result = engine.generate(prompts, name, config)
        finally:
            del engine.run_step
        assert result.output_ids == expected.output_ids
        assert result.nfe == expected.nfe
        assert sum(rows) < sum(canvas_rows) * 0.8  # the uncached step would compute every canvas row


def test_refuses_bidirectional(checkpoints, tmp_path):
    with pytest.raises(DlmcError, match="causal_cache: supports causal and block-causal families"):
        compile_model(checkpoints["llada"], recipe("eager"), tmp_path / "out")
    assert not (tmp_path / "out").exists()
