"""Engine: a compiled denoising step loaded from an artifact, driven by the reference decoders.

The decode strategies are the reference decoders of `dlmc.decoding`, run unchanged: the engine is
just another `model(input_ids, attention_mask, position_ids) -> logits` callable. That is what makes
"compiled output == reference output" a meaningful test.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dlmc.artifact import TOKENIZER_DIR, StepSignature, read_manifest
from dlmc.decoding import DECODERS, Generation, config_fields, default_decoder
from dlmc.device import check_device
from dlmc.errors import DlmcError
from dlmc.tokenizer import load_tokenizer
from dlmc.runtime import block_loop, dream_loop, gemma_loop, llada2_loop, loop, wedlm_loop
from dlmc.runtime.backends import Step, load_kernels, load_step
from dlmc.runtime.cache import CacheManager, empty_cache
from dlmc.runtime.policies import policy_from_dict
from dlmc.runtime.weights import WeightFiles
from dlmc.spec import DenoiserSpec
from dlmc.tokenizer import TextTokenizer

KNOWN_INPUTS = ("input_ids", "attention_mask", "position_ids")
CACHE_INPUTS = ("cache_mask", "cache_positions", "cache_keys", "cache_values")
FUSED_INPUTS = (
    ("head_rows",), ("head_rows", "uniform", "temperature"),  # llada
    ("head_rows", "exponential", "temperature"), ("head_rows", "top_p", "top_k"),  # dream
    ("head_rows", "exponential", "temperature", "top_p", "top_k"),
    ("head_rows", "noise", "temperature", "top_k", "top_p"),  # block
    ("head_rows", "slots", "pos_penalty", "entropy_threshold"),  # wedlm
    ("head_rows", "slots", "pos_penalty", "entropy_threshold", "noise", "temperature", "top_k", "top_p"),
)
"""Step inputs this runtime knows how to feed: the plain step, optionally with a K/V cache, optionally
fused with the decoding rule; an artifact asking for others needs a newer runtime."""
FUSED_LOOPS = {"llada": loop, "dream": dream_loop, "block": block_loop, "wedlm": wedlm_loop, "llada2": llada2_loop,
               "diffusion_gemma": gemma_loop}
"""Closed registry: the decoder whose rule a fused step carries -> its loop (check_supported, generate)."""


class Engine:
    def __init__(self, root: Path, manifest: dict[str, Any], step: Step, device: torch.device,
                 encoder: Step | None = None):
        self.root = root
        self._encoder = encoder
        """The encoder program of a multi-program artifact (DiffusionGemma); `step` is then its decoder."""
        self.manifest = manifest
        self.spec = DenoiserSpec.from_dict(manifest["spec"])
        self.signature = StepSignature.from_dict(manifest["signature"])
        self.device = device
        tokenizer_dir = root / TOKENIZER_DIR
        self.tokenizer: TextTokenizer | None = load_tokenizer(tokenizer_dir) if tokenizer_dir.is_dir() else None
        self._step = step

    def step(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Raw logits [B, L, V] for input_ids [B, L], on the device input_ids came from. A missing mask
        means no padding; missing positions mean 0..L-1. Batches above the artifact's largest run in
        chunks; shorter sequences are padded to the step's smallest length or next bucket."""
        if self.signature.fused:
            raise DlmcError("step: this artifact's step returns decoded tokens (fuse_decode), not logits")
        if input_ids.dim() != 2:
            raise DlmcError(f"step: input_ids must be [batch, length], got shape {list(input_ids.shape)}")
        batch, length = input_ids.shape
        lo, hi = self.signature.seq
        if length > hi:
            raise DlmcError(f"step: sequence length {length} exceeds this artifact's maximum {hi}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)  # [B, L] bool
        if position_ids is None:
            position_ids = torch.arange(length, device=input_ids.device).expand(batch, length)  # [B, L] int64
        target = padded_length(length, lo, self.signature.seq_buckets)
        chunks = []
        for start in range(0, batch, self.signature.batch[1]):
            rows = slice(start, start + self.signature.batch[1])
            ids, mask, pos = pad_right(input_ids[rows], attention_mask[rows], position_ids[rows], target)
            inputs = (ids.to(self.device, torch.int64), mask.to(self.device, torch.bool), pos.to(self.device, torch.int64))
            if self.signature.cache is not None:  # a plain call: nothing cached
                inputs += empty_cache(self.signature, len(ids), self.device)
            logits = self.run_step(*inputs)[0]  # [b, target, V]
            chunks.append(logits[:, :length])
        logits = chunks[0] if len(chunks) == 1 else torch.cat(chunks)  # [B, L, V]
        return logits.to(input_ids.device)

    __call__ = step

    def run_step(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The compiled step as is: inputs in signature order (on self.device), outputs as a tuple."""
        # AOTInductor reads inputs with the strides it was compiled for: never hand it a strided view.
        outputs = self._step(*(t.contiguous() for t in inputs))
        return tuple(outputs) if isinstance(outputs, (tuple, list)) else (outputs,)

    def encoder_step(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The encoder program of a multi-program artifact, called like run_step."""
        outputs = self._encoder(*(t.contiguous() for t in inputs))
        return tuple(outputs) if isinstance(outputs, (tuple, list)) else (outputs,)

    def generate(
        self,
        prompts: list[list[int]],
        decoder: str | None = None,
        config: Any = None,
        seed: int = 0,
        on_step: Callable[[int, int], None] | None = None,
        on_canvas: Callable | None = None,
    ) -> Generation:
        """Decode `prompts` (token ids): the fused loop of a `fuse_decode` artifact, or a reference
        decoder running on the compiled step.

        The decoder defaults to the artifact's decode defaults, else the model's own sampler; `config`
        defaults to the decode defaults' config for that decoder, else the decoder's defaults."""
        defaults = self.manifest.get("decode") or {}
        name = decoder or defaults.get("decoder") or default_decoder(self.spec)
        if name not in DECODERS:
            raise DlmcError(f"decoder: unknown decoder '{name}' (known: {', '.join(sorted(DECODERS))})")
        config_type, _ = DECODERS[name]
        if config is None:
            fields = (defaults.get("config") or {}) if name == defaults.get("decoder") else {}
            config = config_type(**config_fields(fields))
        elif not isinstance(config, config_type):
            raise DlmcError(f"decoder: '{name}' takes a {config_type.__name__}, got {type(config).__name__}")
        return self.decode(prompts, name, config, seed=seed, on_step=on_step, on_canvas=on_canvas)

    def decode(
        self,
        prompts: list[list[int]],
        decoder: str,
        config: Any,
        seed: int = 0,
        on_step: Callable | None = None,
        on_canvas: Callable | None = None,
    ) -> Generation:
        """One decoder run: the fused loop for a step with the decoding rule compiled in, else the
        reference decoder driving the step (through a fresh K/V cache manager for a cached step).
        `on_canvas` is passed on only when given: not every decoder takes it (CANVAS_DECODERS)."""
        canvas = {} if on_canvas is None else {"on_canvas": on_canvas}
        if self.signature.fused:
            fused = FUSED_LOOPS[self.signature.fused_decoder]
            fused.check_supported(self.signature, decoder, config)
            return fused.generate(self, prompts, config, seed=seed, on_step=on_step, **canvas)
        _, generate = DECODERS[decoder]
        model = self.model_for(decoder, config)
        return generate(model, self.spec, prompts, config, seed=seed, on_step=on_step, **canvas)

    def model_for(self, decoder: str, config: Any) -> Engine | CacheManager:
        """The engine itself, or for a cached step a fresh cache manager, after its policy checked that
        the decoder can run under it."""
        if self.signature.cache is None:
            return self
        policy = policy_from_dict(self.signature.cache)
        policy.check_decoder(decoder, config)
        return CacheManager(self, policy)


def load(path: str | Path, device: str | torch.device | None = None) -> Engine:
    """Load a compiled artifact: check its format version and every file's hash, then load the step
    with the one backend it was compiled for. `device` defaults to the one it was compiled for."""
    root = Path(path)
    if device is not None:
        check_device(device)
    manifest = read_manifest(root, verify=True)
    entry = manifest["backend"]
    if "programs" in manifest:  # DiffusionGemma: the fused decoder (the main step) and its encoder program
        device = torch.device(device if device is not None else entry.get("device", "cpu"))
        weights = WeightFiles()  # both programs name one weights file: one copy of its tensors for both
        encoder = load_step(root, manifest["programs"]["encoder"]["backend"], str(device), weights)
        return Engine(root, manifest, load_step(root, entry, str(device), weights), device, encoder)
    signature = StepSignature.from_dict(manifest["signature"])
    names = [t.name for t in signature.inputs]
    unknown = [name for name in names if name not in KNOWN_INPUTS + CACHE_INPUTS]
    plain = [list(KNOWN_INPUTS), list(KNOWN_INPUTS + CACHE_INPUTS)]
    unknown = [name for name in unknown if not any(name in fused for fused in FUSED_INPUTS)]
    if names not in plain + [p + list(fused) for p in plain for fused in FUSED_INPUTS]:
        raise DlmcError(f"{root}: the compiled step takes inputs this runtime cannot feed ({', '.join(unknown)})")
    device = torch.device(device if device is not None else entry.get("device", "cpu"))
    load_kernels(signature.kernels)  # before the step: AOTInductor calls them through the dispatcher
    step = load_step(root, entry, str(device))
    return Engine(root, manifest, step, device)


def padded_length(length: int, shortest: int, buckets: tuple[int, ...]) -> int:
    """The length the step is called with: the next bucket, or at least the shortest it accepts."""
    for bucket in buckets:
        if bucket >= length:
            return bucket
    return max(length, shortest)


def pad_right(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, target: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Append masked-out positions up to `target`. Real tokens never attend to them (their key mask is
    False) and their logits are cut off again, so the real rows' logits are unchanged."""
    # input_ids, position_ids: [B, L] int64; attention_mask: [B, L] bool
    extra = target - input_ids.shape[1]
    if extra <= 0:
        return input_ids, attention_mask, position_ids
    batch = input_ids.shape[0]
    ids = torch.cat([input_ids, input_ids[:, -1:].expand(batch, extra)], dim=1)  # [B, target]
    mask = torch.cat([attention_mask, attention_mask.new_zeros(batch, extra)], dim=1)  # [B, target]
    steps = torch.arange(1, extra + 1, device=position_ids.device)  # [extra]
    pos = torch.cat([position_ids, position_ids[:, -1:] + steps], dim=1)  # [B, target]
    return ids, mask, pos
