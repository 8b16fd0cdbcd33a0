"""Post-training quantization: weight formats and methods (RTN, GPTQ, AWQ), outlier handling for
int8 activations (SmoothQuant, Hadamard rotation), calibration and the per-layer report.

The numerics are small functions over tensors; `dlmc.passes.quantize` applies them to a captured step.
"""
