"""Sweep report: report.md and a self-contained report.html (PNGs embedded) from the finished trials,
and the choice of trials to evaluate on test (`choose`).

It answers "which settings give the best accuracy for the fewest generated tokens?": the chosen
config(s) with their test-split numbers, accuracy vs tokens with the Pareto front, the optimisation
history, Optuna's parameter importances, every trial, and what a trial costs. Both files are
rendered from one list of blocks, so they always say the same thing. The Pareto front, the
importances and the plots are Optuna's, on a study rebuilt from the trial rows (`build_study`).
Paths in the report are relative to the sweep directory; commands name it as configured.
"""
from __future__ import annotations

import base64
import contextlib
import html
import json
import re
import warnings
from pathlib import Path

from .rundir import write_atomic
from .sweep_config import OBJECTIVE_METRICS, Param, Sweep, SweepConfig

# The two metrics of the accuracy-vs-tokens plot, whatever the sweep's objectives.
ACCURACY_VS_TOKENS = [("tokens_generated", "min"), ("accuracy", "max")]


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
# Optuna study rebuilt from the trials (Pareto front, importances, plots, optuna.db)
# ---------------------------------------------------------------------------------------------

def _distribution(param: dict):
    import optuna.distributions as d

    if param["type"] == "categorical":
        return d.CategoricalDistribution(param["choices"])
    if param["type"] == "int":
        return d.IntDistribution(param["low"], param["high"], log=param["log"], step=param["step"] or 1)
    return d.FloatDistribution(float(param["low"]), float(param["high"]), log=param["log"], step=param["step"])


def build_study(rows: list[dict], objectives: list[tuple[str, str]], space: dict[str, Param] | None = None,
                name: str | None = None, storage: str | None = None):
    """An Optuna study holding every trial row, in order (study trial i is rows[i]), scored on the
    given (metric, mode) objectives; a trial is complete when it finished with those metrics.
    Rebuilt from Tune's results rather than taken from the searcher, so it is the same whether the
    sweep ran in one go or was resumed. `space`: the searched keys, recorded as the trials' params."""
    import optuna
    from optuna.exceptions import ExperimentalWarning
    from optuna.trial import TrialState, create_trial

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = {k: p.model_dump() for k, p in (space or {}).items()}
    study = optuna.create_study(study_name=name, storage=storage,
                                directions=["maximize" if mode == "max" else "minimize" for _, mode in objectives])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        study.set_metric_names([metric for metric, _ in objectives])
    for r in rows:
        values = [r["metrics"].get(metric) for metric, _ in objectives]
        done = r["status"] == "done" and None not in values
        state = TrialState.COMPLETE if done else (TrialState.PRUNED if r["status"] == "stopped" else TrialState.FAIL)
        params = {k: v for k, v in r["params"].items() if k in space}
        attrs = {"tune_trial_id": r["trial_id"], **{m: r["metrics"].get(m) for m in OBJECTIVE_METRICS}}
        study.add_trial(create_trial(
            state=state, params=params, distributions={k: _distribution(space[k]) for k in params},
            values=values if done else None, user_attrs=attrs))
    return study


def sweep_study(sweep: Sweep, rows: list[dict], storage: str | None = None):
    """The sweep's own study: its objectives, its search space, its name."""
    c = sweep.config
    return build_study(rows, c.objective_pairs, c.search_space, c.name, storage)


def pareto_front(rows: list[dict], objectives: list[tuple[str, str]]) -> list[dict]:
    """Optuna's Pareto front (`study.best_trials`): trials no other trial beats on every objective
    and strictly on one. Of trials with equal scores only the earliest is kept, so each point of
    the front is evaluated on test once. Best first objective first (ties: second)."""
    rows = sorted(rows, key=lambda r: r["number"])
    front: dict[tuple, dict] = {}
    for t in sorted(build_study(rows, objectives).best_trials, key=lambda t: t.number):
        front.setdefault(tuple(t.values), rows[t.number])
    signs = [1 if mode == "max" else -1 for _, mode in objectives]
    return sorted(front.values(), key=lambda r: [-s * r["metrics"][m] for s, (m, _) in zip(signs, objectives)])


def choose(rows: list[dict], config: SweepConfig) -> list[dict]:
    """Single objective: the best trial. Two: the Pareto front, highest first objective first."""
    front = pareto_front(rows, config.objective_pairs)
    return front[:1] if len(config.objectives) == 1 else front


def param_importances(sweep: Sweep, rows: list[dict]) -> tuple[dict[str, dict[str, float]], str]:
    """{objective: {param: importance}} from Optuna's fANOVA evaluator, or a note why there are none."""
    import optuna
    from optuna.importance import FanovaImportanceEvaluator

    done = [r for r in rows if r["status"] == "done"]
    if len(done) < 2:
        return {}, f"needs at least 2 finished trials, this sweep has {len(done)}"
    study = sweep_study(sweep, rows)
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
# Plots: Optuna's (optuna.visualization.matplotlib), labelled with the sweep's trial numbers
# ---------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _optuna_plots():
    """pyplot on the Agg backend; Optuna's ggplot style stays inside the block, and its plots'
    'experimental' warnings are not shown."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.exceptions import ExperimentalWarning

    with plt.rc_context(), warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        yield plt


def _save(plt, axes: list, out: Path) -> None:
    """One PNG of the plots side by side (Optuna draws each on its own figure)."""
    import numpy as np

    images = []
    for ax in axes:
        fig = ax.figure
        fig.set_dpi(110)
        fig.tight_layout()
        fig.canvas.draw()
        images.append(np.asarray(fig.canvas.buffer_rgba()))
        plt.close(fig)
    plt.imsave(out, np.hstack(images))


def _complete(study) -> list:
    return [t for t in study.trials if t.state.name == "COMPLETE"]


def _sweep_trial_numbers(ax, rows: list[dict]) -> None:
    """Optuna numbers the rebuilt study's trials 0, 1, ... (rows[i]); the axis shows the sweep's numbers."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    def label(x, _pos) -> str:
        return str(rows[int(x)]["number"]) if float(x).is_integer() and 0 <= x < len(rows) else ""

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.xaxis.set_major_formatter(FuncFormatter(label))
    ax.set_xlabel("trial number")


def plot_pareto(rows: list[dict], chosen: list[dict], out: Path) -> bool:
    """Validation accuracy against tokens generated, every finished trial, the front in Optuna's colour."""
    from optuna.visualization.matplotlib import plot_pareto_front

    study = build_study(rows, ACCURACY_VS_TOKENS)
    if not _complete(study):
        return False
    with _optuna_plots() as plt:
        ax = plot_pareto_front(study, target_names=["tokens generated per answer (validation)",
                                                    "accuracy (validation)"])
        for t in _complete(study):
            ax.annotate(str(rows[t.number]["number"]), tuple(t.values), textcoords="offset points",
                        xytext=(4, 4), fontsize=8)
        if chosen:
            b = chosen[0]["metrics"]
            ax.scatter([b["tokens_generated"]], [b["accuracy"]], s=160, facecolors="none", edgecolors="k",
                       label="best_config")
        ax.set_title("Accuracy vs tokens generated; numbers are trial numbers\n"
                     "Best Trial: the Pareto front (more accuracy, fewer tokens)", fontsize=10)
        ax.legend(fontsize=8)
        _save(plt, [ax], out)
    return True


def plot_history(rows: list[dict], objectives: list[tuple[str, str]], out: Path) -> bool:
    """Each objective per trial with the best so far (Optuna's optimization history), side by side."""
    from optuna.visualization.matplotlib import plot_optimization_history

    studies = [build_study(rows, [objective]) for objective in objectives]
    if not _complete(studies[0]):
        return False
    with _optuna_plots() as plt:
        axes = []
        for (metric, mode), study in zip(objectives, studies):
            ax = plot_optimization_history(study, target_name=f"{metric} (validation)")
            ax.set_title(f"Optimisation history: {metric} ({mode})", fontsize=10)
            ax.legend(fontsize=8, loc="best")   # Optuna's sits outside the axes, beyond the saved figure
            _sweep_trial_numbers(ax, rows)
            axes.append(ax)
        _save(plt, axes, out)
    return True


def plot_importances(sweep: Sweep, rows: list[dict], importances: dict[str, dict[str, float]], out: Path) -> bool:
    """Optuna's fANOVA importances, one panel per objective that has any. One panel each, not
    Optuna's all-objectives chart: optuna 5.0's matplotlib version labels every objective's bars
    with the last objective's parameter order."""
    from optuna.importance import FanovaImportanceEvaluator
    from optuna.visualization.matplotlib import plot_param_importances

    shown = [(i, o.metric) for i, o in enumerate(sweep.config.objectives) if importances.get(o.metric)]
    if not shown:
        return False
    study = sweep_study(sweep, rows)
    with _optuna_plots() as plt:
        axes = []
        for i, metric in shown:
            ax = plot_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=sweep.config.seed),
                                        target=lambda t, i=i: t.values[i], target_name=metric)
            ax.set_title(f"Parameter importances for {metric}", loc="left")
            ax.set_xlabel(f"importance for {metric} (fANOVA, sums to 1)")
            axes.append(ax)
        _save(plt, axes, out)
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
# The report: one function per section, each a list of blocks
# ---------------------------------------------------------------------------------------------

def _mean(rows: list[dict], key: str) -> float | None:
    vals = [r["metrics"][key] for r in rows if r["metrics"].get(key) is not None]
    return sum(vals) / len(vals) if vals else None


def _params_cells(row: dict, keys: list[str]) -> list[str]:
    return [_param(row["params"][k]) if k in row["params"] else "-" for k in keys]


def _summary(sweep: Sweep, rows: list[dict], wall_s: float) -> list[tuple]:
    c = sweep.config
    done = [r for r in rows if r["status"] == "done"]
    counts = {s: sum(r["status"] == s for r in rows) for s in ("done", "stopped", "error")}
    n_val = done[0]["metrics"].get("n") if done else "n/a"
    sampler = (f"Optuna's grid sampler (every combination once, seed {c.seed})" if c.sampler == "grid" else
               f"Optuna TPE ({c.n_startup_trials} random start-up trials, seed {c.seed})")
    return [
        ("h1", f"Sweep report: {c.name}"),
        ("p", f"{len(rows)} trials ({counts['done']} done, {counts['stopped']} stopped early, {counts['error']} failed) "
              f"of `{c.method}` from `{c.base}`, each scored on the **validation** split ({n_val} questions); "
              f"objectives: {', '.join(f'{m} ({mode})' for m, mode in c.objective_pairs)}. {sampler} "
              f"through Ray Tune, scheduler `{c.scheduler}`. "
              f"This run of the command took {wall_s / 60:.1f} min (resumed runs count only their own part)."),
    ]


def _chosen_section(sweep: Sweep, chosen: list[dict], test: dict[str, dict]) -> list[tuple]:
    objectives, keys = sweep.config.objective_pairs, list(sweep.config.search_space)
    title = "Best config" if len(objectives) == 1 else "Pareto front (validation)"
    blocks: list[tuple] = [("h2", f"{title}, evaluated once on the test split")]
    if not chosen:
        return blocks + [("p", "No trial finished, so there is no best config.")]
    header = ["trial", *keys, *[f"val {m}" for m, _ in objectives], "test accuracy", "test tokens generated",
              "test complete", "test n"]
    body = []
    for r in chosen:
        t = test.get(r["trial_id"], {})
        body.append([f"{r['number']} `{r['trial_id']}`", *_params_cells(r, keys),
                     *[_fmt(r["metrics"][m]) for m, _ in objectives], _fmt(t.get("accuracy")),
                     _fmt(t.get("tokens_generated"), ".1f"), _fmt(t.get("complete"), ".2f"), _fmt(t.get("n"))])
    return blocks + [("table", header, body),
                     ("p", "The sweep chose on validation only; these test numbers were computed after the choice "
                           f"and never fed back. `best_config.yaml` is trial {chosen[0]['number']}'s full experiment "
                           f"config (eval split back to test): `cwt-ray run {sweep.folder}/best_config.yaml`.")]


def _plot_sections(sweep: Sweep, rows: list[dict], chosen: list[dict]) -> list[tuple]:
    blocks: list[tuple] = []
    if plot_pareto(rows, chosen, sweep.dir / "pareto.png"):
        blocks += [("h2", "Accuracy vs tokens generated"), ("img", "pareto.png", "Pareto front")]
    if plot_history(rows, sweep.config.objective_pairs, sweep.dir / "history.png"):
        blocks += [("h2", "Optimisation history"), ("img", "history.png", "optimisation history")]
    return blocks


def _importance_section(sweep: Sweep, rows: list[dict]) -> list[tuple]:
    importances, note = param_importances(sweep, rows)
    blocks: list[tuple] = [("h2", "Parameter importances")]
    if not importances:
        return blocks + [("p", f"Not available: {note}.")]
    params = sorted({p for imp in importances.values() for p in imp})
    body = [[f"`{p}`", *[_fmt(imp.get(p), ".2f") for imp in importances.values()]] for p in params]
    blocks += [("table", ["parameter", *importances], body),
               ("p", "Optuna's fANOVA evaluator over the finished trials; keys searched only under a condition "
                     "(`when`) are left out. With few trials these are rough.")]
    if plot_importances(sweep, rows, importances, sweep.dir / "importances.png"):
        blocks += [("img", "importances.png", "parameter importances")]
    return blocks


def _trials_section(sweep: Sweep, rows: list[dict]) -> list[tuple]:
    keys = list(sweep.config.search_space)
    header = ["#", "trial", "status", *keys, "accuracy", "tokens generated", "complete", "last train loss",
              "time s", "fixed s", "reused"]
    body = [[r["number"], f"`{r['trial_id']}`", r["status"] + (f": {r['error'][:80]}" if r["error"] else ""),
             *_params_cells(r, keys),
             _fmt(r["metrics"].get("accuracy")), _fmt(r["metrics"].get("tokens_generated"), ".1f"),
             _fmt(r["metrics"].get("complete"), ".2f"), _fmt(r["metrics"].get("loss")),
             _fmt(r["metrics"].get("trial_wall_s"), ".0f"), _fmt(r["metrics"].get("fixed_s"), ".0f"),
             r["metrics"].get("reused", "")] for r in rows]
    return [("h2", "All trials (validation split)"), ("table", header, body),
            ("p", "`-`: a conditional key that was not searched in that trial (its base value applied). Each "
                  "trial's run directory is `trials/<trial>/` in the sweep directory (its `config.yaml` "
                  "reproduces it; `console.log` has its stage lines).")]


def _cost_section(rows: list[dict]) -> list[tuple]:
    done = [r for r in rows if r["status"] == "done"]
    cost = [("data + chunk (prepare)", "prepare_s"), ("train, wall (incl. trainer start-up)", "train_wall_s"),
            ("train, optimizer steps only", "train_step_s"), ("eval, wall (incl. actor start-up)", "eval_wall_s"),
            ("eval, generate() only", "generate_s"), ("fixed cost (all but steps and generate)", "fixed_s"),
            ("whole trial", "trial_wall_s")]
    return [("h2", "What a trial costs (mean over finished trials, seconds)"),
            ("table", ["part", "seconds"], [[name, _fmt(_mean(done, key), ".1f")] for name, key in cost])]


def _dashboard_section(sweep: Sweep, rows: list[dict]) -> list[tuple]:
    """Writes optuna.db (when the sweep file asks for it) and says how to open it."""
    if not sweep.config.optuna_db:
        return []
    db = sweep.dir / "optuna.db"
    db.unlink(missing_ok=True)
    sweep_study(sweep, rows, storage=f"sqlite:///{db}")
    return [("h2", "Optuna dashboard"),
            ("p", f"The trials are also in an Optuna study (`{sweep.config.name}`) in `optuna.db` in the sweep "
                  f"directory: `pip install optuna-dashboard && optuna-dashboard sqlite:///{sweep.folder}/optuna.db`.")]


def write_sweep_report(sweep: Sweep, rows: list[dict], chosen: list[dict], test: dict[str, dict], wall_s: float) -> Path:
    """report.md, report.html (and their PNGs), trials.json and optuna.db in the sweep directory."""
    d = sweep.dir
    blocks = (_summary(sweep, rows, wall_s) + _chosen_section(sweep, chosen, test) + _plot_sections(sweep, rows, chosen)
              + _importance_section(sweep, rows) + _trials_section(sweep, rows) + _cost_section(rows)
              + _dashboard_section(sweep, rows))
    if chosen:
        blocks += [("h2", "best_config.yaml"), ("code", "yaml", (d / "best_config.yaml").read_text())]
    write_atomic(d / "trials.json", json.dumps(rows, indent=2, default=str))
    write_atomic(d / "report.md", render_markdown(blocks))
    write_atomic(d / "report.html", render_html(blocks, d, f"Sweep report: {sweep.config.name}"))
    return d / "report.md"
