import copy
import dataclasses

import pytest
import torch

import dlmc.runtime
from dlmc.artifact import TensorSpec
from dlmc.capture import CaptureConfig, capture
from dlmc.compiler import compile_model
from dlmc.errors import DlmcError
from dlmc.lower.inductor import InductorSettings
from dlmc.models import load_model
from dlmc.passes.fold_constants import FoldConstants
from dlmc.passes.blocks import find_blocks, layer_of
from dlmc.passes.layer_skip import LayerSkip, layer_skip, resolve
from dlmc.passes.skip_calibration import calibration_batches, choose_layers
from dlmc.pipeline import check_program, run_passes
from dlmc.recipe import Recipe, RecipeError, parse_recipe
from dlmc.generation import default_model_dir
from dlmc.quant.self_samples import PROMPT_TOKENS, self_samples
from dlmc.tasks import held_out
from dlmc.testing.fixtures import FAMILIES, write_checkpoint
from dlmc.tokenizer import load_tokenizer
from tests.helpers import padded_batch

aten = torch.ops.aten


@pytest.fixture(scope="module")
def four_layers(tmp_path_factory):
    """A 4-layer LLaDA-format checkpoint (the session fixtures have 2 layers)."""
    return write_checkpoint("llada", tmp_path_factory.mktemp("llada4") / "m", layers=4, seed=3)


@pytest.fixture(scope="module")
def model_and_step(four_layers):
    model = load_model(four_layers)
    return model, capture(model, CaptureConfig(max_batch=4))


def without_layers(model, layers):
    """The eager oracle: the same model with those blocks deleted from its layer list."""
    model = copy.deepcopy(model)
    model.layers = torch.nn.ModuleList(layer for i, layer in enumerate(model.layers) if i not in layers)
    return model


def test_the_blocks_nodes_and_weights_are_gone(model_and_step):
    model, step = model_and_step
    result = layer_skip(step, LayerSkip(layers=(1, 3)))
    assert result.modified
    program = result.program
    check_program(program)
    nodes = list(program.graph_module.graph.nodes)
    assert {layer_of(n) for n in nodes} - {None} == {0, 2}
    assert sorted(find_blocks(program.graph_module)) == [0, 2]
    linears = [n for n in nodes if n.target is aten.linear.default]
    assert len(linears) == 7 * 2 + 1  # q, k, v, o, gate, up, down in the two remaining layers + head
    state = program.exported.state_dict
    assert not [k for k in state if k.startswith(("layers.1.", "layers.3."))]
    assert "layers.2.mlp.down_proj.weight" in state and "embed.weight" in state
    removed = sum(t.numel() for k, t in step.exported.state_dict.items() if k.startswith(("layers.1.", "layers.3.")))
    assert sum(t.numel() for t in state.values()) == sum(t.numel() for t in step.exported.state_dict.values()) - removed
    assert len(program.exported.graph_signature.input_specs) == len(step.exported.graph_signature.input_specs) - 18
    assert program.signature == step.signature  # the interface does not change


@pytest.mark.parametrize("layers", [(1,), (2,), (1, 3), (1, 2, 3)])
def test_numerics_equal_the_model_without_those_layers(model_and_step, layers):
    model, step = model_and_step
    program = layer_skip(step, LayerSkip(layers=layers)).program
    oracle = without_layers(model, layers)
    for inputs in (padded_batch([7], 7), padded_batch([3, 12], 12)):
        with torch.no_grad():
            actual, expected, full = program(*inputs), oracle(*inputs), model(*inputs)
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)
        assert not torch.allclose(actual, full)  # an approximation, and visibly so


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family(family, checkpoints):
    model = load_model(checkpoints[family])
    captured = capture(model, CaptureConfig(max_batch=2))
    for step in (captured, run_passes(captured, [FoldConstants()])):  # alone and after another pass
        # Layer 0 of a Qwen-style family holds RoPE's cos/sin casts that layer 1 reads: they must stay.
        for layer in (0, 1):
            program = layer_skip(step, LayerSkip(layers=(layer,))).program
            check_program(program)
            assert sorted(find_blocks(program.graph_module)) == [1 - layer]
            assert not [k for k in program.exported.state_dict if k.startswith(f"layers.{layer}.")]
            inputs = padded_batch([4, 9], 9)
            with torch.no_grad():
                expected = without_layers(model, (layer,))(*inputs)
            torch.testing.assert_close(program(*inputs), expected, rtol=0, atol=0)


def zeroed(model, layer):
    """A copy of `model` whose block `layer` adds nothing to the residual stream: exactly the identity."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        model.layers[layer].attn.o_proj.weight.zero_()
        model.layers[layer].mlp.down_proj.weight.zero_()
    return model


@pytest.mark.parametrize("criterion", ["similarity", "logits"])
def test_calibration_picks_an_identity_layer_first(model_and_step, four_layers, criterion):
    model, _ = model_and_step
    tokenizer = load_tokenizer(four_layers)
    for identity in (1, 2, 3):
        step = capture(zeroed(model, identity), CaptureConfig(max_batch=4))
        config = LayerSkip(budget=1, examples=8, gen_length=16, criterion=criterion)
        config, calibration = resolve(step, config, tokenizer)
        assert config == LayerSkip(layers=(identity,))
        assert calibration.similarity[identity] == pytest.approx(1.0, abs=1e-9)
        assert max(calibration.similarity.values()) == calibration.similarity[identity]
        assert calibration.canvases == 8 and calibration.tokens > 8 * 16
        if criterion == "logits":  # removing an identity block changes no token; the others change some
            assert calibration.agreement[identity] == 1.0
            assert sorted(calibration.agreement) == [1, 2, 3] and min(calibration.agreement.values()) < 1.0
        else:
            assert calibration.agreement is None


def test_logits_criterion_is_greedy_over_what_is_already_removed(model_and_step, four_layers):
    model, step = model_and_step
    tokenizer = load_tokenizer(four_layers)
    config = LayerSkip(budget=2, examples=8, gen_length=16, criterion="logits")
    resolved, calibration = resolve(step, config, tokenizer)
    first = max(calibration.agreement, key=lambda i: (calibration.agreement[i], -i))
    assert resolved.layers[0] == first and len(set(resolved.layers)) == 2 and 0 not in resolved.layers


def test_logits_criterion_reads_shifted_logits_for_dream(checkpoints):
    step = capture(load_model(checkpoints["dream"]), CaptureConfig(max_batch=4))
    config = LayerSkip(budget=1, examples=4, gen_length=8, criterion="logits")
    resolved, calibration = resolve(step, config, load_tokenizer(checkpoints["dream"]))
    assert resolved.layers == (1,) and 0 < calibration.agreement[1] <= 1


def test_calibration_never_picks_the_first_layer(model_and_step, four_layers):
    model, _ = model_and_step
    step = capture(zeroed(model, 0), CaptureConfig(max_batch=4))
    config, calibration = resolve(step, LayerSkip(budget=3, examples=4, gen_length=8), load_tokenizer(four_layers))
    assert calibration.similarity[0] == pytest.approx(1.0, abs=1e-9)
    assert sorted(config.layers) == [1, 2, 3]
    assert layer_skip(step, LayerSkip(layers=(0,))).modified  # listing it by hand is allowed


def test_choice_spreads_out_before_taking_neighbours():
    similarity = {0: 0.99, 1: 0.90, 2: 0.95, 3: 0.93, 4: 0.80, 5: 0.70}
    assert choose_layers(similarity, 1) == (2,)
    assert choose_layers(similarity, 2) == (2, 4)  # 3 and 1 sit next to 2
    assert choose_layers(similarity, 3) == (2, 4, 3)  # no third non-adjacent one: the most similar rest
    assert choose_layers(similarity, 5) == (2, 4, 3, 1, 5)


def test_task_canvases_are_partly_masked_and_never_the_held_out_prompts():
    spec, tokenizer = load_model(default_model_dir()).spec, load_tokenizer(default_model_dir())
    config = LayerSkip(budget=1, examples=10, gen_length=12)  # the embedded model: tasks by default
    batches = calibration_batches(spec, tokenizer, config, batch_size=4, model_dir=default_model_dir())
    assert [b[0].shape[0] for b in batches] == [4, 4, 2]
    rows = [row[mask] for ids, mask, _ in batches for row, mask in zip(ids, mask)]
    masked = [int((row[-12:] == spec.mask_token_id).sum()) for row in rows]
    assert masked[0] < masked[-1] and 0 < sum(masked) < 12 * len(rows)  # early to late denoising states
    prompts = {tokenizer.decode(row[:-12].tolist()) for row in rows}
    assert prompts and not prompts & {e.prompt for e in held_out()}
    assert prompts <= {e.prompt for e in _tasks_training(10)}


def _tasks_training(count):
    import random

    from dlmc.passes.skip_calibration import _training_examples

    return _training_examples(random.Random(0), count)


def test_another_checkpoint_is_refused_the_tasks_and_calibrates_on_its_own_samples(four_layers):
    model, tokenizer = load_model(four_layers), load_tokenizer(four_layers)
    with pytest.raises(DlmcError, match=r"^layer_skip.source: tasks are the embedded model's toy tasks.*"
                                        r"use source: file .* or source: self"):
        calibration_batches(model.spec, tokenizer, LayerSkip(budget=1, source="tasks"), model_dir=four_layers)
    config = LayerSkip(budget=1, examples=4, gen_length=8, seed=5)
    batches = calibration_batches(model.spec, tokenizer, config, model_dir=four_layers, model=model)
    expected = self_samples(model, model.spec, 4, PROMPT_TOKENS + 8, seed=5)
    (input_ids, mask, _), = batches
    assert input_ids.shape == (4, PROMPT_TOKENS + 8) and bool(mask.all())
    for row, (prompt, generated) in zip(input_ids.tolist(), expected):
        assert row[:PROMPT_TOKENS] == prompt
        assert all(t in (g, model.spec.mask_token_id) for t, g in zip(row[PROMPT_TOKENS:], generated))
    explicit = LayerSkip(budget=1, examples=4, gen_length=8, seed=5, source="self")
    no_tokenizer = calibration_batches(model.spec, None, explicit, model=model)  # self needs none
    assert torch.equal(no_tokenizer[0][0], input_ids)


def test_user_prompts_from_the_config_and_a_file(four_layers, tmp_path):
    model, tokenizer = load_model(four_layers), load_tokenizer(four_layers)
    (tmp_path / "prompts.txt").write_text("count 12:\n\nshift ab:\n")
    config = LayerSkip(budget=1, prompts=("add 1 2:",), file=str(tmp_path / "prompts.txt"), gen_length=6)
    (input_ids, mask, _), = calibration_batches(model.spec, tokenizer, config, model_dir=four_layers)
    assert [tokenizer.decode(row[m][:-6].tolist()) for row, m in zip(input_ids, mask)] == [
        "add 1 2:", "count 12:", "shift ab:"]
    assert bool((input_ids[:, -6:] == model.spec.mask_token_id).all())  # the first step: nothing decided
    missing = LayerSkip(budget=1, file=str(tmp_path / "none.txt"))
    with pytest.raises(DlmcError, match=r"^layer_skip.file: .*none.txt: file not found$"):
        calibration_batches(model.spec, tokenizer, missing)


def test_empty_list_is_a_no_op(model_and_step):
    _, step = model_and_step
    result = layer_skip(step, LayerSkip(layers=()))
    assert not result.modified and result.program is step


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"layers": [1], "budget": 1}, "passes[0].layer_skip.layers: give exactly one of"),
        ({}, "passes[0].layer_skip.layers: give exactly one of"),
        ({"budget": 0}, "passes[0].layer_skip.budget: must be >= 1, got 0"),
        ({"layers": [-1]}, "passes[0].layer_skip.layers: indices must be >= 0"),
        ({"layers": [2, 2]}, "passes[0].layer_skip.layers: an index is listed twice"),
        ({"layers": "2"}, "passes[0].layer_skip.layers"),
        ({"budget": 1, "criterion": "cosine"}, "passes[0].layer_skip.criterion: 'cosine' is not one of"),
        ({"budget": 1, "source": "web"}, "passes[0].layer_skip.source: 'web' is not one of"),
        ({"budget": 1, "source": "self", "prompts": ["a"]}, "passes[0].layer_skip.source: self does not read"),
        ({"budget": 1, "source": "file"}, "passes[0].layer_skip.source: file needs `prompts` or a `file`"),
    ],
)
def test_bad_config_is_one_line_naming_the_field(options, message):
    with pytest.raises(RecipeError) as e:
        parse_recipe({"passes": [{"layer_skip": options}]})
    assert message in str(e.value) and "\n" not in str(e.value)


def test_layers_the_step_does_not_have_are_refused(model_and_step, four_layers):
    _, step = model_and_step
    with pytest.raises(DlmcError, match=r"^layer_skip.layers: layer 4 is not in the step \(it has layers 0-3\)$"):
        layer_skip(step, LayerSkip(layers=(1, 4)))
    once = layer_skip(step, LayerSkip(layers=(2,))).program
    with pytest.raises(DlmcError, match=r"layer 2 is not in the step \(it has layers 0, 1, 3\)"):
        layer_skip(once, LayerSkip(layers=(2,)))
    with pytest.raises(DlmcError, match="cannot drop all 4 layers"):
        layer_skip(step, LayerSkip(layers=(0, 1, 2, 3)))
    tokenizer = load_tokenizer(four_layers)
    for budget in (4, 9):
        with pytest.raises(DlmcError, match=rf"^layer_skip.budget: must be between 1 and 3 .* got {budget}$"):
            resolve(step, LayerSkip(budget=budget), tokenizer)
    with pytest.raises(DlmcError, match="layer_skip.budget: not resolved"):
        layer_skip(step, LayerSkip(budget=1))


def test_a_step_with_extra_inputs_is_refused(model_and_step, four_layers):
    # A caching pass adds K/V inputs and outputs per layer; layer_skip has to run before it.
    _, step = model_and_step
    extra = TensorSpec("cache_mask", "bool", ("batch", "cache"))
    signature = dataclasses.replace(step.signature, inputs=(*step.signature.inputs, extra))
    cached = dataclasses.replace(step, signature=signature)
    message = r"^layer_skip: put it before the passes that change the step's inputs \(this step takes .*cache_mask\)$"
    with pytest.raises(DlmcError, match=message):
        layer_skip(cached, LayerSkip(layers=(1,)))
    with pytest.raises(DlmcError, match=message):
        resolve(cached, LayerSkip(budget=1), load_tokenizer(four_layers))


def test_compiles_with_inductor_and_records_the_calibration(four_layers, tmp_path):
    recipe = Recipe(passes=(FoldConstants(), LayerSkip(budget=1, examples=4, gen_length=8)), lower=InductorSettings())
    stages = []
    out = compile_model(four_layers, recipe, tmp_path / "art", on_stage=stages.append)
    assert any(s.startswith("calibrate layer_skip: 4 canvases, cos(in, out) per layer 0:") for s in stages)
    engine = dlmc.runtime.load(out)
    entry = engine.manifest["recipe"]["passes"][1]["layer_skip"]
    assert entry["budget"] is None and len(entry["layers"]) == 1
    (skipped,) = entry["layers"]
    calibration = engine.manifest["passes"][1]["calibration"]
    assert sorted(calibration["similarity"]) == ["0", "1", "2", "3"] and calibration["canvases"] == 4
    assert max(calibration["similarity"].items(), key=lambda kv: (kv[0] != "0", kv[1]))[0] == str(skipped)
    assert not engine.manifest["exact"]
    model = load_model(four_layers)
    folded = run_passes(capture(model, CaptureConfig()), [FoldConstants()]).exported.state_dict
    removed = sum(p.numel() for p in model.layers[skipped].parameters())
    assert engine.manifest["model"]["parameters"] == sum(t.numel() for t in folded.values()) - removed
    inputs = padded_batch([5, 9], 9)
    with torch.no_grad():
        torch.testing.assert_close(engine(*inputs), without_layers(model, (skipped,))(*inputs), rtol=1e-4, atol=1e-4)


def test_calibration_canvases_are_built_on_the_steps_device(model_and_step, four_layers, monkeypatch):
    """A CUDA step must be fed CUDA canvases; the meta device stands in for it here (the canvases are
    only moved, never computed on, before `calibrate` runs them)."""
    import dlmc.passes.layer_skip as module

    model, step = model_and_step
    tokenizer = load_tokenizer(four_layers)
    config = LayerSkip(budget=1, source="random", examples=3, gen_length=4)
    batches = calibration_batches(model.spec, tokenizer, config, device="meta")
    assert {t.device.type for batch in batches for t in batch} == {"meta"}
    assert module.step_device(step) == torch.device("cpu")
    seen = []
    monkeypatch.setattr(module, "step_device", lambda program: torch.device("meta"))
    monkeypatch.setattr(module, "calibrate", lambda program, batches: seen.extend(batches) or _stop())
    with pytest.raises(_Stop):
        resolve(step, config, tokenizer, four_layers)
    assert seen and {t.device.type for batch in seen for t in batch} == {"meta"}


class _Stop(Exception):
    pass


def _stop():
    raise _Stop
