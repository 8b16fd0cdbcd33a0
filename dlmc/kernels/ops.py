"""Importing this module registers every `torch.ops.dlmc_kernels.*` op, so a graph that calls them
(the triton_kernels pass) deserializes and runs. Importing needs no triton: each op checks at its call."""

from dlmc.kernels import cached_attention, unmask_head, woq_gemm

REGISTERED = (cached_attention.cached_attention, unmask_head.unmask_head, woq_gemm.linear_woq)
