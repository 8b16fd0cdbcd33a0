"""share_weights folds one program's weights file into another's: equal tensors once, the rest added, a
name whose bytes differ kept under a prefixed key that the runtime's WeightFiles reads back."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from dlmc.lower.shared_weights import same_bytes, share_weights
from dlmc.runtime.weights import WeightFiles


def entry(weights, names):
    return {"name": "eager", "files": {"graph": "g.json", "weights": weights},
            "state": {"parameters": names, "buffers": [], "constants": []}}


def test_equal_tensors_are_stored_once_and_different_ones_under_a_prefix(tmp_path):
    (tmp_path / "enc").mkdir()
    shared, differs = torch.arange(6.0).reshape(2, 3), torch.ones(4)
    save_file({"shared": shared, "differs": differs, "decoder_only": torch.zeros(2)}, str(tmp_path / "w.safetensors"))
    save_file({"shared": shared.clone(), "differs": -differs, "encoder_only": torch.full((3,), 7.0)},
              str(tmp_path / "enc/w.safetensors"))
    main = entry("w.safetensors", ["shared", "differs", "decoder_only"])
    other = share_weights(tmp_path, main, entry("enc/w.safetensors", ["shared", "differs", "encoder_only"]), "enc")
    assert not (tmp_path / "enc/w.safetensors").exists()
    assert other["files"]["weights"] == "w.safetensors" and other["keys"] == {"differs": "enc/differs"}
    stored = load_file(str(tmp_path / "w.safetensors"))
    assert sorted(stored) == ["decoder_only", "differs", "enc/differs", "encoder_only", "shared"]

    weights = WeightFiles()
    decoder, _ = weights.state(tmp_path, main, "cpu")
    encoder, _ = weights.state(tmp_path, other, "cpu")
    assert encoder["shared"].data_ptr() == decoder["shared"].data_ptr()
    assert torch.equal(encoder["differs"], -differs) and torch.equal(decoder["differs"], differs)
    assert torch.equal(encoder["encoder_only"], torch.full((3,), 7.0))


def test_same_bytes_is_bitwise():
    assert not same_bytes(torch.tensor([0.0]), torch.tensor([-0.0]))
    assert same_bytes(torch.tensor([float("nan")]), torch.tensor([float("nan")]))
    assert not same_bytes(torch.zeros(2), torch.zeros(2, dtype=torch.float64))


def test_a_step_that_does_not_read_weights_by_name_is_refused(tmp_path):
    onnx = {"name": "onnxrt", "files": {"model": "model.onnx", "weights": "weights.safetensors"}}
    with pytest.raises(ValueError, match="do not read weights by name"):
        share_weights(tmp_path, onnx, entry("enc/w.safetensors", []), "enc")
