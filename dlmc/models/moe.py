"""The mixture-of-experts MLP of LLaDA-MoE, LLaDA2.0/2.1 and SDAR-MoE, in a form torch.export captures.

Routing is static-shape data (top-k indices and weights per token). The experts are stored stacked in the
[in, out] layout a grouped matmul reads (gate/up [E, D, F], down [E, F, D]; transposed at load time) and
run in one of two forms, both computing every assignment (no capacity factor, nothing dropped), exactly
as the reference loops over experts do:

  grouped (default)  the T*k (token, expert) assignments sorted by expert (a stable sort: static
                     shapes), their rows gathered, and one grouped matmul per projection
                     (torch.ops.dlmc.grouped_mm) reads each expert's weights in place, so a step reads
                     the weights of the experts in use once and multiplies T*k rows.
  tiled              the assignments placed, expert by expert, into tiles of `tile` rows (padded with
                     zero rows) and one batched matmul against the tiles' experts' weights, gathered:
                     min(T*k, (T*k + E*(tile-1)) // tile) tiles, a bound that needs no data. Only
                     standard ops, so ONNX can express it (ONNX has no grouped GEMM): the onnxrt
                     lowering captures this form (capture.moe_experts).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from dlmc.errors import DlmcError
from dlmc.models.checkpoint import STACKED, TRANSPOSED
from dlmc.models.grouped import grouped_mm

RouterKind = Literal["softmax", "sigmoid"]
ExpertsForm = Literal["grouped", "tiled"]
EXPERTS_FORMS: tuple[ExpertsForm, ...] = ("grouped", "tiled")


@dataclass(frozen=True, kw_only=True)
class MoEConfig:
    """A family's MoE block. Field names in the messages are the published config.json names, which the
    three families share (num_experts, num_experts_per_tok; LLaDA2's n_group, topk_group)."""

    num_experts: int
    top_k: int
    expert_size: int
    """Intermediate width of one routed expert."""
    layers: tuple[int, ...]
    """Indices of the layers whose MLP is this block; the others keep the dense MLP."""
    shared_size: int | None = None
    """Width of the always-on shared expert (same input, added to the routed output); None = none."""
    router: RouterKind = "softmax"
    renormalize: bool = False
    """Divide the top-k weights by their sum (LLaDA2, Qwen3-MoE); LLaDA-MoE does not."""
    scaling: float = 1.0
    """routed_scaling_factor, applied after renormalisation."""
    num_groups: int = 1
    topk_groups: int = 1
    """Group-limited routing (LLaDA2): experts in num_groups equal groups; a token chooses among the
    topk_groups groups with the largest sum of their two best (biased) scores."""
    expert_bias: bool = False
    """A per-expert bias added to the scores for the choice of experts only, never to the weights."""
    router_fp32: bool = False
    """Router matmul in fp32 (LLaDA2's router_dtype); otherwise in the activation dtype. Scores are
    always normalised in fp32."""
    combine_fp32: bool = False
    """Weight and sum the expert outputs in fp32 (LLaDA2); otherwise in the activation dtype."""
    tile: int = 8
    """Rows per tile of the tiled form (a speed setting only)."""

    def __post_init__(self) -> None:
        if self.top_k > self.num_experts:
            raise ValueError(f"'num_experts_per_tok' ({self.top_k}) exceeds 'num_experts' ({self.num_experts})")
        if self.num_experts % self.num_groups:
            raise ValueError(f"'n_group' ({self.num_groups}) does not divide 'num_experts' ({self.num_experts})")
        if self.num_groups > 1:
            per_group = self.num_experts // self.num_groups
            if not 1 <= self.topk_groups <= self.num_groups:
                raise ValueError(f"'topk_group' ({self.topk_groups}) must be in 1..n_group ({self.num_groups})")
            if per_group < 2:  # a group's score is the sum of its two best experts
                raise ValueError(f"'n_group' ({self.num_groups}) leaves fewer than 2 experts per group")
            if self.top_k > self.topk_groups * per_group:
                raise ValueError(
                    f"'num_experts_per_tok' ({self.top_k}) exceeds the {self.topk_groups * per_group} experts "
                    f"of 'topk_group' ({self.topk_groups}) groups"
                )
        if self.tile < 1:
            raise ValueError("tile: must be >= 1")


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)): the shared expert."""

    def __init__(self, d: int, f: int):
        super().__init__()
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class RoutedExperts(nn.Module):
    """Any module whose experts run in one of EXPERTS_FORMS; set_experts_form sets `form` on each."""

    form: ExpertsForm = "grouped"


class MoE(RoutedExperts):
    def __init__(self, cfg: MoEConfig, hidden_size: int):
        super().__init__()
        self.cfg = cfg
        self.form: ExpertsForm = "grouped"  # how the experts run (module doc); set_experts_form
        E, f, d = cfg.num_experts, cfg.expert_size, hidden_size
        self.router = nn.Linear(d, E, bias=False)
        if cfg.expert_bias:
            self.expert_bias = nn.Parameter(torch.zeros(E))
        # Stacked and transposed at load time from the published per-expert [out, in] tensors
        # (experts.{e}.{gate,up,down}_proj): [E, in, out], each expert's matrix contiguous.
        self.experts_gate = nn.Parameter(torch.empty(E, d, f))
        self.experts_up = nn.Parameter(torch.empty(E, d, f))
        self.experts_down = nn.Parameter(torch.empty(E, f, d))
        if cfg.shared_size is not None:
            self.shared = SwiGLU(d, cfg.shared_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, L, D] -> [B, L, D]
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # [T, D]
        weights, idx = self.route(flat)  # [T, k] fp32, [T, k] int64
        outputs = self.experts(flat, idx)  # [T, k, D]
        if self.cfg.combine_fp32:
            routed = (_upcast(outputs) * weights[..., None]).sum(1).to(x.dtype)
        else:
            routed = (outputs * weights.to(x.dtype)[..., None]).sum(1)
        if self.cfg.shared_size is not None:
            routed = routed + self.shared(flat)
        return routed.view(shape)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k experts per row and their weights: x [T, D] -> weights [T, k] (>= fp32), idx [T, k]."""
        cfg = self.cfg
        if cfg.router_fp32:
            logits = F.linear(_upcast(x), _upcast(self.router.weight))
        else:
            logits = _upcast(self.router(x))  # [T, E]
        scores = logits.softmax(-1) if cfg.router == "softmax" else logits.sigmoid()  # [T, E]
        choice = scores + _upcast(self.expert_bias) if cfg.expert_bias else scores
        if cfg.num_groups > 1:
            choice = self._limit_to_groups(choice)
        idx = choice.topk(cfg.top_k, dim=-1).indices  # [T, k]
        weights = scores.gather(1, idx)  # the unbiased scores
        if cfg.renormalize:
            # The references add 1e-20 (LLaDA2) or nothing (Qwen3-MoE): below rounding of a sum of scores.
            weights = weights / weights.sum(-1, keepdim=True)
        if cfg.scaling != 1.0:
            weights = weights * cfg.scaling
        return weights, idx

    def _limit_to_groups(self, choice: torch.Tensor) -> torch.Tensor:
        # choice: [T, E] -> [T, E] with the experts outside the chosen groups at -inf
        cfg = self.cfg
        T = choice.shape[0]
        grouped = choice.view(T, cfg.num_groups, -1)  # [T, G, E/G]
        group_score = grouped.topk(2, dim=-1).values.sum(-1)  # [T, G]
        keep = group_score.topk(cfg.topk_groups, dim=-1).indices  # [T, topk_groups]
        kept = torch.zeros_like(group_score, dtype=torch.bool).scatter(1, keep, True)  # [T, G]
        return grouped.masked_fill(~kept[..., None], float("-inf")).view(T, -1)

    def experts(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Every assignment's expert output: x [T, D], idx [T, k] -> [T, k, D] (see the module doc)."""
        return self._grouped(x, idx) if self.form == "grouped" else self._tiled(x, idx)

    def _grouped(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        def mlp(rows, offs):  # rows [N, D] sorted by expert -> [N, D]
            h = F.silu(grouped_mm(rows, self.experts_gate, offs)) * grouped_mm(rows, self.experts_up, offs)
            return grouped_mm(h, self.experts_down, offs)

        return grouped_experts(x, idx, self.cfg.num_experts, mlp)

    def _tiled(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        def mlp(packed, tile_expert):  # packed [tiles, R, D], tile_expert [tiles] -> [tiles, R, D]
            gate = torch.bmm(packed, self.experts_gate[tile_expert])  # [tiles, R, F]
            up = torch.bmm(packed, self.experts_up[tile_expert])  # [tiles, R, F]
            return torch.bmm(F.silu(gate) * up, self.experts_down[tile_expert])

        return tiled_experts(x, idx, self.cfg.num_experts, self.cfg.tile, mlp)


def grouped_experts(x: torch.Tensor, idx: torch.Tensor, num_experts: int, mlp) -> torch.Tensor:
    """The grouped form (module doc) for any expert MLP: x [T, D], idx [T, k] -> [T, k, D], where
    mlp(rows [N, D] sorted by expert, offs int32 [E]) -> [N, D] runs grouped_mm products."""
    T, D = x.shape
    k = idx.shape[1]
    e = idx.reshape(T * k)  # [N] expert of each assignment (token-major)
    order = torch.argsort(e, stable=True)  # [N] assignments grouped by expert
    count = (e[:, None] == torch.arange(num_experts, device=x.device)).sum(0)  # [E]
    offs = count.cumsum(0).to(torch.int32)  # [E] end of each expert's rows
    out = mlp(x[order // k], offs)  # [N, D] in sorted order
    return torch.empty_like(out).index_copy(0, order, out).view(T, k, D)  # order is a permutation


def tiled_experts(x: torch.Tensor, idx: torch.Tensor, num_experts: int, tile: int, mlp) -> torch.Tensor:
    """The tiled form (module doc) for any expert MLP: x [T, D], idx [T, k] -> [T, k, D], where
    mlp(packed [tiles, R, D], tile_expert [tiles]) -> [tiles, R, D] runs batched matmuls against the
    tiles' experts' gathered weights."""
    T, D = x.shape
    E, k, R = num_experts, idx.shape[1], tile
    N = T * k
    e = idx.reshape(N)  # [N] expert of each assignment (token-major)
    onehot = (e[:, None] == torch.arange(E, device=x.device)).long()  # [N, E]
    count = onehot.sum(0)  # [E] assignments per expert
    rank = (onehot.cumsum(0) * onehot).sum(1) - 1  # [N] place among its expert's assignments
    tiles_of = (count + R - 1) // R  # [E]
    tile_end = tiles_of.cumsum(0)  # [E]
    slot = (tile_end - tiles_of)[e] * R + rank  # [N] row in the tiled buffer, unique
    # Each used tile holds rows of one expert; nonempty experts number at most min(E, N).
    num_tiles = torch.sym_min(N, (N + E * (R - 1)) // R)
    tiles = torch.arange(num_tiles, device=x.device)
    tile_expert = (tile_end[None, :] <= tiles[:, None]).sum(1).clamp(max=E - 1)  # [tiles]; spare tiles: E-1
    rows = x[:, None, :].expand(T, k, D).reshape(N, D)  # [N, D]
    packed = x.new_zeros(num_tiles * R, D).index_copy(0, slot, rows).view(num_tiles, R, D)
    out = mlp(packed, tile_expert)  # [tiles, R, D]
    return out.view(num_tiles * R, D)[slot].view(T, k, D)


def set_experts_form(model: nn.Module, form: ExpertsForm) -> None:
    """Run every MoE block of `model` in `form` (module doc); capture calls it before export."""
    if form not in EXPERTS_FORMS:
        raise DlmcError(f"capture.moe_experts: {form!r} is not one of {', '.join(EXPERTS_FORMS)}")
    for module in model.modules():
        if isinstance(module, RoutedExperts):
            module.form = form


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """At least fp32 (float64 stays float64, which the parity tests use)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def moe_config(where, **fields) -> MoEConfig:
    """MoEConfig from a family reader; an impossible combination is one line naming the config file."""
    try:
        return MoEConfig(**fields)
    except ValueError as e:
        raise DlmcError(f"{where}: {e}") from None


def expert_rules(layer: str, shared: str | None) -> list[tuple[str, str]]:
    """Canonical -> published name rules for an MoE layer whose published prefix is `layer` (with \\1
    for the layer index): the router `mlp.gate`, the per-expert `mlp.experts.{e}.*_proj`, stacked and
    transposed here, and the shared expert under `shared` (relative to the layer)."""
    rules = [
        (r"layers\.(\d+)\.mlp\.router\.weight", layer + r".mlp.gate.weight"),
        (r"layers\.(\d+)\.mlp\.expert_bias", layer + r".mlp.gate.expert_bias"),
        (r"layers\.(\d+)\.mlp\.experts_(gate|up|down)",
         layer + r".mlp.experts." + STACKED + r".\2_proj.weight" + TRANSPOSED),
    ]
    if shared is not None:
        rules.append((r"layers\.(\d+)\.mlp\.shared\.(.*)", layer + "." + shared + r".\2"))
    return rules
