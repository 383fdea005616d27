"""Benchmark: the plain training loop on the main thread vs on a worker thread (as a Ray Train
worker runs it), each run in a fresh Python process, no Ray cluster running.

Part of explaining the Ray Train vs plain-loop gap on CPU (docs/results.md). The data and chunk
stages must already exist for the config (run `benchmarks/train_throughput.py` once, or
`cwt-ray chunk CONFIG`).

    PYTHONPATH=. .venv/bin/python benchmarks/loop_thread.py [--config configs/experiments/quickstart_64.yaml] \
        [--steps 5] [--repeats 2] [override ...]

Alternating runs (main, thread, thread, main, ...); prints a table and a final JSON line.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path


def child(args) -> None:
    from cwt_ray.config import load_config
    from plain_loop import plain_train   # benchmarks/plain_loop.py (this folder is on sys.path)
    from cwt_ray.student import resolve_student

    cfg = load_config(args.config, ["methods=[cwt]", f"train.max_steps={args.steps}", *args.overrides])
    out: dict = {}

    def run():
        out["rows"] = plain_train(cfg, "cwt", cfg.run_dir, resolve_student(cfg.student), "supervised")

    if args.child[0] == "thread":
        t = threading.Thread(target=run)
        t.start()
        t.join()
    else:
        run()
    Path(args.child[1]).write_text(json.dumps(out["rows"]))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="configs/experiments/quickstart_64.yaml")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    if args.child:
        child(args)
        return 0
    results: dict[str, list[float]] = {"main": [], "thread": []}
    for rep in range(args.repeats):
        for mode in (("main", "thread") if rep % 2 == 0 else ("thread", "main")):
            with tempfile.NamedTemporaryFile(suffix=".json") as f:
                subprocess.run([sys.executable, __file__, "--config", args.config, "--steps", str(args.steps),
                                "--child", mode, f.name, *args.overrides], check=True)
                rows = json.loads(Path(f.name).read_text())[1:]   # first step: warm-up
            results[mode].append(sum(r["processed_tokens"] for r in rows) / sum(r["step_time_s"] for r in rows))
            print(f"[bench] repeat {rep + 1}/{args.repeats} {mode}: {results[mode][-1]:.1f} processed tok/s", flush=True)
    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"{'loop on':<8} {'median tok/s':>12}  runs")
    for k, v in results.items():
        print(f"{k:<8} {med[k]:>12.1f}  {', '.join(f'{x:.1f}' for x in v)}")
    print(f"thread / main = {med['thread'] / med['main']:.3f}")
    print(json.dumps({"benchmark": "loop_thread", "config": args.config, "overrides": args.overrides,
                      "steps": args.steps, "tokens_per_s": results, "median": med,
                      "ratio_thread_over_main": med["thread"] / med["main"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
