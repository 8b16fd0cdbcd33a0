"""The fused loop's step on CUDA, replayed as CUDA graphs: one graph per input shape (a batch size, a
block length, a canvas or cache width), captured the first time that shape runs.

A step launches hundreds of small kernels; replaying them as one graph removes the per-kernel launch
cost from every denoising iteration. The graph reads fixed input buffers and writes fixed output
buffers, so a call copies its inputs in, replays, and hands back copies of the outputs (a later replay
overwrites the buffers). The random draws stay inputs drawn outside, so replay changes no token.

`step_runner` is the one place the loop chooses: a GraphedStep on CUDA for the backends that run the
step through torch (eager, inductor), the plain `engine.run_step` elsewhere. DLMC_CUDA_GRAPHS=0 turns
graphs off (debugging, and the tests comparing both paths).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from dlmc.errors import DlmcError

GRAPHED_BACKENDS = ("eager", "inductor")
"""Backends whose step is torch kernels on the current stream (ONNX Runtime and TensorRT run their own)."""
MAX_GRAPHS = 16
"""Graphs kept at once; the least recently used goes first (canvas widths change as requests come and go)."""

Run = Callable[..., tuple[torch.Tensor, ...]]


def step_runner(engine) -> Run:
    """How the fused loop calls the compiled step: graphed on CUDA where the backend allows, else as is."""
    if torch.device(engine.device).type != "cuda" or os.environ.get("DLMC_CUDA_GRAPHS") == "0":
        return engine.run_step
    if engine.manifest["backend"]["name"] not in GRAPHED_BACKENDS:
        return engine.run_step
    return GraphedStep(engine.run_step, engine.device)


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: tuple[torch.Tensor, ...]  # the buffers the graph reads
    outputs: tuple[torch.Tensor, ...]  # the buffers it writes


class GraphedStep:
    """`run(*inputs) -> outputs`, each distinct input shape captured once as a CUDA graph and replayed."""

    def __init__(self, run: Run, device: torch.device | str):
        device = torch.device(device)
        if device.type != "cuda":
            raise DlmcError(f"cuda graphs: the step runs on '{device}'; CUDA graphs exist only on CUDA devices")
        self.run, self.device = run, device
        self.graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self.pool = None  # one memory pool for every graph: they replay one at a time
        self.captures = 0

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        key = tuple((tuple(t.shape), t.dtype) for t in inputs)
        entry = self.graphs.get(key)
        if entry is None:
            entry = self._capture(key, inputs)
        self.graphs.move_to_end(key)
        for buffer, value in zip(entry.inputs, inputs):
            buffer.copy_(value)
        entry.graph.replay()
        return tuple(out.clone() for out in entry.outputs)

    def _capture(self, key: tuple, inputs: tuple[torch.Tensor, ...]) -> _Graph:
        if len(self.graphs) >= MAX_GRAPHS:
            self.graphs.popitem(last=False)
        static = tuple(t.contiguous().clone() for t in inputs)  # contiguous: run_step then copies nothing
        # warm up on a side stream, as torch.cuda.graph asks: lazy initialisation and autotuning run
        # outside the capture, and the allocator has seen the step's blocks
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self.run(*static)
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.device(self.device), torch.cuda.graph(graph, pool=self.pool):
            outputs = self.run(*static)
        self.captures += 1
        entry = _Graph(graph, static, tuple(outputs))
        self.graphs[key] = entry
        return entry
