"""Load test of `dlmc serve`: concurrent streaming clients against a server in a subprocess.

    python benchmarks/serve_load.py                            # embedded model, 1, 4 and 8 clients
    python benchmarks/serve_load.py out/ --clients 8 --requests 64 --max-tokens 32 --block-length 32

Starts `dlmc serve` on 127.0.0.1 (the embedded model, or the checkpoint / artifact given), sends every
distinct prompt alone first (its solo answer), then for each client count runs that many client
threads, each sending streaming completions one after another until `--requests` are done or
`--duration` seconds have passed. Prints throughput (requests/s, answer tokens/s, canvas tokens/s:
every request decodes all max_tokens positions), the mean batch the worker ran (rows per batch; for a
fused LLaDA artifact, which batches at every denoising step, rows per step), p50/p99 latency and
p50/p99 time to the first streamed text, and checks that nothing is lost: every request answered,
every streamed answer equal to its solo answer. Exits 1 if anything was lost. Stops the server with SIGTERM at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import httpx

from dlmc import tasks


@dataclass
class Result:
    prompt: str
    text: str | None  # None: lost (an error or no answer)
    latency: float
    first_text: float | None  # seconds to the first non-empty streamed piece
    tokens: int


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", nargs="?", help="checkpoint or artifact directory (default: the embedded model)")
    parser.add_argument("--clients", default="1,4,8", help="comma-separated client counts, one table row each")
    parser.add_argument("--requests", type=int, default=48, help="requests per row (at most)")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds per row (at most)")
    parser.add_argument("--prompts", type=int, default=16, help="distinct held-out task prompts")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--block-length", type=int, default=None)
    parser.add_argument("--threshold", type=float, default=None)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="the server's torch threads")
    args = parser.parse_args()

    extra = {k: v for k, v in {"steps": args.steps, "block_length": args.block_length,
                               "threshold": args.threshold}.items() if v is not None}
    prompts = [e.prompt for e in tasks.held_out(-(-args.prompts // len(tasks.TASKS)))][: args.prompts]
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-c", "from dlmc.cli import app; app()", "serve", *([args.path] if args.path else []),
               "--port", str(port), "--max-batch", str(args.max_batch), "--threads", str(args.threads),
               "--max-queue", "1024", "--log-level", "warning"]
    server = subprocess.Popen(command)
    try:
        model = _wait_ready(url, server)
        body = {"model": model, "max_tokens": args.max_tokens, "seed": 0, **extra}
        with httpx.Client(timeout=600) as client:
            solo = {p: client.post(f"{url}/v1/completions", json=body | {"prompt": p}).json()["choices"][0]["text"]
                    for p in prompts}
        rows = [_row(url, body, prompts, solo, int(n), args) for n in args.clients.split(",")]
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(120)
    print(f"`{' '.join(['python', 'benchmarks/serve_load.py', *sys.argv[1:]])}`; server exit code {code}")
    print(f"CPU: {_cpu()}; server: --threads {args.threads} --max-batch {args.max_batch}; max_tokens "
          f"{args.max_tokens} {json.dumps(extra) if extra else ''}; {len(prompts)} distinct prompts, streamed")
    print()
    print("| clients | requests | lost | ≠ solo | mean batch | req/s | answer tok/s | canvas tok/s | p50 latency s | p99 latency s "
          "| p50 first text s | p99 first text s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(str(v) for v in row.values()) + " |")
    if any(row["lost"] or row["≠ solo"] for row in rows):
        sys.exit(1)


def _row(url: str, body: dict, prompts: list[str], solo: dict[str, str], clients: int, args) -> dict:
    results: list[Result] = []
    lock = threading.Lock()
    counter = iter(range(args.requests))
    deadline = time.monotonic() + args.duration

    def client_thread() -> None:
        with httpx.Client(timeout=600) as client:
            while time.monotonic() < deadline:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                result = _stream(client, url, body | {"prompt": prompts[i % len(prompts)]})
                with lock:
                    results.append(result)

    batches_before = httpx.get(f"{url}/health").json()["batch_sizes"]
    start = time.perf_counter()
    threads = [threading.Thread(target=client_thread) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    batches = httpx.get(f"{url}/health").json()["batch_sizes"]
    runs = {int(size): count - batches_before.get(size, 0) for size, count in batches.items()}
    answered = [r for r in results if r.text is not None]
    latency = sorted(r.latency for r in answered)
    first = sorted(r.first_text for r in answered if r.first_text is not None)
    return {
        "clients": clients, "requests": len(results), "lost": len(results) - len(answered),
        "≠ solo": sum(r.text != solo[r.prompt] for r in answered),
        "mean batch": f"{sum(k * v for k, v in runs.items()) / max(sum(runs.values()), 1):.1f}",
        "req/s": f"{len(answered) / wall:.2f}", "answer tok/s": f"{sum(r.tokens for r in answered) / wall:.0f}",
        "canvas tok/s": f"{len(answered) * args.max_tokens / wall:.0f}",
        "p50 latency": f"{_pct(latency, 50):.3f}", "p99 latency": f"{_pct(latency, 99):.3f}",
        "p50 first": f"{_pct(first, 50):.3f}", "p99 first": f"{_pct(first, 99):.3f}",
    }


def _stream(client: httpx.Client, url: str, body: dict) -> Result:
    start = time.perf_counter()
    pieces, first, tokens = [], None, 0
    body = body | {"stream": True, "stream_options": {"include_usage": True}}
    try:
        with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            if response.status_code != 200:
                return Result(body["prompt"], None, 0.0, None, 0)
            done = False
            for line in response.iter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    chunk = json.loads(line[len("data: "):])
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
                    for choice in chunk.get("choices", []):
                        if choice["text"] and first is None:
                            first = time.perf_counter() - start
                        pieces.append(choice["text"])
    except httpx.HTTPError:
        return Result(body["prompt"], None, 0.0, None, 0)
    text = "".join(pieces) if done else None
    return Result(body["prompt"], text, time.perf_counter() - start, first, tokens)


def _pct(values: list[float], q: int) -> float:
    if not values:
        return float("nan")
    return values[0] if len(values) == 1 else statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, server: subprocess.Popen) -> str:
    """The served model's id, once the server answers."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"the server exited with {server.returncode}")
        try:
            return httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        except httpx.TransportError:
            time.sleep(0.2)
    sys.exit("the server did not start in 300 s")


def _cpu() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        name = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        name = "unknown"
    return f"{name}, {os.cpu_count()} cores"


if __name__ == "__main__":
    main()
