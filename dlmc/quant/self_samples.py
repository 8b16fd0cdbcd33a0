"""Calibration sequences the model writes itself: what `source: self` calibrates on.

A checkpoint other than the embedded one has no task data of ours, and a user may have none at hand;
its own generations are text in its own distribution, with no data needed. Half the sequences are
unconditional (the prompt is one start token), half follow a short prompt of random vocabulary
tokens; each is decoded by the family's own default decoder at temperature 1, seeded, so the same
seed gives the same calibration set.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any

import torch

from dlmc.decoding import decode, default_decoder
from dlmc.errors import DlmcError
from dlmc.spec import DenoiserSpec

PROMPT_TOKENS = 4
"""Length of the random prompts of the prompted half."""


def self_samples(
    model: Any, spec: DenoiserSpec, count: int, length: int, seed: int
) -> list[tuple[list[int], list[int]]]:
    """`count` (prompt, generation) pairs of `length` tokens in all. `model` is a float model or a plain
    step taking (input_ids, attention_mask, position_ids).

    Sample i is decoded alone with seed `seed + i`: a decoder seeds every row of one call alike, which
    would make the unconditional rows of a batch one sequence; alone, the set depends on no batch size
    and fits a step captured for batch 1."""
    gen_length = length - PROMPT_TOKENS
    if gen_length < 1:
        raise DlmcError(f"calibration source self: {length} tokens leave no room to generate after a prompt")
    name = default_decoder(spec)
    config = _sampling_config(name, spec, gen_length)
    rng = random.Random(seed)
    special = {spec.mask_token_id, spec.eos_token_id, spec.pad_token_id, spec.eot_token_id}
    pool = [i for i in range(spec.vocab_size) if i not in special]
    start = spec.eos_token_id if spec.eos_token_id is not None else rng.choice(pool)  # a document boundary
    prompts = []
    for i in range(count):  # unconditional and prompted alternate; both padded to PROMPT_TOKENS with starts
        prompted = [rng.choice(pool) for _ in range(PROMPT_TOKENS - 1)] if i % 2 else []
        prompts.append([start] * (PROMPT_TOKENS - len(prompted)) + prompted)
    outputs = []
    plain = _Plain(model)
    with torch.inference_mode():
        for i, prompt in enumerate(prompts):
            outputs += decode(plain, spec, [prompt], name, config, seed=seed + i).output_ids
    return list(zip(prompts, outputs, strict=True))


def _sampling_config(name: str, spec: DenoiserSpec, gen_length: int):
    from dlmc.generation import decoder_config

    _, config = decoder_config(spec, name, {"gen_length": gen_length, "temperature": 1.0})
    if hasattr(config, "steps"):  # Dream's default is 512 steps, whatever the length
        config = dataclasses.replace(config, steps=gen_length)
    return config


class _Plain:
    """A step that needs every input: the attention mask and positions a decoder leaves out (no padding)."""

    def __init__(self, model: Any):
        self.model = model
        self.device = next((t.device for t in _tensors(model)), torch.device("cpu"))

    def __call__(self, input_ids, attention_mask, position_ids):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)  # [B, L] bool
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)  # [B, L]
        return self.model(input_ids, attention_mask, position_ids.contiguous())


def _tensors(model: Any):
    if isinstance(model, torch.nn.Module):
        yield from model.parameters()
    exported = getattr(model, "exported", None)  # a StepProgram
    if exported is not None:
        yield from exported.state_dict.values()
