"""Every quantization scheme against the float artifact, in one run, on the embedded default model.

    python benchmarks/quant_table.py [--per-task 10] [--backend eager] [--workdir /tmp/dlmc-quant]

For each scheme: compile the embedded model with a quantize pass (calibration: 32 task samples), then
in a child process (so peak memory is the artifact's own) run `dlmc eval`'s evaluation (decoder llada,
gen 128, steps 128, block 32) on the held-out tasks. Columns: task accuracy and its retention vs
float, token agreement of the generated tokens with the float artifact's, the whole step's fidelity
on 64 held-out denoising states (logits SQNR, and KL(float || scheme) of the token distributions at
the masked positions), the median / worst layer output SQNR from the calibration report, the
quantized linears' stored bytes as a share of the same linears in bf16, the weights file size, the
child's peak RSS and generated tokens/s. The `bf16` row is the float model captured in bfloat16. The
output head (vocab 82) stays in float in every scheme. The QuaRot row runs `rotate` before
quantizing (the residual stream's Hadamard rotation folded into the weights) and rotates only
down_proj's input online. `--synthetic` adds the same table (without accuracy) for a 134M
random-weight LLaDA-format checkpoint, calibrated on random tokens.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

W4 = {"weights": "int4", "group_size": 64}
SCHEMES: dict[str, dict | None] = {
    "float": None,
    "bf16": None,  # the float model captured in bfloat16: the baseline weight-only schemes replace
    "W8A16 RTN": {},
    "W4A16 RTN": dict(W4),
    "W4A16 GPTQ": dict(W4, method="gptq"),
    "W4A16 AWQ": dict(W4, method="awq"),
    "W8A8 naive per-tensor": {"activations": "per_tensor"},
    "W8A8 SmoothQuant per-tensor": {"activations": "per_tensor", "outliers": "smoothquant", "smooth_alpha": 0.5},
    "W8A8 Hadamard per-tensor": {"activations": "per_tensor", "outliers": "hadamard"},
    "W8A8 per-token": {"activations": "per_token"},
    "W8A8 Hadamard per-token": {"activations": "per_token", "outliers": "hadamard"},
    "W8A8 QuaRot per-token": {"activations": "per_token"},
}
ROTATED = {"W8A8 QuaRot per-token"}
"""Rows whose recipe runs `rotate` before quantizing: the residual stream's Hadamard rotation is folded
into the weights, so only down_proj's input (the MLP intermediate) keeps the online one."""
QUANT_SUFFIXES = ("qweight", "scale", "zero", "inv_scale", "act_scale")


def recipe(scheme: dict | None, backend: str, source: str, rotated: bool = False, dtype: str = "float32") -> dict:
    passes: list = [{"fold_constants": {}}]
    rules: list = [{"match": "lm_head", "scheme": None}]
    if rotated:
        passes.append({"rotate": {}})
        rules.append({"match": "layers.*.mlp.down_proj", "scheme": dict(scheme, outliers="hadamard")})
    if scheme is not None:
        passes.append({"quantize": {
            "scheme": scheme,
            "rules": rules,
            "calibration": {"source": source, "samples": 32, "seq_len": 64},
        }})
    lower = {"backend": backend} | ({"opset": 21} if backend == "onnxrt" else {})
    return {"description": "quant table", "capture": {"dtype": dtype, "max_batch": 64}, "passes": passes,
            "lower": lower}


def weight_bytes(artifact: Path) -> tuple[int, int | None]:
    """(weights file bytes, quantized linears' stored bytes / the same linears in bf16 as a ratio)."""
    from safetensors import safe_open

    path = artifact / "weights.safetensors"
    report_path = artifact / "quant_report.json"
    if not report_path.is_file():
        return path.stat().st_size, None
    layers = json.loads(report_path.read_text())[0]["layers"]
    stored = 0
    with safe_open(str(path), "pt") as f:
        for key in f.keys():
            layer, _, suffix = key.rpartition(".")
            if layer in layers and suffix in QUANT_SUFFIXES:
                t = f.get_slice(key)
                stored += _numel(t.get_shape()) * {"I8": 1, "U8": 1, "F32": 4, "BF16": 2, "F16": 2}[t.get_dtype()]
    bf16 = sum(2 * layer["shape"][0] * layer["shape"][1] for layer in layers.values())
    return path.stat().st_size, stored / bf16


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def held_out_states(model_dir: Path, synthetic: bool) -> tuple[torch.Tensor, ...]:
    """64 denoising states the calibration never saw (another seed): the step inputs on which every
    artifact's logits are compared with the float artifact's."""
    from dlmc.quant.calibration import calibration_inputs
    from dlmc.quant.scheme import Calibration

    spec = read_spec(model_dir)
    config = Calibration(source="random" if synthetic else "tasks", samples=64, seq_len=64, seed=1, batch_size=64)
    return calibration_inputs(config, spec, model_dir, 64)[0]


def child_eval(artifact: Path, per_task: int, prompts: int, gen_length: int | None, states: Path) -> None:
    """Runs in a child process: the step's logits on the held-out states (written beside `states`), then
    evaluate (or, for a model without the task tokenizer, generate from fixed prompts); one JSON line."""
    torch.set_num_threads(1)
    from safetensors.torch import load_file, save_file

    import dlmc.runtime
    from dlmc.generation import decoder_config, generate

    engine = dlmc.runtime.load(artifact, device="cpu")
    inputs = load_file(str(states))
    logits = engine.run_step(inputs["input_ids"], inputs["attention_mask"], inputs["position_ids"])[0]
    save_file({"logits": logits.float().contiguous()}, str(artifact.with_suffix(".logits.safetensors")))
    defaults = engine.manifest.get("decode") or {}
    if gen_length is None:  # the embedded model: task accuracy, like `dlmc eval --block-length 32`
        from dlmc.evaluate import evaluate

        name, config = decoder_config(engine.spec, None, {"block_length": 32}, defaults)
        report = evaluate(engine, engine.spec, engine.tokenizer, name, config, per_task=per_task,
                          batch_size=4 * per_task)
        out = {"accuracy": report.accuracy, "per_task": report.per_task, "seconds": report.seconds,
               "outputs": [c.output_ids for c in report.completions]}
    else:  # random weights: only agreement and speed mean something
        name, config = decoder_config(engine.spec, None, {"gen_length": gen_length, "steps": gen_length,
                                                          "block_length": gen_length}, defaults)
        ids = [[(7 * i + j) % 200 + 10 for j in range(16)] for i in range(prompts)]
        start = time.perf_counter()
        completions = generate(engine, engine.spec, None, ids, name, config)
        out = {"seconds": time.perf_counter() - start, "outputs": [c.output_ids for c in completions]}
    out["tokens"] = sum(len(o) for o in out["outputs"])
    out["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(out))


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM). Not getrusage's ru_maxrss: Linux keeps that across
    exec, so a child would report its parent's size when the parent is larger."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def logit_fidelity(logits: torch.Tensor, reference: torch.Tensor, masked: torch.Tensor) -> dict[str, float]:
    """The whole step against the float step on the same states: logits SQNR, and KL(float || this)
    of the token distributions at the masked positions (what the decoder samples from)."""
    from dlmc.quant.formats import sqnr_db

    log_p, log_q = reference.log_softmax(-1), logits.log_softmax(-1)  # [B, L, V]
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)[masked]  # [masked positions]
    return {"logit_sqnr": sqnr_db(reference, logits), "kl": float(kl.mean())}


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    same = total = 0
    for x, y in zip(a, b, strict=True):
        same += sum(p == q for p, q in zip(x, y))
        total += max(len(x), len(y))
    return same / total


def table(model_dir: Path, args: argparse.Namespace, synthetic: bool) -> list[dict]:
    from dlmc.compiler import compile_model
    from dlmc.recipe import parse_recipe

    from safetensors.torch import load_file, save_file

    rows = []
    workdir = args.workdir / ("synthetic" if synthetic else "embedded")
    workdir.mkdir(parents=True, exist_ok=True)
    states = held_out_states(model_dir, synthetic)
    save_file(dict(zip(("input_ids", "attention_mask", "position_ids"), states, strict=True)),
              str(workdir / "states.safetensors"))
    for name, scheme in SCHEMES.items():
        if args.only and name != "float" and name not in args.only:
            continue
        out = workdir / name.replace(" ", "_")
        start = time.perf_counter()
        source, dtype = "random" if synthetic else "tasks", "bfloat16" if name == "bf16" else "float32"
        compile_model(model_dir, parse_recipe(recipe(scheme, args.backend, source, name in ROTATED, dtype)), out,
                      force=True)
        compile_s = time.perf_counter() - start
        cmd = [sys.executable, __file__, "--child", str(out), "--per-task", str(args.per_task),
               "--states", str(workdir / "states.safetensors")]
        if synthetic:
            cmd += ["--gen-length", str(args.synthetic_gen), "--prompts", "2"]
        result = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        size, ratio = weight_bytes(out)
        report = json.loads((out / "quant_report.json").read_text())[0]["summary"] if scheme is not None else None
        row = {"scheme": name, "accuracy": result.get("accuracy"), "per_task": result.get("per_task"),
               "weights_mb": size / 2**20, "linears_vs_bf16": ratio, "peak_rss_mb": result["peak_rss_mb"],
               "tokens_per_s": result["tokens"] / result["seconds"], "compile_s": compile_s,
               "sqnr_median": report and report["output_sqnr_db_median"],
               "sqnr_min": report and report["output_sqnr_db_min"],
               "outputs": result["outputs"], "logits": load_file(str(out.with_suffix(".logits.safetensors")))["logits"]}
        rows.append(row)
        print(f"  {name}: done in {compile_s:.0f}s + {result['seconds']:.0f}s", file=sys.stderr, flush=True)
    base = rows[0]
    masked = states[0] == read_spec(model_dir).mask_token_id  # [B, L]
    for row in rows:
        row["agreement"] = agreement(row["outputs"], base["outputs"])
        row |= logit_fidelity(row["logits"], base["logits"], masked)
        if base["accuracy"]:
            row["retention"] = row["accuracy"] / base["accuracy"] if row["accuracy"] is not None else None
    return rows


def read_spec(model_dir: Path):
    from dlmc.models import read_model_config

    return read_model_config(model_dir)[2]


def markdown(rows: list[dict], with_accuracy: bool) -> str:
    head = ["scheme"] + (["accuracy", "retention"] if with_accuracy else []) + [
        "token agreement", "step logits SQNR (dB)", "KL (1e-6)", "layer SQNR median / worst (dB)",
        "linears vs bf16", "weights file", "peak RSS", "tokens/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["scheme"]]
        if with_accuracy:
            cells += [f"{r['accuracy']:.1%}", f"{r['retention']:.1%}"]
        cells += [
            f"{r['agreement']:.1%}",
            "-" if r["logit_sqnr"] == float("inf") else f"{r['logit_sqnr']:.1f}", f"{r['kl'] * 1e6:.2f}",
            "-" if r["sqnr_median"] is None else f"{r['sqnr_median']:.1f} / {r['sqnr_min']:.1f}",
            ("100% (bf16)" if r["scheme"] == "bf16" else "200% (fp32)") if r["linears_vs_bf16"] is None
            else f"{r['linears_vs_bf16']:.1%}",
            f"{r['weights_mb']:.2f} MB", f"{r['peak_rss_mb']:.0f} MB", f"{r['tokens_per_s']:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/dlmc-quant"))
    ap.add_argument("--per-task", type=int, default=10, help="held-out prompts per task (4 tasks)")
    ap.add_argument("--backend", default="eager", choices=["eager", "inductor", "onnxrt"])
    ap.add_argument("--only", nargs="*", help="scheme names to run (float always runs)")
    ap.add_argument("--synthetic", action="store_true", help="also the 134M random-weight checkpoint")
    ap.add_argument("--synthetic-gen", type=int, default=32)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--gen-length", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--prompts", type=int, default=2, help=argparse.SUPPRESS)
    ap.add_argument("--states", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child_eval(args.child, args.per_task, args.prompts, args.gen_length, args.states)
        return
    torch.set_num_threads(1)
    from dlmc.generation import default_model_dir

    results = {"embedded": table(default_model_dir(), args, synthetic=False)}
    print(f"embedded default model (3.46M), backend {args.backend}, {4 * args.per_task} held-out prompts:")
    print(markdown(results["embedded"], with_accuracy=True))
    if args.synthetic:
        from dlmc.testing.fixtures import write_checkpoint

        model_dir = args.workdir / "llada-134m"
        if not (model_dir / "config.json").is_file():
            write_checkpoint("llada", model_dir, hidden=768, layers=12, heads=12, kv_heads=12, intermediate=2048,
                             vocab=32000, max_length=512, shards=3, tokenizer=False)
        results["synthetic"] = table(model_dir, args, synthetic=True)
        print(f"\nsynthetic LLaDA-format checkpoint (134M, random weights), backend {args.backend}, "
              f"2 prompts x {args.synthetic_gen} tokens:")
        print(markdown(results["synthetic"], with_accuracy=False))
    if args.json:
        for rows in results.values():
            for r in rows:
                r.pop("outputs"), r.pop("logits")
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
