"""The study table (benchmarks/study_table.py) is how issue 9's numbers reach the docs: check it
on the GPU study's published run directories against the per-question records themselves."""
from __future__ import annotations

import importlib.util
import json

import pyarrow.parquet as pq
import pytest

from conftest import ROOT

STUDY = ROOT / "docs" / "results" / "gpu-h200-2026-11-26"


@pytest.fixture(scope="module")
def study_table():
    spec = importlib.util.spec_from_file_location("study_table", ROOT / "benchmarks" / "study_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def correct(run: str, method: str) -> dict:
    rows = pq.read_table(STUDY / run / "evals" / method / "records", columns=["id", "correct"]).to_pylist()
    return {r["id"]: bool(r["correct"]) for r in rows}


def test_study_table_agrees_with_the_records(study_table, capsys):
    runs = sorted(STUDY.glob("gpu-*"))
    rows = {r["variant"]: r for r in study_table.summarise(study_table.collect(runs), n_boot=500, seed=0)}
    std, single = correct("gpu-std-cot", "std_cot"), correct("gpu-cwt-single-pass", "cwt")

    # Accuracy is the records' mean, inside its own bootstrap interval.
    assert rows["Std-CoT"]["accuracy"] == pytest.approx(sum(std.values()) / len(std))
    lo, hi = rows["Std-CoT"]["accuracy_ci95"]
    assert lo < rows["Std-CoT"]["accuracy"] < hi
    # The paired difference is over the questions both answered.
    shared = set(std) & set(single)
    diff = sum(single[i] - std[i] for i in shared) / len(shared)
    assert rows["CWT average single-pass"]["accuracy_minus_std_cot"] == pytest.approx(diff)
    lo, hi = rows["CWT average single-pass"]["accuracy_minus_std_cot_ci95"]
    assert lo <= diff <= hi
    # Variants that did not finish are listed with their status, not dropped.
    assert rows["CWT average"]["status"] == "trained, not evaluated"
    assert rows["STT on CWT average"]["status"] == "not trained"
    # The speed columns name how they were measured.
    assert rows["Std-CoT"]["generation"] == [("hf-generate", 250, 320, 0)]

    assert study_table.main([*map(str, runs), "--bootstrap", "200"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith("| variant |") and "batch-1 latency s" in out[0]
    assert json.loads(out[-1])["benchmark"] == "study_table"


def test_a_run_that_changes_a_protocol_setting_is_its_own_variant(study_table):
    cfg = {"train": {"bucket_factor": 16, "seed": 1}, "prompt": {"template": "Question: {question}\nAnswer:\n"}}
    assert study_table.variant(cfg, "std_cot") == "Std-CoT"   # another seed: the same variant
    cfg["train"]["bucket_factor"] = 0
    cfg["prompt"]["template"] = "Question: {question}\nAnswer:"
    assert study_table.variant(cfg, "std_cot") == 'Std-CoT (bucket_factor=0, template="Question: {question}\\nAnswer:")'
    assert study_table.variant({"chunk": {"heuristic": "semantic"}}, "stt") == "STT on CWT semantic"


def test_a_repeat_or_a_sweep_choice_is_never_counted_as_another_seed(study_table, tmp_path):
    """The same run twice (same variant, same seed) is two rows, not two seeds; a sweep's test
    evaluation (runs/<sweep>/test/<trial>/) is labelled as chosen on validation and shows only the
    method it evaluated, not the students it was built on."""
    import shutil

    again = tmp_path / "again"
    shutil.copytree(STUDY / "gpu-std-cot", again)
    sweep_test = tmp_path / "my-sweep" / "test" / "t1"
    shutil.copytree(STUDY / "gpu-std-cot", sweep_test)
    (tmp_path / "my-sweep" / "sweep.json").write_text("{}")
    cfg = (sweep_test / "config.yaml").read_text()
    assert "- std_cot" in cfg
    (sweep_test / "config.yaml").write_text(cfg.replace("- std_cot", "- std_cot\n- cwt"))   # cwt: input only
    rows = study_table.summarise(study_table.collect([STUDY / "gpu-std-cot", again, sweep_test]), n_boot=50, seed=0)
    assert [(r["variant"], r["seeds_evaluated"]) for r in rows] == [
        ("Std-CoT", 1), ("Std-CoT [again]", 1), ("Std-CoT, chosen on validation (my-sweep)", 1)]
