"""Sweeps: search-space checks (fast, no Ray) and a real 4-trial Ray Tune + Optuna sweep with resume."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cwt_ray.config import UserError, load_config
from cwt_ray.sweep import SearchSpace, make_sampler, plan_concurrency, trial_demand
from cwt_ray.sweep_config import SweepConfig, grid_points, load_sweep
from cwt_ray.sweep_report import choose, pareto_front

from conftest import ROOT, seed_stages

SMOKE_SWEEP = ROOT / "configs" / "sweep_smoke.yaml"


def _write(tmp_path, **changes):
    """The smoke sweep with top-level keys replaced, written next to a copy of its base."""
    tree = yaml.safe_load(SMOKE_SWEEP.read_text())
    tree.update(changes)
    (tmp_path / "smoke.yaml").write_text((ROOT / "configs" / "smoke.yaml").read_text())
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


@pytest.mark.parametrize("space, message", [
    ({"chunk.num_chunkz": {"type": "int", "low": 2, "high": 4}},
     "search_space 'chunk.num_chunkz' = 2: unknown config key 'chunk.num_chunkz'"),
    ({"chunk.num_chunks": {"type": "int", "low": 5, "high": 2}}, "low (5) > high (2)"),
    ({"chunk.heuristic": {"type": "categorical", "choices": []}}, "categorical needs a non-empty 'choices' list"),
    ({"chunk.heuristic": {"type": "categorical", "choices": ["average", "magic"]}},
     "search_space 'chunk.heuristic' = 'magic': bad value for 'chunk.heuristic'"),
    ({"chunk.num_chunks": {"type": "int", "low": 2, "high": 100}},
     "search_space 'chunk.num_chunks' = 100: bad value for 'chunk.num_chunks'"),
    ({"chunk.sbc_tau": {"type": "float", "low": 0.0, "high": 0.1, "when": {"chunk.heuristc": "sbc"}}},
     "when refers to 'chunk.heuristc', which is not a search_space key listed before it"),
    ({"chunk.heuristic": {"type": "categorical", "choices": ["average"]},
      "chunk.sbc_tau": {"type": "float", "low": 0.0, "high": 0.1, "when": {"chunk.heuristic": "sbc"}}},
     "when chunk.heuristic='sbc' is not one of that key's choices"),
    ({"train.lr": {"type": "float", "low": 0.0, "high": 0.1, "log": True}}, "log needs low > 0"),
    ({"name": {"type": "categorical", "choices": ["a"]}}, "name is not searchable"),
    ({}, "search_space"),
])
def test_bad_search_space_is_one_line_user_error(tmp_path, space, message):
    with pytest.raises(UserError) as err:
        load_sweep(_write(tmp_path, search_space=space))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_sweep_configs_in_repo_validate():
    paths = sorted((ROOT / "configs").glob("sweep_*.yaml")) + sorted((ROOT / "configs").glob("experiments/*sweep*.yaml"))
    assert len(paths) >= 4
    for path in paths:
        assert load_sweep(path).config.search_space


def test_other_sweep_file_errors(tmp_path):
    with pytest.raises(UserError, match="scheduler 'asha' needs a single objective"):
        load_sweep(_write(tmp_path, scheduler="asha"))
    with pytest.raises(UserError, match="unknown config key 'num_sample'"):
        load_sweep(_write(tmp_path, num_sample=3))
    with pytest.raises(UserError, match="base config not found"):
        load_sweep(_write(tmp_path, base="nope.yaml"))
    with pytest.raises(UserError, match="unknown config key 'train.lrr'"):
        load_sweep(_write(tmp_path, overrides={"train": {"lrr": 1.0}}))
    with pytest.raises(UserError, match="validation_size >= 1"):
        load_sweep(_write(tmp_path, overrides={"data": {"validation_size": 0}}))


GRID = {"chunk.num_chunks": {"type": "int", "low": 2, "high": 3},
        "train.lr": {"type": "float", "low": 1.0e-4, "high": 3.0e-4, "step": 1.0e-4},
        "chunk.heuristic": {"type": "categorical", "choices": ["average", "semantic"]}}


@pytest.mark.parametrize("space, samples, message", [
    ({"train.lr": {"type": "float", "low": 1.0e-4, "high": 1.0e-3, "log": True}}, 2, "'train.lr' is log-scaled"),
    ({"train.lr": {"type": "float", "low": 1.0e-4, "high": 1.0e-3}}, 2, "float 'train.lr' needs a step"),
    ({"train.lr_schedule": {"type": "categorical", "choices": ["constant", "cosine"]},
      "train.warmup_steps": {"type": "int", "low": 0, "high": 2, "when": {"train.lr_schedule": "cosine"}}}, 2,
     "'train.warmup_steps' has 'when'"),
    (GRID, 13, "num_samples 13 is more than the grid's 12 points; set num_samples: 12"),
])
def test_grid_sampler_needs_an_enumerable_space(tmp_path, space, samples, message):
    with pytest.raises(UserError) as err:
        load_sweep(_write(tmp_path, sampler="grid", search_space=space, num_samples=samples))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_grid_sampler_runs_every_point_once():
    """Through Optuna's ask/tell, as Ray Tune's OptunaSearch drives it: 12 trials are the 12 grid
    points, each once, and telling the last one does not raise (GridSampler's study.stop() would)."""
    import optuna

    config = SweepConfig.model_validate(yaml.safe_load(SMOKE_SWEEP.read_text())
                                        | {"sampler": "grid", "search_space": GRID, "num_samples": 12})
    points = grid_points(config.search_space)
    assert len(points) == 12 and {p["train.lr"] for p in points} == {1.0e-4, 2.0e-4, 3.0e-4}
    study = optuna.create_study(sampler=make_sampler(config))
    space, seen = SearchSpace(config.search_space), []
    for _ in range(12):
        trial = study.ask()
        space(trial)
        seen.append(json.dumps(trial.params, sort_keys=True))
        study.tell(trial, 0.0)
    assert sorted(seen) == sorted(json.dumps(p, sort_keys=True) for p in points)


def test_cli_reports_bad_search_space_in_one_line_exit_2_before_ray(tmp_path):
    path = _write(tmp_path, search_space={"chunk.num_chunks": {"type": "int", "low": 4, "high": 2}})
    proc = subprocess.run([sys.executable, "-m", "cwt_ray.cli", "sweep", str(path)], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "low (4) > high (2)" in proc.stderr
    assert "ray" not in proc.stdout.lower()


def test_trial_config_scores_on_validation_and_best_config_on_test():
    sweep = load_sweep(SMOKE_SWEEP, ["storage_path=/tmp/x"])
    trial = sweep.trial_config({"chunk.num_chunks": 2, "train.lr": 1e-3}, "t1")
    assert trial.eval.split == "validation" and trial.chunk.num_chunks == 2 and trial.methods == ["cwt"]
    assert str(trial.run_dir) == "/tmp/x/sweep_smoke/trials/t1"
    best = sweep.experiment_tree({"chunk.num_chunks": 2})
    assert best["eval"]["split"] == "test" and best["name"] == "sweep_smoke-best"
    assert best["storage_path"] == "/tmp/x"   # as configured
    # best_config.yaml carries the storage path as the sweep file or its base wrote it, not resolved.
    assert load_sweep(SMOKE_SWEEP).experiment_tree({})["storage_path"] == "./runs"


def test_every_sweep_config_field_has_a_description():
    from cwt_ray.sweep_config import Objective, Param, SweepDebug

    for model in (SweepConfig, Param, Objective, SweepDebug):
        missing = [name for name, field in model.model_fields.items() if not field.description]
        assert not missing, f"{model.__name__}: {missing}"


def test_skip_thinking_knobs_are_searched_like_any_key(tmp_path):
    space = {"stt.gate": {"type": "categorical", "choices": ["nll", "correct"]},
             "stt.threshold": {"type": "float", "low": 0.05, "high": 0.5, "when": {"stt.gate": "nll"}},
             "stt.removal": {"type": "categorical", "choices": ["one_at_a_time", "cumulative"]}}
    sweep = load_sweep(_write(tmp_path, method="stt", search_space=space))
    trial = sweep.trial_config({"stt.gate": "nll", "stt.threshold": 0.2}, "t1")
    assert trial.methods == ["cwt", "stt"] and trial.stt.threshold == 0.2 and trial.eval.split == "validation"
    with pytest.raises(UserError, match="search_space 'stt.threshold' = -1.0: bad value for 'stt.threshold'"):
        load_sweep(_write(tmp_path, method="stt", search_space={"stt.threshold": {"type": "float", "low": -1.0, "high": 0.5}}))


def test_concurrency_is_capped_so_tpe_sees_results():
    base = load_config(ROOT / "configs" / "smoke.yaml")
    demand = trial_demand(base)
    assert demand == {"CPU": 1.0, "GPU": 0.0}
    config = SweepConfig.model_validate(yaml.safe_load(SMOKE_SWEEP.read_text()) | {"max_concurrent_trials": None,
                                                                                    "n_startup_trials": 3})
    assert plan_concurrency(config, demand, {"CPU": 16, "GPU": 0})[0] == 3   # fits 16, TPE cap 3
    assert plan_concurrency(config, demand, {"CPU": 2, "GPU": 0})[0] == 2
    with pytest.raises(UserError, match="one trial needs 4 CPU"):
        plan_concurrency(config, {"CPU": 4.0, "GPU": 0.0}, {"CPU": 2, "GPU": 0})


def test_pareto_front_and_choice():
    def row(n, acc, tok):
        return {"number": n, "trial_id": str(n), "status": "done", "params": {},
                "metrics": {"accuracy": acc, "tokens_generated": tok}}

    rows = [row(1, 0.5, 40), row(2, 0.5, 30), row(3, 0.25, 10), row(4, 0.25, 20), row(5, 0.75, 60), row(6, 0.5, 30)]
    front = pareto_front(rows, [("accuracy", "max"), ("tokens_generated", "min")])
    assert [r["number"] for r in front] == [5, 2, 3]
    config = SweepConfig.model_validate(yaml.safe_load(SMOKE_SWEEP.read_text()))
    assert [r["number"] for r in choose(rows, config)] == [5, 2, 3]
    single = config.model_copy(update={"objectives": config.objectives[:1]})
    assert [r["number"] for r in choose(rows, single)] == [5]


@pytest.mark.slow
def test_sweep_interrupted_then_resumed_reports_and_best_config_runs(ray_cluster, tmp_path, capsys):
    """3 trials (the smoke sweep's 4, one fewer to save a fit) through real Ray Tune + Optuna on the
    tiny student: SIGINT (as Ctrl-C) after 2 trials, the same command again finishes the third (the
    first one Optuna's TPE samples) without redoing any, with the sampler's state restored; then
    the report, and best_config.yaml through `cwt-ray run`."""
    import pickle

    from cwt_ray.cli import main
    from cwt_ray.pipeline import run_stages

    args = ["sweep", str(SMOKE_SWEEP), f"storage_path={tmp_path}", "num_samples=3"]
    assert main(args + ["debug.stop_after_trials=2"]) == 130
    first = capsys.readouterr().out
    first_ids = [line.split()[3] for line in first.splitlines() if line.startswith("[sweep] trial ")]
    assert len(first_ids) == 2 and "interrupted after 2/3 trials" in first

    assert main(args) == 0
    second = capsys.readouterr().out
    second_ids = [line.split()[3] for line in second.splitlines() if line.startswith("[sweep] trial ")]
    assert "resuming" in second and len(second_ids) == 1 and not set(second_ids) & set(first_ids)
    for out in (first, second):   # one line per trial, no Tune status table
        assert "Trial name" not in out and "│" not in out and "╭" not in out

    sweep_dir = tmp_path / "sweep_smoke"
    rows = json.loads((sweep_dir / "trials.json").read_text())
    assert sorted(r["trial_id"] for r in rows) == sorted(first_ids + second_ids)
    assert all(r["status"] == "done" and r["metrics"]["n"] == 4 for r in rows)   # 4 validation questions
    for trial_id in first_ids:   # trained once: the resumed run did not redo it
        assert (sweep_dir / "trials" / trial_id / "console.log").read_text().count("[train cwt] done") == 1
    assert all("data" in r["metrics"]["reused"] for r in rows[1:])   # shared splits, not regenerated
    assert all(r["metrics"]["run_dir"] == f"trials/{r['trial_id']}" for r in rows)   # relative to the sweep dir
    assert not Path(json.loads((sweep_dir / "sweep.json").read_text())["sweep_file"]).is_absolute()
    # ray#30861: the restored searcher is our OptunaSearch, and its study holds all 3 trials.
    state_file = max((sweep_dir / "tune").glob("searcher-state-*.pkl"))   # named by session start time
    study = pickle.loads(state_file.read_bytes())["_ot_study"]
    assert sum(t.state.name == "COMPLETE" for t in study.trials) == 3

    report = (sweep_dir / "report.md").read_text()
    for section in ("evaluated once on the test split", "Accuracy vs tokens generated", "Optimisation history",
                    "Parameter importances", "All trials", "What a trial costs"):
        assert section in report
    page = (sweep_dir / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 2 and "src='http" not in page
    assert (sweep_dir / "optuna.db").stat().st_size > 0
    test_evals = list((sweep_dir / "test").glob("*/evals/cwt/metrics.json"))
    assert test_evals and all(json.loads(p.read_text())["split"] == "test" for p in test_evals)

    best = load_config(sweep_dir / "best_config.yaml")
    chosen = next(r for r in rows if f"Best trial {r['trial_id']}" in (sweep_dir / "best_config.yaml").read_text())
    assert best.eval.split == "test" and best.chunk.num_chunks == chosen["params"]["chunk.num_chunks"]
    assert best.train.lr == pytest.approx(chosen["params"]["train.lr"])
    # best_config.yaml is the chosen trial's config: its data, chunks and training are that trial's
    # (same fingerprints, so they are reused, not redone); `cwt-ray run` evaluates and reports.
    assert seed_stages(best, sweep_dir / "trials" / chosen["trial_id"]) == ["data", "chunk", "train/cwt"]
    assert run_stages(best).name == "report.md"
    assert "[train cwt] up to date" in capsys.readouterr().out


@pytest.mark.slow
def test_grid_sweep_over_an_eval_knob_trains_once(ray_cluster, tmp_path, capsys):
    """A grid over eval.max_new_tokens (it changes evaluation only) through real Ray Tune + Optuna:
    each grid point runs once, the first trial trains CWT, the second copies that student from the
    sweep cache instead of training again, and its own evaluation still uses its own setting."""
    from cwt_ray.cli import main

    path = _write(tmp_path, sampler="grid", num_samples=2, storage_path=str(tmp_path),
                  search_space={"eval.max_new_tokens": {"type": "categorical", "choices": [8, 16]}})
    assert main(["sweep", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.count("[sweep] trial ") == 2
    rows = sorted(json.loads((tmp_path / "sweep_smoke" / "trials.json").read_text()), key=lambda r: r["number"])
    assert sorted(r["params"]["eval.max_new_tokens"] for r in rows) == [8, 16]
    first, second = (tmp_path / "sweep_smoke" / "trials" / r["trial_id"] for r in rows)
    assert "[train cwt] done" in (first / "console.log").read_text()
    assert "[train cwt] up to date" in (second / "console.log").read_text()
    assert "Optuna's grid sampler (every combination once" in (tmp_path / "sweep_smoke" / "report.md").read_text()
    assert rows[1]["metrics"]["reused"] == "data,chunk,train/cwt" and rows[1]["metrics"]["train_step_s"] == 0
    for trial, row in ((first, rows[0]), (second, rows[1])):
        assert json.loads((trial / "evals" / "cwt" / "metrics.json").read_text())["max_new_tokens"] == \
            row["params"]["eval.max_new_tokens"]
    # The reused student is the first trial's, file for file.
    assert (second / "students" / "cwt" / "model.safetensors").read_bytes() == \
        (first / "students" / "cwt" / "model.safetensors").read_bytes()


def test_report_from_synthetic_trials_has_importances_plots_and_embedded_images(tmp_path, monkeypatch):
    """The report on its own (no Ray): 6 finished trials where train.lr decides accuracy, one failed.
    Its files name no absolute path (the sweep is stored under a relative storage_path here)."""
    from cwt_ray.sweep_report import _param, param_importances, write_sweep_report

    monkeypatch.chdir(tmp_path)
    sweep = load_sweep(SMOKE_SWEEP, ["storage_path=runs"])
    sweep.dir.mkdir(parents=True)
    rows = []
    for n, (k, lr) in enumerate([(2, 1e-4), (3, 3e-4), (2, 1e-3), (3, 2e-3), (3, 3e-3), (2, 5e-4)], start=1):
        metrics = {"accuracy": lr * 100, "tokens_generated": 10.0 + k, "n": 4, "loss": 1.0, "trial_wall_s": 30.0,
                   "fixed_s": 20.0, "reused": "data", "prepare_s": 1.0, "train_wall_s": 10.0, "train_step_s": 5.0,
                   "eval_wall_s": 5.0, "generate_s": 2.0}
        rows.append({"number": n, "trial_id": f"t{n}", "status": "done", "error": "",
                     "params": {"chunk.num_chunks": k, "train.lr": lr, "train.lr_schedule": "constant"},
                     "metrics": metrics})
    rows.append({"number": 7, "trial_id": "t7", "status": "error", "error": "ValueError: boom", "params": {},
                 "metrics": {}})
    importances, note = param_importances(sweep, rows)
    assert not note and max(importances["accuracy"], key=importances["accuracy"].get) == "train.lr"
    chosen = choose(rows, sweep.config)
    assert [r["trial_id"] for r in chosen] == ["t5", "t3"]   # most accurate; then fewer tokens for less accuracy
    (sweep.dir / "best_config.yaml").write_text("name: x\n")
    path = write_sweep_report(sweep, rows, chosen, {"t5": {"accuracy": 0.5, "tokens_generated": 12.0, "n": 8}}, 60.0)
    text = path.read_text()
    assert "| 7 | `t7` | error: ValueError: boom |" in text and "importances.png" in text
    assert "Optuna TPE (2 random start-up trials, seed 0)" in text   # the sampler the sweep used, named
    assert [_param(v) for v in (None, 0.5, 3, "nll")] == ["null", "0.5", "3", "nll"]   # null was chosen, not missing
    page = (sweep.dir / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3 and "<td>error: ValueError: boom</td>" in page
    assert "`cwt-ray run runs/sweep_smoke/best_config.yaml`" in text and "`trials/<trial>/`" in text
    for name in ("report.md", "report.html", "trials.json"):
        assert str(tmp_path) not in (sweep.dir / name).read_text(), name
    assert param_importances(sweep, rows[:1])[1] == "needs at least 2 finished trials, this sweep has 1"


def test_changed_sweep_file_is_not_resumed_into_an_old_sweep(tmp_path):
    from cwt_ray.sweep import run_sweep

    old = load_sweep(SMOKE_SWEEP, [f"storage_path={tmp_path}"])
    old.dir.mkdir(parents=True)
    (old.dir / "sweep.json").write_text(json.dumps({"fingerprint": "something-else"}))
    with pytest.raises(UserError, match="different sweep file or base config; re-run with --overwrite"):
        run_sweep(old)


def test_held_out_loss_is_an_objective():
    cfg = SweepConfig.model_validate({"name": "s", "base": "smoke.yaml", "objectives": [{"metric": "val_loss", "mode": "min"}],
                                      "search_space": {"train.lr": {"type": "float", "low": 1e-4, "high": 1e-3}}})
    assert cfg.objectives[0].metric == "val_loss"
