"""Benchmark (exact counts, no timing): what each training schedule makes the student compute.

For a config's data and chunks, builds the samples of Std-CoT and of CWT under each schedule
(`shuffle`, `per_rationale`, `single_pass`) with the project's own code, cuts one epoch into
optimizer steps and micro-batches exactly as the training loop does (`batches.epoch_steps`,
`worker_share`, `micro_batches`, `collate`: packed rows by default, `train.packing=false` for one
right-padded row per sample), and counts:
- processed tokens per supervised token (the cost of re-encoding each chunk's prefix), and
- the real-token ratio (non-padding tokens / tokens computed), for several micro-batch sizes.
Counts are deterministic, so the machine's load does not matter.

    .venv/bin/python benchmarks/schedule_tokens.py [--config configs/experiments/quickstart_64.yaml] [--micro 8 4 2]

Prints a table and a final JSON line.
"""
from __future__ import annotations

import argparse
import json
import sys

from cwt_ray.config import load_config
from cwt_ray.cluster import ray_session
from cwt_ray.pipeline import run_stages
from cwt_ray.student import load_tokenizer, resolve_student
from cwt_ray.batches import collate, epoch_steps, micro_batches, worker_share
from cwt_ray.train import load_samples


def count(samples, batch_size: int, micro: int, workers: int, schedule: str, bucket_factor: int, seed: int,
          pack_tokens: int | None) -> dict:
    processed = computed = supervised = 0
    for step in epoch_steps(samples, batch_size, seed, 0, schedule, bucket_factor):
        for rank in range(workers):
            for mb in micro_batches(worker_share(step, rank, workers), samples, micro):
                batch = collate([samples[i] for i in mb], 0, pack_tokens)   # the forward pass's real layout
                processed += batch.real_tokens
                computed += batch.computed_tokens
                supervised += sum(samples[i].supervised for i in mb)
    return {"processed_per_supervised": processed / supervised, "real_token_ratio": processed / computed,
            "supervised_tokens": supervised, "processed_tokens": processed}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="configs/experiments/quickstart_64.yaml")
    p.add_argument("--micro", type=int, nargs="+", default=[8, 4, 2])
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    cfg = load_config(args.config, ["methods=[std_cot,cwt]", *args.overrides])
    with ray_session(cfg):
        run_stages(cfg, stages=("data", "chunk"))
    tok = load_tokenizer(resolve_student(cfg.student))
    t = cfg.train
    pack = (t.pack_tokens or cfg.student.max_length) if t.packing else None
    rows = []
    for method, schedule in (("std_cot", "shuffle"), ("cwt", "shuffle"), ("cwt", "per_rationale"), ("cwt", "single_pass")):
        run_cfg = cfg.model_copy(deep=True)
        run_cfg.train.cwt_schedule = schedule
        samples, _ = load_samples(run_cfg, method, cfg.run_dir, tok)
        for micro in args.micro:
            if (t.batch_size // t.num_workers) % micro:
                continue
            c = count(samples, t.batch_size, micro, t.num_workers, schedule if method == "cwt" else "shuffle",
                      t.bucket_factor, t.seed, pack)
            rows.append({"method": method, "schedule": schedule, "samples": len(samples), "micro_batch": micro, **c})
    layout = f"packed into rows of <= {pack} tokens" if pack else "padded rows"
    print(f"\n{cfg.name}: batch {t.batch_size}, {t.num_workers} worker(s), {layout}, bucket_factor {t.bucket_factor}, one epoch")
    print(f"{'method':<8} {'schedule':<14} {'samples':>7} {'micro':>5} {'processed/supervised':>21} {'real-token ratio':>17}")
    for r in rows:
        print(f"{r['method']:<8} {r['schedule']:<14} {r['samples']:>7} {r['micro_batch']:>5} "
              f"{r['processed_per_supervised']:>21.2f} {r['real_token_ratio']:>17.3f}")
    print(json.dumps({"benchmark": "schedule_tokens", "config": args.config, "overrides": args.overrides,
                      "batch_size": t.batch_size, "bucket_factor": t.bucket_factor, "pack_tokens": pack, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
