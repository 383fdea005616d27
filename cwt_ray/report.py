"""Report stage: methods side by side (report.md), loss curves (PNG), the config that made them."""
from __future__ import annotations

import json
from pathlib import Path

from .config import ExperimentConfig
from .data_check import markdown_check
from .train import TRAIN_LOG, TRAIN_METRICS

METHOD_NAMES = {"std_cot": "Std-CoT", "cwt": "CWT", "stt": "STT"}


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def plot_losses(run_dir: Path, methods: list[str], out: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = False
    for method in methods:
        log = run_dir / "students" / method / TRAIN_LOG
        if not log.is_file():
            continue
        rows = [json.loads(line) for line in log.read_text().splitlines()]
        name = METHOD_NAMES.get(method, method)
        # x = fraction of an epoch, so methods with different step counts share one axis.
        line, = ax.plot([r["epoch"] for r in rows], [r["loss"] for r in rows], marker=".", label=f"{name} training")
        held = [r for r in rows if r.get("val_loss") is not None]
        if held:   # a row's epoch is where its step starts; the held-out loss is measured after the step
            per_step = (rows[-1]["epoch"] - rows[0]["epoch"]) / max(1, rows[-1]["step"] - rows[0]["step"])
            ax.plot([r["epoch"] + per_step for r in held], [r["val_loss"] for r in held], linestyle="--", marker="o",
                    color=line.get_color(), label=f"{name} held-out")
        drawn = True
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss (per the run's normaliser)")
    ax.set_title(f"{run_dir.name}: training and held-out loss")
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend()
        fig.tight_layout()
        fig.savefig(out, dpi=120)
    plt.close(fig)
    return drawn


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _ratio(value, base) -> str:
    return f"{value / base:.2f}x" if value is not None and base else "n/a"


def write_report(cfg: ExperimentConfig, run_dir: Path) -> Path:
    from .skip import read_skip_summary

    methods = cfg.methods
    metrics = {}
    for method in methods:
        t = _read_json(run_dir / "students" / method / TRAIN_METRICS) or {}
        e = _read_json(run_dir / "evals" / method / "metrics.json") or {}
        metrics[method] = {"train": t, "eval": e}
    skip_summary = read_skip_summary(run_dir / "skips" / "train") if "stt" in methods else None
    if skip_summary:
        metrics["stt"]["skip_data"] = skip_summary
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    base = metrics[methods[0]]["eval"]
    quality, speed, training = [], [], []
    for method in methods:
        t, e = metrics[method]["train"], metrics[method]["eval"]
        name = METHOD_NAMES.get(method, method)
        quality.append(f"| {name} | {_fmt(e.get('accuracy'), '.1%')} | {_fmt(e.get('complete'), '.1%')} "
                       f"| {_fmt(e.get('correct_format'), '.1%')} | {_fmt(e.get('contains_answer'), '.1%')} "
                       f"| {_fmt(e.get('stages_written'), '.2f')} | {_fmt(e.get('skipped_per_answer'), '.2f')} |")
        speed.append(f"| {name} | {_fmt(e.get('tokens_generated'), '.1f')} ({_ratio(e.get('tokens_generated'), base.get('tokens_generated'))}) "
                     f"| {_fmt(e.get('latency_s'), '.3f')} ({_ratio(e.get('latency_s'), base.get('latency_s'))}) "
                     f"| {_fmt(e.get('latency_p90_s'), '.3f')} "
                     f"| {_fmt(e.get('batched_questions_per_s'), '.2f')} ({_ratio(e.get('batched_questions_per_s'), base.get('batched_questions_per_s'))}) |")
        training.append(f"| {name} | {_fmt(t.get('first_loss'), '.3f')} -> {_fmt(t.get('final_loss'), '.3f')} "
                        f"| {_fmt(t.get('final_val_loss'), '.3f')} "
                        f"| {t.get('steps', 'n/a')} | {_fmt(t.get('train_time_s'), '.0f')} | {_fmt(t.get('processed_tokens_per_s'), '.0f')} "
                        f"| {_fmt(t.get('supervised_tokens_per_s'), '.0f')} | {_fmt(t.get('processed_per_supervised_token'), '.2f')} "
                        f"| {_fmt(t.get('real_token_ratio'), '.2f')} "
                        f"| {', '.join(f'{k} {v:.3f}' for k, v in (t.get('final_loss_by_kind') or {}).items()) or 'n/a'} "
                        f"| {_fmt(t.get('peak_memory_gb'), '.2f')} | {_fmt(t.get('mfu'), '.1%')} |")
    plotted = plot_losses(run_dir, methods, run_dir / "loss_curves.png")
    data_summary = _read_json(run_dir / "data" / "summary.json") or {}
    e0 = next((m["eval"] for m in metrics.values() if m.get("eval")), {})
    base_name = METHOD_NAMES.get(methods[0], methods[0])
    lines = [
        f"# cwt-ray report: {cfg.name}",
        "",
        f"Student `{cfg.student.name}`, data `{cfg.data.source}`, evaluated on the {cfg.eval.split} split "
        f"({e0.get('n', 'n/a')} questions), greedy, max_new_tokens {cfg.eval.max_new_tokens} for every method, "
        f"backend {e0.get('backend', 'n/a')}.",
        "",
        "| method | accuracy | complete | answer format | contains answer | stages written | stages skipped |",
        "|---|---|---|---|---|---|---|",
        *quality,
        "",
        "## Speed",
        "",
        f"Ratios are against {base_name}. *Latency*: one question at a time (batch 1) on one actor, the first "
        f"{e0.get('latency_n', 0)} questions of the split. *Throughput*: the whole split in batches of "
        f"{cfg.eval.batch_size}, generation time only, per actor.",
        "",
        "| method | tokens generated | batch-1 latency s (mean) | p90 s | batched questions/s |",
        "|---|---|---|---|---|",
        *speed,
        "",
        "## Training",
        "",
        "| method | loss first -> last | held-out loss | steps | train s | processed tok/s | supervised tok/s "
        "| processed per supervised token | real-token ratio | loss by target (last 10 steps) | peak memory GB | MFU |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        *training,
        "",
        "*Held-out loss*: the method's own samples built from the validation split, teacher-forced, at the end "
        "of training (n/a without a validation split). Training throughput excludes the first (warm-up) step. *Processed* tokens are the non-padding tokens the "
        "student ran forward; *supervised* tokens are those the loss saw. STT continues from the CWT student. "
        "Peak memory: GPU allocated by torch, or the CPU worker's peak resident set. MFU (GPU only): "
        "6 x parameters x processed tokens/s over the GPUs' dense bf16 peak.",
        "",
    ]
    if plotted:
        lines += ["![training and held-out loss](loss_curves.png)", ""]
    if skip_summary:
        s = skip_summary
        lines += ["## Skip data (STT)", "",
                  f"Gate `{s['gate']}`" + (f" (threshold {s['threshold']} nats)" if s["gate"] == "nll" else "")
                  + f", removal `{s['removal']}`, style `{s['style']}`, scored by the CWT student.", "",
                  "| rationales | with a skip | none skippable | wrong with every chunk | no middle chunk | too long / error "
                  "| chunks skipped / skippable | skip sequences |",
                  "|---|---|---|---|---|---|---|---|",
                  f"| {s['rationales_in']} | {s['skipped']} | {s['none_skippable']} | {s['wrong_with_all_chunks']} "
                  f"| {s['no_middle_chunk']} | {s['too_long'] + s['error']} | {s['chunks_skipped']} / {s['skippable_chunks']} "
                  f"| {s['skip_sequences']} |", "",
                  "Per-rationale decisions with every removal tested: `skips/train/skips.parquet`.", ""]
    if data_summary:
        lines += ["## Data", "", *markdown_check(data_summary), "",
                  "Rejected rows and their reasons: `data/rejects.parquet`; the same check: `cwt-ray data CONFIG`.", ""]
    lines += ["## Config", "", "```yaml", cfg.to_yaml().rstrip(), "```", ""]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path
