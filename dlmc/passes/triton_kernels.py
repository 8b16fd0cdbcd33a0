"""triton_kernels: the captured step calls dlmc's Triton kernels (`dlmc.kernels`) for its three hot spots.

    head       the fused decoding head of a `fuse_decode {decoder: llada}` step (temperature 0): the head
               rows' projection and their arg-max / confidence / margin / entropy become one
               `dlmc_kernels.unmask_head` call, so the [B, K, V] logits are never written
    woq        every weight-only quantized linear (`dlmc.linear_woq`, W8A16 / W4A16) becomes
               `dlmc_kernels.linear_woq`, the dequantisation inside the GEMM
    attention  every attention layer of a cached step (over [cache ; fresh] keys, bidirectional models)
               becomes `dlmc_kernels.cached_attention`, reading the cache buffer in place

Each kernel is a torch.library custom op with a fake implementation, so the rewritten step exports and
lowers (AOTInductor keeps each as one extern call). The choice is explicit: the pass runs only on a
CUDA program, and refuses a CPU one in one line unless `cpu_test: true` (tests, debugging), where each
op runs its plain-torch reference, or the kernel in Triton's interpreter under DLMC_TRITON_CPU=1
(`dlmc.kernels.dispatch`). The kernels sum in float32 in their own order, so the pass is approximate:
the same maths up to that rounding. It must be the recipe's last pass (after fuse_decode).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import ClassVar

import torch

from dlmc.capture import StepProgram
from dlmc.errors import DlmcError
from dlmc.kernels import ops as kernel_ops
from dlmc.kernels.dispatch import use_triton
from dlmc.passes import PassConfig, PassResult, reexport, register
from dlmc.passes.kv_cache import _REPEAT_KV, _SDPA
from dlmc.quant import ops as quant_ops

_LINEAR = torch.ops.aten.linear.default
_ASSERT = torch.ops.aten._assert_tensor_metadata.default
_SCALES = (torch.ops.aten.mul.Tensor, torch.ops.aten.div.Tensor, torch.ops.aten.mul.Scalar, torch.ops.aten.div.Scalar)
HEAD_OUTPUTS = ("tokens", "confidence", "confidence64", "entropy", "margin")
"""The fused llada outputs the head kernel computes (top_probs / top_ids need the whole softmax)."""


@dataclass(frozen=True, kw_only=True)
class TritonKernels(PassConfig):
    """Replace the chosen parts of the step by dlmc.kernels' Triton ops (see the module doc)."""

    name: ClassVar[str] = "triton_kernels"
    exact: ClassVar[bool] = False
    head: bool = False
    woq: bool = False
    attention: bool = False
    cpu_test: bool = False
    """Accept a program that is not on CUDA (tests, debugging): its kernel ops then run the reference, or
    Triton's interpreter under DLMC_TRITON_CPU=1 and TRITON_INTERPRET=1."""

    def __post_init__(self) -> None:
        if not (self.head or self.woq or self.attention):
            raise DlmcError("triton_kernels: choose at least one of head, woq, attention (each false by default)")

    def device_problem(self, device: str) -> str | None:
        """The one line refusing this pass on `device`, or None."""
        if torch.device(device).type == "cuda" or self.cpu_test:
            return None
        return (f"passes: triton_kernels runs dlmc's Triton kernels on CUDA, not on '{device}' (compile with "
                "--device cuda, or drop the pass; cpu_test: true is for tests)")


@register(TritonKernels)
def triton_kernels(program: StepProgram, config: TritonKernels) -> PassResult:
    device = next(iter(program.exported.state_dict.values())).device
    problem = config.device_problem(str(device))
    if problem:
        raise DlmcError(problem)
    use_triton(device)  # on CUDA: one line if triton is missing; never the reference there
    assert kernel_ops.REGISTERED and quant_ops.linear_woq  # the ops the graph will name are registered
    sig = program.signature
    gm = program.exported.module()  # unlifted: weights are attributes, placeholders the step's inputs
    graph = gm.graph
    inputs = dict(zip(sig.names, graph.find_nodes(op="placeholder"), strict=True))
    if config.woq:
        _swap_woq(graph)
    if config.attention:
        _swap_attention(graph, program, inputs)
    if config.head:
        _swap_head(graph, program)
    graph._codegen = torch.fx.graph.CodeGen()  # positional inputs, a tuple out
    _eliminate_dead_code(graph)
    module = torch.fx.GraphModule(gm, graph)
    return PassResult(program.with_exported(reexport(module, program, sig, "triton_kernels"), sig), True)


def _eliminate_dead_code(graph: torch.fx.Graph) -> None:
    """Dead code elimination that also drops the dtype asserts of replaced values: export's
    `_assert_tensor_metadata` counts as impure, so it alone would keep the replaced head alive."""
    while True:
        graph.eliminate_dead_code()
        orphans = [n for n in graph.find_nodes(op="call_function", target=_ASSERT) if len(n.args[0].users) == 1]
        if not orphans:
            return
        for node in orphans:
            graph.erase_node(node)


def _swap_woq(graph: torch.fx.Graph) -> None:
    nodes = [n for n in graph.nodes if n.target is quant_ops.linear_woq]
    if not nodes:
        raise DlmcError("triton_kernels.woq: the step has no weight-only quantized linear (quantize with an int8 "
                        "or int4 weight scheme first, or set woq: false)")
    for node in nodes:  # the same schema and layouts: only the implementation changes
        node.target = torch.ops.dlmc_kernels.linear_woq.default


def _key_mask(cache_mask: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    # [B, C] and [B, L] -> [B, C + L] bool: which keys of [cache ; fresh] are real
    return torch.cat([cache_mask, attention_mask], dim=1).bool()


def _swap_attention(graph: torch.fx.Graph, program: StepProgram, inputs: dict[str, torch.fx.Node]) -> None:
    if program.signature.cache is None:
        raise DlmcError("triton_kernels.attention: the step has no K/V cache (the kernel attends over [cache ; "
                        "fresh]); add a caching pass before it or set attention: false")
    if program.spec.attention != "bidirectional":
        raise DlmcError(f"triton_kernels.attention: the kernel applies the bidirectional cache mask, not "
                        f"{program.spec.attention} attention; set attention: false")
    layers = [n for n in graph.nodes if n.target is _SDPA]
    with graph.inserting_before(layers[0]):
        key_mask = graph.call_function(_key_mask, (inputs["cache_mask"], inputs["attention_mask"]))
    for node in layers:
        extra = {k: v for k, v in node.kwargs.items() if v not in (None, 0.0, False)}
        if len(node.args) > 4 or extra:
            raise DlmcError(f"triton_kernels.attention: {node.name} has settings the kernel does not take ({extra})")
        query, key, value = node.args[:3]
        (cache_key, fresh_key), (cache_value, fresh_value) = _cache_and_fresh(key), _cache_and_fresh(value)
        with graph.inserting_before(node):
            out = graph.call_function(torch.ops.dlmc_kernels.cached_attention.default,
                                      (query, fresh_key, fresh_value, cache_key, cache_value, key_mask))
        out.meta["nn_module_stack"] = dict(node.meta.get("nn_module_stack", {}))
        node.replace_all_uses_with(out)
        graph.erase_node(node)  # SDPA's dropout makes fx count it impure: dead code elimination keeps it


def _cache_and_fresh(arg: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node]:
    """(the layer's cache view, its fresh K or V) of an attention input: [cache ; fresh], maybe repeated."""
    both = arg.args[0] if arg.target is _REPEAT_KV else arg  # the kernel repeats kv heads itself
    if both.target is not torch.ops.aten.cat.default or len(both.args[0]) != 2 or both.args[1] not in (2, -2):
        raise DlmcError(f"triton_kernels.attention: {arg.name} is not the K/V cache pass's [cache ; fresh]")
    return tuple(both.args[0])


def unmask_head_rows(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """dlmc_kernels.unmask_head over [B, K, d] head rows: tokens, confidence, margin, entropy [B, K]."""
    B, K, d = hidden.shape
    out = torch.ops.dlmc_kernels.unmask_head(hidden.reshape(B * K, d), weight, bias)  # 4 x [B * K]
    return tuple(t.reshape(B, K) for t in out)


def _swap_head(graph: torch.fx.Graph, program: StepProgram) -> None:
    sig = program.signature
    names = [t.name for t in sig.outputs]
    if sig.fused_decoder != "llada":
        raise DlmcError(f"triton_kernels.head: the kernel computes the llada rule of fuse_decode, not "
                        f"{sig.fused_decoder or 'an unfused step'}; set head: false")
    if "uniform" in sig.names:
        raise DlmcError("triton_kernels.head: the kernel decodes at temperature 0 (arg-max); fuse_decode "
                        "{gumbel: true} needs the logits, set head: false")
    unsupported = [n for n in names if n in ("top_probs", "top_ids")]
    if unsupported:
        raise DlmcError(f"triton_kernels.head: the kernel does not return {unsupported[0]}; set head: false")
    heads = [n for n in graph.nodes if n.target in (_LINEAR, quant_ops.linear_woq, quant_ops.linear_w8a8,
                                                      torch.ops.dlmc_kernels.linear_woq.default)]
    head = heads[-1]  # the output head: the step's last projection, on the gathered head rows
    if head.target is not _LINEAR or head.args[1].op != "get_attr":
        raise DlmcError("triton_kernels.head: the output head is quantized; keep it in float (a quantize rule "
                        "{match: lm_head, scheme: null}) or set head: false")
    if any(user.target in _SCALES for user in head.users):
        raise DlmcError("triton_kernels.head: the logits are scaled after the head; the kernel has no scale")
    output = graph.output_node()
    returned = list(output.args[0])
    bias = head.args[2] if len(head.args) > 2 else None
    with graph.inserting_before(output):
        fused = graph.call_function(unmask_head_rows, (head.args[0], head.args[1], bias))
        kernel = {name: graph.call_function(operator.getitem, (fused, i))
                  for i, name in enumerate(("tokens", "confidence", "margin", "entropy"))}
        kernel["confidence64"] = kernel["confidence"]
        for i, name in enumerate(names):
            if name in HEAD_OUTPUTS:  # in the dtype the signature promises (the kernel's are float32)
                dtype = getattr(torch, sig.outputs[i].dtype)
                returned[i] = graph.call_function(torch.Tensor.to, (kernel[name], dtype))
    output.args = (tuple(returned),)
