"""Benchmark: LM head on supervised positions only (cwt_ray.train.SupervisedLoss) vs the full head.

Same student, same CWT micro-batches, alternating runs in one process (this machine is noisy:
read the ratio). Checks the two losses agree before timing anything.

    .venv/bin/python benchmarks/loss_head.py [--student smollm2-135m] [--repeats 5] [--batch 8]

Prints a table and a final JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from cwt_ray.chunking import balanced_partition, chunk_texts, split_steps  # noqa: E402
from cwt_ray.config import ExperimentConfig, StudentConfig  # noqa: E402
from cwt_ray.data import split_gsm_cot  # noqa: E402
from cwt_ray.samples import IGNORE, SampleBuilder  # noqa: E402
from cwt_ray.student import load_model, load_tokenizer, resolve_student  # noqa: E402
from cwt_ray.batches import collate  # noqa: E402
from cwt_ray.train import SupervisedLoss, forward_batch  # noqa: E402


def full_head_loss(lm, ids, mask, labels):
    target = labels[:, 1:]
    sup = target != IGNORE
    logits = lm(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    return F.cross_entropy(logits[sup], target[sup], reduction="none")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--student", default="smollm2-135m")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    import reasoning_gym

    cfg = ExperimentConfig(name="bench", student=StudentConfig(name=args.student))
    path = resolve_student(cfg.student)
    tok = load_tokenizer(path)
    builder = SampleBuilder(tok, cfg)
    samples = []
    for i, item in enumerate(reasoning_gym.create_dataset("gsm_symbolic", size=args.batch, seed=7)):
        rationale, answer = split_gsm_cot(item["metadata"]["answer_cot"])
        _, steps = split_steps(rationale, cfg.chunk.step_unit)
        groups = balanced_partition([len(tok(s)["input_ids"]) for s in steps], cfg.chunk.num_chunks)
        samples += builder.cwt({"id": str(i), "question": item["question"], "rationale": rationale,
                                "answer": item["answer"]}, chunk_texts(steps, groups))
    batch = samples[: args.batch]
    mb = collate(batch, tok.pad_token_id)   # padded: the full-head baseline takes an attention mask
    ids, labels, mask = mb.input_ids, mb.labels, mb.attention_mask
    lm = load_model(path)
    ours = SupervisedLoss(lm)

    with torch.no_grad():
        a = full_head_loss(lm, ids, mask, labels).sum().item()
        b = forward_batch(ours, mb)[0].sum().item()
    assert abs(a - b) <= 1e-4 * abs(a), (a, b)

    def step(fn) -> float:
        lm.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = fn()
        loss.sum().backward()
        return time.perf_counter() - t0

    step(lambda: forward_batch(ours, mb)[0])   # warm-up
    times = {"full_head": [], "supervised_head": []}
    for _ in range(args.repeats):
        times["full_head"].append(step(lambda: full_head_loss(lm, ids, mask, labels)))
        times["supervised_head"].append(step(lambda: forward_batch(ours, mb)[0]))
    tokens = int(mask.sum())
    supervised = int((labels != IGNORE).sum())
    rows = {k: {"median_s": statistics.median(v), "tokens_per_s": tokens / statistics.median(v)} for k, v in times.items()}
    ratio = rows["supervised_head"]["tokens_per_s"] / rows["full_head"]["tokens_per_s"]
    print(f"student {args.student}, {len(batch)} CWT samples, {tokens} tokens ({supervised} supervised), "
          f"bf16 autocast fwd+bwd, {args.threads} threads, median of {args.repeats} alternating runs")
    print(f"{'loss head':<18}{'median s/step':>14}{'tokens/s':>12}")
    for k, r in rows.items():
        print(f"{k:<18}{r['median_s']:>14.3f}{r['tokens_per_s']:>12.0f}")
    print(f"speed-up {ratio:.2f}x; losses agree: full {a:.4f} vs ours {b:.4f}")
    print(json.dumps({"benchmark": "loss_head", "student": args.student, "samples": len(batch), "tokens": tokens,
                      "supervised_tokens": supervised, "repeats": args.repeats, **{k: r for k, r in rows.items()},
                      "speedup": ratio}))


if __name__ == "__main__":
    main()
