"""Reading a published checkpoint directory: config.json and (sharded) safetensors, memory-mapped."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from dlmc.errors import DlmcError
from dlmc.files import read_json
from dlmc.models import bnb
from dlmc.models.bnb import BnbFormat

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# Tensors some exporters add that carry no weights of ours.
IGNORED_TENSORS = re.compile(r".*rotary_emb\.inv_freq$")


SIZES = (
    "d_model", "n_heads", "n_layers", "n_kv_heads", "embedding_size", "mlp_hidden_size", "mlp_ratio",
    "max_sequence_length", "hidden_size", "num_attention_heads", "num_hidden_layers", "num_key_value_heads",
    "head_dim", "intermediate_size", "vocab_size", "max_position_embeddings", "bd_size", "block_size",
    "num_experts", "num_experts_per_tok", "moe_intermediate_size", "expert_intermediate_size",
    "dense_intermediate_size", "shared_expert_intermediate_size", "n_group", "topk_group", "decoder_sparse_step",
)
TOKEN_IDS = ("mask_token_id", "pad_token_id", "eos_token_id")
NUMBERS = ("rms_norm_eps", "rope_theta", "routed_scaling_factor", "partial_rotary_factor")
FLAGS = (
    "include_bias", "include_qkv_bias", "weight_tying", "rope_full_precision", "input_emb_norm", "scale_logits",
    "multi_query_attention", "tie_word_embeddings", "attention_bias", "qk_norm", "qk_layernorm", "use_qk_norm",
    "norm_topk_prob", "use_qkv_bias", "use_bias", "moe_router_enable_expert_bias",
)


def check_config_types(config: dict, where: Path) -> None:
    """Every config.json field a family reader uses holds the kind of value it is read as, so a
    hand-edited config is one line naming the field, not an arithmetic error in the reader. null is
    read as absent, as the readers do."""
    for key, value in config.items():
        if value is None:
            continue
        if key in SIZES:
            ok, kind = _integer(value) and value >= 1, "an integer >= 1"
        elif key in TOKEN_IDS:  # eos may list several ids (the first is used)
            ids = value if key == "eos_token_id" and isinstance(value, list) and value else [value]
            ok, kind = all(_integer(v) and v >= 0 for v in ids), "a token id (an integer >= 0)"
        elif key in NUMBERS:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= sys.float_info.max
            kind = "a positive number"
        elif key in FLAGS:
            ok, kind = isinstance(value, bool), "true or false"
        else:
            continue
        if not ok:
            shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
            raise DlmcError(f"{where}: field '{key}' must be {kind}, got {shown}")


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def field(config: dict, key: str, where: Path, family: str, default=None, required: bool = True):
    """A config value; a missing required one is an error naming the file and the field."""
    if key in config and config[key] is not None:
        return config[key]
    if required and default is None:
        raise DlmcError(f"{where}: missing field '{key}' needed by the {family} family")
    return default


def weight_map(model_dir: Path) -> dict[str, Path]:
    """Published tensor name -> the shard file that holds it."""
    index = model_dir / INDEX_FILE
    if index.is_file():
        entries = read_json(index).get("weight_map")
        if not isinstance(entries, dict) or not entries:
            raise DlmcError(f"{index}: missing or empty 'weight_map'")
        if not all(isinstance(shard, str) for shard in entries.values()):
            raise DlmcError(f"{index}: 'weight_map' must map tensor names to shard file names")
        files = {name: model_dir / shard for name, shard in entries.items()}
        for shard in sorted(set(files.values())):
            if not shard.is_file():
                raise DlmcError(f"{shard}: shard listed in {INDEX_FILE} is missing")
            read_header(shard)
        return files
    single = model_dir / SINGLE_FILE
    if single.is_file():
        return {name: single for name in read_header(single)}
    raise DlmcError(f"{model_dir}: no {INDEX_FILE} or {SINGLE_FILE}")


MAX_HEADER = 100_000_000
"""The largest header safetensors itself reads."""


def read_header(path: Path) -> dict[str, dict]:
    """A safetensors file's tensors (name -> dtype, shape, data_offsets), read from its header alone,
    after checking the file is as long as the header says its data is: a truncated download fails
    here, naming the shard, and not only once the weights are read (never, for `dlmc inspect`)."""
    try:
        with open(path, "rb") as f:
            length = int.from_bytes(f.read(8), "little")  # u64 little-endian, then the JSON header
            raw = f.read(length) if length <= MAX_HEADER else b""
        header = json.loads(raw)
    except OSError as e:
        raise DlmcError(f"{path}: cannot read ({e.strerror or e})") from None
    except ValueError:  # also UnicodeDecodeError
        raise DlmcError(f"{path}: not a safetensors file (no readable header; truncated?)") from None
    if not isinstance(header, dict):
        raise DlmcError(f"{path}: not a safetensors file (no readable header)")
    tensors = {name: t for name, t in header.items() if name != "__metadata__"}
    try:
        end = max((int(t["data_offsets"][1]) for t in tensors.values()), default=0)
    except (TypeError, KeyError, IndexError, ValueError):
        raise DlmcError(f"{path}: not a safetensors file (a tensor without data_offsets)") from None
    size = path.stat().st_size
    if size < 8 + length + end:
        raise DlmcError(f"{path}: truncated: {size} bytes, the header describes {8 + length + end}")
    return tensors


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as e:  # safetensors raises several types for truncated or foreign files
        raise DlmcError(f"{path}: not a readable safetensors file ({e})") from None


def checkpoint_dtype(files: dict[str, Path]) -> torch.dtype:
    """The dtype of the checkpoint's first floating-point tensor (quantized checkpoints also hold
    integer codes, which say nothing about the model's dtype)."""
    shards = Shards(files)
    for name in files:
        if (stored := shards.dtype(name)) in FLOAT_DTYPES:
            return FLOAT_DTYPES[stored]
    name = next(iter(files))
    raise DlmcError(f"{files[name]}: no floating-point tensor in the checkpoint ('{name}' is {shards.dtype(name)})")


FLOAT_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


class Shards:
    """Stored tensors by published name. Each shard is opened once, on first use, and stays open (it is
    memory-mapped: nothing is read until a tensor is asked for), because a quantized weight's
    companion tensors may sit in another shard than the weight."""

    def __init__(self, files: dict[str, Path]):
        self.files = files
        self._handles: dict[Path, object] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def path(self, name: str) -> Path:
        return self.files[name]

    def names_under(self, prefix: str) -> list[str]:
        return sorted(n for n in self.files if n.startswith(prefix))

    def dtype(self, name: str) -> str:
        """The safetensors dtype string ("BF16", "I8", "U8", ...), read from the header only."""
        return self._handle(name).get_slice(name).get_dtype()

    def get(self, name: str) -> torch.Tensor:
        try:
            return self._handle(name).get_tensor(name)
        except Exception as e:
            raise DlmcError(f"{self.files[name]}: cannot read tensor '{name}' ({e})") from None

    def _handle(self, name: str):
        path = self.files[name]
        if path not in self._handles:
            self._handles[path] = _open(path)
        return self._handles[path]


STACKED = "{expert}"
"""In a published name: the parameter is the stack of the tensors with the expert index put here."""
TRANSPOSED = "|T"
"""At the end of a stacked published name: each tensor is stored transposed ([in, out], the layout a
grouped matmul reads)."""


def load_weights(
    model: nn.Module,
    files: dict[str, Path],
    published_name: Callable[[str], str],
    device: torch.device,
    dtype: torch.dtype | None,
    quantized: BnbFormat | None = None,
) -> None:
    """Fill a meta-device model shard by shard, one tensor at a time, so that at most one copy of
    the weights is ever held (the safetensors files are memory-mapped). With `quantized`, weights
    that bitsandbytes stored are decoded to float, one at a time, and their companion tensors
    (scales, codebooks, quant_state) are read beside them. A parameter whose published name holds
    "{expert}" (the experts of an MoE layer) is the tensors named with 0, 1, ... there, stacked along
    its first dim (each transposed when the name ends with TRANSPOSED)."""
    # published name -> [(parameter, index in its stack)]: one tensor may fill several parameters
    # (DiffusionGemma's encoder and decoder layer scalars when a checkpoint stores one set)
    wanted: dict[str, list[tuple[str, int | None]]] = {}
    transposed: set[str] = set()  # parameters stacked from transposed tensors
    for name, param in model.named_parameters():
        published = published_name(name)
        if published.endswith(TRANSPOSED):
            published = published.removesuffix(TRANSPOSED)
            transposed.add(name)
        if STACKED in published:
            for e in range(param.shape[0]):
                wanted.setdefault(published.format(expert=e), []).append((name, e))
        else:
            wanted.setdefault(published, []).append((name, None))
    missing = sorted(set(wanted) - set(files))
    if missing:
        raise DlmcError(f"checkpoint is missing tensor '{missing[0]}' ({len(missing)} missing in all)")
    stored_beside = bnb.companions(files) if quantized else set()
    unexpected = sorted(
        n for n in files if n not in wanted and n not in stored_beside and not IGNORED_TENSORS.match(n)
    )
    if unexpected:
        raise DlmcError(f"{files[unexpected[0]]}: unexpected tensor '{unexpected[0]}' for this model family")
    shards = Shards(files)
    stacks: dict[str, list[torch.Tensor | None]] = {}
    for published in sorted(wanted, key=lambda name: str(files[name])):  # shard by shard
        for name, index in wanted[published]:
            target = model.get_parameter(name)
            shape = tuple(target.shape) if index is None else tuple(target.shape[1:])
            if name in transposed:
                shape = shape[::-1]
            if quantized:
                tensor = bnb.read_weight(shards, published, quantized, shape)
            else:
                tensor = shards.get(published)
            if tuple(tensor.shape) != shape:
                raise DlmcError(
                    f"{files[published]}: tensor '{published}' has shape {list(tensor.shape)}, expected {list(shape)}"
                )
            tensor = tensor.to(device=device, dtype=dtype or tensor.dtype)
            if index is None:
                _set_parameter(model, name, tensor)
                continue
            parts = stacks.setdefault(name, [None] * target.shape[0])
            parts[index] = tensor.t() if name in transposed else tensor  # stack copies it into [in, out]
            if all(part is not None for part in parts):  # the last expert read: stack, free the parts
                _set_parameter(model, name, torch.stack(parts))
                del stacks[name]


def _set_parameter(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    module._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)


def rename(rules: list[tuple[str, str]]) -> Callable[[str], str]:
    """A canonical -> published name function from ordered (regex, replacement) rules."""
    compiled = [(re.compile(pattern), repl) for pattern, repl in rules]

    def published(name: str) -> str:
        for pattern, repl in compiled:
            if pattern.fullmatch(name):
                return pattern.sub(repl, name)
        raise KeyError(name)

    return published
