"""Report stage: methods side by side (report.md), loss curves (PNG), what the chunk and skip
stages did, the data check and the config that made them. It only reads the run directory
(docs/run-directory.md), and names files relative to it, so a published report says nothing
about the machine that made it."""
from __future__ import annotations

from pathlib import Path

from .config import ExperimentConfig
from .data_check import markdown_check
from .rundir import (METRICS, SUMMARY, TRAIN_METRICS, chunks_dir, data_dir, eval_dir, read_json, read_train_log,
                     skips_dir, student_dir, write_atomic, write_json)

METHOD_NAMES = {"std_cot": "Std-CoT", "cwt": "CWT", "stt": "STT"}


def _name(method: str) -> str:
    return METHOD_NAMES.get(method, method)


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _ratio(value, base) -> str:
    return f"{value / base:.2f}x" if value is not None and base else "n/a"


def plot_losses(run_dir: Path, methods: list[str], out: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = False
    for method in methods:
        rows = read_train_log(student_dir(run_dir, method))
        if not rows:
            continue
        # x = fraction of an epoch, so methods with different step counts share one axis.
        line, = ax.plot([r["epoch"] for r in rows], [r["loss"] for r in rows], marker=".", label=f"{_name(method)} training")
        held = [r for r in rows if r.get("val_loss") is not None]
        if held:   # a row's epoch is where its step starts; the held-out loss is measured after the step
            per_step = (rows[-1]["epoch"] - rows[0]["epoch"]) / max(1, rows[-1]["step"] - rows[0]["step"])
            ax.plot([r["epoch"] + per_step for r in held], [r["val_loss"] for r in held], linestyle="--", marker="o",
                    color=line.get_color(), label=f"{_name(method)} held-out")
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


def collect_metrics(cfg: ExperimentConfig, run_dir: Path) -> dict:
    """{method: {train, eval[, skip_data]}} from what the stages wrote (empty where a stage did not run)."""
    metrics = {m: {"train": read_json(student_dir(run_dir, m) / TRAIN_METRICS) or {},
                   "eval": read_json(eval_dir(run_dir, m) / METRICS) or {}} for m in cfg.methods}
    skip_summary = read_json(skips_dir(run_dir) / SUMMARY) if "stt" in cfg.methods else None
    if skip_summary:
        metrics["stt"]["skip_data"] = skip_summary
    return metrics


def _first_eval(metrics: dict) -> dict:
    """The first method's eval metrics that exist: the split size, backend and latency settings
    every method shares."""
    return next((m["eval"] for m in metrics.values() if m.get("eval")), {})


def quality_section(cfg: ExperimentConfig, metrics: dict) -> list[str]:
    e0 = _first_eval(metrics)
    rows = []
    for method in cfg.methods:
        e = metrics[method]["eval"]
        rows.append(f"| {_name(method)} | {_fmt(e.get('accuracy'), '.1%')} | {_fmt(e.get('complete'), '.1%')} "
                    f"| {_fmt(e.get('correct_format'), '.1%')} | {_fmt(e.get('contains_answer'), '.1%')} "
                    f"| {_fmt(e.get('tokens_generated'), '.1f')} | {_fmt(e.get('stages_written'), '.2f')} "
                    f"| {_fmt(e.get('skipped_per_answer'), '.2f')} |")
    return [f"Student `{cfg.student.name}`, data `{cfg.data.source}`, evaluated on the {cfg.eval.split} split "
            f"({e0.get('n', 'n/a')} questions), greedy, max_new_tokens {cfg.eval.max_new_tokens} for every method, "
            f"backend {e0.get('backend', 'n/a')}.", "",
            "| method | accuracy | complete | answer format | contains answer | tokens generated | stages written "
            "| stages skipped |",
            "|---|---|---|---|---|---|---|---|", *rows, ""]


def speed_section(cfg: ExperimentConfig, metrics: dict) -> list[str]:
    methods = cfg.methods
    base = metrics[methods[0]]["eval"]
    e0 = _first_eval(metrics)
    rows = []
    for method in methods:
        e = metrics[method]["eval"]
        rows.append(f"| {_name(method)} | {_fmt(e.get('tokens_generated'), '.1f')} "
                    f"({_ratio(e.get('tokens_generated'), base.get('tokens_generated'))}) "
                    f"| {_fmt(e.get('latency_s'), '.3f')} ({_ratio(e.get('latency_s'), base.get('latency_s'))}) "
                    f"| {_fmt(e.get('latency_p90_s'), '.3f')} "
                    f"| {_fmt(e.get('batched_questions_per_s'), '.2f')} "
                    f"({_ratio(e.get('batched_questions_per_s'), base.get('batched_questions_per_s'))}) |")
    return ["## Speed", "",
            f"Ratios are against {_name(methods[0])}. *Latency*: one question at a time (batch 1) on one actor, the "
            f"first {e0.get('latency_n', 0)} questions of the split. *Throughput*: the whole split in batches of "
            f"{cfg.eval.batch_size}, generation time only, per actor.", "",
            "| method | tokens generated | batch-1 latency s (mean) | p90 s | batched questions/s |",
            "|---|---|---|---|---|", *rows, ""]


def training_section(cfg: ExperimentConfig, metrics: dict, plotted: bool) -> list[str]:
    rows = []
    for method in cfg.methods:
        t = metrics[method]["train"]
        by_kind = ", ".join(f"{k} {v:.3f}" for k, v in (t.get("final_loss_by_kind") or {}).items()) or "n/a"
        rows.append(f"| {_name(method)} | {_fmt(t.get('first_loss'), '.3f')} -> {_fmt(t.get('final_loss'), '.3f')} "
                    f"| {_fmt(t.get('final_val_loss'), '.3f')} | {t.get('steps', 'n/a')} "
                    f"| {_fmt(t.get('train_time_s'), '.0f')} | {_fmt(t.get('processed_tokens_per_s'), '.0f')} "
                    f"| {_fmt(t.get('supervised_tokens_per_s'), '.0f')} "
                    f"| {_fmt(t.get('processed_per_supervised_token'), '.2f')} | {_fmt(t.get('real_token_ratio'), '.2f')} "
                    f"| {by_kind} | {_fmt(t.get('peak_memory_gb'), '.2f')} | {_fmt(t.get('mfu'), '.1%')} |")
    lines = ["## Training", "",
             "| method | loss first -> last | held-out loss | steps | train s | processed tok/s | supervised tok/s "
             "| processed per supervised token | real-token ratio | loss by target (last 10 steps) | peak memory GB "
             "| MFU |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|", *rows, "",
             "*Held-out loss*: the method's own samples built from the validation split, teacher-forced, at the end "
             "of training (n/a without a validation split). Training throughput excludes the first (warm-up) step. "
             "*Processed* tokens are the non-padding tokens the student ran forward; *supervised* tokens are those "
             "the loss saw. STT continues from the CWT student. Peak memory: GPU allocated by torch, or the CPU "
             "worker's peak resident set. MFU (GPU only): 6 x parameters x processed tokens/s over the GPUs' dense "
             "bf16 peak.", ""]
    if plotted:
        lines += ["![training and held-out loss](loss_curves.png)", ""]
    return lines


def chunk_section(run_dir: Path) -> list[str]:
    s = read_json(chunks_dir(run_dir) / SUMMARY)
    if not s:
        return []
    tokens = s.get("chunk_tokens") or {}
    per = ", ".join(f"{k} chunks: {n}" for k, n in s["chunks_per_rationale"].items())
    lines = ["## Chunks (CWT)", "",
             f"Heuristic `{s['heuristic']}`, K <= {s['params']['num_chunks']}: {s['chunked']} of {s['rows_in']} training "
             f"rationales chunked ({s['rejected']} rejected) into {s['chunks']} chunks ({per}). Chunk length in "
             f"student tokens: median {_fmt(tokens.get('median'), '.0f')}, p25-p75 {_fmt(tokens.get('p25'), '.0f')}-"
             f"{_fmt(tokens.get('p75'), '.0f')}, max {_fmt(tokens.get('max'), '.0f')}."]
    if s.get("sbc"):
        b = s["sbc"]
        lines.append(f"SBC search: mean chunk loss {_fmt(b['mean_loss_before'], '.4f')} -> "
                     f"{_fmt(b['mean_loss_after'], '.4f')}, {b['moves']} moves, {b['candidates_scored']} candidates "
                     "scored.")
    return lines + ["", "Each chunk in its own colour: [chunks/train/view.html](chunks/train/view.html).", ""]


def skip_section(metrics: dict) -> list[str]:
    s = metrics.get("stt", {}).get("skip_data")
    if not s:
        return []
    return ["## Skip data (STT)", "",
            f"Gate `{s['gate']}`" + (f" (threshold {s['threshold']} nats)" if s["gate"] == "nll" else "")
            + f", removal `{s['removal']}`, style `{s['style']}`, scored by the CWT student.", "",
            "| rationales | with a skip | none skippable | wrong with every chunk | no middle chunk | too long / error "
            "| chunks skipped / skippable | skip sequences |",
            "|---|---|---|---|---|---|---|---|",
            f"| {s['rationales_in']} | {s['skipped']} | {s['none_skippable']} | {s['wrong_with_all_chunks']} "
            f"| {s['no_middle_chunk']} | {s['too_long'] + s['error']} | {s['chunks_skipped']} / {s['skippable_chunks']} "
            f"| {s['skip_sequences']} |", "",
            "Per-rationale decisions with every removal tested: `skips/train/skips.parquet`; at inference, each "
            "question's skip decisions (P(skip) per stage) are in `evals/stt/records/`.", ""]


def write_report(cfg: ExperimentConfig, run_dir: Path) -> Path:
    metrics = collect_metrics(cfg, run_dir)
    write_json(run_dir / METRICS, metrics)
    plotted = plot_losses(run_dir, cfg.methods, run_dir / "loss_curves.png")
    lines = [f"# cwt-ray report: {cfg.name}", "", *quality_section(cfg, metrics), *speed_section(cfg, metrics),
             *training_section(cfg, metrics, plotted), *chunk_section(run_dir), *skip_section(metrics)]
    data_summary = read_json(data_dir(run_dir) / SUMMARY)
    if data_summary:
        lines += ["## Data", "", *markdown_check(data_summary), "",
                  "Rejected rows and their reasons: `data/rejects.parquet`; the same check: `cwt-ray data CONFIG`.", ""]
    # storage_path as seen from this run directory: the report names no folder of the machine.
    shown = cfg.model_copy(update={"storage_path": ".."})
    lines += ["## Config", "", "```yaml", shown.to_yaml().rstrip(), "```", ""]
    path = run_dir / "report.md"
    write_atomic(path, "\n".join(lines))
    return path
