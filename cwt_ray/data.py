"""Data in: canonical records, the gsm_symbolic source, a JSONL loader, splits and rejects.

A canonical record is {id, question, rationale, answer, source}. `rationale` is the reasoning
without the final answer; the task's answer template renders the answer after it. Every input
row ends either in a split or in the rejects table with a reason, so rows in = kept + rejected.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from .config import ExperimentConfig, UserError
from .extract import get_extractor

SPLITS = ("train", "validation", "test")
RECORD_SCHEMA = pa.schema([
    ("id", pa.string()), ("question", pa.string()), ("rationale", pa.string()),
    ("answer", pa.string()), ("source", pa.string()),
])
REJECT_SCHEMA = pa.schema([
    ("split", pa.string()), ("file", pa.string()), ("line", pa.int64()),
    ("id", pa.string()), ("reason", pa.string()), ("raw", pa.string()),
])


@dataclass
class SplitResult:
    records: list[dict] = field(default_factory=list)
    rejects: list[dict] = field(default_factory=list)
    rows_in: int = 0


def split_gsm_cot(answer_cot: str) -> tuple[str, str | None]:
    """GSM8K-style text 'steps...\\n#### 72' -> ('steps...', '72'); answer None without '####'."""
    head, sep, tail = answer_cot.rpartition("####")
    if not sep:
        return answer_cot.strip(), None
    return head.rstrip(), tail.strip()


def _validated(raw: dict, split: str, file: str, line: int, extractor, seen: set[str], out: SplitResult,
               source: str) -> None:
    """Check one canonical candidate row; append to records or rejects."""
    def reject(reason: str) -> None:
        out.rejects.append({"split": split, "file": file, "line": line, "id": str(raw.get("id", "")),
                            "reason": reason, "raw": json.dumps(raw, ensure_ascii=False, default=str)[:2000]})

    for key in ("id", "question", "rationale", "answer"):
        value = raw.get(key)
        if value is None or (isinstance(value, str) and not value.strip()):
            return reject(f"missing or empty field '{key}'")
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            return reject(f"field '{key}' has type {type(value).__name__}, expected text")
    record = {k: str(raw[k]).strip() if k != "rationale" else str(raw[k]).rstrip() for k in ("id", "question", "rationale", "answer")}
    record["source"] = source
    gold = extractor.normalize_gold(record["answer"])
    if gold is None:
        return reject(f"answer {record['answer']!r} cannot be read by the '{type(extractor).__name__}' extractor")
    record["answer"] = gold
    if record["id"] in seen:
        return reject(f"duplicate id '{record['id']}' (first kept)")
    seen.add(record["id"])
    out.records.append(record)


def _gsm_symbolic(cfg: ExperimentConfig, split: str, extractor) -> SplitResult:
    import reasoning_gym

    size = {"train": cfg.data.train_size, "validation": cfg.data.validation_size, "test": cfg.data.test_size}[split]
    seed = {"train": cfg.data.train_seed, "validation": cfg.data.validation_seed, "test": cfg.data.test_seed}[split]
    out = SplitResult()
    if size == 0:
        return out
    seen: set[str] = set()
    for i, item in enumerate(reasoning_gym.create_dataset("gsm_symbolic", size=size, seed=seed)):
        out.rows_in += 1
        rationale, cot_answer = split_gsm_cot(item["metadata"]["answer_cot"])
        raw = {"id": f"gsm_symbolic-{split}-{seed}-{i}", "question": item["question"],
               "rationale": rationale, "answer": item["answer"]}
        # Teacher agreement: the rationale must end in the gold answer (Fine-tune-CoT's filter).
        gold = extractor.normalize_gold(str(item["answer"]))
        if cot_answer is None or extractor.normalize_gold(cot_answer) != gold:
            out.rejects.append({"split": split, "file": "gsm_symbolic", "line": i, "id": raw["id"],
                                "reason": f"rationale ends in {cot_answer!r}, gold answer is {item['answer']!r}",
                                "raw": json.dumps(raw)[:2000]})
            continue
        _validated(raw, split, "gsm_symbolic", i, extractor, seen, out, "gsm_symbolic")
    return out


def _read_jsonl(path: str) -> Iterator[tuple[int, dict | None, str]]:
    """Yield (line number, parsed row or None, error) for each non-blank line."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"data file not found: {path}")
    with p.open("rb") as f:
        for n, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield n, None, "line is not valid UTF-8"
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                yield n, None, f"invalid JSON: {e.msg}"
                continue
            if not isinstance(row, dict):
                yield n, None, f"expected a JSON object, got {type(row).__name__}"
                continue
            yield n, row, ""


def _jsonl(cfg: ExperimentConfig, split: str, extractor) -> SplitResult:
    path = {"train": cfg.data.train_path, "validation": cfg.data.validation_path, "test": cfg.data.test_path}[split]
    out = SplitResult()
    if not path:
        return out
    fields = cfg.data.fields
    seen: set[str] = set()
    for line, row, error in _read_jsonl(path):
        out.rows_in += 1
        if row is None:
            out.rejects.append({"split": split, "file": path, "line": line, "id": "", "reason": error, "raw": ""})
            continue
        raw = {key: row.get(fields.get(key, key)) for key in ("id", "question", "rationale", "answer")}
        if raw["id"] is None:
            raw["id"] = f"{Path(path).stem}-{line}"
        _validated(raw, split, path, line, extractor, seen, out, Path(path).name)
    return out


def load_splits(cfg: ExperimentConfig) -> tuple[dict[str, SplitResult], dict]:
    """Build train/validation/test records and rejects; returns (splits, summary counts)."""
    extractor = get_extractor(cfg.task.answer_type, cfg.task.answer_template)
    loader = {"gsm_symbolic": _gsm_symbolic, "jsonl": _jsonl}[cfg.data.source]
    splits = {split: loader(cfg, split, extractor) for split in SPLITS}
    # Evaluation questions that also occur in training would measure memorisation, not reasoning.
    train_questions = {r["question"] for r in splits["train"].records}
    for split in ("validation", "test"):
        kept = []
        for r in splits[split].records:
            if r["question"] in train_questions:
                splits[split].rejects.append({"split": split, "file": cfg.data.source, "line": -1, "id": r["id"],
                                              "reason": "question also in the train split", "raw": r["question"][:2000]})
            else:
                kept.append(r)
        splits[split].records = kept
    summary = {s: {"rows_in": r.rows_in, "kept": len(r.records), "rejected": len(r.rejects)} for s, r in splits.items()}
    for s, counts in summary.items():
        assert counts["rows_in"] == counts["kept"] + counts["rejected"], (s, counts)
    if not splits["train"].records:
        raise UserError(f"no usable training rows from data source '{cfg.data.source}' (see the rejects file)")
    return splits, summary


def write_table(rows: Iterable[dict], schema: pa.Schema, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(list(rows), schema=schema)
    tmp = path.with_suffix(".tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)   # atomic: a crash never leaves a half-written split behind


def write_splits(cfg: ExperimentConfig, data_dir: Path) -> dict:
    splits, summary = load_splits(cfg)
    for split, result in splits.items():
        write_table(result.records, RECORD_SCHEMA, data_dir / f"{split}.parquet")
    write_table([r for res in splits.values() for r in res.rejects], REJECT_SCHEMA, data_dir / "rejects.parquet")
    (data_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def read_records(path: Path) -> list[dict]:
    if not path.is_file():
        raise UserError(f"missing {path}: run the earlier stage first (cwt-ray run or cwt-ray chunk)")
    return pq.read_table(path).to_pylist()
