"""The model a server decodes with, and every check a request gets before it is queued.

A request is checked completely when it arrives (prompt, decoder, config, length, what a compiled
artifact can run), so a batch in the worker never fails because of one bad row.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from dlmc.decoding import CANVAS_DECODERS, DECODERS, block, default_decoder, dream, llada, llada2, wedlm
from dlmc.decoding import diffusion_gemma
from dlmc.decoding.common import CanvasCallback, check_prompts
from dlmc.errors import DlmcError
from dlmc.generation import decoder_config, generate, generation_length
from dlmc.serve.openai_types import ApiError
from dlmc.spec import DenoiserSpec
from dlmc.tokenizer import TextTokenizer

VALIDATE = {
    "llada": llada.validate, "dream": dream.validate, "block": block.validate, "wedlm": wedlm.validate,
    "llada2": llada2.validate, "llada2_edit": llada2.validate, "diffusion_gemma": diffusion_gemma.validate,
}
"""Each decoder's checks that need the spec and the prompts (its config checks itself)."""


@dataclass(frozen=True)
class DecodeKey:
    """What the rows of one batch share: requests with equal keys may run as one batch."""

    decoder: str
    config: Any  # the decoder's frozen config dataclass, hashable
    seed: int


@dataclass(frozen=True)
class Output:
    """One prompt's answer, its text cut at the first end-of-sequence or end-of-turn."""

    text: str
    completion_tokens: int  # tokens before the cut
    finish_reason: str  # "stop" when an EOS / EOT cut the text, else "length"
    nfe: int


class ServedModel:
    """A compiled artifact's engine or an eager checkpoint model, with its tokenizer and limits.
    Only the worker thread calls `run`; the checks read nothing the decode changes."""

    def __init__(self, model, spec: DenoiserSpec, tokenizer: TextTokenizer | None, defaults: dict, name: str,
                 max_batch: int = 8):
        if tokenizer is None:
            raise DlmcError(f"{name}: serving needs the model's tokenizer files")
        self.model, self.spec, self.tokenizer, self.defaults, self.name = model, spec, tokenizer, defaults, name
        signature = getattr(model, "signature", None)  # a compiled artifact: its step's shapes bound the request
        self.max_length = min(spec.max_length, signature.seq[1]) if signature else spec.max_length
        self.max_batch = min(max_batch, signature.batch[1]) if signature else max_batch
        self.stops = {i for i in (spec.eos_token_id, spec.eot_token_id) if i is not None}

    def encode(self, text: str, param: str) -> list[int]:
        """Token ids of a prompt text, checked by `check_spelled`."""
        ids = self.tokenizer.encode(text)
        self.check_spelled(text, ids, param)
        return ids

    def check_spelled(self, text: str, ids: list[int], param: str) -> None:
        """An empty prompt, or a character the vocabulary cannot spell (it encoded to the unknown
        token), is an error naming the field and the character."""
        if not ids:
            raise ApiError(400, f"{param} is empty", param=param)
        unk = self.tokenizer.unk_token_id
        if unk is not None and unk in ids:  # the first character that alone encodes to it (not a spelled-out token)
            bad = next((c for c in dict.fromkeys(text) if unk in self.tokenizer.encode(c)), None)
            if bad is not None:
                raise ApiError(400, f"{param}: character {bad!r} (U+{ord(bad):04X}) is not in the model's vocabulary",
                               param=param, code="unknown_character")

    def decode_key(self, decoder: str | None, options: dict, seed: int, prompts: list[list[int]]) -> DecodeKey:
        """The decoder and its config for these options, after every check the decode would make."""
        try:
            options = self._stop_at_eos(decoder, options)
            name, config = decoder_config(self.spec, decoder, options, self.defaults)
        except DlmcError as e:
            raise _invalid(e, "decoder") from None
        except (TypeError, ValueError) as e:  # a field of the wrong type that pydantic could not see
            raise ApiError(400, f"decoder options: {e}") from None
        for i, prompt in enumerate(prompts):
            total = len(prompt) + generation_length(config)
            if total > self.max_length:
                raise ApiError(400, f"prompt ({len(prompt)} tokens) + max_tokens ({generation_length(config)}) = "
                               f"{total} exceeds this model's maximum length {self.max_length}", param="max_tokens",
                               code="context_length_exceeded")
        try:
            check_prompts(self.spec, prompts)
            VALIDATE[name](self.spec, prompts, config)
            if hasattr(self.model, "signature"):  # what this artifact's step was compiled for
                if self.model.signature.fused:
                    from dlmc.runtime.engine import FUSED_LOOPS

                    FUSED_LOOPS[self.model.signature.fused_decoder].check_supported(self.model.signature, name, config)
                else:
                    self.model.model_for(name, config)
        except DlmcError as e:
            raise _invalid(e, None) from None
        return DecodeKey(name, config, seed)

    def _stop_at_eos(self, decoder: str | None, options: dict) -> dict:
        """A server stops a row at its first settled EOS (a chat answer ends there) unless the request
        sets stop_at_eos itself; only for decoders that have the switch (block and wedlm always stop)."""
        name = decoder or self.defaults.get("decoder") or default_decoder(self.spec)
        config_type = DECODERS[name][0] if name in DECODERS else None  # unknown: decoder_config says so
        if config_type is None or "stop_at_eos" not in {f.name for f in dataclasses.fields(config_type)}:
            return options
        return {"stop_at_eos": True} | options

    def streams(self, key: DecodeKey) -> bool:
        """Whether this decoder shows its canvas every step; else a stream gets the text at the end."""
        return key.decoder in CANVAS_DECODERS

    def run(self, prompts: list[list[int]], key: DecodeKey, on_canvas: CanvasCallback | None = None) -> list[Output]:
        """Decode the prompts as one batch (called by the worker thread only)."""
        on_canvas = on_canvas if self.streams(key) else None
        completions = generate(self.model, self.spec, self.tokenizer, prompts, key.decoder, key.config,
                               seed=key.seed, on_canvas=on_canvas)
        return [self.output(c.output_ids, c.nfe) for c in completions]

    def output(self, output_ids: list[int], nfe: int) -> Output:
        """One prompt's answer from its generated ids: the text up to the first stop token."""
        end = next((i for i, t in enumerate(output_ids) if t in self.stops), len(output_ids))
        finish = "stop" if end < len(output_ids) else "length"
        return Output(self.tokenizer.decode(output_ids[:end]), end, finish, nfe)

    @property
    def steps_rows(self) -> bool:
        """Whether requests join and leave a running batch at each denoising step: a compiled artifact
        whose step carries LLaDA's decoding rule (`dlmc.runtime.loop.Decoding`). Any other model
        (an eager checkpoint, an unfused artifact, a fused Dream step) batches at generation boundaries."""
        signature = getattr(self.model, "signature", None)
        return signature is not None and signature.fused and signature.fused_decoder == "llada"

    def decoding(self):
        """A new stepping batch of the fused loop (only when `steps_rows`)."""
        from dlmc.runtime.loop import Decoding

        return Decoding(self.model)


def _invalid(e: DlmcError, param: str | None) -> ApiError:
    """A decoder's one-line error in the request's words: fields, not CLI flags (--block-length), and
    max_tokens for the generation length; the param is the field the line starts with."""
    message = re.sub(r"--([a-z-]+)", lambda m: m.group(1).replace("-", "_"), str(e))
    message = re.sub(r"\b(gen_length|max_new_tokens)\b", "max_tokens", message)
    match = re.match(r"([a-z_]+)(=| does not apply)", message)
    return ApiError(400, message, param=match.group(1) if match else param)
