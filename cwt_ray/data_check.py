"""The data check: what the data stage counts, when it stops, and what it shows people before
anything trains. Per split: rows in / kept / rejected by kind (with an example reason) / kept
rationales that state no answer; rationale lengths in student tokens; steps per rationale against
chunk.num_chunks; and a few records with the answer as the extractor read it. A split that loses
more than data.max_reject_fraction of its rows stops the run (DataStop) once everything is written.

`cwt-ray data` prints it (`format_check`), `data/summary.json` keeps it (each split's `profile`,
`all.examples`) and the report shows it (`markdown_check`). Lengths and steps are measured on at
most PROFILE_ROWS kept rationales in all: the rows with the smallest id hashes, kept while the
batches stream past. That is a uniform sample (each split's share follows its size), the same
however the files are ordered or sharded, with no second read of the data. Tokenizing costs
~0.15-0.4 ms a rationale on one core, so every row would read at a fifth of the stage's speed
(docs/data.md, "How it streams"), and 10k rows per split instead of in all would add 3-8 s to a
million-row stage of ~30-45 s.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .chunking import step_boundaries
from .config import ChunkConfig, ExperimentConfig, UserError
from .rundir import SPLITS

PROFILE_ROWS = 10_000
EXAMPLES = 3

# Rows a split needs before data.max_reject_fraction applies to it: in a smaller one (a smoke test,
# a hand-made file) a few bad rows are a large share and say little.
MIN_ROWS_FOR_LIMIT = 20
# What to look at when one reject kind dominates a split: the stop line names it.
_KIND_KEY = {
    "teacher_disagrees": "data.agreement_filter, or task.answer_type / task.answer_template if answers are misread",
    "no_stated_answer": "data.agreement_filter ('stated' keeps rationales that state no answer)",
    "unreadable_answer": "task.answer_type or data.fields.answer",
    "missing_field": "data.fields or data.preset", "wrong_type": "data.fields",
    "too_long": "data.too_long=truncate or data.max_rationale_tokens",
    "duplicate_id": "data.fields.id",
    "in_train_split": "data.validation_path / data.test_path (their questions repeat train ones)",
}
_FILE_KEY = "data.format or data.preset, or the file itself"


class DataStop(UserError):
    """The data stage stopped after writing its outputs (too many rejects, no training rows). The
    summary goes with it, so a command can show the data check before the one-line error."""

    def __init__(self, message: str, summary: dict):
        super().__init__(message)
        self.summary = summary


class RationaleSample:
    """The `size` kept rationales with the smallest id hashes over every split (a bottom-k sample):
    uniform over the rows, so each split's share follows its size, and the same however the files
    are ordered or sharded. Costs ~0.4 s of the driver per million rows streaming past."""

    def __init__(self, size: int | None = None):
        self.size = size or PROFILE_ROWS
        self.keys = np.empty(0, dtype=np.uint64)
        self.splits = np.empty(0, dtype=np.int8)
        self.texts = pa.array([], pa.string())

    def add(self, split: str, keys: np.ndarray, rationales: pa.ChunkedArray | pa.Array) -> None:
        if len(self.keys) >= self.size:   # once full, only smaller keys can enter: few rows per batch
            smaller = keys < self.keys.max()
            keys, rationales = keys[smaller], rationales.filter(pa.array(smaller))
        if not len(keys):
            return
        texts = rationales.combine_chunks() if isinstance(rationales, pa.ChunkedArray) else rationales
        keys = np.concatenate([self.keys, keys])
        splits = np.concatenate([self.splits, np.full(len(texts), SPLITS.index(split), dtype=np.int8)])
        texts = pa.concat_arrays([self.texts, texts.cast(pa.string())])
        if len(keys) > self.size:
            keep = np.argpartition(keys, self.size - 1)[:self.size]
            keys, splits, texts = keys[keep], splits[keep], texts.take(pa.array(keep))
        self.keys, self.splits, self.texts = keys, splits, texts

    def of(self, split: str) -> list[str]:
        return self.texts.filter(pa.array(self.splits == SPLITS.index(split))).to_pylist()


class Tally:
    """What the driver counts while rows stream past, per split ("": unusable before its split was
    known): rows in, truncated, kept rationales that state no answer, rejects by kind with the first
    reason of each, a sample of the kept rationales; and the first kept train rows, as examples."""

    def __init__(self):
        self.counts = {s: Counter() for s in (*SPLITS, "")}
        self.kinds = {s: Counter() for s in (*SPLITS, "")}
        self.reasons: dict[str, dict[str, str]] = {s: {} for s in (*SPLITS, "")}
        self.sample = RationaleSample()
        self.examples: list[dict] = []

    def rows_in(self, table: pa.Table) -> None:
        for split, n in Counter(table.column("split").to_pylist()).items():
            self.counts[split]["rows_in"] += n

    def kept(self, split: str, part: pa.Table) -> None:
        if not part.num_rows:
            return
        self.counts[split]["truncated"] += pc.sum(part.column("truncated")).as_py() or 0
        self.counts[split]["no_stated_answer"] += part.column("stated_answer").null_count
        self.sample.add(split, part.column("id_key").to_numpy(), part.column("rationale"))
        if split == "train" and len(self.examples) < EXAMPLES:
            head = part.slice(0, EXAMPLES - len(self.examples))
            self.examples += head.select(["id", "question", "rationale", "answer", "stated_answer"]).to_pylist()

    def rejected(self, table: pa.Table) -> None:
        for split, kind, reason in zip(*(table.column(c).to_pylist() for c in ("split", "kind", "reason"))):
            self.kinds[split][kind] += 1
            if kind not in self.reasons[split]:
                self.reasons[split][kind] = " ".join(reason.split())[:200]   # one line, for the stop message


def _spread(values: list[int]) -> dict:
    a = np.asarray(values)
    return {"min": int(a.min()), "median": float(np.median(a)), "p95": int(np.percentile(a, 95, method="nearest")),
            "max": int(a.max())}


def profile(texts: list[str], kept: int, chunk: ChunkConfig, tokenizer) -> dict | None:
    """Lengths and steps of a split's sampled rationales (`kept`: the split's rows); None when none
    were sampled."""
    if not texts:
        return None
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)   # no offsets needed
    tokens = [len(e.ids) for e in encode(texts, add_special_tokens=False)]
    steps = [len(step_boundaries(t, chunk.step_unit)) for t in texts]
    return {"rows": len(texts), "of": kept, "sampled": len(texts) < kept,
            "rationale_tokens": _spread(tokens), "steps": _spread(steps), "step_unit": chunk.step_unit,
            "num_chunks": chunk.num_chunks, "fewer_steps_than_k": int(sum(s < chunk.num_chunks for s in steps))}


def check_reject_limit(cfg: ExperimentConfig, summary: dict, data_dir: Path) -> None:
    """Stop (DataStop) when a split, or all rows, lost more than data.max_reject_fraction; splits
    under MIN_ROWS_FOR_LIMIT rows are exempt. The line says where, how much, why and what to change."""
    limit = cfg.data.max_reject_fraction
    if limit is None:
        return
    for name in (*SPLITS, "all"):
        c = summary.get(name)
        if c is None or c["rows_in"] < MIN_ROWS_FOR_LIMIT or c["rejected"] / c["rows_in"] <= limit:
            continue
        kind, n = max(c["rejected_by_kind"].items(), key=lambda kv: kv[1])
        raise DataStop(
            f"{c['rejected']} of {c['rows_in']} {'rows in all' if name == 'all' else name + ' rows'} rejected "
            f"({c['rejected'] / c['rows_in']:.1%}), more than data.max_reject_fraction={limit}; most are {kind} ({n}), "
            f"e.g. \"{c['reject_examples'][kind]}\"; see {_KIND_KEY.get(kind, _FILE_KEY)}, or set "
            f"data.max_reject_fraction (null: never stop); every reason in {data_dir / 'rejects.parquet'}", summary)


def summarise(cfg: ExperimentConfig, folder: Path, tally: Tally, ids, train_questions, tokenizer: Callable) -> dict:
    """summary.json: per split the counts, rejects by kind with an example reason each, and the
    profile of its kept rationales; `all`: the totals and the examples. `ids` and `train_questions`
    are the driver's hash sets (their sizes are reported); `tokenizer()` gives the student's."""
    summary = {}
    for split in (*SPLITS, ""):
        c, kinds = tally.counts[split], tally.kinds[split]
        if split == "" and not c["rows_in"]:
            continue
        kept = pq.ParquetFile(folder / f"{split}.parquet").metadata.num_rows if split else 0
        summary[split or "unsplit"] = {
            "rows_in": c["rows_in"], "kept": kept, "rejected": sum(kinds.values()), "truncated": c["truncated"],
            "no_stated_answer": c["no_stated_answer"], "rejected_by_kind": dict(sorted(kinds.items())),
            "reject_examples": {k: tally.reasons[split][k] for k in sorted(kinds)}, "profile": None}
    summary.get("unsplit", {}).pop("profile", None)
    for name, c in summary.items():
        assert c["rows_in"] == c["kept"] + c["rejected"], (name, c)   # nothing lost, ever
    if len(tally.sample.keys):   # the tokenizer loads only when there are rows to measure
        tokenizer = tokenizer()
        for split in SPLITS:
            summary[split]["profile"] = profile(tally.sample.of(split), summary[split]["kept"], cfg.chunk, tokenizer)
    total = {k: sum(c[k] for c in summary.values())
             for k in ("rows_in", "kept", "rejected", "truncated", "no_stated_answer")}
    kinds = sum(tally.kinds.values(), Counter())
    total["rejected_by_kind"] = dict(sorted(kinds.items()))
    total["reject_examples"] = {k: next(c["reject_examples"][k] for c in summary.values() if k in c["reject_examples"])
                                for k in total["rejected_by_kind"]}
    total["agreement_filter"] = cfg.data.agreement_filter
    if cfg.data.agreement_filter != "off":
        total["agreement_rejected"] = kinds["teacher_disagrees"] + kinds["no_stated_answer"]
    total["unique_ids"] = len(ids)
    total["id_hash_bytes"] = ids.nbytes
    total["train_question_hash_bytes"] = train_questions.nbytes   # the evaluation-overlap check
    total["examples"] = tally.examples
    summary["all"] = total
    return summary


def _splits(summary: dict) -> list[tuple[str, dict]]:
    return [(name, c) for name, c in summary.items() if name != "all"]


def _measured_on(p: dict) -> str:
    return f"{p['rows']:,} of {p['of']:,} rows (sample)" if p["sampled"] else f"all {p['rows']:,} rows"


def _four(d: dict) -> str:
    return f"{d['min']} / {d['median']:g} / {d['p95']} / {d['max']}"


def _short(text: str, n: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[:n - 3] + "..."


def format_check(summary: dict, where: str) -> str:
    """The data check as the data stage prints it (`cwt-ray data`, `run`, `chunk`)."""
    lines = [f"[data] check -> {where}",
             f"  {'split':<12}{'rows in':>8}{'kept':>8}{'rejected':>10}{'no stated answer':>18}{'truncated':>11}"]
    for name, c in _splits(summary):
        lines.append(f"  {name:<12}{c['rows_in']:>8,}{c['kept']:>8,}{c['rejected']:>10,}"
                     f"{c.get('no_stated_answer', 0):>18,}{c['truncated']:>11,}")
    for name, c in _splits(summary):
        for kind, n in sorted(c.get("rejected_by_kind", {}).items(), key=lambda kv: -kv[1]):
            lines.append(f"  rejected in {name}: {kind} {n:,}, e.g. \"{_short(c['reject_examples'][kind], 120)}\"")
    profiled = [(name, c["profile"]) for name, c in _splits(summary) if c.get("profile")]
    if profiled:
        p = profiled[0][1]
        lines += [f"  rationale length in student tokens; steps per rationale ({p['step_unit']}s, chunk.step_unit):",
                  f"  {'split':<12}{'tokens min/median/p95/max':<28}{'steps min/median/p95/max':<27}"
                  f"{'fewer steps than K=' + str(p['num_chunks']):<24}measured on"]
        for name, p in profiled:
            fewer = f"{p['fewer_steps_than_k']:,} ({p['fewer_steps_than_k'] / p['rows']:.0%})"
            lines.append(f"  {name:<12}{_four(p['rationale_tokens']):<28}{_four(p['steps']):<27}{fewer:<24}"
                         f"{_measured_on(p)}")
        lines.append("  (K = chunk.num_chunks; a rationale gets at most as many chunks as it has steps)")
    examples = summary.get("all", {}).get("examples", [])
    if examples:
        lines.append("  examples (train), with the answer as the extractor read it:")
    for ex in examples:
        said = "no answer" if ex["stated_answer"] is None else repr(ex["stated_answer"])
        lines += [f"    {ex['id']}: {_short(ex['question'], 100)}",
                  f"      rationale: {_short(ex['rationale'], 160)}",
                  f"      gold answer: {ex['answer']!r}; the rationale states: {said}"]
    return "\n".join(lines)


def markdown_check(summary: dict) -> list[str]:
    """The data check as report.md shows it."""
    lines = ["| split | rows in | kept | rejected | rejected by kind | no stated answer | truncated |",
             "|---|---|---|---|---|---|---|"]
    for name, c in _splits(summary):
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(c.get("rejected_by_kind", {}).items(), key=lambda kv: -kv[1]))
        lines.append(f"| {name} | {c['rows_in']} | {c['kept']} | {c['rejected']} | {kinds or '-'} "
                     f"| {c.get('no_stated_answer', 'n/a')} | {c['truncated']} |")
    profiled = [(name, c["profile"]) for name, c in _splits(summary) if c.get("profile")]
    if profiled:
        lines += ["", "| split | rationale tokens min / median / p95 / max | steps min / median / p95 / max "
                      "| fewer steps than K | measured on |", "|---|---|---|---|---|"]
        lines += [f"| {name} | {_four(p['rationale_tokens'])} | {_four(p['steps'])} | {p['fewer_steps_than_k']} "
                  f"| {_measured_on(p)} |" for name, p in profiled]
        p = profiled[0][1]
        lines += ["", f"Rationale tokens are the student's; steps are {p['step_unit']}s (chunk.step_unit); K = "
                      f"chunk.num_chunks = {p['num_chunks']}, and a rationale gets at most as many chunks as it has steps."]
    examples = summary.get("all", {}).get("examples", [])
    if examples:
        lines += ["", "Examples (train), with the answer as the extractor read it:", ""]
        for ex in examples:
            said = "no answer" if ex["stated_answer"] is None else f"`{ex['stated_answer']}`"
            lines.append(f"- `{ex['id']}`: {_short(ex['question'], 120)} *Rationale*: {_short(ex['rationale'], 200)} "
                         f"*Gold answer* `{ex['answer']}`; the rationale states {said}.")
    return lines
