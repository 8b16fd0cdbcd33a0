"""The dlmc command line. Thin: it parses, calls the library and prints."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
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


def _is_artifact(path: Path | None) -> bool:
    from dlmc.loading import is_artifact

    return is_artifact(path)


@app.command()
def inspect(path: Path, debug: Debug = False) -> None:
    """Print a checkpoint's family, size, dtype and denoiser spec, or a compiled artifact's manifest."""
    try:
        if _is_artifact(path):
            from dlmc.artifact import read_manifest
            from dlmc.summary import summarize

            info = summarize(read_manifest(path))
        else:
            from dlmc.models import describe

            info = describe(path)
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


def _torch_dtype(dtype: str | None):
    from dlmc.loading import torch_dtype

    return torch_dtype(dtype)


def _load(path: Path | None, device: str, dtype: str | None):
    """(model, spec, tokenizer, decode defaults) of a compiled artifact, a checkpoint directory, or the
    embedded default model. For an artifact, `model` is the runtime engine's compiled step."""
    from dlmc.loading import load_decodable

    loaded = load_decodable(path, device, dtype)
    return loaded.model, loaded.spec, loaded.tokenizer, loaded.defaults


@app.command()
def run(
    path: Annotated[Optional[Path], typer.Argument(help="Checkpoint or artifact directory (default: the embedded model).")] = None,
    prompt: Prompt = [],
    prompt_ids: PromptIds = [],
    chat: Annotated[bool, Opt("--chat", help="Each --prompt is one user message, through the model's chat template.")] = False,
    decoder: Annotated[
        Optional[str], Opt(help="llada | dream | block | wedlm | llada2 | llada2_edit (default: the family's).")
    ] = None,
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
    editing_threshold: Annotated[Optional[float], Opt(help="llada2_edit: token-to-token edit threshold.")] = None,
    max_post_steps: Annotated[Optional[int], Opt(help="llada2_edit: edit-only steps after a block is full.")] = None,
    num_to_transfer: Annotated[Optional[int], Opt(help="llada2_edit: masks committed when none is confident.")] = None,
    minimal_topk: Annotated[Optional[int], Opt(help="llada2: steps capped at gen_length // minimal_topk.")] = None,
    eos_early_stop: Annotated[Optional[bool], Opt("--eos-early-stop/--no-eos-early-stop", help="llada2*")] = None,
    stop_at_eos: Annotated[bool, Opt("--stop-at-eos", help="llada / dream: stop a prompt once its first EOS "
                                     "is settled (the official samplers run every step).")] = False,
    strategy: Annotated[Optional[str], Opt(help="llada: decoding strategy (dlmc.strategies: top_k, threshold, factor, "
                                           "eb, hierarchical, local_leap, prophet, sched).")] = None,
    strategy_config: Annotated[
        Optional[str], Opt(help="The strategy's options as JSON, e.g. '{\"gamma\": 0.1}'.")
    ] = None,
    seed: Annotated[int, Opt()] = 0,
    device: Annotated[Optional[str], Opt(help="cpu or cuda (default: cpu, or the artifact's)")] = None,
    dtype: Annotated[Optional[str], Opt(help="float32 | bfloat16 | float16 (default: the checkpoint's)")] = None,
    as_json: Annotated[bool, Opt("--json", help="One JSON object per prompt.")] = False,
    debug: Debug = False,
) -> None:
    """Generate from a checkpoint directory, a compiled artifact, or the embedded default model."""
    from dlmc.generation import decoder_config, encode_prompts, generate, generation_length
    from dlmc.strategies import strategy_option

    try:
        model, spec, tokenizer, defaults = _load(path, device, dtype)
        prompts = encode_prompts(tokenizer, prompt, prompt_ids, chat=chat)
        options = _decoder_options(
            gen_length=gen_length, steps=steps, block_length=block_length, temperature=temperature,
            cfg_scale=cfg_scale, remasking=remasking, threshold=threshold, factor=factor, alg=alg,
            top_p=top_p, top_k=top_k, editing_threshold=editing_threshold, max_post_steps=max_post_steps,
            num_to_transfer=num_to_transfer, minimal_topk=minimal_topk, eos_early_stop=eos_early_stop,
            stop_at_eos=stop_at_eos or None, strategy=strategy_option(strategy, strategy_config),
        )
        name, config = decoder_config(spec, decoder, options, defaults)
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
            typer.echo(json.dumps(_completion_json(c)))
        else:
            typer.echo(c.text if c.text is not None else ",".join(map(str, c.output_ids)))


def _completion_json(c) -> dict:
    """One prompt's JSON line. Its own NFE always; the wall time only as what it measured: the prompt's
    `seconds` when it was decoded alone, else the `batch_seconds` (and `batch_nfe`) of the batch."""
    row = {"prompt_ids": c.prompt_ids, "output_ids": c.output_ids, "text": c.text, "nfe": c.nfe}
    if c.batch_size == 1:
        return row | {"seconds": round(c.batch_seconds, 4)}
    return row | {"batch_nfe": c.batch_nfe, "batch_seconds": round(c.batch_seconds, 4), "batch_size": c.batch_size}


@app.command("eval")
def eval_(
    path: Annotated[Optional[Path], typer.Argument(help="Checkpoint or artifact directory (default: the embedded model).")] = None,
    per_task: Annotated[int, Opt(help="Held-out prompts per task.")] = 25,
    batch_size: Annotated[int, Opt()] = 25,
    decoder: Annotated[Optional[str], Opt()] = None,
    gen_length: Annotated[Optional[int], Opt()] = None,
    steps: Annotated[Optional[int], Opt()] = None,
    block_length: Annotated[Optional[int], Opt()] = None,
    threshold: Annotated[Optional[float], Opt()] = None,
    seed: Annotated[int, Opt()] = 0,
    device: Annotated[Optional[str], Opt()] = None,
    dtype: Annotated[Optional[str], Opt()] = None,
    as_json: Annotated[bool, Opt("--json")] = False,
    debug: Debug = False,
) -> None:
    """Exact-match accuracy and NFE on the held-out synthetic tasks (needs a tokenizer that spells them)."""
    from dlmc.evaluate import evaluate
    from dlmc.generation import decoder_config

    try:
        model, spec, tokenizer, defaults = _load(path, device, dtype)
        if tokenizer is None:
            raise DlmcError(f"{path}: eval needs the model's tokenizer files")
        options = _decoder_options(gen_length=gen_length, steps=steps, block_length=block_length, threshold=threshold)
        name, config = decoder_config(spec, decoder, options, defaults)
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


@app.command()
def calibrate(
    path: Annotated[Optional[Path], typer.Argument(help="Checkpoint directory (default: the embedded model).")] = None,
    budget: Annotated[int, Opt(help="Layers to drop.")] = 1,
    criterion: Annotated[str, Opt(help="similarity (cos of block in/out) | logits (arg-max kept)")] = "similarity",
    source: Annotated[Optional[str], Opt(help="tasks (embedded model only) | file | self | random; default: "
                                              "file with --prompt/--file, else tasks or self")] = None,
    prompt: Annotated[list[str], Opt("--prompt", help="Calibration prompt (repeatable).")] = [],
    file: Annotated[Optional[Path], Opt(help="Calibration prompts, one per line.")] = None,
    examples: Annotated[int, Opt(help="Canvases of sources tasks, self and random.")] = 32,
    gen_length: Annotated[int, Opt(help="Generation region of each canvas.")] = 64,
    dtype: Annotated[Optional[str], Opt()] = None,
    as_json: Annotated[bool, Opt("--json")] = False,
    debug: Debug = False,
) -> None:
    """Each block's input/output cosine similarity and the layers a layer_skip budget would drop."""
    from dlmc.calibrate import calibrate_checkpoint
    from dlmc.generation import default_model_dir
    from dlmc.passes.layer_skip import LayerSkip

    try:
        try:
            if criterion not in ("similarity", "logits"):
                raise ValueError(f"criterion: '{criterion}' is not one of similarity, logits")
            if source not in (None, "tasks", "file", "self", "random"):
                raise ValueError(f"source: '{source}' is not one of tasks, file, self, random")
            config = LayerSkip(budget=budget, criterion=criterion, source=source, prompts=tuple(prompt),
                               file=str(file) if file else None, examples=examples, gen_length=gen_length)
        except ValueError as e:
            raise DlmcError("--" + str(e).replace("_", "-", str(e).find(":"))) from None
        calibration, layers = calibrate_checkpoint(path or default_model_dir(), config, dtype=_torch_dtype(dtype))
    except DlmcError as e:
        _fail(e, debug)
    if as_json:
        report = calibration.to_dict() | {"budget": budget, "criterion": criterion, "layers": list(layers)}
        typer.echo(json.dumps(report))
        return
    typer.echo(calibration.table(layers))
    typer.echo(f"{calibration.canvases} canvases, {calibration.tokens} tokens; budget {budget} drops layers "
               f"{list(layers)}: in a recipe, - layer_skip: {{layers: {list(layers)}}}")


@app.command("compile")
def compile_(
    model_dir: Annotated[Path, typer.Argument(help="Checkpoint directory in its published format.")],
    out: Annotated[Path, Opt("-o", "--out", help="Artifact directory to write.")],
    recipe: Annotated[Optional[Path], Opt(help="Recipe YAML (default: exact passes, Inductor, this machine).")] = None,
    device: Annotated[str, Opt(help="cpu or cuda")] = "cpu",
    force: Annotated[bool, Opt(help="Replace an existing output directory.")] = False,
    debug: Debug = False,
) -> None:
    """Capture one denoising step, run the recipe's passes, lower it and write an artifact."""
    from dlmc.compiler import compile_model

    start = time.perf_counter()

    def stage(name: str) -> None:
        typer.echo(f"[{time.perf_counter() - start:6.1f}s] {name}", err=True)

    try:
        path = compile_model(model_dir, recipe, out, force=force, device=device, on_stage=stage)
    except DlmcError as e:
        _fail(e, debug)
    if (path / "quant_report.json").is_file():
        from dlmc.quant.report import summary_lines

        for line in summary_lines(json.loads((path / "quant_report.json").read_text())):
            typer.echo(line)
    typer.echo(f"wrote {path}")


@app.command("build-engine")
def build_engine_(
    artifact: Annotated[Path, typer.Argument(help="An artifact compiled with lower.backend: onnxrt.")],
    out: Annotated[Optional[Path], Opt("-o", "--out", help="Engine file (default: <artifact>.engine).")] = None,
    fp16: Annotated[bool, Opt(help="Let TensorRT run float layers in fp16.")] = True,
    workspace_gib: Annotated[float, Opt(help="TensorRT builder workspace.")] = 4.0,
    debug: Debug = False,
) -> None:
    """Build a TensorRT engine from the artifact's ONNX graph, on this machine's GPU (e.g. a Jetson)."""
    from dlmc.lower.tensorrt_engine import build_engine

    try:
        path = build_engine(artifact, out, fp16=fp16, workspace_gib=workspace_gib)
    except DlmcError as e:
        _fail(e, debug)
    typer.echo(f"wrote {path}")


@app.command()
def validate(recipes: Annotated[list[Path], typer.Argument(help="Recipe YAML files.")], debug: Debug = False) -> None:
    """Check recipes; every problem of every file is printed, one per line."""
    from dlmc.recipe import RecipeError, load_recipe

    failed = False
    for path in recipes:
        try:
            load_recipe(path)
            typer.echo(f"{path}: ok")
        except RecipeError as e:
            failed = True
            for problem in e.problems:
                typer.echo(f"{path}: {problem}", err=True)
        except DlmcError as e:
            failed = True
            typer.echo(f"error: {e}", err=True)
    if failed:
        raise typer.Exit(2)


@app.command()
def bench(
    artifact: Annotated[Optional[Path], typer.Argument(help="Compiled artifact directory (not with --sweep).")] = None,
    model: Annotated[Optional[Path], Opt(help="Reference checkpoint (default: the one the artifact was compiled from; "
                                        "with --sweep, the embedded model).")] = None,
    sweep: Annotated[Optional[Path], Opt(help="Sweep YAML: decoding settings side by side on held-out tasks.")] = None,
    plot: Annotated[Optional[Path], Opt(help="With --sweep: write the speed-quality Pareto plot (PNG).")] = None,
    per_task: Annotated[Optional[int], Opt(help="With --sweep: prompts per task (default: the file's)")] = None,
    baseline: Annotated[str, Opt(help="What the speed-up is relative to: reference (the eager reference decoder).")] = "reference",
    prompts: Annotated[int, Opt(help="Prompts in the batch.")] = 4,
    gen_length: Annotated[Optional[int], Opt()] = None,
    steps: Annotated[Optional[int], Opt()] = None,
    block_length: Annotated[Optional[int], Opt()] = None,
    repeats: Annotated[int, Opt(help="Timed runs per side after one warm-up; the median is reported.")] = 3,
    seed: Annotated[int, Opt()] = 0,
    as_json: Annotated[bool, Opt("--json")] = False,
    debug: Debug = False,
) -> None:
    """Speed and fidelity of an artifact against the reference decoder, measured in one run."""
    from dlmc.bench import run_bench

    if sweep is not None or plot is not None:
        return _bench_sweep(artifact, model, sweep, plot, per_task, seed, as_json, debug)
    try:
        if artifact is None:
            raise DlmcError("bench needs an artifact directory, or --sweep FILE")
        if per_task is not None:
            raise DlmcError("--per-task applies to --sweep only")
        if baseline != "reference":
            raise DlmcError(f"--baseline {baseline}: only 'reference' is available")
        options = _decoder_options(gen_length=gen_length, steps=steps, block_length=block_length)
        report = run_bench(artifact, model, prompts=prompts, options=options, repeats=repeats, seed=seed)
    except DlmcError as e:
        _fail(e, debug)
    if as_json:
        typer.echo(json.dumps(report))
        return
    typer.echo(report["table"])


def _bench_sweep(artifact, model, sweep, plot, per_task, seed, as_json, debug) -> None:
    from dlmc.sweep import format_sweep, sweep_and_plot

    try:
        if artifact is not None:
            raise DlmcError(f"{artifact}: with --sweep, name artifacts in the sweep file (artifact: PATH)")
        rows = sweep_and_plot(sweep, model, plot, per_task=per_task, seed=seed,
                              on_row=None if as_json else lambda r: typer.echo(f"{r.name}: done", err=True))
    except DlmcError as e:
        _fail(e, debug)
    if as_json:
        typer.echo(json.dumps({"sweep": str(sweep), "rows": [r.to_dict() for r in rows]}))
        return
    typer.echo(format_sweep(rows))
    if plot is not None:
        typer.echo(f"wrote {plot}")


@app.command()
def serve(
    path: Annotated[Optional[Path], typer.Argument(help="Checkpoint or artifact directory (default: the embedded model).")] = None,
    host: Annotated[str, Opt()] = "127.0.0.1",
    port: Annotated[int, Opt()] = 8000,
    max_queue: Annotated[int, Opt(help="Queued requests before new ones get 429.")] = 64,
    max_batch: Annotated[int, Opt(help="Queued requests with the same decoder settings decoded as one batch.")] = 8,
    model_name: Annotated[Optional[str], Opt(help="The model id clients send (default: the directory's name).")] = None,
    device: Annotated[Optional[str], Opt(help="cpu or cuda (default: cpu, or the artifact's)")] = None,
    dtype: Annotated[Optional[str], Opt(help="float32 | bfloat16 | float16 (default: the checkpoint's)")] = None,
    threads: Annotated[Optional[int], Opt(help="torch intra-op threads (default: torch's, one per core).")] = None,
    log_level: Annotated[str, Opt()] = "info",
    debug: Debug = False,
) -> None:
    """OpenAI-compatible HTTP server: /v1/completions, /v1/chat/completions, /v1/models, /health."""
    from dlmc.generation import default_model_dir

    try:
        try:
            from dlmc.serve import ServedModel, ServeSettings, serve as run_server
        except ImportError as e:
            raise DlmcError(f'dlmc serve needs the serve extra: pip install -e ".[serve]" ({e})') from None
        if min(max_queue, max_batch, threads or 1) < 1:
            raise DlmcError("--max-queue, --max-batch and --threads must be at least 1")
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        model, spec, tokenizer, defaults = _load(path, device, dtype)
        name = model_name or (path or default_model_dir()).resolve().name
        served = ServedModel(model, spec, tokenizer, defaults, name, max_batch=max_batch)
    except DlmcError as e:
        _fail(e, debug)
    run_server(served, ServeSettings(host=host, port=port, max_queue=max_queue, max_batch=max_batch, log_level=log_level))
