import json
import zipfile

import pytest
import torch

from dlmc.errors import DlmcError
from dlmc.runtime.backends import audit_pt2


class Small(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3, 3)

    def forward(self, x):
        return self.linear(x) + torch.tensor([1.0, 2.0, 3.0])


@pytest.fixture
def archive(tmp_path):
    path = tmp_path / "program.pt2"
    torch.export.save(torch.export.export(Small(), (torch.randn(2, 3),)), str(path))
    return path


def rewrite(path, edit):
    """Copy the archive with `edit(name, data) -> data` applied to every member."""
    members = {}
    with zipfile.ZipFile(path) as z:
        for name in z.namelist():
            members[name] = edit(name, z.read(name))
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)


def test_a_plain_torch_export_archive_passes(archive):
    audit_pt2(archive)


def test_pickled_weights_are_refused(archive):
    def flag(name, data):
        if name.endswith("model_weights_config.json"):
            config = json.loads(data)
            next(iter(config["config"].values()))["use_pickle"] = True
            return json.dumps(config).encode()
        return data

    rewrite(archive, flag)
    with pytest.raises(DlmcError, match="is stored pickled; refusing to load it"):
        audit_pt2(archive)


def test_opaque_python_objects_are_refused(archive):
    def opaque(name, data):
        if name.endswith("model_constants_config.json"):
            config = json.loads(data)
            next(iter(config["config"].values()))["path_name"] = "opaque_obj_0"
            return json.dumps(config).encode()
        return data

    rewrite(archive, opaque)
    with pytest.raises(DlmcError, match="is a pickled Python object"):
        audit_pt2(archive)


def test_sample_inputs_must_be_plain_tensors(archive, tmp_path):
    import io
    import pickle

    payload = io.BytesIO()
    pickle.dump({"not": object.__new__(zipfile.ZipInfo)}, payload)
    rewrite(archive, lambda name, data: payload.getvalue() if "/data/sample_inputs/" in name else data)
    with pytest.raises(DlmcError, match="holds more than tensors"):
        audit_pt2(archive)


def test_not_a_zip(tmp_path):
    bogus = tmp_path / "x.pt2"
    bogus.write_bytes(b"hello")
    with pytest.raises(DlmcError, match=r"not a readable \.pt2 archive"):
        audit_pt2(bogus)


def test_cuda_n_reaches_onnxruntimes_device_id(monkeypatch, tmp_path):
    """cuda:1 must run on GPU 1: onnxruntime's CUDA provider otherwise takes device 0 whatever was asked."""
    ort = pytest.importorskip("onnxruntime")
    from dlmc.runtime.backends import open_session

    seen = {}

    class FakeSession:
        def __init__(self, path, sess_options, providers):
            seen["providers"] = providers

        def get_providers(self):
            return ["CUDAExecutionProvider"]

    monkeypatch.setattr(ort, "InferenceSession", FakeSession)
    open_session(tmp_path / "model.onnx", (), "all", "cuda:1")
    assert seen["providers"] == [("CUDAExecutionProvider", {"device_id": "1"})]
    open_session(tmp_path / "model.onnx", ("CUDAExecutionProvider",), "all", "cuda")
    assert seen["providers"] == ["CUDAExecutionProvider"]  # plain cuda: the provider's own default


def test_cuda_n_reaches_the_aotinductor_loader(monkeypatch, tmp_path):
    import torch._inductor

    from dlmc.runtime.backends import load_inductor

    seen = {}

    def fake_load(path, device_index=-1):
        seen["device_index"] = device_index
        raise RuntimeError("stop here")

    monkeypatch.setattr(torch._inductor, "aoti_load_package", fake_load)
    entry = {"files": {"package": "step.pt2", "weights": "weights.safetensors"}}
    for device, index in (("cuda:1", 1), ("cuda", -1)):
        with pytest.raises(DlmcError, match="cannot load the AOTInductor package"):
            load_inductor(tmp_path, entry, device, "cuda")
        assert seen["device_index"] == index


def test_bound_step_binds_tensors_in_place_bfloat16_included(tmp_path):
    """The IOBinding path a GPU session takes, run here on the CPU: int64, bool and bfloat16 inputs bound
    by pointer, outputs back through DLPack, with the values a plain computation gives."""
    pytest.importorskip("onnxruntime")
    import onnx
    from onnx import TensorProto, helper

    from dlmc.runtime.backends import bound_step, open_session

    def value(name, elem):
        return helper.make_tensor_value_info(name, elem, ["batch", "seq"])

    nodes = [
        helper.make_node("Cast", ["ids"], ["ids_f"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["mask"], ["mask_f"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["h"], ["h_f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["ids_f", "mask_f"], ["prod"]),
        helper.make_node("Add", ["prod", "h_f"], ["logits"]),
        helper.make_node("Identity", ["h"], ["h_out"]),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [value("ids", TensorProto.INT64), value("mask", TensorProto.BOOL), value("h", TensorProto.BFLOAT16)],
        [value("logits", TensorProto.FLOAT), value("h_out", TensorProto.BFLOAT16)],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), str(tmp_path / "m.onnx"))
    step = bound_step(open_session(tmp_path / "m.onnx", (), "all", "cpu"), "cpu")
    ids = torch.arange(6).reshape(2, 3)  # [B, L] int64
    mask = torch.tensor([[True, False, True], [True, True, False]])  # [B, L] bool
    h = torch.tensor([[0.5, 1.5, -2.0], [4.0, 0.25, 8.0]], dtype=torch.bfloat16)  # [B, L]
    logits, h_out = step(ids, mask, h)
    assert h_out.dtype == torch.bfloat16 and torch.equal(h_out, h)
    assert torch.equal(logits, ids.float() * mask.float() + h.float())  # small exact values
