"""Hand-written Triton kernels for the hot spots of a denoising iteration, each next to its plain-torch
reference and registered as a `torch.ops.dlmc_kernels.*` custom op (with a fake implementation, so a
step that calls one survives torch.export and AOTInductor as a single node):

  unmask_head       hidden rows x output head -> token, confidence, margin, entropy; no [R, V] logits
  linear_woq        weight-only int8 / int4 GEMM and GEMV in dlmc.quant's packed layouts
  cached_attention  attention over [cache ; fresh] keys under a key mask, grouped-query heads

Which implementation an op runs is `use_triton(device)`: the kernel on CUDA, the reference elsewhere.
The kernels are tested on CPU through Triton's interpreter only (tests/kernels)."""

from dlmc.kernels.dispatch import triton_available, use_triton

__all__ = ["triton_available", "use_triton"]
