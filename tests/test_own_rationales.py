"""Bringing your own rationales: the shipped yes/no example (examples/yes_no/: rationales people
wrote, one to three facts that never say the answer) through the whole pipeline, as a new user
would run it, with the tiny student and two steps per method. The data stage keeps its rows (the
agreement filter judges what a rationale states, and these state nothing), every method trains and
is evaluated, and the report carries the data check."""
import json

import pytest

from cwt_ray.config import load_config
from cwt_ray.pipeline import run_stages
from conftest import ROOT

pytestmark = pytest.mark.slow


def test_yes_no_example_with_human_rationales_end_to_end(ray_cluster, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)   # the example's data paths are relative to the repository root
    cfg = load_config(ROOT / "examples" / "yes_no" / "config.yaml", [
        f"storage_path={tmp_path}", "train.max_steps=2", "eval.limit=4", "eval.latency_questions=1",
        "eval.max_new_tokens=16"])
    report = run_stages(cfg)
    run_dir = cfg.run_dir
    summary = json.loads((run_dir / "data" / "summary.json").read_text())
    train = summary["train"]
    assert train["kept"] >= 0.9 * train["rows_in"] and train["rows_in"] >= 20   # the reject limit applied
    # the one rationale that states a wrong answer is the only reject; the two that state the right
    # one are the only kept rationales that state anything
    assert train["rejected_by_kind"] == {"teacher_disagrees": 1} and train["no_stated_answer"] == train["kept"] - 2
    assert train["profile"]["fewer_steps_than_k"] > 0
    chunks = json.loads((run_dir / "chunks" / "train" / "summary.json").read_text())
    assert chunks["chunked"] == train["kept"] and chunks["fewer_chunks_than_k"] > 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics) >= set(cfg.methods) == {"std_cot", "cwt", "stt"}
    for method in cfg.methods:
        assert metrics[method]["train"]["steps"] == 2 and metrics[method]["eval"]["n"] == 4, method
    text = report.read_text()
    assert "no stated answer" in text and "teacher_disagrees 1" in text and "fewer steps than K" in text
    assert "the rationale states no answer" in text
    out = capsys.readouterr().out
    assert "[data] check" in out and "with fewer than K" in out
