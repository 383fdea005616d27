"""Sweep report: report.md and a self-contained report.html (PNGs embedded) from the finished trials.

It answers "which settings give the best accuracy for the fewest generated tokens?": the chosen
config(s) with their test-split numbers, accuracy vs tokens with the Pareto front, the optimisation
history, Optuna's parameter importances, every trial, and what a trial costs. Both files are
rendered from one list of blocks, so they always say the same thing.
"""
from __future__ import annotations

import base64
import html
import json
import re
from pathlib import Path

from .sweep import OBJECTIVE_METRICS, Sweep, pareto_front


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _fmt(v, spec: str = ".3f") -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def _param(v) -> str:
    """A searched value: None is a choice the user wrote (e.g. stt.skip_confidence: null), not a gap."""
    return "null" if v is None else _fmt(v, ".3g")


# ---------------------------------------------------------------------------------------------
# Optuna study rebuilt from the trials (importances, optuna.db)
# ---------------------------------------------------------------------------------------------

def _distribution(param: dict):
    import optuna.distributions as d

    if param["type"] == "categorical":
        return d.CategoricalDistribution(param["choices"])
    if param["type"] == "int":
        return d.IntDistribution(param["low"], param["high"], log=param["log"], step=param["step"] or 1)
    return d.FloatDistribution(float(param["low"]), float(param["high"]), log=param["log"], step=param["step"])


def build_study(sweep: Sweep, rows: list[dict], storage: str | None = None):
    """An Optuna study holding every trial of the sweep. Rebuilt from Tune's results rather than
    taken from the searcher, so it is the same whether the sweep ran in one go or was resumed."""
    import optuna
    from optuna.trial import TrialState, create_trial

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    c = sweep.config
    space = {k: p.model_dump() for k, p in c.search_space.items()}
    study = optuna.create_study(study_name=c.name, storage=storage,
                                directions=["maximize" if o.mode == "max" else "minimize" for o in c.objectives])
    for r in rows:
        done = r["status"] == "done"
        state = TrialState.COMPLETE if done else (TrialState.PRUNED if r["status"] == "stopped" else TrialState.FAIL)
        params = {k: v for k, v in r["params"].items() if k in space}
        attrs = {"tune_trial_id": r["trial_id"], **{m: r["metrics"].get(m) for m in OBJECTIVE_METRICS}}
        study.add_trial(create_trial(
            state=state, params=params, distributions={k: _distribution(space[k]) for k in params},
            values=[r["metrics"][o.metric] for o in c.objectives] if done else None, user_attrs=attrs))
    return study


def param_importances(sweep: Sweep, rows: list[dict]) -> tuple[dict[str, dict[str, float]], str]:
    """{objective: {param: importance}} from Optuna's fANOVA evaluator, or a note why there are none."""
    import optuna
    from optuna.importance import FanovaImportanceEvaluator

    done = [r for r in rows if r["status"] == "done"]
    if len(done) < 2:
        return {}, f"needs at least 2 finished trials, this sweep has {len(done)}"
    study = build_study(sweep, rows)
    out = {}
    for i, o in enumerate(sweep.config.objectives):
        values = {r["metrics"][o.metric] for r in done}
        if len(values) < 2:
            out[o.metric] = {}
            continue
        try:
            out[o.metric] = optuna.importance.get_param_importances(
                study, evaluator=FanovaImportanceEvaluator(seed=sweep.config.seed), target=lambda t, i=i: t.values[i])
        except (RuntimeError, ValueError) as e:   # e.g. no parameter present in every finished trial
            return {}, f"Optuna could not compute them: {e}"
    if not any(out.values()):
        return {}, "every finished trial scored the same, so no parameter explains a difference"
    return out, ""


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------

def plot_pareto(rows: list[dict], chosen: list[dict], out: Path) -> bool:
    done = [r for r in rows if r["status"] == "done"]
    if not done:
        return False
    plt = _plt()
    front = sorted(pareto_front(done, [("accuracy", "max"), ("tokens_generated", "min")]),
                   key=lambda r: r["metrics"]["tokens_generated"])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter([r["metrics"]["tokens_generated"] for r in done], [r["metrics"]["accuracy"] for r in done],
               color="0.6", label="trial")
    ax.step([r["metrics"]["tokens_generated"] for r in front], [r["metrics"]["accuracy"] for r in front],
            where="post", color="tab:red", marker="o", label="Pareto front (more accuracy, fewer tokens)")
    for r in done:
        ax.annotate(str(r["number"]), (r["metrics"]["tokens_generated"], r["metrics"]["accuracy"]),
                    textcoords="offset points", xytext=(4, 4), fontsize=8)
    if chosen:
        b = chosen[0]["metrics"]
        ax.scatter([b["tokens_generated"]], [b["accuracy"]], s=160, facecolors="none", edgecolors="k", label="best_config")
    ax.set_xlabel("tokens generated per answer (validation)")
    ax.set_ylabel("accuracy (validation)")
    ax.set_title("Accuracy vs tokens generated; numbers are trial numbers")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


def plot_history(rows: list[dict], objectives: list[tuple[str, str]], out: Path) -> bool:
    done = [r for r in rows if r["status"] == "done"]
    if not done:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, len(objectives), figsize=(6 * len(objectives), 4), squeeze=False)
    for ax, (metric, mode) in zip(axes[0], objectives):
        xs = [r["number"] for r in done]
        ys = [r["metrics"][metric] for r in done]
        best, running = [], None
        for y in ys:
            running = y if running is None else (max(running, y) if mode == "max" else min(running, y))
            best.append(running)
        ax.scatter(xs, ys, color="tab:blue", label="trial")
        ax.step(xs, best, where="post", color="tab:red", label=f"best so far ({mode})")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_xlabel("trial number")
        ax.set_ylabel(f"{metric} (validation)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Optimisation history")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


def plot_importances(importances: dict[str, dict[str, float]], out: Path) -> bool:
    shown = {m: imp for m, imp in importances.items() if imp}
    if not shown:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, len(shown), figsize=(6 * len(shown), 0.5 + 0.5 * max(len(i) for i in shown.values())),
                             squeeze=False)
    for ax, (metric, imp) in zip(axes[0], shown.items()):
        names = list(imp)[::-1]
        ax.barh(names, [imp[n] for n in names], color="tab:green")
        ax.set_xlabel(f"importance for {metric} (fANOVA, sums to 1)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------------
# Blocks -> markdown / html
# ---------------------------------------------------------------------------------------------

def render_markdown(blocks: list[tuple]) -> str:
    lines = []
    for kind, *args in blocks:
        if kind == "h1":
            lines += [f"# {args[0]}", ""]
        elif kind == "h2":
            lines += [f"## {args[0]}", ""]
        elif kind == "p":
            lines += [args[0], ""]
        elif kind == "table":
            header, body = args
            lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in body] + [""]
        elif kind == "img":
            lines += [f"![{args[1]}]({args[0]})", ""]
        elif kind == "code":
            lines += ["```" + args[0], args[1].rstrip(), "```", ""]
    return "\n".join(lines)


def _inline(text: str) -> str:
    """Markdown `code` and **bold** in a paragraph, escaped for HTML."""
    text = html.escape(text)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", text)


def render_html(blocks: list[tuple], folder: Path, title: str) -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
             "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;font-size:13px;margin:0.5em 0 1.5em}"
             "td,th{border:1px solid #ccc;padding:3px 7px;text-align:left}th{background:#f2f2f2}"
             "code,pre{background:#f6f6f6}pre{padding:0.7em;overflow-x:auto}img{max-width:100%}</style></head><body>"]
    for kind, *args in blocks:
        if kind in ("h1", "h2"):
            parts.append(f"<{kind}>{html.escape(args[0])}</{kind}>")
        elif kind == "p":
            parts.append(f"<p>{_inline(args[0])}</p>")
        elif kind == "table":
            header, body = args
            parts.append("<table><tr>" + "".join(f"<th>{_inline(h)}</th>" for h in header) + "</tr>"
                         + "".join("<tr>" + "".join(f"<td>{_inline(str(c))}</td>" for c in row) + "</tr>" for row in body)
                         + "</table>")
        elif kind == "img":
            data = base64.b64encode((folder / args[0]).read_bytes()).decode()
            parts.append(f"<img alt='{html.escape(args[1])}' src='data:image/png;base64,{data}'>")
        elif kind == "code":
            parts.append(f"<pre><code>{html.escape(args[1])}</code></pre>")
    return "\n".join(parts + ["</body></html>"])


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------

def _mean(rows: list[dict], key: str) -> float | None:
    vals = [r["metrics"][key] for r in rows if r["metrics"].get(key) is not None]
    return sum(vals) / len(vals) if vals else None


def write_sweep_report(sweep: Sweep, rows: list[dict], chosen: list[dict], test: dict[str, dict], wall_s: float) -> Path:
    c, d = sweep.config, sweep.dir
    objectives = [(o.metric, o.mode) for o in c.objectives]
    keys = list(c.search_space)
    done = [r for r in rows if r["status"] == "done"]
    counts = {s: sum(r["status"] == s for r in rows) for s in ("done", "stopped", "error")}
    n_val = done[0]["metrics"].get("n") if done else "n/a"
    sampler = (f"Optuna's grid sampler (every combination once, seed {c.seed})" if c.sampler == "grid" else
               f"Optuna TPE ({c.n_startup_trials} random start-up trials, seed {c.seed})")
    blocks: list[tuple] = [
        ("h1", f"Sweep report: {c.name}"),
        ("p", f"{len(rows)} trials ({counts['done']} done, {counts['stopped']} stopped early, {counts['error']} failed) "
              f"of `{c.method}` from `{c.base}`, each scored on the **validation** split ({n_val} questions); "
              f"objectives: {', '.join(f'{m} ({mode})' for m, mode in objectives)}. {sampler} "
              f"through Ray Tune, scheduler `{c.scheduler}`. "
              f"This run of the command took {wall_s / 60:.1f} min (resumed runs count only their own part)."),
    ]
    # Chosen configs on test
    title = "Best config" if len(objectives) == 1 else "Pareto front (validation)"
    blocks += [("h2", f"{title}, evaluated once on the test split")]
    if chosen:
        header = ["trial", *keys, *[f"val {m}" for m, _ in objectives], "test accuracy", "test tokens generated",
                  "test complete", "test n"]
        body = []
        for r in chosen:
            t = test.get(r["trial_id"], {})
            body.append([f"{r['number']} `{r['trial_id']}`", *[_param(r["params"][k]) if k in r["params"] else "-"
                                                                for k in keys],
                         *[_fmt(r["metrics"][m]) for m, _ in objectives], _fmt(t.get("accuracy")),
                         _fmt(t.get("tokens_generated"), ".1f"), _fmt(t.get("complete"), ".2f"), _fmt(t.get("n"))])
        blocks += [("table", header, body),
                   ("p", "The sweep chose on validation only; these test numbers were computed after the choice and "
                         f"never fed back. `best_config.yaml` is trial {chosen[0]['number']}'s full experiment config "
                         f"(eval split back to test): `cwt-ray run {d / 'best_config.yaml'}`.")]
    else:
        blocks += [("p", "No trial finished, so there is no best config.")]
    if plot_pareto(rows, chosen, d / "pareto.png"):
        blocks += [("h2", "Accuracy vs tokens generated"), ("img", "pareto.png", "Pareto front")]
    if plot_history(rows, objectives, d / "history.png"):
        blocks += [("h2", "Optimisation history"), ("img", "history.png", "optimisation history")]
    importances, note = param_importances(sweep, rows)
    blocks += [("h2", "Parameter importances")]
    if importances:
        header = ["parameter", *importances]
        params = sorted({p for imp in importances.values() for p in imp})
        body = [[f"`{p}`", *[_fmt(imp.get(p), ".2f") for imp in importances.values()]] for p in params]
        blocks += [("table", header, body),
                   ("p", "Optuna's fANOVA evaluator over the finished trials; keys searched only under a condition "
                         "(`when`) are left out. With few trials these are rough.")]
        if plot_importances(importances, d / "importances.png"):
            blocks += [("img", "importances.png", "parameter importances")]
    else:
        blocks += [("p", f"Not available: {note}.")]
    # Every trial
    header = ["#", "trial", "status", *keys, "accuracy", "tokens generated", "complete", "last train loss",
              "time s", "fixed s", "reused"]
    body = [[r["number"], f"`{r['trial_id']}`", r["status"] + (f": {r['error'][:80]}" if r["error"] else ""),
             *[_param(r["params"][k]) if k in r["params"] else "-" for k in keys],
             _fmt(r["metrics"].get("accuracy")), _fmt(r["metrics"].get("tokens_generated"), ".1f"),
             _fmt(r["metrics"].get("complete"), ".2f"), _fmt(r["metrics"].get("loss")),
             _fmt(r["metrics"].get("trial_wall_s"), ".0f"), _fmt(r["metrics"].get("fixed_s"), ".0f"),
             r["metrics"].get("reused", "")] for r in rows]
    blocks += [("h2", "All trials (validation split)"), ("table", header, body),
               ("p", "`-`: a conditional key that was not searched in that trial (its base value applied). Each "
                     f"trial's run directory is `{d / 'trials'}/<trial>/` (its `config.yaml` reproduces it; "
                     "`console.log` has its stage lines).")]
    # Cost
    cost = [("data + chunk (prepare)", "prepare_s"), ("train, wall (incl. trainer start-up)", "train_wall_s"),
            ("train, optimizer steps only", "train_step_s"), ("eval, wall (incl. actor start-up)", "eval_wall_s"),
            ("eval, generate() only", "generate_s"), ("fixed cost (all but steps and generate)", "fixed_s"),
            ("whole trial", "trial_wall_s")]
    blocks += [("h2", "What a trial costs (mean over finished trials, seconds)"),
               ("table", ["part", "seconds"], [[name, _fmt(_mean(done, key), ".1f")] for name, key in cost])]
    if c.optuna_db:
        db = d / "optuna.db"
        db.unlink(missing_ok=True)
        build_study(sweep, rows, storage=f"sqlite:///{db}")
        blocks += [("h2", "Optuna dashboard"),
                   ("p", f"The trials are also in an Optuna study (`{c.name}`) in `{db}`: "
                         f"`pip install optuna-dashboard && optuna-dashboard sqlite:///{db}`.")]
    if chosen:
        blocks += [("h2", "best_config.yaml"), ("code", "yaml", (d / "best_config.yaml").read_text())]
    (d / "trials.json").write_text(json.dumps(rows, indent=2, default=str))
    (d / "report.md").write_text(render_markdown(blocks))
    (d / "report.html").write_text(render_html(blocks, d, f"Sweep report: {c.name}"))
    return d / "report.md"
