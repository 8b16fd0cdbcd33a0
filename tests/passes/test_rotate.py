import dataclasses
import statistics
from pathlib import Path

import pytest
import torch

from dlmc.capture import CaptureConfig, capture
from dlmc.errors import DlmcError
from dlmc.models import load_model
from dlmc.models.transformer import DiffusionLM
from dlmc.passes import copy_graph, input_kinds, rebuild
from dlmc.passes.fold_constants import FoldConstants
from dlmc.passes.layer_skip import LayerSkip
from dlmc.passes.quantize import Quantize, quantize_program
from dlmc.passes.rotate import Rotate, rotate
from dlmc.pipeline import check_program, run_passes
from dlmc.quant import ops
from dlmc.quant.calibration import calibration_inputs
from dlmc.quant.hadamard import hadamard
from dlmc.quant.scheme import Calibration, Rule, Scheme
from dlmc.recipe import RecipeError, load_recipe, parse_recipe
from dlmc.testing.fixtures import FAMILIES, write_checkpoint
from tests.helpers import padded_batch

aten = torch.ops.aten
PER_TOKEN = Scheme(activations="per_token")
QUAROT = Quantize(
    scheme=PER_TOKEN,
    rules=(Rule(match="lm_head", scheme=None),
           Rule(match="layers.*.mlp.down_proj", scheme=Scheme(activations="per_token", outliers="hadamard"))),
)
READERS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")


def _variant(model, dtype=torch.float64, seed=0, **arch):
    """The model's family with other architecture options, random weights (norm scales away from 1)."""
    generator = torch.Generator().manual_seed(seed)
    variant = DiffusionLM(dataclasses.replace(model.arch, **arch), model.spec)
    with torch.no_grad():
        for name, p in variant.named_parameters():
            p.copy_((1.0 if name.endswith("norm.weight") else 0.0) + 0.2 * torch.randn(p.shape, generator=generator))
    return variant.to(dtype).eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_rotated_step_computes_the_same_logits(checkpoints, family):
    model = load_model(checkpoints[family])
    step = capture(model, CaptureConfig(max_batch=4))
    result = rotate(step, Rotate())
    assert result.modified
    check_program(result.program)
    inputs = padded_batch([9, 6], 9)
    expected, actual = step(*inputs), result.program(*inputs)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)
    assert torch.equal(actual.argmax(-1), expected.argmax(-1))


@pytest.mark.parametrize(
    ("family", "arch"),
    [
        ("llada", {"tie_embeddings": True, "embed_scale": 16.0, "out_bias": True, "qkv_bias": True}),
        ("sdar", {"tie_embeddings": True, "hidden_size": 48, "num_heads": 3, "num_kv_heads": 3}),  # q/k norms
        ("dream", {"out_bias": True, "hidden_size": 48, "num_heads": 3, "num_kv_heads": 1}),  # Hadamard 3 x 16
    ],
    ids=["tied-biases-embed-scale", "tied-qk-norm-hidden-48", "untied-biases-hidden-48"],
)
def test_equal_in_float64_for_tied_heads_biases_and_odd_hidden_sizes(checkpoints, family, arch):
    """In float64 the rotated step is the original up to rounding: the rotation is exact."""
    model = _variant(load_model(checkpoints[family]), **arch)
    step = capture(model, CaptureConfig(max_batch=4))
    program = rotate(step, Rotate()).program
    check_program(program)
    inputs = padded_batch([9, 6], 9)
    torch.testing.assert_close(program(*inputs), step(*inputs), rtol=1e-10, atol=1e-10)
    state = program.exported.state_dict
    if model.arch.tie_embeddings:  # the head got its own weight, the table lost nothing
        q = hadamard(model.arch.hidden_size).double()
        assert "lm_head.weight" in state and "lm_head.weight" not in step.exported.state_dict
        torch.testing.assert_close(state["lm_head.weight"], model.embed.weight * model.norm.weight @ q)
        torch.testing.assert_close(state["embed.weight"], model.embed.weight @ q)


def test_the_residual_stream_is_rotated_into_the_weights(checkpoints):
    model = _variant(load_model(checkpoints["wedlm"]), out_bias=True)  # wedlm: q/k/v biases too
    step = capture(model, CaptureConfig(max_batch=4))
    program = rotate(step, Rotate()).program
    state, q = program.exported.state_dict, hadamard(model.arch.hidden_size).double()
    layer = model.layers[1]
    close = torch.testing.assert_close
    close(state["embed.weight"], model.embed.weight @ q)
    for norm in ("layers.0.attn_norm", "layers.1.mlp_norm", "norm"):
        assert torch.equal(state[norm + ".weight"], torch.ones_like(state[norm + ".weight"]))
    close(state["layers.1.attn.q_proj.weight"], layer.attn.q_proj.weight * layer.attn_norm.weight @ q)
    close(state["layers.1.attn.q_proj.bias"], layer.attn.q_proj.bias)  # a reader's bias stays
    close(state["layers.1.mlp.up_proj.weight"], layer.mlp.up_proj.weight * layer.mlp_norm.weight @ q)
    close(state["layers.1.attn.o_proj.weight"], q.T @ layer.attn.o_proj.weight)
    close(state["layers.1.mlp.down_proj.bias"], q.T @ layer.mlp.down_proj.bias)  # a writer's bias turns
    close(state["lm_head.weight"], model.lm_head.weight * model.norm.weight @ q)
    assert [n.target for n in program.graph_module.graph.nodes] == [n.target for n in step.graph_module.graph.nodes]
    assert not rotate(program, Rotate()).modified  # a second run has nothing to do


def test_after_layer_skip_and_fold_constants_it_rotates_the_layers_that_are_left(tmp_path):
    model = load_model(write_checkpoint("fast_dllm_v2", tmp_path / "m", layers=3, seed=4))
    step = capture(model, CaptureConfig(max_batch=4))
    skipped = run_passes(step, [FoldConstants(), LayerSkip(layers=(1,))])
    program = run_passes(skipped, [Rotate()])
    assert not any(key.startswith("layers.1.") for key in program.exported.state_dict)
    inputs = padded_batch([9, 6], 9)
    torch.testing.assert_close(program(*inputs), skipped(*inputs), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# with quantize, on the embedded model
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def embedded():
    from dlmc.generation import default_model_dir

    model = load_model(default_model_dir())
    step = capture(model, CaptureConfig(max_batch=8))
    batches = calibration_inputs(Calibration(samples=16, seq_len=48), model.spec, default_model_dir(), 256)
    return step, rotate(step, Rotate()).program, batches


def test_rotated_embedded_model_keeps_its_arg_max(embedded):
    step, rotated, _ = embedded
    inputs = padded_batch([16, 11], 16, vocab=80)
    expected, actual = step(*inputs), rotated(*inputs)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(actual.argmax(-1), expected.argmax(-1))


def test_rotation_flattens_the_inputs_of_the_linears_that_read_the_stream(embedded):
    """The embedded model's residual stream has mild outlier channels (max/median channel absmax up
    to ~3 at the q/k/v inputs of layers 1-2); its big outliers (~60x) are in layer 0's MLP
    intermediate, which the stream rotation does not touch (down_proj keeps its online Hadamard).
    Per-token W8A8 after the rotation: flatter reader inputs, better q/k/v where the stream has
    grown outliers, and down_proj as with the online-Hadamard scheme (its input moves only by float rounding)."""
    step, rotated, batches = embedded
    plain = quantize_program(step, Quantize(scheme=PER_TOKEN, rules=QUAROT.rules[:1]), batches)[1]["layers"]
    quarot = quantize_program(rotated, QUAROT, batches)[1]["layers"]
    hadamard_all = quantize_program(step, QUAROT, batches)[1]["layers"]  # no rotate: down_proj alike
    readers = [name for name in plain if name.endswith(READERS)]
    assert len(readers) == 4 * 5
    assert max(plain[n]["inputs"]["max_over_median"] for n in readers) > 2.5
    assert max(quarot[n]["inputs"]["max_over_median"] for n in readers) < 2
    gain = {n: quarot[n]["output_sqnr_db"] - plain[n]["output_sqnr_db"] for n in readers}
    assert statistics.mean(gain.values()) > 0.2
    for layer in (1, 2):
        for proj in ("q_proj", "k_proj", "v_proj"):
            assert gain[f"layers.{layer}.attn.{proj}"] > 0.5, gain
    for layer in range(4):
        name = f"layers.{layer}.mlp.down_proj"
        assert abs(quarot[name]["output_sqnr_db"] - hadamard_all[name]["output_sqnr_db"]) < 0.5
        assert quarot[name]["rotation"] == "hadamard 768"
    assert quarot["layers.0.mlp.down_proj"]["inputs"]["max_over_median"] > 20


def test_after_rotate_and_quantize_only_down_proj_rotates_online(embedded):
    _, rotated, batches = embedded
    program = quantize_program(rotated, QUAROT, batches)[0].program
    check_program(program)
    graph = program.graph_module.graph
    kinds = input_kinds(program)
    online = [n for n in graph.nodes if n.target is aten.matmul.default]  # A (Y B): 768 = 3 x (16 x 16)
    assert len(online) == 4
    assert all(user.target is aten.flatten.using_ints and next(iter(user.users)).target is ops.linear_w8a8
               for n in online for user in n.users)
    assert {kinds[n.args[0].name][1] for n in online} == {"quant.hadamard_16_float32"}
    linears = [n for n in graph.nodes if n.target is aten.linear.default]
    assert sorted({kinds[n.args[1].name][1] for n in linears}) == ["lm_head.weight", "quant.hadamard_16_float32"]
    assert sum(n.target is ops.linear_w8a8 for n in graph.nodes) == 28


# ---------------------------------------------------------------------------------------------
# refusals and recipes
# ---------------------------------------------------------------------------------------------


def test_refuses_a_step_already_quantized(embedded):
    step, _, batches = embedded
    quantized = quantize_program(step, Quantize(scheme=PER_TOKEN), batches[:1])[0].program
    message = r"^rotate: the step has quantized linears already; put rotate before quantize$"
    with pytest.raises(DlmcError, match=message):
        rotate(quantized, Rotate())


def test_refuses_an_operation_that_does_not_commute_with_the_rotation(checkpoints):
    step = capture(load_model(checkpoints["llada"]), CaptureConfig(max_batch=4))
    gm = copy_graph(step)
    (embedding,) = gm.graph.find_nodes(op="call_function", target=aten.embedding.default)
    with gm.graph.inserting_after(embedding):
        clipped = gm.graph.call_function(aten.relu.default, (embedding,))
    clipped.meta = dict(embedding.meta)
    embedding.replace_all_uses_with(clipped, delete_user_cb=lambda user: user is not clipped)
    gm.recompile()
    message = (r"^rotate: cannot rotate the residual stream through relu_default \(aten.relu.default, in embed\): "
               r"this operation does not commute with a rotation$")
    with pytest.raises(DlmcError, match=message):
        rotate(rebuild(step, gm), Rotate())


def test_the_quarot_recipe_validates_and_orders_rotate_first():
    recipe = load_recipe(Path(__file__).parents[2] / "recipes" / "default-cpu-w8a8-quarot.yaml")
    names = [p.name for p in recipe.passes]
    assert names.index("rotate") < names.index("quantize") and not recipe.exact
    quantize = recipe.passes[names.index("quantize")]
    assert quantize.scheme.outliers == "none"
    assert [r.scheme and r.scheme.outliers for r in quantize.rules] == [None, "hadamard"]
    for before in ("quantize", "mixed_precision"):
        with pytest.raises(RecipeError, match=f"passes: rotate must come before {before}"):
            parse_recipe({"passes": [before, "rotate"]})
    assert [p.name for p in parse_recipe({"passes": ["rotate", "mixed_precision"]}).passes] == [
        "rotate", "mixed_precision"]
    with pytest.raises(RecipeError, match=r"passes\[0\].rotate.angle: unknown option"):
        parse_recipe({"passes": [{"rotate": {"angle": 1}}]})
