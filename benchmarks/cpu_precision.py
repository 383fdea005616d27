"""Benchmark: bf16 autocast vs fp32 on this CPU, for the matmuls that dominate SmolLM2 training.

Why: `train.precision=auto` picks bf16 only where the hardware computes it natively. On CPUs with
AVX512-BF16/AMX, oneDNN runs bf16 matmuls ~1.8x faster than fp32 (../shared/env.md); on CPUs
without them torch's autocast falls back to a reference GEMM that is far slower than fp32. This
script shows which case the machine is in, with the shapes of a SmolLM2-135M training step
(hidden 576, MLP 1536, vocabulary 49,152; 800 target tokens = a batch of 8 CWT samples).

    .venv/bin/python benchmarks/cpu_precision.py [--threads 2] [--repeats 3]

Alternating runs (fp32, bf16, fp32, ...); the table shows medians and the bf16/fp32 ratio; the last
line is JSON.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tokens", type=int, default=800)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from cwt_ray.train import native_bf16

    shapes = {"lm_head 576->49152": (576, 49152), "mlp 576->1536": (576, 1536)}
    results: dict[str, dict[str, list[float]]] = {}
    for name, (d_in, d_out) in shapes.items():
        x = torch.randn(args.tokens, d_in, requires_grad=True)
        w = torch.randn(d_out, d_in, requires_grad=True)

        def step(bf16: bool):
            def run():
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    y = x @ w.t()
                y.float().sum().backward()
            return run

        for bf16 in (False, True):   # warm-up: first calls pick kernels
            step(bf16)()
        runs = {"fp32": [], "bf16": []}
        for _ in range(args.repeats):
            runs["fp32"].append(timed(step(False)))
            runs["bf16"].append(timed(step(True)))
        results[name] = runs

    native = native_bf16(torch.device("cpu"))
    print(f"CPU: {torch.backends.cpu.get_cpu_capability()}, oneDNN bf16: {native}, {args.threads} threads, "
          f"{args.tokens} tokens, forward+backward, median of {args.repeats} alternating runs")
    print(f"{'matmul':<22} {'fp32 s':>8} {'bf16 s':>8} {'bf16/fp32 time':>15}")
    summary = {}
    for name, runs in results.items():
        f32, b16 = statistics.median(runs["fp32"]), statistics.median(runs["bf16"])
        summary[name] = {"fp32_s": f32, "bf16_s": b16, "bf16_over_fp32_time": b16 / f32}
        print(f"{name:<22} {f32:>8.3f} {b16:>8.3f} {b16 / f32:>15.2f}")
    print(f"train.precision=auto picks: {'bf16' if native else 'fp32'}")
    print(json.dumps({"benchmark": "cpu_precision", "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                      "onednn_bf16": native, "threads": args.threads, "tokens": args.tokens,
                      "repeats": args.repeats, "results": summary, "runs": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
