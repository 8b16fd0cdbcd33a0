"""The graph surgery every caching pass shares: give the step K/V cache inputs and outputs.

This is not a pass itself; `prefix_cache`, `delayed_kv` and `window_pruning` call it and differ only in
the cache policy they record for the runtime. After the rewrite the step is

    (input_ids, attention_mask, position_ids,          # [B, L]: the rows computed this step (queries)
     cache_mask, cache_positions,                      # [B, C]: the cached keys, and which are real
     cache_keys, cache_values)                         # [layers, B, kv_heads, C, head_dim], post-RoPE
      -> (logits [B, L, V], keys, values)              # keys/values: [layers, B, kv_heads, L, head_dim]

Every attention layer attends to [cached K/V ; its own fresh K/V], under a mask built from the spec
(`cached_attention_mask`). Which rows are queries and which keys come from the cache is entirely the
runtime's choice, so the same rewritten graph serves exact prefix reuse and the approximate caches.
With an empty (all masked-out) cache it computes exactly what the captured step computes.
"""

from __future__ import annotations

from typing import Any

import torch

from dlmc.artifact import StepSignature, TensorSpec
from dlmc.capture import STEP_INPUTS, StepProgram
from dlmc.errors import DlmcError
from dlmc.models.transformer import cached_attention_mask
from dlmc.passes import reexport

CACHE_INPUTS = ("cache_mask", "cache_positions", "cache_keys", "cache_values")
CACHE_OUTPUTS = ("keys", "values")
_SDPA = torch.ops.aten.scaled_dot_product_attention.default
_REPEAT_KV = torch.ops.aten.repeat_interleave.self_int


def add_kv_cache(program: StepProgram, policy: dict[str, Any]) -> StepProgram:
    """The step with cache inputs and outputs; `policy` is recorded in its signature for the runtime."""
    sig = program.signature
    if sig.cache is not None:
        raise DlmcError(f"the step already has a K/V cache (policy '{sig.cache['policy']}'); use one caching pass")
    if sig.seq_buckets:
        raise DlmcError("capture.seq_buckets: a cached step needs a dynamic sequence length; remove the buckets")
    if [t.name for t in sig.inputs] != list(STEP_INPUTS):
        raise DlmcError(f"a K/V cache needs the plain step inputs {list(STEP_INPUTS)}, got {[t.name for t in sig.inputs]}")

    # The unlifted module: weights are attributes and the placeholders are exactly the user inputs, so
    # new inputs are plain placeholders. Re-exporting it below gives them symbolic shapes and metadata.
    gm = program.exported.module()
    graph = gm.graph
    attention = [n for n in graph.nodes if n.target is _SDPA]
    if not attention:
        raise DlmcError("found no attention (scaled_dot_product_attention) in the step to cache")
    last_input = list(graph.find_nodes(op="placeholder"))[-1]
    inputs: dict[str, torch.fx.Node] = {n.name: n for n in graph.find_nodes(op="placeholder")}
    with graph.inserting_after(last_input):
        for name in reversed(CACHE_INPUTS):  # inserting_after reverses the order
            inputs[name] = graph.placeholder(name)

    spec = program.spec
    with graph.inserting_before(attention[0]):
        mask = graph.call_function(
            cached_attention_mask,
            (
                spec.attention,
                spec.block_size or 1,
                inputs["attention_mask"],
                inputs["position_ids"],
                inputs["cache_mask"],
                inputs["cache_positions"],
            ),
        )
    fresh: dict[str, list[torch.fx.Node]] = {"keys": [], "values": []}
    for layer, node in enumerate(attention):
        query, key, value, old_mask = node.args[:4]
        node.replace_input_with(old_mask, mask)
        for arg, name, cache in ((key, "keys", "cache_keys"), (value, "values", "cache_values")):
            # Grouped-query attention repeats the kv heads right before attention; cache the unrepeated ones.
            source, consumer = (arg.args[0], arg) if arg.target is _REPEAT_KV else (arg, node)
            with graph.inserting_before(consumer):
                past = graph.call_function(torch.ops.aten.select.int, (inputs[cache], 0, layer))
                both = graph.call_function(torch.ops.aten.cat.default, ([past, source], 2))
            consumer.replace_input_with(source, both)
            for new in (past, both):  # so later passes still find these under layer N's attention
                new.meta["nn_module_stack"] = dict(node.meta.get("nn_module_stack", {}))
            fresh[name].append(source)

    output = graph.output_node()
    (logits,) = output.args[0]
    with graph.inserting_before(output):
        stacked = [graph.call_function(torch.ops.aten.stack.default, (fresh[name], 0)) for name in CACHE_OUTPUTS]
    output.args = ((logits, *stacked),)
    graph._codegen = torch.fx.graph.CodeGen()  # plain positional inputs and a tuple out, no pytree specs
    graph.eliminate_dead_code()
    rewritten = torch.fx.GraphModule(gm, graph)  # a fresh module: drops the input-spec check of the old one

    val = fresh["keys"][0].meta["val"]  # [B, kv_heads, L, head_dim]
    kv_heads, head_dim, dtype = int(val.shape[1]), int(val.shape[3]), val.dtype
    layers = len(attention)
    signature = StepSignature(
        inputs=(
            *sig.inputs,
            TensorSpec("cache_mask", "bool", ("batch", "cache")),
            TensorSpec("cache_positions", "int64", ("batch", "cache")),
            TensorSpec("cache_keys", _name(dtype), (layers, "batch", kv_heads, "cache", head_dim)),
            TensorSpec("cache_values", _name(dtype), (layers, "batch", kv_heads, "cache", head_dim)),
        ),
        outputs=(
            *sig.outputs,
            TensorSpec("keys", _name(dtype), (layers, "batch", kv_heads, "seq", head_dim)),
            TensorSpec("values", _name(dtype), (layers, "batch", kv_heads, "seq", head_dim)),
        ),
        batch=sig.batch,
        seq=sig.seq,
        cache=dict(policy),
        kernels=sig.kernels,
    )
    return program.with_exported(reexport(rewritten, program, signature, "K/V cache"), signature)


def require_bidirectional(program: StepProgram, pass_name: str) -> None:
    """The approximate caches reuse K/V across positions that a causal mask orders by row; they are
    written for (and tested on) the bidirectional families."""
    if program.spec.attention != "bidirectional":
        raise DlmcError(
            f"{pass_name}: supports bidirectional families (LLaDA, Dream), not {program.spec.family} "
            f"({program.spec.attention} attention): use causal_cache, which is exact there"
        )


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
