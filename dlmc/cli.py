"""The dlmc command line. Thin: it parses, calls the library and prints."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from dlmc.errors import DlmcError

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True)

Debug = Annotated[bool, typer.Option("--debug", help="Show tracebacks.")]


def _fail(e: Exception, debug: bool):
    if debug:
        raise e
    typer.echo(f"error: {e}", err=True)
    raise typer.Exit(2)


class _Progress:
    """A one-line progress bar on stderr, drawn only on a terminal."""

    def __init__(self, label: str, enabled: bool):
        self.label = label
        self.enabled = enabled and sys.stderr.isatty()

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        width = 30
        filled = width * done // max(total, 1)
        sys.stderr.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()


@app.command()
def inspect(model_dir: Path, debug: Debug = False) -> None:
    """Print a checkpoint's family, size, dtype and denoiser spec."""
    from dlmc.models import describe

    try:
        info = describe(model_dir)
    except DlmcError as e:
        _fail(e, debug)
    for key, value in info.items():
        typer.echo(f"{key:14} {value:,}" if key == "parameters" else f"{key:14} {value}")


Prompt = Annotated[list[str], typer.Option("--prompt", help="Prompt text (repeatable; several run as one batch).")]
PromptIds = Annotated[list[str], typer.Option("--prompt-ids", help="Prompt token ids, e.g. 1,2,3 (repeatable).")]
Opt = typer.Option


def _decoder_options(**given) -> dict:
    """The decoder options the user actually gave (None means 'not given')."""
    return {key: value for key, value in given.items() if value is not None}


def _load(model_dir: Path | None, device: str, dtype: str | None):
    """(model, spec, tokenizer) of a checkpoint directory, or of the embedded default model."""
    import torch

    from dlmc.generation import default_model_dir
    from dlmc.models import load_model
    from dlmc.tokenizer import load_tokenizer

    path = model_dir or default_model_dir()
    torch_dtype = None
    if dtype is not None:
        names = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
        if dtype not in names:
            raise DlmcError(f"--dtype {dtype} is not one of {', '.join(names)}")
        torch_dtype = names[dtype]
    model = load_model(path, device=device, dtype=torch_dtype)
    return model, model.spec, load_tokenizer(path)


@app.command()
def run(
    model_dir: Annotated[Optional[Path], typer.Argument(help="Checkpoint directory (default: the embedded model).")] = None,
    prompt: Prompt = [],
    prompt_ids: PromptIds = [],
    decoder: Annotated[Optional[str], Opt(help="llada | dream | block | wedlm (default: the family's).")] = None,
    gen_length: Annotated[Optional[int], Opt()] = None,
    steps: Annotated[Optional[int], Opt()] = None,
    block_length: Annotated[Optional[int], Opt()] = None,
    temperature: Annotated[Optional[float], Opt()] = None,
    cfg_scale: Annotated[Optional[float], Opt()] = None,
    remasking: Annotated[Optional[str], Opt()] = None,
    threshold: Annotated[Optional[float], Opt()] = None,
    factor: Annotated[Optional[float], Opt()] = None,
    alg: Annotated[Optional[str], Opt(help="Dream's algorithm.")] = None,
    top_p: Annotated[Optional[float], Opt()] = None,
    top_k: Annotated[Optional[int], Opt()] = None,
    seed: Annotated[int, Opt()] = 0,
    device: Annotated[str, Opt(help="cpu or cuda")] = "cpu",
    dtype: Annotated[Optional[str], Opt(help="float32 | bfloat16 | float16 (default: the checkpoint's)")] = None,
    as_json: Annotated[bool, Opt("--json", help="One JSON object per prompt.")] = False,
    debug: Debug = False,
) -> None:
    """Generate from a checkpoint directory (or the embedded default model)."""
    from dlmc.generation import decoder_config, encode_prompts, generate, generation_length

    try:
        model, spec, tokenizer = _load(model_dir, device, dtype)
        prompts = encode_prompts(tokenizer, prompt, prompt_ids)
        options = _decoder_options(
            gen_length=gen_length, steps=steps, block_length=block_length, temperature=temperature,
            cfg_scale=cfg_scale, remasking=remasking, threshold=threshold, factor=factor, alg=alg,
            top_p=top_p, top_k=top_k,
        )
        name, config = decoder_config(spec, decoder, options)
        total = len(prompts) * generation_length(config)
        progress = _Progress("decoding", enabled=not as_json)
        completions = generate(
            model, spec, tokenizer, prompts, name, config, seed=seed,
            on_step=lambda nfe, decided: progress(decided, total),
        )
    except DlmcError as e:
        _fail(e, debug)
    for c in completions:
        if as_json:
            typer.echo(json.dumps({"prompt_ids": c.prompt_ids, "output_ids": c.output_ids, "text": c.text,
                                   "nfe": c.nfe, "seconds": round(c.seconds, 4)}))
        else:
            typer.echo(c.text if c.text is not None else ",".join(map(str, c.output_ids)))


@app.command("eval")
def eval_(
    model_dir: Annotated[Optional[Path], typer.Argument(help="Checkpoint directory (default: the embedded model).")] = None,
    per_task: Annotated[int, Opt(help="Held-out prompts per task.")] = 25,
    batch_size: Annotated[int, Opt()] = 25,
    decoder: Annotated[Optional[str], Opt()] = None,
    gen_length: Annotated[Optional[int], Opt()] = None,
    steps: Annotated[Optional[int], Opt()] = None,
    block_length: Annotated[Optional[int], Opt()] = None,
    threshold: Annotated[Optional[float], Opt()] = None,
    seed: Annotated[int, Opt()] = 0,
    device: Annotated[str, Opt()] = "cpu",
    dtype: Annotated[Optional[str], Opt()] = None,
    as_json: Annotated[bool, Opt("--json")] = False,
    debug: Debug = False,
) -> None:
    """Exact-match accuracy and NFE on the held-out synthetic tasks (needs a tokenizer that spells them)."""
    from dlmc.evaluate import evaluate
    from dlmc.generation import decoder_config

    try:
        model, spec, tokenizer = _load(model_dir, device, dtype)
        if tokenizer is None:
            raise DlmcError(f"{model_dir}: eval needs the model's tokenizer files")
        options = _decoder_options(gen_length=gen_length, steps=steps, block_length=block_length, threshold=threshold)
        name, config = decoder_config(spec, decoder, options)
        report = evaluate(model, spec, tokenizer, name, config, per_task=per_task, batch_size=batch_size, seed=seed,
                          on_batch=_Progress("evaluating", enabled=not as_json))
    except DlmcError as e:
        _fail(e, debug)
    if as_json:
        typer.echo(json.dumps({"decoder": name, "config": dataclasses.asdict(config)} | report.to_dict()))
        return
    typer.echo(f"decoder   {name} {dataclasses.asdict(config)}")
    for task, acc in report.per_task.items():
        typer.echo(f"{task:9} {acc:6.1%}")
    typer.echo(f"accuracy  {report.accuracy:6.1%} of {report.examples} held-out prompts")
    typer.echo(f"nfe       {report.nfe} ({report.nfe / report.examples * batch_size:.0f} per batch of {batch_size})")
    typer.echo(f"seconds   {report.seconds:.1f}")
