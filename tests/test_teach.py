"""`cwt-ray teach` with the tiny random model standing in for the teacher: its rationales are
nonsense, the plumbing (prompts, N samples, provenance, agreement, the data stage reading the
output) is real."""
import json

import pyarrow.parquet as pq

from cwt_ray.cli import main
from cwt_ray.teach import render_prompt

from conftest import ROOT


def test_few_shot_prompt_renders_the_examples():
    teach = {"prompt": "few_shot", "few_shot_template": "{examples}Q: {question}\nA:",
             "example_template": "Q: {question}\nA: {rationale} The answer is {answer}.\n\n",
             "few_shot_examples": [{"question": "1+1?", "rationale": "1 + 1 = 2.", "answer": "2"}]}
    assert render_prompt(teach, "2+2?") == "Q: 1+1?\nA: 1 + 1 = 2. The answer is 2.\n\nQ: 2+2?\nA:"


def test_teach_generates_n_rationales_with_provenance(ray_cluster, tmp_path, capsys):
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps({"id": f"q{i}", "question": f"What is {i} + 2?", "answer": str(i + 2)}) + "\n"
                                 for i in range(3)) + '{"id": "bad", "question": "no answer"}\n')
    args = [str(ROOT / "configs" / "smoke.yaml"), f"storage_path={tmp_path}", "data.source=files",
            f"data.train_path={questions}", f"data.test_path={questions}", "teach.teacher=tiny-llama",
            "teach.num_samples=2", "teach.max_new_tokens=8", "teach.batch_size=2", "teach.prompt=few_shot",
            "teach.few_shot_examples=[{question: '1+1?', rationale: '1 + 1 = 2.', answer: '2'}]"]
    assert main(["teach", *args]) == 0
    out = tmp_path / "smoke" / "teach"
    rows = pq.read_table(out / "rationales.parquet").to_pylist()
    summary = json.loads((out / "summary.json").read_text())
    assert len(rows) == 6 and summary["questions"] == 3 and summary["questions_rejected"] == 1
    assert sorted((r["question_id"], r["sample_index"]) for r in rows) == [(f"q{i}", k) for i in range(3) for k in (0, 1)]
    assert {r["teacher"] for r in rows} == {"tiny-llama"} and {r["engine"] for r in rows} == {"hf"}
    assert all(r["finish_reason"] in ("stop", "length") for r in rows)
    assert summary["agreeing"] + summary["disagreeing"] == summary["generated"] == 6
    # The data stage reads the output as is; the strict agreement filter (teacher completions) keeps
    # only rationales that state the gold answer: some of those teach calls agreeing, whose answer
    # may be a fallback's reading (the last number), never one it calls disagreeing.
    code = main(["chunk", *args, f"data.train_path={out / 'rationales.parquet'}", "data.max_reject_fraction=1",
                 "data.agreement_filter=strict"])
    err = capsys.readouterr().err
    counts = json.loads((tmp_path / "smoke" / "data" / "summary.json").read_text())
    kept = counts["train"]["kept"]
    if kept:
        assert code == 0
    else:   # nonsense rationales: every one rejected by the agreement filter, which is a user error
        assert code == 2 and "no usable training rows" in err
    rejected = counts["train"]["rejected_by_kind"]
    assert counts["train"]["rows_in"] == 6 and kept <= summary["agreeing"]
    assert counts["all"]["agreement_rejected"] == rejected.get("teacher_disagrees", 0) + rejected.get("no_stated_answer", 0)
    assert counts["all"]["agreement_rejected"] + rejected.get("missing_field", 0) >= summary["disagreeing"]
