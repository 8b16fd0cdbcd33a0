"""`torch.ops.dlmc.materialize`: a copy Inductor cannot inline, so a value read by every layer is computed
once (`dlmc.lower.materialize` puts RoPE's cos and sin tables through it on the CPU)."""

from __future__ import annotations

import torch


@torch.library.custom_op("dlmc::materialize", mutates_args=())
def _materialize(x: torch.Tensor) -> torch.Tensor:
    return x.clone()


@_materialize.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


materialize = torch.ops.dlmc.materialize.default
