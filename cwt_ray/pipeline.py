"""The whole distillation pipeline over one run directory: data -> chunk -> train -> eval -> report.

Each finished stage records a fingerprint of the config sections it depends on in
`<run>/stages.json`. Re-running the same run name skips stages whose fingerprint still matches and
redoes the rest; `overwrite=True` starts the run directory over.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from pathlib import Path

from .config import ExperimentConfig, UserError

# Set for the driver and every Ray worker: nothing is fetched from a hub at run time, and library
# progress bars stay out of our one-line-per-step console output.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
               "TRANSFORMERS_VERBOSITY": "error"}
STAGES = ("data", "chunk", "train", "eval", "report")

# Config sections each stage's output depends on.
_DEPS = {
    "data": ("task", "data", "student.name", "student.max_length"),
    "chunk": ("task", "data", "student", "chunk"),
    "train/std_cot": ("task", "prompt", "data", "student", "train"),
    "train/cwt": ("task", "prompt", "data", "student", "chunk", "stages", "train"),
}
# Skip data depends on how removals are judged and written; STT training adds its own knobs; the
# inference threshold only changes evaluation, so sweeping it never retrains.
_DEPS["skip"] = _DEPS["train/cwt"] + tuple(f"stt.{k}" for k in (
    "gate", "threshold", "removal", "skippable", "max_skips", "require_correct", "style", "skip_text"))
_DEPS["train/stt"] = _DEPS["skip"] + ("stt.chunk_mix", "stt.epochs", "stt.lr")
for _m in ("std_cot", "cwt", "stt"):
    _DEPS[f"eval/{_m}"] = _DEPS[f"train/{_m}"] + ("eval",)
_DEPS["eval/stt"] += ("stt.skip_confidence",)


class RunState:
    """`stages.json`: which stage outputs are finished, and for which config fingerprint."""

    def __init__(self, run_dir: Path, cfg: ExperimentConfig):
        self.path = run_dir / "stages.json"
        self.cfg = cfg
        self.done = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def fingerprint(self, key: str) -> str:
        deps = _DEPS[key]
        if key == "chunk" and self.cfg.chunk.heuristic == "sbc":
            deps += ("prompt", "stages")   # the search scores chunks in the training format
        return self.cfg.fingerprint(*deps)

    def is_done(self, key: str) -> bool:
        return self.done.get(key) == self.fingerprint(key)

    def mark(self, key: str) -> None:
        self.done[key] = self.fingerprint(key)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.done, indent=2))
        tmp.replace(self.path)

    def require(self, key: str, how: str) -> None:
        if not self.is_done(key):
            state = "was made with a different config" if key in self.done else "is missing"
            raise UserError(f"{key} in {self.path.parent} {state}: run `{how}` first")


@contextlib.contextmanager
def ray_session(cfg: ExperimentConfig):
    """Connect to the cluster we are submitted to, or start an embedded one (and stop it after)."""
    import ray

    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    if ray.is_initialized():
        yield
        return
    # None means: the cluster a job was submitted to (Ray sets RAY_ADDRESS), else a new embedded
    # one. Never "the last cluster `ray start` left on this machine", which ray.init(None) would join.
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS") or "local"
    runtime_env = job_runtime_env(cfg, address)
    ray.init(address=address, num_cpus=cfg.ray.num_cpus if address == "local" else None,
             include_dashboard=cfg.ray.include_dashboard, dashboard_host="127.0.0.1",
             runtime_env=runtime_env, logging_level="WARNING")
    quiet_ray_data()
    try:
        yield
    finally:
        ray.shutdown()


def job_runtime_env(cfg: ExperimentConfig, address: str) -> dict:
    """The runtime env of every worker of our job (the Ray Train controller included)."""
    env_vars = dict(OFFLINE_ENV)
    if "CWT_RAY_CACHE" in os.environ:
        env_vars["CWT_RAY_CACHE"] = os.environ["CWT_RAY_CACHE"]
    runtime_env = {"env_vars": env_vars}
    if address == "local":
        # Ray Train's preemption watcher is an actor that polls whether the autoscaler drains a
        # node; an embedded cluster is this one machine and is never drained. Without it, each fit
        # has one idle Ray process fewer (each costs 1-2 % of a core: benchmarks/ray_overhead.py)
        # and no "constructor arguments in the object store" error line on the console.
        env_vars[RAY_TRAIN_PREEMPTION_WATCHER] = "0"
        if not cfg.ray.include_dashboard:
            runtime_env["worker_process_setup_hook"] = QUIET_WITHOUT_STATE_API
    return runtime_env


def actor_gpus(setting: float | None, needs_model: bool = True) -> float:
    """GPUs per Ray Data actor: the configured share, or (None) one GPU when the cluster has GPUs
    and the actor runs a model, else none."""
    import ray

    if setting is not None:
        return setting
    return 1.0 if needs_model and ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def quiet_ray_data() -> None:
    """Our stages print one line per step of work; Ray Data's per-operator progress logs would
    bury them, so only its warnings come through."""
    import logging

    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


QUIET_WITHOUT_STATE_API = "cwt_ray.pipeline.quiet_without_state_api"
# Ray Train V2's switch (ray.train.v2._internal.constants), read by its controller.
RAY_TRAIN_PREEMPTION_WATCHER = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
# Ray's module path, which is also its logger's name.
RAY_TRAIN_PG_CLEANER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


def quiet_without_state_api() -> None:
    """Every worker's setup on an embedded cluster without the dashboard (e.g. the trimmed Ray
    wheel on the GPU machine). Ray Train's placement-group cleaner asks the state API whether the
    train controller lives, every second; without the dashboard that API is absent and it logs a
    warning each time (and can never act: the controller removes its own group when it ends, and
    an embedded cluster ends with the program)."""
    import logging

    logging.getLogger(RAY_TRAIN_PG_CLEANER).setLevel(logging.ERROR)


def student_info(cfg: ExperimentConfig, method: str) -> dict:
    """What generation needs to talk to a trained student (written beside its weights)."""
    return {"method": method, "base_student": cfg.student.name, "prompt_template": cfg.prompt.template,
            "answer_type": cfg.task.answer_type, "answer_template": cfg.task.answer_template,
            "chunk_marker": cfg.stages.chunk_marker, "answer_marker": cfg.stages.answer_marker,
            "answer_stage": cfg.stages.answer_stage, "skip_text": cfg.stt.skip_text, "skip_style": cfg.stt.style,
            "skippable": cfg.stt.skippable}


def _stage_data(cfg: ExperimentConfig, run_dir: Path, state: RunState, force: bool) -> None:
    from .data import write_splits
    from .data_check import DataStop, format_check

    if state.is_done("data") and not force:
        print("[data] up to date, skipped", flush=True)
        return
    where = run_dir / "data" / "summary.json"
    try:
        summary = write_splits(cfg, run_dir / "data")
    except DataStop as stop:   # what the data holds, then the one-line reason it stops
        print(format_check(stop.summary, str(where)), flush=True)
        raise
    print(format_check(summary, str(where)), flush=True)
    state.mark("data")


def _stage_chunk(cfg: ExperimentConfig, run_dir: Path, state: RunState, force: bool) -> None:
    import pyarrow.parquet as pq

    from .chunk import chunk_split
    from .student import resolve_student

    if state.is_done("chunk") and not force:
        print("[chunk] up to date, skipped", flush=True)
        return
    t0 = time.perf_counter()
    student = resolve_student(cfg.student)
    scorer = None
    if cfg.chunk.heuristic == "sbc":   # paths were checked in preflight
        scorer = Path(cfg.chunk.sbc_student).expanduser() if cfg.chunk.sbc_student else student
    out = run_dir / "chunks" / "train"
    s = chunk_split(run_dir / "data" / "train.parquet", out, cfg, str(student), str(scorer) if scorer else None)
    extra = ""
    if "sbc" in s:
        extra = (f"; sbc: mean chunk loss {s['sbc']['mean_loss_before']:.4f} -> {s['sbc']['mean_loss_after']:.4f}, "
                 f"{s['sbc']['moves']} moves, {s['sbc']['candidates_scored']} candidates scored")
    print(f"[chunk] {s['chunked']} rationales -> {s['chunks']} chunks ({cfg.chunk.heuristic}, K<={cfg.chunk.num_chunks}; "
          f"{s['fewer_chunks_than_k']} with fewer than K), {s['rejected']} rejected, {time.perf_counter() - t0:.1f}s{extra}"
          f"\n[chunk] view: {out / 'view.html'}", flush=True)
    # The validation rationales, chunked the same way, give CWT and STT their held-out loss.
    validation = run_dir / "data" / "validation.parquet"
    if validation.is_file() and pq.read_metadata(validation).num_rows:
        v = chunk_split(validation, run_dir / "chunks" / "validation", cfg, str(student), str(scorer) if scorer else None)
        print(f"[chunk] validation: {v['chunked']} rationales -> {v['chunks']} chunks (for the held-out loss), "
              f"{v['rejected']} rejected", flush=True)
    state.mark("chunk")


def _stage_skip(cfg: ExperimentConfig, run_dir: Path, state: RunState, force: bool) -> None:
    from .skip import skip_split

    if state.is_done("skip") and not force:
        print("[skip] up to date, skipped", flush=True)
        return
    state.require("train/cwt", "cwt-ray train CONFIG")
    t0 = time.perf_counter()
    s = skip_split(run_dir, run_dir / "skips" / "train", cfg, run_dir / "students" / "cwt")
    print(f"[skip] {s['rationales_in']} rationales ({cfg.stt.gate} gate, {cfg.stt.removal}): {s['skipped']} with a skip "
          f"({s['chunks_skipped']}/{s['skippable_chunks']} skippable chunks), {s['none_skippable']} none skippable, "
          f"{s['wrong_with_all_chunks']} wrong even with every chunk, {s['too_long'] + s['error']} not scored; "
          f"{s['skip_sequences']} skip sequences, {time.perf_counter() - t0:.1f}s", flush=True)
    state.mark("skip")


def stt_train_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """STT continues from the CWT student with its own epochs and learning rate."""
    out = cfg.model_copy(deep=True)
    out.train.epochs = cfg.stt.epochs
    if cfg.stt.lr:
        out.train.lr = cfg.stt.lr
    return out


def _stage_train(cfg: ExperimentConfig, run_dir: Path, state: RunState, force: bool, methods: list[str],
                 callbacks: list | None = None) -> None:
    from .student import resolve_student
    from .train import train_method, train_storage_root

    from .config import METHODS

    state.require("data", "cwt-ray chunk CONFIG")
    for method in sorted(methods, key=METHODS.index):   # stt continues from cwt: train that first
        key = f"train/{method}"
        if method == "stt":   # skip data first, from the CWT student trained just before
            _stage_skip(cfg, run_dir, state, force)
        if state.is_done(key) and not force:
            print(f"[train {method}] up to date, skipped", flush=True)
            continue
        if method in ("cwt", "stt"):
            state.require("chunk", "cwt-ray chunk CONFIG")
        # A forced stage redoes a finished training, but an interrupted one (same config) resumes.
        prepare_train_storage(run_dir, method, state.fingerprint(key), fresh=force and key in state.done,
                              storage_uri=train_storage_root(cfg, run_dir) if cfg.ray.storage_uri else None)
        if method == "stt":
            metrics = train_method(stt_train_config(cfg), method, run_dir, run_dir / "students" / "cwt",
                                   student_info(cfg, method), callbacks)
        else:
            metrics = train_method(cfg, method, run_dir, resolve_student(cfg.student), student_info(cfg, method), callbacks)
        print(f"[train {method}] done: {metrics['steps']} steps, loss {metrics['first_loss']:.3f} -> "
              f"{metrics['final_loss']:.3f}, {metrics['processed_tokens_per_s']:.0f} tok/s", flush=True)
        state.mark(key)


def prepare_train_storage(run_dir: Path, method: str, fingerprint: str, fresh: bool,
                          storage_uri: str | None = None) -> None:
    """Ray Train resumes a run from the latest checkpoint under (storage_path, name). Keep that
    folder when an interrupted attempt with the same config left it; clear it when the config
    changed or a fresh start was asked for, so a stale checkpoint is never resumed."""
    storage = run_dir / "ray" / f"train-{method}"
    stamp = run_dir / "ray" / f"train-{method}.fingerprint"
    if fresh or not stamp.is_file() or stamp.read_text() != fingerprint:
        shutil.rmtree(storage, ignore_errors=True)
        if storage_uri:   # checkpoints on object storage (ray.storage_uri); the stamp stays in run_dir
            remove_uri_tree(f"{storage_uri}/train-{method}")
    stamp.parent.mkdir(parents=True, exist_ok=True)
    stamp.write_text(fingerprint)


def remove_uri_tree(uri: str) -> None:
    """Delete a folder given as a URI (s3://, gs://, file://) or path, if it exists."""
    import pyarrow.fs

    fs, path = pyarrow.fs.FileSystem.from_uri(uri) if "://" in uri else (pyarrow.fs.LocalFileSystem(), uri)
    if fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound:
        fs.delete_dir(path)


def _stage_eval(cfg: ExperimentConfig, run_dir: Path, state: RunState, force: bool, methods: list[str]) -> None:
    from .eval import evaluate_method

    for method in methods:
        key = f"eval/{method}"
        if state.is_done(key) and not force:
            print(f"[eval {method}] up to date, skipped", flush=True)
            continue
        state.require(f"train/{method}", "cwt-ray train CONFIG")
        evaluate_method(cfg, method, run_dir)
        state.mark(key)


def preflight(cfg: ExperimentConfig, stages: tuple[str, ...], force: tuple[str, ...] = ()) -> None:
    """Check the paths a user named before any cluster starts, so a typo costs one line, not a
    Ray start-up and a traceback. What a finished stage needed is not asked for again: a run
    directory chunked elsewhere trains on a machine without the embedding model or the data files."""
    from .chunk import resolve_embedding_model

    done = RunState(cfg.run_dir, cfg)
    stages = tuple(s for s in stages if not (s in ("data", "chunk") and s not in force and done.is_done(s)))
    if "data" in stages and cfg.data.source == "files":
        from .readers import expand_paths

        for key in ("paths", "train_path", "validation_path", "test_path"):
            try:
                expand_paths(getattr(cfg.data, key), cfg.data.format)
            except UserError as e:
                raise UserError(f"data.{key}: {e}") from None
    if "chunk" in stages and "cwt" in cfg.methods:
        ccfg = cfg.chunk
        if ccfg.heuristic == "semantic" or (ccfg.heuristic == "sbc" and ccfg.sbc_init == "semantic"):
            resolve_embedding_model(ccfg.embedding_model)
        if ccfg.heuristic == "sbc" and ccfg.sbc_student and not (Path(ccfg.sbc_student).expanduser() / "config.json").is_file():
            raise UserError(f"chunk.sbc_student: {ccfg.sbc_student!r} is not a student folder (no config.json)")
    from .student import BUILTIN, resolve_student

    if cfg.student.name not in BUILTIN:   # a path: checking it is cheap; built-ins are made later
        resolve_student(cfg.student)


def prepare_run_dir(cfg: ExperimentConfig, overwrite: bool) -> Path:
    run_dir = cfg.run_dir
    if overwrite and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    return run_dir


def run_stages(cfg: ExperimentConfig, stages: tuple[str, ...] = STAGES, force: tuple[str, ...] = (),
               overwrite: bool = False, train_callbacks: list | None = None,
               eval_methods: list[str] | None = None) -> Path:
    """Run the named stages in order (skipping finished ones unless forced); returns the report path
    when the report stage ran, else the run directory. `train_callbacks` go to Ray Train (sweeps);
    `eval_methods` (default: every method of the run) lets a sweep evaluate only the method it
    scores: an STT trial trains CWT first but has no use for CWT's validation numbers."""
    from .report import write_report

    unknown = set(stages) - set(STAGES)
    if unknown:
        raise UserError(f"unknown stage(s) {sorted(unknown)}; stages are {', '.join(STAGES)}")
    preflight(cfg, stages, force)
    run_dir = prepare_run_dir(cfg, overwrite)
    state = RunState(run_dir, cfg)
    data_on_ray = "data" in stages and cfg.data.source == "files"
    needs_ray = any(s in stages for s in ("chunk", "train", "eval")) or data_on_ray
    t0 = time.perf_counter()
    # A generated source is made in this process, before Ray starts: in a submitted job the
    # driver's working directory (the unpacked --working-dir) was seen gone after ray.init
    # (os.getcwd() failing in the data stage's tokenizer import, tests/test_cluster.py); the cause
    # inside Ray's runtime-env handling is not pinned down. Data read from files needs Ray.
    if "data" in stages and not data_on_ray:
        _stage_data(cfg, run_dir, state, "data" in force)
    with ray_session(cfg) if needs_ray else contextlib.nullcontext():
        if data_on_ray:
            _stage_data(cfg, run_dir, state, "data" in force)
        if "chunk" in stages and "cwt" in cfg.methods:   # stt needs cwt (config check)
            _stage_chunk(cfg, run_dir, state, "chunk" in force)
        if "train" in stages:
            _stage_train(cfg, run_dir, state, "train" in force, cfg.methods, train_callbacks)
        if "eval" in stages:
            _stage_eval(cfg, run_dir, state, "eval" in force, eval_methods or cfg.methods)
    if "report" in stages:
        path = write_report(cfg, run_dir)
        print(f"[report] {path} ({time.perf_counter() - t0:.0f}s)", flush=True)
        return path
    return run_dir
