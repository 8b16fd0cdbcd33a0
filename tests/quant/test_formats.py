import pytest
import torch

from dlmc.errors import DlmcError
from dlmc.quant.formats import check_group_size, pack_int4, qrange, rtn, sqnr_db, unpack_int4

torch.manual_seed(0)


def test_rtn_symmetric_int8_per_channel_by_hand():
    w = torch.tensor([[1.0, -2.0, 0.5, 4.0]])
    qw = rtn(w, bits=8, symmetric=True, group_size=4)
    torch.testing.assert_close(qw.scale, torch.tensor([[4.0 / 127]]))
    # 31.75 -> 32, -63.5 -> -64 (half to even), 15.875 -> 16, 127
    assert qw.codes.tolist() == [[32, -64, 16, 127]]
    assert qw.zero is None


@pytest.mark.parametrize(
    ("bits", "symmetric", "group_size", "min_db"),
    [(8, True, 128, 38), (8, False, 128, 38), (8, True, 32, 40),
     (4, True, 32, 17), (4, False, 32, 18), (4, True, 128, 14)],
)
def test_rtn_sqnr_on_random_weights(bits, symmetric, group_size, min_db):
    w = torch.randn(64, 128)
    qw = rtn(w, bits=bits, symmetric=symmetric, group_size=group_size)
    lo, hi = qrange(bits, symmetric)
    assert lo <= qw.codes.min() and qw.codes.max() <= hi
    assert qw.scale.shape == (64, 128 // group_size)
    assert sqnr_db(w, qw.dequantize()) > min_db


def test_asymmetric_beats_symmetric_on_shifted_weights():
    w = torch.rand(32, 64) + 0.5  # all positive: half of the symmetric grid is wasted
    sym = sqnr_db(w, rtn(w, bits=4, symmetric=True, group_size=64).dequantize())
    asym = sqnr_db(w, rtn(w, bits=4, symmetric=False, group_size=64).dequantize())
    assert asym > sym + 3


def test_rtn_sqnr_on_a_real_layer(default_model_state):
    w = default_model_state["layers.1.mlp.down_proj.weight"]  # [256, 768]
    assert sqnr_db(w, rtn(w, bits=8, symmetric=True, group_size=768).dequantize()) > 38
    assert sqnr_db(w, rtn(w, bits=4, symmetric=True, group_size=64).dequantize()) > 17


def test_int4_packing_round_trips_with_even_column_low():
    u = torch.randint(0, 16, (5, 12), dtype=torch.uint8)
    packed = pack_int4(u)
    assert packed.shape == (5, 6) and packed.dtype == torch.uint8
    assert (packed[:, 0] & 15).tolist() == u[:, 0].tolist()
    assert torch.equal(unpack_int4(packed), u)


def test_storage_is_small_and_typed():
    qw = rtn(torch.randn(8, 64), bits=4, symmetric=True, group_size=32)
    stored = qw.storage()
    assert stored["qweight"].dtype == torch.uint8 and stored["qweight"].shape == (8, 32)
    assert "zero" not in stored
    asym = rtn(torch.randn(8, 64), bits=8, symmetric=False, group_size=32).storage()
    assert asym["qweight"].dtype == torch.uint8 and asym["zero"].shape == (8, 2)


def test_group_size_that_does_not_divide_names_layer_and_field():
    assert check_group_size(96, None, "x") == 96
    message = r"quantize.group_size: 64 does not divide the 96 input channels of layers.0.mlp.down_proj"
    with pytest.raises(DlmcError, match=message):
        check_group_size(96, 64, "layers.0.mlp.down_proj")
