import json

import pyarrow.parquet as pq
import pytest

from cwt_ray.config import UserError
from cwt_ray.data import split_gsm_cot, write_splits


def test_split_gsm_cot():
    assert split_gsm_cot("a\nb = 3\n#### 3") == ("a\nb = 3", "3")
    assert split_gsm_cot("no answer line") == ("no answer line", None)


def _write_jsonl(path, lines):
    with open(path, "wb") as f:
        for line in lines:
            f.write(line if isinstance(line, bytes) else (json.dumps(line) if isinstance(line, dict) else line).encode())
            f.write(b"\n")


def test_jsonl_rows_in_equal_kept_plus_rejected(ray_cluster, smoke_cfg, tmp_path):
    good = {"id": "a", "question": "q1?", "rationale": "1 + 1 = 2", "answer": "2"}
    rows = [
        good,
        "{not json",
        {"id": "b", "question": "", "rationale": "r", "answer": "1"},          # empty field
        b'{"id": "c", "question": "q\xff", "rationale": "r", "answer": "1"}',  # not UTF-8
        {"id": "a", "question": "q2?", "rationale": "r", "answer": "3"},       # duplicate id
        {"id": "d", "question": "q3?", "rationale": "r", "answer": "many"},    # unreadable answer
        {"id": "e", "question": "q4?", "rationale": ["r"], "answer": "4"},     # wrong type
        [1, 2],                                                                 # not an object
        {"id": "f", "question": "q5?", "rationale": "2 * 3 = 6", "answer": "$6"},
    ]
    rows[7] = json.dumps(rows[7])
    train = tmp_path / "train.jsonl"
    _write_jsonl(train, rows)
    test = tmp_path / "test.jsonl"
    _write_jsonl(test, [{"id": "t1", "question": "q1?", "rationale": "x", "answer": "2"},
                        {"id": "t2", "question": "new?", "rationale": "x", "answer": "5"}])
    cfg = smoke_cfg("data.source=jsonl", f"data.train_path={train}", f"data.test_path={test}")
    summary = write_splits(cfg, tmp_path / "data")
    assert summary["train"] == {"rows_in": 9, "kept": 2, "rejected": 7}
    assert summary["test"] == {"rows_in": 2, "kept": 1, "rejected": 1}   # t1 repeats a train question
    rejects = pq.read_table(tmp_path / "data" / "rejects.parquet").to_pylist()
    by_line = {(r["split"], r["line"]): r["reason"] for r in rejects}
    assert "invalid JSON" in by_line[("train", 2)]
    assert "missing or empty field 'question'" in by_line[("train", 3)]
    assert "UTF-8" in by_line[("train", 4)]
    assert "duplicate id 'a'" in by_line[("train", 5)]
    assert "cannot be read" in by_line[("train", 6)]
    assert "type list" in by_line[("train", 7)]
    assert "JSON object" in by_line[("train", 8)]
    kept = pq.read_table(tmp_path / "data" / "train.parquet").to_pylist()
    assert [r["answer"] for r in kept] == ["2", "6"]


def test_missing_data_file_is_a_user_error(ray_cluster, smoke_cfg, tmp_path):
    cfg = smoke_cfg("data.source=jsonl", f"data.train_path={tmp_path}/nope.jsonl", f"data.test_path={tmp_path}/t.jsonl")
    with pytest.raises(UserError, match="nope.jsonl"):
        write_splits(cfg, tmp_path / "data")


def test_gsm_symbolic_splits_are_disjoint_and_seeded(smoke_cfg, tmp_path):
    cfg = smoke_cfg()
    summary = write_splits(cfg, tmp_path / "a")
    write_splits(cfg, tmp_path / "b")
    a = pq.read_table(tmp_path / "a" / "train.parquet").to_pylist()
    assert a == pq.read_table(tmp_path / "b" / "train.parquet").to_pylist()
    test = pq.read_table(tmp_path / "a" / "test.parquet").to_pylist()
    assert not {r["question"] for r in a} & {r["question"] for r in test}
    assert all("####" not in r["rationale"] for r in a)
    for counts in summary.values():
        assert counts["rows_in"] == counts["kept"] + counts["rejected"]
