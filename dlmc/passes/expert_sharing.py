"""expert_sharing: Dynamic Expert Sharing (DES, arXiv 2602.00879) for the MoE layers of the step.

Tokens decoded in parallel, each routed on its own, touch almost K distinct experts apiece: the step's
expert weight traffic grows with its rows. DES picks, per MoE layer and step, one coreset of experts
for every row of a sequence, then routes each token within it:

  Stage 1, the coreset C (per sequence of the batch; padding, attention_mask False, does not vote)
    seq   (DES-Seq, knob k = budget): C = the union of every token's own top-k experts, k <= K.
    vote  (DES-Vote, budget = |C|):   each token's gate scores on its own top-K experts (zero on the
          others) are summed over the sequence; C = the `budget` experts with the largest sums.
  Stage 2, every token: its K best experts among C, ranked by the family's own choice scores (expert
          bias, group limit) and weighted by its own gate (renormalised and scaled as the family does).

"Own top-K" is the model's unshared selection. Facts not stated by the paper (it gives no code) and
chosen here: votes are the gate scores before renormalisation (softmax probabilities, or LLaDA2's
sigmoids); with a group limit (LLaDA2) a token first takes the coreset experts of its own groups, and
if those are fewer than K, the coreset's others by gate score; a slot still empty (DES-Seq's coreset
smaller than K) gets weight 0 on a coreset expert, so no expert outside C is ever read. With the
whole expert set as coreset (vote, budget >= num_experts; seq, budget = K) routing is the unshared one.

The rewrite replaces, in each MoE layer (module type MoE), the expert-choice top-k and the gather of
its weights; everything after them (normalisation, scaling, the expert computation) is untouched.
Shapes stay static ([T, E] masks, [T, K] choices), so the step exports and lowers as before.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from dlmc.capture import StepProgram
from dlmc.errors import DlmcError
from dlmc.passes import PassConfig, PassResult, reexport, register

TOPK = torch.ops.aten.topk.default
GATHER = torch.ops.aten.gather.default
MOE_TYPE = "dlmc.models.moe.MoE"

Method = Literal["seq", "vote"]


@dataclass(frozen=True, kw_only=True)
class ExpertSharing(PassConfig):
    """Route every token of a step within one expert coreset per sequence and MoE layer (approximate)."""

    name: ClassVar[str] = "expert_sharing"
    exact: ClassVar[bool] = False
    method: Method = "vote"
    """vote: the coreset is the `budget` experts with the most gate weight over the step's tokens
    (DES-Vote); seq: the union of each token's top-`budget` experts (DES-Seq)."""
    budget: int
    """vote: experts in the coreset (>= num_experts_per_tok); seq: experts each token adds to the
    coreset (1..num_experts_per_tok)."""

    def __post_init__(self) -> None:
        if self.budget < 1:
            raise ValueError(f"budget: must be >= 1, got {self.budget}")

    def check(self, num_experts: int, top_k: int) -> None:
        """The budget against the model's experts; one line naming the setting."""
        if self.method == "vote" and self.budget < top_k:
            raise DlmcError(f"expert_sharing.budget: {self.budget} is below num_experts_per_tok ({top_k}); a "
                            f"vote coreset must hold each token's {top_k} experts")
        if self.method == "seq" and self.budget > top_k:
            raise DlmcError(f"expert_sharing.budget: method seq takes each token's top-budget experts, so it "
                            f"must be in 1..num_experts_per_tok ({top_k}), got {self.budget}")


def coreset(choice: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor, method: Method, budget: int,
            top_k: int) -> torch.Tensor:
    """Stage 1. choice, scores [T, E] fp32 (T = B*L, row-major), mask [B, L] bool -> member [B, E] bool."""
    B = mask.shape[0]
    T, E = choice.shape
    # A row with no real token (never in practice) votes with all of them, so it still has a coreset.
    voters = (mask | ~mask.any(1, keepdim=True)).reshape(T, 1)  # [T, 1]
    if method == "seq":
        own = choice.topk(budget, dim=-1).indices  # [T, k]
        picked = torch.zeros_like(choice, dtype=torch.bool).scatter(1, own, True) & voters  # [T, E]
        return picked.view(B, -1, E).any(1)  # [B, E]
    own = choice.topk(top_k, dim=-1).indices  # [T, K], the unshared selection
    kept = torch.zeros_like(scores).scatter(1, own, scores.gather(1, own))  # [T, E] zero off its top-K
    votes = (kept * voters).view(B, -1, E).sum(1)  # [B, E]
    chosen = votes.topk(min(budget, E), dim=-1).indices  # [B, budget]
    return torch.zeros_like(votes, dtype=torch.bool).scatter(1, chosen, True)  # [B, E]


def shared_route(
    choice: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor, *, method: Method, budget: int, top_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both stages: choice [T, E] (the family's ranking, -inf outside a token's groups), scores [T, E]
    (its gate), mask [B, L] -> idx [T, K] int64 and the gate at idx [T, K] (0 on an empty slot)."""
    T, E = choice.shape
    member = coreset(choice, scores, mask, method, budget, top_k)  # [B, E]
    member = member[:, None, :].expand(mask.shape[0], T // mask.shape[0], E).reshape(T, E)  # [T, E]
    neg = torch.full_like(choice, float("-inf"))
    in_groups = member & (choice > float("-inf"))  # [T, E]
    first = torch.where(in_groups, choice, neg).topk(top_k, dim=-1)  # coreset experts of its groups
    spare = torch.where(member & ~in_groups, scores, neg).topk(top_k, dim=-1)  # the coreset's others
    # The first tier's finite entries, then the second's, each in its own order: ranks 0..2K-1 for
    # valid candidates, 2K for empty ones; a stable sort keeps the order among equals.
    values = torch.cat([first.values, spare.values], 1)  # [T, 2K]
    cands = torch.cat([first.indices, spare.indices], 1)  # [T, 2K]
    valid = values > float("-inf")  # [T, 2K]
    rank = torch.where(valid, torch.arange(2 * top_k, device=choice.device), 2 * top_k)  # [T, 2K]
    order = rank.sort(dim=-1, stable=True).indices[:, :top_k]  # [T, K]
    idx = cands.gather(1, order)  # [T, K]
    filled = valid.gather(1, order)  # [T, K]; slot 0 is always filled (C is never empty)
    idx = torch.where(filled, idx, idx[:, :1])  # an empty slot reads an expert already fetched
    weights = torch.where(filled, scores.gather(1, idx), torch.zeros_like(first.values))  # [T, K]
    return idx, weights


@register(ExpertSharing)
def expert_sharing(program: StepProgram, config: ExpertSharing) -> PassResult:
    gm = program.exported.module()  # unlifted; reexport traces the inserted routing into aten ops
    graph = gm.graph
    masks = [n for n in graph.find_nodes(op="placeholder") if n.name == "attention_mask"]
    if not masks:
        raise DlmcError("expert_sharing: the step has no attention_mask input to tell sequences apart")
    layers = _router_choices(gm)
    if not layers:
        raise DlmcError("expert_sharing: the model has no MoE layers (no expert routing to share)")
    for path, topk in layers.items():
        choice, top_k = topk.args[0], topk.args[1]
        config.check(choice.meta["val"].shape[-1], top_k)
        values, indices = _outputs(topk, path)
        gathers = [u for u in indices.users if u.target is GATHER]
        if values.users or len(gathers) != 1:
            raise DlmcError(f"expert_sharing: {path}'s routing does not have the expected form (top-k, gather)")
        gather = gathers[0]
        scores = gather.args[0]
        with graph.inserting_before(gather):
            routed = graph.call_function(
                shared_route, (choice, scores, masks[0]),
                {"method": config.method, "budget": config.budget, "top_k": top_k},
            )
            new_idx = graph.call_function(operator.getitem, (routed, 0))
            new_weights = graph.call_function(operator.getitem, (routed, 1))
        for node in (routed, new_idx, new_weights):
            node.meta["nn_module_stack"] = dict(topk.meta.get("nn_module_stack", {}))
        indices.replace_all_uses_with(new_idx, delete_user_cb=lambda user: user is not gather)
        gather.replace_all_uses_with(new_weights)
        for node in (gather, indices, values, topk):
            graph.erase_node(node)
    graph.eliminate_dead_code()
    module = torch.fx.GraphModule(gm, graph)
    exported = reexport(module, program, program.signature, "expert_sharing")
    return PassResult(program.with_exported(exported), True)


def _router_choices(gm: torch.fx.GraphModule) -> dict[str, torch.fx.Node]:
    """MoE module path -> its expert-choice top-k: the last top-k of the module over a [T, E] input
    (the group limit's top-ks run over [T, G, E/G] and [T, G], G < E)."""
    found: dict[str, torch.fx.Node] = {}
    widths: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.target is not TOPK:
            continue
        path = _moe_path(node)
        shape = node.args[0].meta["val"].shape
        if path is None or len(shape) != 2:
            continue
        if shape[-1] >= widths.get(path, 0):
            found[path], widths[path] = node, shape[-1]
    return found


def _moe_path(node: torch.fx.Node) -> str | None:
    for path, kind in (node.meta.get("nn_module_stack") or {}).values():
        if kind == MOE_TYPE or getattr(kind, "__module__", None) == "dlmc.models.moe":
            return path
    return None


def _outputs(topk: torch.fx.Node, path: str) -> tuple[torch.fx.Node, torch.fx.Node]:
    """The (values, indices) getitems of a top-k node; one that is missing is made, unused."""
    items = {u.args[1]: u for u in topk.users if u.target is operator.getitem}
    if set(items) - {0, 1} or len(items) != len(topk.users) or 1 not in items:
        raise DlmcError(f"expert_sharing: {path}'s routing does not have the expected form (top-k indices)")
    if 0 not in items:
        with topk.graph.inserting_after(topk):
            items[0] = topk.graph.call_function(operator.getitem, (topk, 0))
    return items[0], items[1]
