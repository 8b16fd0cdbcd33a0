"""AWQ, SmoothQuant and Hadamard rotation: the transforms and their effect on int8/int4 error."""

import math

import torch

from dlmc.quant.awq import awq
from dlmc.quant.formats import rtn, sqnr_db
from dlmc.quant.hadamard import hadamard, kronecker_factors, rotate
from dlmc.quant.smoothquant import smooth_scales
from dlmc.quant.ops import linear_w8a8


def _outlier_inputs(n=256, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    x[:, 7] *= 40  # a channel outlier, as at a dLLM's down-projection input
    return x, torch.randn(48, d, generator=g) * 0.05


def test_smooth_scales_by_hand():
    absmax = torch.tensor([4.0, 1.0])
    w = torch.tensor([[1.0, 2.0], [-0.5, 1.0]])  # column absmax [1, 2]
    s = smooth_scales(absmax, w, alpha=0.5)
    torch.testing.assert_close(s, torch.tensor([2.0, 1 / math.sqrt(2)]))
    torch.testing.assert_close(smooth_scales(absmax, w, alpha=1.0), absmax)


def test_smoothing_and_rotation_are_exact_in_float():
    x, w = _outlier_inputs()
    s = smooth_scales(x.abs().amax(0), w, 0.5)
    torch.testing.assert_close((x / s) @ (w * s).T, x @ w.T, rtol=1e-4, atol=1e-4)
    r = hadamard(64)
    torch.testing.assert_close((x @ r) @ (w @ r).T, x @ w.T, rtol=1e-4, atol=1e-4)


def test_hadamard_is_orthonormal_and_symmetric():
    for n in (8, 256, 96, 768):
        r = hadamard(n)
        torch.testing.assert_close(r @ r.T, torch.eye(n), atol=1e-5, rtol=0)
        torch.testing.assert_close(r, r.T)
    assert torch.all(hadamard(16).abs() == 0.25)


def test_factored_rotation_is_the_dense_one():
    """rotate(x, A, B) == x @ hadamard(n), for powers of two (split evenly or not) and block-diagonal n."""
    for n, (b1, b2) in {2: (1, 2), 8: (2, 4), 64: (8, 8), 96: (4, 8), 768: (16, 16), 1536: (16, 32)}.items():
        a, b = kronecker_factors(n)
        assert (a.shape[0], b.shape[0]) == (b1, b2)
        x = torch.randn(2, 3, n, dtype=torch.float64)
        expected = x @ hadamard(n).double()
        torch.testing.assert_close(rotate(x, a.double(), b.double()), expected, rtol=0, atol=1e-6)


def _w8a8_sqnr(x, w, *, inv_scale=None, rotation=None, act_scale=True):
    wt = w if inv_scale is None else w / inv_scale
    xt = x if inv_scale is None else x * inv_scale
    if rotation is not None:
        wt, xt = wt @ rotation, xt @ rotation
    qw = rtn(wt, 8, True, wt.shape[1])
    a = (xt.abs().max() / 127).reshape(()) if act_scale else None
    return sqnr_db(x @ w.T, linear_w8a8(xt, qw.codes.to(torch.int8), qw.scale, None, a))


def test_outlier_handling_beats_naive_per_tensor_int8():
    x, w = _outlier_inputs()
    naive = _w8a8_sqnr(x, w)
    smooth = _w8a8_sqnr(x, w, inv_scale=1 / smooth_scales(x.abs().amax(0), w, 0.5))
    rotated = _w8a8_sqnr(x, w, rotation=hadamard(64), act_scale=False)
    per_token = _w8a8_sqnr(x, w, act_scale=False)
    assert smooth > naive + 6 and rotated > naive + 6
    assert rotated > per_token  # the rotation spreads the outlier channel over all channels
    assert min(smooth, rotated) > 30


def test_awq_never_worse_than_rtn_on_its_calibration_set():
    x, w = _outlier_inputs()
    x = x.abs()  # AWQ keys on mean |x|
    q, s, alpha = awq(w, x, bits=4, symmetric=True, group_size=16)
    assert s.shape == (64,) and 0 <= alpha < 1
    rtn_err = (x @ w.T - x @ rtn(w, 4, True, 16).dequantize().T).pow(2).mean()
    awq_err = (x @ w.T - (x / s) @ q.dequantize().T).pow(2).mean()
    assert awq_err <= rtn_err
    assert awq_err < 0.8 * rtn_err  # the outlier channel is worth protecting here
