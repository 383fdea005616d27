"""Data in: canonical records from gsm_symbolic or users' files, validated, split, nothing lost.

A canonical record is {id, question, rationale, answer, source}. `rationale` is the reasoning
without the final answer; the task's answer template renders the answer after it. Every input
row ends either in a split or in the rejects file with its file, line and reason, so
rows in = kept + rejected, per split and in all.

Users' files stream through Ray Data: each shard (readers.py) is read and validated by a task,
and the driver consumes the validated batches in order, keeping only 8-byte hashes of the ids
(duplicates: first kept) and of the train questions (evaluation rows whose question is also in
train are rejected), and writing Parquet as it goes. Memory does not grow with the file size
apart from those hashes.
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .config import ExperimentConfig, UserError
from .data_check import SPLITS, DataStop, Tally, check_reject_limit, summarise
from .extract import get_extractor
from .rundir import DATA_REJECT_SCHEMA, RECORD_SCHEMA, SUMMARY, atomic_dir, write_json
from .readers import PRESETS, Bad, get_field, derived_id, expand_paths, plan_shards, read_shard

# What a validation task sends to the driver: kept rows have kind "", rejects carry the reason.
VALIDATED_SCHEMA = pa.schema(list(RECORD_SCHEMA) + [
    ("split", pa.string()), ("file", pa.string()), ("line", pa.int64()), ("kind", pa.string()),
    ("reason", pa.string()), ("raw", pa.string()), ("id_key", pa.uint64()), ("q_key", pa.uint64()),
    ("truncated", pa.bool_()), ("stated_answer", pa.string()),
])


def split_gsm_cot(answer_cot: str) -> tuple[str, str | None]:
    """GSM8K-style text 'steps...\\n#### 72' -> ('steps...', '72'); answer None without '####'."""
    head, sep, tail = answer_cot.rpartition("####")
    if not sep:
        return answer_cot.strip(), None
    return head.rstrip(), tail.strip()


def _key(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def hash_split(record_id: str, fractions: dict[str, float]) -> str:
    """train/validation/test from a hash of the id alone: the same row lands in the same split
    however the files are ordered or sharded."""
    u = int.from_bytes(hashlib.blake2b(record_id.encode("utf-8"), digest_size=8, person=b"cwt-split").digest(),
                       "little") / 2 ** 64
    edge = 0.0
    for split in SPLITS:
        edge += fractions.get(split, 0.0)
        if u < edge:
            return split
    return "test"


def release_free_heap() -> None:
    """Hand the C heap's free pages back to the OS (glibc `malloc_trim`; a no-op elsewhere).

    Large numpy temporaries (the KeySet merges, up to 32 MiB) come from glibc's heap once its
    dynamic mmap threshold has risen, and the holes they leave are kept by the process: without
    this the driver's memory grew by ~40 MiB per million rows although its live data did not
    (measured in docs/results.md, data stage benchmark). Dask's workers trim the same way."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):   # not glibc (macOS, musl): nothing to trim this way
        pass


class KeySet:
    """A set of uint64 hashes in sorted numpy runs (merged like a binary counter): 8 bytes per key
    held, batch membership by binary search. A 64-bit hash collision (about 3e-8 for a million
    ids) would reject one row as a duplicate."""

    # Merges producing runs this long release the heap's free pages afterwards (see above).
    TRIM_AFTER_KEYS = 1 << 20

    def __init__(self):
        self.runs: list[np.ndarray] = []

    def contains(self, keys: np.ndarray) -> np.ndarray:
        hit = np.zeros(len(keys), dtype=bool)
        for run in self.runs:
            idx = np.minimum(np.searchsorted(run, keys), len(run) - 1)
            hit |= run[idx] == keys
        return hit

    def add(self, keys: np.ndarray) -> None:
        if len(keys):
            self.runs.append(np.unique(keys))
        while len(self.runs) > 1 and len(self.runs[-2]) <= 2 * len(self.runs[-1]):
            last = self.runs.pop()
            self.runs[-1] = merged = self._merge(self.runs[-1], last)
            if len(merged) >= self.TRIM_AFTER_KEYS:
                release_free_heap()

    @staticmethod
    def _merge(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Union of two sorted unique runs. A stable sort of their concatenation is a single
        merge of two runs (timsort), in place: ~1.6x the result's bytes at the peak, where
        `np.unique(np.concatenate(...))` held ~4x (a sorted copy, a mask, the result)."""
        out = np.concatenate([a, b])
        out.sort(kind="stable")
        dup = out[1:] == out[:-1]
        return out[np.concatenate([[True], ~dup])] if dup.any() else out

    def add_new(self, keys: np.ndarray) -> np.ndarray:
        """Mask of the keys seen for the first time (earlier in this batch counts as seen); adds them."""
        first = np.zeros(len(keys), dtype=bool)
        first[np.unique(keys, return_index=True)[1]] = True
        new = first & ~self.contains(keys)
        self.add(keys[new])
        return new

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.runs)

    def __len__(self) -> int:
        return sum(len(r) for r in self.runs)


_TOKENIZERS: dict[str, object] = {}


def student_tokenizer(student: dict):
    """The student's Rust tokenizer, loaded once per process (a Ray worker runs many shard tasks,
    and a transformers load costs ~0.5 s) and only when a rationale could be too long."""
    key = json.dumps(student, sort_keys=True)
    if key not in _TOKENIZERS:
        from .config import StudentConfig
        from .student import load_tokenizer, resolve_student

        cfg = StudentConfig(**student)
        _TOKENIZERS[key] = load_tokenizer(resolve_student(cfg), cfg.trust_remote_code).backend_tokenizer
    return _TOKENIZERS[key]


class Validator:
    """Candidate rows -> one VALIDATED_SCHEMA table per batch. Runs in Ray tasks (files) or in the
    driver (gsm_symbolic); everything but duplicate ids and train/eval question overlap, which need
    the global view the driver has."""

    def __init__(self, cfg: dict, preset: str | None = None, questions_only: bool = False):
        d, self.task, self.student = cfg["data"], cfg["task"], cfg["student"]
        self.questions_only = questions_only   # teach: rows need an id, a question and a gold answer
        self.preset, self.fields = PRESETS[preset or d["preset"]], d["fields"]
        self.fractions, self.agreement = d["split_fractions"], d["agreement_filter"]
        self.max_tokens = d["max_rationale_tokens"] or cfg["student"]["max_length"]
        self.truncate = d["too_long"] == "truncate"
        self.extractor = get_extractor(self.task["answer_type"], self.task["answer_template"])

    def _limit_length(self, recs: list[dict]) -> list[dict | Bad]:
        # One batch call into the Rust tokenizer, with offsets only when truncating (they halve
        # its speed). Counting per pre-token with a cache was tried: 1.04-1.19x, the
        # pre-tokenizer's regex is most of the cost (results.md).
        tok = student_tokenizer(self.student)
        texts = [r["rationale"] for r in recs]
        if self.truncate or not hasattr(tok, "encode_batch_fast"):
            encs = tok.encode_batch(texts, add_special_tokens=False)
        else:
            encs = tok.encode_batch_fast(texts, add_special_tokens=False)
        out = []
        for rec, enc in zip(recs, encs):
            n = len(enc.ids)
            if n <= self.max_tokens:
                out.append(rec)
            elif not self.truncate:
                out.append(Bad("too_long", f"rationale has {n} tokens, more than {self.max_tokens}"))
            else:
                end = enc.offsets[self.max_tokens - 1][1]
                out.append({**rec, "rationale": rec["rationale"][:end].rstrip(), "truncated": True})
        return out

    def check(self, row: dict | Bad, split: str | None) -> dict | Bad:
        """One row; split None = hashed from the id. Returns the record or a Bad."""
        if isinstance(row, Bad):
            return row
        cand = self.preset(row, self.fields)
        if isinstance(cand, Bad):
            return cand
        if cand["id"] is None and isinstance(cand["question"], str):
            cand["id"] = derived_id(cand["question"], cand["rationale"])
        rec = {}
        if self.questions_only and cand["rationale"] is None:
            cand["rationale"] = "-"
        for key in ("id", "question", "rationale", "answer"):
            value = cand[key]
            if isinstance(value, bytes):
                try:
                    value = value.decode("utf-8")
                except UnicodeDecodeError:
                    return Bad("not_utf8", f"field '{key}' is not valid UTF-8")
            if value is None or (isinstance(value, str) and not value.strip()):
                return Bad("missing_field", f"missing or empty field '{key}'")
            if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                return Bad("wrong_type", f"field '{key}' has type {type(value).__name__}, expected text")
            value = str(value)
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return Bad("not_utf8", f"field '{key}' is not valid UTF-8")
            rec[key] = value.rstrip() if key == "rationale" else value.strip()
        gold = self.extractor.normalize_gold(rec["answer"])
        if gold is None:
            return Bad("unreadable_answer",
                       f"answer {rec['answer'][:100]!r} cannot be read by the '{self.task['answer_type']}' extractor")
        rec["answer"] = gold
        rec["split"] = split or hash_split(rec["id"], self.fractions)
        rec["truncated"], rec["stated_answer"] = False, None
        if self.questions_only:
            return rec
        said, canonical = self._stated(cand["cot_answer"], rec["rationale"])
        rec["stated_answer"] = said
        if rec["split"] == "train" and self.agreement != "off":
            if said is None and self.agreement == "strict":
                return Bad("no_stated_answer", "rationale states no answer (data.agreement_filter: strict)")
            if said is not None and not self.extractor.is_correct(canonical, gold):   # the evaluation's comparison
                return Bad("teacher_disagrees", f"rationale states {said!r}, gold answer is {gold!r}")
        return rec

    def _stated(self, cot_answer: str | None, rationale: str) -> tuple[str | None, str | None]:
        """What a rationale states as its answer (None: nothing) and that answer's canonical form
        (None when it cannot be read, which never equals a gold answer). Only the layout's answer
        (GSM8K's '####', Fine-tune-CoT's '-->'), the task's answer format or an explicit phrase
        count: a human-written rationale's stray "no" or number is not an answer."""
        if cot_answer is not None:
            return cot_answer[:100], self.extractor.normalize_gold(cot_answer)
        said = self.extractor.stated(rationale).answer
        return (said[:100] if said is not None else None), said

    def could_be_too_long(self, rec: dict) -> bool:
        # A token covers at least one byte: only a rationale with more bytes than the limit needs counting.
        return not self.questions_only and len(rec["rationale"].encode("utf-8")) > self.max_tokens

    def table(self, rows: list, split: str | None, file: str, source: str) -> pa.Table:
        cols = {name: [] for name in VALIDATED_SCHEMA.names}
        outs = [self.check(row, split) for _, row in rows]
        long = [i for i, out in enumerate(outs) if not isinstance(out, Bad) and self.could_be_too_long(out)]
        if long:
            for i, out in zip(long, self._limit_length([outs[i] for i in long])):
                outs[i] = out
        for (line, row), out in zip(rows, outs):
            if isinstance(out, Bad):
                raw_id = get_field(row, self.fields.get("id", "id")) if isinstance(row, dict) else None
                out_split = split or (hash_split(str(raw_id), self.fractions) if isinstance(raw_id, (str, int)) else "")
                values = {"id": "" if raw_id is None else str(raw_id)[:200], "split": out_split, "kind": out.kind,
                          "reason": out.reason, "truncated": False, "id_key": 0, "q_key": 0, "stated_answer": None,
                          "raw": out.raw or (json.dumps(row, ensure_ascii=False, default=str)[:2000]
                                             if isinstance(row, dict) else "")}
                values.update(question=None, rationale=None, answer=None, source=None)
            else:
                values = {**out, "source": source, "kind": "", "reason": "", "raw": "",
                          "id_key": _key(out["id"]), "q_key": _key(out["question"])}
            values.update(file=file, line=line)
            for name in cols:
                cols[name].append(values[name])
        return pa.table(cols, schema=VALIDATED_SCHEMA)


def _read_validate(batch: dict, cfg: dict, questions_only: bool) -> Iterator[pa.Table]:
    """Ray Data task: read one shard, yield validated tables as it goes (streaming)."""
    validator = Validator(cfg, questions_only=questions_only)
    for shard_json in batch["shard"]:
        shard = json.loads(shard_json)
        for rows in read_shard(shard):
            yield validator.table(rows, shard["split"] or None, shard["path"], Path(shard["path"]).name)


def _file_batches(cfg: ExperimentConfig, dumped: dict, questions_only: bool = False) -> Iterator[pa.Table]:
    import ray.data

    d = cfg.data
    shard_bytes = d.shard_mb << 20
    if d.paths:
        shards = plan_shards(expand_paths(d.paths, d.format), "", shard_bytes)
    else:
        shards = [s for split in SPLITS
                  for s in plan_shards(expand_paths(getattr(d, f"{split}_path"), d.format), split, shard_bytes)]
    ctx = ray.data.DataContext.get_current()
    before = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True   # "first kept" means first in file order, every time
    try:
        ds = ray.data.from_items([{"shard": json.dumps(s)} for s in shards], override_num_blocks=len(shards))
        ds = ds.map_batches(_read_validate, batch_size=1, fn_kwargs={"cfg": dumped, "questions_only": questions_only})
        for table in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2):
            yield table
    finally:
        ctx.execution_options.preserve_order = before


def _gsm_symbolic_batches(cfg: ExperimentConfig, dumped: dict) -> Iterator[pa.Table]:
    import reasoning_gym

    validator = Validator(dumped, preset="canonical")
    for split in SPLITS:
        size, seed = getattr(cfg.data, f"{split}_size"), getattr(cfg.data, f"{split}_seed")
        rows = []
        for i, item in enumerate(reasoning_gym.create_dataset("gsm_symbolic", size=size, seed=seed) if size else []):
            rationale, cot_answer = split_gsm_cot(item["metadata"]["answer_cot"])
            rows.append((i, {"id": f"gsm_symbolic-{split}-{seed}-{i}", "question": item["question"],
                             "rationale": rationale, "answer": item["answer"], "cot_answer": cot_answer}))
        if rows:
            yield validator.table(rows, split, "gsm_symbolic", "gsm_symbolic")


def write_train_questions(cfg: ExperimentConfig, path: Path) -> dict:
    """`cwt-ray teach` input: id, question, gold answer of every usable train-split row (rationales
    not needed), streamed into one Parquet file. Returns counts."""
    dumped = cfg.model_dump(mode="json")
    batches = _file_batches(cfg, dumped, questions_only=True) if cfg.data.source == "files" else \
        _gsm_symbolic_batches(cfg, dumped)
    ids, counts = KeySet(), Counter()
    schema = pa.schema([("id", pa.string()), ("question", pa.string()), ("answer", pa.string())])
    path.parent.mkdir(parents=True, exist_ok=True)
    with pq.ParquetWriter(path, schema) as writer:
        for table in batches:
            table = table.filter(pc.equal(table.column("split"), "train"))
            counts["rows_in"] += table.num_rows
            kept = table.filter(pc.equal(table.column("kind"), ""))
            kept = kept.filter(pa.array(ids.add_new(kept.column("id_key").to_numpy())))
            counts["questions"] += kept.num_rows
            writer.write_table(kept.select(schema.names).cast(schema))
    counts["rejected"] = counts["rows_in"] - counts["questions"]
    if not counts["questions"]:
        raise UserError("no usable train-split questions to teach (check data.* and the field mapping)")
    return dict(counts)


class _Sink:
    """Streams kept rows and rejects into Parquet files under a temporary folder."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.writers: dict[str, pq.ParquetWriter] = {}

    def write(self, name: str, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        if name not in self.writers:
            self.writers[name] = pq.ParquetWriter(self.folder / f"{name}.parquet", table.schema)
        self.writers[name].write_table(table)

    def close(self, name: str, schema: pa.Schema) -> None:
        if name in self.writers:
            self.writers.pop(name).close()
        elif not (self.folder / f"{name}.parquet").exists():   # an empty split still gets its file
            pq.write_table(schema.empty_table(), self.folder / f"{name}.parquet")


def _record_table(t: pa.Table) -> pa.Table:
    return t.select(RECORD_SCHEMA.names).cast(RECORD_SCHEMA)


def _reject_table(t: pa.Table) -> pa.Table:
    return t.select(DATA_REJECT_SCHEMA.names).cast(DATA_REJECT_SCHEMA)


# The evaluation rows set aside until every train question is known.
_PENDING_NAMES = RECORD_SCHEMA.names + ["q_key", "id_key", "truncated", "stated_answer"]


def _take_batch(table: pa.Table, ids: KeySet, train_questions: KeySet, sink: _Sink, tally: Tally) -> None:
    """One validated batch: duplicate ids out, train rows written, evaluation rows set aside until
    every train question is known, rejects written; everything counted."""
    tally.rows_in(table)
    ok = pc.equal(table.column("kind"), "")
    kept, rejected = table.filter(ok), table.filter(pc.invert(ok))
    if kept.num_rows:
        new = ids.add_new(kept.column("id_key").to_numpy())
        if not new.all():
            dup = kept.filter(pa.array(~new))
            reasons = [f"duplicate id '{i}' (first kept)" for i in dup.column("id").to_pylist()]
            dup = dup.set_column(dup.schema.get_field_index("kind"), "kind", pa.array(["duplicate_id"] * dup.num_rows))
            dup = dup.set_column(dup.schema.get_field_index("reason"), "reason", pa.array(reasons, pa.string()))
            rejected = pa.concat_tables([rejected, dup])
            kept = kept.filter(pa.array(new))
    train = kept.filter(pc.equal(kept.column("split"), "train"))
    if train.num_rows:
        tally.kept("train", train)
        train_questions.add(train.column("q_key").to_numpy())
        sink.write("train", _record_table(train))
    for split in ("validation", "test"):
        sink.write(f"{split}.pending", kept.filter(pc.equal(kept.column("split"), split)).select(_PENDING_NAMES))
    if rejected.num_rows:
        tally.rejected(rejected)
        sink.write("rejects", _reject_table(rejected))


def _drop_train_questions(folder: Path, split: str, train_questions: KeySet, sink: _Sink, tally: Tally) -> None:
    """Writes an evaluation split from its pending rows without the questions that also occur in
    training: those would measure memorisation, not reasoning."""
    pending = folder / f"{split}.pending.parquet"
    out = _Sink(folder)
    pending_file = pq.ParquetFile(pending) if pending.is_file() else None
    if pending_file is not None and pending_file.metadata.num_rows:
        # One row group at a time: each is one streamed part (at most a shard's rows), so this
        # pass holds a bounded amount (`iter_batches(4096)` held ~35 MiB more at 1M rows).
        for i in range(pending_file.num_row_groups):
            part = pending_file.read_row_group(i, use_threads=False)
            seen = train_questions.contains(part.column("q_key").to_numpy())
            fresh = part.filter(pa.array(~seen))
            tally.kept(split, fresh)
            out.write(split, _record_table(fresh))
            if seen.any():
                dup = part.filter(pa.array(seen))
                n = dup.num_rows
                rejects = pa.table({
                    "split": [split] * n, "file": dup.column("source"), "line": pa.nulls(n, pa.int64()),
                    "id": dup.column("id"), "kind": ["in_train_split"] * n,
                    "reason": ["question also in the train split"] * n,
                    "raw": pc.utf8_slice_codeunits(dup.column("question"), 0, 2000)}, schema=DATA_REJECT_SCHEMA)
                sink.write("rejects", rejects)
                tally.rejected(rejects)
    pending_file = None
    pending.unlink()
    out.close(split, RECORD_SCHEMA)
    release_free_heap()


def write_splits(cfg: ExperimentConfig, data_dir: Path) -> dict:
    """Read, validate and split the configured data into data_dir (train/validation/test.parquet,
    rejects.parquet, summary.json with the data check). Returns the summary; raises DataStop, with
    everything written, when a split loses more than data.max_reject_fraction or train keeps nothing."""
    dumped = cfg.model_dump(mode="json")
    batches = _file_batches(cfg, dumped) if cfg.data.source == "files" else _gsm_symbolic_batches(cfg, dumped)
    with atomic_dir(data_dir) as tmp:   # a crash mid-way never leaves half a split under its final name
        sink = _Sink(tmp)
        ids, train_questions, tally = KeySet(), KeySet(), Tally()
        for table in batches:
            _take_batch(table, ids, train_questions, sink, tally)
        sink.close("train", RECORD_SCHEMA)
        for split in ("validation", "test"):
            sink.close(f"{split}.pending", RECORD_SCHEMA)
        for split in ("validation", "test"):
            _drop_train_questions(tmp, split, train_questions, sink, tally)
        sink.close("rejects", DATA_REJECT_SCHEMA)
        summary = summarise(cfg, tmp, tally, ids, train_questions,
                            lambda: student_tokenizer(cfg.student.model_dump(mode="json")))
        write_json(tmp / SUMMARY, summary)
    check_reject_limit(cfg, summary, data_dir)
    if not summary["train"]["kept"]:
        raise DataStop(f"no usable training rows from data source '{cfg.data.source}' "
                       f"(reasons in {data_dir / 'rejects.parquet'})", summary)
    return summary
