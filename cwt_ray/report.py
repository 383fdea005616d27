"""Report stage: methods side by side (report.md), loss curves (PNG), the config that made them."""
from __future__ import annotations

import json
from pathlib import Path

from .config import ExperimentConfig
from .train import TRAIN_LOG, TRAIN_METRICS

METHOD_NAMES = {"std_cot": "Std-CoT", "cwt": "CWT"}


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
        # x = fraction of an epoch, so methods with different step counts share one axis.
        ax.plot([r["epoch"] for r in rows], [r["loss"] for r in rows], marker=".", label=METHOD_NAMES.get(method, method))
        drawn = True
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss (per supervised token)")
    ax.set_title(f"{run_dir.name}: training loss")
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend()
        fig.tight_layout()
        fig.savefig(out, dpi=120)
    plt.close(fig)
    return drawn


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def write_report(cfg: ExperimentConfig, run_dir: Path) -> Path:
    methods = cfg.methods
    rows, metrics = [], {}
    for method in methods:
        t = _read_json(run_dir / "students" / method / TRAIN_METRICS) or {}
        e = _read_json(run_dir / "evals" / method / "metrics.json") or {}
        metrics[method] = {"train": t, "eval": e}
        rows.append(
            f"| {METHOD_NAMES.get(method, method)} | {_fmt(e.get('accuracy'), '.1%')} | {_fmt(e.get('complete'), '.1%')} "
            f"| {_fmt(e.get('correct_format'), '.1%')} | {_fmt(e.get('tokens_generated'), '.1f')} "
            f"| {_fmt(e.get('latency_s'), '.3f')} | {_fmt(t.get('first_loss'), '.3f')} -> {_fmt(t.get('final_loss'), '.3f')} "
            f"| {t.get('steps', 'n/a')} | {_fmt(t.get('train_time_s'), '.0f')} | {_fmt(t.get('processed_tokens_per_s'), '.0f')} "
            f"| {_fmt(t.get('supervised_tokens_per_s'), '.0f')} | {_fmt(t.get('real_token_ratio'), '.2f')} |")
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    plotted = plot_losses(run_dir, methods, run_dir / "loss_curves.png")
    data_summary = _read_json(run_dir / "data" / "summary.json") or {}
    e0 = next((m["eval"] for m in metrics.values() if m["eval"]), {})
    lines = [
        f"# cwt-ray report: {cfg.name}",
        "",
        f"Student `{cfg.student.name}`, data `{cfg.data.source}`, evaluated on the {cfg.eval.split} split "
        f"({e0.get('n', 'n/a')} questions), greedy, max_new_tokens {cfg.eval.max_new_tokens} for every method, "
        f"batch {cfg.eval.batch_size}, backend {e0.get('backend', 'n/a')}. Latency = batch wall time / batch size.",
        "",
        "| method | accuracy | complete | answer format | tokens generated | latency s/question | loss first -> last "
        "| steps | train s | processed tok/s | supervised tok/s | real-token ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "Training throughput excludes the first (warm-up) step. *Processed* tokens are the non-padding tokens the "
        "student ran forward; *supervised* tokens are those the loss saw.",
        "",
    ]
    if plotted:
        lines += ["![training loss](loss_curves.png)", ""]
    if data_summary:
        lines += ["## Data", "", "| split | rows in | kept | rejected |", "|---|---|---|---|"]
        lines += [f"| {s} | {c['rows_in']} | {c['kept']} | {c['rejected']} |" for s, c in data_summary.items()]
        lines += ["", "Rejected rows and their reasons: `data/rejects.parquet`.", ""]
    lines += ["## Config", "", "```yaml", cfg.to_yaml().rstrip(), "```", ""]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path
