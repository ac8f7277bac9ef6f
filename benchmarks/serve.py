"""The server under load: concurrent clients on loopback, with step-level batching on and off.

    python benchmarks/serve.py [--model DIR] [--clients 32] [--requests 128] [--max-tokens 32]

Starts `remask serve` as a separate process for each setting, lets `--clients` threads send
`--requests` chat completions in all (real questions: the next line of a Tang couplet), and
records requests/s, p50/p99 latency, completion tokens/s, errors (must be 0) and the server's
resident memory before and after the load (it must not grow without bound: the load runs twice
and the second round's growth is reported too). Writes benchmarks/results/serve.json.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
from _common import REPO_ROOT, write_result

from remask.data.corpora import tang300_poems
from remask.eval.reversal import poem_set, question


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict) -> tuple[float, int, str | None]:
    """(latency seconds, completion tokens, error)."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    try:
        reply = json.loads(urllib.request.urlopen(request, timeout=600).read())
        return time.perf_counter() - start, reply["usage"]["completion_tokens"], None
    except Exception as e:  # counted, not raised: the benchmark reports errors
        return time.perf_counter() - start, 0, f"{type(e).__name__}: {e}"


def load(url: str, questions: list[str], clients: int, max_tokens: int) -> dict:
    bodies = [{"messages": [{"role": "user", "content": q}], "max_tokens": max_tokens, "temperature": 0}
              for q in questions]
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda b: post(f"{url}/v1/chat/completions", b), bodies))
    wall = time.perf_counter() - start
    latencies = sorted(r[0] for r in results)
    return {"requests": len(results), "wall_s": wall, "requests_per_s": len(results) / wall,
            "p50_ms": 1000 * latencies[len(latencies) // 2],
            "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
            "tokens_per_s": sum(r[1] for r in results) / wall, "errors": sum(r[2] is not None for r in results),
            "error_examples": [r[2] for r in results if r[2]][:3]}


def measure(args, batching: bool, questions: list[str]) -> dict:
    port = free_port()
    cmd = [sys.executable, "-m", "remask", "serve", "--model", str(args.model), "--port", str(port),
           "--max-batch", str(args.max_batch), "--max-queue", str(args.requests)]
    if not batching:
        cmd.append("--no-batching")
    server = subprocess.Popen(cmd, env=os.environ | {"PYTHONPATH": str(REPO_ROOT / "src")})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("the server did not start") from None
                time.sleep(0.2)
        process = psutil.Process(server.pid)
        post(f"{url}/v1/chat/completions", {"messages": [{"role": "user", "content": questions[0]}], "max_tokens": 8})
        before = process.memory_info().rss
        first = load(url, questions, args.clients, args.max_tokens)
        middle = process.memory_info().rss
        second = load(url, questions, args.clients, args.max_tokens)
        after = process.memory_info().rss
    finally:
        server.terminate()
        server.wait(timeout=30)
    return second | {"clients": args.clients, "batching": batching, "rss_mb_before": before / 2**20,
                     "rss_mb_after": after / 2**20, "rss_mb_after_first_round": middle / 2**20,
                     "first_round": {k: first[k] for k in ("requests_per_s", "p50_ms", "p99_ms", "tokens_per_s", "errors")}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=Path("runs/reversal/mdm-sft/final"))
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=16)
    args = ap.parse_args()
    pairs = poem_set(tang300_poems()).pairs
    questions = [question("poem", "forward", pairs[i % len(pairs)]).text for i in range(args.requests)]
    results = {"batching_on": measure(args, True, questions), "batching_off": measure(args, False, questions)}
    on, off = results["batching_on"], results["batching_off"]
    results["batching_speedup"] = on["requests_per_s"] / off["requests_per_s"]
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    write_result("serve", settings, results)


if __name__ == "__main__":
    main()
