"""The results table of a study: one row per method variant, from finished run directories.

    python benchmarks/study_table.py docs/results/gpu-h200-2026-11-26/gpu-* [--plot loss.png]

Reads each run's config.yaml, students/<method>/train_metrics.json and evals/<method>/ (metrics
and per-question records). Runs that differ only in train.seed are one variant: accuracy is the
mean over seeds with the spread (sample std) across seeds, and a 95 % bootstrap interval over
questions (questions resampled jointly for every seed: the test split is the same). Every variant
names its batching and learning-rate schedule, read from its config ("Std-CoT [bucketed x16,
constant lr]", "Std-CoT [packed, linear warm-up 5%]"), so runs made under different training
defaults are never merged as seeds of one variant. "vs Std-CoT" is the paired difference to the
Std-CoT variant with the same batching and schedule. Variants that were trained but not evaluated,
or not trained, are listed with their status, not dropped.
Prints a Markdown table and a final JSON line; nothing here is typed by hand.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import yaml

ORDER = ("std_cot", "cwt", "stt")


# The study protocol's value of settings that a run may change to test a hypothesis (e.g. why
# Std-CoT trails the reference): a run that differs here is its own variant, never "another seed".
# Batching and the learning-rate schedule are not here: every variant names them (arm()).
PROTOCOL = {("train", "max_grad_norm"): 1.0, ("prompt", "template"): "Question: {question}\nAnswer:\n",
            ("data", "source"): "gsm_symbolic"}

# A config.yaml without a key was written before that key existed, so it ran under the default of
# its day: no packing, length buckets of 16 x batch_size, constant learning rate, no warm-up.
OLD_TRAIN_DEFAULTS = {"packing": False, "pack_tokens": None, "bucket_factor": 16, "lr_schedule": "constant",
                      "warmup_steps": 0}


def batching(cfg: dict) -> str:
    """How a run cut its optimizer steps: 'packed' (padding-free rows), 'bucketed x16' (padded,
    length-sorted windows of 16 x batch_size) or 'random, padded' (uniform draws, padded)."""
    train = {**OLD_TRAIN_DEFAULTS, **(cfg.get("train") or {})}
    bucket = train["bucket_factor"] or 0
    order = f"bucketed x{bucket}" if bucket else "random"
    if not train["packing"]:
        return order if bucket else f"{order}, padded"
    max_length = (cfg.get("student") or {}).get("max_length")
    pack = train.get("pack_tokens")
    packed = "packed" if pack is None or pack == max_length else f"packed to {pack} tokens"
    return packed + (f", {order}" if bucket else "")


def warmup(cfg: dict) -> str:
    """The warm-up as configured: '10' (steps), '5%' (a share of the steps) or '' (none)."""
    train = cfg.get("train") or {}
    steps = train.get("warmup_steps")
    if steps is not None:
        return str(steps) if steps else ""
    ratio = train.get("warmup_ratio", 0)   # the newer knob; used only when warmup_steps is unset
    return f"{100 * ratio:g}%" if ratio else ""


def schedule(cfg: dict) -> str:
    """The learning-rate schedule: 'constant', 'linear, warm-up 10', 'linear, warm-up 5%', ..."""
    name = (cfg.get("train") or {}).get("lr_schedule", OLD_TRAIN_DEFAULTS["lr_schedule"])
    w = warmup(cfg)
    return name + (f", warm-up {w}" if w else "")


def arm(cfg: dict) -> str:
    """The training regime that every variant label carries, e.g. '[packed, linear warm-up 5%]'."""
    name = (cfg.get("train") or {}).get("lr_schedule", OLD_TRAIN_DEFAULTS["lr_schedule"])
    w = warmup(cfg)
    return f"[{batching(cfg)}, {name} " + (f"warm-up {w}]" if w else "lr]")


def variant(cfg: dict, method: str) -> str:
    chunk = (cfg.get("chunk") or {}).get("heuristic", "average")
    cwt_schedule = (cfg.get("train") or {}).get("cwt_schedule", "shuffle")
    label = f"CWT {chunk}" + (" single-pass" if cwt_schedule == "single_pass" else "")
    label = {"std_cot": "Std-CoT", "cwt": label}.get(method, f"STT on {label}")
    changed = [f"{key}={json.dumps(cfg[section][key])}" for (section, key), value in PROTOCOL.items()
               if key in (cfg.get(section) or {}) and cfg[section][key] != value]
    return f"{label} {arm(cfg)}" + (f" ({', '.join(changed)})" if changed else "")


def sweep_of(run: Path) -> str | None:
    """'<sweep>: key=value ...' when this run directory is a sweep's test evaluation of one trial
    (runs/<sweep>/test/<trial>/), naming the values the sweep chose; else None."""
    sweep_dir = run.parent.parent
    if run.parent.name != "test" or not (sweep_dir / "sweep.json").is_file():
        return None
    trials = sweep_dir / "trials.json"
    params = next((t["params"] for t in (json.loads(trials.read_text()) if trials.is_file() else [])
                   if t["trial_id"] == run.name), {})
    return " ".join([f"{sweep_dir.name}:", *(f"{k}={json.dumps(v)}" for k, v in params.items())]).rstrip(":")


def collect(run_dirs: list[Path]) -> dict:
    variants: dict[str, dict] = {}
    for run in run_dirs:
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        sweep = sweep_of(run)
        for method in cfg["methods"]:
            if sweep and not (run / "evals" / method).is_dir():
                continue   # a sweep's test folder evaluates the sweep's method only; the rest is its inputs
            key = variant(cfg, method) + (f", chosen on validation ({sweep})" if sweep else "")
            seed = (cfg.get("train") or {}).get("seed", 0)
            if any(r["seed"] == seed for r in variants.get(key, {}).get("runs", [])):
                key += f" [{run.name}]"   # same variant and seed again: a repeat, never "another seed"
            v = variants.setdefault(key, {"order": (ORDER.index(method), key), "seeds": [], "runs": [],
                                          "batching": batching(cfg), "schedule": schedule(cfg),
                                          "std_cot": f"Std-CoT {arm(cfg)}"})
            entry = {"run": run.name, "seed": seed, "status": "not trained"}
            tm = run / "students" / method / "train_metrics.json"
            if tm.is_file():
                entry["train"] = json.loads(tm.read_text())
                entry["status"] = "trained, not evaluated"
            em = run / "evals" / method / "metrics.json"
            if em.is_file():
                entry["eval"] = json.loads(em.read_text())
                rec = pq.read_table(run / "evals" / method / "records", columns=["id", "correct"]).to_pylist()
                entry["correct"] = {r["id"]: bool(r["correct"]) for r in rec}
                entry["status"] = "evaluated"
            v["runs"].append(entry)
    return variants


def bootstrap_ci(per_seed: list[dict], n_boot: int, rng) -> tuple[float, float]:
    ids = sorted(set.intersection(*(set(c) for c in per_seed)))
    mat = np.array([[c[i] for i in ids] for c in per_seed], dtype=float)   # seeds x questions
    idx = rng.integers(0, len(ids), size=(n_boot, len(ids)))
    means = mat[:, idx].mean(axis=2).mean(axis=0)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def summarise(variants: dict, n_boot: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for key, v in sorted(variants.items(), key=lambda kv: kv[1]["order"]):
        done = [r for r in v["runs"] if r["status"] == "evaluated"]
        trained = [r for r in v["runs"] if "train" in r]
        row = {"variant": key, "batching": v["batching"], "schedule": v["schedule"],
               "runs": [r["run"] for r in v["runs"]], "seeds_evaluated": len(done),
               "status": "evaluated" if done else (v["runs"][0]["status"])}
        if done:
            accs = [r["eval"]["accuracy"] for r in done]
            row["accuracy"] = statistics.mean(accs)
            row["accuracy_seed_std"] = statistics.stdev(accs) if len(accs) > 1 else None
            row["accuracy_ci95"] = bootstrap_ci([r["correct"] for r in done], n_boot, rng)
            row["n_questions"] = done[0]["eval"]["n"]
            for k in ("complete", "tokens_generated", "skipped_per_answer", "batched_questions_per_s", "latency_s"):
                vals = [r["eval"][k] for r in done if r["eval"].get(k) is not None]
                row[k] = statistics.mean(vals) if vals else None
            # How the speed columns were measured: named, since they mean nothing without it.
            row["generation"] = sorted({(r["eval"]["backend"], r["eval"]["batch_size"], r["eval"]["max_new_tokens"],
                                         r["eval"].get("latency_n", 0)) for r in done})
        if trained:
            # final_val_loss: the validation split's loss at the end of training (absent in older runs).
            for k in ("train_time_s", "processed_tokens", "supervised_tokens", "processed_per_supervised_token",
                      "real_token_ratio", "steps", "final_loss", "final_val_loss"):
                vals = [r["train"][k] for r in trained if r["train"].get(k) is not None]
                row[k] = statistics.mean(vals) if vals else None
        row["_correct"] = [r["correct"] for r in done]
        row["_std_cot"] = v["std_cot"]
        rows.append(row)
    # Paired difference to Std-CoT on the same questions: the interval that says whether a gap is real.
    # The Std-CoT compared with is the one trained with the same batching and schedule.
    for r in rows:
        base = next((b for b in rows if b["variant"] == r["_std_cot"] and b["_correct"]), None)
        ids = sorted(set.intersection(*(set(c) for c in r["_correct"] + base["_correct"]))) if (
            base is not None and r is not base and r["_correct"]) else []
        if ids:
            r["compared_with"] = base["variant"]
            a = np.array([[c[i] for i in ids] for c in r["_correct"]], dtype=float).mean(axis=0)
            b = np.array([[c[i] for i in ids] for c in base["_correct"]], dtype=float).mean(axis=0)
            idx = rng.integers(0, len(ids), size=(n_boot, len(ids)))
            diffs = (a[idx] - b[idx]).mean(axis=1)
            r["accuracy_minus_std_cot"] = float((a - b).mean())
            r["accuracy_minus_std_cot_ci95"] = [float(x) for x in np.percentile(diffs, [2.5, 97.5])]
    for r in rows:
        del r["_correct"], r["_std_cot"]
    return rows


def markdown(rows: list[dict]) -> str:
    def f(row, k, fmt, scale=1.0):
        return format(row[k] * scale, fmt) if row.get(k) is not None else "-"

    out = ["| variant | seeds | accuracy % [95% CI] | vs Std-CoT, points [95% CI] | complete % | tokens/answer | "
           "stages skipped/answer | batch-1 latency s | batched questions/s | train s | processed M tok | "
           "supervised M tok | processed/supervised | real-token ratio | held-out loss | status |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        acc = "-"
        if "accuracy" in r:
            lo, hi = r["accuracy_ci95"]
            spread = f" ± {100 * r['accuracy_seed_std']:.1f}" if r.get("accuracy_seed_std") is not None else ""
            acc = f"{100 * r['accuracy']:.1f}{spread} [{100 * lo:.1f}, {100 * hi:.1f}]"
        diff = "-"
        if "accuracy_minus_std_cot" in r:
            lo, hi = r["accuracy_minus_std_cot_ci95"]
            diff = f"{100 * r['accuracy_minus_std_cot']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"
        out.append(f"| {r['variant']} | {r['seeds_evaluated']} | {acc} | {diff} | {f(r, 'complete', '.1f', 100)} | "
                   f"{f(r, 'tokens_generated', '.1f')} | {f(r, 'skipped_per_answer', '.2f')} | {f(r, 'latency_s', '.2f')} | "
                   f"{f(r, 'batched_questions_per_s', '.2f')} | {f(r, 'train_time_s', '.0f')} | {f(r, 'processed_tokens', '.2f', 1e-6)} | "
                   f"{f(r, 'supervised_tokens', '.2f', 1e-6)} | {f(r, 'processed_per_supervised_token', '.2f')} | "
                   f"{f(r, 'real_token_ratio', '.3f')} | {f(r, 'final_val_loss', '.4f')} | {r['status']} |")
    out.append("")
    out.append("[batching, lr schedule] from each run's config.yaml (keys it lacks: the defaults of its day, i.e. "
               "bucketed x16, constant lr, no warm-up). vs Std-CoT: paired over shared questions, against the "
               "Std-CoT with the same batching and schedule. Held-out loss: final_val_loss, the validation split's "
               "loss at the end of training, mean over seeds (- for runs from before it was measured).")
    gens = sorted({g for r in rows for g in r.get("generation", [])})
    if gens:
        out.append("Generation (greedy): " + "; ".join(
            f"{backend}, batch {bs}, max_new_tokens {mnt}, batch-1 latency over {n} questions" for backend, bs, mnt, n in gens))
    return "\n".join(out)


def plot(variants: dict, run_dirs: list[Path], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for run in run_dirs:
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        for method in cfg["methods"]:
            log = run / "students" / method / "train_log.jsonl"
            if not log.is_file():
                continue
            rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
            ax.plot([r["epoch"] for r in rows], [r["loss"] for r in rows], label=f"{variant(cfg, method)} ({run.name})", lw=1)
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss (token-normalised)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--bootstrap", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", type=Path)
    args = p.parse_args(argv)
    runs = [r for r in args.runs if (r / "config.yaml").is_file()]
    if not runs:
        print("no run directories (with a config.yaml) given", file=sys.stderr)
        return 2
    variants = collect(runs)
    rows = summarise(variants, args.bootstrap, args.seed)
    print(markdown(rows))
    if args.plot:
        plot(variants, runs, args.plot)
        print(f"\nloss curves: {args.plot}")
    print(json.dumps({"benchmark": "study_table", "runs": [str(r) for r in runs], "rows": rows}, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
