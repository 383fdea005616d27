"""Eval stage: greedy generation on a split with Ray Data model actors, one record per question.

Every method gets the same `max_new_tokens`, batch size and backend, so tokens generated and
latency are comparable. A record says whether the answer is right (`correct`), whether the gold
answer appears anywhere (`contains_answer`), whether the answer was given in the task's format
(`correct_format`), and whether the student stopped by itself (`complete`) or was cut by the cap.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import pyarrow as pa

from .config import ExperimentConfig

RECORD_SCHEMA = pa.schema([
    ("id", pa.string()), ("method", pa.string()), ("question", pa.string()), ("gold", pa.string()),
    ("output", pa.string()), ("predicted", pa.string()), ("correct", pa.bool_()),
    ("contains_answer", pa.bool_()), ("correct_format", pa.bool_()), ("complete", pa.bool_()),
    ("tokens_generated", pa.int64()), ("latency_s", pa.float64()), ("batch_size", pa.int64()),
])
BACKEND = "hf-generate"


class Generator:
    """Ray Data callable class: one student per actor, greedy batched generation."""

    def __init__(self, student_dir: str, method: str, cfg: dict, num_threads: int):
        import torch

        from .extract import get_extractor
        from .samples import SampleBuilder
        from .student import load_model, load_tokenizer

        torch.set_num_threads(max(1, num_threads))
        self.cfg = ExperimentConfig.model_validate(cfg)
        self.method = method
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.tok = load_tokenizer(student_dir, self.cfg.student.trust_remote_code)
        self.model = load_model(student_dir, self.cfg.student.trust_remote_code).to(self.device).eval()
        self.builder = SampleBuilder(self.tok, self.cfg)
        self.extractor = get_extractor(self.cfg.task.answer_type, self.cfg.task.answer_template)

    def generate(self, prefixes: list[list[int]]) -> tuple[list[list[int]], float]:
        """Greedy continuation of each prefix (left-padded for generation only); returns new ids
        cut after the first eos, and the batch's wall time."""
        import torch

        width = max(len(p) for p in prefixes)
        pad = self.tok.pad_token_id
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prefixes], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prefixes], device=self.device)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = self.model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                      max_new_tokens=self.cfg.eval.max_new_tokens,
                                      eos_token_id=self.tok.eos_token_id, pad_token_id=pad)
        wall = time.perf_counter() - t0
        new = []
        for row in out[:, width:].tolist():
            if self.tok.eos_token_id in row:
                row = row[: row.index(self.tok.eos_token_id) + 1]
            new.append(row)
        return new, wall

    def __call__(self, batch: pa.Table) -> pa.Table:
        questions = batch.column("question").to_pylist()
        prefixes = [self.builder.inference_prefix(q, self.method) for q in questions]
        new_ids, wall = self.generate(prefixes)
        print(f"[eval {self.method}] {len(questions)} questions in {wall:.1f}s", flush=True)
        rows = []
        for rid, q, gold, ids in zip(batch.column("id").to_pylist(), questions, batch.column("answer").to_pylist(), new_ids):
            complete = bool(ids) and ids[-1] == self.tok.eos_token_id
            text = self.tok.decode(ids, skip_special_tokens=True)
            got = self.extractor.extract(text)
            rows.append({"id": rid, "method": self.method, "question": q, "gold": gold, "output": text,
                         "predicted": got.answer, "correct": self.extractor.is_correct(got.answer, gold),
                         "contains_answer": self.extractor.contains(text, gold), "correct_format": got.formatted,
                         "complete": complete, "tokens_generated": len(ids),
                         "latency_s": wall / len(questions), "batch_size": len(questions)})
        return pa.Table.from_pylist(rows, schema=RECORD_SCHEMA)


def metrics_of(table: pa.Table, cfg: ExperimentConfig) -> dict:
    rows = table.to_pylist()
    n = len(rows)

    def mean(key):
        return sum(float(r[key]) for r in rows) / n if n else float("nan")

    return {"n": n, "accuracy": mean("correct"), "contains_answer": mean("contains_answer"),
            "correct_format": mean("correct_format"), "complete": mean("complete"),
            "tokens_generated": mean("tokens_generated"), "latency_s": mean("latency_s"),
            "batch_size": cfg.eval.batch_size, "max_new_tokens": cfg.eval.max_new_tokens,
            "backend": BACKEND, "split": cfg.eval.split}


def evaluate_method(cfg: ExperimentConfig, method: str, run_dir: Path) -> dict:
    """Generate for every question of the eval split; writes records (Parquet) and metrics (JSON)."""
    import pyarrow.parquet as pq
    import ray.data

    ecfg = cfg.eval
    # Read before the actor pool starts: on a small cluster the pool may hold every CPU, and read
    # tasks queued behind it would wait forever.
    ds = ray.data.read_parquet(str(run_dir / "data" / f"{ecfg.split}.parquet"))
    if ecfg.limit:
        ds = ds.limit(ecfg.limit)
    # An actor works through a block's batches alone: one block per batch lets every actor help.
    ds = ds.repartition(max(1, math.ceil(ds.count() / ecfg.batch_size))).materialize()
    out_dir = run_dir / "evals" / method
    tmp = out_dir.with_name(method + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.perf_counter()
    records = ds.map_batches(
        Generator,
        fn_constructor_kwargs={"student_dir": str(run_dir / "students" / method), "method": method,
                               "cfg": cfg.model_dump(mode="json"), "num_threads": int(ecfg.cpus_per_actor)},
        batch_size=ecfg.batch_size, compute=ray.data.ActorPoolStrategy(size=ecfg.concurrency),
        num_cpus=ecfg.cpus_per_actor, num_gpus=ecfg.gpus_per_actor or None, batch_format="pyarrow",
    )
    # One small row per question: collected on the driver, written once.
    batches = list(records.iter_batches(batch_format="pyarrow", batch_size=None))
    table = pa.concat_tables(batches).cast(RECORD_SCHEMA).sort_by("id") if batches else RECORD_SCHEMA.empty_table()
    (tmp / "records").mkdir(parents=True)
    pq.write_table(table, tmp / "records" / "records.parquet")
    metrics = metrics_of(table, cfg)
    metrics["eval_wall_s"] = time.perf_counter() - t0
    (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    print(f"[eval {method}] {metrics['n']} questions: accuracy {metrics['accuracy']:.3f}, "
          f"complete {metrics['complete']:.2f}, {metrics['tokens_generated']:.1f} tokens/answer, "
          f"{metrics['latency_s'] * 1000:.0f} ms/question (batch {ecfg.batch_size})", flush=True)
    return metrics


def read_eval_records(run_dir: Path, method: str) -> pa.Table:
    import pyarrow.parquet as pq

    return pq.read_table(str(run_dir / "evals" / method / "records"), schema=RECORD_SCHEMA).sort_by("id")
