"""Model families and the loader. Dispatch is on config.json's architectures[0], never on
model_type (LLaDA-MoE reuses "llada")."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import ModuleType

import torch

from dlmc.device import check_device
from dlmc.errors import DlmcError
from dlmc.files import read_json
from dlmc.models import bnb, diffusion_gemma, dream, fast_dllm_v2, llada, llada2, llada_moe, sdar, sdar_moe, wedlm
from dlmc.models.checkpoint import check_config_types, checkpoint_dtype, load_weights, weight_map
from dlmc.models.transformer import ArchConfig, DiffusionLM
from dlmc.spec import DenoiserSpec
from dlmc.tokenizer import load_tokenizer

FAMILIES: dict[str, ModuleType] = {
    arch: module
    for module in (llada, dream, fast_dllm_v2, sdar, wedlm, llada_moe, llada2, sdar_moe, diffusion_gemma)
    for arch in module.ARCHITECTURES
}


def family_of(config: dict, where: Path) -> ModuleType:
    archs = config.get("architectures")
    if not isinstance(archs, list) or not archs:
        raise DlmcError(f"{where}: missing field 'architectures'")
    if not isinstance(archs[0], str) or archs[0] not in FAMILIES:
        known = ", ".join(sorted(FAMILIES))
        raise DlmcError(f"{where}: unknown architecture '{archs[0]}' (supported: {known})")
    return FAMILIES[archs[0]]


def read_model_config(model_dir: str | Path) -> tuple[ModuleType, ArchConfig, DenoiserSpec]:
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise DlmcError(f"{model_dir}: not a model directory")
    where = model_dir / "config.json"
    config = read_json(where)
    family = family_of(config, where)
    check_config_types(config, where)
    bnb.read_format(config, where)  # a quantization dlmc cannot read fails here, not as a shape error
    tokenizer = load_tokenizer(model_dir)
    arch, spec = family.read_config(config, where, tokenizer.token_id if tokenizer else lambda token: None)
    spec = dataclasses.replace(spec, eos_token_id=_first(spec.eos_token_id), pad_token_id=_first(spec.pad_token_id))
    return family, arch, spec


def load_model(
    model_dir: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> DiffusionLM:
    """Build the family's model on the meta device and fill it from the checkpoint, tensor by tensor,
    in the checkpoint's dtype unless `dtype` is given. A bitsandbytes checkpoint's linears are decoded
    to float (see dlmc.models.bnb), in bnb_4bit_compute_dtype or the checkpoint's float dtype."""
    model_dir = Path(model_dir)
    device = check_device(device)
    family, arch, spec = read_model_config(model_dir)
    files = weight_map(model_dir)
    quantized = quantization(model_dir)
    if quantized is not None:
        dtype = dtype or default_dtype(model_dir)  # one dtype for decoded and stored-float tensors alike
    with torch.device("meta"):
        model = _build(family, arch, spec)
    if hasattr(family, "select_weights"):  # names that depend on the checkpoint (DiffusionGemma's two prefixes)
        files, published = family.select_weights(files, model)
    else:
        published = family.published_name
    load_weights(model, files, published, device, dtype, quantized)
    return model.eval()


def quantization(model_dir: str | Path) -> bnb.BnbFormat | None:
    """How the checkpoint's linears were quantized (bitsandbytes), None for a float checkpoint."""
    where = Path(model_dir) / "config.json"
    return bnb.read_format(read_json(where), where)


def default_dtype(model_dir: str | Path) -> torch.dtype:
    """The dtype load_model gives the model when none is asked for: the checkpoint's float dtype, or a
    4-bit checkpoint's bnb_4bit_compute_dtype."""
    quantized = quantization(model_dir)
    if quantized is not None and quantized.compute_dtype is not None:
        return quantized.compute_dtype
    return checkpoint_dtype(weight_map(model_dir))


def _build(family: ModuleType, arch, spec: DenoiserSpec):
    """The family's own model class where it has one (DiffusionGemma's encoder/decoder), else DiffusionLM."""
    return getattr(family, "build_model", DiffusionLM)(arch, spec)


def _first(value):
    return value[0] if isinstance(value, list) and value else value


def describe(model_dir: str | Path) -> dict:
    """What `dlmc inspect` prints, read without loading the weights."""
    model_dir = Path(model_dir)
    family, arch, spec = read_model_config(model_dir)
    with torch.device("meta"):
        params = _build(family, arch, spec).num_parameters()
    attention = spec.attention + (f" (block size {spec.block_size})" if spec.block_size else "")
    dtype = str(default_dtype(model_dir)).removeprefix("torch.")
    quantized = quantization(model_dir)
    weights = {"weights": f"{quantized.label()}, dequantized to {dtype} on load"} if quantized else {}
    return {
        "family": spec.family,
        "parameters": params,
        "dtype": dtype,
        **weights,
        "mask_token_id": spec.mask_token_id,
        "attention": attention,
        "logits": "shifted by one" if spec.shift_logits else "same position",
        "vocab_size": spec.vocab_size,
        "max_length": spec.max_length,
        **(family.notes(weight_map(model_dir)) if hasattr(family, "notes") else {}),
    }
