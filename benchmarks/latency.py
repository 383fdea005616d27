"""Benchmark: batch-1 latency of trained students, side by side on the same questions.

Loads each student once (no Ray: one process, one device), then answers the same questions one
at a time, rotating through the students question by question so that drift in the machine's
speed hits every student alike. Greedy decoding through the evaluation's own code (prefix,
skip-aware decoding for STT, eos cut), the same max_new_tokens for all.

    python benchmarks/latency.py --student std_cot=runs/gpu-std-cot --student cwt=runs/gpu-cwt-average \
        --student stt=runs/gpu-cwt-average [--questions 50] [--deadline 300] [--split test]

A student is METHOD=RUN_DIR (its weights are RUN_DIR/students/METHOD, its config RUN_DIR/config.yaml).
`--deadline` stops after the round in progress when the time is up, so every student has
answered the same questions. Prints a table (mean, p50, p90 seconds, tokens, ms per token, ratio
to the first student) and a final JSON line.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

from cwt_ray.config import load_config
from cwt_ray.decode import decision_processor, generate
from cwt_ray.samples import SampleBuilder
from cwt_ray.student import load_model, load_tokenizer


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--student", action="append", required=True, help="METHOD=RUN_DIR, e.g. cwt=runs/gpu-cwt-average")
    p.add_argument("--questions", type=int, default=50)
    p.add_argument("--deadline", type=float, default=0, help="seconds; 0 = none")
    p.add_argument("--split", default="test")
    p.add_argument("--warmup", type=int, default=1, help="untimed questions per student first")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    students = []
    for spec in args.student:
        method, _, run = spec.partition("=")
        run_dir = Path(run)
        cfg = load_config(run_dir / "config.yaml")
        folder = run_dir / "students" / method
        tok = load_tokenizer(folder)
        model = load_model(folder).to(device).eval()
        students.append({"label": f"{method} ({run_dir.name})", "method": method, "cfg": cfg, "tok": tok,
                         "model": model, "builder": SampleBuilder(tok, cfg), "secs": [], "tokens": []})
    max_new = {s["cfg"].eval.max_new_tokens for s in students}
    if len(max_new) != 1:
        print(f"students disagree on eval.max_new_tokens: {sorted(max_new)}", file=sys.stderr)
        return 2
    max_new = max_new.pop()
    first_run = Path(args.student[0].partition("=")[2])
    table = pq.read_table(first_run / "data" / f"{args.split}.parquet", columns=["id", "question"]).sort_by("id")
    questions = table.column("question").to_pylist()[: args.questions + args.warmup]

    def answer(s, q):
        prefix = s["builder"].inference_prefix(q, s["method"])
        proc = None
        if s["method"] == "stt" and s["cfg"].stt.style == "marker":
            proc = decision_processor(s["tok"], s["builder"], s["cfg"].stt.skip_confidence, s["cfg"].stt.skippable, 1)
        if device.type == "cuda":
            torch.cuda.synchronize()
        new, wall = generate(s["model"], s["tok"], [prefix], max_new, proc)
        return wall, len(new[0])

    t0 = time.perf_counter()
    done = 0
    for i, q in enumerate(questions):
        timed = i >= args.warmup
        for s in (students if i % 2 == 0 else students[::-1]):   # alternate who goes first
            wall, n = answer(s, q)
            if timed:
                s["secs"].append(wall)
                s["tokens"].append(n)
        if timed:
            done += 1
            if done % 5 == 0:
                print(f"[latency] {done}/{len(questions) - args.warmup} questions, {time.perf_counter() - t0:.0f}s", flush=True)
        if args.deadline and time.perf_counter() - t0 > args.deadline:
            print(f"[latency] deadline reached after {done} questions", flush=True)
            break
    base = statistics.mean(students[0]["secs"]) if students[0]["secs"] else float("nan")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\nbatch-1 latency, {done} questions of {args.split} (first by id), greedy, max_new_tokens {max_new}, "
          f"hf-generate fp32 on {name}")
    print(f"{'student':<32} {'mean s':>7} {'p50 s':>7} {'p90 s':>7} {'tokens':>7} {'ms/token':>8} {'ratio':>6}")
    out = {}
    for s in students:
        secs = sorted(s["secs"])
        if not secs:
            continue
        row = {"mean_s": statistics.mean(secs), "p50_s": statistics.median(secs),
               "p90_s": secs[min(len(secs) - 1, int(0.9 * len(secs)))], "tokens": statistics.mean(s["tokens"]),
               "ms_per_token": 1000 * sum(secs) / max(1, sum(s["tokens"]))}
        row["ratio"] = row["mean_s"] / base
        out[s["label"]] = row
        print(f"{s['label']:<32} {row['mean_s']:>7.2f} {row['p50_s']:>7.2f} {row['p90_s']:>7.2f} {row['tokens']:>7.1f} "
              f"{row['ms_per_token']:>8.1f} {row['ratio']:>6.2f}")
    print(json.dumps({"benchmark": "latency", "device": name, "questions": done, "split": args.split,
                      "max_new_tokens": max_new, "backend": "hf-generate", "batch_size": 1, "students": out}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
