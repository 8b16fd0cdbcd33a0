import pytest
import torch

from dlmc.errors import DlmcError
from dlmc.kernels import dispatch
from dlmc.kernels.unmask_head import unmask_head, unmask_head_reference, unmask_head_triton
from tests.helpers import rounding_tolerance
from tests.kernels.conftest import needs_triton


def inputs(rows, d, vocab, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, d, generator=g).to(dtype)  # [R, d]
    weight = (torch.randn(vocab, d, generator=g) / d**0.5).to(dtype)  # [V, d]
    bias = torch.randn(vocab, generator=g).to(dtype)  # [V]
    return hidden, weight, bias


def assert_matches(actual, expected, d, vocab, logit_scale):
    tokens, confidence, margin, entropy = actual
    ref_tokens, ref_confidence, ref_margin, ref_entropy = expected
    logit_tol = rounding_tolerance(torch.float32, d, logit_scale)  # the logits: length-d sums
    torch.testing.assert_close(margin, ref_margin, atol=2 * logit_tol, rtol=0)
    # softmax moves a probability p by at most 2 p times the largest change of a logit, plus its own
    # length-V normalising sum; the entropy (at most log V) by log V times that
    prob_tol = 2 * logit_tol + rounding_tolerance(torch.float32, vocab, 1.0)
    torch.testing.assert_close(confidence, ref_confidence, atol=prob_tol, rtol=0)
    torch.testing.assert_close(entropy, ref_entropy, atol=prob_tol * (1 + torch.log(torch.tensor(vocab))), rtol=0)
    clear = ref_margin > 2 * logit_tol  # token identity is only promised clear of a tie
    assert clear.float().mean() > 0.9, "the inputs are near ties: pick others"
    assert torch.equal(tokens[clear], ref_tokens[clear])


@needs_triton
@pytest.mark.parametrize(("rows", "d", "vocab", "with_bias"), [(5, 40, 200, True), (19, 16, 131, False)])
def test_kernel_matches_reference(device, rows, d, vocab, with_bias):
    # vocab not a multiple of the 64-wide tile, rows not of the 16-row tile, d not of the d tile
    hidden, weight, bias = (t.to(device) for t in inputs(rows, d, vocab))
    bias = bias if with_bias else None
    expected = unmask_head_reference(hidden, weight, bias)
    logit_scale = float((hidden @ weight.T).abs().max()) + (float(bias.abs().max()) if with_bias else 0)
    assert_matches(unmask_head_triton(hidden, weight, bias), expected, d, vocab, logit_scale)


@needs_triton
def test_bfloat16_inputs_accumulate_in_float32(device):
    hidden, weight, _ = (t.to(device) for t in inputs(4, 32, 100, torch.bfloat16, seed=1))
    actual = unmask_head_triton(hidden, weight)
    assert actual[1].dtype == torch.float32
    logit_scale = float((hidden.float() @ weight.float().T).abs().max())
    assert_matches(actual, unmask_head_reference(hidden, weight), 32, 100, logit_scale)


@needs_triton
def test_ties_go_to_the_lowest_token_across_tiles(device):
    # token 10 (first tile) and token 70 (second tile) share the top logit: argmax picks 10, margin 0
    hidden = torch.ones(1, 16, device=device)
    weight = torch.zeros(80, 16, device=device)
    weight[10] = weight[70] = 1.0
    tokens, confidence, margin, entropy = unmask_head_triton(hidden, weight)
    assert int(tokens[0]) == 10 and float(margin[0]) == 0.0
    torch.testing.assert_close(confidence, unmask_head_reference(hidden, weight)[1])


@needs_triton
def test_the_op_runs_the_kernel_where_dispatch_says(device, monkeypatch):
    hidden, weight, bias = (t.to(device) for t in inputs(3, 24, 90, seed=2))
    calls = []
    monkeypatch.setattr(dispatch, "use_triton", lambda d: calls.append(d) or True)
    monkeypatch.setattr("dlmc.kernels.unmask_head.use_triton", dispatch.use_triton)
    actual = unmask_head(hidden, weight, bias)
    assert calls
    logit_scale = float((hidden @ weight.T + bias).abs().max())
    assert_matches(actual, unmask_head_reference(hidden, weight, bias), 24, 90, logit_scale)


def test_the_op_on_cpu_is_the_reference():
    hidden, weight, bias = inputs(3, 24, 90)
    for a, b in zip(unmask_head(hidden, weight, bias), unmask_head_reference(hidden, weight, bias)):
        assert torch.equal(a, b)


def test_bad_shapes_are_one_line():
    hidden, weight, _ = inputs(3, 24, 90)
    with pytest.raises(DlmcError, match="do not match"):
        unmask_head(hidden, weight[:, :20])
    with pytest.raises(DlmcError, match="bias"):
        unmask_head(hidden, weight, torch.zeros(7))


def test_exports_as_one_node():
    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(inputs(1, 24, 90)[1])

        def forward(self, hidden):
            return unmask_head(hidden, self.weight, None)

    hidden = inputs(6, 24, 90, seed=3)[0]
    batch = torch.export.Dim("rows", min=2, max=64)
    ep = torch.export.export(Head(), (hidden,), dynamic_shapes=({0: batch},))
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert torch.ops.dlmc_kernels.unmask_head.default in targets
    for a, b in zip(ep.module()(hidden[:4]), unmask_head_reference(hidden[:4], Head().weight)):
        assert torch.equal(a, b)
