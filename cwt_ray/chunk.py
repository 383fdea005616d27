"""Chunk stage: split every rationale of a split into coherent chunks, in parallel on Ray Data.

The algorithms live in chunking.py; here a Ray Data actor loads what the heuristic needs once
(tokenizer, sentence encoder, SBC's student), keeps every finished batch so a killed stage
resumes where it stopped, and `chunk_split` writes the stage's folder (docs/run-directory.md).
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pyarrow as pa

from .chunking import ChunkLossScorer, RecordChunker, chunk_params, resolve_embedding_model
from .cluster import map_on_actor_pool
from .console import get_logger
from .rundir import CHUNK_REJECT_SCHEMA, CHUNK_SCHEMA, SUMMARY, atomic_dir, atomic_file, write_json

log = get_logger("chunk")


class Chunker:
    """Ray Data callable class: a RecordChunker with its models loaded once per actor."""

    def __init__(self, cfg: dict, tokenizer_path: str, embedding_path: str | None, student_path: str | None,
                 done_dir: str | None = None):
        """`done_dir`: keep each finished batch there, and reuse it when the same batch comes again
        (a chunk stage that was killed resumes without redoing finished batches; SBC takes
        minutes per batch on a CPU)."""
        import torch

        from .config import ExperimentConfig
        from .samples import SampleBuilder
        from .student import load_model, load_tokenizer

        exp = ExperimentConfig.model_validate(cfg)
        self.cfg = exp.chunk
        torch.set_num_threads(max(1, int(self.cfg.cpus_per_actor)))
        device = "cuda" if torch.cuda.is_available() else "cpu"
        encoder = scorer = None
        if embedding_path:
            from sentence_transformers import SentenceTransformer
            encoder = SentenceTransformer(embedding_path, device=device)
        if student_path:
            student = load_model(student_path, exp.student.trust_remote_code).to(device).eval()
            scorer = ChunkLossScorer(student, SampleBuilder(load_tokenizer(student_path), exp),
                                     exp.student.max_length, self.cfg.sbc_batch_size)
        self.chunker = RecordChunker(self.cfg, load_tokenizer(tokenizer_path), encoder, scorer)
        self.done_dir = Path(done_dir) if done_dir else None
        # What a finished batch's result depends on besides its rows (SBC scores in the training format).
        self.done_key = hashlib.sha256(json.dumps(
            [chunk_params(self.cfg), exp.stages.model_dump(mode="json"), exp.prompt.model_dump(mode="json"),
             exp.task.model_dump(mode="json"), exp.student.model_dump(mode="json"),
             tokenizer_path, embedding_path, student_path],
            sort_keys=True).encode()).hexdigest()

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.done_dir is None:
            return self.chunker(batch)
        import pyarrow.parquet as pq

        rows = json.dumps(batch.to_pylist(), sort_keys=True, default=str)
        done_file = self.done_dir / f"{hashlib.sha256((self.done_key + rows).encode()).hexdigest()[:32]}.parquet"
        if done_file.exists():
            try:
                table = pq.read_table(done_file, schema=CHUNK_SCHEMA)
                log.info(f"[chunk {self.cfg.heuristic}] {batch.num_rows} rationales chunked by an earlier attempt, reused")
                return table
            except Exception:   # unreadable (e.g. cut short by a power loss): chunk the batch again
                done_file.unlink(missing_ok=True)
        table = self.chunker(batch)
        self.done_dir.mkdir(parents=True, exist_ok=True)
        with atomic_file(done_file) as tmp:   # a kill mid-write leaves no half file under the final name
            pq.write_table(table, tmp)
        return table


def chunk_split(records_path: Path, out_dir: Path, cfg, tokenizer_path: str, student_path: str | None = None) -> dict:
    """Chunk every rationale of a split with Ray Data into `out_dir` (Parquet folder), with
    `rejects.parquet`, `summary.json` and `view.html` beside it. Returns the summary.

    `student_path` (sbc) may be any student folder, e.g. a checkpoint, so training can re-run the
    search with its latest student."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    import ray.data

    from .chunk_view import summarise, write_view

    ccfg = cfg.chunk
    embedding_path = None
    if ccfg.heuristic == "semantic" or (ccfg.heuristic == "sbc" and ccfg.sbc_init == "semantic"):
        embedding_path = resolve_embedding_model(ccfg.embedding_model)
    if ccfg.heuristic != "sbc":
        student_path = None
    # Read before the actor pool starts, and write with zero-CPU tasks: the pool may hold every
    # CPU of a small cluster, and tasks queued behind it would wait forever.
    ds = ray.data.read_parquet(str(records_path)).materialize()
    rows_in = ds.count()
    # Finished batches are kept beside the output until the stage completes, so a killed stage
    # resumes where it stopped. On a multi-node cluster this needs storage every node shares
    # (storage_path); without it, other nodes' copies are neither reused nor removed.
    done_dir = out_dir.with_name(out_dir.name + ".done")
    chunked = map_on_actor_pool(
        ds, Chunker, {"cfg": cfg.model_dump(mode="json"), "tokenizer_path": tokenizer_path,
                      "embedding_path": embedding_path, "student_path": student_path, "done_dir": str(done_dir)},
        rows=rows_in, batch_size=ccfg.batch_size, concurrency=ccfg.concurrency, cpus_per_actor=ccfg.cpus_per_actor,
        gpus_per_actor=ccfg.gpus_per_actor, needs_model=ccfg.heuristic != "average")
    with atomic_dir(out_dir) as tmp:
        chunked.write_parquet(str(tmp / "all"), ray_remote_args={"num_cpus": 0})
        table = pq.read_table(str(tmp / "all"), schema=CHUNK_SCHEMA).sort_by("id")
        ok = pc.is_valid(table.column("chunks"))
        kept, rejected = table.filter(ok), table.filter(pc.invert(ok))
        shutil.rmtree(tmp / "all")
        pq.write_table(kept, tmp / "chunks.parquet")
        pq.write_table(pa.table({"id": rejected.column("id"), "reason": rejected.column("note")},
                                schema=CHUNK_REJECT_SCHEMA), tmp / "rejects.parquet")
        summary = summarise(kept, rows_in, rejected.num_rows, ccfg)
        write_json(tmp / SUMMARY, summary)
        records = {r["id"]: r for r in pq.read_table(str(records_path)).to_pylist()}
        write_view(kept, records, tmp / "view.html", ccfg.view_samples)
    shutil.rmtree(done_dir, ignore_errors=True)
    return summary
