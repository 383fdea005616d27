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


def tree_rss() -> int:
    import psutil

    me = psutil.Process()
    total = 0
    for p in [me, *me.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--out", default="/tmp/cwt-data-bench")
    ap.add_argument("--max-length", type=int, default=2048, help="student.max_length (the rationale token limit)")
    ap.add_argument("--shard-mb", type=int, default=16)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = out / f"rows-{args.rows}.jsonl"
    generate(data, args.rows)

    import psutil
    import ray

    from cwt_ray.config import load_config
    from cwt_ray.data import write_splits
    from cwt_ray.pipeline import quiet_ray_data

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml", [
        f"storage_path={out}", "name=bench", "data.source=files", f"data.paths=[{data}]",
        f"student.max_length={args.max_length}", f"data.shard_mb={args.shard_mb}"])
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    quiet_ray_data()
    peak = {"tree": 0}
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak["tree"] = max(peak["tree"], tree_rss())
            time.sleep(0.2)

    threading.Thread(target=sample, daemon=True).start()
    t0 = time.perf_counter()
    summary = write_splits(cfg, out / "bench-data")
    wall = time.perf_counter() - t0
    stop.set()
    import resource

    driver_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    ray.shutdown()
    total = summary["all"]
    result = {"rows": total["rows_in"], "kept": total["kept"], "rejected": total["rejected"],
              "file_mb": round(data.stat().st_size / 2**20, 1), "wall_s": round(wall, 1),
              "rows_per_s": round(total["rows_in"] / wall), "driver_peak_rss_mb": round(driver_peak / 2**20),
              "tree_peak_rss_mb": round(peak["tree"] / 2**20), "id_hash_bytes": total["id_hash_bytes"],
              "bytes_per_id": round(total["id_hash_bytes"] / max(1, total["unique_ids"]), 2),
              "max_length": args.max_length, "shard_mb": args.shard_mb, "cpus": psutil.cpu_count()}
    for k, v in result.items():
        print(f"{k:>20}  {v}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
