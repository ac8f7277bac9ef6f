"""The server under load: rounds of concurrent streaming clients on loopback, with step-level
batching on and off; its memory round after round; how fast it drops a client that goes away and
stops on Ctrl-C.

    python benchmarks/serve.py [--model DIR] [--clients 32] [--rounds 20] [--off-rounds 3] [--max-tokens 32]

Starts `remask serve` as a separate process for each setting (its default sampler: dual cache,
threshold 0.9). Each round, `--clients` threads each stream one chat completion at once (the
question: the next line of a Tang couplet). A row per setting records requests/s, p50/p99 latency
(to the stream's end) and time to the first chunk, completion tokens/s, errors (must be 0), and the
server's resident memory before the load and after every round, at rest (0.5 s after its last answer) (`rss_mb_per_round`: flat after a
warm-up: the first quarter of the rounds, at least 2; `rss_spread_after_warmup` is (highest - lowest) /
lowest after it, `rss_mb_growth_per_round` the least-squares slope there). Then,
on a fresh server: the time from a client closing its connection (streaming and not) to the server
dropping its job, and from SIGINT to the server's exit with a long job running.

Without `--model` it serves a randomly initialised `tiny`-preset model (1.5M parameters) with a
character tokenizer of the built-in Tang poems, built seeded in a temporary directory: its answers
are noise, but every answer runs to max_tokens, so the work per round is fixed.
Writes benchmarks/results/serve.json.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import psutil
from _common import REPO_ROOT, ArgumentParser, run_main, write_result

from remask.data.corpora import tang300_poems
from remask.eval.reversal import poem_set, question

SETTLE_S = 0.5  # after each round, before its resident memory is read


def build_model(directory: Path) -> Path:
    """The default model: the tiny preset, random weights (seed 0), a character tokenizer of tang300."""
    from remask.checkpoint.storage import save_model
    from remask.config import preset
    from remask.data.corpora import BUILTIN_DIR, decode_text
    from remask.model import build_model as build
    from remask.tokenizer import Tokenizer

    tokenizer = Tokenizer.train([decode_text(BUILTIN_DIR / "tang300.txt")], kind="char")
    cfg = preset("tiny").with_tokens(tokenizer.special_ids, tokenizer.vocab_size)
    return save_model(build(cfg, seed=0), directory / "tiny-random", tokenizer=tokenizer)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server(model: Path, *options: str):
    """A `remask serve` process; yields (url, process)."""
    port = free_port()
    cmd = [sys.executable, "-m", "remask", "serve", "--model", str(model), "--port", str(port), *options]
    process = subprocess.Popen(cmd, env=os.environ | {"PYTHONPATH": str(REPO_ROOT / "src")}, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2).read()
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("the server did not start") from None
                time.sleep(0.2)
        yield url, process
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=30)


def health(url: str) -> dict:
    return json.loads(urllib.request.urlopen(f"{url}/health", timeout=10).read())


def stream_one(url: str, body: dict) -> dict:
    """One streamed chat completion: latency, time to the first chunk, completion tokens, error."""
    request = urllib.request.Request(f"{url}/v1/chat/completions", headers={"Content-Type": "application/json"},
                                     data=json.dumps(body | {"stream": True, "stream_options": {"include_usage": True}}).encode())
    start, first, tokens = time.perf_counter(), None, 0
    try:
        with urllib.request.urlopen(request, timeout=600) as reply:
            for line in reply:
                first = first if first is not None else time.perf_counter() - start
                if line.startswith(b"data: {"):
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        raise RuntimeError(chunk["error"]["message"])
                    tokens = (chunk.get("usage") or {}).get("completion_tokens", tokens)
        return {"latency": time.perf_counter() - start, "first": first or 0.0, "tokens": tokens, "error": None}
    except Exception as e:  # counted, not raised: the benchmark reports errors
        return {"latency": time.perf_counter() - start, "first": 0.0, "tokens": 0, "error": f"{type(e).__name__}: {e}"}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def rounds(url: str, process: psutil.Process, bodies: list[dict], clients: int, count: int) -> dict:
    """`count` rounds of `clients` concurrent streams; the setting's row."""
    before = process.memory_info().rss / 2**20
    results, per_round, wall = [], [], 0.0
    for _ in range(count):
        start = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            results += pool.map(lambda i: stream_one(url, bodies[i % len(bodies)]), range(clients))
        wall += time.perf_counter() - start
        time.sleep(SETTLE_S)  # the server at rest: its last rows freed (not counted in the wall time)
        per_round.append(process.memory_info().rss / 2**20)
    warmup = max(2, count // 4)  # the allocator settles while the batch's mix of rows varies
    settled = per_round[warmup:] or per_round
    latencies = [r["latency"] for r in results]
    return {"clients": clients, "rounds": count, "requests": len(results), "stream": True,
            "requests_per_s": len(results) / wall, "p50_ms": 1000 * percentile(latencies, 0.5),
            "p99_ms": 1000 * percentile(latencies, 0.99),
            "first_chunk_p50_ms": 1000 * percentile([r["first"] for r in results], 0.5),
            "tokens_per_s": sum(r["tokens"] for r in results) / wall, "errors": sum(r["error"] is not None for r in results),
            "error_examples": [r["error"] for r in results if r["error"]][:3], "rss_mb_before": before,
            "rss_mb_after": per_round[-1], "rss_mb_per_round": per_round,
            "warmup_rounds": min(warmup, count), "rss_spread_after_warmup": (max(settled) - min(settled)) / min(settled),
            "rss_mb_growth_per_round": slope(settled)}


def slope(values: list[float]) -> float:
    """The least-squares slope of `values` against their index (0 for fewer than two)."""
    n = len(values)
    if n < 2:
        return 0.0
    mean_x, mean_y = (n - 1) / 2, sum(values) / n
    return sum((i - mean_x) * (v - mean_y) for i, v in enumerate(values)) / sum((i - mean_x) ** 2 for i in range(n))


def long_request(url: str, stream: bool) -> http.client.HTTPConnection:
    """Start a long answer (480 positions, one per step) on a raw connection and return it once the
    server is denoising it."""
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=600)
    body = {"messages": [{"role": "user", "content": "床前明月光"}], "max_tokens": 480, "cache": "none",
            "parallel": "schedule", "stream": stream}
    connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    deadline = time.monotonic() + 60
    while health(url)["active"] == 0:
        if time.monotonic() > deadline:
            raise RuntimeError("the long request did not start")
        time.sleep(0.01)
    return connection


def disconnect_s(url: str, stream: bool) -> float:
    """Seconds from a client closing its connection mid-answer to the server dropping its job."""
    connection = long_request(url, stream)
    start = time.perf_counter()
    connection.sock.shutdown(socket.SHUT_RDWR)
    connection.close()
    while health(url)["active"]:
        if time.perf_counter() - start > 120:
            return float("inf")
        time.sleep(0.01)
    return time.perf_counter() - start


def ctrl_c(url: str, process: subprocess.Popen) -> dict:
    """SIGINT with a long non-streaming job running: seconds to exit, the exit code, what the client got."""
    connection = long_request(url, stream=False)
    got: dict = {}
    reader = threading.Thread(target=lambda: got.update(status=connection.getresponse().status), daemon=True)
    reader.start()
    start = time.perf_counter()
    process.send_signal(signal.SIGINT)
    code = process.wait(timeout=120)
    seconds = time.perf_counter() - start
    reader.join(timeout=5)
    return {"exit_s": seconds, "exit_code": code, "client_status": got.get("status"), "jobs_running": 1}


def main() -> None:
    ap = ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="a model directory (default: a random tiny model)")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--off-rounds", type=int, default=3, help="rounds with batching off (one request at a time)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=16)
    args = ap.parse_args()
    pairs = poem_set(tang300_poems()).pairs
    bodies = [{"messages": [{"role": "user", "content": question("poem", "forward", pairs[i]).text}],
               "max_tokens": args.max_tokens, "temperature": 0} for i in range(args.clients)]
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or build_model(Path(tmp))
        options = ["--max-batch", str(args.max_batch), "--max-queue", str(4 * args.clients)]
        results = {}
        for name, batching, count in (("batching_on", True, args.rounds), ("batching_off", False, args.off_rounds)):
            with server(model, *options, *([] if batching else ["--no-batching"])) as (url, process):
                stream_one(url, bodies[0])  # load everything once
                results[name] = {"setting": name, "batching": batching} | rounds(url, psutil.Process(process.pid), bodies,
                                                                                 args.clients, count)
        results["batching_speedup"] = results["batching_on"]["requests_per_s"] / results["batching_off"]["requests_per_s"]
        with server(model, *options) as (url, process):
            results["disconnect"] = {"stream_s": disconnect_s(url, True), "non_stream_s": disconnect_s(url, False),
                                     "completed": health(url)["completed"]}
            results["ctrl_c"] = ctrl_c(url, process)
    settings = vars(args) | {"model": str(args.model) if args.model else "random tiny preset (seed 0), tang300 characters",
                             "sampler": "remask serve's default (dual cache, threshold 0.9)"}
    write_result("serve", settings, results)


if __name__ == "__main__":
    run_main(main)
