"""cpu_attention: every bf16 attention of the step runs dlmc's CPU kernel (`torch.ops.dlmc_cpu.attention`,
`dlmc/kernels/cpu_attention.py`) instead of ATen's CPU flash attention.

On CPUs without AMX, ATen's kernel does its bf16 products outside oneDNN's GEMM, at a fraction of the
machine's bf16 rate: at 512 x 512 attention is a third of a bf16 step (docs/benchmarks.md). dlmc's kernel
runs them on the AVX512-BF16 dot-product unit, with the same roundings (fp32 scores and softmax, the
probabilities rounded to bf16 for P.V, the output once to bf16): only the order of fp32 sums differs, as
between any two GEMM kernels, so the pass is exact in the sense the bf16 recipes are (tested against SDPA
within bf16's rounding). Each attention keeps its inputs (cached steps attend over [cache ; fresh] as
before) and stays one node through export and AOTInductor.

The kernel needs AVX512-BF16 on the CPU that compiles and runs the step. Where the compiling CPU lacks it,
`fallback: refuse` (the default) refuses in one line; `fallback: sdpa` keeps ATen's attention and the
compile says so (the generic recipes use it, so they compile everywhere). The step records the kernel in
its signature (`kernels`), and the runtime loads it before the step, with one line on a CPU that cannot.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from dlmc.capture import StepProgram
from dlmc.errors import DlmcError
from dlmc.kernels import cpu_attention as kernel
from dlmc.passes import PassConfig, PassResult, reexport, register
from dlmc.passes.kv_cache import _SDPA

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class CpuAttention(PassConfig):
    """Run the step's bf16 attention with dlmc's AVX512-BF16 kernel (see the module doc)."""

    name: ClassVar[str] = "cpu_attention"
    exact: ClassVar[bool] = True
    fallback: Literal["refuse", "sdpa"] = "refuse"
    """On a compiling CPU without AVX512-BF16: refuse in one line, or keep ATen's attention."""


@register(CpuAttention)
def cpu_attention(program: StepProgram, config: CpuAttention) -> PassResult:
    device = next(iter(program.exported.state_dict.values())).device
    if device.type != "cpu":
        raise DlmcError(f"cpu_attention: the kernel runs on the CPU, not on '{device}' (drop the pass)")
    missing = kernel.missing_cpu_flags()
    if missing:
        if config.fallback == "sdpa":
            log.warning("cpu_attention: this CPU lacks %s; the step keeps ATen's attention (fallback: sdpa)",
                        ", ".join(missing))
            return PassResult(program, False)
        raise DlmcError(f"cpu_attention: this CPU lacks {', '.join(missing)}, which the kernel needs "
                        "(set fallback: sdpa to keep ATen's attention here)")
    kernel.load()
    sig = program.signature
    gm = program.exported.module()  # unlifted: weights are attributes, placeholders the step's inputs
    graph = gm.graph
    layers = list(graph.find_nodes(op="call_function", target=_SDPA))
    if not layers:
        raise DlmcError("cpu_attention: found no attention (scaled_dot_product_attention) in the step")
    for node in layers:
        query, key, value, mask, scale = _arguments(node)
        with graph.inserting_before(node):
            out = graph.call_function(kernel.attention, (query, key, value, mask, scale))
        out.meta["nn_module_stack"] = dict(node.meta.get("nn_module_stack", {}))
        node.replace_all_uses_with(out)
        graph.erase_node(node)  # SDPA's dropout makes fx count it impure: dead code elimination keeps it
    graph._codegen = torch.fx.graph.CodeGen()  # positional inputs, a tuple out
    graph.eliminate_dead_code()
    module = torch.fx.GraphModule(gm, graph)
    signature = dataclasses.replace(sig, kernels=tuple(dict.fromkeys((*sig.kernels, kernel.NAME))))
    return PassResult(program.with_exported(reexport(module, program, signature, config.name), signature), True)


def _arguments(node: torch.fx.Node) -> tuple:
    """(query, key, value, mask, scale) of an SDPA call, or one line naming what the kernel cannot take."""
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    given = {**dict(zip(names, node.args)), **node.kwargs}
    query, key, value, mask = given["query"], given["key"], given["value"], given.get("attn_mask")
    if given.get("dropout_p", 0.0) or given.get("is_causal", False):
        raise DlmcError(f"cpu_attention: {node.name} uses dropout or is_causal, which the kernel does not take")
    dtypes = {t.meta["val"].dtype for t in (query, key, value)}
    if dtypes != {torch.bfloat16}:
        raise DlmcError(f"cpu_attention: {node.name} runs in {', '.join(map(str, dtypes))}; the kernel is for "
                        "bfloat16 steps (capture.dtype: bfloat16)")
    if mask is not None and mask.meta["val"].dtype != torch.bool:
        raise DlmcError(f"cpu_attention: {node.name}'s mask is {mask.meta['val'].dtype}; the kernel takes a bool mask")
    scale = given.get("scale")
    return query, key, value, mask, float(query.meta["val"].shape[-1] ** -0.5 if scale is None else scale)
