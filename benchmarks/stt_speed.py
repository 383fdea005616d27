"""Benchmark: tokens generated and latency of Std-CoT, CWT and STT students, in one run.

Runs (or resumes) the pipeline for a config whose methods include all three, so the three
students are evaluated by the same code, backend, batch size and max_new_tokens, one after the
other on the same machine; finished stages of an earlier run are reused. Prints a table with
ratios against Std-CoT and a final JSON line.

    .venv/bin/python benchmarks/stt_speed.py [--config configs/experiments/quickstart_64.yaml] [override ...]

Batch-1 latency is measured on the first `eval.latency_questions` questions of the split (one
question at a time, one actor); batched throughput on the whole split, generation time only.
"""
from __future__ import annotations

import argparse
import json
import sys

from cwt_ray.config import load_config
from cwt_ray.pipeline import run_stages

KEYS = ("accuracy", "complete", "tokens_generated", "skipped_per_answer", "latency_s", "latency_p90_s",
        "batched_questions_per_s", "batched_tokens_per_s")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="configs/experiments/quickstart_64.yaml")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    cfg = load_config(args.config, ["methods=[std_cot,cwt,stt]", *args.overrides])
    run_stages(cfg)
    run_dir = cfg.run_dir
    rows = {m: json.loads((run_dir / "evals" / m / "metrics.json").read_text()) for m in cfg.methods}
    skip = json.loads((run_dir / "skips" / "train" / "summary.json").read_text())
    base = rows["std_cot"]
    print(f"\n{cfg.name}: {base['n']} {cfg.eval.split} questions, student {cfg.student.name}, backend {base['backend']}, "
          f"max_new_tokens {cfg.eval.max_new_tokens}; latency = batch 1 on {base['latency_n']} questions; "
          f"throughput = batch {cfg.eval.batch_size}")
    print(f"{'method':<8} {'accuracy':>8} {'complete':>8} {'tokens':>7} {'x std':>6} {'skipped':>7} "
          f"{'lat s':>7} {'x std':>6} {'q/s':>6} {'x std':>6}")
    for m, r in rows.items():
        print(f"{m:<8} {r['accuracy']:>8.3f} {r['complete']:>8.2f} {r['tokens_generated']:>7.1f} "
              f"{r['tokens_generated'] / base['tokens_generated']:>6.2f} {r['skipped_per_answer']:>7.2f} "
              f"{r['latency_s']:>7.2f} {r['latency_s'] / base['latency_s']:>6.2f} "
              f"{r['batched_questions_per_s']:>6.2f} {r['batched_questions_per_s'] / base['batched_questions_per_s']:>6.2f}")
    print(f"skip data: {skip['skipped']}/{skip['rationales_in']} rationales with a skip, "
          f"{skip['chunks_skipped']}/{skip['skippable_chunks']} skippable chunks skipped ({skip['gate']} gate, "
          f"threshold {skip['threshold']})")
    result = {"config": args.config, "overrides": args.overrides, "student": cfg.student.name,
              "n": base["n"], "latency_n": base["latency_n"], "batch_size": cfg.eval.batch_size,
              "max_new_tokens": cfg.eval.max_new_tokens, "backend": base["backend"],
              "methods": {m: {k: r.get(k) for k in KEYS} for m, r in rows.items()},
              "ratios_vs_std_cot": {m: {"tokens_generated": r["tokens_generated"] / base["tokens_generated"],
                                        "latency_s": r["latency_s"] / base["latency_s"],
                                        "batched_questions_per_s": r["batched_questions_per_s"] / base["batched_questions_per_s"]}
                                    for m, r in rows.items()},
              "skip_data": {k: skip[k] for k in ("rationales_in", "skipped", "chunks_skipped", "skippable_chunks",
                                                  "gate", "threshold", "removal")}}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
