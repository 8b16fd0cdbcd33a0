import json
from pathlib import Path

import pytest

from dlmc.artifact import (
    FORMAT_VERSION,
    MANIFEST,
    StepSignature,
    TensorSpec,
    read_manifest,
    sha256,
    write_artifact,
)
from dlmc.errors import DlmcError

BASE = {
    "dlmc_version": "0",
    "torch_version": "0",
    "spec": {"family": "llada", "mask_token_id": 3, "attention": "bidirectional", "block_size": None,
             "shift_logits": False, "vocab_size": 8, "max_length": 16},
    "recipe": {},
    "backend": {"name": "eager"},
    "signature": {"inputs": [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"]}],
                  "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", "seq", 8]}],
                  "batch": [1, 2], "seq": [2, 16]},
    "decode": {},
}


def write_two_files(directory: Path) -> None:
    (directory / "weights.safetensors").write_bytes(b"\x00" * 100)
    (directory / "step.json").write_text("{}")


def make(tmp_path: Path, name: str = "out", **kw) -> Path:
    return write_artifact(tmp_path / name, dict(BASE), write_two_files, **kw)


def test_manifest_hashes_every_file_including_the_tokenizer(tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "tokenizer.json").write_text("{}")
    (model_dir / "config.json").write_text("{}")  # not a tokenizer file: not copied
    out = make(tmp_path, tokenizer_from=model_dir)
    manifest = read_manifest(out, verify=True)
    assert manifest["format"] == "dlmc-artifact" and manifest["format_version"] == FORMAT_VERSION
    assert set(manifest["files"]) == {"weights.safetensors", "step.json", "tokenizer/tokenizer.json"}
    assert manifest["files"]["weights.safetensors"] == {"sha256": sha256(out / "weights.safetensors"), "bytes": 100}
    assert not (out / "tokenizer" / "config.json").exists()


def test_failure_leaves_nothing_behind(tmp_path):
    def half_written(directory: Path) -> None:
        (directory / "weights.safetensors").write_bytes(b"partial")
        raise RuntimeError("lowering died")

    with pytest.raises(RuntimeError):
        write_artifact(tmp_path / "out", dict(BASE), half_written)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_force(tmp_path):
    out = make(tmp_path)
    (out / "step.json").write_text('{"old": true}')
    with pytest.raises(DlmcError, match="already exists"):
        make(tmp_path)
    make(tmp_path, force=True)
    assert (out / "step.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging or retired copies left


@pytest.mark.parametrize(
    ("damage", "fragment"),
    [
        (lambda out: (out / "weights.safetensors").write_bytes(b"\x00" * 50), "(truncated?)"),
        (lambda out: (out / "weights.safetensors").write_bytes(b"\x01" * 100), "sha256 does not match"),
        (lambda out: (out / "step.json").unlink(), "missing (listed in manifest.json)"),
        (lambda out: (out / "payload.so").write_bytes(b"x"), "not listed in manifest.json"),
    ],
)
def test_damaged_files_are_caught_by_verify(tmp_path, damage, fragment):
    out = make(tmp_path)
    damage(out)
    read_manifest(out)  # the manifest itself is fine
    with pytest.raises(DlmcError) as info:
        read_manifest(out, verify=True)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def edit_manifest(out: Path, change) -> None:
    manifest = json.loads((out / MANIFEST).read_text())
    change(manifest)
    (out / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("damage", "fragment"),
    [
        (lambda out: (out / MANIFEST).write_text('{"format": "dlmc-artif'), "not valid JSON"),
        (lambda out: (out / MANIFEST).unlink(), "not a dlmc artifact (no manifest.json)"),
        (lambda out: edit_manifest(out, lambda m: m.update(format="onnx-bundle")), "not a dlmc artifact manifest"),
        (
            lambda out: edit_manifest(out, lambda m: m.update(format_version=FORMAT_VERSION + 1)),
            "is newer than this dlmc",
        ),
        (lambda out: edit_manifest(out, lambda m: m.pop("signature")), "missing field 'signature'"),
        (lambda out: edit_manifest(out, lambda m: m["files"].update({"../x": {}})), "points outside the artifact"),
    ],
)
def test_bad_manifests_are_one_line(tmp_path, damage, fragment):
    out = make(tmp_path)
    damage(out)
    with pytest.raises(DlmcError) as info:
        read_manifest(out, verify=True)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_not_a_directory(tmp_path):
    with pytest.raises(DlmcError, match="not an artifact directory"):
        read_manifest(tmp_path / "nothing")


def test_signature_round_trips_through_json():
    signature = StepSignature(
        inputs=(TensorSpec("input_ids", "int64", ("batch", "seq")),),
        outputs=(TensorSpec("logits", "float32", ("batch", "seq", 272)),),
        batch=(1, 8),
        seq=(2, 512),
        seq_buckets=(64, 128),
    )
    assert StepSignature.from_dict(json.loads(json.dumps(signature.to_dict()))) == signature


def test_unwritable_destination_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(DlmcError, match="cannot create the output directory"):
        write_artifact(blocker / "out", dict(BASE), write_two_files)
