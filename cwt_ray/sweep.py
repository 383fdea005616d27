"""Sweep stage: Optuna through Ray Tune over any experiment config key, one Ray Train run per trial.

A sweep file names a base experiment YAML, overrides on it, a search space of dotted config keys,
and one or two objectives. Every trial is the ordinary pipeline (data -> chunk -> train -> eval) in
its own run directory `runs/<sweep>/trials/<trial_id>/`, scored on the *validation* split; the test
split is only touched after the search, to report the chosen configs, so the sweep cannot select
on test. Layout of `runs/<sweep>/`:

    sweep.json      what the sweep was started with (a changed sweep file refuses to resume)
    tune/           Ray Tune's experiment state: `Tuner.restore` continues from it
    cache/          data splits and chunk outputs keyed by their stage fingerprint, shared by trials
    trials/<id>/    one run directory per trial (config.yaml reproduces it), console.log
    test/<id>/      the chosen configs evaluated once on the test split
    report.md, report.html, *.png, best_config.yaml, optuna.db

This module is the runner (Ray Tune, trials, callbacks). The sweep file's config and `load_sweep`
are in `sweep_config.py`; the report, and the choice of trials from the results, in `sweep_report.py`.
The published files (report, best_config.yaml, sweep.json, trials.json) name no absolute path that
the sweep made: files of the sweep relative to its directory, the rest as the sweep file wrote them.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any, Optional

import optuna
from ray.tune import Callback
from ray.tune.search.optuna import OptunaSearch

from .config import ExperimentConfig, UserError, validate_config
from .console import fmt_eta, get_logger
from .rundir import METRICS, TRAIN_METRICS, eval_dir, read_json, student_dir, write_atomic, write_json
from .sweep_config import EVAL_METRICS, Param, Sweep, SweepConfig, grid_values
from .sweep_report import choose, write_sweep_report

log = get_logger("sweep")


# ---------------------------------------------------------------------------------------------
# Search space, searcher and concurrency
# ---------------------------------------------------------------------------------------------

class FinalResultOptunaSearch(OptunaSearch):
    """OptunaSearch told only a trial's final result. The training metrics a trial streams while it
    runs (for ASHA) carry no validation objective and Optuna's pruner is not used, so they are not
    Optuna's business. A trial that errors is not told either: when the error was an interruption
    (Ctrl-C reaches the trial's processes too), the resumed sweep runs the trial again and tells
    Optuna its real result, which a recorded failure would block. Module level, so Tune's pickled
    experiment state refers to this code by name."""

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        return None

    def on_trial_complete(self, trial_id: str, result: Optional[dict] = None, error: bool = False) -> None:
        if not error:
            super().on_trial_complete(trial_id, result, error)


class SearchSpace:
    """Optuna define-by-run space: a conditional key is asked for only when its `when` holds, so
    the sampler never models a value that did not matter. A module-level class (not a closure) so
    Tune can pickle it into the experiment state and restore it."""

    def __init__(self, params: dict[str, Param]):
        self.params = {k: p.model_dump() for k, p in params.items()}

    def __call__(self, trial) -> None:
        chosen: dict[str, Any] = {}
        for key, p in self.params.items():
            if any(chosen.get(other) != value for other, value in p["when"].items()):
                continue
            if p["type"] == "categorical":
                chosen[key] = trial.suggest_categorical(key, p["choices"])
            elif p["type"] == "int":
                chosen[key] = trial.suggest_int(key, p["low"], p["high"], step=p["step"] or 1, log=p["log"])
            else:
                chosen[key] = trial.suggest_float(key, float(p["low"]), float(p["high"]), step=p["step"], log=p["log"])


def trial_demand(cfg: ExperimentConfig, cluster_gpus: float = 0.0) -> dict[str, float]:
    """Peak CPUs/GPUs one trial's stages hold at once (stages run one after another), base values.
    An actor's GPU share of None means one GPU when the cluster has GPUs (as chunk/eval do)."""
    def share(gpus):
        return gpus if gpus is not None else (1.0 if cluster_gpus > 0 else 0.0)

    chunking, skipping = "cwt" in cfg.methods, "stt" in cfg.methods
    cpu = max(cfg.train.num_workers * cfg.train.cpus_per_worker, cfg.eval.concurrency * cfg.eval.cpus_per_actor,
              cfg.chunk.concurrency * cfg.chunk.cpus_per_actor if chunking else 0.0,
              cfg.stt.concurrency * cfg.stt.cpus_per_actor if skipping else 0.0)
    gpu = max(cfg.train.num_workers if cfg.train.use_gpu else 0, cfg.eval.concurrency * share(cfg.eval.gpus_per_actor),
              cfg.chunk.concurrency * share(cfg.chunk.gpus_per_actor) if chunking else 0.0,
              cfg.stt.concurrency * share(cfg.stt.gpus_per_actor) if skipping else 0.0)
    return {"CPU": cpu, "GPU": float(gpu)}


def plan_concurrency(config: SweepConfig, demand: dict[str, float], cluster: dict[str, float]) -> tuple[int, str]:
    """How many trials run at once, and why. Trials that would not fit only queue; trials beyond
    n_startup_trials in flight are suggested before TPE sees their neighbours' results."""
    fits = min(int(cluster.get(r, 0) // need) for r, need in demand.items() if need > 0)
    if fits < 1:
        need = ", ".join(f"{need:g} {r}" for r, need in demand.items() if need > 0)
        have = ", ".join(f"{cluster.get(r, 0):g} {r}" for r, need in demand.items() if need > 0)
        raise UserError(f"one trial needs {need} at its peak (train workers or eval/chunk actors); the cluster has {have}")
    if config.max_concurrent_trials:
        n = config.max_concurrent_trials
        why = "set in the sweep file"
        if n > fits:
            why += f"; only {fits} fit the cluster now, the rest queue"
        if config.sampler == "tpe" and n > max(1, config.n_startup_trials):
            why += (f"; more than n_startup_trials={config.n_startup_trials} in flight, so some TPE suggestions "
                    f"come before the results they could use")
    elif config.sampler == "grid":   # grid points do not depend on earlier results
        n = max(1, min(fits, config.num_samples))
        why = f"{fits} fit the cluster (grid: no cap)"
    else:
        n = max(1, min(fits, config.n_startup_trials or 1, config.num_samples))
        why = f"{fits} fit the cluster, capped at n_startup_trials={config.n_startup_trials} so TPE sees results"
    return n, why


# ---------------------------------------------------------------------------------------------
# One trial (runs in a Ray Tune trial actor)
# ---------------------------------------------------------------------------------------------

# Outputs trials share when their stage fingerprint is equal: stage key -> folders it writes, in
# the order the pipeline makes them. Trained students are shared too, so a sweep over a knob that
# only changes evaluation (stt.skip_confidence, eval.*) trains once and evaluates each point.
SHARED_STAGES = {"data": ("data",), "chunk": ("chunks",), "train/std_cot": ("students/std_cot",),
                 "train/cwt": ("students/cwt",), "skip": ("skips",), "train/stt": ("students/stt",)}


def _cached(cache: Path, key: str, state) -> Path:
    """The cache folder of one stage output: `train/cwt` with fingerprint f -> cache/train-cwt-f."""
    return cache / f"{key.replace('/', '-')}-{state.fingerprint(key)}"


def reuse_shared(cfg: ExperimentConfig, cache: Path) -> list[str]:
    """Copy finished stage outputs (data, chunks, skip data, trained students) with this trial's
    fingerprint from the sweep cache into the run directory and mark them done, so the pipeline
    skips them. Copies, not links: a trial that retrains must not overwrite another's files.
    Returns the stages reused."""
    from .pipeline import RunState

    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    state, reused = RunState(cfg.run_dir, cfg), []
    for key, folders in SHARED_STAGES.items():
        src = _cached(cache, key, state)
        if state.is_done(key) or not src.is_dir():
            continue
        for folder in folders:
            shutil.copytree(src / folder, cfg.run_dir / folder, dirs_exist_ok=True)
        state.mark(key)
        reused.append(key)
    return reused


def publish_shared(cfg: ExperimentConfig, cache: Path) -> None:
    """Offer this trial's finished stage outputs to later trials (copy, then atomic rename: two
    trials publishing the same fingerprint at once is harmless)."""
    from .pipeline import RunState

    state = RunState(cfg.run_dir, cfg)
    for key, folders in SHARED_STAGES.items():
        dest = _cached(cache, key, state)
        if not state.is_done(key) or dest.exists():
            continue
        tmp = cache / f".{dest.name}.{os.getpid()}"
        for folder in folders:
            shutil.copytree(cfg.run_dir / folder, tmp / folder, dirs_exist_ok=True)
        with contextlib.suppress(OSError):
            tmp.rename(dest)
        shutil.rmtree(tmp, ignore_errors=True)


def run_trial(params: dict, sweep: Sweep) -> None:
    """Tune function trainable: the pipeline for one point of the search space. Training metrics
    stream to Tune through Ray Train's TuneReportCallback (ASHA acts on them); the final report
    carries the validation metrics the searcher scores."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from .cluster import quiet_ray_data
    from .pipeline import run_stages

    quiet_ray_data()
    trial_id = tune.get_context().get_trial_id()
    cfg = sweep.trial_config(params, trial_id)
    method, run_dir = sweep.config.method, cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    t = {"start": time.perf_counter()}
    # The trial's own stage lines go to its log; the console shows one line per finished trial.
    with open(run_dir / "console.log", "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        reused = reuse_shared(cfg, sweep.dir / "cache")
        run_stages(cfg, stages=("data", "chunk"))
        publish_shared(cfg, sweep.dir / "cache")
        t["prepared"] = time.perf_counter()
        run_stages(cfg, stages=("train",), train_callbacks=[TuneReportCallback()])
        publish_shared(cfg, sweep.dir / "cache")
        t["trained"] = time.perf_counter()
        run_stages(cfg, stages=("eval",), eval_methods=[method])
        t["evaluated"] = time.perf_counter()
    trained = {m: read_json(student_dir(run_dir, m) / TRAIN_METRICS) for m in cfg.methods}
    # stt trains cwt first; a student reused from an earlier trial cost this trial no steps.
    step_s = sum(m["train_time_s"] for name, m in trained.items() if f"train/{name}" not in reused)
    ev = read_json(eval_dir(run_dir, method) / METRICS)
    generate_s = ev["batched_generation_s"]
    wall = t["evaluated"] - t["start"]
    tune.report({
        **{k: ev.get(k) for k in EVAL_METRICS}, "n": ev["n"], "loss": trained[method]["final_loss"],
        "val_loss": trained[method].get("final_val_loss"),
        "train_steps": trained[method]["steps"], "train_step_s": step_s, "generate_s": generate_s,
        "prepare_s": t["prepared"] - t["start"], "train_wall_s": t["trained"] - t["prepared"],
        "eval_wall_s": t["evaluated"] - t["trained"], "trial_wall_s": wall,
        # Everything that is not a training step or a generate() call: worker and actor start-up,
        # model loads, data and chunk preparation, Ray scheduling.
        "fixed_s": wall - step_s - generate_s, "reused": ",".join(reused) or "-",
        "run_dir": str(run_dir.relative_to(sweep.dir))})


# ---------------------------------------------------------------------------------------------
# Console: one line per finished trial
# ---------------------------------------------------------------------------------------------

def _status(metrics: dict, objectives: list[str]) -> str:
    """'done' when the trial reported its objectives, else 'stopped' (ended early by ASHA)."""
    return "done" if all(metrics.get(m) is not None for m in objectives) else "stopped"


def _fmt_params(params: dict) -> str:
    return " ".join(f"{k}={_fmt_value(v)}" for k, v in params.items())


def _fmt_value(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


# debug.stop_after_trials of the running command. Not kept on the callback: Tune pickles callbacks
# into its experiment state, and a resumed sweep must not inherit the first run's debug knob.
_stop_after_trials: Optional[int] = None


class TrialLines(Callback):
    """Prints one line per finished trial; with verbose=0 Tune prints no table of its own.
    Optionally interrupts the sweep as Ctrl-C would (debug.stop_after_trials)."""

    def __init__(self, sweep: Sweep):
        self.sweep = sweep
        self.finished_here = 0
        self.t0 = time.perf_counter()

    def _line(self, trials, trial, text: str) -> None:
        done = sum(t.status in ("TERMINATED", "ERROR") for t in trials if t is not trial) + 1
        self.finished_here += 1
        # Trials finish at the rate seen so far in this process (a resumed sweep's earlier ones excluded).
        eta = (time.perf_counter() - self.t0) / self.finished_here * (self.sweep.config.num_samples - done)
        log.info(f"[sweep] trial {done}/{self.sweep.config.num_samples} {trial.trial_id} {text} | "
                 f"{_fmt_params(trial.config)} | ETA {fmt_eta(eta)}")
        if _stop_after_trials and self.finished_here == _stop_after_trials:
            os.kill(os.getpid(), signal.SIGINT)

    def on_trial_complete(self, iteration, trials, trial, **info):
        r = trial.last_result or {}
        objectives = [o.metric for o in self.sweep.config.objectives]
        if _status(r, objectives) == "stopped":
            self._line(trials, trial, f"stopped early by ASHA at loss {r.get('loss', float('nan')):.3f}")
            return
        metrics = " ".join(f"{m} {r[m]:.3f}" for m in dict.fromkeys(objectives + ["accuracy", "tokens_generated"]))
        self._line(trials, trial, f"{metrics} ({r.get('trial_wall_s', 0):.0f}s, fixed {r.get('fixed_s', 0):.0f}s)")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._line(trials, trial, f"FAILED; see {self.sweep.dir / 'trials' / trial.trial_id / 'console.log'} "
                                  f"and {trial.local_path}/error.txt")


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------

@contextlib.contextmanager
def sweep_ray_session(sweep: Sweep, extra_cpus: float):
    """Like pipeline.ray_session, plus: workers' output stays in Ray's log files (the console gets
    one line per trial), and trials keep the driver's working directory (relative paths in configs
    mean the same thing in every trial). On an embedded cluster the trial drivers' small CPU
    reservations are added as logical CPUs, so a trial's trainer still gets whole cores."""
    import ray

    from .cluster import OFFLINE_ENV, quiet_ray_data

    env = {**OFFLINE_ENV, "RAY_CHDIR_TO_TRIAL_DIR": "0"}
    for key, value in env.items():
        os.environ.setdefault(key, value)
    # A trial's training reports (streamed for ASHA) come before its validation metrics exist.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    # The legacy reporter honours verbose=0 completely; the new one still prints a banner and a summary.
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    if "CWT_RAY_CACHE" in os.environ:
        env["CWT_RAY_CACHE"] = os.environ["CWT_RAY_CACHE"]
    if ray.is_initialized():   # a caller's cluster (tests): use it as it is
        yield False
        return
    address = sweep.base.ray.address or os.environ.get("RAY_ADDRESS") or "local"
    num_cpus = None
    if address == "local":
        num_cpus = (sweep.base.ray.num_cpus or os.cpu_count() or 1) + math.ceil(extra_cpus)   # Ray wants whole CPUs
    ray.init(address=address, num_cpus=num_cpus, include_dashboard=sweep.base.ray.include_dashboard,
             dashboard_host="127.0.0.1", runtime_env={"env_vars": env}, logging_level="WARNING",
             log_to_driver=False)
    quiet_ray_data()
    try:
        yield address == "local"
    finally:
        ray.shutdown()


def _cluster_size(sweep: Sweep, embedded: bool) -> dict[str, float]:
    import ray

    res = ray.cluster_resources()
    if embedded:   # what the user's config says, without the logical CPUs added for trial drivers
        return {"CPU": float(sweep.base.ray.num_cpus or os.cpu_count() or 1), "GPU": res.get("GPU", 0.0)}
    return {"CPU": res.get("CPU", 0.0), "GPU": res.get("GPU", 0.0)}


def _check_fingerprint(sweep: Sweep) -> None:
    stamp = sweep.dir / "sweep.json"
    fp = sweep.fingerprint()
    if stamp.is_file():
        old = json.loads(stamp.read_text())["fingerprint"]
        if old != fp:
            raise UserError(f"{sweep.dir} holds a sweep started from a different sweep file or base config; "
                            f"re-run with --overwrite to start over, or give the sweep another name")
        return
    sweep.dir.mkdir(parents=True, exist_ok=True)
    write_json(stamp, {"fingerprint": fp, "sweep_file": os.path.relpath(sweep.path),
                       "config": sweep.config.model_dump(mode="json")})


class TuneGridSampler(optuna.samplers.GridSampler):
    """Optuna's GridSampler without its `study.stop()` after the last grid point: Ray Tune asks and
    tells outside `study.optimize`, where stop() raises (the trial is already stored by then).
    Tune ends the sweep after num_samples trials, which never exceeds the grid. Module level, so
    Tune can pickle it with the searcher."""

    def after_trial(self, study, trial, state, values) -> None:
        return None


def make_sampler(c: SweepConfig, concurrency: int = 1):
    """The Optuna sampler the sweep file names."""
    if c.sampler == "grid":
        # The first len(grid) trial numbers map one-to-one onto grid points, so trials running at
        # once never pick the same point.
        grid = {key: grid_values(key, c.search_space[key]) for key in c.search_space}
        return TuneGridSampler(grid, seed=c.seed)
    return optuna.samplers.TPESampler(n_startup_trials=c.n_startup_trials, seed=c.seed, constant_liar=concurrency > 1)


def _build_tuner(sweep: Sweep, concurrency: int):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    optuna.logging.set_verbosity(optuna.logging.WARNING)   # its per-trial INFO lines would double ours
    c = sweep.config
    trainable = tune.with_resources(tune.with_parameters(run_trial, sweep=sweep), {"cpu": c.trial_cpus})
    path = sweep.dir / "tune"
    if tune.Tuner.can_restore(str(path)):
        # Ray >= 2.2 (the fix for ray#30861) pickles the searcher with the experiment and loads its
        # saved state here: OptunaSearch comes back with its study, so finished trials stay told
        # and the sampler goes on from them instead of a fresh random search.
        # resume_errored: a trial that died with the interrupted driver is run again (from the
        # start of its stages; finished stages and Ray Train checkpoints in its run dir are kept).
        return tune.Tuner.restore(str(path), trainable=trainable, resume_unfinished=True, resume_errored=True), True
    metrics, modes = [o.metric for o in c.objectives], [o.mode for o in c.objectives]
    searcher = FinalResultOptunaSearch(space=SearchSpace(c.search_space), sampler=make_sampler(c, concurrency),
                            metric=metrics if len(metrics) > 1 else metrics[0],
                            mode=modes if len(modes) > 1 else modes[0])
    scheduler = None
    if c.scheduler == "asha":
        # The objective is known only after evaluation; training loss at epoch ends is the signal
        # available while a trial runs.
        scheduler = ASHAScheduler(metric="loss", mode="min", time_attr="training_iteration",
                                  grace_period=c.asha_grace_period, max_t=10_000)
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=c.num_samples,
                                    max_concurrent_trials=concurrency),
        run_config=tune.RunConfig(name="tune", storage_path=str(sweep.dir), verbose=0,
                                  callbacks=[TrialLines(sweep)]))
    return tuner, False


def _finished_trials(path: Path) -> int:
    """Trials the saved experiment state holds as finished: what a resume would not run again.
    (After Ctrl-C, in-memory statuses of the stopped trial vary; the saved state is what counts.)"""
    from ray.tune import ExperimentAnalysis

    return sum(t.status in ("TERMINATED", "ERROR") for t in ExperimentAnalysis(str(path)).trials)


def collect_trials(result_grid, objectives: list[str]) -> list[dict]:
    rows = []
    for r in result_grid:
        m = dict(r.metrics or {})
        trial_id = m.get("trial_id") or Path(r.path).name
        status = "error" if r.error else _status(m, objectives)
        # experiment_tag starts with the trial's number in the sweep ("3_chunk.num_chunks=4,...").
        number = int(str(m.get("experiment_tag", "0")).split("_")[0] or 0)
        if "run_dir" in m:   # relative to the sweep directory (results of older versions held absolute ones)
            m["run_dir"] = f"trials/{trial_id}"
        rows.append({"number": number, "trial_id": trial_id, "params": dict(r.config or {}), "metrics": m,
                     "status": status, "time_s": m.get("time_total_s"),
                     "error": str(r.error).strip().splitlines()[-1] if r.error else ""})
    return sorted(rows, key=lambda row: row["number"])


def evaluate_on_test(sweep: Sweep, chosen: list[dict]) -> dict[str, dict]:
    """The chosen configs' trained students, evaluated once on the test split (kept for resume)."""
    from .eval import evaluate_method

    out = {}
    method = sweep.config.method
    for row in chosen:
        cfg = sweep.trial_config(row["params"], row["trial_id"], split="test", folder="test")
        metrics_file = eval_dir(cfg.run_dir, method) / METRICS
        if not metrics_file.is_file():
            trial_dir = sweep.dir / "trials" / row["trial_id"]
            cfg.run_dir.mkdir(parents=True, exist_ok=True)
            for folder in ("data", "students"):   # same splits, same student: nothing is retrained
                link = cfg.run_dir / folder
                if not link.exists():
                    link.symlink_to(trial_dir / folder, target_is_directory=True)
            write_atomic(cfg.run_dir / "config.yaml", cfg.to_yaml())
            evaluate_method(cfg, method, cfg.run_dir)
        out[row["trial_id"]] = read_json(metrics_file)
    return out


def _write_best_config(sweep: Sweep, best_row: dict) -> None:
    """The chosen trial's full experiment config, eval split back to test. Its storage_path is the
    sweep's as configured (`./runs` by default), never resolved to this machine's absolute path."""
    best = validate_config(sweep.experiment_tree(best_row["params"]), source="best config")
    write_atomic(
        sweep.dir / "best_config.yaml",
        f"# Best trial {best_row['trial_id']} of sweep {sweep.config.name} ({os.path.relpath(sweep.path)}); "
        f"evaluated on the test split.\n#   cwt-ray run {sweep.folder}/best_config.yaml\n" + best.to_yaml())


def _search(sweep: Sweep, embedded: bool) -> Optional[list[dict]]:
    """Run (or resume) the trials on the open Ray session; their rows, or None when interrupted."""
    c = sweep.config
    cluster = _cluster_size(sweep, embedded)
    demand = trial_demand(sweep.trial_config({}, "preflight"), cluster["GPU"])
    concurrency, why = plan_concurrency(c, demand, cluster)
    tuner, resumed = _build_tuner(sweep, concurrency)
    log.info(f"[sweep] {c.name}: {c.num_samples} trials of {c.method} on the validation split, objectives "
             f"{', '.join(f'{o.metric} ({o.mode})' for o in c.objectives)}, {concurrency} at a time ({why})"
             f"{'; resuming' if resumed else ''}. Trial logs: {sweep.dir / 'trials'}/<id>/console.log")
    grid = tuner.fit()
    finished = _finished_trials(sweep.dir / "tune")
    if finished < c.num_samples:   # Ctrl-C: Tune saved its state and returned early
        log.info(f"[sweep] interrupted after {finished}/{c.num_samples} trials; re-run the same command to continue")
        return None
    return collect_trials(grid, [o.metric for o in c.objectives])


def run_sweep(sweep: Sweep, overwrite: bool = False) -> Optional[Path]:
    """Run (or continue) the sweep; returns report.md, or None when it was interrupted."""
    from .pipeline import preflight

    global _stop_after_trials
    c = sweep.config
    _stop_after_trials = c.debug.stop_after_trials
    if overwrite and sweep.dir.exists():
        shutil.rmtree(sweep.dir)
    _check_fingerprint(sweep)
    preflight(sweep.base, ("data", "chunk"))
    max_trials_at_once = c.max_concurrent_trials or max(1, c.n_startup_trials)
    t0 = time.perf_counter()
    with sweep_ray_session(sweep, extra_cpus=c.trial_cpus * max_trials_at_once) as embedded:
        rows = _search(sweep, embedded)
        if rows is None:
            return None
        chosen = choose(rows, c)
        test = evaluate_on_test(sweep, chosen) if chosen else {}
    wall = time.perf_counter() - t0
    if chosen:
        _write_best_config(sweep, chosen[0])
    path = write_sweep_report(sweep, rows, chosen, test, wall)
    log.info(f"[sweep] report: {path} (and report.html); best config: {sweep.dir / 'best_config.yaml'}")
    return path
