"""Export the plain PyTorch reference's own gsm_symbolic questions to JSONL, so that a cwt-ray run
can train and evaluate on exactly them (configs/experiments/gpu_std_cot_reference_data.yaml).

    python benchmarks/export_reference_data.py .gpu/reference-data

The reference (../shared/tools/reference_gsm.py, the 26.8 % Std-CoT figure) uses
  train      = reasoning-gym gsm_symbolic, size 2000, seed 0
  test       = the first 500 questions of seed 999 (1500 generated) that are not train questions
and this script adds, for cwt-ray's held-out loss (train.eval_every), one split the reference does
not have:
  validation = the first 250 questions of seed 998 (750 generated) in neither train nor test.

Each row: id ("gsm_symbolic-<split>-<seed>-<index in the generated set>", the scheme cwt-ray's own
gsm_symbolic source uses), question, rationale (answer_cot before its '#### N' line, as cwt-ray's
gsm_symbolic source splits it) and answer (the generated gold answer). Writes train.jsonl,
validation.jsonl, test.jsonl and summary.json into the folder (1.8 MB in all); prints the summary
as one JSON line. Takes about a second.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TRAIN = (0, 2000)   # (seed, size)
TEST = (999, 500)
VALIDATION = (998, 250)


def split_cot(answer_cot: str) -> tuple[str, str | None]:
    """'steps...\\n#### 72' -> ('steps...', '72'), as cwt_ray.data.split_gsm_cot does."""
    head, sep, tail = answer_cot.rpartition("####")
    return (head.rstrip(), tail.strip()) if sep else (answer_cot.strip(), None)


def generate(split: str, seed: int, n: int, oversample: int, exclude: set[str]) -> list[dict]:
    """The first n generated questions of `seed` whose question text is not in `exclude`."""
    import reasoning_gym

    rows = []
    for i, x in enumerate(reasoning_gym.create_dataset("gsm_symbolic", size=oversample * n, seed=seed)):
        if x["question"] in exclude:
            continue
        rationale, cot_answer = split_cot(x["metadata"]["answer_cot"])
        if cot_answer is None:
            raise SystemExit(f"{split}: seed {seed} item {i} has no '#### N' line in its answer_cot")
        rows.append({"id": f"gsm_symbolic-{split}-{seed}-{i}", "question": x["question"], "rationale": rationale,
                     "answer": str(x["answer"])})
        if len(rows) == n:
            return rows
    raise SystemExit(f"{split}: only {len(rows)} of {n} questions from {oversample * n} generated (seed {seed})")


def export(folder: Path) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    train = generate("train", TRAIN[0], TRAIN[1], 1, set())
    train_q = {r["question"] for r in train}
    test = generate("test", TEST[0], TEST[1], 3, train_q)   # the reference: 3 x n_test generated, then filtered
    validation = generate("validation", VALIDATION[0], VALIDATION[1], 3, train_q | {r["question"] for r in test})
    summary = {"folder": str(folder)}
    for name, rows, (seed, _) in (("train", train, TRAIN), ("validation", validation, VALIDATION), ("test", test, TEST)):
        with open(folder / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        summary[name] = {"rows": len(rows), "seed": seed, "unique_questions": len({r["question"] for r in rows})}
    (folder / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", type=Path)
    args = p.parse_args(argv)
    print(json.dumps({"benchmark": "export_reference_data", **export(args.folder)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
