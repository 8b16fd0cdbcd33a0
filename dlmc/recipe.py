"""Recipes: YAML in, typed frozen dataclasses out; every problem reported at once.

    description: LLaDA on a laptop CPU, exact
    capture: {dtype: float32, max_batch: 8}
    passes:                      # list order = execution order
      - fold_constants: {}
      - mixed_precision: {dtype: bfloat16}
    lower: {backend: onnxrt, opset: 20}
    decode: {decoder: llada, gen_length: 64, steps: 64, block_length: 32}

Pass names, backends and decoders resolve through closed registries (never dotted import paths).
YAML is a thin serialization of the dataclasses: `dump_recipe` writes the same shape `load_recipe`
reads, and the artifact embeds that dump as the resolved recipe.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dlmc.capture import CaptureConfig
from dlmc.decoding import DECODERS
from dlmc.device import check_device
from dlmc.errors import DlmcError, single_line
from dlmc.lower import BACKENDS, LowerSettings, check_backend
from dlmc.lower.inductor import InductorSettings
from dlmc.lower.tensorrt import TensorRtSettings
from dlmc.passes import PassConfig, pass_configs
from dlmc.passes.fold_constants import FoldConstants
from dlmc.passes.fuse_decode import RULES
from dlmc.typed import BAD, build, convert, kind

SECTIONS = ("description", "capture", "passes", "lower", "decode")


class RecipeError(DlmcError):
    """All of a recipe's problems; str() is one line, `problems` has one entry per problem."""

    def __init__(self, where: str, problems: list[str]):
        self.problems = [single_line(p) for p in problems]  # `dlmc validate` prints one per line
        count = f"{len(problems)} problems" if len(problems) > 1 else "1 problem"
        super().__init__(f"{where}: {count}: " + "; ".join(self.problems))


@dataclass(frozen=True, kw_only=True)
class DecodeDefaults:
    """What `engine.generate()` uses when the caller names no decoder or config."""

    decoder: str | None = None
    """A name from dlmc.decoding.DECODERS; None = the model's own sampler."""
    config: dict[str, Any] = field(default_factory=dict)
    """Fields of that decoder's config."""


@dataclass(frozen=True, kw_only=True)
class Recipe:
    capture: CaptureConfig = field(default_factory=CaptureConfig)
    passes: tuple[PassConfig, ...] = ()
    lower: LowerSettings = field(default_factory=InductorSettings)
    decode: DecodeDefaults = field(default_factory=DecodeDefaults)
    description: str = ""

    @property
    def exact(self) -> bool:
        """True when every pass is exact, so the artifact must reproduce the reference tokens."""
        return all(p.exact for p in self.passes)


def default_recipe(device: str = "cpu") -> Recipe:
    """Exact passes only, Inductor on `device` (cpu or cuda): token-identical to the reference decoder."""
    kind = check_device(device).type
    return Recipe(
        description=f"default: exact passes, Inductor on {kind}",
        passes=(FoldConstants(),),
        lower=InductorSettings(),
    )


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe file; raises RecipeError listing every problem found."""
    path = Path(path)
    if not path.is_file():
        raise DlmcError(f"{path}: file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise DlmcError(f"{path}: not valid YAML{where} ({getattr(e, 'problem', e)})") from None
    except UnicodeDecodeError:
        raise DlmcError(f"{path}: not a text file") from None
    return parse_recipe({} if data is None else data, where=str(path))


def parse_recipe(data: Any, where: str = "recipe") -> Recipe:
    problems: list[str] = []
    if not isinstance(data, dict):
        raise RecipeError(where, [f"expected a mapping of {', '.join(SECTIONS)}, got {kind(data)}"])
    for key in data:
        if key not in SECTIONS:
            problems.append(f"{key}: unknown section (known: {', '.join(SECTIONS)})")
    description = convert(str, data.get("description", ""), "description", problems)
    capture = build(CaptureConfig, data.get("capture") or {}, "capture", problems)
    passes = _passes(data.get("passes") or [], problems)
    lower = _lower(data.get("lower") or {"backend": "inductor"}, problems)
    decode = _decode(data.get("decode") or {}, problems)
    if not problems:
        problems += _cross_checks(capture, lower, passes) + _pass_checks(capture, passes, lower, decode)
    if problems:
        raise RecipeError(where, problems)
    return Recipe(capture=capture, passes=tuple(passes), lower=lower, decode=decode, description=description)


def _passes(items: Any, problems: list[str]) -> list[PassConfig]:
    if not isinstance(items, list):
        problems.append(f"passes: expected a list, got {kind(items)}")
        return []
    known = pass_configs()
    configs = []
    for i, item in enumerate(items):
        where = f"passes[{i}]"
        if isinstance(item, str):  # "- fold_constants" is shorthand for "- fold_constants: {}"
            item = {item: {}}
        if not isinstance(item, dict) or len(item) != 1:
            problems.append(f"{where}: expected one pass name mapped to its options, e.g. '- fold_constants: {{}}'")
            continue
        ((name, options),) = item.items()
        if not isinstance(name, str) or name not in known:
            problems.append(f"{where}: unknown pass '{name}' (known: {', '.join(sorted(known))})")
            continue
        config = build(known[name], options or {}, f"{where}.{name}", problems)
        if config is not BAD:
            configs.append(config)
    return configs


def _lower(data: Any, problems: list[str]) -> LowerSettings:
    if not isinstance(data, dict):
        problems.append(f"lower: expected a mapping, got {kind(data)}")
        return BAD
    backend = data.get("backend", "inductor")
    if not isinstance(backend, str) or backend not in BACKENDS:
        problems.append(f"lower.backend: unknown backend '{backend}' (known: {', '.join(BACKENDS)})")
        return BAD
    return build(BACKENDS[backend], {k: v for k, v in data.items() if k != "backend"}, "lower", problems)


def _decode(data: Any, problems: list[str]) -> DecodeDefaults:
    if not isinstance(data, dict):
        problems.append(f"decode: expected a mapping, got {kind(data)}")
        return BAD
    name = data.get("decoder")
    fields = {k: v for k, v in data.items() if k != "decoder"}
    if name is None:
        if fields:
            problems.append(f"decode: options {', '.join(fields)} need a 'decoder' to belong to")
        return DecodeDefaults()
    if not isinstance(name, str) or name not in DECODERS:
        problems.append(f"decode.decoder: unknown decoder '{name}' (known: {', '.join(sorted(DECODERS))})")
        return BAD
    config = build(DECODERS[name][0], fields, "decode", problems)
    if config is BAD:
        return BAD
    return DecodeDefaults(decoder=name, config=_plain(dataclasses.asdict(config)))


def _cross_checks(capture: CaptureConfig, lower: LowerSettings, passes: list[PassConfig] = ()) -> list[str]:
    """Options that are fine alone but contradict each other."""
    problems = []
    for p in passes:  # a pass whose output the chosen backend cannot run (e.g. a quantization scheme)
        check = getattr(p, "lower_problems", None)
        if check is not None:
            problems += check(lower)
    if capture.moe_experts == "grouped" and lower.moe_experts != "grouped":
        problems.append(f"capture.moe_experts: grouped needs a grouped matmul, which {lower.backend} cannot run "
                        f"(ONNX has none); use tiled or leave it unset")
    if isinstance(lower, TensorRtSettings):
        if lower.opt_batch > capture.max_batch:
            problems.append(f"lower.opt_batch: {lower.opt_batch} exceeds capture.max_batch {capture.max_batch}")
        if lower.opt_seq is not None and capture.seq_buckets and lower.opt_seq > capture.seq_buckets[-1]:
            problems.append(f"lower.opt_seq: {lower.opt_seq} exceeds the largest of capture.seq_buckets")
    return problems


def _pass_checks(
    capture: CaptureConfig, passes: list[PassConfig], lower: LowerSettings, decode: DecodeDefaults
) -> list[str]:
    """Passes that cannot work together, or with this capture, backend or decoder."""
    problems = []
    names = [p.name for p in passes]
    if "rotate" in names:
        # rotate folds the rotation into float weights; after quantize there are none left, after
        # mixed_precision the rotated weights would be rounded to bf16/fp16 a second time.
        for name in dict.fromkeys(names[: names.index("rotate")]):
            if name in ("quantize", "mixed_precision"):
                problems.append(f"passes: rotate must come before {name}")
    if "fuse_decode" in names:
        problems += _fuse_checks(passes, decode)
    if "triton_kernels" in names and names[-1] != "triton_kernels":
        problems.append("passes: triton_kernels must be the last pass (it rewrites what the others left)")
    caches = [p for p in passes if p.kv_cache]
    if caches and "cpu_attention" in names and names.index("cpu_attention") < names.index(caches[0].name):
        problems.append(f"passes: cpu_attention must come after {caches[0].name} (which finds the step's attention)")
    if caches and "layer_skip" in names[names.index(caches[0].name):]:
        # layer_skip finds a block by the residual stream alone; after a cache pass each block also
        # passes out its K/V, so the compile would stop there, after the capture and earlier passes.
        problems.append(f"passes: layer_skip must come before {caches[0].name} (a pass with a K/V cache)")
    if len(caches) > 1:
        names = " and ".join(p.name for p in caches)
        problems.append(f"passes: {names} each give the step a K/V cache; keep one")
    for p in caches[:1]:
        if capture.seq_buckets:
            problems.append(f"passes: {p.name} needs a dynamic sequence length; remove capture.seq_buckets")
        if isinstance(lower, TensorRtSettings):
            problems.append(f"passes: {p.name} cannot be lowered to tensorrt yet; use inductor or onnxrt")
        problems += p.policy().recipe_problems(p.name, decode.decoder, decode.config)
    return problems


def _fuse_checks(passes: list[PassConfig], decode: DecodeDefaults) -> list[str]:
    """fuse_decode replaces the logits with decoded rows, so nothing may follow it; each fused rule's
    loop runs uncached or under the cache policies its Rule names (llada: dual, prefix, window; block, wedlm: exact)."""
    problems = []
    last = [p.name for p in passes if p.name not in ("triton_kernels", "cpu_attention")][-1]  # kernels may follow
    if last != "fuse_decode":
        problems.append("passes: fuse_decode must be the last pass, or followed only by kernel passes (it "
                        "replaces the step's logits)")
    fused = next(p.decoder for p in passes if p.name == "fuse_decode")
    allowed = tuple(RULES) if fused == "auto" else (fused,)
    for p in passes:
        if p.kv_cache and not any(p.policy().name in RULES[d].caches for d in allowed):
            runs = "; ".join(f"{d}'s loop runs uncached" + (f" or under the {'/'.join(RULES[d].caches)} cache"
                             if RULES[d].caches else " only") for d in allowed)
            problems.append(f"passes: fuse_decode {{decoder: {fused}}} cannot run after {p.name} ({runs})")
    if decode.decoder not in (None, *allowed, *(also for d in allowed for also in RULES[d].also)):
        rule = " or ".join(allowed)
        problems.append(f"decode.decoder: fuse_decode fuses the {rule} decoder's rule, not {decode.decoder}'s")
    return problems + _strategy_checks(passes, decode)


def _strategy_checks(passes: list[PassConfig], decode: DecodeDefaults) -> list[str]:
    """A decode.strategy the fused step must be compiled for: the outputs it reads, no cache if it reads
    every generated position."""
    strategy = (decode.config or {}).get("strategy")
    if strategy is None:
        return []
    from dlmc.strategies import strategy_config

    rule = strategy_config(strategy).rule  # already checked when decode was read
    fuse = next(p for p in passes if p.name == "fuse_decode")
    missing = [name for name in rule.outputs if name not in fuse.outputs]
    problems = []
    if missing:
        problems.append(
            f"decode.strategy: {strategy['name']} reads {', '.join(missing)}; add it to fuse_decode.outputs")
    if rule.sees_generation and any(p.kv_cache for p in passes):
        problems.append(f"decode.strategy: {strategy['name']} reads every generated position each step; "
                        "a fused cached step decodes the block's rows only")
    return problems


def check_target(recipe: Recipe, device: str, checkpoint_dtype: str | None = None) -> list[str]:
    """Problems with running this recipe on this machine: a missing backend package or device, or an
    option the backend cannot honour (such as a compute dtype it has no kernels for)."""
    dtypes = {recipe.capture.dtype or checkpoint_dtype or "float32"}
    dtypes |= {p.dtype for p in recipe.passes if isinstance(getattr(p, "dtype", None), str)}
    kernels = [p.device_problem(device) for p in recipe.passes if p.name == "triton_kernels"]
    return [p for p in kernels if p] + check_backend(recipe.lower, device, frozenset(dtypes))


# ---------------------------------------------------------------------------------------------
# dumping (the inverse of parse_recipe)
# ---------------------------------------------------------------------------------------------


def dump_recipe(recipe: Recipe) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if recipe.description:
        out["description"] = recipe.description
    out["capture"] = _plain(dataclasses.asdict(recipe.capture))
    out["passes"] = [{p.name: _plain(dataclasses.asdict(p))} for p in recipe.passes]
    out["lower"] = {"backend": recipe.lower.backend, **_plain(dataclasses.asdict(recipe.lower))}
    if recipe.decode.decoder is not None:
        out["decode"] = {"decoder": recipe.decode.decoder, **recipe.decode.config}
    return out


def _plain(value: Any) -> Any:
    """Tuples to lists, recursively, so the dump is plain YAML/JSON."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
