"""Benchmark: Ray Train (1 worker) vs a plain PyTorch loop, same model, data, batch and seed.

Alternating runs on one embedded Ray cluster (this machine is noisy: read the ratio of medians).
Each run starts in a fresh process, as it would for a user: Ray Train starts a new worker per fit,
and the plain loop runs in a new Python process (no Ray) per run. A plain loop repeated inside one
warm process gets faster run after run on CPU (91 -> 106 -> 110 tok/s here: allocator and oneDNN
caches already hold the same shapes), which a fresh Ray worker never sees; `--plain-in-process`
keeps that mode for comparison. "Ray Train" is cwt-ray's real training path (`train.train_method`: TorchTrainer,
DDP wrapper, our loss head and normaliser, checkpoints); "plain" is `plain_loop.plain_train` (benchmarks/plain_loop.py) with the
same loss module (so the ratio is what Ray Train costs); "plain_full_head" is the same loop with
Hugging Face's full logits, the loop most people would write. All report steady-state processed
tokens/s (the first step excluded). The loss curves must agree before any timing is trusted.

    .venv/bin/python benchmarks/train_throughput.py [--config configs/experiments/quickstart_64.yaml] [--steps 8] \
        [--repeats 5] [--method cwt] [override ...]

Prints a table and a final JSON line. Target: Ray Train >= 0.95x the plain loop.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from cwt_ray.config import load_config
from cwt_ray.cluster import ray_session
from cwt_ray.pipeline import prepare_train_storage, run_stages, student_info
from plain_loop import plain_train  # benchmarks/plain_loop.py (this folder is on sys.path)
from cwt_ray.student import resolve_student
from cwt_ray.train import resolve_precision, train_method


def steady_tps(rows: list[dict], warmup: int = 1, key: str = "processed_tokens") -> float:
    rows = rows[warmup:] if len(rows) > warmup else rows
    return sum(r[key] for r in rows) / sum(r["step_time_s"] for r in rows)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="configs/experiments/quickstart_64.yaml")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--method", default="cwt", choices=["std_cot", "cwt"])
    p.add_argument("--warmup", type=int, default=1, help="steps left out of the steady state (same for every system)")
    p.add_argument("--no-full-head", action="store_true", help="skip the plain loop with HF's full logits (saves a third)")
    p.add_argument("--plain-in-process", action="store_true",
                   help="run the plain loop in this (warm) process instead of a fresh one per run")
    p.add_argument("--child", nargs=2, metavar=("HEAD", "OUT"), help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    cfg = load_config(args.config, ["name=bench-train-throughput", f"methods=[{args.method}]",
                                    f"train.max_steps={args.steps}", "train.num_workers=1", *args.overrides])
    run_dir = cfg.run_dir
    if args.child:   # one plain-loop run in a fresh process (no Ray), rows to a JSON file
        head, out = args.child
        rows = plain_train(cfg, args.method, run_dir, resolve_student(cfg.student), head)
        Path(out).write_text(json.dumps(rows))
        return 0

    def plain_rows(head: str) -> list[dict]:
        if args.plain_in_process:
            return plain_train(cfg, args.method, run_dir, student, head)
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            subprocess.run([sys.executable, __file__, "--config", args.config, "--steps", str(args.steps),
                            "--method", args.method, "--child", head, f.name, *args.overrides], check=True)
            return json.loads(Path(f.name).read_text())

    load0 = os.getloadavg()[0]
    results = {"ray_train": [], "plain": []} if args.no_full_head else {"ray_train": [], "plain": [], "plain_full_head": []}
    losses = {}
    step_times = {k: [] for k in results}
    with ray_session(cfg):
        run_stages(cfg, stages=("data", "chunk"))
        student = resolve_student(cfg.student)
        for rep in range(args.repeats):
            order = ["plain", "ray_train", "plain_full_head"] if rep % 2 == 0 else ["ray_train", "plain", "plain_full_head"]
            if args.no_full_head:
                order.remove("plain_full_head")
            for system in order:
                t0 = time.perf_counter()
                if system.startswith("plain"):
                    rows = plain_rows("full" if system == "plain_full_head" else "supervised")
                else:
                    prepare_train_storage(run_dir, args.method, f"bench-{rep}", fresh=True)
                    train_method(cfg, args.method, run_dir, student, student_info(cfg, args.method))
                    log = (run_dir / "students" / args.method / "train_log.jsonl").read_text().splitlines()
                    rows = [json.loads(r) for r in log]   # the worker's own per-step log
                tps = steady_tps(rows, args.warmup)
                losses[system] = [r["loss"] for r in rows]
                step_times[system].append([round(r["step_time_s"], 3) for r in rows])
                results[system].append(tps)
                print(f"[bench] repeat {rep + 1}/{args.repeats} {system}: {tps:.0f} processed tok/s "
                      f"({time.perf_counter() - t0:.0f}s wall)", flush=True)
    # fp32 agrees to 1e-5 (tests/test_pipeline.py); under bf16 autocast the two heads multiply
    # matrices of different shapes, so rounding differs: compare at bf16's precision.
    precision = resolve_precision(cfg.train.precision, torch.device("cpu"), warn=False)
    tol = 1e-3 if precision == "fp32" else 2e-2
    agree = all(abs(a - b) <= tol * max(1.0, abs(b)) for other in results if other != "ray_train"
                for a, b in zip(losses["ray_train"], losses[other]))
    med = {k: statistics.median(v) for k, v in results.items()}
    ratio = med["ray_train"] / med["plain"]
    ratio_full = med["ray_train"] / med["plain_full_head"] if "plain_full_head" in med else None
    print(f"\n{cfg.student.name}, {args.method}, {args.steps} steps of batch {cfg.train.batch_size} "
          f"(micro {cfg.train.micro_batch_size}), {precision}, {cfg.train.cpus_per_worker:g} CPU threads; "
          f"load average {load0:.1f} -> {os.getloadavg()[0]:.1f}")
    print(f"{'system':<10} {'median tok/s':>12}  runs")
    for k, v in results.items():
        print(f"{k:<10} {med[k]:>12.0f}  {', '.join(f'{x:.0f}' for x in v)}")
    print(f"ratio ray_train / plain (same loss module) = {ratio:.3f} (bar: >= 0.95); "
          f"ray_train / plain_full_head = {ratio_full if ratio_full is None else round(ratio_full, 3)}; "
          f"loss curves agree: {agree}")
    print(json.dumps({"benchmark": "train_throughput", "config": args.config, "overrides": args.overrides,
                      "student": cfg.student.name, "method": args.method, "steps": args.steps,
                      "batch_size": cfg.train.batch_size, "micro_batch_size": cfg.train.micro_batch_size,
                      "precision": precision, "repeats": args.repeats, "tokens_per_s": results,
                      "median": med, "warmup_steps": args.warmup, "step_times_s": step_times, "ratio": ratio, "ratio_vs_full_head": ratio_full, "losses_agree": agree,
                      "load_average": [load0, os.getloadavg()[0]]}))
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
