"""fuse_decode: the per-row math of a reference decoder fused onto the step (exact).

A reference decoder reads the [B, L, V] logits of the whole canvas every step and reduces them in
Python, though only some rows can be committed. After this pass the step takes `head_rows` [B, K],
the canvas rows (of the rows it computes) that can be committed this step, runs the output head on
those rows only, and returns what the decoder reads from them. Which decoder's math is fused is the
pass's `decoder` (a closed registry, `RULES`; `auto` takes the model's own sampler):

llada (LLaDA, Fast-dLLM v1; the rows of the current block):
    tokens [B, K] int64         arg-max of the logits, or of float64 Gumbel-perturbed scores
    confidence [B, K]           softmax(logits)[token] in the logits dtype (LLaDA's low_confidence)
    confidence64 [B, K] float64 the same in float64 (Fast-dLLM's threshold and factor rules)
  With `gumbel: true` it also takes `uniform` [B, K, V] float64 and `temperature` [1] float64.
  With `outputs: [entropy, margin]` (either or both, in that order) it also returns what decoding
  strategies (`dlmc.strategies`) read: entropy [B, K] float64 (-sum p log p; EB-sampler), margin
  [B, K] in the logits dtype (top-1 minus top-2 logit; Prophet, SchED), and top_probs [B, K, TOP]
  float64 / top_ids [B, K, TOP] int64 (each position's TOP = 8 most likely tokens; credit, KLASS).

dream (Dream's `_sample_tokens`, every alg; the masked rows of the generation region):
    tokens [B, K] int64         arg-max of the filtered softmax, or a sample from it
    probability, margin, neg_entropy [B, K] in the logits dtype: the token's probability, top1 - top2
                                and sum p log(p + 1e-10), the scores of the algs
  With `gumbel: true` it also takes `exponential` [B, K, V] (logits dtype) and `temperature` [1]
  float64: torch.multinomial draws one sample as argmax(p / q), q ~ Exp(1) drawn with
  `exponential_` into p's shape, so the runtime draws q from the reference's generators. With
  `filters: true` it takes `top_p` [1] float64 and `top_k` [1] int64 (a sort of every head row).

block (Fast-dLLM v2's and SDAR's samplers, block-causal models; the open block's rows):
    tokens, confidence, confidence64 as llada's: the token drawn (or the arg-max) and its probability
  With `gumbel: true` it also takes `noise` [B, K, V] (Exp(1), logits dtype), `temperature`, `top_k`
  and `top_p` (`dlmc.passes.block_pick`).

wedlm (WeDLM's window fill rule, causal models; the window's masks):
    tokens [B, K] int64         arg-max of softmax(logits), or a draw after top-k / top-p / temperature
    fill [B, K] bool            the masks to fill: adjusted entropy below the threshold, else the lowest
    entropy [B, K]              the unfiltered distribution's entropy (logits dtype)
  It takes `slots` [B, K] (each mask's position), `pos_penalty` and `entropy_threshold` [1] float64,
  and with `gumbel: true` the block rule's four sampling inputs (`dlmc.passes.wedlm_pick`).

llada2 (LLaDA2.0's `llada2` and LLaDA2.1's `llada2_edit`; block-causal, the open block's rows):
    tokens, confidence [B, K]   the block sampler's draw and its probability (the arg-max of the
                                probabilities at T = 0, 2.0's greedy token)
    argmax, argmax_confidence   the arg-max of the logits and its probability (2.1's greedy token)
  With `gumbel: true` it takes block's sampling inputs.

Then the step's other outputs (the K/V of a cached step). The runtime draws the random inputs from the
reference decoder's per-row generators, so sampling stays token-identical at any temperature. The
choice of which tokens to commit reads only [B, K] tensors and stays in the runtime loop
(`dlmc.runtime.loop`, `dlmc.runtime.dream_loop`, `dlmc.runtime.block_loop`, `dlmc.runtime.wedlm_loop`,
`dlmc.runtime.llada2_loop`). It must be the recipe's last pass. The step's signature records the decoder,
so the runtime knows which loop drives it.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from dlmc.artifact import FUSED_OUTPUTS, StepSignature, TensorSpec
from dlmc.capture import StepProgram
from dlmc.decoding import default_decoder
from dlmc.errors import DlmcError
from dlmc.passes import PassConfig, PassResult, reexport, register
from dlmc.passes.block_pick import pick_block, pick_llada2, sampling_inputs
from dlmc.passes.wedlm_pick import pick_wedlm, rule_inputs
from dlmc.runtime.fused_step import CACHED_STEPS
from dlmc.strategies.base import EXTRA_OUTPUTS, TOP, entropy, logit_margin, top_ids, top_probs


@dataclass(frozen=True, kw_only=True)
class FuseDecode(PassConfig):
    """Apply the output head to the committable rows only and reduce them inside the step."""

    name: ClassVar[str] = "fuse_decode"
    exact: ClassVar[bool] = True
    decoder: str = "llada"
    """Whose per-row rule: a name in RULES, or "auto" for the model's own sampler (resolved at compile
    time from the spec, so one recipe serves LLaDA and Dream checkpoints)."""
    gumbel: bool = False
    """Take the random draws and a temperature (sampling at temperature > 0); without it the
    artifact decodes at temperature 0 only."""
    filters: bool = False
    """dream only: take top_p and top_k (a sort of every head row's vocabulary each step)."""
    outputs: tuple[str, ...] = ()
    """llada only: per-row values a decoding strategy reads, from EXTRA_OUTPUTS (entropy, margin, top_probs,
    top_ids)."""

    def __post_init__(self) -> None:
        if self.decoder not in ("auto", *RULES):
            raise DlmcError(f"fuse_decode.decoder: unknown decoder '{self.decoder}' (known: auto, {', '.join(RULES)})")
        if self.filters and self.decoder != "dream":
            raise DlmcError("fuse_decode.filters: only the dream rule takes them as an option (llada has no "
                            "top_p / top_k; block's gumbel: true includes them)")
        unknown = [name for name in self.outputs if name not in EXTRA_OUTPUTS]
        if unknown:
            raise DlmcError(f"fuse_decode.outputs: unknown output '{unknown[0]}' (known: {', '.join(EXTRA_OUTPUTS)})")
        if self.outputs and self.decoder != "llada":
            raise DlmcError(f"fuse_decode.outputs: only the llada rule takes extra outputs (strategies), not "
                            f"{self.decoder}")
        # one order, whatever the recipe's, so the step's outputs say what they are
        object.__setattr__(self, "outputs", tuple(n for n in EXTRA_OUTPUTS if n in self.outputs))

    def resolved(self, spec) -> FuseDecode:
        """This config with `auto` replaced by the model's own sampler."""
        if self.decoder != "auto":
            return self
        decoder = default_decoder(spec)
        if decoder not in RULES:
            raise DlmcError(f"fuse_decode.decoder: auto picks this model's sampler, {decoder}, which has no fused rule "
                            f"(known: {', '.join(RULES)})")
        return replace(self, decoder=decoder)


def gather_rows(hidden: torch.Tensor, head_rows: torch.Tensor) -> torch.Tensor:
    # hidden: [B, L, d]; head_rows: [B, K] int64 -> [B, K, d]
    index = head_rows.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
    return torch.gather(hidden, 1, index)


def pick_tokens(
    logits: torch.Tensor,
    uniform: torch.Tensor | None = None,
    temperature: torch.Tensor | None = None,
    outputs: tuple[str, ...] = (),
) -> tuple[torch.Tensor, ...]:
    """The reference decoders' per-row math (`gumbel_max_logits`, `token_probability`) on [B, K, V]:
    tokens, confidence, confidence64, then the `outputs` a strategy reads."""
    if uniform is None:
        tokens = logits.argmax(-1)  # [B, K]
    else:
        logits64 = logits.to(torch.float64)  # [B, K, V]
        noisy = logits64.exp() / (-torch.log(uniform)) ** temperature
        tokens = torch.where(temperature > 0, noisy, logits64).argmax(-1)  # [B, K]
    index = tokens.unsqueeze(-1)  # [B, K, 1]
    confidence = torch.softmax(logits, dim=-1).gather(-1, index).squeeze(-1)  # [B, K] logits dtype
    confidence64 = torch.softmax(logits.to(torch.float64), dim=-1).gather(-1, index).squeeze(-1)  # [B, K]
    extra = {"entropy": entropy, "margin": logit_margin, "top_probs": top_probs, "top_ids": top_ids}
    return (tokens, confidence, confidence64, *(extra[name](logits) for name in outputs))  # [B, K] each


def pick_dream(
    logits: torch.Tensor,
    exponential: torch.Tensor | None = None,
    temperature: torch.Tensor | None = None,
    top_p: torch.Tensor | None = None,
    top_k: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dream's `_sample_tokens` on [B, K, V]: (tokens, probability, margin, neg_entropy) [B, K].

    The runtime turns a filter off with top_p = inf and a top_k beyond the vocabulary, and greedy
    decoding with temperature 0 (then `exponential` is unused)."""
    dtype = logits.dtype
    if temperature is not None:
        # the reference divides by a Python float: computed in the op-math type, the scalar rounded to it
        opmath = torch.float64 if dtype == torch.float64 else torch.float32
        tempered = (logits.to(opmath) / temperature.to(opmath)).to(dtype)  # [B, K, V]
        logits = torch.where(temperature > 0, tempered, logits)
    fill = torch.finfo(dtype).min
    if top_p is not None:
        ranked, order = torch.sort(logits, dim=-1, descending=True)  # [B, K, V] each
        cumulative = torch.softmax(ranked, dim=-1).cumsum(dim=-1)  # [B, K, V]
        beyond = cumulative > top_p.to(dtype)  # the reference compares with the scalar in the tensor's dtype
        # shifted right: the token that crosses p stays, and the best always stays
        drop = torch.cat([torch.zeros_like(beyond[..., :1]), beyond[..., :-1]], dim=-1)  # [B, K, V] sorted
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), fill)
    if top_k is not None:
        ranked = torch.sort(logits, dim=-1, descending=True).values  # [B, K, V]
        kth = torch.clamp(top_k - 1, max=logits.shape[-1] - 1)  # [1]: min(k, V) - 1, as the reference
        index = kth.reshape(1, 1, 1).expand(*logits.shape[:-1], 1)  # [B, K, 1]
        logits = logits.masked_fill(logits < ranked.gather(-1, index), fill)  # ties with the k-th stay
    probs = torch.softmax(logits, dim=-1)  # [B, K, V] logits dtype
    tokens = probs.argmax(-1)  # [B, K]
    if exponential is not None:
        normalized = probs / probs.sum(-1, keepdim=True)  # as sample_categorical renormalises
        sampled = (normalized / exponential).argmax(-1)  # [B, K]: torch.multinomial's one-sample draw
        tokens = torch.where(temperature > 0, sampled, tokens)
    probability = probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # [B, K]
    top2 = probs.topk(2, dim=-1).values  # [B, K, 2]
    terms = probs * torch.log(probs + 1e-10)  # [B, K, V]
    # a filtered-out token (p = 0) adds -0.0 in the reference; ONNX Runtime gave NaN there: add 0 instead
    neg_entropy = torch.where(probs > 0, terms, 0.0).sum(dim=-1)  # [B, K]
    return tokens, probability, top2[..., 0] - top2[..., 1], neg_entropy


def _llada_inputs(config: FuseDecode, vocab: int, dtype: str) -> list[TensorSpec]:
    if not config.gumbel:
        return []
    return [TensorSpec("uniform", "float64", ("batch", "rows", vocab)), TensorSpec("temperature", "float64", (1,))]


def _block_inputs(config: FuseDecode, vocab: int, dtype: str) -> list[TensorSpec]:
    return sampling_inputs(vocab, dtype) if config.gumbel else []


def _wedlm_inputs(config: FuseDecode, vocab: int, dtype: str) -> list[TensorSpec]:
    return rule_inputs(vocab, dtype, config.gumbel)


def _dream_inputs(config: FuseDecode, vocab: int, dtype: str) -> list[TensorSpec]:
    inputs = []
    if config.gumbel:
        inputs += [TensorSpec("exponential", dtype, ("batch", "rows", vocab)),
                   TensorSpec("temperature", "float64", (1,))]
    if config.filters:
        inputs += [TensorSpec("top_p", "float64", (1,)), TensorSpec("top_k", "int64", (1,))]
    return inputs


@dataclass(frozen=True)
class Rule:
    """One decoder's per-row math: the step inputs it adds after head_rows (from the config, the vocab
    size and the logits dtype), the function computing its outputs (FUSED_OUTPUTS[decoder]) from the
    head rows' logits and those inputs, and which of its outputs are float64 or bool (the rest after
    the tokens are in the logits dtype)."""

    inputs: Callable[[FuseDecode, int, str], list[TensorSpec]]
    pick: Callable[..., tuple[torch.Tensor, ...]]
    float64: tuple[str, ...] = ()
    boolean: tuple[str, ...] = ()
    """Outputs that are flags."""
    int64: tuple[str, ...] = ()
    """Outputs after the tokens that are token ids too."""
    caches: tuple[str, ...] = ()
    """The cache policies its runtime loop drives (uncached always)."""
    also: tuple[str, ...] = ()
    """Reference decoders its loop runs besides the one it is named after."""


RULES: dict[str, Rule] = {
    "llada": Rule(_llada_inputs, pick_tokens, float64=("confidence64", "entropy", "top_probs"),
                  caches=tuple(CACHED_STEPS)),
    "dream": Rule(_dream_inputs, pick_dream),
    "block": Rule(_block_inputs, pick_block, float64=("confidence64",), caches=("exact",)),
    "wedlm": Rule(_wedlm_inputs, pick_wedlm, boolean=("fill",), caches=("exact",)),
    "llada2": Rule(_block_inputs, pick_llada2, int64=("argmax",), caches=("exact",), also=("llada2_edit",)),
}
"""Closed registry: decoder name -> its fused rule."""


@register(FuseDecode)
def fuse_decode(program: StepProgram, config: FuseDecode) -> PassResult:
    sig = program.signature
    config = config.resolved(program.spec)
    rule = RULES[config.decoder]
    if sig.fused:
        raise DlmcError("fuse_decode: the step is already fused; use the pass once")
    if sig.seq_buckets:
        raise DlmcError("fuse_decode: needs a dynamic sequence length; remove capture.seq_buckets")
    if sig.cache is not None and sig.cache["policy"] not in rule.caches:
        runs = " or ".join(("uncached", *rule.caches))
        raise DlmcError(f"fuse_decode.decoder: the {config.decoder} rule's loop runs {runs}, not under a "
                        f"{sig.cache['policy']} cache")
    if config.decoder in ("block", "llada2") and program.spec.attention != "block_causal":
        raise DlmcError(f"fuse_decode.decoder: {config.decoder} needs a block-causal model, not "
                        f"{program.spec.attention} attention")
    if config.decoder == "wedlm" and (program.spec.attention != "causal" or program.spec.shift_logits):
        raise DlmcError("fuse_decode.decoder: wedlm needs a causal model with same-position logits, not "
                        f"{program.spec.attention} attention{' with shifted logits' * program.spec.shift_logits}")
    gm = program.exported.module()  # unlifted: new inputs are plain placeholders
    graph = gm.graph
    final_norm = [n for n in graph.nodes if _module_path(n) == "norm"]
    if not final_norm:
        raise DlmcError("fuse_decode: found no final norm (module 'norm') in front of the output head")
    hidden = final_norm[-1]
    vocab = sig.outputs[0].shape[-1]
    logits_dtype = sig.outputs[0].dtype
    extra = rule.inputs(config, vocab, logits_dtype)
    new_names = ("head_rows", *(t.name for t in extra))
    placeholders = list(graph.find_nodes(op="placeholder"))
    with graph.inserting_after(placeholders[-1]):
        new = {name: graph.placeholder(name) for name in reversed(new_names)}  # inserting_after reverses
    with graph.inserting_after(hidden):
        rows = graph.call_function(gather_rows, (hidden, new["head_rows"]))
    hidden.replace_all_uses_with(rows, delete_user_cb=lambda user: user is not rows)

    output = graph.output_node()
    logits, *rest = output.args[0]
    names = (*FUSED_OUTPUTS[config.decoder], *config.outputs)
    kwargs = {t.name: new[t.name] for t in extra} | ({"outputs": config.outputs} if config.outputs else {})
    with graph.inserting_before(output):
        picked = graph.call_function(rule.pick, (logits,), kwargs)
        outs = [graph.call_function(operator.getitem, (picked, i)) for i in range(len(names))]
    output.args = ((*outs, *rest),)
    graph._codegen = torch.fx.graph.CodeGen()  # positional inputs, a tuple out
    graph.eliminate_dead_code()
    module = torch.fx.GraphModule(gm, graph)

    inputs = [*sig.inputs, TensorSpec("head_rows", "int64", ("batch", "rows")), *extra]
    outputs = [TensorSpec(names[0], "int64", ("batch", "rows"))]
    outputs += [_output_spec(n, rule, logits_dtype, vocab) for n in names[1:]]
    signature = StepSignature(
        inputs=tuple(inputs), outputs=(*outputs, *sig.outputs[1:]), batch=sig.batch, seq=sig.seq, cache=sig.cache,
        decoder=config.decoder, kernels=sig.kernels,
    )
    return PassResult(program.with_exported(reexport(module, program, signature, "fuse_decode"), signature), True)


def _output_spec(name: str, rule: Rule, logits_dtype: str, vocab: int) -> TensorSpec:
    if name == "top_ids":
        return TensorSpec(name, "int64", ("batch", "rows", min(TOP, vocab)))
    dtype = ("float64" if name in rule.float64 else "bool" if name in rule.boolean
             else "int64" if name in rule.int64 else logits_dtype)
    return TensorSpec(name, dtype, ("batch", "rows", min(TOP, vocab)) if name == "top_probs" else ("batch", "rows"))


def _module_path(node: torch.fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    return list(stack.values())[-1][0] if stack else None
