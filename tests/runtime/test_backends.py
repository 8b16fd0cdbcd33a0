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
