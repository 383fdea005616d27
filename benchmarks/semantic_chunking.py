"""Benchmark: semantic chunking through Ray Data vs a plain single-process loop.

Both run the same `cwt_ray.chunk.Chunker` (MiniLM sentence embeddings in large batches + exact DP),
on the same gsm_symbolic rationales and cores; the Ray runs include actor start-up and model load,
the plain loop includes its model load. Also shows how Ray Data throughput grows from 1 to 2 CPUs.

    .venv/bin/python benchmarks/semantic_chunking.py --n 20000

Prints a table and a final JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402


def make_records(n: int) -> pa.Table:
    import reasoning_gym

    from cwt_ray.data import split_gsm_cot

    rows = []
    for i, item in enumerate(reasoning_gym.create_dataset("gsm_symbolic", size=n, seed=42)):
        rationale, _ = split_gsm_cot(item["metadata"]["answer_cot"])
        rows.append({"id": f"{i:07d}", "question": item["question"], "rationale": rationale, "answer": str(item["answer"])})
    return pa.Table.from_pylist(rows)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=20000)
    p.add_argument("--n-scaling", type=int, default=5000, help="rationales for the 1-CPU vs 2-CPU runs")
    p.add_argument("--batch", type=int, default=512, help="rationales per batch (both paths)")
    args = p.parse_args()

    import ray
    import torch

    from cwt_ray.chunk import Chunker
    from cwt_ray.chunking import resolve_embedding_model
    from cwt_ray.config import ExperimentConfig, StudentConfig
    from cwt_ray.cluster import OFFLINE_ENV, quiet_ray_data
    from cwt_ray.student import resolve_student

    t = time.perf_counter()
    table = make_records(args.n)
    print(f"{args.n} gsm_symbolic rationales generated in {time.perf_counter() - t:.0f}s")
    tok = str(resolve_student(StudentConfig(name="tiny-llama")))   # SmolLM2's tokenizer, for chunk token counts
    emb = resolve_embedding_model("all-minilm-l6-v2")

    def cfg(cpus: float) -> dict:
        return ExperimentConfig(name="bench", chunk={"heuristic": "semantic", "num_chunks": 3,
                                                      "cpus_per_actor": cpus}).model_dump(mode="json")

    results = {}
    # plain loop: one process, 2 threads
    torch.set_num_threads(2)
    t = time.perf_counter()
    chunker = Chunker(cfg(2), tok, emb, None)
    steps = 0
    for b in range(0, table.num_rows, args.batch):
        steps += sum(chunker(table.slice(b, args.batch)).column("num_chunks").to_pylist())
    results["plain loop, 2 threads"] = (time.perf_counter() - t, args.n)
    del chunker

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "records.parquet")
        pq.write_table(table, path)
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING",
                 runtime_env={"env_vars": dict(OFFLINE_ENV)})
        quiet_ray_data()
        runs = [("ray data, 1 actor x 2 CPUs", 1, 2, args.n), ("ray data, 1 actor x 1 CPU", 1, 1, args.n_scaling),
                ("ray data, 2 actors x 1 CPU", 2, 1, args.n_scaling)]
        for label, actors, cpus, n_rows in runs:
            t = time.perf_counter()
            # As cwt_ray.chunk.chunk_split: read first (an actor pool holding every CPU would starve
            # read tasks queued behind it), one block per batch (an actor works through a block alone).
            ds = ray.data.read_parquet(path).limit(n_rows).materialize()
            ds = ds.repartition(-(-n_rows // args.batch)).materialize().map_batches(
                Chunker, fn_constructor_kwargs={"cfg": cfg(cpus), "tokenizer_path": tok, "embedding_path": emb,
                                                "student_path": None},
                batch_size=args.batch, compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=cpus,
                batch_format="pyarrow")
            n = sum(b.num_rows for b in ds.iter_batches(batch_format="pyarrow", batch_size=None))
            assert n == n_rows, n
            results[label] = (time.perf_counter() - t, n_rows)
        ray.shutdown()

    rate = {label: n / wall for label, (wall, n) in results.items()}
    base = rate["plain loop, 2 threads"]
    print(f"\n{'path':<30}{'rationales':>11}{'wall s':>9}{'rationales/s':>14}{'vs plain':>10}")
    for label, (wall, n) in results.items():
        print(f"{label:<30}{n:>11}{wall:>9.1f}{rate[label]:>14.1f}{rate[label] / base:>9.2f}x")
    scaling = rate["ray data, 2 actors x 1 CPU"] / rate["ray data, 1 actor x 1 CPU"]
    print(f"\nRay Data from 1 to 2 CPUs (1 actor x 1 CPU -> 2 actors x 1 CPU): {scaling:.2f}x")
    print(json.dumps({"benchmark": "semantic_chunking", "rationales": args.n, "scaling_rationales": args.n_scaling,
                      "batch": args.batch, "rationales_per_s": rate,
                      "ray_vs_plain_same_cpus": rate["ray data, 1 actor x 2 CPUs"] / base,
                      "scaling_1_to_2_cpus": scaling}))


if __name__ == "__main__":
    main()
