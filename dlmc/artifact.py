"""The compiled-artifact format: one directory, a versioned manifest, and the files it hashes.

This module is the single home of the schema (see ARTIFACT.md). The compiler writes artifacts through
`write_artifact`; the runtime reads them through `read_manifest` and `verify_files`. It imports neither
side, so the runtime can use it without pulling in the compiler.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dlmc.device import device_kind
from dlmc.errors import DlmcError
from dlmc.spec import DenoiserSpec
from dlmc.typed import build, kind

FORMAT = "dlmc-artifact"
FORMAT_VERSION = 2
"""Bump on any change an older reader would misread (see ARTIFACT.md, "Compatibility")."""
MANIFEST = "manifest.json"
TOKENIZER_DIR = "tokenizer"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)
"""What `dlmc.tokenizer.load_tokenizer` reads, plus the files that describe special tokens."""
FUSED_OUTPUTS: dict[str, tuple[str, ...]] = {
    "llada": ("tokens", "confidence", "confidence64"),
    "dream": ("tokens", "probability", "margin", "neg_entropy"),
    "block": ("tokens", "confidence", "confidence64"),
    "wedlm": ("tokens", "fill", "entropy"),
    "llada2": ("tokens", "confidence", "argmax", "argmax_confidence"),
    "diffusion_gemma": ("next_canvas", "argmax_canvas", "mean_entropy", "next_soft"),  # dlmc.capture_gemma
}
"""Closed registry: decoder -> the first outputs of a step with that decoder's per-row rule fused onto
it (the fuse_decode pass). The signature records the decoder; the outputs tell a fused step from a
plain one (and, for artifacts written before the record, llada's rule from dream's)."""


# ---------------------------------------------------------------------------------------------
# the step signature: what the runtime feeds the compiled step and what it gets back
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    """torch dtype name without the "torch." prefix, e.g. "int64"."""
    shape: tuple[str | int, ...]
    """A symbolic dim is named ("batch", "seq"); a static one is an int."""

    def __post_init__(self) -> None:
        if not isinstance(getattr(torch, self.dtype, None), torch.dtype):
            raise ValueError(f"dtype: '{self.dtype}' is not a torch dtype")


@dataclass(frozen=True, kw_only=True)
class StepSignature:
    """The inputs and outputs of the compiled denoising step, in call order, and the shapes it accepts.

    A pass that changes the step's interface (cache inputs, extra outputs) records a new signature; the
    runtime drives the step from this record, never from assumptions about the model family.
    """

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    batch: tuple[int, int]
    """Smallest and largest batch the step accepts."""
    seq: tuple[int, int]
    """Smallest and largest sequence length the step accepts."""
    seq_buckets: tuple[int, ...] = ()
    """When set, the runtime pads every call to the next bucket length (for backends built per shape)."""
    cache: dict[str, Any] | None = None
    """For a step with K/V cache inputs: the cache policy the runtime drives it with (the caching
    pass's resolved config, e.g. {"policy": "dual", "block_length": 32}); None for a plain step."""
    decoder: str | None = None
    """For a fused step (fuse_decode): the decoder whose per-row rule it computes; None for a plain
    step (and for fused artifacts written before the record: their outputs name the rule)."""
    kernels: tuple[str, ...] = ()
    """dlmc's native kernels the step calls (`cpu_attention`): the runtime loads them before the step."""

    def __post_init__(self) -> None:
        for name in ("batch", "seq"):
            bounds = getattr(self, name)
            if len(bounds) != 2 or not 1 <= bounds[0] <= bounds[1]:
                raise ValueError(f"{name}: expected [smallest, largest], 1 <= smallest <= largest, got {list(bounds)}")
        if not self.outputs:
            raise ValueError("outputs: the step must return at least the logits")
        if any(b < 1 for b in self.seq_buckets):
            raise ValueError("seq_buckets: every bucket must be >= 1")

    @property
    def fused(self) -> bool:
        """The step returns decoded tokens and confidences of the rows it is given (fuse_decode), not
        logits of the whole canvas."""
        return self.fused_decoder is not None

    @property
    def fused_decoder(self) -> str | None:
        """The decoder whose per-row rule the step returns the results of (fuse_decode), else None."""
        names = tuple(t.name for t in self.outputs)
        matching = [d for d, outs in FUSED_OUTPUTS.items() if names[: len(outs)] == outs]
        if not matching:
            return None
        return self.decoder if self.decoder in matching else matching[0]

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.inputs]

    def to_dict(self) -> dict[str, Any]:
        return {
            "inputs": [_spec_dict(t) for t in self.inputs],
            "outputs": [_spec_dict(t) for t in self.outputs],
            "batch": list(self.batch),
            "seq": list(self.seq),
            "seq_buckets": list(self.seq_buckets),
            "cache": self.cache,
            **({"decoder": self.decoder} if self.decoder else {}),  # absent for unfused steps, as before
            **({"kernels": list(self.kernels)} if self.kernels else {}),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StepSignature:
        """The signature a manifest records; a malformed one is a DlmcError naming the field."""
        problems: list[str] = []
        signature = build(cls, d, "signature", problems)
        if problems:
            raise DlmcError(problems[0])
        return signature


def _spec_dict(t: TensorSpec) -> dict[str, Any]:
    return {"name": t.name, "dtype": t.dtype, "shape": list(t.shape)}


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------


def write_artifact(
    out_dir: str | Path,
    manifest: dict[str, Any],
    write_files: Callable[[Path], None],
    *,
    tokenizer_from: Path | None = None,
    force: bool = False,
) -> Path:
    """Build the artifact in a temporary sibling directory and rename it into place only when complete.

    `write_files(staging_dir)` writes the backend's files; this function adds the tokenizer files, the
    sha256 of every file, and the manifest (written last). Nothing is left behind on failure, and an
    existing `out_dir` is replaced only with `force=True`.
    """
    out = Path(out_dir)
    check_writable(out, force=force)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    except OSError as e:
        raise DlmcError(f"{out}: cannot create the output directory ({e.strerror or e})") from e
    try:
        write_files(staging)
        if tokenizer_from is not None:
            _copy_tokenizer(tokenizer_from, staging / TOKENIZER_DIR)
        manifest = dict(manifest, format=FORMAT, format_version=FORMAT_VERSION, files=_hash_tree(staging))
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
        _normalise_permissions(staging)
        _move_into_place(staging, out, force=force)
    except OSError as e:  # a full disk, a permission problem: one line, nothing left behind
        shutil.rmtree(staging, ignore_errors=True)
        raise DlmcError(f"{out}: cannot write the artifact ({e.strerror or e})") from e
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def check_writable(out: Path, *, force: bool) -> None:
    """Fail before any work when the output exists and may not be replaced."""
    if out.exists() and not force:
        raise DlmcError(f"{out}: already exists (pass force=True / --force to replace it)")
    if out.exists() and not out.is_dir():
        raise DlmcError(f"{out}: exists and is not a directory")


def _normalise_permissions(root: Path) -> None:
    """mkdtemp and some writers create owner-only files; an artifact is read like any other output."""
    umask = os.umask(0)
    os.umask(umask)
    root.chmod(0o777 & ~umask)
    for path in root.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _copy_tokenizer(model_dir: Path, dest: Path) -> None:
    found = [name for name in TOKENIZER_FILES if (model_dir / name).is_file()]
    if not found:
        return
    dest.mkdir()
    for name in found:
        shutil.copyfile(model_dir / name, dest / name)


def _move_into_place(staging: Path, out: Path, *, force: bool) -> None:
    if not out.exists():
        os.rename(staging, out)
        return
    if not force:  # it appeared while we were compiling
        raise DlmcError(f"{out}: already exists (pass force=True / --force to replace it)")
    # Swap by two renames so a reader never sees a half-replaced directory.
    retired = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.rename(out, retired / out.name)
    os.rename(staging, out)
    shutil.rmtree(retired, ignore_errors=True)


def _hash_tree(root: Path) -> dict[str, dict[str, Any]]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {p.relative_to(root).as_posix(): {"sha256": sha256(p), "bytes": p.stat().st_size} for p in files}


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------

REQUIRED_FIELDS = ("dlmc_version", "torch_version", "spec", "recipe", "backend", "signature", "decode", "files")


def read_manifest(path: str | Path, *, verify: bool = False) -> dict[str, Any]:
    """The artifact's manifest, checked for format and version (and, with verify=True, every file's
    size and sha256). Any problem is one DlmcError line naming the file."""
    root = Path(path)
    where = root / MANIFEST
    if not root.is_dir():
        raise DlmcError(f"{root}: not an artifact directory")
    if not where.is_file():
        raise DlmcError(f"{root}: not a dlmc artifact (no {MANIFEST})")
    try:
        manifest = json.loads(where.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DlmcError(f"{where}: not valid JSON ({e}); the artifact is corrupt") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DlmcError(f"{where}: not a dlmc artifact manifest (format is not '{FORMAT}')")
    version = manifest.get("format_version")
    if not isinstance(version, int):
        raise DlmcError(f"{where}: missing or invalid 'format_version'")
    if version > FORMAT_VERSION:
        raise DlmcError(
            f"{where}: artifact format version {version} is newer than this dlmc reads ({FORMAT_VERSION}); "
            "upgrade dlmc or recompile the model"
        )
    missing = [k for k in REQUIRED_FIELDS if k not in manifest]
    if missing:
        raise DlmcError(f"{where}: missing field '{missing[0]}'")
    try:
        check_fields(manifest)
    except DlmcError as e:
        raise DlmcError(f"{where}: {e}") from None
    if verify:
        verify_files(root, manifest)
    return manifest


def check_fields(manifest: dict[str, Any]) -> None:
    """Every field the runtime and `dlmc inspect` read has the type they read it as, so a damaged or
    hand-edited manifest is one line naming its first bad field ("signature.inputs[2].dtype: ..."),
    never a KeyError deep in a loader."""
    problems: list[str] = []
    build(StepSignature, manifest["signature"], "signature", problems)
    build(DenoiserSpec, manifest["spec"], "spec", problems)
    if problems:
        raise DlmcError(problems[0])
    for key in ("dlmc_version", "torch_version"):
        _need(manifest[key], str, key)
    _need(manifest["recipe"], dict, "recipe")
    decode = _need(manifest["decode"], (dict, type(None)), "decode") or {}
    _need(decode.get("decoder"), (str, type(None)), "decode.decoder")
    _need(decode.get("config"), (dict, type(None)), "decode.config")
    files = _need(manifest["files"], dict, "files")
    for name, entry in files.items():
        if ".." in Path(name).parts or Path(name).is_absolute():
            raise DlmcError(f"files: entry '{name}' points outside the artifact")
        _need(_need(entry, dict, f"files.{name}").get("sha256"), str, f"files.{name}.sha256")
        _need(entry.get("bytes"), int, f"files.{name}.bytes")
    backend = _need(manifest["backend"], dict, "backend")
    _need(backend.get("name"), str, "backend.name")
    if device_kind(_need(backend.get("device", "cpu"), str, "backend.device")) is None:
        raise DlmcError(f"backend.device: '{backend['device']}' is not cpu, cuda or cuda:N")
    for role, name in _need(backend.get("files", {}), dict, "backend.files").items():
        if _need(name, str, f"backend.files.{role}") not in files:  # keeps the loaders inside the hashed files
            raise DlmcError(f"backend.files.{role}: {name!r} is not one of the artifact's files")
    for role, names in _need(backend.get("state", {}), dict, "backend.state").items():
        for i, name in enumerate(_need(names, list, f"backend.state.{role}")):
            _need(name, str, f"backend.state.{role}[{i}]")
    for i, entry in enumerate(_need(manifest.get("passes", []), list, "passes")):
        _need(_need(entry, dict, f"passes[{i}]").get("name"), str, f"passes[{i}].name")
        _need(entry.get("exact"), bool, f"passes[{i}].exact")
    _need(manifest.get("model"), (dict, type(None)), "model")


def _need(value: Any, types: type | tuple[type, ...], field: str) -> Any:
    wanted = types if isinstance(types, tuple) else (types,)
    if not isinstance(value, wanted) or (isinstance(value, bool) and bool not in wanted):
        names = " or ".join({dict: "a mapping", list: "a list", str: "a string", int: "an integer",
                             bool: "a boolean", type(None): "nothing"}[t] for t in wanted)
        raise DlmcError(f"{field}: expected {names}, got {kind(value)}")
    return value


def verify_files(root: Path, manifest: dict[str, Any]) -> None:
    """Every file the manifest lists exists with its recorded size and sha256, and no file is unlisted."""
    files = manifest["files"]
    for name, entry in files.items():
        path = root / name  # check_fields keeps every name inside the artifact
        if not path.is_file():
            raise DlmcError(f"{path}: missing (listed in {MANIFEST})")
        if path.stat().st_size != entry.get("bytes"):
            raise DlmcError(f"{path}: size {path.stat().st_size} != {entry.get('bytes')} in {MANIFEST} (truncated?)")
        if sha256(path) != entry.get("sha256"):
            raise DlmcError(f"{path}: sha256 does not match {MANIFEST} (file corrupt or modified)")
    listed = set(files) | {MANIFEST}
    extra = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    extra = [name for name in extra if name not in listed]
    if extra:
        raise DlmcError(f"{root / extra[0]}: file not listed in {MANIFEST} (foreign or tampered artifact)")
