import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from dlmc.capture import CaptureConfig, capture
from dlmc.models import load_model
from dlmc.passes.mixed_precision import MixedPrecision, mixed_precision
from dlmc.pipeline import check_program
from tests.helpers import padded_batch

aten = torch.ops.aten


class LowPrecisionMatmuls(TorchFunctionMode):
    """The eager oracle: the same policy applied at the functional level. Linear and embedding run on
    `dtype` copies of their weights (and of the linear's input) and return float32; weights listed in
    `keep` (by identity) stay as they are."""

    def __init__(self, dtype: torch.dtype, keep: tuple[torch.Tensor, ...] = ()):
        super().__init__()
        self.dtype, self.keep = dtype, keep

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and not any(args[1] is k for k in self.keep):
            x, weight, *rest = args
            bias = rest[0] if rest else kwargs.get("bias")
            low_bias = None if bias is None else bias.to(self.dtype)
            return F.linear(x.to(self.dtype), weight.to(self.dtype), low_bias).to(x.dtype)
        if func is F.embedding:
            ids, weight, *rest = args
            return F.embedding(ids, weight.to(self.dtype), *rest, **kwargs).to(weight.dtype)
        return func(*args, **kwargs)


@pytest.fixture(scope="module")
def model_and_step(checkpoints):
    model = load_model(checkpoints["sdar"])  # has per-head q/k norms
    return model, capture(model, CaptureConfig(max_batch=4))


def test_matmuls_move_to_low_precision_and_the_rest_stays_fp32(model_and_step):
    model, step = model_and_step
    result = mixed_precision(step, MixedPrecision(dtype="bfloat16"))
    assert result.modified
    program = result.program
    check_program(program)
    nodes = list(program.graph_module.graph.nodes)
    linears = [n for n in nodes if n.target is aten.linear.default]
    assert len(linears) == 7 * model.arch.num_layers + 1  # q, k, v, o, gate, up, down per layer + head
    for linear in linears:
        assert all(arg.meta["val"].dtype == torch.bfloat16 for arg in linear.all_input_nodes)
        ((user,),) = [list(linear.users)]
        assert user.target is aten._to_copy.default and user.kwargs["dtype"] == torch.float32
    casts = [n for n in nodes if n.target is aten._to_copy.default]
    assert all("nn_module_stack" in n.meta for n in casts)  # inserted nodes belong to their block
    for sdpa in (n for n in nodes if n.target is aten.scaled_dot_product_attention.default):
        assert all(arg.meta["val"].dtype == torch.float32 for arg in sdpa.all_input_nodes[:3])
    state = program.exported.state_dict
    assert state["layers.0.attn.q_proj.weight"].dtype == torch.bfloat16
    assert state["embed.weight"].dtype == torch.bfloat16
    assert state["layers.0.attn_norm.weight"].dtype == torch.float32  # norms keep full precision
    assert state["layers.0.attn.q_norm.weight"].dtype == torch.float32
    assert program.signature == step.signature  # the interface does not change


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_numerics_match_the_eager_policy(model_and_step, dtype):
    model, step = model_and_step
    program = mixed_precision(step, MixedPrecision(dtype=dtype)).program
    for inputs in (padded_batch([7], 7), padded_batch([3, 12], 12)):
        with torch.no_grad():
            actual = program(*inputs)
            with LowPrecisionMatmuls(getattr(torch, dtype)):
                expected = model(*inputs)
            exact = model(*inputs)
        assert actual.dtype == torch.float32
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)
        assert not torch.equal(actual, exact)  # it is an approximation, and visibly so


def test_keep_leaves_named_weights_in_full_precision(model_and_step):
    model, step = model_and_step
    program = mixed_precision(step, MixedPrecision(keep=("lm_head",))).program
    assert program.exported.state_dict["lm_head.weight"].dtype == torch.float32
    assert program.exported.state_dict["layers.1.mlp.up_proj.weight"].dtype == torch.bfloat16
    inputs = padded_batch([5, 9], 9)
    with torch.no_grad(), LowPrecisionMatmuls(torch.bfloat16, keep=(model.lm_head.weight,)):
        expected = model(*inputs)
    torch.testing.assert_close(program(*inputs), expected, rtol=0, atol=0)


def test_no_op_when_weights_are_already_low_precision(model_and_step, checkpoints):
    _, step = model_and_step
    once = mixed_precision(step, MixedPrecision()).program
    again = mixed_precision(once, MixedPrecision())
    assert not again.modified and again.program is once
    bf16_step = capture(load_model(checkpoints["llada"], dtype=torch.bfloat16), CaptureConfig())
    assert not mixed_precision(bf16_step, MixedPrecision()).modified
    assert not mixed_precision(step, MixedPrecision(keep=("",))).modified  # every weight kept
