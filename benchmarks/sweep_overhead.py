"""What a sweep trial costs: fixed part (worker start-up, model loads, data and chunk preparation,
scheduling) beside the training steps and generation, and trials per hour.

Runs the given sweep from scratch (--overwrite) and reads each trial's timings from trials.json:
    prepare   data + chunk stages (a copy from the sweep cache when an earlier trial had the same settings)
    train     TorchTrainer wall time; steps = optimizer steps only, so train - steps = trainer
              start-up, model load, checkpointing
    eval      Ray Data generation wall time; generate = generate() calls only
    fixed     trial wall - steps - generate

    python benchmarks/sweep_overhead.py                                   # the quickstart sweep (~1 h on 2 cores)
    python benchmarks/sweep_overhead.py configs/sweep_smoke.yaml storage_path=/tmp/bench   # minutes
Prints a table and a final JSON line.
"""
import argparse
import os
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cwt_ray.sweep import run_sweep  # noqa: E402
from cwt_ray.sweep_config import load_sweep  # noqa: E402

COLUMNS = [("prepare", "prepare_s"), ("train", "train_wall_s"), ("steps", "train_step_s"), ("eval", "eval_wall_s"),
           ("generate", "generate_s"), ("fixed", "fixed_s"), ("trial", "trial_wall_s")]


def finished_trials(sweep_dir: Path) -> list[dict]:
    """trials.json once the sweep wrote its report; for an interrupted sweep, each trial's last
    result in Ray Tune's experiment folder (result.json, one JSON object per report)."""
    if (sweep_dir / "trials.json").is_file():
        return json.loads((sweep_dir / "trials.json").read_text())
    rows = []
    for path in sorted((sweep_dir / "tune").glob("*/result.json")):
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        if not lines:
            continue
        m = json.loads(lines[-1])
        done = "trial_wall_s" in m
        # Tune names a trial's folder run_trial_<id>_<number>_<params>_<date>
        number = int(path.parent.name.split("_")[3]) if path.parent.name.count("_") > 3 else 0
        rows.append({"number": number, "metrics": m,
                     "status": "done" if done else "unfinished"})
    return sorted(rows, key=lambda r: r["number"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", nargs="?", default=str(ROOT / "configs" / "sweep_quickstart.yaml"))
    parser.add_argument("overrides", nargs="*", help="sweep overrides, e.g. num_samples=4 storage_path=/tmp/bench")
    parser.add_argument("--report-only", action="store_true",
                        help="do not run: read the finished trials of an existing (e.g. interrupted) sweep "
                             "directory; trials/hour is then over the trials' own wall time")
    args = parser.parse_args()
    sweep = load_sweep(args.sweep, ["debug.stop_after_trials=null", *args.overrides])
    t0 = time.perf_counter()
    if not args.report_only and run_sweep(sweep, overwrite=True) is None:
        sys.exit("interrupted")
    wall = time.perf_counter() - t0
    rows = [r for r in finished_trials(sweep.dir) if r["status"] == "done"]
    if not rows:
        sys.exit(f"no finished trial in {sweep.dir}")
    if args.report_only:
        wall = sum(r["metrics"]["trial_wall_s"] for r in rows)

    print(f"\n{'trial':>6} {'reused':>11} " + " ".join(f"{name:>9}" for name, _ in COLUMNS))
    for r in rows:
        m = r["metrics"]
        print(f"{r['number']:>6} {m['reused']:>11} " + " ".join(f"{m[key]:>9.1f}" for _, key in COLUMNS))
    mean = {key: sum(r["metrics"][key] for r in rows) / len(rows) for _, key in COLUMNS}
    print(f"{'mean':>6} {'':>11} " + " ".join(f"{mean[key]:>9.1f}" for _, key in COLUMNS))
    fresh = [r["metrics"]["prepare_s"] for r in rows if "chunk" not in r["metrics"]["reused"]]
    cached = [r["metrics"]["prepare_s"] for r in rows if "chunk" in r["metrics"]["reused"]]
    result = {
        "sweep": sweep.config.name, "trials": len(rows), "sweep_wall_s": round(wall, 1),
        "report_only": args.report_only, "load_average": [round(x, 1) for x in os.getloadavg()],
        "trials_per_hour": round(len(rows) / wall * 3600, 1),
        "mean_s": {name: round(mean[key], 1) for name, key in COLUMNS},
        "fixed_fraction": round(mean["fixed_s"] / mean["trial_wall_s"], 3),
        "train_startup_s": round(mean["train_wall_s"] - mean["train_step_s"], 1),
        "eval_startup_s": round(mean["eval_wall_s"] - mean["generate_s"], 1),
        "prepare_s_fresh_chunking": round(sum(fresh) / len(fresh), 1) if fresh else None,
        "prepare_s_cached_chunking": round(sum(cached) / len(cached), 1) if cached else None,
    }
    scope = ("over the finished trials' own wall time (sweep start-up, test evaluation and report not included)"
             if args.report_only else "over the whole sweep (Ray start-up, test evaluation and report included)")
    print(f"\nfixed cost per trial {mean['fixed_s']:.1f}s of {mean['trial_wall_s']:.1f}s "
          f"({result['fixed_fraction']:.0%}); {result['trials_per_hour']} trials/hour {scope}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
