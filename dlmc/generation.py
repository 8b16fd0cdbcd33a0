"""Text in, text out around the reference decoders: what `dlmc run` and `dlmc eval` share."""

from __future__ import annotations

import dataclasses
import filecmp
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from dlmc.decoding import DECODERS, config_fields, decode, default_decoder
from dlmc.decoding.common import CanvasCallback, StepCallback, stop_token_ids
from dlmc.errors import DlmcError
from dlmc.spec import DenoiserSpec
from dlmc.tokenizer import TextTokenizer


def default_model_dir() -> Path:
    """The small LLaDA-format model shipped inside the package."""
    return Path(__file__).parent / "data" / "default_model"


def is_embedded_model(model_dir: str | Path | None) -> bool:
    """Whether `model_dir` holds the embedded model (its weights byte for byte): the one model that the
    toy tasks of dlmc.tasks describe. Other checkpoints differ in size, so they cost one stat."""
    if model_dir is None:
        return False
    ours, theirs = default_model_dir() / "model.safetensors", Path(model_dir) / "model.safetensors"
    if not theirs.is_file() or theirs.stat().st_size != ours.stat().st_size:
        return False
    return theirs.resolve() == ours.resolve() or filecmp.cmp(ours, theirs, shallow=False)


def decoder_config(spec: DenoiserSpec, name: str | None, options: dict, defaults: dict | None = None):
    """The named decoder (else the artifact's default `defaults["decoder"]`, else the family's) and its
    config: the artifact's default fields overridden by `options`. An option the decoder does not have
    is an error naming it."""
    defaults = defaults or {}
    name = name or defaults.get("decoder") or default_decoder(spec)
    if name == defaults.get("decoder"):
        options = config_fields(defaults.get("config") or {}) | options
    if name not in DECODERS:
        raise DlmcError(f"unknown decoder '{name}' (choose from {', '.join(DECODERS)})")
    config_type, _ = DECODERS[name]
    fields = {f.name for f in dataclasses.fields(config_type)}
    if "gen_length" in options and "max_new_tokens" in fields:  # Dream and WeDLM spell it their way
        options = dict(options, max_new_tokens=options.pop("gen_length"))
    unknown = sorted(set(options) - fields)
    if "strategy" in unknown:
        raise DlmcError(f"--strategy: decoding strategies run with the llada decoder, not {name}")
    if unknown:
        flags = ", ".join("--" + key.replace("_", "-") for key in unknown)
        raise DlmcError(f"{flags} does not apply to the {name} decoder")
    return name, config_type(**options)


def generation_length(config) -> int:
    return getattr(config, "gen_length", None) or getattr(config, "max_new_tokens")


@dataclass(frozen=True)
class Completion:
    """One prompt's result of a batch decoded together: the counts and time of the batch are shared."""

    prompt_ids: list[int]
    output_ids: list[int]
    text: str | None
    nfe: int
    """This prompt's own denoiser evaluations (fewer than the batch's when it stopped at EOS)."""
    batch_nfe: int
    batch_seconds: float
    """Wall time of the whole batch: prompts decoded together have no time of their own."""
    batch_size: int


def generate(
    model,
    spec: DenoiserSpec,
    tokenizer: TextTokenizer | None,
    prompts: list[list[int]],
    decoder: str,
    config,
    *,
    seed: int = 0,
    on_step: StepCallback | None = None,
    on_canvas: CanvasCallback | None = None,
) -> list[Completion]:
    """Decode all prompts as one batch. `text` is cut at the first end-of-sequence or end-of-turn.
    `on_canvas` needs a decoder in CANVAS_DECODERS."""
    start = time.perf_counter()
    canvas = {} if on_canvas is None else {"on_canvas": on_canvas}
    with torch.inference_mode():
        result = decode(model, spec, prompts, decoder, config, seed=seed, on_step=on_step, **canvas)
    seconds = time.perf_counter() - start
    stops = set(stop_token_ids(spec, None))
    completions = []
    for prompt, output, row_nfe in zip(prompts, result.output_ids, result.row_nfe, strict=True):
        end = next((i for i, t in enumerate(output) if t in stops), len(output))
        text = tokenizer.decode(output[:end]) if tokenizer else None
        completions.append(Completion(list(prompt), list(output), text, row_nfe, result.nfe, seconds, len(prompts)))
    return completions


def encode_prompts(
    tokenizer: TextTokenizer | None, texts: list[str], id_lists: list[str], chat: bool = False
) -> list[list[int]]:
    """Prompts from --prompt texts and --prompt-ids lists ("1,2,3"), in that order. With `chat` each
    text is one user message rendered by the model's chat template (--prompt-ids are used as given)."""
    prompts = []
    if chat and (tokenizer is None or tokenizer.chat_template is None):
        raise DlmcError("--chat: this model has no chat template (no chat_template.jinja, no chat_template in "
                        "tokenizer_config.json)")
    if texts:
        if tokenizer is None:
            raise DlmcError("this model has no tokenizer files; pass --prompt-ids instead of --prompt")
        if chat:
            prompts += [tokenizer.encode_chat([{"role": "user", "content": text}]) for text in texts]
        else:
            prompts += [tokenizer.encode(text) for text in texts]
    for ids in id_lists:
        try:
            prompts.append([int(t) for t in ids.split(",") if t.strip()])
        except ValueError:
            raise DlmcError(f"--prompt-ids '{ids}' is not a comma-separated list of integers") from None
    if not prompts:
        raise DlmcError("give at least one --prompt or --prompt-ids")
    return prompts
