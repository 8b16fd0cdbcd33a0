"""The fused LLaDA2 loop (`fuse_decode {decoder: auto}` on a LLaDA2 checkpoint) gives the reference's tokens,
NFE and per-row NFE: LLaDA2.0's `llada2` and LLaDA2.1's `llada2_edit`, temperature 0 and > 0 with filters,
batch 1 and a batch of different lengths (one prompt filling its block, one ending inside one), uncached and
with the exact K/V cache, on eager, AOTInductor and ONNX Runtime (uncached); stop tokens end rows where the
reference ends them."""

import dataclasses
import importlib.util

import pytest
import torch

import dlmc.runtime
from dlmc.compiler import compile_model
from dlmc.decoding.llada2 import LLaDA2Config, LLaDA2EditConfig, generate, generate_edit
from dlmc.errors import DlmcError
from dlmc.models import load_model
from dlmc.recipe import parse_recipe
from dlmc.testing.fixtures import write_checkpoint
from tests.helpers import edit_config, rounding_tolerance

PROMPTS = [[5, 6, 7, 8], [9, 10, 11, 12, 13, 14]]  # block 4: the first fills its block, the second ends inside one
BATCHES = ([[5, 6, 7]], PROMPTS)
CONFIGS = {  # the fixture's top probabilities lie around 0.02 - 0.07: thresholds there commit some, not all
    "threshold": LLaDA2Config(gen_length=10, threshold=0.045),
    "quota": LLaDA2Config(gen_length=10, threshold=0.05, steps=2),
    "minimal_topk": LLaDA2Config(gen_length=10, threshold=0.9, minimal_topk=5),
    "sampled": LLaDA2Config(gen_length=10, threshold=0.03, temperature=0.8, top_k=40, top_p=0.9),
    "edit": LLaDA2EditConfig(gen_length=10, threshold=0.06, editing_threshold=0.03, max_post_steps=2),
    "edit_sampled": LLaDA2EditConfig(
        gen_length=10, threshold=0.04, editing_threshold=0.02, temperature=0.9, top_p=0.95, max_post_steps=3
    ),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The LLaDA2 fixture (3 layers, the first dense) with attention blocks of 4, so 10 tokens span blocks."""
    path = write_checkpoint("llada2", tmp_path_factory.mktemp("llada2") / "m", layers=3, seed=2)
    edit_config(path, block_size=4)
    return path


@pytest.fixture(scope="module")
def model(checkpoint):
    return load_model(checkpoint)


def compile_fused(checkpoint, out, backend="eager", cache=True, gumbel=True):
    passes = [{"fold_constants": {}}, *([{"causal_cache": {}}] if cache else [])]
    passes.append({"fuse_decode": {"decoder": "auto", "gumbel": gumbel}})
    capture = {"max_batch": 4, **({"dtype": "float32"} if backend == "onnxrt" else {})}
    recipe = parse_recipe({"capture": capture, "passes": passes, "lower": {"backend": backend}})
    return dlmc.runtime.load(compile_model(checkpoint, recipe, out, force=True))


@pytest.fixture(scope="module")
def cached(checkpoint, tmp_path_factory):
    return compile_fused(checkpoint, tmp_path_factory.mktemp("cached") / "a")


class LLaDA2Margins:
    """An eager model wrapped to record how far LLaDA2's decisions at temperature 0 are from a tie, over the
    generated positions of every row's open block (the reference's last block of columns): the top-2 logit
    gap (the arg-max, and whether an edit changes a token), the distance of the top-1 probability from both
    thresholds, and the gap between the masked positions' quota-th and next top-1 probabilities (the
    fallback's choice; every step's quota is `quota`)."""

    def __init__(self, model, prompts, thresholds: tuple[float, ...], quota: int):
        self.model, self.spec, self.thresholds, self.quota = model, model.spec, thresholds, quota
        self.prompts = prompts
        self.device = next(model.parameters()).device
        self.logit_gap = self.threshold_gap = self.confidence_gap = float("inf")
        self.scale = self.top_probability = 0.0

    def __call__(self, input_ids, attention_mask=None, position_ids=None):
        logits = self.model(input_ids, attention_mask, position_ids)  # [B, L, V]
        self.scale = max(self.scale, float(logits.abs().max()))
        L, block = input_ids.shape[1], self.spec.block_size
        lengths = attention_mask.sum(1).tolist() if attention_mask is not None else [L] * len(input_ids)
        for b, length in enumerate(lengths):
            tokens = input_ids[b, L - length :].tolist()  # rows are left-padded; finished rows left the batch
            prompt = next(len(p) for p in self.prompts if tokens[: len(p)] == p)
            first = L - length + max(length - block, prompt)
            rows = logits[b, first:]  # [n, V]
            top2 = rows.topk(2, dim=-1).values  # [n, 2]
            self.logit_gap = min(self.logit_gap, float((top2[:, 0] - top2[:, 1]).min()))
            top1 = torch.softmax(rows, dim=-1).amax(-1)  # [n]
            self.top_probability = max(self.top_probability, float(top1.max()))
            for threshold in self.thresholds:
                self.threshold_gap = min(self.threshold_gap, float((top1 - threshold).abs().min()))
            ranked = top1[input_ids[b, first:] == self.spec.mask_token_id].sort(descending=True).values  # [m]
            if len(ranked) > self.quota:
                gap = float(ranked[self.quota - 1] - ranked[self.quota])
                self.confidence_gap = min(self.confidence_gap, gap)
        return logits

    def assert_clear(self) -> None:
        tol = rounding_tolerance(torch.float32, self.spec.vocab_size, self.scale)
        assert self.logit_gap > 2 * tol, f"near tie in the logits ({self.logit_gap:.2g}): pick other prompts"
        limit = 4 * tol * self.top_probability  # softmax moves p by at most 2 p times a logit's change
        assert self.threshold_gap > limit, f"a probability near a threshold ({self.threshold_gap:.2g})"
        assert self.confidence_gap > limit, f"near tie in probabilities ({self.confidence_gap:.2g})"


def reference(model, prompts, config, **hooks):
    editing = isinstance(config, LLaDA2EditConfig)
    if editing:
        thresholds, quota = (config.threshold, config.editing_threshold), config.num_to_transfer
    else:
        steps = min(config.steps or model.spec.block_size, config.gen_length // config.minimal_topk)
        thresholds, quota = (config.threshold,), model.spec.block_size // steps
        assert model.spec.block_size % steps == 0, "the margins assume one quota for every step"
    margins = LLaDA2Margins(model, prompts, thresholds, quota)
    generation = (generate_edit if editing else generate)(margins, model.spec, prompts, config, seed=3, **hooks)
    if config.temperature == 0:
        margins.assert_clear()  # every decision clears the rounding tolerance
    return generation


def decoder(config) -> str:
    return "llada2_edit" if isinstance(config, LLaDA2EditConfig) else "llada2"


def assert_reference_tokens(engine, model, configs):
    for name, config in configs.items():
        for prompts in BATCHES:
            expected = reference(model, prompts, config)
            actual = engine.generate(prompts, decoder(config), config, seed=3)
            assert actual == expected, (name, len(prompts))  # tokens, nfe, each row's nfe


def test_auto_fuses_llada2s_rule(cached):
    assert cached.manifest["decode"]["decoder"] == "llada2"
    names = [t.name for t in cached.signature.outputs[:4]]
    assert names == ["tokens", "confidence", "argmax", "argmax_confidence"]


def test_reference_tokens_cached(cached, model):
    assert_reference_tokens(cached, model, CONFIGS)


def test_reference_tokens_uncached(checkpoint, model, tmp_path):
    assert_reference_tokens(compile_fused(checkpoint, tmp_path / "a", cache=False), model, CONFIGS)


@pytest.mark.slow  # ~1 min of AOTInductor compiles; the same loop runs on eager and ONNX Runtime above
def test_reference_tokens_inductor(checkpoint, model, tmp_path):
    engine = compile_fused(checkpoint, tmp_path / "a", "inductor")
    assert_reference_tokens(engine, model, {n: CONFIGS[n] for n in ("quota", "sampled", "edit", "edit_sampled")})


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="needs onnxruntime")
def test_reference_tokens_onnx_runtime(checkpoint, model, tmp_path):
    engine = compile_fused(checkpoint, tmp_path / "a", "onnxrt", cache=False)
    assert_reference_tokens(engine, model, {n: CONFIGS[n] for n in ("threshold", "sampled", "edit", "edit_sampled")})


@pytest.mark.parametrize("name", ["threshold", "sampled", "edit", "edit_sampled"])
@pytest.mark.parametrize("early", [False, True], ids=["after_block", "early_stop"])
def test_stop_tokens_end_rows_where_the_reference_does(cached, model, name, early):
    """A stop token only the first row generates: that row ends where the reference ends it (2.0: after the
    block holding it, or right after committing it with eos_early_stop; 2.1: only with eos_early_stop,
    after a block) and leaves the batch, the other row decodes on."""
    free = reference(model, PROMPTS, CONFIGS[name])
    stop = next(token for token in free.output_ids[0] if token not in free.output_ids[1])
    config = dataclasses.replace(CONFIGS[name], stop_token_ids=(stop,), eos_early_stop=early)
    steps, expected_steps = [], []
    expected = reference(model, PROMPTS, config, on_step=lambda *a: expected_steps.append(a))
    if early or name in ("threshold", "sampled"):
        assert expected.row_nfe[0] < free.row_nfe[0]  # the stop shortened the first row
    actual = cached.generate(PROMPTS, decoder(config), config, seed=3, on_step=lambda *a: steps.append(a))
    assert (actual, steps) == (expected, expected_steps)


@pytest.mark.parametrize("name", ["threshold", "edit"])
def test_on_canvas_is_the_references(cached, model, name):
    config, expected, canvases = CONFIGS[name], [], []
    generation = reference(model, PROMPTS, config, on_canvas=lambda g: expected.append(g.tolist()))
    actual = cached.generate(PROMPTS, decoder(config), config, seed=3, on_canvas=lambda g: canvases.append(g.tolist()))
    assert actual == generation
    assert canvases == expected and len(canvases) == actual.nfe


def test_settings_it_cannot_run_are_one_line(checkpoint, cached, tmp_path):
    greedy = compile_fused(checkpoint, tmp_path / "greedy", cache=False, gumbel=False)
    with pytest.raises(DlmcError, match=r"temperature=0.5: .* compile it with fuse_decode \{decoder: llada2, gumbel"):
        greedy.generate([[5, 6]], config=LLaDA2Config(gen_length=4, temperature=0.5))
    greedy.generate([[5, 6]], config=LLaDA2Config(gen_length=4, top_k=3))  # no filter at temperature 0
    with pytest.raises(DlmcError, match="fuses LLaDA2's samplers .*, not block's"):
        cached.decode([[5, 6]], "block", LLaDA2Config(gen_length=4))
    with pytest.raises(DlmcError, match="prompts: 5 rows exceed this artifact's largest batch"):
        cached.generate([[5, 6]] * 5, config=LLaDA2Config(gen_length=4))
    with pytest.raises(DlmcError, match="block_length=8 differs"):
        cached.generate([[5, 6]], config=LLaDA2Config(gen_length=4, block_length=8))


class MaskWins:
    """The eager model with the mask token's logit raised far above the rest: every sample is the mask."""

    def __init__(self, model):
        self.model, self.device = model, next(model.parameters()).device

    def __call__(self, input_ids, attention_mask=None, position_ids=None):
        logits = self.model(input_ids, attention_mask, position_ids)  # [B, L, V]
        logits[..., self.model.spec.mask_token_id] += 100
        return logits


def test_when_the_mask_token_wins(cached, model, monkeypatch):
    """2.0 commits the mask token, leaving positions masked, and moves on when a block's steps run out (as
    the reference); 2.1 at temperature 0 would loop forever and stops with the reference's one line."""
    real, mask = cached.run_step, model.spec.mask_token_id

    def masks_win(*inputs):
        tokens, probability, argmax, argmax_probability, *kv = real(*inputs)
        wins = (torch.full_like(tokens, mask), torch.full_like(probability, 0.999))
        return (*wins, *wins, *kv)

    monkeypatch.setattr(cached, "run_step", masks_win)
    expected = generate(MaskWins(model), model.spec, PROMPTS, CONFIGS["threshold"], seed=3)
    assert expected.nfe == 3 * 4  # three blocks of four steps, nothing decided
    assert cached.generate(PROMPTS, "llada2", CONFIGS["threshold"], seed=3) == expected
    with pytest.raises(DlmcError, match=r"^llada2_edit: the mask token keeps winning at position 3; the block"):
        generate_edit(MaskWins(model), model.spec, [[5, 6, 7]], CONFIGS["edit"], seed=3)
    with pytest.raises(DlmcError, match=r"^llada2_edit: the mask token keeps winning at position 3; the block"):
        cached.generate([[5, 6, 7]], "llada2_edit", CONFIGS["edit"], seed=3)
