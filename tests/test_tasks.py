"""A yes/no task and a multiple-choice task from small files written here go through the whole
pipeline: read (Ray Data), chunk, train a tiny student, evaluate. CWT only: it uses every stage
(Std-CoT's path is the same minus chunking, and the other pipeline tests run it)."""
import json

import pyarrow.parquet as pq
import pytest

from cwt_ray.rundir import read_chunks
from cwt_ray.pipeline import run_stages

pytestmark = pytest.mark.slow


def _yes_no_rows(n):
    rows = []
    for i in range(n):
        a, b = i % 7 + 2, i % 5 + 3
        yes = (a * b) % 2 == 0
        rows.append({"uid": f"yn{i}", "q": f"Is {a} times {b} an even number?",
                     "why": f"{a} times {b} is {a * b}.\n{a * b} is {'even' if yes else 'odd'}.\nSo the answer is {'yes' if yes else 'no'}.",
                     "label": "Yes" if yes else "No"})
    return rows


def _choice_rows(n):
    rows = []
    for i in range(n):
        a, b = i + 2, i % 4 + 1
        options = [a + b - 1, a + b, a + b + 1, a + b + 2]
        letter = "B"
        q = f"Tom has {a} apples and gets {b} more. How many now? " + " ".join(
            f"({k}) {v}" for k, v in zip("ABCD", options))
        rows.append({"question": q, "answer": f"(B) {a + b}", "rationale":
                     f"Tom starts with {a} apples. He gets {b} more. {a} + {b} = {a + b}. That is option (B).",
                     "gold": letter})
    return rows


def _run(smoke_cfg, tmp_path, name, rows, overrides):
    train = tmp_path / f"{name}.jsonl"
    test = tmp_path / f"{name}-test.parquet"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows[:24]))
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist(rows[24:]), test)
    cfg = smoke_cfg(f"name={name}", "data.source=files", f"data.train_path={train}", f"data.test_path={test}",
                    "methods=[cwt]", "train.max_steps=3", "eval.max_new_tokens=16", *overrides)
    report = run_stages(cfg)
    run_dir = cfg.run_dir
    summary = json.loads((run_dir / "data" / "summary.json").read_text())
    metrics = json.loads((run_dir / "evals" / "cwt" / "metrics.json").read_text())
    assert metrics["n"] == summary["test"]["kept"] > 0
    assert len(read_chunks(run_dir / "chunks" / "train")) == summary["train"]["kept"]
    assert report.is_file()
    return summary, run_dir


def test_yes_no_task_end_to_end(ray_cluster, smoke_cfg, tmp_path):
    summary, run_dir = _run(smoke_cfg, tmp_path, "yesno", _yes_no_rows(30), [
        "task.answer_type=yes_no", "data.fields={id: uid, question: q, rationale: why, answer: label}"])
    assert summary["train"]["kept"] == 24 and summary["all"]["agreement_rejected"] == 0
    assert {r["answer"] for r in pq.read_table(run_dir / "data" / "train.parquet").to_pylist()} == {"yes", "no"}


def test_multiple_choice_task_end_to_end(ray_cluster, smoke_cfg, tmp_path):
    summary, run_dir = _run(smoke_cfg, tmp_path, "choice", _choice_rows(30), [
        "task.answer_type=choice", "data.fields={question: question, rationale: rationale, answer: gold}"])
    assert summary["train"]["kept"] == 24
    assert {r["answer"] for r in pq.read_table(run_dir / "data" / "train.parquet").to_pylist()} == {"B"}
    assert all(r["id"].startswith("h-") for r in pq.read_table(run_dir / "data" / "test.parquet").to_pylist())
