"""Benchmark: the training defaults' effect on Std-CoT, old against new, on CPU.

    .venv/bin/python benchmarks/defaults_effect.py --out docs/results/defaults-effect-cpu-2026-12-06 \
        [--steps 40] [--seeds 0 1 2] [--train-size 2000] [--validation-size 64] [--report-only]

--report-only tabulates the runs that finished (their copies under --out), without training: what
to publish when the machine's time ran out before every seed did.

Arms (everything else identical: SmolLM2-135M, gsm_symbolic, Std-CoT, batch 8, lr 1e-4, clip 1.0):
- old: length-bucketed steps (train.bucket_factor 16), padded rows, constant learning rate, no warm-up
- new: the defaults, i.e. uniform random steps packed into rows, 5 % warm-up, then linear decay to 0
Runs alternate between the arms (old s0, new s0, old s1, ...) on one embedded Ray cluster, each a
real `cwt-ray train` through Ray Train. Reported per run: the held-out loss (the validation split's
Std-CoT samples, teacher-forced, token normaliser) every 10 steps and at the end, the training
loss over the last 10 steps, distinct gsm_symbolic templates per step (from the sample ids each
step logged), the real-token ratio and real tokens/s. Prints a table and a final JSON line, and
keeps each run's train_log.jsonl and train_metrics.json under --out.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

ARMS = {
    "old": ["train.packing=false", "train.bucket_factor=16", "train.lr_schedule=constant", "train.warmup_steps=0"],
    "new": [],
}


def templates_by_id(cfg) -> dict[str, int]:
    """gsm_symbolic's template (generator) index of every train record, by the record id the data
    stage gives it (cwt_ray.data: '<split>-<seed>-<index>')."""
    import reasoning_gym

    ds = reasoning_gym.create_dataset("gsm_symbolic", size=cfg.data.train_size, seed=cfg.data.train_seed)
    return {i: ds.task_indices[i] for i in range(cfg.data.train_size)}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--train-size", type=int, default=2000)
    p.add_argument("--validation-size", type=int, default=64)
    p.add_argument("--storage", default="runs/defaults-effect")
    p.add_argument("--report-only", action="store_true", help="tabulate the finished runs under --out, train nothing")
    p.add_argument("--runs", nargs="+", help="train only these of the plan, e.g. new-s0 old-s1 (the rest as found)")
    args = p.parse_args()

    import pyarrow.parquet as pq

    from cwt_ray.config import load_config
    from cwt_ray.cluster import ray_session
    from cwt_ray.pipeline import run_stages
    from cwt_ray.student import load_tokenizer, resolve_student
    from cwt_ray.train import load_samples

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = ["methods=[std_cot]", f"storage_path={args.storage}", f"data.train_size={args.train_size}",
              f"data.validation_size={args.validation_size}", "data.test_size=1", f"train.max_steps={args.steps}",
              "train.epochs=1", "train.batch_size=8", "train.micro_batch_size=8", "train.eval_every=10"]
    rows = []
    first = load_config("configs/experiments/quickstart_64.yaml", ["name=defaults-effect-old-s0", *common])
    plan = [(seed, arm) for seed in args.seeds for arm in ARMS]
    if not args.report_only:
        with ray_session(first):
            for seed, arm in plan:
                if args.runs and f"{arm}-s{seed}" not in args.runs:
                    continue
                name = f"defaults-effect-{arm}-s{seed}"
                cfg = load_config("configs/experiments/quickstart_64.yaml", [f"name={name}", *common, f"train.seed={seed}", *ARMS[arm]])
                print(f"[defaults-effect] {name}", flush=True)
                run_stages(cfg, stages=("data", "train"))
                keep(cfg, arm, seed, out)
    for seed, arm in plan:
        if (out / f"{arm}-s{seed}" / "train_metrics.json").is_file():
            rows.append(summarise(out, arm, seed))
    tok = load_tokenizer(resolve_student(first.student))
    # One template per record; std_cot has one sample per record, in the records' order minus drops.
    by_index = templates_by_id(first)
    for r in rows:   # every run has the same data; the run directory's own copy is read
        cfg = load_config("configs/experiments/quickstart_64.yaml", [f"name={r['run']}", *common])
        if not (cfg.run_dir / "data" / "train.parquet").is_file():
            cfg = first
        samples, _ = load_samples(cfg, "std_cot", cfg.run_dir, tok)
        ids = pq.read_table(cfg.run_dir / "data" / "train.parquet", columns=["id"]).column("id").to_pylist()
        index = {rid: int(rid.rsplit("-", 1)[-1]) for rid in ids}
        template = [by_index[index[s.rationale_id]] for s in samples]
        r["templates_per_step"] = statistics.mean(len({template[i] for i in step}) for step in r.pop("sample_ids"))
    report(rows, args, out)
    return 0


def keep(cfg, arm: str, seed: int, out: Path) -> None:
    """Copy a finished run's log and metrics under --out (published; the weights are not)."""
    dest = out / f"{arm}-s{seed}"
    dest.mkdir(exist_ok=True)
    for name in ("train_log.jsonl", "train_metrics.json"):
        shutil.copy(cfg.run_dir / "students" / "std_cot" / name, dest / name)


def summarise(out: Path, arm: str, seed: int) -> dict:
    folder = out / f"{arm}-s{seed}"
    log = [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]
    metrics = json.loads((folder / "train_metrics.json").read_text())
    return {"run": f"defaults-effect-{arm}-s{seed}", "arm": arm, "seed": seed, "steps": len(log),
            "final_val_loss": metrics["final_val_loss"], "val_losses": metrics["val_losses"],
            "train_loss_last10": statistics.mean(r["loss"] for r in log[-10:]),
            "real_token_ratio": metrics["real_token_ratio"], "real_tokens_per_s": metrics["processed_tokens_per_s"],
            "sample_ids": [r["sample_ids"] for r in log]}


def report(rows: list[dict], args, out: Path) -> None:
    print(f"\n{'arm':<5}{'seed':>5}{'held-out loss':>15}{'train loss (last 10)':>22}{'templates/step':>16}"
          f"{'real-token ratio':>18}{'real tok/s':>12}")
    for r in rows:
        print(f"{r['arm']:<5}{r['seed']:>5}{r['final_val_loss']:>15.4f}{r['train_loss_last10']:>22.4f}"
              f"{r['templates_per_step']:>16.2f}{r['real_token_ratio']:>18.3f}{r['real_tokens_per_s']:>12.0f}")
    arms = {}
    for arm in ARMS:
        mine = [r for r in rows if r["arm"] == arm]
        if not mine:
            continue
        vals = [r["final_val_loss"] for r in mine]
        arms[arm] = {"final_val_loss_mean": statistics.mean(vals),
                     "final_val_loss_sd": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                     "final_val_loss_min": min(vals), "final_val_loss_max": max(vals),
                     "templates_per_step_mean": statistics.mean(r["templates_per_step"] for r in mine),
                     "real_token_ratio_mean": statistics.mean(r["real_token_ratio"] for r in mine),
                     "real_tokens_per_s_median": statistics.median(r["real_tokens_per_s"] for r in mine)}
        a = arms[arm]
        print(f"{arm}: held-out loss {a['final_val_loss_mean']:.4f} +- {a['final_val_loss_sd']:.4f} "
              f"(min {a['final_val_loss_min']:.4f}, max {a['final_val_loss_max']:.4f}), "
              f"{a['templates_per_step_mean']:.2f} templates/step")
    result = {"benchmark": "defaults_effect", "steps": args.steps, "seeds": sorted({r["seed"] for r in rows}),
              "train_size": args.train_size,
              "validation_size": args.validation_size, "arms": arms, "runs": rows}
    (out / "defaults_effect.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
