"""fuse_decode: the per-row math of LLaDA-style decoding fused onto the step (exact).

A reference decoder reads the [B, L, V] logits of the whole canvas every step and reduces them in
Python: an arg-max and a softmax over the full vocabulary of every row, though only the rows of the
current block can be committed. After this pass the step takes `head_rows` [B, K], the canvas rows
(of the rows it computes) that can be committed this step, runs the output head on those rows only,
and returns what the decoder reads from them:

    tokens [B, K] int64         arg-max of the logits, or of float64 Gumbel-perturbed scores
    confidence [B, K]           softmax(logits)[token] in the logits dtype (LLaDA's low_confidence)
    confidence64 [B, K] float64 the same in float64 (Fast-dLLM's threshold and factor rules)

followed by the step's other outputs (the K/V of a cached step). With `gumbel: true` it also takes
`uniform` [B, K, V] float64 and `temperature` [1] float64: the runtime draws the uniforms from the
reference decoder's per-row generators, so sampling stays token-identical to it at any temperature.
The choice of which tokens to commit (a top-k schedule, a threshold, a factor) reads only [B, K]
tensors and stays in the runtime loop (`dlmc.runtime.loop`). It must be the recipe's last pass.

`decoder: block` fuses the block decoders' sampler instead (Fast-dLLM v2, SDAR: `dlmc.passes.block_pick`,
run by `dlmc.runtime.block_loop`); its `gumbel: true` takes exponential noise, temperature, top_k and top_p.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import ClassVar

import torch

from dlmc.artifact import StepSignature, TensorSpec
from dlmc.capture import StepProgram
from dlmc.errors import DlmcError
from dlmc.passes import PassConfig, PassResult, reexport, register
from dlmc.passes.block_pick import pick_block, sampling_inputs


@dataclass(frozen=True, kw_only=True)
class FuseDecode(PassConfig):
    """Apply the output head to the committable rows only and reduce them inside the step."""

    name: ClassVar[str] = "fuse_decode"
    exact: ClassVar[bool] = True
    gumbel: bool = False
    """Take Gumbel-max uniforms and a temperature (sampling at temperature > 0); without it the
    artifact decodes at temperature 0 only."""
    decoder: str = "llada"
    """Whose per-row rule the step computes: "llada" (LLaDA's sampler, Fast-dLLM v1's rules) or "block"
    (Fast-dLLM v2's and SDAR's samplers, for block-causal models)."""

    def __post_init__(self) -> None:
        if self.decoder not in FUSED_DECODERS:
            raise DlmcError(f"decoder={self.decoder!r} is not one of {', '.join(FUSED_DECODERS)}")


FUSED_DECODERS = ("llada", "block")


def gather_rows(hidden: torch.Tensor, head_rows: torch.Tensor) -> torch.Tensor:
    # hidden: [B, L, d]; head_rows: [B, K] int64 -> [B, K, d]
    index = head_rows.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
    return torch.gather(hidden, 1, index)


def pick_tokens(
    logits: torch.Tensor, uniform: torch.Tensor | None = None, temperature: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reference decoders' per-row math (`gumbel_max_logits`, `token_probability`) on [B, K, V]."""
    if uniform is None:
        tokens = logits.argmax(-1)  # [B, K]
    else:
        logits64 = logits.to(torch.float64)  # [B, K, V]
        noisy = logits64.exp() / (-torch.log(uniform)) ** temperature
        tokens = torch.where(temperature > 0, noisy, logits64).argmax(-1)  # [B, K]
    index = tokens.unsqueeze(-1)  # [B, K, 1]
    confidence = torch.softmax(logits, dim=-1).gather(-1, index).squeeze(-1)  # [B, K] logits dtype
    confidence64 = torch.softmax(logits.to(torch.float64), dim=-1).gather(-1, index).squeeze(-1)  # [B, K]
    return tokens, confidence, confidence64


@register(FuseDecode)
def fuse_decode(program: StepProgram, config: FuseDecode) -> PassResult:
    sig = program.signature
    if sig.fused:
        raise DlmcError("fuse_decode: the step is already fused; use the pass once")
    if sig.seq_buckets:
        raise DlmcError("fuse_decode: needs a dynamic sequence length; remove capture.seq_buckets")
    if config.decoder == "block" and program.spec.attention != "block_causal":
        raise DlmcError(
            f"fuse_decode.decoder: block needs a block-causal model, not {program.spec.attention} attention"
        )
    vocab = sig.outputs[0].shape[-1]
    logits_dtype = sig.outputs[0].dtype
    if config.decoder == "block":
        pick, sampling = pick_block, sampling_inputs(vocab, logits_dtype)
    else:
        pick = pick_tokens
        uniform = TensorSpec("uniform", "float64", ("batch", "rows", vocab))
        sampling = [uniform, TensorSpec("temperature", "float64", (1,))]
    sampling = sampling if config.gumbel else []
    gm = program.exported.module()  # unlifted: new inputs are plain placeholders
    graph = gm.graph
    final_norm = [n for n in graph.nodes if _module_path(n) == "norm"]
    if not final_norm:
        raise DlmcError("fuse_decode: found no final norm (module 'norm') in front of the output head")
    hidden = final_norm[-1]
    placeholders = list(graph.find_nodes(op="placeholder"))
    new_names = ("head_rows", *(t.name for t in sampling))
    with graph.inserting_after(placeholders[-1]):
        new = {name: graph.placeholder(name) for name in reversed(new_names)}  # inserting_after reverses
    with graph.inserting_after(hidden):
        rows = graph.call_function(gather_rows, (hidden, new["head_rows"]))
    hidden.replace_all_uses_with(rows, delete_user_cb=lambda user: user is not rows)

    output = graph.output_node()
    logits, *rest = output.args[0]
    extra = tuple(new[t.name] for t in sampling)
    with graph.inserting_before(output):
        picked = graph.call_function(pick, (logits, *extra))
        outs = [graph.call_function(operator.getitem, (picked, i)) for i in range(3)]
    output.args = ((*outs, *rest),)
    graph._codegen = torch.fx.graph.CodeGen()  # positional inputs, a tuple out
    graph.eliminate_dead_code()
    module = torch.fx.GraphModule(gm, graph)

    inputs = [*sig.inputs, TensorSpec("head_rows", "int64", ("batch", "rows")), *sampling]
    outputs = [
        TensorSpec("tokens", "int64", ("batch", "rows")),
        TensorSpec("confidence", logits_dtype, ("batch", "rows")),
        TensorSpec("confidence64", "float64", ("batch", "rows")),
        *sig.outputs[1:],
    ]
    signature = StepSignature(
        inputs=tuple(inputs), outputs=tuple(outputs), batch=sig.batch, seq=sig.seq, cache=sig.cache,
        decoder=config.decoder,
    )
    return PassResult(program.with_exported(reexport(module, program, signature, "fuse_decode"), signature), True)


def _module_path(node: torch.fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    return list(stack.values())[-1][0] if stack else None
