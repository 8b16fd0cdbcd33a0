"""What `dlmc inspect` prints for a compiled artifact: its manifest (`dlmc.artifact`) as labelled lines."""

from __future__ import annotations

from typing import Any


def summarize(manifest: dict[str, Any]) -> dict[str, str]:
    """The lines `dlmc inspect` prints for an artifact: label -> value."""
    spec, sig, backend = manifest["spec"], manifest["signature"], manifest["backend"]
    attention = spec["attention"] + (f" (block size {spec['block_size']})" if spec.get("block_size") else "")
    inputs, outputs = _tensors(sig["inputs"]), _tensors(sig["outputs"])
    buckets = f", seq buckets {sig['seq_buckets']}" if sig.get("seq_buckets") else ""
    passes = ", ".join(f"{p['name']}{'' if p['exact'] else ' (approximate)'}" for p in manifest.get("passes", []))
    total = sum(entry["bytes"] for entry in manifest["files"].values())
    sizes = ", ".join(f"{name} {_size(entry['bytes'])}" for name, entry in manifest["files"].items())
    decode = manifest.get("decode") or {}
    return {
        "format": f"{manifest['format']} v{manifest['format_version']} (dlmc {manifest['dlmc_version']}, "
        f"torch {manifest['torch_version']})",
        "family": spec["family"],
        "model": _model_line(manifest.get("model") or {}),
        "attention": attention,
        "recipe": manifest["recipe"].get("description") or "(no description)",
        "passes": passes or "(none)",
        "exact": "yes: reproduces the reference decoder" if manifest.get("exact") else "no: approximate passes",
        "backend": f"{backend['name']} on {backend.get('device', 'cpu')}",
        "inputs": inputs,
        "outputs": outputs,
        "shapes": f"batch {sig['batch'][0]}-{sig['batch'][1]}, seq {sig['seq'][0]}-{sig['seq'][1]}{buckets}",
        "cache": ", ".join(f"{k} {v}" for k, v in sig["cache"].items() if v is not None) if sig.get("cache") else "none",
        "kernels": ", ".join(sig.get("kernels") or []) or "(none)",
        "decoder": decode.get("decoder") or "(the model's own)",
        "size": f"{_size(total)} in {len(manifest['files'])} files: {sizes}",
    } | _programs(manifest)


def _tensors(specs: list[dict[str, Any]]) -> str:
    return ", ".join(f"{t['name']}[{','.join(map(str, t['shape']))}] {t['dtype']}" for t in specs)


def _programs(manifest: dict[str, Any]) -> dict[str, str]:
    """A multi-program artifact's other programs (DiffusionGemma's encoder; the lines above are its decoder)."""
    others = {name: entry for name, entry in (manifest.get("programs") or {}).items() if name != "layout"}
    lines = {}
    for name, entry in others.items():
        sig = entry["signature"]
        lines[f"{name} program"] = f"inputs {_tensors(sig['inputs'])} -> outputs {_tensors(sig['outputs'])}"
    return lines


def _model_line(model: dict[str, Any]) -> str:
    line = f"{model.get('source', '?')} ({model.get('checkpoint_dtype', '?')}"
    if model.get("weights"):
        line += f", {model['weights']} dequantized on load"
    return line + ")"


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
