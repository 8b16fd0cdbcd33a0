"""quantize: post-training quantization of the step's linear layers, calibrated on denoising states.

Each chosen linear's float weight is replaced by integer codes and scales (int8, or int4 packed two
per byte) stored as buffers of the program, so the artifact's weights file holds the small form, and
the linear becomes a call to one of the `torch.ops.dlmc` operators (dlmc.quant.ops):

  W8A16 / W4A16   y = linear_woq(x [* 1/s_awq], q, scale, zero, bias)
  W8A8            y = linear_w8a8((x * 1/s_smooth) @ R_hadamard, q, scale, bias, act_scale?)
  MoE experts     y = grouped_woq(x, q [E, ...], scale, zero, offs, bits)   (W8A16 / W4A16, RTN only)
                  y = grouped_w8a8(x, q [E, out, in], scale [E, out], offs)  (W8A8 per token, RTN only)

The stacked experts of an MoE layer (a [E, in, out] parameter read by torch.ops.dlmc.grouped_mm) are
layers too, named by their parameter ("layers.1.mlp.experts_gate"; dlmc.quant.experts); so are experts
stored [E, out, in] and read as transposed views (Gemma-4's "*.experts.gate_up_proj"), quantized from
that view, so the stored codes are the same either way. The router
stays float unless a rule names it ("*.mlp.router"): its top-k choice is where rounding would flip
decisions. Experts captured in the tiled form (the ONNX / TensorRT lowerings) have no quantized form:
a scheme that reaches them is refused.

Smoothing and rotation are exact in float (x W^T = (x/s)(W s)^T = (x R)(W R)^T); they only change
what gets rounded. The pass is approximate; its oracle is the same quantization applied in eager
(`dlmc.quant.reference`). The numerics of one layer are `dlmc.quant.layer`; this module finds the
linears, calibrates them and edits the graph. It leaves a calibration report (per layer outlier
statistics, scales, SQNR of the layer output) for the compiler to write as quant_report.json.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import statistics
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch.export.graph_signature import InputKind, InputSpec, TensorArgument

from dlmc.capture import StepProgram
from dlmc.errors import DlmcError
from dlmc.passes import PassConfig, PassResult, copy_graph, fake_value, input_kinds, rebuild, register
from dlmc.quant import ops
from dlmc.quant.calibration import (
    LayerStats,
    calibration_inputs,
    calibration_source,
    collect_stats,
    current_session,
    sequential_stats,
)
from dlmc.quant.experts import check_expert_scheme, expert_buffers, quantize_experts, run_experts
from dlmc.quant.formats import check_group_size
from dlmc.quant.layer import QuantizedLayer, buffers, quantize_layer, run_layer, transform_input
from dlmc.quant.scheme import Calibration, Rule, Scheme, scheme_for

log = logging.getLogger(__name__)

LINEAR = torch.ops.aten.linear.default
MUL = torch.ops.aten.mul.Tensor
MATMUL = torch.ops.aten.matmul.default
UNFLATTEN = torch.ops.aten.unflatten.int
FLATTEN = torch.ops.aten.flatten.using_ints
GROUPED_MM = torch.ops.dlmc.grouped_mm.default
TRANSPOSE = torch.ops.aten.transpose.int
ROUTER = "*.mlp.router"  # dlmc.models.moe's router: float unless a rule names it
EXPERTS = "*.mlp.experts_*"  # dlmc.models.moe's stacked experts
GEMMA_EXPERTS = "*.experts.*_proj"  # dlmc.models.gemma4's, stored [E, out, in]
META_KEYS = ("nn_module_stack", "stack_trace", "source_fn_stack", "torch_fn")


@dataclass(frozen=True, kw_only=True)
class Quantize(PassConfig):
    """Quantize linear layers: `rules` first (first matching glob wins, `scheme: null` keeps a layer in
    float), every other linear gets `scheme` (null: only the layers the rules name)."""

    name: ClassVar[str] = "quantize"
    exact: ClassVar[bool] = False
    scheme: Scheme | None = field(default_factory=Scheme)
    rules: tuple[Rule, ...] = ()
    calibration: Calibration = field(default_factory=Calibration)

    def schemes(self) -> list[Scheme]:
        return [s for s in (self.scheme, *(r.scheme for r in self.rules)) if s is not None]

    def lower_problems(self, lower: Any) -> list[str]:
        """Schemes the chosen backend (LowerSettings) cannot run (checked when the recipe is read)."""
        if lower.backend != "onnxrt":
            return []
        from dlmc.quant.onnx import unsupported

        return sorted({p for s in self.schemes() for p in unsupported(s, lower.opset, lower.int4)})


@register(Quantize)
def quantize(program: StepProgram, config: Quantize) -> PassResult:
    session = current_session()
    model_dir = session.model_dir if session is not None else None
    sampler = session.model if session is not None and session.model is not None else program
    source = calibration_source(config.calibration.source, model_dir, "quantize.calibration.source")
    config = dataclasses.replace(config, calibration=dataclasses.replace(config.calibration, source=source))
    result, report = quantize_program(program, config, lambda: calibration_inputs(
        config.calibration, program.spec, model_dir, program.signature.seq[1], model=sampler))
    if report and session is not None:
        session.reports.append(report)
    return result


def quantize_program(program: StepProgram, config: Quantize, batches: Any) -> tuple[PassResult, dict[str, Any]]:
    """The pass with explicit calibration batches (a list, or a callable returning it)."""
    gm = copy_graph(program)
    kinds = input_kinds(program)
    ep = program.exported
    state = dict(ep.state_dict)
    linears = find_linears(gm, kinds, state)
    experts, tiled, transposed = find_experts(gm, kinds, state)
    chosen = {name: s for name in linears if (s := _scheme(name, config)) is not None}
    chosen |= {name: s for name in experts if (s := _scheme(name, config)) is not None}
    for name in tiled:
        if _scheme(name, config) is not None:
            raise DlmcError(f"quantize: the experts {name} are captured in the tiled form (capture.moe_experts: "
                            "tiled, the ONNX/TensorRT lowerings), which has no quantized form; keep them float "
                            "with a rule {match: '*.experts*', scheme: null}")
    if not chosen:
        return PassResult(program, False), {}
    key = {name: name if name in experts else name + ".weight" for name in chosen}  # the float parameter
    linears = linears | experts  # the nodes that read each chosen weight

    def weight(name: str) -> torch.Tensor:  # [out, in] for a linear, [E, in, out] for experts
        w = state[key[name]]
        return w.transpose(1, 2) if name in transposed else w

    for name, scheme in chosen.items():  # every shape problem before any work
        w = weight(name)
        if name in experts:
            check_expert_scheme(name, scheme)
        check_group_size(w.shape[1], scheme.group_size, name)
        if scheme.bits == 4 and (scheme.group_size or w.shape[1]) % 2:
            raise DlmcError(f"quantize.group_size: int4 packing needs an even group size ({name})")

    batches = _at_most(batches() if callable(batches) else batches, program.signature.batch[1])
    if len(batches) == 0 or sum(b[0].shape[0] for b in batches) < Calibration.minimum:
        raise DlmcError(f"quantize.calibration: fewer than {Calibration.minimum} calibration samples")
    flat_state = _flat_state(ep)
    watched = {n: linears[n] for n in chosen}
    options = {"hessian_for": {n for n, s in chosen.items() if s.method == "gptq"},
               "max_rows": config.calibration.max_rows, "seed": config.calibration.seed}
    if config.calibration.sequential:
        layers: dict[str, QuantizedLayer] = {}

        def on_layer(name: str, stats: LayerStats) -> Any:
            w = weight(name)
            if name in experts:
                layers[name] = layer = quantize_experts(name, w, chosen[name], stats)
                stored = expert_buffers(layer, w.dtype)
                return lambda x, weight, offs: run_experts(x, layer, stored, offs)
            layers[name] = layer = quantize_layer(name, w, chosen[name], stats)
            stored = buffers(layer, w.dtype)  # packed once, used for every batch
            return lambda x, weight, bias=None: run_layer(transform_input(x, layer), layer, stored, bias)

        sequential_stats(gm, flat_state, batches, watched, on_layer, **options)
    else:
        stats = collect_stats(gm, flat_state, batches, watched, **options)
        layers = {n: (quantize_experts if n in experts else quantize_layer)(n, weight(n), scheme, stats[n])
                  for n, scheme in chosen.items()}
    added = _rewrite(gm, kinds, state, linears, layers, key)
    gm.graph.lint()
    gm.recompile()
    report = _report(config, layers, batches)
    log.debug("quantize: %d linear layers quantized", len(layers))
    new_inputs = {
        name: InputSpec(kind=InputKind.BUFFER, arg=TensorArgument(name=name), target=key, persistent=True)
        for name, key in added.items()
    }
    return PassResult(rebuild(program, gm, state_dict=state, new_inputs=new_inputs), True), report


def find_linears(
    gm: torch.fx.GraphModule, kinds: dict[str, tuple[str, str | None]], state: dict[str, torch.Tensor]
) -> dict[str, list[torch.fx.Node]]:
    """Layer name ("layers.0.mlp.down_proj") -> the aten.linear nodes whose weight is that parameter."""
    found: dict[str, list[torch.fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.target is not LINEAR or node.args[1].op != "placeholder":
            continue
        kind, key = kinds.get(node.args[1].name, (None, None))
        if kind != "PARAMETER" or not key.endswith(".weight") or node.args[0] is node.args[1]:
            continue
        w = state[key]
        if w.ndim == 2 and w.is_floating_point():
            found.setdefault(key.removesuffix(".weight"), []).append(node)
    return found


def _scheme(name: str, config: Quantize) -> Scheme | None:
    """The layer's scheme: the first matching rule, else the default, which a router never gets."""
    default = None if fnmatch.fnmatchcase(name, ROUTER) else config.scheme
    return scheme_for(name, config.rules, default)


def find_experts(
    gm: torch.fx.GraphModule, kinds: dict[str, tuple[str, str | None]], state: dict[str, torch.Tensor]
) -> tuple[dict[str, list[torch.fx.Node]], list[str], set[str]]:
    """Stacked MoE experts: parameter name -> the grouped_mm nodes reading it (directly, or through a
    transpose(1, 2) when the parameter is stored [E, out, in]: those names are the third result), and the
    names of the experts read otherwise (the tiled form's gathers), which cannot be quantized."""
    found: dict[str, list[torch.fx.Node]] = {}
    tiled, transposed = [], set()
    for node in gm.graph.find_nodes(op="placeholder"):
        kind, key = kinds.get(node.name, (None, None))
        if kind != "PARAMETER" or state[key].ndim != 3 or not state[key].is_floating_point():
            continue
        users = list(node.users)
        views = [u for u in users if u.target is TRANSPOSE and tuple(u.args[1:]) in ((1, 2), (2, 1))]
        if users and len(views) == len(users):  # [E, out, in] read as [E, in, out] views
            users, transposed = [mm for view in views for mm in view.users], transposed | {key}
        if users and all(u.target is GROUPED_MM and u.args[0] is not u.args[1] and _reads(u.args[1], node)
                         for u in users):
            found[key] = users
        elif fnmatch.fnmatchcase(key, EXPERTS) or fnmatch.fnmatchcase(key, GEMMA_EXPERTS):
            tiled.append(key)
            transposed.discard(key)
    return found, tiled, transposed


def _reads(weight: torch.fx.Node, parameter: torch.fx.Node) -> bool:
    """grouped_mm's weight argument is the parameter, or the transpose of it find_experts accepted."""
    return weight is parameter or (weight.target is TRANSPOSE and weight.args[0] is parameter)


def _rewrite(
    gm: torch.fx.GraphModule,
    kinds: dict[str, tuple[str, str | None]],
    state: dict[str, torch.Tensor],
    linears: dict[str, list[torch.fx.Node]],
    layers: dict[str, QuantizedLayer],
    key: dict[str, str],
) -> dict[str, str]:
    graph = gm.graph
    first_input = next(n for n in graph.find_nodes(op="placeholder") if kinds[n.name][0] == "USER_INPUT")
    fake_mode = torch._guards.detect_fake_mode([first_input.meta["val"]])
    shared: dict[str, torch.fx.Node] = {}  # one placeholder per distinct rotation
    added: dict[str, str] = {}  # new placeholder name -> state key

    def placeholder(key: str, value: torch.Tensor) -> torch.fx.Node:
        if key in shared:
            return shared[key]
        state[key] = value.to(device).contiguous()
        with graph.inserting_before(first_input):
            node = graph.placeholder("q_" + key.replace(".", "_"))
        added[node.name] = key
        node.meta["val"] = fake_mode.from_tensor(state[key], static_shapes=True)
        shared[key] = node
        return node

    def call(target: Any, args: tuple[Any, ...], at: torch.fx.Node) -> torch.fx.Node:
        with graph.inserting_before(at):
            node = graph.call_function(target, args)
        node.meta["val"] = fake_value(target, args)
        for key in META_KEYS:
            if key in at.meta:
                node.meta[key] = at.meta[key]
        return node

    for name, layer in layers.items():
        weight_node = linears[name][0].args[1]
        dtype, device = state[key[name]].dtype, state[key[name]].device
        if layer.experts is not None:
            views = list(dict.fromkeys(mm.args[1] for mm in linears[name] if mm.args[1].op != "placeholder"))
            nodes = {suffix: placeholder(f"{name}.{suffix}", value)
                     for suffix, value in expert_buffers(layer, dtype).items()}
            for mm in linears[name]:  # grouped_mm(x, weight, offs)
                if layer.scheme.activations == "per_token":
                    new = call(ops.grouped_w8a8, (mm.args[0], nodes["qweight"], nodes["scale"], mm.args[2]), mm)
                else:
                    new = call(ops.grouped_woq, (mm.args[0], nodes["qweight"], nodes["scale"], nodes.get("zero"),
                                                 mm.args[2], layer.weight.bits), mm)
                mm.replace_all_uses_with(new)
                graph.erase_node(mm)
            for view in views:  # the transposes of an [E, out, in] parameter, now unread
                weight_node = view.args[0]
                graph.erase_node(view)
            graph.erase_node(weight_node)
            del state[key[name]]
            continue
        nodes = {
            suffix: placeholder(
                f"quant.hadamard_{value.shape[0]}_{str(dtype).removeprefix('torch.')}" if suffix.startswith("rotation")
                else f"{name}.{suffix}", value)
            for suffix, value in buffers(layer, dtype).items()
        }
        for linear in linears[name]:
            x, bias = linear.args[0], (linear.args[2] if len(linear.args) > 2 else None)
            if "inv_scale" in nodes:
                x = call(MUL, (x, nodes["inv_scale"]), linear)
            if "rotation_a" in nodes:  # x @ R as dlmc.quant.hadamard.rotate computes it
                a, b = nodes["rotation_a"], nodes["rotation_b"]
                y = call(UNFLATTEN, (x, -1, [-1, a.meta["val"].shape[0], b.meta["val"].shape[0]]), linear)
                y = call(MATMUL, (a, call(LINEAR, (y, b), linear)), linear)
                x = call(FLATTEN, (y, -3, -1), linear)
            if layer.scheme.activations != "none":
                new = call(ops.linear_w8a8, (x, nodes["qweight"], nodes["scale"], bias, nodes.get("act_scale")), linear)
            else:
                new = call(ops.linear_woq, (x, nodes["qweight"], nodes["scale"], nodes.get("zero"), bias,
                                            layer.weight.bits), linear)
            linear.replace_all_uses_with(new)
            graph.erase_node(linear)
        if not weight_node.users:
            graph.erase_node(weight_node)
            del state[key[name]]
    return added


def _at_most(batches: list[tuple[torch.Tensor, ...]], largest: int) -> list[tuple[torch.Tensor, ...]]:
    """The calibration batches cut to the largest batch the step was captured for (a graph captured for
    batch 1 holds that size as a constant): batch_size only groups rows, and the statistics are sums
    and maxima over rows, whatever the grouping."""
    return [tuple(t[i : i + largest] for t in batch) for batch in batches for i in range(0, len(batch[0]), largest)]


def _flat_state(ep: torch.export.ExportedProgram) -> list[Any]:
    """The values of the graph's non-user placeholders, in order."""
    values = []
    for spec in ep.graph_signature.input_specs:
        if spec.kind.name == "USER_INPUT":
            continue
        if spec.kind.name in ("PARAMETER", "BUFFER") and spec.target in ep.state_dict:
            values.append(ep.state_dict[spec.target])
        else:
            values.append(ep.constants[spec.target])
    return values


def _report(
    config: Quantize, layers: dict[str, QuantizedLayer], batches: list[tuple[torch.Tensor, ...]]
) -> dict[str, Any]:
    sqnr = [layer.report["output_sqnr_db"] for layer in layers.values()]
    worst = min(layers, key=lambda n: layers[n].report["output_sqnr_db"])
    return {
        "pass": "quantize",
        "calibration": {
            "source": config.calibration.source,
            "samples": sum(b[0].shape[0] for b in batches),
            "seq_len": int(batches[0][0].shape[1]),
        },
        "summary": {
            "layers": len(layers),
            "expert_layers": sum(layer.experts is not None for layer in layers.values()),
            "schemes": sorted({layer.report["scheme"] for layer in layers.values()}),
            "output_sqnr_db_median": round(statistics.median(sqnr), 2),
            "output_sqnr_db_min": min(sqnr),
            "worst_layer": worst,
        },
        "layers": {name: layer.report for name, layer in layers.items()},
    }
