import pytest
import torch

from dlmc.artifact import StepSignature, TensorSpec
from dlmc.capture import CaptureConfig, StepProgram, capture
from dlmc.models import load_model
from dlmc.passes.fold_constants import FoldConstants, fold_constants
from dlmc.pipeline import check_program
from dlmc.spec import DenoiserSpec
from tests.helpers import padded_batch

aten = torch.ops.aten


def targets(program: StepProgram) -> list:
    return [n.target for n in program.graph_module.graph.nodes if n.op == "call_function"]


def folded_inputs(program: StepProgram) -> list[str]:
    """The values the pass folded: persistent buffers named folded_N."""
    specs = program.exported.graph_signature.input_specs
    return [s.target for s in specs if s.kind.name == "BUFFER" and s.target.startswith("folded_")]


@pytest.fixture(scope="module")
def model_and_step(checkpoints):
    model = load_model(checkpoints["sdar"])
    return model, capture(model, CaptureConfig(max_batch=4))


def test_folds_rope_frequencies_and_dtype_promotions(model_and_step):
    model, step = model_and_step
    result = fold_constants(step, FoldConstants())
    assert result.modified
    folded = result.program
    check_program(folded)
    before, after = targets(step), targets(folded)
    for gone in (aten.arange.start_step, aten.pow.Scalar, aten.reciprocal.default, aten.promote_types.default):
        assert gone in before and gone not in after
    # What depends on the step's inputs is not folded (the padding query's eye(L) is built per call).
    assert aten.eye.default in after and aten.scaled_dot_product_attention.default in after
    linears = [n for n in folded.graph_module.graph.nodes if n.target is aten.linear.default]
    assert all("nn_module_stack" in n.meta for n in linears)  # later passes can still find blocks
    (key,) = folded_inputs(folded)
    head_dim = model.arch.head_dim
    assert folded.exported.state_dict[key].shape == (head_dim // 2,)
    for inputs in (padded_batch([6], 6), padded_batch([2, 19, 19], 19)):
        with torch.no_grad():
            assert torch.equal(folded(*inputs), model(*inputs))


def test_second_run_is_a_no_op(model_and_step):
    _, step = model_and_step
    once = fold_constants(step, FoldConstants()).program
    again = fold_constants(once, FoldConstants())
    assert not again.modified and again.program is once


class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.ones(3))
        self.scale = torch.nn.Parameter(torch.full((4,), 0.5))

    def forward(self, x):
        table = (torch.arange(4, dtype=torch.float32) * 2).exp()  # input-free: foldable
        return x * self.scale + table


def toy_step() -> StepProgram:
    exported = torch.export.export(Toy(), (torch.randn(2, 4),))
    signature = StepSignature(
        inputs=(TensorSpec("x", "float32", (2, 4)),),
        outputs=(TensorSpec("y", "float32", (2, 4)),),
        batch=(2, 2),
        seq=(4, 4),
    )
    spec = DenoiserSpec(
        family="toy",
        mask_token_id=0,
        attention="bidirectional",
        block_size=None,
        shift_logits=False,
        vocab_size=4,
        max_length=4,
    )
    return StepProgram(exported=exported, signature=signature, spec=spec)


def test_hand_built_graph_folds_to_one_constant_and_drops_dead_weights():
    step = toy_step()
    x = torch.randn(2, 4)
    result = fold_constants(step, FoldConstants())
    assert result.modified
    assert aten.arange.default not in targets(result.program) and aten.exp.default not in targets(result.program)
    assert targets(result.program) == [aten.mul.Tensor, aten.add.Tensor]
    (key,) = folded_inputs(result.program)
    torch.testing.assert_close(result.program.exported.state_dict[key], (torch.arange(4.0) * 2).exp(), rtol=0, atol=0)
    assert "unused" not in result.program.exported.state_dict and "scale" in result.program.exported.state_dict
    assert torch.equal(result.program(x), step(x))


def test_size_limit_keeps_large_values_computed():
    step = toy_step()
    result = fold_constants(step, FoldConstants(max_bytes=0))
    # Nothing may be materialised; only the unused weight goes.
    assert folded_inputs(result.program) == []
    assert aten.exp.default in targets(result.program)
    assert "unused" not in result.program.exported.state_dict
