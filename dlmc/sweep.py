"""`dlmc bench --sweep FILE`: decoding settings (and optionally other artifacts or recipes) side by side on
the same held-out task prompts of the embedded model: tokens/s, NFE (per batch and per prompt), exact-match
accuracy and token agreement with the first entry, the baseline.

A sweep file is YAML:

    per_task: 5                                  # held-out prompts per task (4 tasks)
    batch_size: 20
    decode: {gen_length: 128, block_length: 32}  # settings every entry starts from
    entries:
      - name: one-per-step                       # the first entry is the baseline of `agreement`
        options: {steps: 128}
      - name: threshold-0.9
        options: {threshold: 0.9}
      - name: eb                                 # a decoding strategy by name, with its parameters
        strategy: {name: eb, gamma: 0.1}
      - name: compiled
        recipe: ../recipes/cpu-inductor.yaml     # or artifact: path/to/artifact (paths relative to the file)

Each entry may set `decoder` (default: the model's own), `options` (fields of that decoder's config),
`strategy` and one of `artifact` / `recipe`. Every entry's config is built before anything runs, so
a bad entry fails at once with one line naming it and the field.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dlmc.errors import DlmcError

SWEEP_KEYS = ("per_task", "batch_size", "decode", "entries")
ENTRY_KEYS = ("name", "decoder", "options", "strategy", "artifact", "recipe")


@dataclass(frozen=True)
class SweepEntry:
    name: str
    where: str
    """How errors name the entry: "FILE: entries[i] (name)"."""
    decoder: str | None = None
    options: dict = field(default_factory=dict)
    strategy: Any = None
    """A strategy name or {name: ..., **parameters}, passed on as the decoder config's `strategy`."""
    artifact: Path | None = None
    recipe: Path | None = None


@dataclass(frozen=True)
class Sweep:
    path: Path
    entries: tuple[SweepEntry, ...]
    per_task: int = 5
    batch_size: int = 20
    decode: dict = field(default_factory=dict)


@dataclass(frozen=True)
class SweepRow:
    name: str
    decoder: str
    config: dict
    tokens_per_s: float
    seconds: float
    nfe: int
    """Model calls summed over the batches: a batch calls the model until its slowest row is done."""
    nfe_per_prompt: float
    """Each prompt's own model calls, averaged: its cost when served alone or batched step by step
    (rows join and leave between steps), where a fast row does not wait for the batch's slowest."""
    accuracy: float
    per_task: dict[str, float]
    agreement: float
    """Fraction of generated tokens equal to the baseline entry's (the first)."""
    output_ids: list[list[int]] = field(repr=False)

    def to_dict(self) -> dict:
        row = asdict(self)
        row.pop("output_ids")
        return row


def load_sweep(path: str | Path) -> Sweep:
    """Parse and check a sweep file's structure (the decoder configs are checked by `build`)."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise DlmcError(f"{path}: cannot read the sweep file ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise DlmcError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise DlmcError(f"{path}: a sweep file is a mapping with {', '.join(SWEEP_KEYS)}")
    _unknown(data, SWEEP_KEYS, f"{path}")
    entries = data.get("entries")
    if not isinstance(entries, list) or not entries:
        raise DlmcError(f"{path}: entries: a non-empty list of entries is required")
    decode = data.get("decode") or {}
    if not isinstance(decode, dict):
        raise DlmcError(f"{path}: decode: a mapping of decoder settings, got {decode!r}")
    sizes = {key: data.get(key, default) for key, default in (("per_task", 5), ("batch_size", 20))}
    for key, value in sizes.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise DlmcError(f"{path}: {key}: a positive integer, got {value!r}")
    parsed = tuple(_entry(path, i, raw) for i, raw in enumerate(entries))
    names = [e.name for e in parsed]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise DlmcError(f"{path}: entries[{i}].name: '{name}' is used twice")
    return Sweep(path, parsed, decode=decode, **sizes)


def _entry(path: Path, i: int, raw: Any) -> SweepEntry:
    if not isinstance(raw, dict):
        raise DlmcError(f"{path}: entries[{i}]: a mapping with {', '.join(ENTRY_KEYS)}, got {raw!r}")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise DlmcError(f"{path}: entries[{i}].name: every entry needs a name")
    where = f"{path}: entries[{i}] ({name})"
    _unknown(raw, ENTRY_KEYS, where)
    options = raw.get("options") or {}
    if not isinstance(options, dict):
        raise DlmcError(f"{where}.options: a mapping of decoder settings, got {options!r}")
    decoder = raw.get("decoder")
    if decoder is not None and not isinstance(decoder, str):
        raise DlmcError(f"{where}.decoder: a decoder name, got {decoder!r}")
    if "artifact" in raw and "recipe" in raw:
        raise DlmcError(f"{where}: artifact and recipe are exclusive; set one of them")
    paths = {}
    for key in ("artifact", "recipe"):
        if key in raw:
            if not isinstance(raw[key], str):
                raise DlmcError(f"{where}.{key}: a path, got {raw[key]!r}")
            paths[key] = (path.parent / raw[key]).resolve()
            if not paths[key].exists():
                raise DlmcError(f"{where}.{key}: '{raw[key]}' does not exist (relative to {path.parent})")
    return SweepEntry(name, where, decoder, options, raw.get("strategy"), **paths)


def _unknown(data: dict, known: tuple[str, ...], where: str) -> None:
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise DlmcError(f"{where}: unknown key '{unknown[0]}' (known: {', '.join(known)})")


def entry_config(spec, entry: SweepEntry, defaults: dict, sweep_decode: dict):
    """(decoder name, config) of one entry: the sweep's `decode` settings, then the entry's options and
    strategy. The one place a sweep meets the decoding-strategy layer: a strategy travels as the decoder
    config's own `strategy` field, which validates it."""
    from dlmc.generation import decoder_config

    options = dict(sweep_decode) | entry.options
    if entry.strategy is not None:
        options["strategy"] = entry.strategy
    try:
        return decoder_config(spec, entry.decoder, options, defaults)
    except DlmcError as e:
        raise DlmcError(f"{entry.where}: {e}") from None
    except TypeError as e:  # a value of the wrong kind that the config's own checks do not name
        raise DlmcError(f"{entry.where}.options: {e}") from None


def run_sweep(
    sweep: Sweep,
    model_dir: str | Path | None = None,
    *,
    per_task: int | None = None,
    workdir: str | Path | None = None,
    seed: int = 0,
    on_row=None,
) -> list[SweepRow]:
    """Every entry on the same held-out prompts. Entries without an artifact or recipe decode the
    checkpoint `model_dir` (default: the embedded model); a recipe is compiled from it into `workdir`."""
    from dlmc.loading import load_decodable

    base = load_decodable(model_dir)
    models = []
    for entry in sweep.entries:  # load and check everything before the first (long) decode
        loaded = base if entry.artifact is None and entry.recipe is None else None
        if entry.artifact is not None:
            loaded = load_decodable(entry.artifact)
        if loaded is not None:
            models.append((entry, loaded, entry_config(loaded.spec, entry, loaded.defaults, sweep.decode)))
        else:  # compiled below, once the cheap checks of every entry passed
            entry_config(base.spec, entry, {}, sweep.decode)
            models.append((entry, None, None))
    rows: list[SweepRow] = []
    for entry, loaded, named in models:
        if loaded is None:
            loaded = load_decodable(_compile(entry, model_dir, workdir))
            named = entry_config(loaded.spec, entry, loaded.defaults, sweep.decode)
        row = _measure(entry, loaded, *named, per_task or sweep.per_task, sweep.batch_size, seed,
                       rows[0].output_ids if rows else None)
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows


def _compile(entry: SweepEntry, model_dir, workdir) -> Path:
    import tempfile

    from dlmc.compiler import compile_model
    from dlmc.generation import default_model_dir

    root = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="dlmc-sweep-"))
    return compile_model(model_dir or default_model_dir(), entry.recipe, root / entry.name, force=True)


def _measure(entry: SweepEntry, loaded, decoder: str, config, per_task: int, batch_size: int, seed: int,
             baseline: list[list[int]] | None) -> SweepRow:
    from dlmc import tasks
    from dlmc.bench import token_agreement
    from dlmc.evaluate import evaluate
    from dlmc.generation import generate

    tokenizer = loaded.tokenizer
    example = tasks.held_out(1)[0]
    if tokenizer is None or tokenizer.decode(tokenizer.encode(example.prompt)) != example.prompt:
        raise DlmcError(f"{entry.where}: its model's tokenizer does not spell the held-out tasks (not the "
                        "embedded model); a sweep measures task accuracy")
    # warm-up: an artifact's first calls pay for allocation and autotuning
    generate(loaded.model, loaded.spec, tokenizer, [tokenizer.encode(example.prompt)], decoder, config, seed=seed)
    start = time.perf_counter()
    report = evaluate(loaded.model, loaded.spec, tokenizer, decoder, config, per_task=per_task,
                      batch_size=batch_size, seed=seed)
    seconds = time.perf_counter() - start
    outputs = [c.output_ids for c in report.completions]
    if baseline is not None and [len(o) for o in outputs] != [len(o) for o in baseline]:
        raise DlmcError(f"{entry.where}: generates {len(outputs[0])} tokens per prompt, the baseline entry "
                        f"{len(baseline[0])}; agreement needs one gen_length")
    generated = sum(len(o) for o in outputs)
    return SweepRow(
        name=entry.name,
        decoder=decoder,
        config=asdict(config),
        tokens_per_s=generated / seconds,
        seconds=seconds,
        nfe=report.nfe,
        nfe_per_prompt=sum(c.nfe for c in report.completions) / len(report.completions),
        accuracy=report.accuracy,
        per_task=report.per_task,
        agreement=token_agreement(outputs, baseline or outputs),
        output_ids=outputs,
    )


def format_sweep(rows: list[SweepRow]) -> str:
    base = rows[0]
    width = max(12, *(len(r.name) for r in rows))
    lines = [f"{'':{width}} {'tok/s':>9} {'speed-up':>9} {'NFE':>7} {'NFE ratio':>9} {'NFE/prompt':>10} "
             f"{'accuracy':>9} {'agree':>7}"]
    for r in rows:
        lines.append(
            f"{r.name:{width}} {r.tokens_per_s:9.1f} {r.tokens_per_s / base.tokens_per_s:8.2f}x {r.nfe:7d} "
            f"{r.nfe / base.nfe:9.2f} {r.nfe_per_prompt:10.2f} {r.accuracy:9.1%} {r.agreement:7.1%}"
        )
    return "\n".join(lines)


def sweep_and_plot(path: Path | None, model: str | Path | None, plot: Path | None, *, per_task: int | None,
                   seed: int, on_row=None) -> list[SweepRow]:
    """`dlmc bench --sweep FILE [--plot PNG]`: run the sweep file and draw its Pareto plot. Checks that
    plotting works before the sweep runs, not after."""
    if path is None:
        raise DlmcError("--plot needs --sweep FILE")
    if per_task is not None and per_task < 1:
        raise DlmcError(f"--per-task {per_task} must be at least 1")
    plan = load_sweep(path)
    if plot is not None:
        from dlmc.pareto import check_plotting

        check_plotting()
    rows = run_sweep(plan, model, per_task=per_task, seed=seed, on_row=on_row)
    if plot is not None:
        from dlmc.pareto import plot_pareto

        plot_pareto([r.name for r in rows], [r.tokens_per_s for r in rows], [r.accuracy for r in rows], plot,
                    title=f"{path.name}: {rows[0].config.get('gen_length', '')} tokens per prompt")
    return rows
