"""ms per denoising step of an 8B-shaped LLaDA on this GPU, against its memory and compute floors.

    python benchmarks/gpu_floor.py [--json gpu_floor.json] [--calls 10] [--seq 256]

The model has LLaDA-8B's shapes (32 layers, d 4096, MLP 12288, vocab 126464) with random weights made
on the GPU (nothing downloaded; the 16 GB are not written to disk, which alone would take minutes). The
floors are this GPU's, measured here: HBM bandwidth from a 2 GiB device-to-device copy, bf16 matmul
rate from a 8192^3 GEMM. A step's floor is max(bytes read once / bandwidth, FLOPs / rate).

Rows: bf16, W8A16 and W4A16 (every linear of the layers through torch.ops.dlmc.linear_woq, eagerly:
the weight is dequantized per call, which Inductor would fuse; so these rows show the operator, not a
compiled step), each at batch 1 and 8, for the full step (the whole --seq canvas) and a dual-cache step
(one 32-token block of queries; its attention to the cached K/V is left out here, so the floor counts
only the block's own work and the weights). On a machine without CUDA it refuses with one line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ARCH = dict(hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128,
            intermediate_size=12288, vocab_size=126464, rms_norm_eps=1e-5, rope_theta=500000.0)
BLOCK = 32


def measure_floors() -> tuple[float, float]:
    """(bytes per second of a device-to-device copy, bf16 FLOPs per second of a large GEMM)."""
    src = torch.empty(1 << 30, dtype=torch.bfloat16, device="cuda")  # 2 GiB
    dst = torch.empty_like(src)
    seconds = timed(lambda: dst.copy_(src), 10)
    bandwidth = 2 * src.numel() * src.element_size() / seconds  # read + write
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    seconds = timed(lambda: a @ a, 10)
    return bandwidth, 2 * 8192**3 / seconds


def timed(fn, calls: int) -> float:
    """Median seconds of one call, after two warm-ups."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(calls):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times)


class WoqLinear(torch.nn.Module):
    """A linear whose weight is stored as random int8 / packed int4 codes (the dlmc.quant.ops layouts)."""

    def __init__(self, linear: torch.nn.Linear, bits: int, group_size: int = 128):
        super().__init__()
        out, inner = linear.weight.shape
        groups = inner // group_size if bits == 4 else 1
        self.bits = bits
        if bits == 4:
            self.qweight = torch.randint(0, 256, (out, groups, group_size // 2), dtype=torch.uint8, device="cuda")
            self.scale = torch.rand(out * groups, dtype=torch.bfloat16, device="cuda") / 100
        else:
            self.qweight = torch.randint(-127, 128, (out, inner), dtype=torch.int8, device="cuda")
            self.scale = torch.rand(out, 1, dtype=torch.bfloat16, device="cuda") / 100
        self.weight_bytes = self.qweight.numel() + 2 * self.scale.numel()

    def forward(self, x):
        return torch.ops.dlmc.linear_woq(x, self.qweight, self.scale, None, None, self.bits)


def build(variant: str):
    from dlmc.models import load_model
    from dlmc.models.transformer import ArchConfig, DiffusionLM
    from dlmc.testing.fixtures import write_checkpoint

    with tempfile.TemporaryDirectory() as tmp:  # a tiny LLaDA checkpoint, for LLaDA's DenoiserSpec
        spec = load_model(write_checkpoint("llada", Path(tmp) / "m")).spec
    with torch.device("meta"):
        model = DiffusionLM(ArchConfig(**ARCH), spec)
    model = model.to_empty(device="cuda").to(torch.bfloat16).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if variant != "bf16":
        import dlmc.quant.ops  # noqa: F401  (registers torch.ops.dlmc)

        bits = 8 if variant == "w8a16" else 4
        for layer in model.layers:
            for parent in (layer.attn, layer.mlp):
                for name, child in list(parent.named_children()):
                    if isinstance(child, torch.nn.Linear):
                        woq = WoqLinear(child, bits)
                        weight_bytes += woq.weight_bytes - child.weight.numel() * 2
                        setattr(parent, name, woq)
        torch.cuda.empty_cache()
    return model, weight_bytes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--seq", type=int, default=256)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_floor: needs a CUDA device, and torch sees none", file=sys.stderr)
        return 2
    bandwidth, rate = measure_floors()
    name = torch.cuda.get_device_name()
    print(f"{name}: copy bandwidth {bandwidth / 1e12:.2f} TB/s, bf16 GEMM {rate / 1e12:.0f} TFLOP/s")
    rows = []
    d, layers = ARCH["hidden_size"], ARCH["num_layers"]
    matmul_weights = layers * (4 * d * d + 3 * d * ARCH["intermediate_size"]) + d * ARCH["vocab_size"]  # + head
    for variant in ("bf16", "w8a16", "w4a16"):
        model, weight_bytes = build(variant)
        for batch in (1, 8):
            for step, length in (("full", args.seq), ("dual", BLOCK)):
                ids = torch.randint(0, ARCH["vocab_size"], (batch, length), device="cuda")  # [B, L] int64
                with torch.no_grad():
                    seconds = timed(lambda: model(ids), args.calls)  # noqa: B023
                tokens = batch * length
                flops = 2 * matmul_weights * tokens  # a multiply-add per weight per token; attention left out
                floor = max(weight_bytes / bandwidth, flops / rate)
                row = dict(variant=variant, batch=batch, step=step, tokens=length, ms=seconds * 1e3,
                           floor_ms=floor * 1e3, memory_floor_ms=weight_bytes / bandwidth * 1e3,
                           compute_floor_ms=flops / rate * 1e3)
                rows.append(row)
                print(f"{variant:6} batch {batch} {step:4} ({length:3} tokens): {row['ms']:8.2f} ms/step, floor "
                      f"{row['floor_ms']:7.2f} ms (memory {row['memory_floor_ms']:.2f}, compute "
                      f"{row['compute_floor_ms']:.2f}), {row['ms'] / row['floor_ms']:.1f}x the floor")
        del model
        torch.cuda.empty_cache()
    if args.json:
        args.json.write_text(json.dumps({"gpu": name, "bandwidth": bandwidth, "bf16_flops": rate, "rows": rows},
                                        indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
