"""The whole distillation pipeline over one run directory, stage by stage:
data -> chunk -> train (Std-CoT, CWT) -> skip -> train (STT) -> eval -> report.

Each stage is a function of (config, run directory) that writes its folder (docs/run-directory.md).
Each finished stage output records a fingerprint of the config sections it depends on in
`<run>/stages.json`. Re-running the same run name skips outputs whose fingerprint still matches and
redoes the rest; `overwrite=True` starts the run directory over. The runner sits above every
stage: stages never import it.
"""
from __future__ import annotations

import contextlib
import json
import shutil
import time
from pathlib import Path

from .cluster import ray_session
from .config import METHODS, ExperimentConfig, UserError
from .console import get_logger
from .rundir import SUMMARY, chunks_dir, data_dir, skips_dir, split_file, student_dir, write_json

STAGES = ("data", "chunk", "train", "skip", "eval", "report")
log = get_logger("pipeline")

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
# The report only reads what the stages wrote; it is rewritten each time it is asked for, and
# records the whole config that made it.
_DEPS["report"] = ("task", "prompt", "data", "student", "chunk", "stages", "stt", "train", "eval", "methods")


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
        write_json(self.path, self.done)

    def require(self, key: str, how: str) -> None:
        if not self.is_done(key):
            state = "was made with a different config" if key in self.done else "is missing"
            raise UserError(f"{key} in {self.path.parent} {state}: run `{how}` first")


def student_info(cfg: ExperimentConfig, method: str) -> dict:
    """What generation needs to talk to a trained student (written beside its weights)."""
    return {"method": method, "base_student": cfg.student.name, "prompt_template": cfg.prompt.template,
            "answer_type": cfg.task.answer_type, "answer_template": cfg.task.answer_template,
            "chunk_marker": cfg.stages.chunk_marker, "answer_marker": cfg.stages.answer_marker,
            "answer_stage": cfg.stages.answer_stage, "skip_text": cfg.stt.skip_text, "skip_style": cfg.stt.style,
            "skippable": cfg.stt.skippable}


def stt_train_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """STT continues from the CWT student with its own epochs and learning rate."""
    out = cfg.model_copy(deep=True)
    out.train.epochs = cfg.stt.epochs
    if cfg.stt.lr:
        out.train.lr = cfg.stt.lr
    return out


# --- the stages: each writes its output for one config; the runner decides whether to run it ---

def stage_data(cfg: ExperimentConfig, run_dir: Path, state: RunState) -> None:
    from .data import write_splits
    from .data_check import DataStop, format_check

    where = data_dir(run_dir) / SUMMARY
    try:
        summary = write_splits(cfg, data_dir(run_dir))
    except DataStop as stop:   # what the data holds, then the one-line reason it stops
        log.info(format_check(stop.summary, str(where)))
        raise
    log.info(format_check(summary, str(where)))


def stage_chunk(cfg: ExperimentConfig, run_dir: Path, state: RunState) -> None:
    import pyarrow.parquet as pq

    from .chunk import chunk_split
    from .student import resolve_student

    state.require("data", "cwt-ray data CONFIG")
    t0 = time.perf_counter()
    student = resolve_student(cfg.student)
    scorer = None
    if cfg.chunk.heuristic == "sbc":   # paths were checked in preflight
        scorer = str(Path(cfg.chunk.sbc_student).expanduser() if cfg.chunk.sbc_student else student)
    s = chunk_split(split_file(run_dir, "train"), chunks_dir(run_dir, "train"), cfg, str(student), scorer)
    extra = ""
    if "sbc" in s:
        extra = (f"; sbc: mean chunk loss {s['sbc']['mean_loss_before']:.4f} -> {s['sbc']['mean_loss_after']:.4f}, "
                 f"{s['sbc']['moves']} moves, {s['sbc']['candidates_scored']} candidates scored")
    log.info(f"[chunk] {s['chunked']} rationales -> {s['chunks']} chunks ({cfg.chunk.heuristic}, K<={cfg.chunk.num_chunks}; "
             f"{s['fewer_chunks_than_k']} with fewer than K), {s['rejected']} rejected, {time.perf_counter() - t0:.1f}s"
             f"{extra}\n[chunk] view: {chunks_dir(run_dir, 'train') / 'view.html'}")
    # The validation rationales, chunked the same way, give CWT and STT their held-out loss.
    validation = split_file(run_dir, "validation")
    if validation.is_file() and pq.read_metadata(validation).num_rows:
        v = chunk_split(validation, chunks_dir(run_dir, "validation"), cfg, str(student), scorer)
        log.info(f"[chunk] validation: {v['chunked']} rationales -> {v['chunks']} chunks (for the held-out loss), "
                 f"{v['rejected']} rejected")


def stage_skip(cfg: ExperimentConfig, run_dir: Path, state: RunState) -> None:
    from .skip import skip_split

    state.require("train/cwt", "cwt-ray train CONFIG methods=[cwt]")
    t0 = time.perf_counter()
    s = skip_split(run_dir, skips_dir(run_dir), cfg, student_dir(run_dir, "cwt"))
    log.info(f"[skip] {s['rationales_in']} rationales ({cfg.stt.gate} gate, {cfg.stt.removal}): {s['skipped']} with a "
             f"skip ({s['chunks_skipped']}/{s['skippable_chunks']} skippable chunks), {s['none_skippable']} none "
             f"skippable, {s['wrong_with_all_chunks']} wrong even with every chunk, {s['too_long'] + s['error']} not "
             f"scored; {s['skip_sequences']} skip sequences, {time.perf_counter() - t0:.1f}s")


def stage_train(cfg: ExperimentConfig, run_dir: Path, state: RunState, method: str, force: bool = False,
                callbacks: list | None = None) -> None:
    from .student import resolve_student
    from .train import train_method, train_storage_root

    state.require("data", "cwt-ray data CONFIG")
    if method in ("cwt", "stt"):
        state.require("chunk", "cwt-ray chunk CONFIG")
    if method == "stt":
        state.require("skip", "cwt-ray skip CONFIG")
    key = f"train/{method}"
    # A forced stage redoes a finished training, but an interrupted one (same config) resumes.
    prepare_train_storage(run_dir, method, state.fingerprint(key), fresh=force and key in state.done,
                          storage_uri=train_storage_root(cfg, run_dir) if cfg.ray.storage_uri else None)
    if method == "stt":
        metrics = train_method(stt_train_config(cfg), method, run_dir, student_dir(run_dir, "cwt"),
                               student_info(cfg, method), callbacks)
    else:
        metrics = train_method(cfg, method, run_dir, resolve_student(cfg.student), student_info(cfg, method), callbacks)
    log.info(f"[train {method}] done: {metrics['steps']} steps, loss {metrics['first_loss']:.3f} -> "
             f"{metrics['final_loss']:.3f}, {metrics['processed_tokens_per_s']:.0f} tok/s")


def stage_eval(cfg: ExperimentConfig, run_dir: Path, state: RunState, method: str) -> None:
    from .eval import evaluate_method

    state.require(f"train/{method}", "cwt-ray train CONFIG")
    evaluate_method(cfg, method, run_dir)


def stage_report(cfg: ExperimentConfig, run_dir: Path, state: RunState) -> None:
    from .report import write_report

    write_report(cfg, run_dir)


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


# --- the runner ---------------------------------------------------------------------------------

def plan(cfg: ExperimentConfig, stages: tuple[str, ...], eval_methods: list[str] | None = None) -> list[tuple[str, str | None]]:
    """The (stage, method) steps that `stages` ask for, in the order their inputs need. Training
    STT brings the skip stage along: its skip data come from the CWT student trained just before."""
    steps: list[tuple[str, str | None]] = [("data", None)] if "data" in stages else []
    if "chunk" in stages and "cwt" in cfg.methods:   # stt needs cwt (config check)
        steps.append(("chunk", None))
    methods = sorted(cfg.methods, key=METHODS.index)   # stt continues from cwt: train that first
    for method in methods:
        if method == "stt" and ("skip" in stages or "train" in stages):
            steps.append(("skip", None))
        if "train" in stages:
            steps.append(("train", method))
    if stages == ("skip",) and "stt" not in cfg.methods:   # `cwt-ray skip` alone: skip data of the CWT student
        steps.append(("skip", None))
    if "eval" in stages:
        steps += [("eval", m) for m in (eval_methods or cfg.methods)]
    if "report" in stages:
        steps.append(("report", None))
    return steps


def run_step(cfg: ExperimentConfig, run_dir: Path, state: RunState, stage: str, method: str | None, force: bool,
             train_callbacks: list | None = None) -> None:
    """One step: skipped when its output is up to date, unless forced."""
    key = f"{stage}/{method}" if method else stage
    label = f"{stage} {method}" if method else stage
    if state.is_done(key) and not force:
        log.info(f"[{label}] up to date, skipped")
        return
    if stage == "train":
        stage_train(cfg, run_dir, state, method, force, train_callbacks)
    elif stage == "eval":
        stage_eval(cfg, run_dir, state, method)
    else:
        {"data": stage_data, "chunk": stage_chunk, "skip": stage_skip, "report": stage_report}[stage](cfg, run_dir, state)
    state.mark(key)


def preflight(cfg: ExperimentConfig, stages: tuple[str, ...], force: tuple[str, ...] = ()) -> None:
    """Check the paths a user named before any cluster starts, so a typo costs one line, not a
    Ray start-up and a traceback. What a finished stage needed is not asked for again: a run
    directory chunked elsewhere trains on a machine without the embedding model or the data files."""
    from .chunking import resolve_embedding_model
    from .readers import expand_paths
    from .student import BUILTIN, resolve_student

    done = RunState(cfg.run_dir, cfg)
    stages = tuple(s for s in stages if not (s in ("data", "chunk") and s not in force and done.is_done(s)))
    if "data" in stages and cfg.data.source == "files":
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
    """Run the named stages in order (skipping finished outputs unless forced); returns the report
    path when the report stage ran, else the run directory. `train_callbacks` go to Ray Train
    (sweeps); `eval_methods` (default: every method of the run) lets a sweep evaluate only the
    method it scores: an STT trial trains CWT first but has no use for CWT's validation numbers."""
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise UserError(f"unknown stage(s) {sorted(unknown)}; stages are {', '.join(STAGES)}")
    preflight(cfg, stages, force)
    run_dir = prepare_run_dir(cfg, overwrite)
    state = RunState(run_dir, cfg)
    steps = plan(cfg, stages, eval_methods)
    # A generated source is made in this process, before Ray starts: in a submitted job the
    # driver's working directory (the unpacked --working-dir) was seen gone after ray.init
    # (os.getcwd() failing in the data stage's tokenizer import, tests/test_cluster.py); the cause
    # inside Ray's runtime-env handling is not pinned down. Data read from files needs Ray.
    # The report only reads files: it runs after Ray stops, and is rewritten each time.
    before_ray = [("data", None)] if ("data", None) in steps and cfg.data.source != "files" else []
    on_ray = [s for s in steps if s not in before_ray and s != ("report", None)]
    t0 = time.perf_counter()
    for stage, method in before_ray:
        run_step(cfg, run_dir, state, stage, method, stage in force)
    with ray_session(cfg) if on_ray else contextlib.nullcontext():
        for stage, method in on_ray:
            # Skip data come from the CWT student: a forced retraining redoes them too.
            forced = stage in force or (stage == "skip" and "train" in force)
            run_step(cfg, run_dir, state, stage, method, forced, train_callbacks)
    if ("report", None) in steps:
        run_step(cfg, run_dir, state, "report", None, True)
        log.info(f"[report] {run_dir / 'report.md'} ({time.perf_counter() - t0:.0f}s)")
        return run_dir / "report.md"
    return run_dir
