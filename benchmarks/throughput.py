"""Forward and forward+backward throughput of the mask predictor, against the matmul peak.

    python benchmarks/throughput.py [--presets tiny small] [--seq-len 256] [--batch-size 8]

The machine's matmul peak (fp32 GEMM FLOP/s, or bf16 on CUDA) is measured in the same run, so the
figure to read is the achieved/peak ratio, not the absolute numbers (this machine is noisy).
Writes benchmarks/results/throughput.json.
"""

from __future__ import annotations

import time

import torch
from _common import ArgumentParser, positive_int, run_main, write_result

from remask.config import preset
from remask.model import build_model


def timed(fn, *, warmup: int, iters: int, device: str) -> float:
    """Median seconds per call of fn()."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def matmul_peak(device: str, dtype: torch.dtype, n: int) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = timed(lambda: a @ b, warmup=2, iters=7, device=device)
    return 2 * n**3 / seconds


def measure(name: str, seq_len: int, batch: int, device: str, dtype: torch.dtype, iters: int) -> dict:
    cfg = preset(name, max_sequence_length=max(seq_len, preset(name).max_sequence_length))
    model = build_model(cfg, device=device, dtype=dtype)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq_len), device=device)
    tokens = batch * seq_len
    flops_fwd = cfg.flops_per_token(seq_len) * tokens

    with torch.no_grad():
        fwd = timed(lambda: model(ids), warmup=2, iters=iters, device=device)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        model(ids).float().logsumexp(-1).mean().backward()

    fwd_bwd = timed(step, warmup=2, iters=iters, device=device)
    return {
        "parameters": cfg.num_parameters(),
        "forward_tokens_per_s": tokens / fwd,
        "forward_flops_per_s": flops_fwd / fwd,
        "forward_backward_tokens_per_s": tokens / fwd_bwd,
        "forward_backward_flops_per_s": 3 * flops_fwd / fwd_bwd,
    }


def main() -> None:
    ap = ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["tiny", "small"])
    ap.add_argument("--seq-len", type=positive_int, default=256)
    ap.add_argument("--batch-size", type=positive_int, default=8)
    ap.add_argument("--iters", type=positive_int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    torch.manual_seed(0)

    peak = matmul_peak(args.device, dtype, 4096 if args.device == "cuda" else 1024)
    results: dict = {"matmul_peak_flops_per_s": peak, "models": {}}
    for name in args.presets:
        r = measure(name, args.seq_len, args.batch_size, args.device, dtype, args.iters)
        r["forward_fraction_of_peak"] = r["forward_flops_per_s"] / peak
        r["forward_backward_fraction_of_peak"] = r["forward_backward_flops_per_s"] / peak
        results["models"][name] = r
    settings = {"seq_len": args.seq_len, "batch_size": args.batch_size, "dtype": str(dtype).removeprefix("torch."),
                "threads": torch.get_num_threads(), "iters": args.iters}
    write_result("throughput", settings, results, device=args.device)


if __name__ == "__main__":
    run_main(main)
