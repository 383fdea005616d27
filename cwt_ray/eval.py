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
    ("tokens_generated", pa.int64()),
    ("stages_written", pa.int64()),          # chunk stages in the output (0 for Std-CoT)
    ("skipped", pa.list_(pa.int64())),       # stages the student skipped (STT)
    ("skip_decisions", pa.string()),         # JSON: P(skip) and the decision at each decision point
    ("batch_size", pa.int64()),
    ("batch_wall_s", pa.float64()),          # generation wall time of the batch this question was in
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

    def __call__(self, batch: pa.Table) -> pa.Table:
        from .decode import decision_processor, decisions_json, generate, parse_output

        questions = batch.column("question").to_pylist()
        prefixes = [self.builder.inference_prefix(q, self.method) for q in questions]
        processor = None
        if self.method == "stt" and self.cfg.stt.style == "marker":
            processor = decision_processor(self.tok, self.builder, self.cfg.stt.skip_confidence,
                                           self.cfg.stt.skippable, len(questions))
        new_ids, wall = generate(self.model, self.tok, prefixes, self.cfg.eval.max_new_tokens, processor)
        print(f"[eval {self.method}] {len(questions)} questions in {wall:.1f}s", flush=True)
        marker = self.builder.chunk_marker if self.method != "std_cot" else ""
        rows = []
        for row, (rid, q, gold, ids) in enumerate(zip(batch.column("id").to_pylist(), questions,
                                                      batch.column("answer").to_pylist(), new_ids)):
            complete = bool(ids) and ids[-1] == self.tok.eos_token_id
            text = self.tok.decode(ids, skip_special_tokens=True)
            # Extractors read the text without stage markers: '[2]' is not a number the student gave.
            parsed = parse_output(text, marker, self.builder.answer_marker, self.builder.skip_text)
            got = self.extractor.extract(parsed.content)
            rows.append({"id": rid, "method": self.method, "question": q, "gold": gold, "output": text,
                         "predicted": got.answer, "correct": self.extractor.is_correct(got.answer, gold),
                         "contains_answer": self.extractor.contains(parsed.content, gold),
                         "correct_format": got.formatted, "complete": complete, "tokens_generated": len(ids),
                         "stages_written": len(parsed.stages) if marker else 0, "skipped": parsed.skipped,
                         "skip_decisions": decisions_json(processor.decisions[row]) if processor else "[]",
                         "batch_size": len(questions), "batch_wall_s": wall})
        return pa.Table.from_pylist(rows, schema=RECORD_SCHEMA)


def metrics_of(table: pa.Table, latency: pa.Table | None, cfg: ExperimentConfig) -> dict:
    """Quality from the batched run; speed twice: batched throughput (per actor) and batch-1
    latency on a fixed subset, each with its backend and batch size named."""
    import statistics

    rows = table.to_pylist()
    n = len(rows)

    def mean(key, of=rows):
        return sum(float(r[key]) for r in of) / len(of) if of else float("nan")

    walls = {}   # one wall time per batch, not per question
    for r in rows:
        walls.setdefault((r["batch_size"], r["batch_wall_s"]), r["batch_size"])
    gen_s = sum(w for _, w in walls)
    out = {"n": n, "accuracy": mean("correct"), "contains_answer": mean("contains_answer"),
           "correct_format": mean("correct_format"), "complete": mean("complete"),
           "tokens_generated": mean("tokens_generated"), "stages_written": mean("stages_written"),
           "skipped_per_answer": sum(len(r["skipped"]) for r in rows) / n if n else float("nan"),
           "answers_with_skip": sum(bool(r["skipped"]) for r in rows) / n if n else float("nan"),
           "batch_size": cfg.eval.batch_size, "max_new_tokens": cfg.eval.max_new_tokens,
           "backend": BACKEND, "split": cfg.eval.split,
           "batched_generation_s": gen_s,
           "batched_questions_per_s": n / gen_s if gen_s else None,
           "batched_tokens_per_s": sum(r["tokens_generated"] for r in rows) / gen_s if gen_s else None}
    if latency is not None and latency.num_rows:
        lat = latency.to_pylist()
        secs = sorted(r["batch_wall_s"] for r in lat)
        out.update({"latency_n": len(lat), "latency_s": statistics.mean(secs), "latency_p50_s": statistics.median(secs),
                    "latency_p90_s": secs[min(len(secs) - 1, int(0.9 * len(secs)))],
                    "latency_tokens_generated": mean("tokens_generated", lat), "latency_batch_size": 1})
    else:
        out.update({"latency_n": 0, "latency_s": None})
    return out


def _generate_records(ds, cfg: ExperimentConfig, method: str, student_dir: Path, batch_size: int, concurrency: int) -> pa.Table:
    import ray.data

    from .pipeline import actor_gpus

    ecfg = cfg.eval
    gpus = actor_gpus(ecfg.gpus_per_actor)
    records = ds.map_batches(
        Generator,
        fn_constructor_kwargs={"student_dir": str(student_dir), "method": method,
                               "cfg": cfg.model_dump(mode="json"), "num_threads": int(ecfg.cpus_per_actor)},
        batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=concurrency),
        num_cpus=ecfg.cpus_per_actor, num_gpus=gpus or None, batch_format="pyarrow",
    )
    # One small row per question: collected on the driver, written once.
    batches = list(records.iter_batches(batch_format="pyarrow", batch_size=None))
    return pa.concat_tables(batches).cast(RECORD_SCHEMA).sort_by("id") if batches else RECORD_SCHEMA.empty_table()


def evaluate_method(cfg: ExperimentConfig, method: str, run_dir: Path) -> dict:
    """Generate for every question of the eval split (batched), then one at a time for the first
    `eval.latency_questions` (batch-1 latency); writes records (Parquet) and metrics (JSON)."""
    import pyarrow.parquet as pq
    import ray.data

    ecfg = cfg.eval
    student_dir = run_dir / "students" / method
    # Read before the actor pool starts: on a small cluster the pool may hold every CPU, and read
    # tasks queued behind it would wait forever.
    # The split's questions are small rows; ordering them by id on the driver fixes which questions
    # `limit` and the latency subset take (a distributed sort is not worth its shuffle here).
    questions = pq.read_table(str(run_dir / "data" / f"{ecfg.split}.parquet"), columns=["id", "question", "answer"])
    questions = questions.sort_by("id").slice(0, ecfg.limit or None)
    ds = ray.data.from_arrow(questions).materialize()
    n = ds.count()
    out_dir = run_dir / "evals" / method
    tmp = out_dir.with_name(method + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.perf_counter()
    # An actor works through a block's batches alone: one block per batch lets every actor help.
    table = _generate_records(ds.repartition(max(1, math.ceil(n / ecfg.batch_size))).materialize(),
                              cfg, method, student_dir, ecfg.batch_size, ecfg.concurrency)
    latency = None
    if ecfg.latency_questions:
        # One actor, one question at a time: latency is what a single user waits, not a share of a batch.
        subset = ds.limit(ecfg.latency_questions).repartition(1).materialize()
        latency = _generate_records(subset, cfg, method, student_dir, 1, 1)
    (tmp / "records").mkdir(parents=True)
    pq.write_table(table, tmp / "records" / "records.parquet")
    if latency is not None:
        pq.write_table(latency, tmp / "latency.parquet")
    metrics = metrics_of(table, latency, cfg)
    metrics["eval_wall_s"] = time.perf_counter() - t0
    (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    lat = f", batch-1 latency {metrics['latency_s']:.2f}s" if metrics.get("latency_s") is not None else ""
    skip = f", {metrics['skipped_per_answer']:.2f} stages skipped/answer" if method == "stt" else ""
    print(f"[eval {method}] {metrics['n']} questions: accuracy {metrics['accuracy']:.3f}, "
          f"complete {metrics['complete']:.2f}, {metrics['tokens_generated']:.1f} tokens/answer{skip}{lat}, "
          f"batched {metrics['batched_questions_per_s'] or 0:.2f} questions/s (batch {ecfg.batch_size})", flush=True)
    return metrics


def read_eval_records(run_dir: Path, method: str) -> pa.Table:
    import pyarrow.parquet as pq

    return pq.read_table(str(run_dir / "evals" / method / "records"), schema=RECORD_SCHEMA).sort_by("id")
