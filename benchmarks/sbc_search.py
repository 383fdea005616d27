"""Benchmark: search-based chunking (SBC) cost — candidates scored per second and time per rationale.

Runs `cwt_ray.chunk.Chunker` with heuristic=sbc in one process (2 threads) on gsm_symbolic
rationales, scoring candidates with the tiny student and with SmolLM2-135M.

    .venv/bin/python benchmarks/sbc_search.py --n-tiny 64 --n-smollm2 16

Prints a table and a final JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from cwt_ray.chunk import Chunker  # noqa: E402
from cwt_ray.config import ExperimentConfig  # noqa: E402
from cwt_ray.student import resolve_student  # noqa: E402

from semantic_chunking import make_records  # noqa: E402


def run(student: str, n: int, batch: int) -> dict:
    cfg = ExperimentConfig(name="bench", student={"name": student},
                           chunk={"heuristic": "sbc", "num_chunks": 3, "sbc_batch_size": batch, "cpus_per_actor": 2})
    path = str(resolve_student(cfg.student))
    chunker = Chunker(cfg.model_dump(mode="json"), path, None, path)
    table = make_records(n)
    t = time.perf_counter()
    rows = chunker(table).to_pylist()
    wall = time.perf_counter() - t
    searched = [r for r in rows if r["loss_before"] is not None]
    scored = sum(r["candidates_scored"] for r in searched)
    return {"student": student, "rationales": n, "searched": len(searched), "wall_s": wall,
            "candidates_scored": scored, "candidates_per_s": scored / wall, "s_per_rationale": wall / n,
            "moves_per_rationale": float(np.mean([r["moves"] for r in searched])),
            "mean_loss_before": float(np.mean([r["loss_before"] for r in searched])),
            "mean_loss_after": float(np.mean([r["loss_after"] for r in searched]))}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n-tiny", type=int, default=64)
    p.add_argument("--n-smollm2", type=int, default=16)
    p.add_argument("--batch", type=int, default=16, help="candidate sequences per forward pass")
    args = p.parse_args()
    torch.set_num_threads(2)
    results = [run("tiny-llama", args.n_tiny, args.batch), run("smollm2-135m", args.n_smollm2, args.batch)]
    print(f"{'student':<14}{'rationales':>11}{'candidates':>11}{'cand/s':>9}{'s/rationale':>13}{'moves':>7}{'loss before->after':>22}")
    for r in results:
        print(f"{r['student']:<14}{r['rationales']:>11}{r['candidates_scored']:>11}{r['candidates_per_s']:>9.1f}"
              f"{r['s_per_rationale']:>13.2f}{r['moves_per_rationale']:>7.1f}"
              f"{r['mean_loss_before']:>12.4f} -> {r['mean_loss_after']:.4f}")
    print(json.dumps({"benchmark": "sbc_search", "fp32": True, "threads": 2, "results": results}))


if __name__ == "__main__":
    main()
