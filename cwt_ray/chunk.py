"""Chunk stage: split every rationale into K coherent chunks, in parallel on Ray Data.

A rationale is first cut into *steps* (lines, then sentences within lines); chunk boundaries only
ever fall on step boundaries, so a chunk never cuts a sentence. Chunking is lossless: the chunks
join back to the rationale exactly, and boundaries are character offsets into it (tokenizer-free).
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pyarrow as pa

from .config import ChunkConfig

CHUNK_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("chunks", pa.list_(pa.string())),
    ("boundaries", pa.list_(pa.int64())),      # K+1 character offsets: 0, b1, ..., len(rationale)
    ("chunk_tokens", pa.list_(pa.int64())),
    ("num_chunks", pa.int64()),
    ("heuristic", pa.string()),
    ("params", pa.string()),                    # the heuristic's settings, JSON
    ("score", pa.float64()),                    # average: coefficient of variation of chunk token lengths
])

# A sentence ends at . ! or ? followed by whitespace; '3.5' and '$2.50' are not sentence ends.
_SENTENCE_END = re.compile(r"[.!?](?=\s)\s*")


def step_boundaries(rationale: str, unit: str) -> list[int]:
    """End offsets of the steps of a rationale (the last one is len(rationale)).

    A line keeps its trailing newline; a sentence keeps the spaces after it, so steps tile the text.
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
    return ends or [len(rationale)]


def balanced_partition(lengths: list[int], k: int) -> list[int]:
    """Split a sequence of step lengths into k contiguous groups as equal in length as possible.

    Exact dynamic programme over boundary positions minimising the sum of squared deviations from
    the mean group length. Returns the group end indices (exclusive), the last being len(lengths).
    """
    n = len(lengths)
    k = max(1, min(k, n))
    prefix = np.concatenate([[0], np.cumsum(lengths)])
    mean = prefix[-1] / k
    inf = float("inf")
    cost = np.full((k + 1, n + 1), inf)
    back = np.zeros((k + 1, n + 1), dtype=int)
    cost[0, 0] = 0.0
    for g in range(1, k + 1):
        for j in range(g, n - (k - g) + 1):
            best, arg = inf, 0
            for i in range(g - 1, j):
                c = cost[g - 1, i] + (prefix[j] - prefix[i] - mean) ** 2
                if c < best:
                    best, arg = c, i
            cost[g, j], back[g, j] = best, arg
    ends, j = [], n
    for g in range(k, 0, -1):
        ends.append(j)
        j = back[g, j]
    return ends[::-1]


def average_chunks(rationale: str, token_len, cfg: ChunkConfig) -> dict:
    """Average chunking (AC): K chunks of about equal token length on step boundaries."""
    ends = step_boundaries(rationale, cfg.step_unit)
    starts = [0] + ends[:-1]
    steps = [rationale[s:e] for s, e in zip(starts, ends)]
    lengths = [token_len(s) for s in steps]
    k = cfg.num_chunks
    if cfg.target_chunk_tokens:
        k = min(k, max(1, math.ceil(sum(lengths) / cfg.target_chunk_tokens)))
    groups = balanced_partition(lengths, k)
    boundaries = [0] + [ends[g - 1] for g in groups]
    chunks = [rationale[a:b] for a, b in zip(boundaries, boundaries[1:])]
    group_starts = [0] + groups[:-1]
    chunk_tokens = [int(sum(lengths[a:b])) for a, b in zip(group_starts, groups)]
    mean = float(np.mean(chunk_tokens))
    return {"chunks": chunks, "boundaries": boundaries, "chunk_tokens": chunk_tokens,
            "num_chunks": len(chunks), "score": float(np.std(chunk_tokens) / mean) if mean else 0.0}


class AverageChunker:
    """Ray Data callable class: loads the student tokenizer once per actor, chunks batches."""

    def __init__(self, tokenizer_path: str, chunk_cfg: dict):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        self.cfg = ChunkConfig.model_validate(chunk_cfg)
        self.params = json.dumps(self.cfg.model_dump(exclude={"batch_size", "concurrency"}), sort_keys=True)

    def _token_len(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = []
        for rid, rationale in zip(batch.column("id").to_pylist(), batch.column("rationale").to_pylist()):
            out = average_chunks(rationale, self._token_len, self.cfg)
            assert "".join(out["chunks"]) == rationale, f"chunking lost text in {rid}"
            rows.append({"id": str(rid), **out, "heuristic": self.cfg.heuristic, "params": self.params})
        return pa.Table.from_pylist(rows, schema=CHUNK_SCHEMA)


def chunk_split(records_path: Path, out_dir: Path, tokenizer_path: str, cfg: ChunkConfig) -> int:
    """Chunk every rationale of a split with Ray Data; writes a Parquet folder, returns the row count.

    Actors write their own files (no collect on the driver), so this scales with the cluster;
    readers sort by id, so the result does not depend on which actor finished first.
    """
    import shutil

    import ray.data

    # Read before the actor pool starts, and write with zero-CPU tasks: the pool may hold every
    # CPU of a small cluster, and tasks queued behind it would wait forever.
    ds = ray.data.read_parquet(str(records_path)).materialize()
    chunked = ds.map_batches(
        AverageChunker,
        fn_constructor_kwargs={"tokenizer_path": tokenizer_path, "chunk_cfg": cfg.model_dump()},
        batch_size=cfg.batch_size,
        compute=ray.data.ActorPoolStrategy(size=cfg.concurrency),
        batch_format="pyarrow",
    )
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    chunked.write_parquet(str(tmp), ray_remote_args={"num_cpus": 0})
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)   # a crash mid-write never leaves a half folder under the final name
    return read_chunks(out_dir).num_rows


def read_chunks(path: Path) -> pa.Table:
    import pyarrow.parquet as pq

    return pq.read_table(str(path), schema=CHUNK_SCHEMA).sort_by("id")
