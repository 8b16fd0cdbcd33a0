"""The short form of quant_report.json that `dlmc compile` prints."""

from __future__ import annotations

from typing import Any


def summary_lines(reports: list[dict[str, Any]], worst: int = 3) -> list[str]:
    lines = []
    for report in reports:
        summary, calibration = report["summary"], report["calibration"]
        experts = summary.get("expert_layers", 0)
        what = f"{summary['layers'] - experts} linear layers" + (f" and {experts} expert layers" if experts else "")
        lines.append(
            f"quantized {what} ({', '.join(summary['schemes'])}) on "
            f"{calibration['samples']} {calibration['source']} samples x {calibration['seq_len']} tokens"
        )
        lines.append(
            f"  layer output SQNR: median {summary['output_sqnr_db_median']:.1f} dB, "
            f"worst {summary['output_sqnr_db_min']:.1f} dB"
        )
        layers = sorted(report["layers"].items(), key=lambda kv: kv[1]["output_sqnr_db"])[:worst]
        for name, layer in layers:
            inputs = layer["inputs"]
            lines.append(
                f"  {name:28} {layer['output_sqnr_db']:6.1f} dB  input absmax {inputs['absmax']:.3g} "
                f"({inputs['max_over_median']:.0f}x median, {inputs['outlier_channels']} outlier channels)"
            )
    return lines
