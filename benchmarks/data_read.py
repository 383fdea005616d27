"""Read and validate a generated JSONL of N rows (~1 kB each) through the data stage's Ray Data
path; report rows/s, peak memory of the driver and of the whole process tree, and bytes per id.

    PYTHONPATH=. python benchmarks/data_read.py --rows 1000000 --out /tmp/cwt-data-bench

Generates /tmp/cwt-data-bench/rows-<N>.jsonl once (question ~300 characters, rationale ~600).
Prints a table and a final JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WORDS = ("the of and to apples oranges Tom has buys sells each box costs dollars how many total "
         "then so left more than half twice").split()


def generate(path: Path, n: int) -> None:
    if path.is_file():
        return
    rng = random.Random(0)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        for i in range(n):
            q = " ".join(rng.choices(WORDS, k=70))[:299] + "?"
            a = rng.randint(1, 999)
            r = (" ".join(rng.choices(WORDS, k=130))[:560] + f". So the answer is {a}.")
            f.write(json.dumps({"id": f"row-{i}", "question": q, "rationale": r, "answer": str(a)}) + "\n")
    tmp.rename(path)


def memory() -> dict:
    """Driver RSS and USS (private memory: shared object-store pages mapped into the driver count in
    RSS but not here), and the USS summed over the driver and every Ray process it started."""
    import psutil

    me = psutil.Process()
    out = {"driver_rss": me.memory_info().rss, "driver_uss": me.memory_full_info().uss, "tree_uss": 0}
    for p in [me, *me.children(recursive=True)]:
        try:
            out["tree_uss"] += p.memory_full_info().uss
        except psutil.Error:
            pass
    return out


def length_check(data: Path, n: int) -> dict:
    """The length check's ceiling: the first n rationales through the student's Rust tokenizer in
    one batch call on one core (as in a data-stage task), no Ray."""
    from cwt_ray.config import StudentConfig
    from cwt_ray.student import load_tokenizer, resolve_student

    texts = []
    with open(data) as f:
        for line in f:
            texts.append(json.loads(line)["rationale"])
            if len(texts) == n:
                break
    backend = load_tokenizer(resolve_student(StudentConfig(name="tiny-llama"))).backend_tokenizer   # SmolLM2's
    t0 = time.perf_counter()
    backend.encode_batch_fast(texts, add_special_tokens=False)
    return {"length_check_rows": len(texts), "tokenizer_rows_per_s_one_core": round(len(texts) / (time.perf_counter() - t0))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--out", default="/tmp/cwt-data-bench")
    ap.add_argument("--max-length", type=int, default=2048, help="student.max_length (the rationale token limit)")
    ap.add_argument("--shard-mb", type=int, default=16)
    ap.add_argument("--length-check-rows", type=int, default=20000,
                    help="also time the student's tokenizer alone on this many rationales (one core): "
                         "the ceiling of the length check when every row needs counting")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # One thread per tokenizer call, as in the data stage's Ray workers (cluster.OFFLINE_ENV).
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = out / f"rows-{args.rows}.jsonl"
    generate(data, args.rows)

    import psutil
    import pyarrow as pa
    import ray

    from cwt_ray.config import load_config
    from cwt_ray.data import write_splits
    from cwt_ray.cluster import quiet_ray_data

    check = length_check(data, args.length_check_rows) if args.length_check_rows else {}
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml", [
        f"storage_path={out}", "name=bench", "data.source=files", f"data.paths=[{data}]",
        f"student.max_length={args.max_length}", f"data.shard_mb={args.shard_mb}"])
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    quiet_ray_data()
    peak = {"driver_rss": 0, "driver_uss": 0, "tree_uss": 0}
    base = memory()
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            for k, v in memory().items():
                peak[k] = max(peak[k], v)
            time.sleep(0.5)

    threading.Thread(target=sample, daemon=True).start()
    t0 = time.perf_counter()
    summary = write_splits(cfg, out / "bench-data")
    wall = time.perf_counter() - t0
    stop.set()
    ray.shutdown()
    total = summary["all"]
    result = {"rows": total["rows_in"], "kept": total["kept"], "rejected": total["rejected"],
              "file_mb": round(data.stat().st_size / 2**20, 1), "wall_s": round(wall, 1),
              "rows_per_s": round(total["rows_in"] / wall),
              "driver_uss_before_mb": round(base["driver_uss"] / 2**20),
              **{f"peak_{k}_mb": round(v / 2**20) for k, v in peak.items()}, "id_hash_bytes": total["id_hash_bytes"],
              "bytes_per_id": round(total["id_hash_bytes"] / max(1, total["unique_ids"]), 2),
              "train_question_hash_bytes": total["train_question_hash_bytes"],
              # What the driver's peak holds beyond its start and the two hash sets: the issue's
              # "memory must not grow with the file size" is this number staying put as rows grow.
              "driver_uss_rise_minus_hashes_mb": round((peak["driver_uss"] - base["driver_uss"] - total["id_hash_bytes"]
                                                        - total["train_question_hash_bytes"]) / 2**20),
              "max_length": args.max_length, "shard_mb": args.shard_mb, "cpus": psutil.cpu_count(),
              "arrow_memory_pool": pa.default_memory_pool().backend_name, **check}
    for k, v in result.items():
        print(f"{k:>20}  {v}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
