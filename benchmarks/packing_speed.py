"""Benchmark: real tokens/s of packed vs length-bucketed vs plain padded training steps, on CPU.

    .venv/bin/python benchmarks/packing_speed.py [--config configs/experiments/quickstart_64.yaml] [--steps 6] [--repeats 3] \
        [--method std_cot] [override ...]

One process, no Ray: the training step's own parts (batches.epoch_steps / micro_batches / collate,
train.SupervisedLoss, AdamW, clipping) on SmolLM2-135M, bf16 autocast where the CPU has native
bf16. Three layouts of the same samples, alternating in each repeat (this machine is noisy: read
the medians and their ratios):
- packed:   uniform random steps; each forward pass's samples packed into rows of <= pack_tokens
- bucketed: steps cut from length-sorted windows of 16 x batch (train.bucket_factor 16), padded rows
- padded:   uniform random steps, one right-padded row per sample
*Real* tokens are the samples' own tokens (padding excluded); the first step of each run is left
out (warm-up). Prints a table and a final JSON line. Target: packed loses at most 10 % real
tokens/s against bucketed on CPU (its dense block mask computes attention across a whole row).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

LAYOUTS = {"packed": (True, 0), "bucketed": (False, 16), "padded": (False, 0)}


def run_layout(cfg, samples, model_path, layout: str, steps: int, seed: int) -> dict:
    import torch

    from cwt_ray.batches import collate, epoch_steps, micro_batches
    from cwt_ray.student import load_model
    from cwt_ray.train import SupervisedLoss, build_optimizer, forward_batch, resolve_precision

    packed, bucket = LAYOUTS[layout]
    t = cfg.train
    pack = (t.pack_tokens or cfg.student.max_length) if packed else None
    torch.manual_seed(0)
    model = load_model(model_path).train()
    model.config.use_cache = False
    loss_module = SupervisedLoss(model)
    optimizer = build_optimizer(t, model, torch.device("cpu"))
    precision = resolve_precision(t.precision, torch.device("cpu"), warn=False)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else torch.autocast("cpu", enabled=False)
    plan = epoch_steps(samples, t.batch_size, seed, 0, "shuffle", bucket)[:steps]
    times, real, computed = [], [], []
    for step in plan:
        t0 = time.perf_counter()
        n_real = n_computed = 0
        supervised = sum(samples[i].supervised for i in step)
        for mb in micro_batches(step, samples, t.micro_batch_size):
            batch = collate([samples[i] for i in mb], 0, pack)
            with autocast:
                tok_loss, _, _ = forward_batch(loss_module, batch)
            (tok_loss.sum() / supervised).backward()
            n_real += batch.real_tokens
            n_computed += batch.computed_tokens
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        real.append(n_real)
        computed.append(n_computed)
    steady = slice(1, None)
    return {"layout": layout, "precision": precision, "real_tokens_per_s": sum(real[steady]) / sum(times[steady]),
            "real_token_ratio": sum(real) / sum(computed), "step_s": times}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="configs/experiments/quickstart_64.yaml")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--method", default="std_cot", choices=["std_cot", "cwt"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()

    import torch

    from cwt_ray.config import load_config
    from cwt_ray.cluster import ray_session
    from cwt_ray.pipeline import run_stages
    from cwt_ray.student import load_tokenizer, resolve_student
    from cwt_ray.train import load_samples

    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, ["name=packing-speed", "data.train_size=256", f"methods=[{args.method}]",
                                    *args.overrides])
    stages = ("data", "chunk") if args.method == "cwt" else ("data",)
    with ray_session(cfg):
        run_stages(cfg, stages=stages)
    path = resolve_student(cfg.student)
    samples, _ = load_samples(cfg, args.method, cfg.run_dir, load_tokenizer(path))
    results: dict[str, list[dict]] = {k: [] for k in LAYOUTS}
    for rep in range(args.repeats):
        order = list(LAYOUTS) if rep % 2 == 0 else list(reversed(LAYOUTS))
        for layout in order:
            r = run_layout(cfg, samples, path, layout, args.steps, seed=rep)
            results[layout].append(r)
            print(f"[packing-speed] repeat {rep + 1}/{args.repeats} {layout:<9} {r['real_tokens_per_s']:.0f} real tok/s, "
                  f"real-token ratio {r['real_token_ratio']:.3f}", flush=True)
    med = {k: statistics.median(r["real_tokens_per_s"] for r in v) for k, v in results.items()}
    ratio = {k: statistics.mean(r["real_token_ratio"] for r in v) for k, v in results.items()}
    print(f"\n{'layout':<10}{'median real tok/s':>19}{'runs':>40}{'real-token ratio':>18}")
    for k in LAYOUTS:
        runs = ", ".join(f"{r['real_tokens_per_s']:.0f}" for r in results[k])
        print(f"{k:<10}{med[k]:>19.0f}{runs:>40}{ratio[k]:>18.3f}")
    print(f"packed / bucketed = {med['packed'] / med['bucketed']:.3f}; packed / padded = {med['packed'] / med['padded']:.3f}")
    print(json.dumps({"benchmark": "packing_speed", "config": args.config, "method": args.method,
                      "overrides": args.overrides, "steps": args.steps, "repeats": args.repeats,
                      "pack_tokens": cfg.train.pack_tokens or cfg.student.max_length,
                      "precision": results["packed"][0]["precision"], "median_real_tokens_per_s": med,
                      "real_token_ratio": ratio, "packed_over_bucketed": med["packed"] / med["bucketed"],
                      "packed_over_padded": med["packed"] / med["padded"],
                      "runs": {k: [r["real_tokens_per_s"] for r in v] for k, v in results.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
