"""The study table (benchmarks/study_table.py) is how issue 9's numbers reach the docs: check it
on the GPU study's published run directories against the per-question records themselves."""
from __future__ import annotations

import importlib.util
import json

import pyarrow.parquet as pq
import pytest

from conftest import ROOT

STUDY = ROOT / "docs" / "results" / "gpu-h200-2026-11-26"
OLD = " [bucketed x16, constant lr]"   # how the published runs (old training defaults) are labelled


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
    assert rows["Std-CoT" + OLD]["accuracy"] == pytest.approx(sum(std.values()) / len(std))
    lo, hi = rows["Std-CoT" + OLD]["accuracy_ci95"]
    assert lo < rows["Std-CoT" + OLD]["accuracy"] < hi
    # The paired difference is over the questions both answered.
    shared = set(std) & set(single)
    diff = sum(single[i] - std[i] for i in shared) / len(shared)
    assert rows["CWT average single-pass" + OLD]["accuracy_minus_std_cot"] == pytest.approx(diff)
    lo, hi = rows["CWT average single-pass" + OLD]["accuracy_minus_std_cot_ci95"]
    assert lo <= diff <= hi
    assert rows["CWT average single-pass" + OLD]["compared_with"] == "Std-CoT" + OLD
    # Variants that did not finish are listed with their status, not dropped.
    assert rows["CWT average" + OLD]["status"] == "trained, not evaluated"
    assert rows["STT on CWT average" + OLD]["status"] == "not trained"
    # The speed columns name how they were measured.
    assert rows["Std-CoT" + OLD]["generation"] == [("hf-generate", 250, 320, 0)]

    assert study_table.main([*map(str, runs), "--bootstrap", "200"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith("| variant |") and "batch-1 latency s" in out[0]
    assert json.loads(out[-1])["benchmark"] == "study_table"


def test_a_run_that_changes_a_protocol_setting_is_its_own_variant(study_table):
    cfg = {"train": {"bucket_factor": 16, "seed": 1}, "prompt": {"template": "Question: {question}\nAnswer:\n"}}
    assert study_table.variant(cfg, "std_cot") == "Std-CoT" + OLD   # another seed: the same variant
    cfg["train"]["bucket_factor"] = 0
    cfg["prompt"]["template"] = "Question: {question}\nAnswer:"
    assert study_table.variant(cfg, "std_cot") == ('Std-CoT [random, padded, constant lr] '
                                                   '(template="Question: {question}\\nAnswer:")')
    cfg["data"] = {"source": "files"}
    assert study_table.variant(cfg, "std_cot").endswith('(template="Question: {question}\\nAnswer:", source="files")')
    # A config without the batching and schedule keys predates them: the old defaults.
    assert study_table.variant({"chunk": {"heuristic": "semantic"}}, "stt") == "STT on CWT semantic" + OLD


@pytest.mark.parametrize("train, batching, schedule, label", [
    ({}, "bucketed x16", "constant", "[bucketed x16, constant lr]"),
    ({"bucket_factor": 0, "packing": False, "lr_schedule": "linear", "warmup_steps": 10},
     "random, padded", "linear, warm-up 10", "[random, padded, linear warm-up 10]"),
    ({"bucket_factor": 0, "packing": True, "pack_tokens": None, "lr_schedule": "linear", "warmup_steps": None,
      "warmup_ratio": 0.05}, "packed", "linear, warm-up 5%", "[packed, linear warm-up 5%]"),
    ({"bucket_factor": 16, "packing": True, "pack_tokens": 2048, "lr_schedule": "cosine", "warmup_steps": 0,
      "warmup_ratio": 0.05}, "packed to 2048 tokens, bucketed x16", "cosine", "[packed to 2048 tokens, bucketed x16, cosine lr]"),
])
def test_batching_and_schedule_are_read_from_the_config(study_table, train, batching, schedule, label):
    cfg = {"student": {"max_length": 512}, "train": train}
    assert (study_table.batching(cfg), study_table.schedule(cfg), study_table.arm(cfg)) == (batching, schedule, label)


def fake_run(root, name: str, train: dict, metrics: dict):
    """A run directory as the pipeline leaves it after training Std-CoT (not evaluated)."""
    import yaml

    run = root / name
    (run / "students" / "std_cot").mkdir(parents=True)
    cfg = {"name": name, "methods": ["std_cot"], "prompt": {"template": "Question: {question}\nAnswer:\n"},
           "data": {"source": "gsm_symbolic"}, "student": {"max_length": 512},
           "train": {"seed": 0, "max_grad_norm": 1.0, "cwt_schedule": "shuffle", **train}}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    base = {"steps": 10, "train_time_s": 1.0, "processed_tokens": 1000, "supervised_tokens": 500,
            "processed_per_supervised_token": 2.0, "real_token_ratio": 0.9, "final_loss": 0.5}
    (run / "students" / "std_cot" / "train_metrics.json").write_text(json.dumps({**base, **metrics}))
    return run


def test_old_and_new_training_defaults_are_different_variants(study_table, tmp_path):
    """A run from before the packing / linear-schedule defaults (its config.yaml has the old keys, or
    none) and runs on the new defaults are never seeds of one variant; two seeds of the new defaults
    are; the held-out loss is the mean over seeds, blank where a run did not measure it."""
    old = fake_run(tmp_path, "old", {"warmup_steps": 0, "lr_schedule": "constant", "bucket_factor": 16}, {})
    new_train = {"warmup_steps": None, "warmup_ratio": 0.05, "lr_schedule": "linear", "bucket_factor": 0,
                 "packing": True, "pack_tokens": None, "eval_every": 50}
    new0 = fake_run(tmp_path, "new-s0", new_train, {"final_val_loss": 0.4})
    new1 = fake_run(tmp_path, "new-s1", {**new_train, "seed": 1}, {"final_val_loss": 0.6})
    rows = study_table.summarise(study_table.collect([old, new0, new1]), n_boot=50, seed=0)
    assert [(r["variant"], r["runs"]) for r in rows] == [
        ("Std-CoT [bucketed x16, constant lr]", ["old"]),
        ("Std-CoT [packed, linear warm-up 5%]", ["new-s0", "new-s1"])]
    by = {r["runs"][0]: r for r in rows}
    assert (by["old"]["batching"], by["old"]["schedule"]) == ("bucketed x16", "constant")
    assert (by["new-s0"]["batching"], by["new-s0"]["schedule"]) == ("packed", "linear, warm-up 5%")
    assert by["old"]["final_val_loss"] is None and by["new-s0"]["final_val_loss"] == pytest.approx(0.5)
    assert all(r["status"] == "trained, not evaluated" for r in rows)

    table = study_table.markdown(rows).splitlines()
    assert table[0].count("|") == table[1].count("|") and "held-out loss" in table[0]
    assert table[2].endswith("| - | trained, not evaluated |")
    assert table[3].endswith("| 0.5000 | trained, not evaluated |")

    # A run from before the keys existed at all reads as the old defaults: a variant with "old".
    ancient = fake_run(tmp_path, "ancient", {}, {})
    cfg = (ancient / "config.yaml").read_text()
    assert "bucket_factor" not in cfg and "lr_schedule" not in cfg and "packing" not in cfg
    rows = study_table.summarise(study_table.collect([old, ancient]), n_boot=50, seed=0)
    assert [r["variant"] for r in rows] == ["Std-CoT [bucketed x16, constant lr]",
                                            "Std-CoT [bucketed x16, constant lr] [ancient]"]   # same seed: a repeat


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
        ("Std-CoT" + OLD, 1), ("Std-CoT" + OLD + " [again]", 1), ("Std-CoT" + OLD + ", chosen on validation (my-sweep)", 1)]


def test_paired_differences_stay_within_one_batching_and_schedule(study_table, tmp_path):
    """CWT on the new defaults is compared with Std-CoT on the new defaults, never with the old arm's."""
    import shutil

    import yaml

    runs = [STUDY / "gpu-std-cot", STUDY / "gpu-cwt-single-pass"]
    for run in list(runs):
        new = tmp_path / (run.name + "-new")
        shutil.copytree(run, new, ignore=shutil.ignore_patterns("*.safetensors"))
        cfg = yaml.safe_load((new / "config.yaml").read_text())
        cfg["train"].update(packing=True, pack_tokens=None, bucket_factor=0, lr_schedule="linear",
                            warmup_steps=None, warmup_ratio=0.05)
        (new / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        runs.append(new)
    rows = {r["variant"]: r for r in study_table.summarise(study_table.collect(runs), n_boot=50, seed=0)}
    NEW = " [packed, linear warm-up 5%]"
    assert rows["CWT average single-pass" + OLD]["compared_with"] == "Std-CoT" + OLD
    assert rows["CWT average single-pass" + NEW]["compared_with"] == "Std-CoT" + NEW
    assert "compared_with" not in rows["Std-CoT" + NEW] and rows["Std-CoT" + NEW]["runs"] == ["gpu-std-cot-new"]
