"""The run directory in code: where each stage writes, the schemas of what it writes, the readers
every later stage and the report use, and the one way files are written (atomically).

docs/run-directory.md describes the same layout for users. A bottom module: it imports only the
config, so every stage and the report can use it without importing each other.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterator, Optional

import pyarrow as pa

from .config import UserError

SPLITS = ("train", "validation", "test")

# data/<split>.parquet: the canonical records every stage reads.
RECORD_SCHEMA = pa.schema([
    ("id", pa.string()), ("question", pa.string()), ("rationale", pa.string()),
    ("answer", pa.string()), ("source", pa.string()),
])
# data/rejects.parquet: every unusable input row and why (kinds: docs/data.md).
DATA_REJECT_SCHEMA = pa.schema([
    ("split", pa.string()), ("file", pa.string()), ("line", pa.int64()),
    ("id", pa.string()), ("kind", pa.string()), ("reason", pa.string()), ("raw", pa.string()),
])
# chunks/<split>/chunks.parquet: one row per chunked rationale.
CHUNK_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("chunks", pa.list_(pa.string())),
    ("boundaries", pa.list_(pa.int64())),        # K+1 character offsets: 0, b1, ..., len(rationale)
    ("chunk_tokens", pa.list_(pa.int64())),
    ("num_chunks", pa.int64()),
    ("heuristic", pa.string()),
    ("params", pa.string()),                      # the heuristic's settings, JSON
    ("score", pa.float64()),                      # average: CV of chunk token lengths; semantic: dispersion; sbc: loss
    ("boundary_scores", pa.list_(pa.float64())),  # K-1: semantic/sbc-semantic: cosine similarity across each boundary
    ("loss_before", pa.float64()),                # sbc: mean chunk loss of the starting boundaries
    ("loss_after", pa.float64()),                 # sbc: after the search (a diagnostic, not a quality measure)
    ("moves", pa.int64()),                        # sbc: accepted moves
    ("candidates_scored", pa.int64()),            # sbc: boundary sets scored by the student
    ("note", pa.string()),
])
# chunks/<split>/rejects.parquet: rationales that could not be chunked.
CHUNK_REJECT_SCHEMA = pa.schema([("id", pa.string()), ("reason", pa.string())])
# skips/train/skips.parquet: one row per chunked rationale, whatever its fate (see SKIP_STATUSES).
SKIP_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("num_chunks", pa.int64()),
    ("status", pa.string()),
    ("baseline_nll", pa.float64()),             # answer's mean token NLL with every chunk
    ("baseline_correct", pa.bool_()),           # the student writes the gold answer with every chunk
    ("skip_sets", pa.list_(pa.list_(pa.int64()))),   # one list of skipped stages per skip sequence
    ("skipped", pa.list_(pa.int64())),          # union of the skipped stages
    ("trials", pa.string()),                    # JSON: every removal tested, its NLL, correctness, verdict
    ("candidates_scored", pa.int64()),
    ("note", pa.string()),
])
SKIP_STATUSES = ("skipped", "none_skippable", "wrong_with_all_chunks", "no_middle_chunk", "too_long", "error")
# evals/<method>/records/*.parquet and latency.parquet: one row per question.
EVAL_RECORD_SCHEMA = pa.schema([
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

# File names inside a student folder (beside the save_pretrained files).
TRAIN_LOG = "train_log.jsonl"            # one JSON line per optimizer step
TRAIN_METRICS = "train_metrics.json"     # the run's training summary
METRICS = "metrics.json"                 # an eval's metrics, and the run's {method: {train, eval}}
SUMMARY = "summary.json"                 # a stage output's counts


# --- where things are -------------------------------------------------------------------------

def split_file(run_dir: Path, split: str) -> Path:
    return Path(run_dir) / "data" / f"{split}.parquet"


def data_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "data"


def chunks_dir(run_dir: Path, split: str = "train") -> Path:
    return Path(run_dir) / "chunks" / split


def skips_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "skips" / "train"


def student_dir(run_dir: Path, method: str) -> Path:
    return Path(run_dir) / "students" / method


def eval_dir(run_dir: Path, method: str) -> Path:
    return Path(run_dir) / "evals" / method


def relative(path: Path, run_dir: Path) -> str:
    """`path` as reports print it: relative to the run directory when inside it, so a published
    report names no folder of the machine that made it."""
    try:
        return str(Path(path).resolve().relative_to(Path(run_dir).resolve()))
    except ValueError:
        return str(path)


# --- readers ----------------------------------------------------------------------------------

def read_json(path: Path) -> Optional[dict]:
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else None


def read_records(path: Path) -> list[dict]:
    """A data split's records, as dicts."""
    import pyarrow.parquet as pq

    if not Path(path).is_file():
        raise UserError(f"missing {path}: run the earlier stage first (cwt-ray run or cwt-ray chunk)")
    return pq.read_table(path).to_pylist()


def read_chunks(path: Path) -> pa.Table:
    """A chunk folder's chunks, sorted by id."""
    import pyarrow.parquet as pq

    return pq.read_table(str(Path(path) / "chunks.parquet"), schema=CHUNK_SCHEMA).sort_by("id")


def read_skips(path: Path) -> dict[str, list[list[int]]]:
    """id -> its skip sequences (lists of skipped stages), for rationales with at least one."""
    import pyarrow.parquet as pq

    table = pq.read_table(str(Path(path) / "skips.parquet"), schema=SKIP_SCHEMA)
    return {r["id"]: r["skip_sets"] for r in table.to_pylist() if r["skip_sets"]}


def read_eval_records(run_dir: Path, method: str) -> pa.Table:
    import pyarrow.parquet as pq

    return pq.read_table(str(eval_dir(run_dir, method) / "records"), schema=EVAL_RECORD_SCHEMA).sort_by("id")


def read_train_log(folder: Path) -> list[dict]:
    log = Path(folder) / TRAIN_LOG
    return [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []


# --- writers ----------------------------------------------------------------------------------

@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside `final`; when the block ends without an error it
    replaces `final`. A crash mid-way never leaves a half folder under the final name."""
    final = Path(final)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    yield tmp
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write; when the block ends without an error it
    replaces `path`. Readers (and a resumed run) see the old content or the new one, never half of
    it. The pid keeps concurrent writers of the same file apart."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: Path, data: str | bytes) -> None:
    with atomic_file(path) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data)


def write_json(path: Path, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=2))
