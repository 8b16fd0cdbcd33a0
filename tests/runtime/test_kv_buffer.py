"""CommittedKV: final K/V land in their rows' own columns, the rest in the dump column; a row that leaves
the batch gives its slot up and the others keep theirs."""

from types import SimpleNamespace

import torch

from dlmc.artifact import TensorSpec
from dlmc.runtime.kv_buffer import CommittedKV


def buffer(batch: int, width: int) -> CommittedKV:
    spec = TensorSpec("cache_keys", "float32", (2, "batch", 1, "cache", 3))  # [layers, B, H, C, D]
    return CommittedKV(SimpleNamespace(inputs=[spec], names=["cache_keys"]), batch, width, "cpu")


def test_writes_final_columns_in_place_and_drops_rows_that_left():
    kv = buffer(batch=3, width=5)
    cols = torch.tensor([[0, 1, 2], [2, 3, 4], [1, 2, 3]])  # [A, Q]: each query's column
    final = torch.tensor([[True, True, False], [True, True, True], [False, True, True]])  # [A, Q]
    keys = torch.arange(1.0, 10.0).reshape(1, 3, 1, 3, 1).expand(2, 3, 1, 3, 3)  # [layers, A, H, Q, D]
    storage = kv.keys
    kv.write(cols, final, keys, -keys)
    assert kv.keys is storage  # written in place
    stored = kv.keys[0, :, 0, :, 0]  # [A, W + 1]
    assert stored[:, :5].tolist() == [[1, 2, 0, 0, 0], [0, 0, 4, 5, 6], [0, 0, 8, 9, 0]]
    assert torch.equal(kv.values, -kv.keys)
    mask, positions, keys_in, _ = kv.inputs(torch.tensor([0, 2]), torch.tensor([2, 4]))  # row 1 left
    assert mask.tolist() == [[True, True, False, False, False, False], [True, True, True, True, False, False]]
    assert positions.tolist() == [[0, 1, 2, 3, 4, 4]] * 2  # the dump column carries a valid position
    assert keys_in[0, :, 0, :5, 0].tolist() == [[1, 2, 0, 0, 0], [0, 0, 8, 9, 0]]
