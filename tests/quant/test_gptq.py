import torch

from dlmc.quant.formats import rtn
from dlmc.quant.gptq import gptq, hessian


def _h_error(w, deq, h):
    e = w - deq
    return torch.einsum("oi,ij,oj->", e, h, e).item()


def test_gptq_compensates_rounding_error_by_hand():
    # Columns 0 and 1 are correlated (H[0,1] = 1), column 2 is independent. Scale = 0.7 / 7 = 0.1.
    # RTN: [3.3, 4.4, 7] -> [3, 4, 7]. GPTQ: column 0 rounds to 3 (error 0.03); with
    # H^-1 = [[2, -1], [-1, 2]] / 3 the update is w1 -= 0.03 * (-1/3) / (2/3) -> 0.455 -> code 5.
    w = torch.tensor([[0.33, 0.44, 0.7]])
    h = torch.tensor([[2.0, 1.0, 0.0], [1.0, 2.0, 0.0], [0.0, 0.0, 1.0]])
    q = gptq(w, h, bits=4, symmetric=True, group_size=3, damp=0.0)
    assert q.codes.tolist() == [[3, 5, 7]]
    assert rtn(w, 4, True, 3).codes.tolist() == [[3, 4, 7]]
    # and it is the better of the two under the layer's quadratic error (0.0054 vs 0.0074)
    assert _h_error(w, q.dequantize(), h) < _h_error(w, rtn(w, 4, True, 3).dequantize(), h)


def test_gptq_beats_rtn_on_correlated_inputs():
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(64, 64, generator=g)
    x = torch.randn(512, 64, generator=g) @ mix  # correlated input channels
    x[:, 5] *= 20  # one outlier channel
    w = torch.randn(32, 64, generator=g)
    h = hessian(x)
    ref = x @ w.T
    rtn_err = (ref - x @ rtn(w, 4, True, 16).dequantize().T).pow(2).mean()
    for act_order in (False, True):
        q = gptq(w, h, bits=4, symmetric=True, group_size=16, act_order=act_order, block_size=32)
        assert q.scale.shape == (32, 4)
        err = (ref - x @ q.dequantize().T).pow(2).mean()
        assert err < 0.6 * rtn_err


def test_gptq_dead_inputs_get_zero_weight():
    x = torch.randn(100, 8)
    x[:, 3] = 0
    q = gptq(torch.randn(4, 8), hessian(x), bits=8, symmetric=False, group_size=4)
    assert torch.all(q.dequantize()[:, 3] == 0)
