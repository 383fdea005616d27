"""The sweep file: its typed config, the search space's grid, and `load_sweep`, which checks it all
before Ray starts. No Ray here: the runner (`sweep.py`) and the report (`sweep_report.py`) both
build on this module, which builds only on the experiment config (`config.py`).
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from .config import (_OUTPUT_ONLY, FINGERPRINT_VERSION, ExperimentConfig, UserError, _format_error, _set_dotted,
                     _Strict, parse_overrides, validate_config)

# Metrics eval.py writes for a method that an objective may name (latency_s: batch-1 latency,
# measured only when eval.latency_questions > 0).
EVAL_METRICS = ("accuracy", "tokens_generated", "complete", "correct_format", "contains_answer", "latency_s",
                "skipped_per_answer")
# The held-out loss at the end of training (train_metrics.json final_val_loss), on the same split.
OBJECTIVE_METRICS = EVAL_METRICS + ("val_loss",)
# Sections a trial must not change: they say where and how the sweep itself runs.
NOT_SEARCHABLE = ("name", "storage_path", "methods", "ray", "debug")


class Param(_Strict):
    """One searched key: `categorical` (choices), `int` or `float` (low..high, inclusive)."""
    type: Literal["categorical", "int", "float"] = Field(
        ..., description="'categorical': one of `choices`; 'int' / 'float': a number from low to high (inclusive).")
    choices: Optional[list[Any]] = Field(None, description="categorical: the values to try.")
    low: Optional[Union[int, float]] = Field(None, description="int/float: smallest value tried (inclusive).")
    high: Optional[Union[int, float]] = Field(None, description="int/float: largest value tried (inclusive).")
    log: bool = Field(False, description="int/float: sample on a log scale (low must be > 0).")
    step: Optional[Union[int, float]] = Field(None, description="int/float: grid step (not with log).")
    when: dict[str, Any] = Field(default_factory=dict, description="Search this key only when each named "
                                 "(earlier, categorical) key took the given value, e.g. {chunk.heuristic: sbc}.")

    @model_validator(mode="after")
    def _consistent(self) -> "Param":
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("categorical needs a non-empty 'choices' list")
            if self.low is not None or self.high is not None:
                raise ValueError("categorical takes 'choices', not low/high")
            return self
        if self.choices is not None:
            raise ValueError(f"{self.type} takes low/high, not 'choices'")
        if self.low is None or self.high is None:
            raise ValueError(f"{self.type} needs 'low' and 'high'")
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) > high ({self.high})")
        if self.type == "int" and not all(isinstance(v, int) for v in (self.low, self.high, self.step or 1)):
            raise ValueError("int needs integer low, high and step")
        if self.log and (self.low <= 0 or self.step is not None):
            raise ValueError("log needs low > 0 and no step")
        return self


class Objective(_Strict):
    metric: Literal[OBJECTIVE_METRICS] = Field(
        ..., description="Validation metric of the swept method: an evaluation metric, or 'val_loss' (the "
                         "held-out loss at the end of training: less noisy than accuracy on a small split).")
    mode: Literal["max", "min"] = Field(..., description="'max': higher is better (accuracy); 'min': lower is "
                                                         "better (tokens_generated, val_loss, latency_s).")


class SweepDebug(_Strict):
    """Fault injection for the resume test; never part of the sweep's fingerprint."""
    stop_after_trials: Optional[int] = Field(
        None, ge=1, description="Send this process SIGINT (as Ctrl-C does) after this many trials finished in it.")


class SweepConfig(_Strict):
    name: str = Field(..., min_length=1, pattern=r"^[A-Za-z0-9_.-]+$",
                      description="Required. The sweep's name (letters, digits, '_', '.', '-'): its directory is "
                                  "<storage_path>/<name>/, so the same name continues that sweep.")
    base: str = Field(..., description="Experiment YAML the trials start from, relative to the sweep file.")
    storage_path: Optional[str] = Field(None, description="Where runs/<name>/ goes; default: the base config's.")
    method: Literal["std_cot", "cwt", "stt"] = Field(
        "cwt", description="The method each trial trains and is scored on ('stt' trains cwt first, as it continues from it).")
    overrides: dict[str, Any] = Field(default_factory=dict, description="Nested config values applied to the base "
                                      "for every trial (and for best_config.yaml).")
    search_space: dict[str, Param] = Field(..., min_length=1, description="Dotted config key -> distribution.")
    objectives: list[Objective] = Field(
        default_factory=lambda: [Objective(metric="accuracy", mode="max")], min_length=1, max_length=2,
        description="One objective, or two (e.g. accuracy max + tokens_generated min: Pareto front).")
    num_samples: int = Field(8, ge=1, description="Trials in the sweep (with sampler 'grid': at most the grid's size).")
    sampler: Literal["tpe", "grid"] = Field(
        "tpe", description="'tpe': Optuna's TPE (random for the first n_startup_trials). 'grid': every combination "
                           "of the search space once, in an order shuffled by seed (categorical choices, int and "
                           "float ranges with a step; no 'when'): the tool for a small comparison such as three "
                           "chunking heuristics.")
    max_concurrent_trials: Optional[int] = Field(
        None, ge=1, description="None: as many as fit the cluster, at most n_startup_trials, so TPE sees results "
                                "before it suggests (more parallel trials = closer to random search).")
    n_startup_trials: int = Field(4, ge=0, description="Random trials before TPE models the results (Optuna's "
                                                        "default of 10 is more than a small sweep runs).")
    scheduler: Literal["none", "asha"] = Field(
        "none", description="'asha': stop trials whose training loss is poor at epoch ends (single objective only).")
    asha_grace_period: int = Field(1, ge=1, description="ASHA: reports (epoch ends) before a trial may be stopped.")
    trial_cpus: float = Field(0.1, gt=0, description="CPU reserved by each trial's driver, which only waits on its "
                                                     "TorchTrainer and Ray Data actors (those reserve their own).")
    seed: int = Field(0, description="Seed of Optuna's sampler.")
    optuna_db: bool = Field(True, description="Also write the finished trials to runs/<name>/optuna.db "
                                              "(SQLite) for optuna-dashboard.")
    debug: SweepDebug = Field(default_factory=SweepDebug, description="Fault injection for the resume test; "
                                                                      "leave unset.")

    @field_validator("search_space")
    @classmethod
    def _when_refers_to_earlier_choices(cls, space: dict[str, Param]) -> dict[str, Param]:
        seen: dict[str, Param] = {}
        for key, param in space.items():
            for other, value in param.when.items():
                parent = seen.get(other)
                if parent is None:
                    raise ValueError(f"'{key}': when refers to '{other}', which is not a search_space key listed before it")
                if parent.type != "categorical" or value not in parent.choices:
                    raise ValueError(f"'{key}': when {other}={value!r} is not one of that key's choices")
            seen[key] = param
        return space

    @model_validator(mode="after")
    def _scheduler_fits_objectives(self) -> "SweepConfig":
        if self.scheduler == "asha" and len(self.objectives) > 1:
            raise ValueError("scheduler 'asha' needs a single objective")
        if len({o.metric for o in self.objectives}) != len(self.objectives):
            raise ValueError("objectives must name different metrics")
        if self.sampler == "grid":
            size = len(grid_points(self.search_space))   # raises for keys a grid cannot enumerate
            if self.num_samples > size:
                raise ValueError(f"num_samples {self.num_samples} is more than the grid's {size} points; "
                                 f"set num_samples: {size}")
        return self

    @property
    def objective_pairs(self) -> list[tuple[str, str]]:
        """[(metric, mode), ...] in the sweep file's order."""
        return [(o.metric, o.mode) for o in self.objectives]


def grid_values(key: str, param: Param) -> list:
    """The values a grid tries for one key: every choice, or low..high (inclusive) in steps."""
    if param.when:
        raise ValueError(f"sampler 'grid': '{key}' has 'when'; a grid has no conditional keys")
    if param.type == "categorical":
        return list(param.choices)
    if param.log:
        raise ValueError(f"sampler 'grid': '{key}' is log-scaled; give a step or categorical choices")
    if param.type == "int":
        return list(range(param.low, param.high + 1, param.step or 1))
    if not param.step:
        raise ValueError(f"sampler 'grid': float '{key}' needs a step")
    n = int(math.floor((param.high - param.low) / param.step + 1e-9)) + 1
    # Rounded so that 0.1 + 2 * 0.1 is written (and hashed into run fingerprints) as 0.3.
    return [round(param.low + i * param.step, 12) for i in range(n)]


def grid_points(space: dict[str, Param]) -> list[dict]:
    """Every combination of a grid search space (the sweep runs them in an order shuffled by its seed)."""
    values = {key: grid_values(key, space[key]) for key in sorted(space)}
    return [dict(zip(values, combo)) for combo in itertools.product(*values.values())]


def sample_values(param: Param) -> list:
    """Values that stand for a distribution when the search space is checked: every choice, both ends."""
    if param.type == "categorical":
        return list(param.choices)
    return [param.low, param.high]


class Sweep:
    """A validated sweep: its file, its config, and the experiment tree every trial starts from."""

    def __init__(self, path: Path, config: SweepConfig, base_tree: dict, base: ExperimentConfig):
        self.path, self.config, self.base_tree, self.base = path, config, base_tree, base
        self.storage = Path(config.storage_path or base.storage_path).expanduser().resolve()
        self.dir = self.storage / config.name

    @property
    def storage_setting(self) -> str:
        """storage_path as the sweep file (or its base) wrote it, not resolved: `./runs` by default,
        relative to the directory the sweep is started from, as every experiment config's paths are."""
        return self.config.storage_path or self.base.storage_path

    @property
    def folder(self) -> str:
        """The sweep directory as configured (`runs/<name>`): how the published files name it."""
        return str(Path(self.storage_setting) / self.config.name)

    def experiment_tree(self, params: dict) -> dict:
        """Base + overrides + this trial's values: the config `cwt-ray run` gets (best_config.yaml)."""
        tree = json.loads(json.dumps(self.base_tree))
        for key, value in params.items():
            _set_dotted(tree, key, value)
        tree["name"] = f"{self.config.name}-best"
        tree["storage_path"] = self.storage_setting
        tree.setdefault("eval", {})["split"] = "test"
        return tree

    def trial_config(self, params: dict, trial_id: str, split: str = "validation",
                     folder: str = "trials") -> ExperimentConfig:
        tree = self.experiment_tree(params)
        methods = ["cwt", "stt"] if self.config.method == "stt" else [self.config.method]
        tree.update(name=trial_id, storage_path=str(self.dir / folder), methods=methods)
        tree.setdefault("eval", {})["split"] = split
        return validate_config(tree, source=f"trial {trial_id}")

    def fingerprint(self) -> str:
        """Every effective value of the sweep and of its base experiment, defaults included: a
        default changed in code must not resume a sweep (or reuse its cache) made under the old one."""
        config = self.config.model_dump(mode="json", exclude={"debug"})
        base = self.base.model_dump(mode="json", exclude={"debug"})
        for section, key in _OUTPUT_ONLY:   # what a run writes about itself, not what it computes
            base.get(section, {}).pop(key, None)
        blob = json.dumps({"version": FINGERPRINT_VERSION, "sweep": config, "base": base}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Reading and checking a sweep file
# ---------------------------------------------------------------------------------------------

def _deep_merge(tree: dict, extra: dict) -> dict:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(tree.get(key), dict):
            _deep_merge(tree[key], value)
        else:
            tree[key] = value
    return tree


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"file not found: {path}")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        raise UserError(f"{path} is not valid YAML") from None
    if not isinstance(tree, dict):
        raise UserError(f"{path}: top level must be a mapping")
    return tree


def _check_validation_split(path: Path, base: ExperimentConfig) -> None:
    """Trials are scored on the validation split: the base experiment must have one."""
    if base.data.source == "gsm_symbolic" and base.data.validation_size < 1:
        raise UserError(f"{path}: trials are scored on the validation split; set data.validation_size >= 1")
    if base.data.source == "files" and not (base.data.validation_path or
                                             (base.data.paths and base.data.split_fractions.get("validation"))):
        raise UserError(f"{path}: trials are scored on the validation split; set data.validation_path "
                        f"(or a validation share in data.split_fractions with data.paths)")


def _check_search_space(path: Path, config: SweepConfig, base_tree: dict) -> None:
    """Every key must be a real config key, and every value the distribution can produce a valid one:
    build the config with each choice / each end of each range (the other keys at base values)."""
    for key, param in config.search_space.items():
        if key.split(".")[0] in NOT_SEARCHABLE:
            raise UserError(f"{path}: search_space '{key}': {key.split('.')[0]} is not searchable")
        for value in sample_values(param):
            trial_tree = json.loads(json.dumps(base_tree))
            try:
                _set_dotted(trial_tree, key, value)
                validate_config(trial_tree, source="")
            except UserError as e:
                raise UserError(f"{path}: search_space '{key}' = {value!r}: {str(e).lstrip(': ')}") from None


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> Sweep:
    """Read and check a sweep file; every mistake is one UserError line, before Ray starts."""
    path = Path(path)
    tree = _read_yaml(path)
    for key, value in parse_overrides(overrides or []):
        _set_dotted(tree, key, value)
    try:
        config = SweepConfig.model_validate(tree)
    except ValidationError as e:
        raise UserError(_format_error(e, str(path))) from None
    base_path = (path.parent / config.base).resolve()
    if not base_path.is_file():
        raise UserError(f"{path}: base config not found: {base_path}")
    base_tree = _deep_merge(_read_yaml(base_path), json.loads(json.dumps(config.overrides)))
    base = validate_config(base_tree, source=f"{path} (base {config.base} + overrides)")
    _check_validation_split(path, base)
    _check_search_space(path, config, base_tree)
    return Sweep(path, config, base_tree, base)
