"""Skip stage: which middle chunks can the CWT student do without? (skip-thinking, STT)

For each training rationale the CWT student scores the gold answer (teacher-forced, answer stage
only) with every chunk, then with chunks removed. Two gates decide whether a removal is allowed:
- correct: the student still writes the gold answer. Greedy decoding reproduces the gold answer's
           tokens exactly when, at every answer position, the student's argmax given the gold
           prefix is the gold token; so one forward pass answers it, no generation loop needed.
- nll:     the answer's mean token NLL rises by less than `stt.threshold` nats over the full
           rationale's. Softer, and the one that works with a briefly trained student.
Removal is one chunk at a time against the full rationale (each skippable chunk gives its own
skip sequence), or cumulative greedy (remove the least harmful passing chunk, test the rest with
it removed, repeat; one skip sequence with the whole set). The removed text is what STT trains
on: with style 'marker' the stage keeps its marker and the chunk becomes skip_text, with 'jump'
the stage disappears.

The gate logic (`select_skips`) only sees a scoring function, so it is tested with scripted
scores; `SkipScorer` is the Ray Data actor that scores with a real student.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pyarrow as pa

from .cluster import gather, map_on_actor_pool
from .config import SkipConfig
from .rundir import SKIP_SCHEMA, SKIP_STATUSES, SUMMARY, atomic_dir, chunks_dir, read_chunks, split_file, write_json


@dataclass(frozen=True)
class Score:
    nll: float        # mean token NLL of the answer stage's target (answer text + eos)
    correct: bool     # greedy decoding of the answer stage would give exactly the gold answer


def skippable_stages(k: int, which: str) -> list[int]:
    return list(range(2, k)) if which == "middle" else list(range(1, k + 1))


def select_skips(k: int, score: Callable[[list[tuple[int, ...]]], list[Score]], cfg: SkipConfig) -> dict:
    """Decide which stages of a K-chunk rationale to skip. `score` maps skip sets (tuples of
    1-based stages removed) to Scores; the empty set is the full rationale."""
    candidates = skippable_stages(k, cfg.skippable)
    out = {"status": "", "baseline_nll": None, "baseline_correct": None, "skip_sets": [], "trials": [],
           "candidates_scored": 0}
    if not candidates:
        out["status"] = "no_middle_chunk"
        return out
    base = score([()])[0]
    out.update(baseline_nll=base.nll, baseline_correct=base.correct, candidates_scored=1)
    if (cfg.require_correct or cfg.gate == "correct") and not base.correct:
        out["status"] = "wrong_with_all_chunks"
        return out

    def passes(s: Score) -> bool:
        return s.correct if cfg.gate == "correct" else s.nll - base.nll < cfg.threshold

    def trial(sets: list[tuple[int, ...]]) -> list[Score]:
        scores = score(sets)
        out["candidates_scored"] += len(sets)
        for skip_set, s in zip(sets, scores):
            out["trials"].append({"skipped": list(skip_set), "nll": s.nll, "delta": s.nll - base.nll,
                                  "correct": s.correct, "passes": passes(s)})
        return scores

    limit = cfg.max_skips or len(candidates)
    if cfg.removal == "one_at_a_time":
        scores = trial([(i,) for i in candidates])
        ok = sorted((s.nll, i) for i, s in zip(candidates, scores) if passes(s))[:limit]
        out["skip_sets"] = [[i] for _, i in sorted(ok, key=lambda x: x[1])]
    else:
        removed: list[int] = []
        remaining = list(candidates)
        while remaining and len(removed) < limit:
            sets = [tuple(sorted(removed + [i])) for i in remaining]
            passing = [(s.nll, i) for i, s in zip(remaining, trial(sets)) if passes(s)]
            if not passing:
                break
            best = min(passing)[1]   # the least harmful removal goes first
            removed.append(best)
            remaining.remove(best)
        out["skip_sets"] = [sorted(removed)] if removed else []
    out["status"] = "skipped" if out["skip_sets"] else "none_skippable"
    return out


def answer_scores(model, seqs: list[list[int]], answer_lens: list[int], pad_id: int, batch_size: int) -> list[Score]:
    """Score the last `answer_len` tokens of each sequence (the answer stage's target): their mean
    NLL and whether greedy decoding would write every one of them. The loss is student.token_nll's,
    the one training uses (LM head only on the answer's positions, the full head for students that
    rescale or soft-cap their logits)."""
    import torch
    import torch.nn.functional as F

    from .student import scored_logits

    device = next(model.parameters()).device
    scores: list[Score] = []
    for b in range(0, len(seqs), batch_size):
        batch, lens = seqs[b:b + batch_size], answer_lens[b:b + batch_size]
        width = max(len(s) for s in batch)
        ids = torch.tensor([s + [pad_id] * (width - len(s)) for s in batch], device=device)
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in batch], device=device)
        # position p predicts token p+1: the answer's n tokens are predicted from the n before
        scored = torch.zeros_like(ids, dtype=torch.bool)
        for row, (seq, n) in enumerate(zip(batch, lens)):
            if not 0 < n < len(seq):   # the rows' scores are cut from one flat tensor: a bad row would shift the rest
                raise ValueError(f"answer of {n} tokens in a sequence of {len(seq)}")
            scored[row, len(seq) - n - 1:len(seq) - 1] = True
        target = ids[:, 1:][scored[:, :-1]]
        with torch.no_grad():
            logits, _ = scored_logits(model, ids, scored, attention_mask=mask)
        logits = logits.float()
        nll = F.cross_entropy(logits, target, reduction="none")
        hit = logits.argmax(-1) == target
        start = 0
        for n in lens:   # scored positions come row by row, in order
            scores.append(Score(float(nll[start:start + n].mean()), bool(hit[start:start + n].all())))
            start += n
    return scores


class SkipScorer:
    """Ray Data callable class: one CWT student per actor; one row per rationale."""

    def __init__(self, cfg: dict, student_path: str, num_threads: int):
        import torch

        from .config import ExperimentConfig
        from .samples import SampleBuilder
        from .student import load_model, load_tokenizer

        torch.set_num_threads(max(1, num_threads))
        self.exp = ExperimentConfig.model_validate(cfg)
        self.cfg = self.exp.stt
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tok = load_tokenizer(student_path, self.exp.student.trust_remote_code)
        self.model = load_model(student_path, self.exp.student.trust_remote_code).to(device).eval()
        self.builder = SampleBuilder(self.tok, self.exp)

    def _score(self, record: dict, chunks: list[str], sets: list[tuple[int, ...]]) -> list[Score]:
        answer_len = len(self.builder.ids(self.builder.answer(record["answer"]))) + 1   # + eos
        seqs = [self.builder.stage_sequence(record, *self.builder.skip_chunks(chunks, list(s)))[0] for s in sets]
        return answer_scores(self.model, seqs, [answer_len] * len(seqs), self.tok.pad_token_id, self.cfg.score_batch_size)

    def _one(self, record: dict) -> dict:
        chunks = list(record["chunks"])
        full = len(self.builder.stage_sequence(record, chunks)[0])
        if full > self.exp.student.max_length:
            return {"status": "too_long", "note": f"{full} tokens > student.max_length"}
        return select_skips(len(chunks), lambda sets: self._score(record, chunks, sets), self.cfg)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = []
        for record in batch.to_pylist():
            try:
                found = self._one(record)
            except Exception as e:   # one bad rationale must not kill the job; it is counted
                found = {"status": "error", "note": f"{type(e).__name__}: {e}"}
            rows.append({"id": record["id"], "num_chunks": len(record["chunks"]), "status": found["status"],
                         "baseline_nll": found.get("baseline_nll"), "baseline_correct": found.get("baseline_correct"),
                         "skip_sets": found.get("skip_sets", []),
                         "skipped": sorted({i for s in found.get("skip_sets", []) for i in s}),
                         "trials": json.dumps(found.get("trials", [])),
                         "candidates_scored": found.get("candidates_scored", 0), "note": found.get("note", "")})
        return pa.Table.from_pylist(rows, schema=SKIP_SCHEMA)


def summarise(table: pa.Table, rows_in: int, cfg: SkipConfig) -> dict:
    rows = table.to_pylist()
    counts = {s: sum(r["status"] == s for r in rows) for s in SKIP_STATUSES}
    tested = [t for r in rows for t in json.loads(r["trials"])]
    accepted = [t["delta"] for t in tested if t["passes"]]
    base = [r["baseline_nll"] for r in rows if r["baseline_nll"] is not None]
    return {
        "rationales_in": rows_in, "rationales_out": len(rows), **counts,
        "skip_sequences": sum(len(r["skip_sets"]) for r in rows),
        "chunks_skipped": sum(len(r["skipped"]) for r in rows),
        "skippable_chunks": sum(len(skippable_stages(r["num_chunks"], cfg.skippable)) for r in rows),
        "removals_tested": len(tested),
        "baseline_correct_rate": (sum(bool(r["baseline_correct"]) for r in rows if r["baseline_correct"] is not None)
                                  / len(base)) if base else None,
        "mean_baseline_nll": sum(base) / len(base) if base else None,
        "mean_accepted_nll_rise": sum(accepted) / len(accepted) if accepted else None,
        "gate": cfg.gate, "threshold": cfg.threshold, "removal": cfg.removal, "style": cfg.style,
    }


def skip_split(run_dir: Path, out_dir: Path, cfg, student_path: Path) -> dict:
    """Score every chunked training rationale with the CWT student (Ray Data actor pool) into
    `out_dir/skips.parquet` + `summary.json`. Rows in = rows out: every rationale gets a status."""
    import pyarrow.parquet as pq
    import ray.data

    scfg = cfg.stt
    chunks = read_chunks(chunks_dir(run_dir, "train")).select(["id", "chunks"])
    records = pq.read_table(str(split_file(run_dir, "train")), columns=["id", "question", "answer"])
    qa = {r["id"]: r for r in records.to_pylist()}   # (Arrow joins cannot carry list columns)
    table = pa.Table.from_pylist([{**qa[c["id"]], "chunks": c["chunks"]} for c in chunks.to_pylist() if c["id"] in qa])
    rows_in = table.num_rows
    scored = map_on_actor_pool(
        ray.data.from_arrow(table), SkipScorer,
        {"cfg": cfg.model_dump(mode="json"), "student_path": str(student_path), "num_threads": int(scfg.cpus_per_actor)},
        rows=rows_in, batch_size=scfg.batch_size, concurrency=scfg.concurrency, cpus_per_actor=scfg.cpus_per_actor,
        gpus_per_actor=scfg.gpus_per_actor)
    batches = gather(scored, "[skip]", rows_in, "rationales scored")
    out = pa.concat_tables(batches).cast(SKIP_SCHEMA).sort_by("id") if batches else SKIP_SCHEMA.empty_table()
    summary = summarise(out, rows_in, scfg)
    with atomic_dir(out_dir) as tmp:
        pq.write_table(out, tmp / "skips.parquet")
        write_json(tmp / SUMMARY, summary)
    return summary
