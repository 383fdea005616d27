"""Eval stage: greedy generation on a split with Ray Data model actors, one record per question.

Every method gets the same `max_new_tokens`, batch size and backend, so tokens generated and
latency are comparable. A record says whether the answer is right (`correct`), whether the gold
answer appears anywhere (`contains_answer`), whether the answer was given in the task's format
(`correct_format`), and whether the student stopped by itself (`complete`) or was cut by the cap.
"""
from __future__ import annotations

import time
from pathlib import Path

import pyarrow as pa

from .cluster import gather, map_on_actor_pool
from .config import ExperimentConfig
from .console import get_logger
from .rundir import EVAL_RECORD_SCHEMA, METRICS, atomic_dir, eval_dir, split_file, student_dir, write_json

log = get_logger("eval")

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
        return pa.Table.from_pylist(rows, schema=EVAL_RECORD_SCHEMA)


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


def _generate_records(questions: pa.Table, cfg: ExperimentConfig, method: str, student: Path, batch_size: int,
                      concurrency: int) -> pa.Table:
    import ray.data

    ecfg = cfg.eval
    records = map_on_actor_pool(
        ray.data.from_arrow(questions), Generator,
        {"student_dir": str(student), "method": method, "cfg": cfg.model_dump(mode="json"),
         "num_threads": int(ecfg.cpus_per_actor)},
        rows=questions.num_rows, batch_size=batch_size, concurrency=concurrency, cpus_per_actor=ecfg.cpus_per_actor,
        gpus_per_actor=ecfg.gpus_per_actor)
    # One small row per question: collected on the driver as batches finish, written once.
    label = f"[eval {method}{' batch-1 latency' if batch_size == 1 else ''}]"
    batches = gather(records, label, questions.num_rows, "questions")
    return (pa.concat_tables(batches).cast(EVAL_RECORD_SCHEMA).sort_by("id") if batches
            else EVAL_RECORD_SCHEMA.empty_table())


def evaluate_method(cfg: ExperimentConfig, method: str, run_dir: Path) -> dict:
    """Generate for every question of the eval split (batched), then one at a time for the first
    `eval.latency_questions` (batch-1 latency); writes records (Parquet) and metrics (JSON)."""
    import pyarrow.parquet as pq

    ecfg = cfg.eval
    student = student_dir(run_dir, method)
    # The split's questions are small rows; ordering them by id on the driver fixes which questions
    # `limit` and the latency subset take (a distributed sort is not worth its shuffle here).
    questions = pq.read_table(str(split_file(run_dir, ecfg.split)), columns=["id", "question", "answer"])
    questions = questions.sort_by("id").slice(0, ecfg.limit or None)
    t0 = time.perf_counter()
    table = _generate_records(questions, cfg, method, student, ecfg.batch_size, ecfg.concurrency)
    latency = None
    if ecfg.latency_questions:
        # One actor, one question at a time: latency is what a single user waits, not a share of a batch.
        latency = _generate_records(questions.slice(0, ecfg.latency_questions), cfg, method, student, 1, 1)
    metrics = metrics_of(table, latency, cfg)
    metrics["eval_wall_s"] = time.perf_counter() - t0
    with atomic_dir(eval_dir(run_dir, method)) as tmp:
        (tmp / "records").mkdir()
        pq.write_table(table, tmp / "records" / "records.parquet")
        if latency is not None:
            pq.write_table(latency, tmp / "latency.parquet")
        write_json(tmp / METRICS, metrics)
    lat = f", batch-1 latency {metrics['latency_s']:.2f}s" if metrics.get("latency_s") is not None else ""
    skip = f", {metrics['skipped_per_answer']:.2f} stages skipped/answer" if method == "stt" else ""
    log.info(f"[eval {method}] {metrics['n']} questions: accuracy {metrics['accuracy']:.3f}, "
             f"complete {metrics['complete']:.2f}, {metrics['tokens_generated']:.1f} tokens/answer{skip}{lat}, "
             f"batched {metrics['batched_questions_per_s'] or 0:.2f} questions/s (batch {ecfg.batch_size})")
    return metrics
