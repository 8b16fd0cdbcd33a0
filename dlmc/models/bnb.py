"""Checkpoints whose linears were saved by bitsandbytes (through transformers' BitsAndBytesConfig),
decoded into plain float weights with torch alone: bitsandbytes is never imported at run time, and
its modules would not survive torch.export anyway.

What transformers + bitsandbytes 0.50 write (checked against real state_dicts):

config.json  "quantization_config": {"quant_method": "bitsandbytes", "load_in_8bit" | "load_in_4bit": true,
             "bnb_4bit_quant_type": "nf4" | "fp4", "bnb_4bit_use_double_quant", "bnb_4bit_compute_dtype",
             "llm_int8_skip_modules", ...} (plus "_load_in_8bit"/"_load_in_4bit" copies).

int8 (LLM.int8, Linear8bitLt)
  X.weight         int8 [out, in]   codes, round(w * 127 / SCB): each row's largest |code| is 127
  X.SCB            float32 [out]    each row's absmax;  w = weight * SCB / 127
  X.weight_format  uint8 []         0 = row-major, the only layout bitsandbytes still writes

4-bit (Linear4bit, quant_type nf4 or fp4)
  X.weight                       uint8 [ceil(n / 2), 1], n = out * in: the row-major flattened weight,
                                 two codes per byte, element 2i in the HIGH nibble, 2i+1 in the low one
  X.weight.absmax                float32 [ceil(n / blocksize)], one per block of `blocksize` elements
                                 (the last block may be short); with double quant: uint8 codes instead
  X.weight.quant_map             float32 [16]: the codebook; w = quant_map[code] * absmax[block]
  X.weight.quant_state.bitsandbytes__nf4 (or __fp4)
                                 uint8 [k]: UTF-8 JSON {"quant_type", "blocksize", "dtype", "shape",
                                 and with double quant "nested_blocksize", "nested_dtype", "nested_offset"}
  double quant only:
  X.weight.nested_absmax         float32 [ceil(len(absmax) / nested_blocksize)]
  X.weight.nested_quant_map      float32 [256]: the 8-bit dynamic codebook;
                                 absmax = nested_quant_map[absmax] * nested_absmax[block] + nested_offset

Everything else (embeddings, norms, biases, the layers in llm_int8_skip_modules) is an ordinary float
tensor, so a weight is decoded when its stored tensors say it is quantized, never by its name.

int8 is lossless through dlmc's own W8A16: a bnb row decodes to code * s with s = SCB / 127 and
max |code| = 127, so the `quantize` pass (`scheme: {weights: int8}`, RTN, per channel, symmetric)
finds the same scale s and rounds back to the same codes (tests/models/test_bnb.py shows it), when the
model is decoded to float32 or float16. Not in bfloat16: its 8 significant bits round the row's largest
weight 127 * s by up to 2^-9, RTN's recomputed scale is off by as much, and about 0.1% of the codes
(those near a rounding boundary) move by one. Nor for a row whose largest |code| is not 127, which
bitsandbytes never writes: RTN rescales it.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from dlmc.errors import DlmcError

if TYPE_CHECKING:
    from dlmc.models.checkpoint import Shards

QUANT_TYPES = ("nf4", "fp4")
COMPUTE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
QUANT_STATE = ".quant_state.bitsandbytes__"
INT8_ROW_MAX = 127

# Tensors stored beside a quantized `X.weight`, by the name of the layer X.
INT8_COMPANION = re.compile(r"(?P<layer>.+)\.(SCB|weight_format)")
FOUR_BIT_COMPANION = re.compile(
    r"(?P<layer>.+)\.weight\.(absmax|quant_map|nested_absmax|nested_quant_map|quant_state\.bitsandbytes__\w+)"
)


@dataclass(frozen=True)
class BnbFormat:
    """How config.json says the linears were stored."""

    quant_type: Literal["int8", "nf4", "fp4"]
    double_quant: bool = False
    compute_dtype: torch.dtype | None = None
    """bnb_4bit_compute_dtype (4-bit only): the dtype the model gets unless the caller asks for one."""

    def label(self) -> str:
        return f"bitsandbytes {self.quant_type}" + (" (double quant)" if self.double_quant else "")


def read_format(config: dict, where: Path) -> BnbFormat | None:
    """The checkpoint's bitsandbytes format, None for a float checkpoint; other quantization methods
    are refused here, before they could surface as a confusing shape error."""
    qc = config.get("quantization_config")
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise DlmcError(f"{where}: field 'quantization_config' is not an object")
    eight, four = _flag(qc, "load_in_8bit"), _flag(qc, "load_in_4bit")
    method = qc.get("quant_method", "bitsandbytes" if eight or four else None)  # configs before quant_method
    if method != "bitsandbytes":
        raise DlmcError(
            f"{where}: quantization_config.quant_method '{method}': dlmc cannot load that format "
            "(it reads float checkpoints and bitsandbytes int8/nf4/fp4)"
        )
    if eight == four:
        raise DlmcError(f"{where}: quantization_config: exactly one of load_in_8bit, load_in_4bit must be true")
    if eight:
        return BnbFormat("int8")
    quant_type = qc.get("bnb_4bit_quant_type", "fp4")  # transformers' default
    if not isinstance(quant_type, str) or quant_type not in QUANT_TYPES:
        raise DlmcError(f"{where}: quantization_config.bnb_4bit_quant_type '{quant_type}' is not nf4 or fp4")
    compute = qc.get("bnb_4bit_compute_dtype")
    if compute is not None and (not isinstance(compute, str) or compute not in COMPUTE_DTYPES):
        raise DlmcError(
            f"{where}: quantization_config.bnb_4bit_compute_dtype '{compute}' is not one of {', '.join(COMPUTE_DTYPES)}"
        )
    return BnbFormat(quant_type, bool(qc.get("bnb_4bit_use_double_quant")), COMPUTE_DTYPES.get(compute))


def _flag(qc: dict, key: str) -> bool:
    return bool(qc.get(key, qc.get("_" + key, False)))


def companions(names: set[str] | dict) -> set[str]:
    """The stored tensors that belong to a quantized weight stored beside them (not model parameters)."""
    found = set()
    for name in names:
        match = FOUR_BIT_COMPANION.fullmatch(name) or INT8_COMPANION.fullmatch(name)
        if match is not None and match["layer"] + ".weight" in names:
            found.add(name)
    return found


def read_weight(shards: Shards, name: str, fmt: BnbFormat, shape: tuple[int, ...]) -> torch.Tensor:
    """The stored tensor `name` as float: decoded when bitsandbytes quantized it, as stored otherwise.
    `shape` is what the model expects; a 4-bit weight's declared shape is checked against it."""
    four_bit = any(FOUR_BIT_COMPANION.fullmatch(c) for c in shards.names_under(name + "."))
    if four_bit or shards.dtype(name) == "U8":
        return _read_4bit(shards, name, fmt, shape)
    if shards.dtype(name) == "I8" or name.removesuffix("weight") + "SCB" in shards:
        return _read_int8(shards, name)
    return shards.get(name)


def _read_int8(shards: Shards, name: str) -> torch.Tensor:
    base = name.removesuffix("weight")
    codes = shards.get(name)  # [out, in] int8
    scb = shards.get(_companion(shards, name, base + "SCB"))  # [out]
    layout = base + "weight_format"
    if layout in shards and (code := int(shards.get(layout))) != 0:  # 1-3: GPU tile layouts of old bnb
        raise DlmcError(f"{shards.path(layout)}: tensor '{layout}' is {code}; dlmc reads 0 (row-major)")
    if codes.dtype != torch.int8 or codes.ndim != 2 or tuple(scb.shape) != codes.shape[:1]:
        raise DlmcError(
            f"{shards.path(name)}: int8 weight '{name}' {codes.dtype} {list(codes.shape)} does not match "
            f"its row scales '{base}SCB' {list(scb.shape)}"
        )
    return decode_int8(codes, scb)


def decode_int8(codes: torch.Tensor, scb: torch.Tensor) -> torch.Tensor:
    """LLM.int8 row-wise codes [out, in] and row absmax [out] -> float32 [out, in]."""
    return codes.float() * (scb.float() / INT8_ROW_MAX).unsqueeze(1)


def _read_4bit(shards: Shards, name: str, fmt: BnbFormat, shape: tuple[int, ...]) -> torch.Tensor:
    state_name = _quant_state_name(shards, name, fmt)
    state = quant_state(shards.get(state_name), shards.path(state_name), state_name)
    declared = tuple(state["shape"])
    if declared != tuple(shape):
        raise DlmcError(
            f"{shards.path(state_name)}: tensor '{state_name}' declares shape {list(declared)}, expected {list(shape)}"
        )
    packed = shards.get(name)
    absmax = shards.get(_companion(shards, name, name + ".absmax"))
    codebook = shards.get(_companion(shards, name, name + ".quant_map"))
    n, blocksize = math.prod(declared), state["blocksize"]
    if "nested_blocksize" in state:
        nested_absmax = shards.get(_companion(shards, name, name + ".nested_absmax"))
        nested_codebook = shards.get(_companion(shards, name, name + ".nested_quant_map"))
        _check_nested_sizes(shards, name, absmax, nested_absmax, nested_codebook, state["nested_blocksize"])
        absmax = decode_nested_absmax(absmax, nested_codebook, nested_absmax, state["nested_blocksize"],
                                      state["nested_offset"])
    _check_4bit_sizes(shards, name, packed, absmax, codebook, n, blocksize)
    return decode_4bit(packed, codebook, absmax, blocksize, n).reshape(declared)


def _quant_state_name(shards: Shards, name: str, fmt: BnbFormat) -> str:
    found = shards.names_under(name + QUANT_STATE)
    if not found:
        expected = name + QUANT_STATE + (fmt.quant_type if fmt.quant_type in QUANT_TYPES else "nf4")
        raise DlmcError(f"{shards.path(name)}: quantized weight '{name}' has no companion tensor '{expected}'")
    if len(found) > 1:
        raise DlmcError(f"{shards.path(found[1])}: weight '{name}' has more than one quant_state ({', '.join(found)})")
    return found[0]


def _companion(shards: Shards, name: str, companion: str) -> str:
    if companion not in shards:
        raise DlmcError(f"{shards.path(name)}: quantized weight '{name}' has no companion tensor '{companion}'")
    return companion


def quant_state(packed_json: torch.Tensor, path: Path, name: str) -> dict:
    """The JSON bitsandbytes packs into a uint8 tensor (plain bytes: nothing is ever unpickled)."""
    try:
        state = json.loads(bytes(packed_json.to(torch.uint8).reshape(-1).tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DlmcError(f"{path}: tensor '{name}' is not a bitsandbytes quant_state ({e})") from None
    if not isinstance(state, dict):
        raise DlmcError(f"{path}: tensor '{name}' is not a bitsandbytes quant_state (not a JSON object)")
    if state.get("quant_type") not in QUANT_TYPES:
        raise DlmcError(f"{path}: tensor '{name}' has quant_type '{state.get('quant_type')}'; dlmc reads nf4 and fp4")
    required = ("blocksize", "shape") + (("nested_offset",) if "nested_blocksize" in state else ())
    for key in required:
        if key not in state:
            raise DlmcError(f"{path}: tensor '{name}' has no field '{key}'")
    for key in ("blocksize", "nested_blocksize"):
        if key in state and not (isinstance(state[key], int) and state[key] > 0):
            raise DlmcError(f"{path}: tensor '{name}' field '{key}' is {state[key]!r}, not a positive integer")
    if not isinstance(state["shape"], list) or not all(isinstance(d, int) and d > 0 for d in state["shape"]):
        raise DlmcError(f"{path}: tensor '{name}' field 'shape' is {state['shape']!r}")
    return state


def _check_4bit_sizes(shards, name, packed, absmax, codebook, n, blocksize) -> None:
    if packed.numel() * packed.element_size() != (n + 1) // 2:  # bytes, whatever quant_storage dtype held them
        raise DlmcError(
            f"{shards.path(name)}: tensor '{name}' holds {packed.numel() * packed.element_size()} bytes; "
            f"its quant_state shape needs {(n + 1) // 2}"
        )
    if absmax.numel() != -(-n // blocksize):
        raise DlmcError(
            f"{shards.path(name)}: tensor '{name}.absmax' has {absmax.numel()} values; "
            f"{n} elements in blocks of {blocksize} need {-(-n // blocksize)}"
        )
    if codebook.numel() != 16:
        raise DlmcError(f"{shards.path(name)}: tensor '{name}.quant_map' has {codebook.numel()} values, expected 16")


def _check_nested_sizes(shards, name, codes, nested_absmax, nested_codebook, blocksize) -> None:
    if codes.dtype != torch.uint8 or nested_absmax.numel() != -(-codes.numel() // blocksize):
        raise DlmcError(
            f"{shards.path(name)}: tensor '{name}.nested_absmax' has {nested_absmax.numel()} values for "
            f"{codes.numel()} {codes.dtype} absmax codes in blocks of {blocksize}"
        )
    if nested_codebook.numel() != 256:
        raise DlmcError(
            f"{shards.path(name)}: tensor '{name}.nested_quant_map' has {nested_codebook.numel()} values, expected 256"
        )


def decode_nested_absmax(
    codes: torch.Tensor, codebook: torch.Tensor, nested_absmax: torch.Tensor, blocksize: int, offset: float
) -> torch.Tensor:
    """Double quant: the 4-bit blocks' absmax, itself 8-bit blockwise quantized around its mean."""
    # codes: [blocks] uint8, codebook: [256], nested_absmax: [ceil(blocks / blocksize)]
    values = codebook.float()[codes.reshape(-1).int()]  # [blocks]
    return scale_blocks(values, nested_absmax.float(), blocksize) + offset


def decode_4bit(
    packed: torch.Tensor, codebook: torch.Tensor, absmax: torch.Tensor, blocksize: int, n: int
) -> torch.Tensor:
    """bitsandbytes 4-bit (nf4 or fp4: only the codebook differs) -> float32 [n], row-major."""
    codes = unpack_high_first(packed, n)  # [n] uint8 in [0, 15]
    values = codebook.float()[codes.int()]  # [n]
    return scale_blocks(values, absmax.float().reshape(-1), blocksize)


def unpack_high_first(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Bytes holding two 4-bit codes each, element 2i in the high nibble -> [n] uint8 codes (the last
    byte of an odd n carries one padding code)."""
    b = packed.contiguous().view(torch.uint8).reshape(-1)  # [ceil(n / 2)]; any quant_storage dtype is bytes
    return torch.stack((b >> 4, b & 0x0F), dim=-1).reshape(-1)[:n]


def scale_blocks(values: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    """values [n] times the absmax of their block of `blocksize` (the last block may be short), in place."""
    n = values.numel()
    full = n - n % blocksize
    values[:full].view(-1, blocksize).mul_(absmax[: full // blocksize, None])
    if full < n:
        values[full:].mul_(absmax[-1])
    return values

