"""Benchmark: search-based chunking (SBC) cost, and our scorer against a full forward.

Runs `cwt_ray.chunk.Chunker` with heuristic=sbc in one process (2 threads, fp32) on gsm_symbolic
rationales, scoring candidates with the tiny student and with SmolLM2-135M, side by side with a
baseline scorer in the same process: `FullForwardChunker` below, which scores every candidate the
straightforward way (full logits over the whole sequence, question and answer included; cwt-ray
did this until 2026-12-04). Runs alternate (ours, baseline, ours, ...); each run searches the same
rationales from scratch.

    .venv/bin/python benchmarks/sbc_search.py --n-tiny 32 --n-smollm2 16 --repeats 2

Prints a table (wall time, candidates scored per second, seconds per rationale, accepted moves,
mean chunk loss before -> after the search), the speed ratio, whether both scorers chose the same
boundaries, and a final JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from cwt_ray.chunk import Chunker  # noqa: E402
from cwt_ray.chunking import ChunkLossScorer, chunk_texts  # noqa: E402
from cwt_ray.config import ExperimentConfig  # noqa: E402
from cwt_ray.student import resolve_student  # noqa: E402

from semantic_chunking import make_records  # noqa: E402


class FullForwardScorer(ChunkLossScorer):
    """Baseline: each candidate's whole stage sequence through the model with full logits."""

    def __call__(self, record, steps, candidates):
        seqs = []
        for groups in candidates:
            seqs.append(self.builder.stage_sequence(record, chunk_texts(steps, groups)))
        scores = []
        for b in range(0, len(seqs), self.batch_size):
            batch = seqs[b:b + self.batch_size]
            width = max(len(ids) for ids, _ in batch)
            pad = self.builder.tok.pad_token_id
            ids = torch.tensor([x + [pad] * (width - len(x)) for x, _ in batch], device=self.device)
            stages = torch.tensor([s + [-1] * (width - len(s)) for _, s in batch], device=self.device)
            with torch.no_grad():
                logits = self.student(input_ids=ids, attention_mask=(stages >= 0).long()).logits[:, :-1].float()
                nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
            target_stage = stages[:, 1:]
            for row in range(len(batch)):
                k = len(candidates[b + row])
                scores.append(float(np.mean([nll[row][target_stage[row] == i].mean().item() for i in range(1, k + 1)])))
        return scores


def search(chunker: Chunker, table) -> tuple[float, list[dict]]:
    t = time.perf_counter()
    rows = chunker(table).to_pylist()
    return time.perf_counter() - t, rows


def summarise(name: str, student: str, walls: list[float], rows: list[dict]) -> dict:
    searched = [r for r in rows if r["loss_before"] is not None]
    scored = sum(r["candidates_scored"] for r in searched)
    wall = statistics.median(walls)
    return {"scorer": name, "student": student, "rationales": len(rows), "searched": len(searched),
            "walls_s": walls, "wall_s": wall, "candidates_scored": scored, "candidates_per_s": scored / wall,
            "s_per_rationale": wall / len(rows), "moves_per_rationale": float(np.mean([r["moves"] for r in searched])),
            "mean_loss_before": float(np.mean([r["loss_before"] for r in searched])),
            "mean_loss_after": float(np.mean([r["loss_after"] for r in searched]))}


def run(student: str, n: int, batch: int, repeats: int) -> dict:
    cfg = ExperimentConfig(name="bench", student={"name": student},
                           chunk={"heuristic": "sbc", "num_chunks": 3, "sbc_batch_size": batch, "cpus_per_actor": 2})
    path = str(resolve_student(cfg.student))
    tree = cfg.model_dump(mode="json")
    ours, base = Chunker(tree, path, None, path), Chunker(tree, path, None, path)
    s = base.chunker.scorer
    base.chunker.scorer = FullForwardScorer(s.student, s.builder, s.max_length, s.batch_size)
    table = make_records(n)
    walls = {"ours": [], "full_forward": []}
    rows = {}
    for _ in range(repeats):
        for name, chunker in (("ours", ours), ("full_forward", base)):
            wall, rows[name] = search(chunker, table)
            walls[name].append(wall)
    same = sum(a["boundaries"] == b["boundaries"] for a, b in zip(rows["ours"], rows["full_forward"]))
    diff = max((abs(a["loss_after"] - b["loss_after"]) for a, b in zip(rows["ours"], rows["full_forward"])
                if a["loss_after"] is not None), default=0.0)
    results = [summarise(name, student, walls[name], rows[name]) for name in walls]
    return {"student": student, "results": results, "speedup": results[1]["wall_s"] / results[0]["wall_s"],
            "same_boundaries": same, "rationales": n, "max_abs_loss_after_diff": diff}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n-tiny", type=int, default=32)
    p.add_argument("--n-smollm2", type=int, default=16)
    p.add_argument("--batch", type=int, default=16, help="candidate sequences per forward pass")
    p.add_argument("--repeats", type=int, default=2, help="alternating runs of each scorer")
    args = p.parse_args()
    torch.set_num_threads(2)
    runs = [run("tiny-llama", args.n_tiny, args.batch, args.repeats),
            run("smollm2-135m", args.n_smollm2, args.batch, args.repeats)]
    print(f"{'student':<14}{'scorer':<14}{'rationales':>11}{'candidates':>11}{'median s':>10}{'cand/s':>9}"
          f"{'s/rationale':>13}{'moves':>7}{'loss before->after':>22}")
    for run_ in runs:
        for r in run_["results"]:
            print(f"{r['student']:<14}{r['scorer']:<14}{r['rationales']:>11}{r['candidates_scored']:>11}{r['wall_s']:>10.1f}"
                  f"{r['candidates_per_s']:>9.1f}{r['s_per_rationale']:>13.2f}{r['moves_per_rationale']:>7.1f}"
                  f"{r['mean_loss_before']:>12.4f} -> {r['mean_loss_after']:.4f}")
        print(f"{run_['student']}: ours {run_['speedup']:.2f}x the full forward; same boundaries for "
              f"{run_['same_boundaries']}/{run_['rationales']} rationales; max |loss after diff| {run_['max_abs_loss_after_diff']:.2e}")
    print(json.dumps({"benchmark": "sbc_search", "fp32": True, "threads": 2, "batch": args.batch,
                      "repeats": args.repeats, "runs": runs}))


if __name__ == "__main__":
    main()
